"""The TVM lowering's rewrites (targets/tvm/convert.py, build.py), each shown on a small post-pass program: the op
types before and after, and the built host library computing what the ExportedProgram computes."""
import collections
import re

import numpy as np
import pytest
import torch

from mote.export.programs import KVCacheStyle, export_programs
from mote.export.verify import sqnr_db
from mote.passes.pipeline import run_pipeline
from mote.tools.make_random_model import random_config, random_model

pytest.importorskip("tvm")

from mote.passes.program import constant_value  # noqa: E402
from mote.targets.lowering import moe_nodes  # noqa: E402
from mote.targets.tvm import build, convert  # noqa: E402


def traced_decoder():
    """A 2-layer text-only MoTE (top-2 with renormalisation, per-channel scales, a shared-expert gate, biases in
    attention; widths 80 / 72 that are no whole vectors of codes), its text_decoder traced with the KV cache as
    inputs and rewritten by the pass pipeline."""
    cfg = random_config(vision=False, top_k=2, norm_topk_prob=True, per_channel=True, shared_expert_gate=True,
                        hidden=80, expert_intermediate=72, intermediate=112)
    model = random_model(cfg, 3).eval()
    programs = export_programs(model, 16, KVCacheStyle.IO)
    programs, _ = run_pipeline(programs, model.config.moe.moe_layers, verify=False)
    return programs["text_decoder"]


@pytest.fixture(scope="module")
def decoder():
    """traced_decoder() with its codes in the kernels' layout (what the target imports)."""
    ep = traced_decoder()
    convert.to_kernel_layouts(ep)
    return ep


def test_codes_in_the_kernel_layout_same_ops_same_numerics():
    """to_kernel_layouts: the same ops before and after, each routed projection's codes padded to whole vectors
    with trit-0 bytes (K = 80 -> 20 bytes -> 32; 72 -> 18 -> 32), and the program's outputs unchanged."""
    ep = traced_decoder()
    inputs = ep.example_inputs[0]
    before_ops, before_out = aten_ops(ep), ep.module()(*inputs)
    shapes = {tuple(constant_value(ep, codes).shape) for _, args in moe_nodes(ep)
              for codes in (args.gate_packed, args.up_packed, args.down_packed)}
    assert shapes == {(4, 72, 20), (4, 80, 18)}
    assert convert.to_kernel_layouts(ep) == 6
    assert aten_ops(ep) == before_ops
    for _, args in moe_nodes(ep):
        for codes, valid in ((args.gate_packed, 20), (args.up_packed, 20), (args.down_packed, 18)):
            value = constant_value(ep, codes)
            assert value.shape[-1] == 32 and (value[..., valid:] == 0xAA).all()
    after_out = ep.module()(*inputs)
    for want, got in zip(before_out, after_out):
        assert torch.equal(want, got)


def constant_shapes(func) -> list[tuple]:
    from tvm import relax

    shapes = []

    @relax.expr_functor.visitor
    class Constants(relax.PyExprVisitor):
        def visit_generic_const_(self, const):
            shapes.append(tuple(const.value.shape))

    Constants().visit_expr(func.body)
    return shapes


def aten_ops(ep) -> collections.Counter:
    return collections.Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def test_import_turns_mote_ops_and_linears_into_our_kernels(decoder):
    """Before: mote.moe_ffn, aten.linear, aten.matmul, aten.index_copy. After: call_tir of our routed-experts, linear
    and batched-matmul kernels (one per distinct shape), call_tir_inplace of the cache write; no relax.linear or
    relax.matmul left to TVM's own lowering, and the shared expert, router and top-k of each block around its
    routed-experts call."""
    before = aten_ops(decoder)
    assert before["mote.moe_ffn.default"] == 2 and before["aten.linear.default"] > 0
    assert before["aten.index_copy.default"] == 4
    mod, _ = build.import_program(decoder, build.HOST.target())
    ops = collections.Counter()
    for call in build.calls(mod["main"]):
        ops[call.op.name] += 1
    kinds = (re.sub(r"_\d+(x\d+)+(_bias|_top\d+)?(_p[ct])?$", "", name)   # the kernel, without its shape
             for name, _ in build.kernel_calls(mod["main"]))
    kernels = collections.Counter(kinds)
    assert ops["relax.matmul"] == 0   # relax.op.linear would be emitted as permute_dims + matmul
    assert kernels["mote_batch_matmul"] == 2 * 2   # per layer: scores = q k^T, then probabilities x v
    assert kernels["mote_routed_experts"] == 2
    assert ops["relax.call_tir_inplace"] == 4 == kernels["mote_write_cache_rows"]
    # per MoE block: the shared expert's 3 linears + its gate + the router; the rest are attention and lm_head
    assert kernels["mote_linear"] == before["aten.linear.default"] + 2 * 5
    assert ops["relax.topk"] == 2 and ops["relax.nn.softmax"] >= 2


def test_lifted_weights_are_arguments_and_the_library_computes_the_program(decoder, tmp_path):
    """lift_weights: every weight of the program becomes a trailing argument of `main` (none stays a constant);
    the host library then gives the program's logits and updated caches."""
    import tvm
    from tvm import relax

    mod, names = build.import_program(decoder, build.HOST.target())
    mod, weights = build.lift_weights(mod, names)
    held = build.program_weights(decoder)
    assert len(weights) == len(mod["main"].params) - int(mod["main"].attrs["num_input"]) > 0
    for name, value in weights:
        assert np.array_equal(value.numpy(), held[name].detach().numpy()), name
    assert all(shape == () for shape in constant_shapes(mod["main"]))   # only the importer's scalars stay

    build.build_library(mod, build.HOST, tmp_path / "decoder.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "decoder.so")), tvm.cpu())
    embeds, pos, k, v = decoder.example_inputs[0]
    k, v = [torch.zeros_like(c) for c in k], [torch.zeros_like(c) for c in v]
    want = decoder.module()(embeds, pos, k, v)
    caches = [tvm.runtime.tensor(c.numpy()) for c in [*k, *v]]
    got = vm["main"](tvm.runtime.tensor(embeds.numpy()), tvm.runtime.tensor(pos.numpy()), *caches,
                     *[value for _, value in weights])
    assert sqnr_db(want[0], torch.from_numpy(got[0].numpy())) >= 60
    for i, cache in enumerate(caches):   # updated in place: the tensors passed in hold the new rows
        np.testing.assert_allclose(cache.numpy(), want[1 + i].detach().numpy(), rtol=1e-4, atol=1e-5)
