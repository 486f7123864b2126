"""Relax converters for what TVM's ExportedProgram importer must not lower its own way (`custom_convert_map`).

    mote.moe_ffn(x, shared..., router, codes + scales, k, renorm)
        -> shared = linear(silu(linear(x, W_g)) * linear(x, W_u), W_d)   [* sigmoid(linear(x, w_sg))]
           p, i   = topk(softmax(linear(x, W_r)), k)                      [p /= sum p]
           y      = shared + call_tir(routed_experts, x, i, p, codes, scales)   only the chosen experts' codes read
       (without shared weights, a shared expert quantized by --quantize and computed outside the op:
           y      = call_tir(routed_experts, ...)                         the graph adds the shared output itself)
    mote_bench.moe_ffn_float   -> the same with call_tir(routed_experts_float, ...) (the benchmark's fp32 baseline)
    mote.ternary_linear        -> call_tir(ternary_linear, x, codes, scale)
    mote.quantized_linear      -> call_tir(quantized_linear, x, q, scale[, b])   dequantized in the kernel's inner loop
    mote.quantized_embedding   -> call_tir(quantized_embedding, tokens, q, scale)  the gathered rows dequantized
    aten.linear                -> call_tir(linear, x, W[, b])            TVM's own CPU `linear` takes ~400 ms per step
    aten.matmul (attention)    -> call_tir(batch_matmul, q, k^T) and (p, v) over the heads: TVM's own took a third
                                  of a prefill
    aten.index_copy (KV cache) -> call_tir_inplace(write_cache_rows, cache, positions, rows): the cache argument is
                                  updated in place, no copy of the cache per step
    aten.where.Scalar          -> where(cond, const, const) (the importer has no converter for the scalar form)

The kernels are ours (`kernels.py`, TensorIR scheduled per target); one kernel per distinct shape, shared by layers.
Before import, `to_kernel_layouts` rewrites the program's weights into the kernels' layouts: the routed experts'
codes padded to whole vectors, and int4 weights packed two per byte (`kernels.pack_int4`), so that the params file
holds 4 bits per int4 weight (int8 ones stay one byte each).
Converters take `(node, importer)`; `importer.retrieve_args(node)` gives the Relax values of the node's arguments.
"""
from __future__ import annotations

import math

import torch

from mote.passes.match import is_op
from mote.passes.ops import QUANTIZED_OPS, MoeFfnArgs
from mote.passes.program import add_constant, constant_value, finish_rewrite, spec_for
from mote.targets.lowering import moe_nodes

from . import kernels
from .build import is_static

def _dtype(node) -> str:
    return str(node.meta["val"].dtype).removeprefix("torch.")


