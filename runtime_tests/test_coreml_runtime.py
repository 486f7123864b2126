"""ios target, what only Core ML packages have: the KV cache as states, a dynamic T, the routed experts as uint8 2-bit
codes in the weight blobs (counted here through coremltools' own reader, not the report's), `--quantize` weights as
int4 / int8 `constexpr_blockwise_shift_scale` data and int8 embedding rows, the metadata Xcode shows, the fp32
compute precision, and Core ML's own runtime where one exists (macOS). Everything every target must
do (verification, captions, KV cache, atomic failure, determinism, storage figure) is in test_targets.py; the
exports are shared with it (runtime_tests/conftest.py).

On Linux the packages run in `targets/coreml/mil_executor.py` (coremltools' per-op value_inference over the saved
program); tests/test_mil_executor.py checks that executor against PyTorch op by op."""
import json
import sys

import numpy as np
import pytest

from mote.export.loader import load_model, save_model
from mote.export.model import QuantizedEmbedding, QuantizedLinear
from mote.export.quantization import parse
from mote.targets import get_target
from mote.tools.make_random_model import random_config, random_model

ON_MACOS = sys.platform == "darwin"


def _spec(package):
    import coremltools as ct

    return ct.utils.load_spec(str(package))


def _consts(package):
    """Every constant of the saved program, as coremltools' own milproto reader loads it (values from the blobs)."""
    from mote.targets.coreml.mil_executor import load_program

    program = load_program(package)
    return [op.outputs[0].val for op in program.functions["main"].operations if op.op_type == "const"
            and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) > 0]


def test_kv_cache_is_fp16_states_and_t_is_dynamic(example):
    out, report = example.export("ios")
    cfg = load_model(example.model_dir).config
    spec = _spec(out / "text_decoder.mlpackage")
    assert spec.specificationVersion >= 9                     # iOS 18: states
    states = {s.name: s.type.stateType.arrayType for s in spec.description.state}
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert set(states) == {f"{kv}_cache_{i}" for kv in "kv" for i in range(cfg.num_hidden_layers)}
    for array in states.values():
        assert list(array.shape) == [1, cfg.num_key_value_heads, report["max_seq_len"], head_dim]
        assert array.ArrayDataType.Name(array.dataType) == "FLOAT16"
    # the cache is no input or output: only embeds and input_pos go in, logits come out
    assert [i.name for i in spec.description.input] == ["embeds", "input_pos"]
    assert [o.name for o in spec.description.output] == ["logits"]
    embeds = spec.description.input[0].type.multiArrayType
    assert [[r.lowerBound, r.upperBound] for r in embeds.shapeRange.sizeRanges][1] == [1, report["max_seq_len"]]
    ops = report["facts"]["programs"]["text_decoder"]["ops"]
    assert ops["write_state"] == 2 * cfg.num_hidden_layers


def test_fp16_program_keeps_rope_angles_and_activation_quantization_fp32(example):
    """Under fp16 compute precision the RoPE angles (position x frequency) and their sin / cos stay fp32 (fp16 holds
    position 4090 only to +-2: an angle off by up to 2 rad at the highest frequency), and so does the int8 activation
    quantization (127 / max|v| overflows fp16 for small rows); everything else is fp16."""
    from mote.targets.coreml.report import load_spec

    out, report = example.export("ios")
    fn = load_spec(out / "text_decoder.mlpackage").mlProgram.functions["main"]
    ops = fn.block_specializations[fn.opset].operations
    dtypes = {kind: {op.outputs[0].type.tensorType.dataType for op in ops if op.type == kind}
              for kind in ("sin", "cos", "softmax", "round")}
    # MIL FLOAT32 = 11, FLOAT16 = 10; round: the int8 activation quantization, also fp32 (convert.keeps_fp32)
    assert dtypes == {"sin": {11}, "cos": {11}, "softmax": {10}, "round": {11}}


