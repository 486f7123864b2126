"""Pass: replace routed-expert weights by packed trits + scales, in the ExportedProgram itself.

Latent (QAT) weights, as traced from `TernaryLinear`:

    W (param f32[out,in]) -> abs -> mean[(dim=-1)] -> clamp(1e-5) = S
    W / S -> round -> clamp(-1, 1) = T                       T feeds the matmul, S the output scaling

Pre-quantized weights:

    Wq (buffer i8[out,in]) -> to(float32) = T                (the scale is already a buffer)

After:

    P (buffer u8[out, ceil(in/4)]) -> mote.unpack_trits(P, in) = T
    Sc (buffer f32[1] or [out])     -> view(shape of S) = S      (latent only)

T and S are bit-identical to before (the trits are recomputed with the same absmean formula), so the program's
numerics do not change; the float W (4 bytes/weight) or int8 Wq (1 byte) leaves the state dict, P (2 bits) enters.
Pre-quantized trits outside {-1, 0, 1} are an error: they are not a ternary model.
"""
from __future__ import annotations

import torch

from mote.export import semantics
from mote.export.errors import InputError

from .match import is_op, op, scalar_arg
from .ops import pack_trits
from .program import add_constant, call, constant_value, finish_rewrite, spec_for

aten = torch.ops.aten


def _latent_pattern(ep, node):
    """node = clamp(round(W / S), -1, 1) with S = clamp(mean(abs(W)), 1e-5): returns (W, S, per_channel)."""
    if not (is_op(node, aten.clamp.default) and scalar_arg(node, 1, -1.0) and scalar_arg(node, 2, 1.0)):
        return None
    div = op(op(node.args[0], aten.round.default) and node.args[0].args[0], aten.div.Tensor)
    if div is None:
        return None
    w, s = div.args
    if constant_value(ep, w) is None or not (is_op(s, aten.clamp.default) and scalar_arg(s, 1, semantics.WEIGHT_EPS)):
        return None
    mean = s.args[0]
    absw = op(mean.args[0], aten.abs.default) if is_op(mean, aten.mean.default, aten.mean.dim) else None
    if absw is None or absw.args[0] is not w:
        return None
    per_channel = mean.target == aten.mean.dim
    if per_channel and not (list(mean.args[1]) in ([-1], [1]) and (mean.args[2] if len(mean.args) > 2 else False)):
        return None
    return w, s, per_channel


def _prequantized_pattern(ep, node):
    """node = to(Wq, float32) with Wq an int8 constant: returns Wq."""
    if is_op(node, aten.to.dtype) and node.args[1] == torch.float32:
        src = node.args[0]
    elif is_op(node, aten._to_copy.default) and node.kwargs.get("dtype") == torch.float32:
        src = node.args[0]
    else:
        return None
    value = constant_value(ep, src)
    if value is None or value.dtype != torch.int8 or value.dim() != 2:
        return None
    return src


def ternarize_expert_weights(ep) -> int:
    graph, count = ep.graph, 0
    for node in list(graph.nodes):
        latent = _latent_pattern(ep, node)
        if latent is not None:
            w_node, s_node, per_channel = latent
            trits, scale = semantics.ternarize(constant_value(ep, w_node), per_channel)
            module = spec_for(ep, w_node).target.rsplit(".", 1)[0]
            packed = add_constant(ep, module + ".packed_trits", pack_trits(trits))
            scale_c = add_constant(ep, module + ".trit_scale", scale.reshape(-1).clone())
            first_use = min(list(s_node.users), key=_order(graph))
            unpacked = call(graph, torch.ops.mote.unpack_trits.default, (packed, trits.shape[1]), first_use)
            s_view = call(graph, aten.view.default, (scale_c, list(scale.shape)), first_use)
            node.replace_all_uses_with(unpacked)
            s_node.replace_all_uses_with(s_view, delete_user_cb=lambda user: user is not s_view)
            count += 1
            continue
        wq = _prequantized_pattern(ep, node)
        if wq is not None:
            trits = constant_value(ep, wq)
            target = spec_for(ep, wq).target
            bad = (trits < -1) | (trits > 1)
            if bad.any():
                raise InputError(f"tensor '{target}': {int(bad.sum())} pre-quantized values outside {{-1, 0, 1}}")
            packed = add_constant(ep, target.rsplit(".", 1)[0] + ".packed_trits", pack_trits(trits))
            unpacked = call(graph, torch.ops.mote.unpack_trits.default, (packed, trits.shape[1]), node)
            node.replace_all_uses_with(unpacked)
            for user in list(wq.users):   # dtype/shape asserts on the int8 tensor would keep it alive
                if is_op(user, aten._assert_tensor_metadata.default):
                    graph.erase_node(user)
            count += 1
    finish_rewrite(ep)     # the float / int8 weights leave the state dict, not just the graph
    return count


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index[n]