class Converters:
    """The converters for one build target (the kernels are scheduled for it)."""

    def __init__(self, target):
        self.target = target
        self._kernels: dict = {}

    def kernel(self, builder, *sizes):
        """builder(*sizes, target), built once per shape: layers share their kernels (building one is Python work)."""
        key = (builder.__name__, sizes)
        if key not in self._kernels:
            self._kernels[key] = builder(*sizes, self.target)
        return self._kernels[key]

    def convert_map(self) -> dict:
        return {
            "moe_ffn.default": self.moe_ffn,
            "moe_ffn_float.default": self.moe_ffn_float,
            "ternary_linear.default": self.ternary_linear,
            "quantized_linear.default": self.quantized_linear,
            "quantized_embedding.default": self.quantized_embedding,
            "linear.default": self.linear,
            "matmul.default": self.matmul,
            "index_copy.default": self.index_copy,
            "where.Scalar": self.where_scalar,
        }

    # -- helpers -----------------------------------------------------------------------------------------------

    @staticmethod
    def _rows(bb, x):
        """x [..., K] -> [N, K] with N the product of the leading dims (symbolic when T is)."""
        from tvm import relax

        shape = list(x.ty.shape)
        if len(shape) == 2:
            return x
        return bb.emit(relax.op.reshape(x, [math.prod(shape[:-1]), shape[-1]]))

    @staticmethod
    def _like(bb, y, x):
        """y [N, M] back to x's leading dims: [..., M]."""
        from tvm import relax

        if len(x.ty.shape) == 2:
            return y
        return bb.emit(relax.op.reshape(y, [*list(x.ty.shape)[:-1], y.ty.shape[-1]]))

    def _call(self, bb, kernel, name: str, args: list, out_shape):
        from tvm import relax

        # the module names its kernels (a PrimFunc's own global symbol, e.g. TE's "main", would clash)
        gv = bb.add_func(kernel.without_attr("global_symbol"), name)
        return bb.emit(relax.call_tir(gv, args, relax.TensorType(out_shape, "float32")))

    def _linear_rows(self, bb, rows, weight, bias=None):
        n_out, k = (int(v) for v in weight.ty.shape)
        args = [rows, weight] + ([bias] if bias is not None else [])
        return self._call(bb, self.kernel(kernels.linear, n_out, k, bias is not None),
                          f"mote_linear_{n_out}x{k}" + ("_bias" if bias is not None else ""), args,
                          [rows.ty.shape[0], n_out])

    # -- converters -------------------------------------------------------------------------------------------

    def linear(self, node, importer):
        bb = importer.block_builder
        args = importer.retrieve_args(node)
        x, weight, bias = args[0], args[1], args[2] if len(args) > 2 else None
        return self._like(bb, self._linear_rows(bb, self._rows(bb, x), weight, bias), x)

    def matmul(self, node, importer):
        """Attention's batched products, [1, H, T, K] @ [1, H, K, N] (T symbolic): our batch_matmul kernel over the
        H heads. Other ranks (none in our programs) get TVM's own matmul, as the importer would emit it."""
        from tvm import relax

        bb = importer.block_builder
        a, b = importer.retrieve_args(node)
        a_shape, b_shape = list(a.ty.shape), list(b.ty.shape)
        if len(a_shape) != 4 or len(b_shape) != 4 or not all(map(is_static, b_shape + a_shape[:2])) or \
                [int(v) for v in a_shape[:2]] != [int(v) for v in b_shape[:2]]:
            return bb.emit(relax.op.matmul(a, b, out_dtype="float32"))   # what the importer itself would emit
        heads, k, n = int(b_shape[1]), int(b_shape[2]), int(b_shape[3])
        a3 = bb.emit(relax.op.reshape(a, [a_shape[0] * a_shape[1], a_shape[2], k]))
        b3 = bb.emit(relax.op.reshape(b, [heads, k, n]))
        y = self._call(bb, self.kernel(kernels.batch_matmul, heads, k, n), f"mote_batch_matmul_{heads}x{k}x{n}",
                       [a3, b3], [heads, a_shape[2], n])
        return bb.emit(relax.op.reshape(y, [a_shape[0], a_shape[1], a_shape[2], n]))

    def ternary_linear(self, node, importer):
        bb = importer.block_builder
        x, codes, scale, k = importer.retrieve_args(node)
        n_out = int(codes.ty.shape[0])
        rows = self._rows(bb, x)
        per_channel = int(scale.ty.shape[0]) != 1
        y = self._call(bb, self.kernel(kernels.ternary_linear, n_out, k, per_channel),
                       f"mote_ternary_linear_{n_out}x{k}_{'pc' if per_channel else 'pt'}",
                       [rows, codes, scale], [rows.ty.shape[0], n_out])
        return self._like(bb, y, x)

    def quantized_linear(self, node, importer):
        """mote.quantized_linear(x, q, scale, bias, bits, group): q is in the kernel layout (`to_kernel_layouts`)."""
        bb = importer.block_builder
        x, q, scale, bias, bits, group = importer.retrieve_args(node)
        n_out, k = int(q.ty.shape[0]), int(x.ty.shape[-1])
        rows = self._rows(bb, x)
        name = (f"mote_quantized_linear_int{bits}_{_groups(group, k)}_{n_out}x{k}"
                + ("_bias" if bias is not None else ""))
        y = self._call(bb, self.kernel(kernels.quantized_linear, n_out, k, bits, group, bias is not None), name,
                       [rows, q, scale] + ([bias] if bias is not None else []), [rows.ty.shape[0], n_out])
        return self._like(bb, y, x)

    def quantized_embedding(self, node, importer):
        """mote.quantized_embedding(tokens [...], q, scale, bits, group) -> [..., d]: the tokens flattened."""
        from tvm import relax

        bb = importer.block_builder
        tokens, q, scale, bits, group = importer.retrieve_args(node)
        vocab, d = int(q.ty.shape[0]), int(node.meta["val"].shape[-1])
        shape = list(tokens.ty.shape)
        flat = bb.emit(relax.op.reshape(tokens, [math.prod(shape)])) if len(shape) != 1 else tokens
        y = self._call(bb, self.kernel(kernels.quantized_embedding, vocab, d, bits, group),
                       f"mote_quantized_embedding_int{bits}_{_groups(group, d)}_{vocab}x{d}", [flat, q, scale],
                       [flat.ty.shape[0], d])
        return bb.emit(relax.op.reshape(y, [*shape, d]))

    def _shared_expert(self, bb, args: MoeFfnArgs, rows):
        from tvm import relax

        w_gate, w_up, w_down = args.shared
        h = bb.emit(relax.op.multiply(relax.op.nn.silu(self._linear_rows(bb, rows, w_gate)),
                                      self._linear_rows(bb, rows, w_up)))
        shared = self._linear_rows(bb, h, w_down)
        if args.shared_expert_gate is not None:
            gate = bb.emit(relax.op.sigmoid(self._linear_rows(bb, rows, args.shared_expert_gate)))
            shared = bb.emit(relax.op.multiply(gate, shared))
        return shared

    def _shared_and_routing(self, bb, args: MoeFfnArgs, rows):
        """The full-precision part of the block: the shared expert's output (None when the op has no shared
        weights: it is computed outside, quantized) and the router's top-k (p, i)."""
        from tvm import relax

        shared = self._shared_expert(bb, args, rows) if args.shared_gate is not None else None
        probs = bb.emit(relax.op.nn.softmax(self._linear_rows(bb, rows, args.router), axis=-1))
        top = bb.emit(relax.op.topk(probs, args.top_k, axis=-1, ret_type="both", dtype="int32"))
        top_p, top_i = bb.emit(relax.TupleGetItem(top, 0)), bb.emit(relax.TupleGetItem(top, 1))
        if args.norm_topk_prob:
            top_p = bb.emit(relax.op.divide(top_p, relax.op.sum(top_p, axis=-1, keepdims=True)))
        return shared, top_p, top_i

    def moe_ffn(self, node, importer):
        from tvm import relax

        bb = importer.block_builder
        args = MoeFfnArgs(*importer.retrieve_args(node))
        rows = self._rows(bb, args.x)
        shared, top_p, top_i = self._shared_and_routing(bb, args, rows)
        experts, width, _ = (int(v) for v in args.gate_packed.ty.shape)
        d = int(rows.ty.shape[1])
        per_channel = int(args.gate_scale.ty.shape[-1]) != 1
        kernel = self.kernel(kernels.routed_experts, experts, d, width, args.top_k, per_channel)
        name = f"mote_routed_experts_{experts}x{width}x{d}_top{args.top_k}_{'pc' if per_channel else 'pt'}"
        routed = self._call(bb, kernel, name, [rows, top_i, top_p, *args.routed_operands()], rows.ty.shape)
        return self._like(bb, _plus_shared(bb, shared, routed), args.x)

    def moe_ffn_float(self, node, importer):
        """mote_bench.moe_ffn_float(x, shared..., router, gate_w, up_w, down_w, k, renorm): fp32 experts."""
        from tvm import relax

        bb = importer.block_builder
        x, s_gate, s_up, s_down, s_expert_gate, router, gate_w, up_w, down_w, top_k, renorm = \
            importer.retrieve_args(node)
        args = MoeFfnArgs(x, s_gate, s_up, s_down, s_expert_gate, router, None, None, None, None, None, None,
                          top_k, renorm)
        rows = self._rows(bb, x)
        shared, top_p, top_i = self._shared_and_routing(bb, args, rows)
        experts, width, d = (int(v) for v in gate_w.ty.shape)
        kernel = self.kernel(kernels.routed_experts_float, experts, d, width, top_k)
        routed = self._call(bb, kernel, f"mote_routed_experts_float_{experts}x{width}x{d}_top{top_k}",
                            [rows, top_i, top_p, gate_w, up_w, down_w],
                            rows.ty.shape)
        return self._like(bb, _plus_shared(bb, shared, routed), x)

    def index_copy(self, node, importer):
        """cache.index_copy(2, positions, rows): the decoder's KV-cache write, done in place on the argument."""
        from tvm import relax

        bb = importer.block_builder
        cache, dim, positions, rows = importer.retrieve_args(node)
        if dim != 2 or len(cache.ty.shape) != 4:
            raise NotImplementedError(f"tvm: index_copy along dim {dim} of a {len(cache.ty.shape)}-d tensor "
                                      "(only the KV-cache write, dim 2 of [1, kv heads, S, head dim])")
        gv = bb.add_func(write_cache_rows(*(int(v) for v in cache.ty.shape), _dtype(node)), "mote_write_cache_rows")
        return bb.emit(relax.call_tir_inplace(gv, [cache, positions, rows], 0, cache.ty))

    def where_scalar(self, node, importer):
        from tvm import relax

        cond, a, b = importer.retrieve_args(node)
        dtype = _dtype(node)
        return importer.block_builder.emit(relax.op.where(cond, relax.const(a, dtype), relax.const(b, dtype)))


