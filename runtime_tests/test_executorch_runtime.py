"""android target: the .pte runs in ExecuTorch's runtime (executorch.runtime) and is checked against PyTorch."""
import json
from pathlib import Path

import pytest
import torch

from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values
from mote.export.loader import load_model, save_model
from mote.export.tokenizer import require_tokenizer
from mote.targets import get_target
from mote.tools import cli
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"
MIN_SQNR_DB = 60.0   # exact reference semantics in fp32 (DESIGN.md 6)


def _export(model_dir, out, *extra):
    assert cli.main(["--target", "android", str(model_dir), "-o", str(out), "--quiet", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _check_report(report):
    assert report["verify"] == "passed"
    for program, stats in report["numerics"].items():
        assert stats["sqnr_db"] >= MIN_SQNR_DB, program
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"


def test_random_model_top2_per_channel_odd_widths(tmp_path):
    d = tmp_path / "model"
    model = random_model(random_config(hidden=80, intermediate=112, expert_intermediate=72, top_k=2,
                                       norm_topk_prob=True, per_channel=True, experts=3), 21)
    save_model(model, d)
    out = tmp_path / "android"
    report = _export(d, out)
    _check_report(report)
    assert [a["path"] for a in report["artifacts"]] == ["model.pte"]
    # constants live in the .pte's own segments (no .ptd): the parts read back add up to the file
    st = report["facts"]["storage"]
    assert st["external_data_files"] == [] and st["file_bytes"] == (out / "model.pte").stat().st_size
    parts = st["flatbuffer_bytes"] + st["constant_segment_bytes"] + st["named_data_bytes"] + st["delegate_payload_bytes"]
    assert 0 <= st["file_bytes"] - parts <= (st["segments"] + 1) * 16384   # only segment alignment padding
    # 2-bit codes + per-channel fp32 scales: 2 + 32 * (rows) / (rows * K) bits, K in {80, 72}
    assert 2.0 <= report["routed_expert_bits_per_weight"] <= 2.5
    cfg = model.config
    e, i, dm = cfg.moe.num_experts, cfg.moe.expert_intermediate_size, cfg.hidden_size
    consts = _pte_constants(out / "model.pte")["text_decoder"]
    packed = sorted(tuple(sizes) for dtype, sizes in consts if dtype == 0)   # uint8
    n_moe = len(cfg.moe.moe_layers)
    assert packed == sorted([(e, i, dm // 4), (e, i, dm // 4), (e, dm, (i + 3) // 4)] * n_moe)
    # no float copy of an expert matrix anywhere among the program's constants
    assert not [s for dtype, s in consts if dtype == 6 and _numel(s) in (i * dm, e * i * dm)]
    routed = n_moe * e * 3 * dm * i
    assert sum(_numel(s) for s in packed) * 8 / routed == pytest.approx(2.0, abs=0.05)


def _numel(sizes):
    n = 1
    for s in sizes:
        n *= s
    return n


def _pte_constants(path):
    """{method: [(scalar type, sizes)]} of the constant tensors stored in a .pte (read back from the file)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes()).program
    return {plan.name: [(int(v.val.scalar_type), list(v.val.sizes)) for v in plan.values
                        if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0]
            for plan in program.execution_plan}


def test_runner_constant_methods(tmp_path):
    d = tmp_path / "model"
    model = random_model(random_config(), 22)
    save_model(model, d)
    out = tmp_path / "android"
    _export(d, out, "--max-seq-len", "48", "--no-verify")
    runner = get_target("android").runner(out, 48)
    cfg = model.config
    expected = {"get_max_seq_len": 48, "get_max_context_len": 48, "use_kv_cache": True,
                "enable_dynamic_shape": True, "get_bos_id": cfg.bos_token_id, "get_vocab_size": cfg.vocab_size,
                "get_n_layers": cfg.num_hidden_layers}
    for name, value in expected.items():
        assert runner.constant(name) == value, name
    assert set(runner.program.method_names) >= {"vision_encoder", "token_embedding", "text_decoder", "get_eos_ids"}
    # prefill + decode through the .pte's own KV cache equals the reference, and reset() empties the cache
    ref = EagerRunner(model, 48)
    x = torch.randn(1, 6, cfg.hidden_size)
    for _ in range(2):
        runner.reset()
        ref.reset()
        a = runner.text_decoder(x[:, :5], torch.tensor([0]))
        b = runner.text_decoder(x[:, 5:], torch.tensor([5]))
        torch.testing.assert_close(a, ref.text_decoder(x[:, :5], torch.tensor([0])), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b, ref.text_decoder(x[:, 5:], torch.tensor([5])), rtol=1e-4, atol=1e-4)


def test_qwen2_moe_layout(tmp_path):
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(top_k=2, shared_expert_gate=True, vision=False), 23), d, True)
    _check_report(_export(d, tmp_path / "android"))


@pytest.mark.skipif(not (EXAMPLE / "config.json").is_file(), reason="example model not trained yet")
def test_example_exports_verifies_and_captions(tmp_path):
    out = tmp_path / "android"
    report = _export(EXAMPLE, out)
    _check_report(report)
    assert report["routed_expert_bits_per_weight"] <= 2.1
    model = load_model(EXAMPLE)
    sample = json.loads((EXAMPLE / "sample.json").read_text())
    pixel_values = load_pixel_values(EXAMPLE / "sample.png", EXAMPLE, model.config)
    tokenizer = require_tokenizer(out, model.config)
    prompt = tokenizer.prompt((EXAMPLE / "prompt.txt").read_text().strip(), with_image=True)
    tokens, _ = greedy_generate(get_target("android").runner(out, report["max_seq_len"]), prompt.ids,
                                pixel_values, 64, prompt.special)
    caption = tokenizer.decode(tokens)
    assert sample["color"] in caption and sample["shape"] in caption
    ref_tokens, _ = greedy_generate(EagerRunner(model, report["max_seq_len"]), prompt.ids, pixel_values, 64,
                                    prompt.special)
    assert tokens == ref_tokens


@pytest.mark.skipif(not (EXAMPLE / "config.json").is_file(), reason="example model not trained yet")
def test_executorch_multimodal_runner_captions_the_sample(tmp_path):
    """ExecuTorch's own C++ MultimodalRunner loads the .pte (+ tokenizer.json) and captions like our runner does."""
    from executorch.extension.llm.runner import GenerationConfig, MultimodalRunner, make_image_input, make_text_input
    from executorch.extension.llm.runner import make_token_input

    out = tmp_path / "android"
    report = _export(EXAMPLE, out, "--no-verify")
    model = load_model(EXAMPLE)
    pixel_values = load_pixel_values(EXAMPLE / "sample.png", EXAMPLE, model.config)
    prompt = (EXAMPLE / "prompt.txt").read_text().strip()
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
