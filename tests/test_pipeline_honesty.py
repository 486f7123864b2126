"""Never report a rewrite that did not happen (issue 8).

- A MoE block the passes did not fuse stops the export: exit 1, one stderr line naming the layer and what did not
  match, no output directory.
- report.json's statements are read back from the artifact: its storage figures equal what this test counts in the
  file itself, and a sentence about an op is there only when the op is in the file.
"""
import json
import types

import onnx
import pytest
import torch

import mote.export.loader
import mote.passes.pipeline as pipeline
from mote.export.errors import PipelineError
from mote.export.programs import KVCacheStyle, export_programs
from mote.tools import cli
from mote.tools.make_random_model import random_config, random_model


def _export(model_dir, out, target, *extra):
    return cli.main(["--target", target, str(model_dir), "-o", str(out), "--quiet", *extra])


def _failed_line(capsys, out):
    """The export failed cleanly: one stderr line, returned; nothing left in the output's folder."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err[0]


def _without(name):
    return [p for p in pipeline.PIPELINE if p.__name__ != name]


def test_export_without_the_fusion_pass_fails_naming_the_layer(make_model_dir, tmp_path, monkeypatch, capsys):
    d = make_model_dir(layers=3, moe_layers=[1], vision=False)
    monkeypatch.setattr(pipeline, "PIPELINE", _without("fuse_moe_block"))
    out = tmp_path / "onnx"
    assert _export(d, out, "onnx", "--no-verify") == 1
    line = _failed_line(capsys, out)
    assert line.startswith("mote-export: error: model.layers.1.mlp: MoE block was not fused into mote::moe_ffn")
    assert "12 mote.ternary_linear ops" in line and "fuse_moe_block did not run" in line
    assert "layers.0" not in line and "layers.2" not in line   # dense layers are not MoE layers


def test_export_without_ternary_linear_fusion_says_what_did_not_match(make_model_dir, tmp_path, monkeypatch, capsys):
    d = make_model_dir(layers=2, vision=False)
    monkeypatch.setattr(pipeline, "PIPELINE", _without("fuse_ternary_linear"))
    out = tmp_path / "onnx"
    assert _export(d, out, "onnx") == 1
    line = _failed_line(capsys, out)
    assert "model.layers.0.mlp: MoE block was not fused" in line and "12 mote.unpack_trits ops" in line
    assert "fuse_moe_block: expert 0 output is" in line and "not mote.ternary_linear" in line
    assert line.endswith("; also model.layers.1.mlp")


def test_one_unmatchable_layer_fails_the_export(make_model_dir, tmp_path, monkeypatch, capsys):
    """Layer 1's first expert output is scaled (not the MoTE block pattern); layer 0 fuses as usual."""
    d = make_model_dir(layers=2, vision=False)
    load = mote.export.loader.load_model

    def load_with_a_changed_layer(model_dir, quantization=None):
        model = load(model_dir, quantization)
        expert = model.model.layers[1].mlp.experts[0]
        forward = expert.forward
        expert.forward = types.MethodType(lambda self, x: forward(x) * 0.5, expert)
        return model

    monkeypatch.setattr(mote.export.loader, "load_model", load_with_a_changed_layer)
    out = tmp_path / "android"
    assert _export(d, out, "android") == 1
    line = _failed_line(capsys, out)
    assert line == ("mote-export: error: model.layers.1.mlp: MoE block was not fused into mote::moe_ffn (routed "
                    "experts left as 12 mote.ternary_linear ops; fuse_moe_block: expert 0 output is mul.Tensor, not "
                    "mote.ternary_linear)")


def test_check_compares_fused_blocks_with_the_declared_layers():
    model = random_model(random_config(layers=3, moe_layers=[0, 2], vision=False), 1)
    _, log = pipeline.run_pipeline(export_programs(model, 16, KVCacheStyle.IO), (0, 2), verify=False)
    assert log["text_decoder"]["moe_ffn_layers"] == [0, 2]
    with pytest.raises(PipelineError, match=r"^layer 1: MoE block was not fused .*no top-k routing found"):
        pipeline.run_pipeline(export_programs(model, 16, KVCacheStyle.IO), (0, 1, 2), verify=False)
    with pytest.raises(PipelineError, match=r"^model.layers.2.mlp: a mote::moe_ffn in a layer the config does not"):
        pipeline.run_pipeline(export_programs(model, 16, KVCacheStyle.IO), (0,), verify=False)


def test_expert_reads_flags_reads_other_than_top_k_gathers():
    from mote.targets.executorch.report import expert_reads

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gathered", torch.randn(4, 3))
            self.register_buffer("summed", torch.randn(4, 3))

        def forward(self, p):
            i = torch.topk(p, 1, dim=-1).indices[:, 0]
            return torch.index_select(self.gathered, 0, i) + self.summed.sum() + torch.index_select(self.summed, 0, i)

    ep = torch.export.export(M(), (torch.randn(2, 4),))
    names = {s.arg.name: s.target for s in ep.graph_signature.input_specs if s.target}
    reads = {names[k]: v for k, v in expert_reads(ep.graph, set(names)).items()}
    assert reads == {"gathered": [], "summed": ["aten.sum"]}


