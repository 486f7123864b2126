"""coremltools converters for what `ct.convert` does not know (the `mote::` ops, `aten.index_copy`) and for three
ATen ops whose stock converters compute something else (gelu's tanh approximation, reciprocal, where; see below).

The `mote::` ops become MIL that keeps the routed experts as their packed 2-bit codes (uint8, four per byte,
`code = trit + 2`, DESIGN.md section 4) and decodes only the experts it gathers:

    mote.moe_ffn(x, shared..., router, codes..., scales..., k)
        shared  = semantics.shared_expert(x)                           linear / silu / mul (full precision)
        p, i    = topk(softmax(W_r x), k)                              [p /= sum p]
        ids     = the first U = min(N * k, E) experts by `chosen`      `chosen[e]` = some token picked e
                  (argsort of chosen, then slice_by_size: U depends on the shape only, so decode reads k experts)
        W_u     = LUT[gather(codes, ids)]                              [U, rows, K]: the uint8 codes of U experts,
                                                                       each byte to its four trits by a 256x4 table
        Y[u]    = bitlinear(silu(bitlinear(x, W_gate_u)) * bitlinear(x, W_up_u), W_down_u)     every token, each u
        y       = shared + sum_u P[u] Y[u],   P[u, t] = sum_j p[t, j] [i[t, j] = ids[u]]
    mote.ternary_linear -> not converted: the pass pipeline leaves none outside the fused blocks (check_moe_fused),
                           and coremltools would fold a constant matrix's decode into a dense float copy
    aten.index_copy     -> scatter(mode="update") along the dim (how the KV cache states are written)

Post-training quantized weights (`--quantize`; q symmetric int4 / int8, one scale per group of g along K):

    mote.quantized_linear(x, q, s, b?, bits, g)
        W = constexpr_blockwise_shift_scale(data=q as int4 | int8, scale=s [out, K/g])     no offset: symmetric
        y = linear(x, W, b)
    mote.quantized_embedding(tokens, q, s, bits, g)
        rows = gather(q, tokens)                       int8 [V, d] constant, or for int4 uint8 [V, ceil(d/2)] of
                                                       nibble pairs (lowest first) decoded by a 256 x 2 table
        e    = cast(rows) * gather(s, tokens)          (per group of g along d): only the T gathered rows are
                                                       dequantized; the table is a plain int8 / uint8 constant,
                                                       with no dense float copy for Core ML to materialize
    mote.moe_ffn with no shared weights (the shared expert quantized, outside the op): router + routed experts only

The constexpr data is stored at 4 or 8 bits per weight in the package's weight.bin; its scale is given in fp32 and
stored in the program's precision (coremltools' fp16 pass rewrites a constexpr's scale to fp16 in place, so the
fp16 program has no run-time cast of the weight).

`bitlinear(v, T, s)` is the reference's (Q8(v) . T^T) s_v s written as (Q8(v) s_v) . T^T s: the same product, but
the matmul sees activations of the size of v instead of integers up to 127 (an fp16 program would overflow summing
127 x 4864 at the Qwen2.5-0.5B expert width; fp16 holds at most 65504). Q8 itself is computed in fp32 even in an
fp16 program (`keeps_fp32`).

Memory: a call decodes at most min(N * k, E) experts once each, however long the prompt (never T x k decoded
copies); at decode (N = 1) exactly the k chosen experts' codes are read.

Names: the gathers that read the routed experts are named `<node>__routed_<projection>_{codes,scale}`, and those
that read a quantized embedding table `<node>__qembed_{rows,scale}`, so that the report can find, in the saved
program, which weight blobs hold them (`report.py`).
"""
from __future__ import annotations

import numpy as np

ROUTED_TAG = "__routed_"
QEMBED_TAG = "__qembed_"
Q8_TAG = "__q8_"


def _byte_trits() -> np.ndarray:
    """[256, 4] float32: the trits of each packed byte's four codes, lowest bits first (the canonical storage)."""
    from mote.export.trits import TRITS_OF_BYTE

    return TRITS_OF_BYTE.numpy()


