"""android target, what only a `.pte` has: the runner constant methods, ExecuTorch's own C++ MultimodalRunner, the
file's constants and delegates as the flatbuffer stores them. Everything every target must do (verification,
captions, KV cache, atomic failure, determinism, storage figure) is in test_targets.py; the exports are shared
with it (runtime_tests/conftest.py)."""
import pytest

from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values
from mote.export.loader import load_model
from mote.export.tokenizer import require_tokenizer
from mote.targets import get_target


def _numel(sizes):
    n = 1
    for s in sizes:
        n *= s
    return n


def _pte_program(path):
    from executorch.exir._serialize._program import deserialize_pte_binary

    return deserialize_pte_binary(path.read_bytes()).program


def _pte_constants(path):
    """{method: [(scalar type, sizes)]} of the constant tensors stored in a .pte (read back from the file)."""
    return {plan.name: [(int(v.val.scalar_type), list(v.val.sizes)) for v in plan.values
                        if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0]
            for plan in _pte_program(path).execution_plan}


def test_routed_experts_are_2_bit_codes_in_the_pte(odd):
    """Odd widths, top-2, per-channel scales: the decoder's routed experts are stored as uint8 [E, rows, K/4] codes
    and nothing else holds a float copy of them; the constants live in the .pte's own segments (no .ptd)."""
    out, report = odd.export("android")
    assert [a["path"] for a in report["artifacts"]] == ["model.pte"]
    st = report["facts"]["storage"]
    assert st["external_data_files"] == [] and st["file_bytes"] == (out / "model.pte").stat().st_size
    parts = st["flatbuffer_bytes"] + st["constant_segment_bytes"] + st["named_data_bytes"] + st["delegate_payload_bytes"]
    assert 0 <= st["file_bytes"] - parts <= (st["segments"] + 1) * 16384   # only segment alignment padding
    # 2-bit codes + per-channel fp32 scales: 2 + 32 * (rows) / (rows * K) bits, K in {80, 72}
    assert 2.0 <= report["routed_expert_bits_per_weight"] <= 2.5
    cfg = load_model(odd.model_dir).config
    e, i, dm = cfg.moe.num_experts, cfg.moe.expert_intermediate_size, cfg.hidden_size
    consts = _pte_constants(out / "model.pte")["text_decoder"]
    packed = sorted(tuple(sizes) for dtype, sizes in consts if dtype == 0)   # uint8
    n_moe = len(cfg.moe.moe_layers)
    assert packed == sorted([(e, i, dm // 4), (e, i, dm // 4), (e, dm, (i + 3) // 4)] * n_moe)
    # no float copy of an expert matrix anywhere among the program's constants
    assert not [s for dtype, s in consts if dtype == 6 and _numel(s) in (i * dm, e * i * dm)]
    routed = n_moe * e * 3 * dm * i
    assert sum(_numel(s) for s in packed) * 8 / routed == pytest.approx(2.0, abs=0.05)


def test_example_routed_experts_take_at_most_2_1_bits(example):
    """Per-tensor scales at the example's widths: the codes and next to nothing else."""
    _, report = example.export("android")
    assert report["routed_expert_bits_per_weight"] <= 2.1


def test_runner_constant_methods(odd):
    """What ExecuTorch's LLM runners read from the .pte: cache length (the --max-seq-len given, not the default),
    BOS, vocabulary, layers, and the three programs beside them."""
    out, _ = odd.export("android")
    runner = get_target("android").runner(out, odd.max_seq_len)
    cfg = load_model(odd.model_dir).config
    expected = {"get_max_seq_len": odd.max_seq_len, "get_max_context_len": odd.max_seq_len, "use_kv_cache": True,
                "enable_dynamic_shape": True, "get_bos_id": cfg.bos_token_id, "get_vocab_size": cfg.vocab_size,
                "get_n_layers": cfg.num_hidden_layers}
    assert odd.max_seq_len != 128
    for name, value in expected.items():
        assert runner.constant(name) == value, name
    assert set(runner.program.method_names) >= {"vision_encoder", "token_embedding", "text_decoder", "get_eos_ids"}


def test_executorch_multimodal_runner_captions_the_sample(example):
    """ExecuTorch's own C++ MultimodalRunner loads the .pte (+ tokenizer.json) and captions like our runner does,
    with our kernel library in the process (as an app links it)."""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input
    from executorch.extension.llm.runner import make_token_input

    from mote.targets.executorch import kernel_library

    kernel_library.load()

    out, report = example.export("android")
    model = load_model(example.model_dir)
    pixel_values = load_pixel_values(example.model_dir / "sample.png", example.model_dir, model.config)
    prompt = (example.model_dir / "prompt.txt").read_text().strip()
    runner = MultimodalRunner(str(out / "model.pte"), str(out / "tokenizer.json"))
    config = GenerationConfig()
    config.max_new_tokens, config.echo, config.temperature = 48, False, 0.0
    pieces = []
    runner.generate([make_token_input([model.config.bos_token_id]), make_image_input(pixel_values),
                     make_text_input(prompt)], config, token_callback=pieces.append)
    tokenizer = require_tokenizer(out, model.config)
    tokenized = tokenizer.prompt(prompt, with_image=True)
    ours, _ = greedy_generate(EagerRunner(model, report["max_seq_len"]), tokenized.ids, pixel_values, 48,
                              tokenized.special)
    expected = tokenizer.decode(ours)
    assert "".join(pieces).startswith(expected[:32]) and len(expected) >= 32


def test_delegation_read_back_from_the_pte(odd):
    """XNNPACK runs the vision encoder's and the decoder's dense parts (delegate blobs in the file), the embedding
    gather stays a portable op; the report's delegation counts are the file's own."""
    out, report = odd.export("android")
    plans = {plan.name: plan for plan in _pte_program(out / "model.pte").execution_plan}
    for method in ("vision_encoder", "token_embedding", "text_decoder"):
        ids = [d.id for d in plans[method].delegates]
        assert set(ids) <= {"XnnpackBackend"}, method
        assert len(ids) == report["facts"]["delegation"][method]["xnnpack_delegates"], method
    assert plans["vision_encoder"].delegates and plans["text_decoder"].delegates
    assert [o.name for o in plans["token_embedding"].operators] == ["aten::embedding"]


def test_default_export_calls_the_kernel_library(example):
    """The example's .pte runs its routed experts in our kernel library: the file's operator table has
    mote::routed_experts.out (and no gather of expert codes), and it records the library version it needs; the
    report says so, read back from the file."""
    from mote.targets.executorch import kernel_library

    out, report = example.export("android")
    plans = {plan.name: plan for plan in _pte_program(out / "model.pte").execution_plan}
    ops = {f"{o.name}.{o.overload}" for o in plans["text_decoder"].operators}
    assert "mote::routed_experts.out" in ops and "aten::index_select.out" not in ops, ops
    assert report["facts"]["kernels"] == {"library_ops": {"mote::routed_experts.out": ["text_decoder"]},
                                         "library_version": kernel_library.KERNELS_VERSION,
                                         "executorch_quantized_ops": {}}
    runner = get_target("android").runner(out, report["max_seq_len"])
    assert runner.constant(kernel_library.VERSION_METHOD) == kernel_library.KERNELS_VERSION
    assert any("our kernel library's mote::routed_experts.out" in n for n in report["notes"])
    assert report["options"]["target"]["android_kernels"] == "fused"


def test_portable_kernels_option_needs_no_library(exported, example):
    """--android-kernels portable: ATen ops only (the chosen experts' codes gathered by index_select), verified in
    the runtime like the default; the report says no kernel library is needed."""
    out, report = exported("android", example.model_dir, "--android-kernels", "portable")
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    plans = {plan.name: plan for plan in _pte_program(out / "model.pte").execution_plan}
    assert not [o.name for p in plans.values() for o in p.operators if o.name.startswith("mote")]
    assert "get_mote_kernels_version" not in plans
    assert report["facts"]["kernels"] == {"library_ops": {}, "library_version": None,
                                         "executorch_quantized_ops": {}}
    assert any(n.startswith("kernels: portable ATen ops") for n in report["notes"])