def _pte_routed_bytes(path, num_experts):
    """Counted from the .pte independently of the target: the text_decoder's uint8 constants (packed codes) and its
    float32 [E, 1] constants (per-tensor expert scales), sizes x element size."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = next(p for p in deserialize_pte_binary(path.read_bytes()).program.execution_plan
                if p.name == "text_decoder")
    total = 0
    for v in plan.values:
        t = v.val
        if type(t).__name__ != "Tensor" or t.data_buffer_idx <= 0:
            continue
        n = torch.Size(t.sizes).numel()
        if int(t.scalar_type) == 0:                                            # uint8
            total += n
        elif int(t.scalar_type) == 6 and list(t.sizes) == [num_experts, 1]:   # float32 scale
            total += 4 * n
    return total


@pytest.mark.parametrize("kernels", ["fused", "portable"])
def test_android_report_is_read_from_the_pte(make_model_dir, tmp_path, kernels):
    d = make_model_dir(layers=1, experts=3, vision=False)
    out = tmp_path / "android"
    assert _export(d, out, "android", "--no-verify", "--android-kernels", kernels) == 0
    report = json.loads((out / "report.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    e, i, h = cfg["moe"]["num_experts"], cfg["moe"]["expert_intermediate_size"], cfg["hidden_size"]
    weights = 3 * e * i * h
    counted = _pte_routed_bytes(out / "model.pte", e)
    assert report["routed_expert_weights"] == weights and report["routed_expert_bytes"] == counted
    assert report["routed_expert_bits_per_weight"] == round(counted * 8 / weights, 4)
    facts = report["facts"]
    assert sorted(c["shape"] for c in facts["routed_experts"]["constants"] if c["dtype"] == "uint8") == sorted(
        [[e, i, h // 4], [e, i, h // 4], [e, h, i // 4]])
    assert facts["routed_experts"]["read_other_than_by_topk_gather"] == {}
    assert [k["name"] for k in facts["kv_cache"]] == ["k_cache_0", "v_cache_0"]
    assert all(k["shape"][2] == report["max_seq_len"] for k in facts["kv_cache"])
    assert facts["activations"]["quantize_ops"] == {}
    notes = " | ".join(report["notes"])
    assert f"{counted} bytes for {weights} weights" in notes
    if kernels == "portable":
        assert facts["activations"]["text_decoder_round_ops"] == 2   # expert input (gate + up share it), down input
        assert facts["kernels"] == {"library_ops": {}, "library_version": None,
                                          "executorch_quantized_ops": {}}
        assert "read only by aten.index_select on the experts the router's top-k chose" in notes
    else:   # the rounding happens inside the kernel, which only the chosen experts' codes reach
        assert facts["activations"]["text_decoder_round_ops"] == 0
        assert facts["kernels"]["library_ops"] == {"mote::routed_experts.out": ["text_decoder"]}
        assert "read only by mote.routed_experts on the experts the router's top-k chose" in notes
        assert "int8 quantization runs inside our kernel library's ops" in notes


def _onnx_routed_bytes(path):
    """Counted from the .onnx independently of the target: every initializer a QMoE node or an INT2
    DequantizeLinear reads."""
    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    names = set()
    for n in m.graph.node:
        if n.op_type == "QMoE":
            names |= {i for i in n.input[2:] if i in inits}
        elif n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and \
                inits[n.input[0]].data_type == onnx.TensorProto.INT2:
            names |= {i for i in n.input if i in inits}
    return sum(len(inits[k].raw_data) for k in names)


def test_onnx_report_is_read_from_the_file_and_follows_it(make_model_dir, tmp_path):
    from mote.targets.onnx.report import read_back, render

    d = make_model_dir(layers=2, hidden=64, expert_intermediate=64, vision=False)
    out = tmp_path / "onnx"
    assert _export(d, out, "onnx", "--no-verify") == 0
    report = json.loads((out / "report.json").read_text())
    path = out / "text_decoder.onnx"
    assert report["routed_expert_bytes"] == _onnx_routed_bytes(path)
    # 2-bit codes + one fp32 scale per block of 64: 2.5 bits per weight
    assert report["routed_expert_bits_per_weight"] == pytest.approx(2.5)
    dec = report["facts"]["files"]["text_decoder.onnx"]
    assert [(q["expert_weight_bits"], q["block_size"], q["k"]) for q in dec["qmoe"]] == [(2, 64, 1)] * 2
    assert [k["name"] for k in dec["kv_cache"]["inputs"]] == ["past_key_0", "past_key_1", "past_value_0",
                                                               "past_value_1"]
    assert any("block-wise 2-bit CPU kernel" in s for s in report["deviations"])
    # Rewrite the file's QMoE nodes to per-row scales (block_size 0): the block-wise deviation goes with it.
    m = onnx.load(str(path))
    for node in m.graph.node:
        for a in node.attribute:
            if node.op_type == "QMoE" and a.name == "block_size":
                a.i = 0
    onnx.save(m, str(path))
    facts = read_back([path])
    assert [q["block_size"] for q in facts["files"]["text_decoder.onnx"]["qmoe"]] == [0, 0]
    assert render(facts, report["routed_expert_weights"])[0] == []


def test_onnx_portable_report_has_no_qmoe_sentence(make_model_dir, tmp_path):
    d = make_model_dir(layers=2, hidden=64, expert_intermediate=64, vision=False)
    out = tmp_path / "onnx"
    assert _export(d, out, "onnx", "--no-verify", "--portable") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["routed_expert_bytes"] == _onnx_routed_bytes(out / "text_decoder.onnx")
    dec = report["facts"]["files"]["text_decoder.onnx"]
    assert dec["qmoe"] == [] and not [s for s in report["deviations"] + report["notes"] if "QMoE" in s]
    assert len(dec["int2_dequantize"]) == 2 * 4 * 2   # layers x experts x (fc1, fc2)
    assert any("dense all-expert compute" in s for s in report["notes"])
    assert any(s.startswith("onnx --portable:") for s in report["deviations"])