def _quantized(mb, v, name: str):
    """Q8(v) * s_v: the reference's per-token symmetric int8 activation (semantics.quantize_activations), kept in
    the scale of v (see the module docstring). Its ops are named `<name>__q8_*` and computed in fp32 even in an fp16
    program (`keeps_fp32`): in fp16, 127 / max|v| overflows to inf once max|v| < 2e-3 (an all-zero expert's
    activations, or any tiny row), and inf * 0 is NaN in every token's sum."""
    from mote.export.semantics import ACT_EPS, Q_MAX, Q_MIN

    tag = f"{name}{Q8_TAG}"
    amax = mb.maximum(x=mb.reduce_max(x=mb.abs(x=v, name=f"{tag}abs"), axes=[-1], keep_dims=True,
                                      name=f"{tag}amax"), y=np.float32(ACT_EPS), name=f"{tag}clamped")
    scaled = mb.mul(x=v, y=mb.real_div(x=np.float32(Q_MAX), y=amax, name=f"{tag}inv_scale"), name=f"{tag}scaled")
    q = mb.clip(x=mb.round(x=scaled, name=f"{tag}round"), alpha=np.float32(Q_MIN), beta=np.float32(Q_MAX),
                name=f"{tag}clip")
    return mb.mul(x=q, y=mb.real_div(x=amax, y=np.float32(Q_MAX), name=f"{tag}scale"), name=f"{tag}dequantized")


def keeps_fp32(op) -> bool:
    """The ops an fp16 program must still compute in fp32: the activation quantization (`_quantized`)."""
    return Q8_TAG in op.name


def _nibble_values() -> np.ndarray:
    """[256, 2] float32: the signed int4 values of each byte's two nibbles, lowest first."""
    nibbles = np.stack([np.arange(256) & 0xF, np.arange(256) >> 4], axis=-1)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int4 values (-8..7, one per int8) [..., K] -> uint8 [..., ceil(K/2)], two per byte, lowest nibble first."""
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), dtype=q.dtype)], axis=-1)
    nibbles = q.astype(np.uint8) & 0xF
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def _reshape_target(dims) -> list[int]:
    """A reshape's shape from dims that may hold one symbolic (run-time) size, given as -1."""
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    target = [-1 if is_symbolic(d) else int(d) for d in dims]
    if target.count(-1) > 1:
        raise ValueError(f"cannot reshape to {list(dims)}: more than one size known only at run time")
    return target


def _decoded(mb, codes, table: np.ndarray, k: int, name: str):
    """uint8 packed codes [..., ceil(K/n)] -> values [..., K] by one gather in `table` ([256, n]: the n values each
    byte holds, lowest bits first)."""
    per_byte = table.shape[1]
    values = mb.gather(x=table, indices=codes, axis=0, name=name)               # [..., K/n, n]
    flat = mb.reshape(x=values, shape=_reshape_target([*codes.shape[:-1], per_byte * codes.shape[-1]]))
    if codes.shape[-1] * per_byte != k:        # K padded to a multiple of n with zeros
        flat = mb.slice_by_size(x=flat, begin=[0] * codes.rank, size=[-1] * (codes.rank - 1) + [k])
    return flat


def _bitlinear(mb, quantized, trits, scale):
    """`_quantized` activations [.., N, K] through trits [.., out, K] with scale [.., 1|out] -> [.., N, out]: the
    reference's bitlinear."""
    acc = mb.matmul(x=quantized, y=trits, transpose_y=True)
    return mb.mul(x=acc, y=mb.expand_dims(x=scale, axes=[-2]))


def _shared_expert(mb, flat, shared, shared_expert_gate):
    w_gate, w_up, w_down = shared
    out = mb.linear(x=mb.mul(x=mb.silu(x=mb.linear(x=flat, weight=w_gate)), y=mb.linear(x=flat, weight=w_up)),
                    weight=w_down)
    if shared_expert_gate is not None:
        out = mb.mul(x=mb.sigmoid(x=mb.linear(x=flat, weight=shared_expert_gate)), y=out)
    return out


