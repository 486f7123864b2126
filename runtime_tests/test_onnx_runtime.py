"""onnx target, what only ONNX files have: the QMoE nodes' 2-bit initializers counted in the .onnx, the .ort
computing what the .onnx does, the portable (standard ops only) variant, the fp32-expert baseline. Everything every
target must do (verification, captions, KV cache, atomic failure, determinism, storage figure) is in
test_targets.py; the exports are shared with it (runtime_tests/conftest.py)."""
import numpy as np
import onnx
import pytest
import torch

from mote.export.loader import load_model
from mote.targets import CommonOptions, get_target


def _routed_bits_in_artifact(onnx_path, model):
    """Bits per routed-expert weight counted from the .onnx itself: the QMoE weight and scale initializers."""
    m = onnx.load(str(onnx_path))
    inits = {t.name: t for t in m.graph.initializer}
    qmoe = [n for n in m.graph.node if n.op_type == "QMoE"]
    assert qmoe and all(n.domain == "com.microsoft" for n in qmoe)
    total = 0
    for n in qmoe:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["expert_weight_bits"] == 2
        for name in (n.input[2], n.input[3], n.input[5], n.input[6]):
            total += onnx.numpy_helper.to_array(inits[name]).nbytes
    cfg = model.config
    n_weights = len(cfg.moe.moe_layers) * cfg.moe.num_experts * 3 * cfg.hidden_size * cfg.moe.expert_intermediate_size
    # No float copy of the experts may hide elsewhere in the file: all other float initializers together are no
    # larger than the model's non-routed weights.
    scale_inputs = {n.input[i] for n in qmoe for i in (3, 6)}
    other_floats = sum(onnx.numpy_helper.to_array(t).size for t in m.graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT and t.name not in scale_inputs)
    non_routed = sum(v.numel() for k, v in model.state_dict().items() if ".experts." not in k)
    assert other_floats <= non_routed + 1024   # + rope frequencies and scalar constants
    return total * 8 / n_weights


@pytest.mark.parametrize("shared", ["example", "odd"])
def test_qmoe_initializers_hold_the_reported_bits(shared, request):
    model = request.getfixturevalue(shared)
    out, report = model.export("onnx")
    bits = _routed_bits_in_artifact(out / "text_decoder.onnx", load_model(model.model_dir))
    assert bits == pytest.approx(report["routed_expert_bits_per_weight"], abs=1e-3)
    if shared == "example":
        assert bits <= 2.3   # tiny widths: one fp32 scale per block of <= 256 costs >= 0.125 (DESIGN.md 9)
    names = {a["path"] for a in report["artifacts"]}
    assert {"text_decoder.onnx", "text_decoder.ort", "vision_encoder.ort", "token_embedding.ort"} <= names


def test_ort_file_matches_onnx_file(odd):
    out, _ = odd.export("onnx")
    target = get_target("onnx")
    a = target.runner(out, odd.max_seq_len)
    b = target.runner(out, odd.max_seq_len, suffix=".ort")
    assert set(b.sessions) == {"vision_encoder", "token_embedding", "text_decoder"}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, load_model(odd.model_dir).config.hidden_size, generator=gen)
    pos = torch.tensor([0])
    assert np.allclose(a.text_decoder(x, pos).numpy(), b.text_decoder(x, pos).numpy(), atol=1e-6)


def test_portable_variant_uses_standard_ops_only(odd, export_cli, tmp_path):
    report = export_cli("onnx", odd.model_dir, tmp_path / "onnx", "--portable")
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    m = onnx.load(str(tmp_path / "onnx" / "text_decoder.onnx"))
    assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")]
    assert {i.version for i in m.opset_import if i.domain in ("", "ai.onnx")} == {25}
    int2 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT2]
    cfg = load_model(odd.model_dir).config
    assert len(int2) == len(cfg.moe.moe_layers) * cfg.moe.num_experts * 2   # fc1 (gate+up) and fc2 per expert
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == len(int2)
    assert any("dense all-expert compute" in note for note in report["notes"])


def test_fp32_expert_baseline_runs(tmp_path):
    """The benchmark's fp32 baseline: same model, experts as float32 com.microsoft.MoE."""
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline
    from mote.tools.make_random_model import random_config, random_model

    model = random_model(random_config(), 17)
    programs, _ = run_pipeline(export_programs(model, 32, KVCacheStyle.IO), model.config.moe.moe_layers)
    get_target("onnx").lower(programs, model, CommonOptions(None, tmp_path, 32, fp32_experts=True))
    m = onnx.load(str(tmp_path / "text_decoder.onnx"))
    assert {n.op_type for n in m.graph.node if n.domain == "com.microsoft"} == {"MoE"}
    runner = get_target("onnx").runner(tmp_path, 32)
    x = torch.randn(1, 4, 64)
    ref, _, _ = model.decode(x, torch.tensor([0]), *model.new_cache(32))
    got = runner.text_decoder(x, torch.tensor([0]))
    # top-1: MoE weighs the chosen expert 1.0 instead of p (no router_weights input): close, not equal
    assert torch.isfinite(got).all() and got.shape == ref.shape