@pytest.mark.parametrize("shared", ["example", "odd"])
def test_routed_experts_are_uint8_codes_in_the_weight_blobs(shared, request):
    """Counted from the constants coremltools loads from the package: the uint8 constants are the routed experts at
    2 bits per weight (the report's figure), and no float constant is as large as one projection of all experts
    (no decoded or palettized-to-dense copy of the experts hides in the package)."""
    model = request.getfixturevalue(shared)
    out, report = model.export("ios")
    cfg = load_model(model.model_dir).config
    consts = _consts(out / "text_decoder.mlpackage")
    codes = [c for c in consts if c.dtype == np.uint8]
    moe = cfg.moe
    assert len(codes) == 3 * len(moe.moe_layers)
    code_bytes = sum(c.nbytes for c in codes)
    weights = report["routed_expert_weights"]
    assert code_bytes * 8 / weights == pytest.approx(2.0, abs=0.25)      # K padded to a multiple of 4 at odd widths
    # + the scales: per output channel, one fp16 each per row of K >= 72 weights (odd) at most 0.23 bits per weight
    assert code_bytes < report["routed_expert_bytes"] <= code_bytes * 1.12
    projection = {(moe.num_experts, moe.expert_intermediate_size, cfg.hidden_size),
                  (moe.num_experts, cfg.hidden_size, moe.expert_intermediate_size)}
    assert not [c.shape for c in consts if c.dtype != np.uint8 and c.shape in projection]
    # and no float copy of any part of them: all float constants together hold no more than the model's other
    # weights (+ the 256 x 4 byte table, rotary frequencies, scales and scalars)
    non_routed = sum(v.numel() for k, v in load_model(model.model_dir).state_dict().items() if ".experts." not in k)
    assert sum(c.size for c in consts if c.dtype.kind == "f") <= non_routed + 4096
    if shared == "example":
        assert report["routed_expert_bits_per_weight"] <= 2.1
    ops = report["facts"]["programs"]["text_decoder"]["ops"]
    assert not any(op.startswith("constexpr_") for op in ops)
    # every gather of the routed constants is indexed by the router's choice (argsort of the chosen experts)
    gathers = report["facts"]["programs"]["text_decoder"]["routed_experts"]["gathers"]
    assert gathers == {"chosen_by_router": 6 * len(moe.moe_layers)}


def _program_of(module_name: str) -> str:
    if module_name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "vision_encoder"
    return "token_embedding" if module_name == "model.embed_tokens" else "text_decoder"


def _blockwise_data(package):
    """(data dtype, data values) of every constexpr_blockwise_shift_scale, as coremltools' own loader reads them."""
    from coremltools.converters.mil.mil import types

    from mote.targets.coreml.mil_executor import load_program

    return [(types.builtin_to_string(op.data.dtype), np.asarray(op.data.val, dtype=np.int8))
            for op in load_program(package).functions["main"].operations
            if op.op_type == "constexpr_blockwise_shift_scale"]