def _plus_shared(bb, shared, routed):
    """The block's output: shared + routed, or the routed sum alone when the shared expert is outside the op."""
    from tvm import relax

    return routed if shared is None else bb.emit(relax.op.add(shared, routed))


def _groups(group: int, k: int) -> str:
    """How a kernel's name says its scale groups: per output channel, or g<size>."""
    return "pc" if group == k else f"g{group}"


def write_cache_rows(batch: int, heads: int, length: int, head_dim: int, dtype: str):
    """cache[b, h, positions[t], :] = rows[b, h, t, :] for t < T: the in-place KV-cache write (T symbolic)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def write(cache: T.Buffer((batch, heads, length, head_dim), dtype), var_pos: T.handle, var_rows: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        positions = T.match_buffer(var_pos, (n,), "int64")
        rows = T.match_buffer(var_rows, (batch, heads, n, head_dim), dtype)
        for b, h, t, j in T.grid(batch, heads, n, head_dim):
            with T.sblock("write"):
                vb, vh, vt, vj = T.axis.remap("SSSS", [b, h, t, j])
                cache[vb, vh, positions[vt], vj] = rows[vb, vh, vt, vj]

    return write


def to_kernel_layouts(ep) -> int:
    """The program's low-bit weights in the kernels' layouts, rewritten in the ExportedProgram before import:
    - the 2-bit codes of mote.moe_ffn and mote.ternary_linear (`kernels.kernel_codes`: rows padded with trit-0
      codes to whole vectors; unchanged when the widths are already whole vectors);
    - the int4 values of mote.quantized_linear and mote.quantized_embedding, packed two per byte
      (`kernels.pack_int4`; int8 ones are already the kernels' layout).
    Returns how many tensors changed."""
    changed: dict = {}   # old placeholder -> new one (a weight read by several ops is laid out once)

    def relayout(node, arg, lay_out):
        if arg not in changed:
            value = constant_value(ep, arg)
            laid_out = lay_out(value.numpy())
            if laid_out.shape == tuple(value.shape) and laid_out.dtype == value.numpy().dtype:
                return
            changed[arg] = add_constant(ep, f"{spec_for(ep, arg).target}.kernel_layout", torch.from_numpy(laid_out))
        node.replace_input_with(arg, changed[arg])

    for node, args in moe_nodes(ep):
        d, width = args.x.meta["val"].shape[-1], constant_value(ep, args.gate_packed).shape[1]
        for _, codes, _, k in args.projections(d, width):
            relayout(node, codes, lambda c, k=k: kernels.kernel_codes(c, k))
    for node in list(ep.graph.nodes):
        if is_op(node, torch.ops.mote.ternary_linear.default):
            relayout(node, node.args[1], lambda c, k=node.args[3]: kernels.kernel_codes(c, k))
        elif is_op(node, *QUANTIZED_OPS) and _bits(node) == 4:
            relayout(node, node.args[1], kernels.pack_int4)
    finish_rewrite(ep)
    return len(changed)


def _bits(node) -> int:
    """The bits argument of mote.quantized_linear / mote.quantized_embedding."""
    return node.args[4] if is_op(node, torch.ops.mote.quantized_linear.default) else node.args[3]