def _moe_block(mb, name: str, x, shared, shared_expert_gate, router, top_k: int, norm: bool, experts: int, routed):
    """The fused block around `routed(flat, ids)` -> Y [U, N, d] (every token through each gathered expert).
    `shared` all None: the shared expert is outside the op (quantized), the block is the router and routed experts."""
    d = x.shape[-1]
    flat = mb.reshape(x=x, shape=[-1, d])                                               # [N, d]
    out = None if shared[0] is None else _shared_expert(mb, flat, shared, shared_expert_gate)
    probs = mb.softmax(x=mb.linear(x=flat, weight=router), axis=-1)
    top_p, top_i = mb.topk(x=probs, k=top_k, axis=-1)                                  # [N, k]
    if norm:
        top_p = mb.real_div(x=top_p, y=mb.reduce_sum(x=top_p, axes=[-1], keep_dims=True))
    # ids: the experts some token chose first (at most N * k of them), U = min(N * k, E) in all
    picked = mb.cast(x=mb.equal(x=mb.expand_dims(x=top_i, axes=[-1]), y=np.arange(experts, dtype=np.int32)),
                     dtype="fp32")                                                      # [N, k, E]
    chosen = mb.reduce_max(x=picked, axes=[0, 1])                                       # [E]
    tokens = mb.slice_by_size(x=mb.shape(x=flat), begin=[0], size=[1])
    count = mb.minimum(x=mb.mul(x=tokens, y=np.int32(top_k)), y=np.int32(experts))
    ids = mb.slice_by_size(x=mb.argsort(x=chosen, axis=0, ascending=False), begin=[0], size=count)   # [U]
    # P [U, N]: each gathered expert's routing weight per token (0 where the token did not choose it)
    match = mb.cast(x=mb.equal(x=mb.expand_dims(x=top_i, axes=[0]), y=mb.reshape(x=ids, shape=[-1, 1, 1])),
                    dtype="fp32")                                                       # [U, N, k]
    weight = mb.reduce_sum(x=mb.mul(x=match, y=top_p), axes=[-1])
    y = routed(flat, ids)                                                               # [U, N, d]
    routed_sum = mb.reduce_sum(x=mb.mul(x=mb.expand_dims(x=weight, axes=[-1]), y=y), axes=[0])
    out = routed_sum if out is None else mb.add(x=out, y=routed_sum)
    return mb.reshape(x=out, shape=mb.shape(x=x), name=name)


def convert_moe_ffn(context, node):
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    from mote.passes.ops import MoeFfnArgs

    a = MoeFfnArgs(*_get_inputs(context, node))
    d, width = a.x.shape[-1], a.gate_packed.shape[1]
    (_, gate_c, gate_s, gate_k), (_, up_c, up_s, up_k), (_, down_c, down_s, down_k) = a.projections(d, width)

    def routed(flat, ids):
        def gathered(proj, codes, scale, k):
            tag = f"{node.name}{ROUTED_TAG}{proj}"
            got = mb.gather(x=codes, indices=ids, axis=0, name=f"{tag}_codes")
            return (_decoded(mb, got, _byte_trits(), k, f"{node.name}__decode_{proj}"),
                    mb.gather(x=scale, indices=ids, axis=0, name=f"{tag}_scale"))

        xq = _quantized(mb, flat, f"{node.name}_x")
        h = mb.mul(x=mb.silu(x=_bitlinear(mb, xq, *gathered("gate", gate_c, gate_s, gate_k))),
                   y=_bitlinear(mb, xq, *gathered("up", up_c, up_s, up_k)))            # [U, N, I]
        return _bitlinear(mb, _quantized(mb, h, f"{node.name}_h"), *gathered("down", down_c, down_s, down_k))

    context.add(_moe_block(mb, node.name, a.x, a.shared, a.shared_expert_gate, a.router, int(a.top_k.val),
                           bool(a.norm_topk_prob.val), a.gate_packed.shape[0], routed))