@pytest.mark.parametrize("spec", ["int4", "int8"])
def test_quantized_weights_are_low_bit_constexprs_in_the_weight_blobs(spec, example, exported):
    """--quantize on the example: each quantized linear of the loaded model is one constexpr_blockwise_shift_scale
    whose int4 / int8 data are its values; the embedding is an int8 table gathered by token; the weight blobs shrink
    by exactly what the low-bit storage saves over the fp16 weights of the export without --quantize (up to the
    extra blob headers); the report's figures are the ones read here."""
    from mote.targets.coreml.report import weights_path

    out, report = exported("ios", example.model_dir, "--quantize", spec)
    plain, _ = example.export("ios")
    model = load_model(example.model_dir, parse(spec))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for program in ("vision_encoder", "token_embedding", "text_decoder"):
        stored = _blockwise_data(out / f"{program}.mlpackage")
        linears = [m for n, m in modules.items() if _program_of(n) == program and not isinstance(m, QuantizedEmbedding)]
        assert len(stored) == len(linears), program
        for m in linears:      # each weight's values are one constexpr's data, at its bit width
            assert [d for d, v in stored if np.array_equal(v, m.qweight.numpy())] == [f"int{m.bits}"], program
        facts = report["facts"]["programs"][program]["quantized"]
        assert sum(e["ops"] for e in facts["constexpr_blockwise_shift_scale"].values()) == len(linears)
        assert {d: e["data_bytes"] for d, e in facts["constexpr_blockwise_shift_scale"].items()} == {
            d: sum(m.qweight.numel() * m.bits // 8 for m in linears if f"int{m.bits}" == d) for d, _ in stored}
    (embed,) = [m for m in modules.values() if isinstance(m, QuantizedEmbedding)]
    tables = {c.dtype: c for c in _consts(out / "token_embedding.mlpackage") if c.ndim == 2 and c.shape[0] ==
              embed.qweight.shape[0]}
    np.testing.assert_array_equal(tables[np.dtype(np.int8)], embed.qweight.numpy())
    assert not [c for c in tables.values() if c.dtype.kind == "f" and c.shape == tuple(embed.qweight.shape)]
    # fp16 weights in the plain export -> bits / 8 bytes + fp16 scales here; each extra blob costs a 64-byte header
    blob_bytes = lambda d: sum(weights_path(p).stat().st_size for p in d.glob("*.mlpackage"))   # noqa: E731
    saved = sum(m.qweight.numel() * (2 - m.bits / 8) - 2 * m.qscale.numel() for m in modules.values())
    assert 0 <= saved - (blob_bytes(plain) - blob_bytes(out)) <= 128 * len(modules)
    assert report["facts"]["quantized_bytes"] == sum(m.qweight.numel() * m.bits // 8 + 2 * m.qscale.numel()
                                                     for m in modules.values())


def test_package_bytes_do_not_depend_on_the_process(example, tmp_path):
    """The example exported again by another process (protobuf writes map fields in a per-process hash order unless
    told to be deterministic; Manifest.json's identifiers are random unless rewritten): the same files, byte for
    byte."""
    import subprocess

    out, _ = example.export("ios")
    again = tmp_path / "again"
    subprocess.run([sys.executable, "-m", "mote.tools.cli", "--target", "ios", str(example.model_dir), "-o",
                    str(again), "--no-verify", "-q"], check=True)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "report.json")
    assert files == sorted(str(p.relative_to(again)) for p in again.rglob("*")
                           if p.is_file() and p.name != "report.json")
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_metadata_is_where_xcode_shows_it(export_cli, tmp_path):
    """author / license / version from config.json, a description of the model and of every input, output and
    state; no conversion date (the same input gives the same bytes)."""
    d = tmp_path / "model"
    save_model(random_model(random_config(vision=False, layers=1, experts=2), 3), d)
    config = json.loads((d / "config.json").read_text())
    config.update(author="Example Lab", license="apache-2.0", version="1.2")
    (d / "config.json").write_text(json.dumps(config))
    export_cli("ios", d, tmp_path / "out", "--no-verify")
    spec = _spec(tmp_path / "out" / "text_decoder.mlpackage")
    meta = spec.description.metadata
    assert (meta.author, meta.license, meta.versionString) == ("Example Lab", "apache-2.0", "1.2")
    assert "text_decoder" in meta.shortDescription and "fp16" in meta.shortDescription
    features = [*spec.description.input, *spec.description.output, *spec.description.state]
    assert all(f.shortDescription for f in features), [f.name for f in features if not f.shortDescription]
    assert "com.github.apple.coremltools.conversion_date" not in meta.userDefined
    assert meta.userDefined["mote.program"] == "text_decoder"


def test_fp32_compute_precision_verifies(odd, exported):
    """--compute-precision fp32 (Core ML's CPU precision): the ops compute in fp32, the states stay fp16 (iOS 18)."""
    out, report = exported("ios", odd.model_dir, "--max-seq-len", str(odd.max_seq_len), "--compute-precision", "fp32")
    assert report["verify"] == "passed"
    decoder = report["facts"]["programs"]["text_decoder"]
    states = decoder["states"]
    assert {s["dtype"] for s in states} == {"float16"}
    # fp16 only where the states are read and written (the read, the cast before each write)
    by_dtype = decoder["op_outputs_by_dtype"]
    assert by_dtype.get("float16", 0) <= 3 * len(states) < by_dtype["float32"]
    fp16 = odd.export("ios")[1]["numerics"]["text_decoder"]["sqnr_db"]
    assert report["numerics"]["text_decoder"]["sqnr_db"] > fp16


@pytest.mark.skipif(not ON_MACOS, reason="Core ML's runtime (MLModel.predict) exists only on macOS; on Linux the "
                                         "packages are verified by the MIL executor (targets/coreml/mil_executor.py)")
def test_core_ml_predict_matches_the_executor(example):   # pragma: no cover - macOS only
    import coremltools as ct

    out, report = example.export("ios")
    runner = get_target("ios").runner(out, report["max_seq_len"])
    model = ct.models.MLModel(str(out / "text_decoder.mlpackage"), compute_units=ct.ComputeUnit.CPU_ONLY)
    state = model.make_state()
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 5, load_model(example.model_dir).config.hidden_size)).astype(np.float32)
    got = model.predict({"embeds": embeds, "input_pos": np.array([0], dtype=np.int32)}, state=state)["logits"]
    import torch

    want = runner.text_decoder(torch.from_numpy(embeds), torch.tensor([0]))
    from mote.export.verify import sqnr_db

    assert sqnr_db(want, torch.from_numpy(np.asarray(got, dtype=np.float32))) >= 35.0
