"""One test per pass: op types before and after, numerics unchanged, running it twice changes nothing.

Models: several MoE layers with a dense layer between them, top-2 with renormalisation, per-channel scales,
pre-quantized experts, and the Hugging Face Qwen2-MoE layout (shared-expert gate, fused 3-D expert tensors).
"""

import pytest
import torch

from mote.export.loader import load_model
from mote.export.model import TernaryLinear
from mote.export.programs import KVCacheStyle, export_programs
from mote.passes.fuse_moe_block import fuse_moe_block
from mote.passes.fuse_ternary_linear import fuse_ternary_linear
from mote.passes.pipeline import PIPELINE, run_pipeline
from mote.passes.program import add_constant, op_histogram
from mote.passes.remove_dead_code import remove_dead_code
from mote.passes.ternarize_expert_weights import ternarize_expert_weights
from mote.passes.verify_numerics import PassNumericsError, check_numerics, run_program
from mote.tools.make_random_model import random_config, random_model, write_qwen2_moe

CASES = {
    "top1-two-moe-layers": dict(layers=3, moe_layers=[0, 2]),
    "top2-renorm-per-channel": dict(layers=2, top_k=2, norm_topk_prob=True, per_channel=True),
    "shared-gate-top2": dict(layers=2, top_k=2, shared_expert_gate=True, experts=3),
}


def _case_model(case, tmp_path):
    if case == "prequantized":     # int8 trits + scales in memory (the loader would pack them as it reads them)
        model = random_model(random_config(layers=2, per_channel=True), 7)
        for m in model.modules():
            if isinstance(m, TernaryLinear):
                trits, scale = m.ternary_weight()
                m.set_prequantized(trits.detach(), scale.detach())
        return model
    if case == "qwen2-moe-fused":
        d = tmp_path / "qwen"
        write_qwen2_moe(random_model(random_config(layers=2, top_k=2, shared_expert_gate=True, vision=False), 8), d, True)
        return load_model(d)
    return random_model(random_config(**CASES[case]), 3)


ALL_CASES = list(CASES) + ["prequantized", "qwen2-moe-fused"]


def _decoder(model, kv=KVCacheStyle.IO):
    return export_programs(model, 16, kv)["text_decoder"]


def _counts(model):
    cfg = model.config
    n_moe = len(cfg.moe.moe_layers)
    return n_moe, n_moe * cfg.moe.num_experts * 3


def _apply(p, ep):
    """Apply a pass; return (rewrites, histogram before, histogram after, outputs before, outputs after)."""
    inputs = ep.example_inputs[0]
    before_out, before_ops = run_program(ep, inputs), op_histogram(ep)
    n = p(ep)
    return n, before_ops, op_histogram(ep), before_out, run_program(ep, inputs)


def _assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)   # the rewrites are exact: bit-identical outputs


def _assert_idempotent(p, ep):
    ops = op_histogram(ep)
    keys = sorted(ep.state_dict)
    assert p(ep) == 0
    assert op_histogram(ep) == ops and sorted(ep.state_dict) == keys


@pytest.mark.parametrize("case", ALL_CASES)
def test_ternarize_expert_weights(case, tmp_path):
    model = _case_model(case, tmp_path)
    n_moe, n_linears = _counts(model)
    ep = _decoder(model)
    n, before, after, out0, out1 = _apply(ternarize_expert_weights, ep)
    if case == "qwen2-moe-fused":   # read by the loader: the experts arrive packed, there is nothing to ternarize
        assert n == 0 and before == after and before["mote.unpack_trits"] == n_linears
        _assert_same(out0, out1)
        return
    assert n == n_linears
    assert before["mote.unpack_trits"] == 0 and after["mote.unpack_trits"] == n_linears
    if case == "prequantized":
        assert before["aten.to.dtype"] - after.get("aten.to.dtype", 0) == n_linears
    else:   # the absmean ternarisation subgraph is gone: one round per weight and one per activation quantizer
        assert before["aten.round"] - after["aten.round"] == n_linears
        assert before["aten.mean"] - after.get("aten.mean", 0) == n_linears or "per-channel" in case
    experts = {k: v for k, v in ep.state_dict.items() if ".experts." in k}
    assert experts and all(v.dtype in (torch.uint8, torch.float32) for v in experts.values())
    packed = [v for k, v in experts.items() if k.endswith(".packed_trits")]
    assert len(packed) == n_linears and all(v.dtype == torch.uint8 for v in packed)
    assert not [k for k, v in experts.items() if v.dtype != torch.uint8 and v.dim() == 2 and v.shape[1] > 1]
    # signature, state dict and placeholders agree
    names = {s.target for s in ep.graph_signature.input_specs if s.target}
    assert set(ep.state_dict) <= names
    _assert_same(out0, out1)
    _assert_idempotent(ternarize_expert_weights, ep)