def convert_moe_ffn_float(context, node):
    """The benchmark's fp32-expert baseline (targets/lowering.py `use_float_experts`): the same block, the chosen
    experts' float32 weights gathered (never a deployment artifact)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    (x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w, down_w, top_k,
     norm) = _get_inputs(context, node, expected=11)

    def routed(flat, ids):
        def proj(v, w, what):
            return mb.matmul(x=v, y=mb.gather(x=w, indices=ids, axis=0, name=f"{node.name}{ROUTED_TAG}{what}"),
                             transpose_y=True)

        return proj(mb.mul(x=mb.silu(x=proj(flat, gate_w, "gate")), y=proj(flat, up_w, "up")), down_w, "down")

    context.add(_moe_block(mb, node.name, x, (shared_gate, shared_up, shared_down), shared_expert_gate, router,
                           int(top_k.val), bool(norm.val), gate_w.shape[0], routed))


def _constant(var, what: str, node) -> np.ndarray:
    if var.val is None:
        raise ValueError(f"{node.name}: the {what} of a quantized weight must be a constant of the program")
    return var.val


def _low_bit(q: np.ndarray, bits: int, node) -> np.ndarray:
    """int8 storage of `bits`-bit integers -> the numpy dtype coremltools stores at `bits` bits (int4: int8 values
    tagged as MIL int4, which the blob writer packs two per byte)."""
    from coremltools.converters.mil.mil import types

    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.min(initial=0) < low or q.max(initial=0) > high:
        raise ValueError(f"{node.name}: quantized values outside the int{bits} range [{low}, {high}]")
    return q.astype(types.nptype_from_builtin(types.int4)) if bits == 4 else q.astype(np.int8)


def convert_quantized_linear(context, node):
    """linear(x, constexpr_blockwise_shift_scale(q, s), b): Core ML's block-wise low-bit weight."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    x, q, scale, bias, bits, _ = _get_inputs(context, node, expected=6)
    weight = mb.constexpr_blockwise_shift_scale(data=_low_bit(_constant(q, "values", node), int(bits.val), node),
                                                scale=_constant(scale, "scales", node).astype(np.float32),
                                                name=f"{node.name}__weight")
    extra = {} if bias is None else {"bias": bias}
    context.add(mb.linear(x=x, weight=weight, name=node.name, **extra))


def convert_quantized_embedding(context, node):
    """The tokens' rows of the int8 (or nibble-packed int4) table, then their scales: see the module docstring."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import types

    tokens, q, scale, bits, _ = _get_inputs(context, node, expected=5)
    q, scale = _low_bit(_constant(q, "values", node), int(bits.val), node), _constant(scale, "scales", node)
    if tokens.dtype != types.int32:
        tokens = mb.cast(x=tokens, dtype="int32")
    d, groups = q.shape[1], scale.shape[1]
    tag = f"{node.name}{QEMBED_TAG}"
    if int(bits.val) == 8:
        rows = mb.cast(x=mb.gather(x=q, indices=tokens, axis=0, name=f"{tag}rows"), dtype="fp32")   # [..., d]
    else:
        codes = mb.gather(x=_pack_nibbles(q), indices=tokens, axis=0, name=f"{tag}rows")
        rows = _decoded(mb, codes, _nibble_values(), d, f"{node.name}__decode")
    scales = mb.gather(x=scale.astype(np.float32), indices=tokens, axis=0, name=f"{tag}scale")   # [..., d/g]
    if groups == 1:                 # per row: one scale broadcast over d
        context.add(mb.mul(x=rows, y=scales, name=node.name))
        return
    lead = list(rows.shape[:-1])
    grouped = mb.reshape(x=rows, shape=_reshape_target([*lead, groups, d // groups]))
    scaled = mb.mul(x=grouped, y=mb.expand_dims(x=scales, axes=[-1]))
    context.add(mb.reshape(x=scaled, shape=_reshape_target([*lead, d]), name=node.name))


def convert_index_copy(context, node):
    """index_copy(data, dim, index, source): rows `index` of `data` along `dim` replaced by `source` (the KV cache
    write at input_pos + arange(T)); MIL's scatter in update mode."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    from coremltools.converters.mil.mil import types

    data, dim, index, source = _get_inputs(context, node, expected=4)
    axis = int(dim.val) % data.rank
    if index.dtype != types.int32:
        index = mb.cast(x=index, dtype="int32")
    context.add(mb.scatter(data=data, indices=index, updates=source, axis=axis, mode="update", name=node.name))


