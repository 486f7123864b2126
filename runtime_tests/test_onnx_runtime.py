"""onnx target, what only ONNX files have: the QMoE nodes' 2-bit initializers counted in the .onnx, the .ort
computing what the .onnx does, the portable (standard ops only) variant, the fp32-expert baseline. Everything every
target must do (verification, captions, KV cache, atomic failure, determinism, storage figure) is in
test_targets.py; the exports are shared with it (runtime_tests/conftest.py)."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from mote.export.loader import load_model
from mote.targets import CommonOptions, get_target
from mote.targets.onnx.ort_format import write_canonical_ort


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


def test_ort_bytes_do_not_depend_on_the_converters_heap(example, tmp_path):
    """ORT's converter writes its kernel-type-string resolver in hash-map order, which follows heap addresses: run
    as a plain child process (address-space randomisation on, as on most machines), the same .onnx converts to
    differently ordered bytes. The rewritten files are identical to each other and to the exported .ort, and load in
    ORT with the same outputs."""
    out, _ = example.export("onnx")
    raw = []
    for i in range(3):
        work = tmp_path / f"run{i}"
        work.mkdir()
        (work / "text_decoder.onnx").symlink_to(out / "text_decoder.onnx")
        subprocess.run([sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(work),
                        "--optimization_style", "Fixed"], check=True, capture_output=True)
        raw.append(work / "text_decoder.ort")
    if Path("/proc/sys/kernel/randomize_va_space").read_text().strip() != "0":
        assert len({p.read_bytes() for p in raw}) > 1   # the converter's own output is not byte-stable here
    for p in raw:
        write_canonical_ort(p, p.with_suffix(".canonical.ort"))
        assert p.with_suffix(".canonical.ort").read_bytes() == (out / "text_decoder.ort").read_bytes()
    x = torch.randn(1, 4, load_model(example.model_dir).config.hidden_size, generator=torch.Generator().manual_seed(5))
    feeds = {"embeds": x.numpy(), "input_pos": np.array([0])}
    raw_session = ort.InferenceSession(str(raw[0]))
    for i in raw_session.get_inputs():
        if i.name.startswith("past_"):
            feeds[i.name] = np.zeros([d if isinstance(d, int) else 0 for d in i.shape], np.float32)
    canonical = ort.InferenceSession(str(raw[0].with_suffix(".canonical.ort")))
    for a, b in zip(raw_session.run(None, feeds), canonical.run(None, feeds)):
        assert np.array_equal(a, b)


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
