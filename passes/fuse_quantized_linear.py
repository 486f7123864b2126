"""Pass: fuse a post-training quantized weight and what reads it into one `mote::` op (`--quantize`).

Before (a module the loader quantized, `export.model.QuantizedLinear` / `QuantizedEmbedding`):

    W = mote.dequantize_weight(Q, S, bits, g)          Q int8 [out, K], S f32 [out, K/g]: constants
    y = linear(x, W[, b])
    e = embedding(W, tokens)

After:

    y = mote.quantized_linear(x, Q, S, b?, bits, g)
    e = mote.quantized_embedding(tokens, Q, S, bits, g)

The ops' reference kernels dequantize with the same function (`semantics.dequantize_weight`) and call the same
`linear` / gather, so the outputs are bit-identical. Every target then lowers the quantized ops to its runtime's
low-bit kernels, never to a float weight.

A dequantized weight read by anything else is left alone, and `check_quantized` stops the export naming it:
`missed(ep)` gives each such node with the reason (as onnxscript's rewriter says why a pattern missed).
"""
from __future__ import annotations

import torch

from .match import is_op
from .program import constant_value, finish_rewrite, replace_call

aten = torch.ops.aten
DEQUANTIZE = torch.ops.mote.dequantize_weight.default


def _constants(ep, dq) -> bool:
    return all(constant_value(ep, a) is not None for a in dq.args[:2])


def _why_not(ep, dq, user) -> str | None:
    """None when `user` of the dequantized weight `dq` is a pattern this pass fuses; else why not."""
    if not _constants(ep, dq):
        return "its int8 values or scales are not constants of the program"
    if is_op(user, aten.linear.default):
        return None if user.args[1] is dq and user.args[0] is not dq else "it is the input of a linear, not its weight"
    if is_op(user, aten.embedding.default):
        return None if user.args[0] is dq and len(user.args) == 2 else "an embedding with padding_idx or other options"
    return f"it is read by {getattr(user.target, '__name__', user.target)}, not by a linear or an embedding"


def missed(ep) -> list[tuple[torch.fx.Node, str]]:
    """Dequantized weights left in the graph, each with why the pass did not fuse its reader."""
    out = []
    for dq in [n for n in ep.graph.nodes if is_op(n, DEQUANTIZE)]:
        reasons = [_why_not(ep, dq, u) for u in dq.users]
        out.append((dq, next((r for r in reasons if r), "nothing reads it")))
    return out


def fuse_quantized_linear(ep) -> int:
    graph, count = ep.graph, 0
    for dq in [n for n in graph.nodes if is_op(n, DEQUANTIZE)]:
        q, scale, bits, group = dq.args
        for user in list(dq.users):
            if _why_not(ep, dq, user) is not None:
                continue
            if is_op(user, aten.linear.default):
                bias = user.args[2] if len(user.args) > 2 else None
                replace_call(graph, user, torch.ops.mote.quantized_linear.default,
                             (user.args[0], q, scale, bias, bits, group))
            else:
                replace_call(graph, user, torch.ops.mote.quantized_embedding.default,
                             (user.args[1], q, scale, bits, group))
            count += 1
    finish_rewrite(ep)
    return count