# -- coremltools' own converters, where they change the computation --------------------------------------------------
# Each was found by tests/test_mil_executor.py comparing a converted op with PyTorch.

def convert_gelu(context, node):
    """coremltools reads `approximate` only as a positional input; torch.export passes it as a keyword, so
    gelu(approximate="tanh") (our vision tower's, SigLIP's) became the exact gelu."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs

    inputs = _get_inputs(context, node, expected=(1, 2))
    approximate = inputs[1] if len(inputs) == 2 else _get_kwinputs(context, node, "approximate", default=[None])[0]
    how = "none" if approximate is None else (approximate if isinstance(approximate, str) else approximate.val)
    if how not in ("none", "tanh"):
        raise ValueError(f"gelu approximate={how!r}")
    context.add(mb.gelu(x=inputs[0], mode="TANH_APPROXIMATION" if how == "tanh" else "EXACT", name=node.name))


def convert_reciprocal(context, node):
    """coremltools' reciprocal is MIL `inverse` with its default epsilon, 1 / (x + 1e-4): a real division instead."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs

    (x,) = _get_inputs(context, node, expected=1)
    context.add(mb.real_div(x=np.array(1.0, dtype=np.float32), y=x, name=node.name))


def convert_where(context, node):
    """MIL select infers its output type from `a` and `b` only. With scalar branches and a condition of symbolic shape
    (the attention mask: where(positions <= input_pos + t, 0, -inf), T dynamic), coremltools leaves them unbroadcast
    and the saved program declares a scalar where the mask is [T, S]. The branch `a` is broadcast to the condition's
    shape (adding zeros) so the declared type is the computed one."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil import types

    inputs = ops._get_inputs(context, node)
    if len(inputs) != 3:
        return ops.where(context, node)        # where(cond): nonzero
    cond, a, b = inputs
    a, b = ops.promote_input_dtypes([a, b])
    if not types.is_bool(cond.dtype):
        cond = mb.cast(x=cond, dtype="bool")
    if cond.rank > max(a.rank, b.rank) and types.is_float(a.dtype):
        zeros = mb.fill(shape=mb.shape(x=cond), value=0.0)
        a = mb.add(x=a, y=zeros if a.dtype == zeros.dtype else mb.cast(x=zeros, dtype=types.builtin_to_string(a.dtype)))
    context.add(mb.select(cond=cond, a=a, b=b, name=node.name))


_REGISTERED = False


def register_converters() -> None:
    """Add our converters to coremltools' torch op registry (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    register_torch_op(convert_moe_ffn, torch_alias=["mote::moe_ffn"], override=True)
    register_torch_op(convert_moe_ffn_float, torch_alias=["mote_bench::moe_ffn_float"], override=True)
    register_torch_op(convert_quantized_linear, torch_alias=["mote::quantized_linear"], override=True)
    register_torch_op(convert_quantized_embedding, torch_alias=["mote::quantized_embedding"], override=True)
    register_torch_op(convert_index_copy, torch_alias=["index_copy"], override=True)
    register_torch_op(convert_gelu, torch_alias=["gelu"], override=True)
    register_torch_op(convert_reciprocal, torch_alias=["reciprocal"], override=True)
    register_torch_op(convert_where, torch_alias=["where", "where.self", "where.scalarself"], override=True)
    _REGISTERED = True
