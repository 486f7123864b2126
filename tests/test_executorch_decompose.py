"""The android lowering of mote.moe_ffn, both forms (decompose.py): the same numbers as the op, and the packed
experts are only ever read where the router's top-k chose: by index_select (portable) or by our kernel library's
mote.routed_experts (fused), with the top-k indices."""
from collections import Counter

import pytest
import torch

from mote.export.programs import KVCacheStyle, export_programs
from mote.passes.pipeline import run_pipeline
from mote.passes.verify_numerics import run_program
from mote.targets.executorch.decompose import FUSED, PORTABLE
from mote.targets.executorch.report import expert_reads, op_kind
from mote.tools.make_random_model import random_config, random_model


def _kinds(ep) -> Counter:
    return Counter(op_kind(n.target) for n in ep.graph.nodes if n.op == "call_function")


def _decoder(top_k, seed, **config):
    model = random_model(random_config(layers=2, top_k=top_k, **config), seed)
    programs, _ = run_pipeline(export_programs(model, 32, KVCacheStyle.STATE), model.config.moe.moe_layers)
    return programs["text_decoder"]


@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_form_is_shared_expert_and_router_around_one_routed_experts_op(top_k):
    """Before: mote.moe_ffn per block. After: its shared expert and router as aten.linear (what XNNPACK takes), the
    top-k, and one mote.routed_experts reading the packed experts with the top-k indices. Top-1: bit-identical to
    the op (the routed sum adds one term); top-2: equal up to the order of the three-term sum (an ulp there can flip
    one int8 rounding of the next block's activations, hence the looser bound)."""
    ep = _decoder(top_k, 5, hidden=80, expert_intermediate=72, per_channel=True)
    before = _kinds(ep)
    blocks = before["mote.moe_ffn"]
    assert blocks == 2 and "mote.routed_experts" not in before
    expected = run_program(ep, ep.example_inputs[0])
    lowered = ep.run_decompositions(FUSED)
    after = _kinds(lowered)
    assert "mote.moe_ffn" not in after and after["mote.routed_experts"] == blocks
    assert after["aten.topk"] == blocks and after["aten.linear"] == before["aten.linear"] + 4 * blocks
    got = run_program(lowered, lowered.example_inputs[0])[0]
    if top_k == 1:
        assert torch.equal(got, expected[0])
    else:
        torch.testing.assert_close(got, expected[0], rtol=1e-4, atol=1e-4)
    packed = {s.arg.name for s in lowered.graph_signature.input_specs if s.target and ".experts." in s.target}
    assert len(packed) == 2 * 6
    reads = expert_reads(lowered.graph, packed)
    assert set(reads) == packed and not any(reads.values()), reads


def test_decomposition_matches_and_gathers_only_selected_experts():
    model = random_model(random_config(layers=2, top_k=2, hidden=80, expert_intermediate=72, per_channel=True), 5)
    programs, _ = run_pipeline(export_programs(model, 32, KVCacheStyle.STATE), model.config.moe.moe_layers)
    ep = programs["text_decoder"]
    packed_names = [s.arg.name for s in ep.graph_signature.input_specs if s.target and s.target.endswith("_packed")]
    assert len(packed_names) == 2 * 3
    expected = run_program(ep, ep.example_inputs[0])
    lowered = ep.run_decompositions(PORTABLE)
    torch.testing.assert_close(run_program(lowered, lowered.example_inputs[0])[0], expected[0], rtol=1e-5, atol=1e-5)
    ops = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not any("mote." in o for o in ops)
    for node in lowered.graph.nodes:
        if node.op == "placeholder" and node.name in packed_names:
            assert node.users and all(u.target == torch.ops.aten.index_select.default for u in node.users), node.name
            # the gather index comes from the router's topk
            for u in node.users:
                src = u.args[2]
                while src.target != torch.ops.aten.topk.default:
                    src = src.args[0]
    # the android report's "routed-expert reads" sentence is derived from expert_reads: it must agree
    reads = expert_reads(lowered.graph, set(packed_names))
    assert set(reads) == set(packed_names) and not any(reads.values()), reads


def test_prefill_memory_is_bounded_by_the_experts_not_the_prompt():
    """No intermediate of the decomposed MoE grows as T x (an expert's size): each chosen expert is decoded once per
    call (at most E of them), and the T tokens run through it as one matrix product. The per-token gather it replaced
    planned 4.5 GB per projection at the Qwen2.5-0.5B shape for T = 256."""
    model = random_model(random_config(layers=1, top_k=1, hidden=64, expert_intermediate=96, experts=4), 2)
    programs, _ = run_pipeline(export_programs(model, 32, KVCacheStyle.STATE), model.config.moe.moe_layers)
    lowered = programs["text_decoder"].run_decompositions(PORTABLE)
    expert_size = 64 * 96
    for node in lowered.graph.nodes:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        static = 1
        for s in val.shape:
            static *= s if isinstance(s, int) else 1
        grows_with_t = any(not isinstance(s, int) and not str(s).startswith("u") for s in val.shape)  # u*: U <= E
        if grows_with_t:
            assert static < expert_size, (node.name, tuple(val.shape))
