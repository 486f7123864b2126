"""Pass: fuse activation quantization + integer matmul + the two scalings into `mote.ternary_linear`.

Before (one bitlinear, after `ternarize_expert_weights`):

    c  = clamp(amax(abs(x), [-1], keepdim), 1e-5)
    q  = clamp(round(x * (reciprocal(c) * 127)), -128, 127)            Q8(x)
    T  = mote.unpack_trits(P, in)
    y  = matmul(q, transpose(T, 0, 1)) * (c / 127) * view(Sc)          (Q8(x) . T^T) * s_x * s_w

After:

    y  = mote.ternary_linear(x, P, Sc, in)

The op's reference kernel evaluates the same expression (export.semantics.bitlinear), so y is bit-identical.
A scale that is not already canonical ([1] or [out]) gets a canonical copy.
"""
from __future__ import annotations

import torch

from mote.export import semantics

from .match import is_op, only_user, op, other_arg, scalar_arg, through_views
from .program import add_constant, constant_value, finish_rewrite, replace_call, spec_for

aten = torch.ops.aten


def _quantized_input(q):
    """q = clamp(round(x * (reciprocal(c) * 127)), -128, 127), c = clamp(amax(abs(x)), 1e-5): returns (x, c)."""
    if not (is_op(q, aten.clamp.default) and scalar_arg(q, 1, semantics.Q_MIN) and scalar_arg(q, 2, semantics.Q_MAX)):
        return None
    mul = op(op(q.args[0], aten.round.default) and q.args[0].args[0], aten.mul.Tensor)
    if mul is None:
        return None
    for x, k in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not (is_op(k, aten.mul.Tensor) and semantics.Q_MAX in k.args):
            continue
        rec = op(other_arg(k, semantics.Q_MAX), aten.reciprocal.default)
        c = rec.args[0] if rec is not None else None
        if not (is_op(c, aten.clamp.default) and scalar_arg(c, 1, semantics.ACT_EPS)):
            continue
        amax = op(c.args[0], aten.amax.default)
        if amax is not None and is_op(amax.args[0], aten.abs.default) and amax.args[0].args[0] is x:
            return x, c
    return None


def _match(ep, unpack):
    tr = only_user(unpack)
    if not (is_op(tr, aten.transpose.int) and set(tr.args[1:]) in ({0, 1}, {-1, -2}, {1, -2}, {0, -1})):
        return None
    mm = only_user(tr)
    if not (is_op(mm, aten.matmul.default) and mm.args[1] is tr):
        return None
    found = _quantized_input(mm.args[0])
    if found is None:
        return None
    x, c = found
    mul1 = only_user(mm)
    if not is_op(mul1, aten.mul.Tensor):
        return None
    sv = other_arg(mul1, mm)
    if not (is_op(sv, aten.div.Tensor) and sv.args[0] is c and scalar_arg(sv, 1, semantics.Q_MAX)):
        return None
    mul2 = only_user(mul1)
    if not is_op(mul2, aten.mul.Tensor):
        return None
    scale_node = through_views(other_arg(mul2, mul1))
    scale = constant_value(ep, scale_node)
    out_features = unpack.meta["val"].shape[0]
    if scale is None or scale.numel() not in (1, out_features):
        return None
    return x, scale_node, scale, mul2


def fuse_ternary_linear(ep) -> int:
    graph, count = ep.graph, 0
    for unpack in [n for n in graph.nodes if is_op(n, torch.ops.mote.unpack_trits.default)]:
        found = _match(ep, unpack)
        if found is None:
            continue
        x, scale_node, scale, out = found
        if scale.dim() != 1:
            scale_node = add_constant(ep, spec_for(ep, scale_node).target + ".canonical", scale.reshape(-1).clone())
        packed, in_features = unpack.args
        replace_call(graph, out, torch.ops.mote.ternary_linear.default, (x, packed, scale_node, in_features))
        count += 1
    finish_rewrite(ep)
    return count
