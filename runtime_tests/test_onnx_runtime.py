"""ONNX target: artifacts run in onnxruntime and are checked against the PyTorch reference (DESIGN.md section 6)."""
import json

import numpy as np
import onnx
import pytest
import torch

from mote.export.generate import EagerRunner, greedy_generate
from mote.export.images import load_pixel_values
from mote.export.loader import load_model, save_model
from mote.export.tokenizer import require_tokenizer, verification_prompt
from mote.export.verify import compare, passed
from mote.targets import CommonOptions, get_target
from mote.tools import cli
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe

from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-mote"

MIN_SQNR_DB = 35.0   # QMoE's block-wise kernel quantizes activations itself: a declared deviation (DESIGN.md 6)


def _export(model_dir, out, *extra):
    code = cli.main(["--target", "onnx", str(model_dir), "-o", str(out), "--quiet", *extra])
    assert code == 0
    return json.loads((out / "report.json").read_text())


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


@pytest.mark.skipif(not (EXAMPLE / "config.json").is_file(), reason="example model not trained yet")
def test_example_exports_verifies_and_captions(tmp_path):
    out = tmp_path / "onnx"
    report = _export(EXAMPLE, out)
    model = load_model(EXAMPLE)
    assert report["verify"] == "passed"
    for program in ("vision_encoder", "token_embedding", "text_decoder"):
        assert report["numerics"][program]["sqnr_db"] >= MIN_SQNR_DB
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    bits = _routed_bits_in_artifact(out / "text_decoder.onnx", model)
    assert bits == pytest.approx(report["routed_expert_bits_per_weight"], abs=1e-3)
    assert bits <= 2.3   # tiny widths: one fp32 scale per block of <= 256 costs >= 0.125 (DESIGN.md 9)
    names = {a["path"] for a in report["artifacts"]}
    assert {"text_decoder.onnx", "text_decoder.ort", "vision_encoder.ort"} <= names
    # caption through ORT equals the reference caption
    sample = json.loads((EXAMPLE / "sample.json").read_text())
    pixel_values = load_pixel_values(EXAMPLE / "sample.png", EXAMPLE, model.config)
    tokenizer = require_tokenizer(out, model.config)
    prompt = tokenizer.prompt((EXAMPLE / "prompt.txt").read_text().strip(), with_image=True)
    runner = get_target("onnx").runner(out, report["max_seq_len"])
    tokens, _ = greedy_generate(runner, prompt.ids, pixel_values, 64, prompt.special)
    caption = tokenizer.decode(tokens)
    assert sample["color"] in caption and sample["shape"] in caption
    ref_tokens, _ = greedy_generate(EagerRunner(model, report["max_seq_len"]), prompt.ids, pixel_values, 64,
                                    prompt.special)
    assert tokens == ref_tokens


SHAPES = {
    # hidden / expert widths that are not multiples of 32: padded exactly with zero trits
    "odd-widths-top2-per-channel": dict(hidden=80, heads=4, kv_heads=2, intermediate=112, expert_intermediate=72,
                                        top_k=2, per_channel=True, experts=3),
    "shared-gate-renorm": dict(hidden=64, expert_intermediate=128, top_k=2, norm_topk_prob=True,
                               shared_expert_gate=True, experts=4),
    "text-only-8-experts": dict(hidden=96, expert_intermediate=96, experts=8, vision=False, layers=3,
                                moe_layers=[0, 2]),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_random_models_verify_in_onnxruntime(shape, tmp_path):
    d = tmp_path / "model"
    model = random_model(random_config(**SHAPES[shape]), 11)
    save_model(model, d)
    report = _export(d, tmp_path / "onnx")
    assert report["verify"] == "passed"
    assert all(s["sqnr_db"] >= MIN_SQNR_DB for s in report["numerics"].values())
    assert report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    assert _routed_bits_in_artifact(tmp_path / "onnx" / "text_decoder.onnx", load_model(d)) == pytest.approx(
        report["routed_expert_bits_per_weight"], abs=1e-3)


def test_qwen2_moe_layout_exports(tmp_path):
    d = tmp_path / "qwen"
    write_qwen2_moe(random_model(random_config(top_k=2, shared_expert_gate=True, vision=False), 5), d, True)
    report = _export(d, tmp_path / "onnx")
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"


def test_ort_file_matches_onnx_file(tmp_path):
    d = tmp_path / "model"
    save_model(random_model(random_config(), 12), d)
    report = _export(d, tmp_path / "onnx")
    target = get_target("onnx")
    a = target.runner(tmp_path / "onnx", report["max_seq_len"])
    b = target.runner(tmp_path / "onnx", report["max_seq_len"], suffix=".ort")
    x = torch.randn(1, 5, 64)
    pos = torch.tensor([0])
    assert np.allclose(a.text_decoder(x, pos).numpy(), b.text_decoder(x, pos).numpy(), atol=1e-6)


def test_kv_cache_prefill_then_decode_matches_reference_logits(tmp_path):
    d = tmp_path / "model"
    model = random_model(random_config(top_k=2), 13)
    save_model(model, d)
    report = _export(d, tmp_path / "onnx")
    runner = get_target("onnx").runner(tmp_path / "onnx", report["max_seq_len"])
    prompt = verification_prompt(d, model.config, "abc", with_image=True)
    numerics = compare(EagerRunner(model, report["max_seq_len"]), runner, prompt, torch.rand(1, 3, 16, 16) * 2 - 1)
    ok, why = passed(numerics, get_target("onnx").tolerance)
    assert ok, why


def test_failed_verification_leaves_no_artifact(tmp_path, monkeypatch, capsys):
    d = tmp_path / "model"
    save_model(random_model(random_config(), 14), d)
    out = tmp_path / "onnx"
    target = get_target("onnx")
    monkeypatch.setattr(target.tolerance, "min_sqnr_db", 1000.0)   # an unreachable bar
    assert cli.main(["--target", "onnx", str(d), "-o", str(out), "--quiet"]) == 3
    assert not out.exists() and not list(tmp_path.glob(".onnx*"))
    assert "numerics check failed" in capsys.readouterr().err


def test_export_is_deterministic(tmp_path):
    d = tmp_path / "model"
    save_model(random_model(random_config(), 15), d)
    _export(d, tmp_path / "a", "--no-verify")
    _export(d, tmp_path / "b", "--no-verify")
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.suffix in (".onnx", ".ort"))
    assert len(files) == 6
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_portable_variant_uses_standard_ops_only(tmp_path):
    d = tmp_path / "model"
    model = random_model(random_config(hidden=80, expert_intermediate=72, top_k=2, norm_topk_prob=True), 16)
    save_model(model, d)
    report = _export(d, tmp_path / "onnx", "--portable")
    assert report["verify"] == "passed" and report["numerics"]["text_decoder"]["greedy_match"] == "32/32"
    m = onnx.load(str(tmp_path / "onnx" / "text_decoder.onnx"))
    assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")]
    assert {i.version for i in m.opset_import if i.domain in ("", "ai.onnx")} == {25}
    int2 = [t for t in m.graph.initializer if t.data_type == onnx.TensorProto.INT2]
    cfg = model.config
    assert len(int2) == len(cfg.moe.moe_layers) * cfg.moe.num_experts * 2   # fc1 (gate+up) and fc2 per expert
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) == len(int2)
    assert any("dense all-expert compute" in note for note in report["notes"])


def test_fp32_expert_baseline_runs(tmp_path):
    """The benchmark's fp32 baseline: same model, experts as float32 com.microsoft.MoE."""
    from mote.export.programs import KVCacheStyle, export_programs
    from mote.passes.pipeline import run_pipeline

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