@pytest.mark.parametrize("case", ALL_CASES)
def test_fuse_ternary_linear(case, tmp_path):
    model = _case_model(case, tmp_path)
    n_moe, n_linears = _counts(model)
    ep = _decoder(model)
    ternarize_expert_weights(ep)
    n, before, after, out0, out1 = _apply(fuse_ternary_linear, ep)
    assert n == n_linears
    assert before["mote.unpack_trits"] == n_linears and after.get("mote.unpack_trits", 0) == 0
    assert after["mote.ternary_linear"] == n_linears
    assert before["aten.matmul"] - after["aten.matmul"] == n_linears
    assert before["aten.amax"] - after.get("aten.amax", 0) == n_linears
    _assert_same(out0, out1)
    _assert_idempotent(fuse_ternary_linear, ep)


@pytest.mark.parametrize("case", ALL_CASES)
def test_fuse_moe_block(case, tmp_path):
    model = _case_model(case, tmp_path)
    n_moe, n_linears = _counts(model)
    ep = _decoder(model)
    ternarize_expert_weights(ep)
    fuse_ternary_linear(ep)
    n, before, after, out0, out1 = _apply(fuse_moe_block, ep)
    assert n == n_moe
    assert before["mote.ternary_linear"] == n_linears and "mote.ternary_linear" not in after
    assert after["mote.moe_ffn"] == n_moe
    for op in ("aten.topk", "aten.scatter", "aten.sigmoid", "aten.silu"):
        assert op not in after or op == "aten.silu" and after[op] < before[op]
    # per-expert buffers are replaced by stacked [E, ...] ones
    assert not [k for k in ep.state_dict if ".experts.0." in k]
    stacked = [v for k, v in ep.state_dict.items() if k.endswith("experts.gate_packed")]
    assert len(stacked) == n_moe and stacked[0].shape[0] == model.config.moe.num_experts
    node = next(n for n in ep.graph.nodes if n.target == torch.ops.mote.moe_ffn.default)
    assert node.args[-2] == model.config.moe.top_k and node.args[-1] == model.config.moe.norm_topk_prob
    assert (node.args[4] is not None) == model.config.moe.shared_expert_gate
    _assert_same(out0, out1)
    _assert_idempotent(fuse_moe_block, ep)


def test_remove_dead_code():
    ep = _decoder(random_model(random_config(layers=1), 0))
    embeds = next(n for n in ep.graph.nodes if n.name == "embeds")
    with ep.graph.inserting_after(embeds):
        dangling = ep.graph.call_function(torch.ops.aten.abs.default, (embeds,))
    add_constant(ep, "unused.buffer", torch.ones(3))
    n, before, after, out0, out1 = _apply(remove_dead_code, ep)
    assert n >= 2   # the two planted ones, plus whatever the trace left dangling
    assert before["aten.abs"] - after.get("aten.abs", 0) == 1 and dangling not in ep.graph.nodes
    assert "unused.buffer" not in ep.state_dict
    assert not [s for s in ep.graph_signature.input_specs if s.target == "unused.buffer"]
    _assert_same(out0, out1)
    _assert_idempotent(remove_dead_code, ep)


def test_pipeline_keeps_kv_cache_state_and_numerics():
    model = random_model(random_config(layers=2, top_k=2), 2)
    ep = _decoder(model, KVCacheStyle.STATE)
    programs, log = run_pipeline({"text_decoder": ep}, model.config.moe.moe_layers)
    after = log["text_decoder"]["ops_after"]
    assert after["mote.moe_ffn"] == 2 and after["aten.index_copy_"] == 4
    assert {"k_cache_0", "v_cache_1"} <= set(ep.state_dict)
    assert log["text_decoder"]["max_abs_diff"] == 0.0
    assert [p.__name__ for p in PIPELINE] == ["ternarize_expert_weights", "fuse_ternary_linear", "fuse_quantized_linear",
                                              "fuse_moe_block", "remove_dead_code"]


def test_numerics_check_fails_loudly_on_a_changed_program():
    model = random_model(random_config(layers=1), 4)
    ep = _decoder(model)
    inputs = ep.example_inputs[0]
    expected = run_program(ep, inputs)
    run_pipeline({"text_decoder": ep}, model.config.moe.moe_layers)
    key = next(k for k in ep.state_dict if k.endswith("down_packed"))
    ep.state_dict[key].copy_(torch.flip(ep.state_dict[key], dims=[-1]))   # a wrong repacking
    with pytest.raises(PassNumericsError, match="changed the numerics of text_decoder"):
        check_numerics("text_decoder", expected, run_program(ep, inputs))
