"""The TVM lowering's rewrites (targets/tvm/convert.py, build.py), each shown on a small post-pass program: the op
types before and after, and the built host library computing what the ExportedProgram computes."""
import collections
import re

import numpy as np
import pytest
import torch

from mote.export.loader import load_model, save_model
from mote.export.programs import KVCacheStyle, export_programs
from mote.export.quantization import parse
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


# -- --quantize --------------------------------------------------------------------------------------------------------

def run_decoder_library(mod, weights, path, inputs):
    """Build `mod` for the host, call it with the decoder's inputs (zero caches) and its lifted weights: logits."""
    import tvm
    from tvm import relax

    build.build_library(mod, build.HOST, path)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    embeds, pos, k, v = inputs
    args = [tvm.runtime.tensor(t.numpy()) for t in (embeds, pos, *k, *v)]
    return torch.from_numpy(vm["main"](*args, *[value for _, value in weights])[0].numpy())


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The 2-layer MoTE of traced_decoder (odd widths 80 / 112, top-2, shared-expert gate) loaded with --quantize
    int4,group=channel (attention and shared experts int4 per output channel, lm_head int8), its decoder after the
    pass pipeline: (program in the kernels' layouts, how many tensors that changed, the int4 / int8 weights [(rows,
    K, bits)] of its mote.quantized_linear ops, the program's logits before the relayout)."""
    cfg = random_config(vision=False, top_k=2, norm_topk_prob=True, per_channel=True, shared_expert_gate=True,
                        hidden=80, expert_intermediate=72, intermediate=112)
    model_dir = tmp_path_factory.mktemp("quantized") / "model"
    save_model(random_model(cfg, 3), model_dir)
    model = load_model(model_dir, parse("int4,group=channel"))
    programs, _ = run_pipeline(export_programs(model, 16, KVCacheStyle.IO), model.config.moe.moe_layers,
                               verify=False)
    ep = programs["text_decoder"]
    matrices = [(*constant_value(ep, n.args[1]).shape, n.args[4]) for n in ep.graph.nodes
                if n.target is torch.ops.mote.quantized_linear.default]
    inputs = ep.example_inputs[0]
    embeds, pos, k, v = inputs
    zeros = ([torch.zeros_like(c) for c in k], [torch.zeros_like(c) for c in v])
    want = ep.module()(embeds, pos, *zeros)[0]
    changed = convert.to_kernel_layouts(ep)
    return ep, changed, matrices, want, (embeds, pos, *zeros)


def test_quantized_program_imports_into_our_kernels_with_low_bit_weights(quantized):
    """Before: mote.quantized_linear (int4 and int8) and mote.moe_ffn without shared weights (the shared expert is
    quantized outside it). After import: one call of our quantized-linear kernel per op, the routed-experts kernel
    per block, and our float linear only for what stays fp32 (the router and the shared-expert gate of each block);
    the int4 weights packed two per byte (uint8 [rows, ceil(K/32) * 16]), the int8 ones as they are, one fp32 scale
    per output row; the manifest names each of them with its bits and shape."""
    ep, changed, matrices, _, _ = quantized
    bits = collections.Counter(b for _, _, b in matrices)
    assert bits[4] == 2 * (4 + 3) and bits[8] == 1     # per layer q, k, v, o + the shared expert; lm_head
    assert changed == bits[4] + 6                      # the int4 weights and the 6 routed code tensors
    for node, args in moe_nodes(ep):
        assert args.shared == (None, None, None)
    mod, names = build.import_program(ep, build.HOST.target())
    ops = collections.Counter(call.op.name for call in build.calls(mod["main"]))
    kernels = collections.Counter(re.sub(r"_\d+(x\d+)+(_bias|_top\d+)?(_p[ct])?$", "", name)
                                  for name, _ in build.kernel_calls(mod["main"]))
    assert kernels["mote_quantized_linear_int4_pc"] == bits[4] and kernels["mote_quantized_linear_int8_pc"] == 1
    assert kernels["mote_routed_experts"] == 2 and kernels["mote_linear"] == 2 * 2
    assert ops["relax.matmul"] == 0
    mod, weights = build.lift_weights(mod, names)
    entry = build.signature(mod, "text_decoder", [w for w, _ in weights], "text_decoder.safetensors")
    stored = dict(weights)
    assert sorted((w["rows"], w["k"], w["bits"]) for w in entry["quantized_weights"]) == sorted(matrices)
    for w in entry["quantized_weights"]:
        q, scale = stored[w["q"]], stored[w["scale"]]
        width = -(-w["k"] // 32) * 16 if w["bits"] == 4 else w["k"]
        assert (str(q.dtype), tuple(q.shape)) == ({4: "uint8", 8: "int8"}[w["bits"]], (w["rows"], width))
        assert (str(scale.dtype), tuple(scale.shape)) == ("float32", (w["rows"], 1)) and w["group"] == w["k"]


def test_quantized_library_computes_the_program(quantized, tmp_path):
    """The host library of the quantized decoder gives the logits the program computed before its int4 weights were
    packed (weight-only dequantization in our kernels, the shared expert outside the routed-experts kernel)."""
    ep, _, _, want, inputs = quantized
    mod, names = build.import_program(ep, build.HOST.target())
    mod, weights = build.lift_weights(mod, names)
    assert sqnr_db(want, run_decoder_library(mod, weights, tmp_path / "decoder.so", inputs)) >= 60
