"""Pass: fuse a whole MoTE block into one `mote.moe_ffn`.

Before (after `fuse_ternary_linear`; E experts, h = the post-attention-norm hidden state):

    shared   = linear(silu(linear(h, Wg)) * linear(h, Wu), Wd)
    shared   = sigmoid(linear(h, Wsg)) * shared                       (optional shared-expert gate, Qwen2-MoE)
    p        = softmax(linear(h, Wr), -1)
    v, i     = topk(p, k);  v = v / sum(v, -1, keepdim)               (renormalisation optional)
    combine  = scatter(zeros_like(p), -1, i, v)
    expert_e = mote.ternary_linear(silu(mote.ternary_linear(h, G_e)) * mote.ternary_linear(h, U_e), D_e)
    y        = (((shared + combine[..., 0:1] * expert_0) + combine[..., 1:2] * expert_1) + ...)

After:

    y = mote.moe_ffn(h, Wg, Wu, Wd, Wsg?, Wr, stack(G), stack(G scales), stack(U), ..., stack(D), ..., k, renorm)

A shared expert quantized by `--quantize` (its linears already `mote.quantized_linear`, see
`fuse_quantized_linear`) stays outside the op, which then has no shared weights:

    shared = mote.quantized_linear(silu(mote.quantized_linear(h, Qg)) * mote.quantized_linear(h, Qu), Qd)
             [* sigmoid(linear(h, Wsg))]
    y      = shared + mote.moe_ffn(h, None, None, None, None, Wr, stack(G), ..., k, renorm)

so each target lowers the quantized linears with its low-bit kernels, as it does everywhere else. The routed sum
then starts from zero and the shared output is added last: for top-1 the same sum, for top-k a different order of
the k + 1 additions (float rounding).

The per-expert packed trits and scales are stacked into [E, ...] buffers (the layout fused MoE kernels such as
ONNX Runtime's QMoE read from), and the per-expert buffers leave the program. The op's reference kernel runs the
same functions in the same order, so y is bit-identical.

A top-k node that does not start this pattern is left alone; `why_not_fused(ep, topk)` names the first check it
failed (as onnxscript's rewriter does), which the post-pipeline check `check_moe_fused` puts in its error.
"""
from __future__ import annotations

import torch

from .match import is_op, only_user, op, other_arg
from .ops import MoeFfnArgs
from .program import add_constant, call, constant_value, finish_rewrite, replace_call, spec_for

aten = torch.ops.aten
TERNARY = torch.ops.mote.ternary_linear.default
QUANTIZED = torch.ops.mote.quantized_linear.default


class NoMatch(Exception):
    """The first check a candidate block failed, as a short reason."""


def _require(ok, why: str) -> None:
    if not ok:
        raise NoMatch(why)


def _what(node) -> str:
    """A node as a miss reason shows it: its op (e.g. `mul.Tensor`), else what kind of node it is."""
    if not isinstance(node, torch.fx.Node):
        return repr(node)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


def _linear_weight(ep, node, h):
    """node = linear(h, W) with constant W and no bias: returns the W placeholder."""
    if is_op(node, aten.linear.default) and node.args[0] is h and len(node.args) == 2 and constant_value(ep, node.args[1]) is not None:
        return node.args[1]
    return None


def _swiglu(ep, node, h):
    """node = linear(silu(linear(h, Wg)) * linear(h, Wu), Wd): returns (Wg, Wu, Wd)."""
    if not is_op(node, aten.linear.default) or len(node.args) != 2:
        return None
    mul = op(node.args[0], aten.mul.Tensor)
    if mul is None or not is_op(mul.args[0], aten.silu.default):
        return None
    wg, wu = _linear_weight(ep, mul.args[0].args[0], h), _linear_weight(ep, mul.args[1], h)
    wd = node.args[1] if constant_value(ep, node.args[1]) is not None else None
    return (wg, wu, wd) if None not in (wg, wu, wd) else None


def _quantized_swiglu(node, h) -> bool:
    """node = swiglu of h whose linears are mote.quantized_linear (or constant-weight linears), at least one quantized."""
    def proj(n, x):
        return (is_op(n, QUANTIZED) or (is_op(n, aten.linear.default) and len(n.args) == 2)) and n.args[0] is x

    mul = op(node.args[0], aten.mul.Tensor) if is_op(node, QUANTIZED, aten.linear.default) else None
    if mul is None or not is_op(mul.args[0], aten.silu.default):
        return False
    parts = (mul.args[0].args[0], mul.args[1], node)
    return (proj(parts[0], h) and proj(parts[1], h) and proj(node, mul)
            and any(is_op(p, QUANTIZED) for p in parts))


def _ternary_expert(node, h, e):
    """node = tl(silu(tl(h, G)) * tl(h, U), D): returns the three ternary_linear nodes (gate, up, down)."""
    _require(is_op(node, TERNARY), f"expert {e} output is {_what(node)}, not mote.ternary_linear")
    mul = op(node.args[0], aten.mul.Tensor)
    _require(mul is not None and is_op(mul.args[0], aten.silu.default),
             f"expert {e} down projection reads {_what(node.args[0])}, not silu(gate) * up")
    gate, up = mul.args[0].args[0], mul.args[1]
    _require(is_op(gate, TERNARY) and is_op(up, TERNARY) and gate.args[0] is h and up.args[0] is h,
             f"expert {e} gate/up are {_what(gate)}/{_what(up)}, not mote.ternary_linear of the block input")
    return gate, up, node


def _router(ep, topk):
    """topk(softmax(linear(h, Wr), -1), k) [-> v / sum(v)] -> scatter(zeros_like(p), -1, i, v)."""
    probs = op(topk.args[0], aten.softmax.int)
    _require(probs is not None and probs.args[1] in (-1, probs.meta["val"].dim() - 1),
             f"top-k reads {_what(topk.args[0])}, not softmax(router logits, -1)")
    logits = op(probs.args[0], aten.linear.default)
    _require(logits is not None, f"softmax reads {_what(probs.args[0])}, not the router's linear")
    h = logits.args[0]
    router = _linear_weight(ep, logits, h)
    _require(router is not None, "router is not linear(h, W) with a constant W and no bias")
    getters = {u.args[1]: u for u in topk.users if u.target.__name__ == "getitem"}
    _require(set(getters) == {0, 1}, "top-k values and indices are not both used")
    values, indices = getters[0], getters[1]
    renorm = False
    divs = [u for u in values.users if is_op(u, aten.div.Tensor) and u.args[0] is values]
    if len(divs) == 1 and len(values.users) == 2:
        total = divs[0].args[1]
        if is_op(total, aten.sum.dim_IntList) and total.args[0] is values and list(total.args[1]) in ([-1], [2]):
            values, renorm = divs[0], True
    scatter = only_user(values)
    _require(is_op(scatter, aten.scatter.src) and scatter.args[2] is indices and scatter.args[3] is values
             and is_op(scatter.args[0], aten.zeros_like.default) and scatter.args[0].args[0] is probs,
             f"top-k weights feed {_what(scatter)}, not scatter(zeros_like(p), -1, indices, weights)")
    return h, router, topk.args[1], renorm, scatter


def _match(ep, topk):
    """The block starting at `topk` as a dict of its parts; raises NoMatch with the first check that failed."""
    h, router, top_k, renorm, combine = _router(ep, topk)
    n_experts = constant_value(ep, router).shape[0]
    slices = {}
    for s in combine.users:
        _require(is_op(s, aten.slice.Tensor) and len(s.args) == 4 and s.args[3] == s.args[2] + 1,
                 f"routing weights are read by {_what(s)}, not one single-column slice per expert")
        slices[s.args[2]] = s
    _require(sorted(slices) == list(range(n_experts)),
             f"routing weights are sliced for experts {sorted(slices)}, the router has {n_experts}")
    experts, acc_users = [], []
    for e in range(n_experts):
        mul = only_user(slices[e])
        _require(is_op(mul, aten.mul.Tensor), f"expert {e} routing weight feeds {_what(mul)}, not a mul")
        experts.append(_ternary_expert(other_arg(mul, slices[e]), h, e))
        add = only_user(mul)
        _require(is_op(add, aten.add.Tensor), f"expert {e} weighted output feeds {_what(add)}, not an add")
        acc_users.append((add, other_arg(add, mul)))
    # The adds must chain: shared -> add_0 -> add_1 -> ... -> add_{E-1} = the block's output.
    for e in range(1, n_experts):
        _require(acc_users[e][1] is acc_users[e - 1][0], f"expert {e} is not added onto the sum of experts 0..{e - 1}")
    shared_out, output = acc_users[0][1], acc_users[-1][0]
    whole_shared, shared_gate = shared_out, None
    if is_op(shared_out, aten.mul.Tensor) and any(is_op(a, aten.sigmoid.default) for a in shared_out.args):
        sig = next(a for a in shared_out.args if is_op(a, aten.sigmoid.default))
        shared_gate = _linear_weight(ep, sig.args[0], h)
        shared_out = other_arg(shared_out, sig)
        _require(shared_gate is not None, "shared-expert gate is not sigmoid(linear(h, W)) with a constant W")
    shared = _swiglu(ep, shared_out, h)
    outside = None
    if shared is None and _quantized_swiglu(shared_out, h):
        shared, shared_gate, outside = (None, None, None), None, whole_shared
    _require(shared is not None, f"shared expert output is {_what(shared_out)}, "
                                 "not linear(silu(linear(h)) * linear(h)) with constant or quantized weights")
    return dict(h=h, shared=shared, shared_gate=shared_gate, router=router, experts=experts, top_k=top_k,
                renorm=renorm, output=output, shared_outside=outside)


def _stack(ep, nodes_by_expert, arg_index, fqn):
    """Stack one argument (packed trits or scales) of every expert's ternary_linear into a new [E, ...] buffer."""
    tensors = [constant_value(ep, n.args[arg_index]) for n in nodes_by_expert]
    if arg_index == 2:  # scales: [1] or [out] each -> [E, 1] or [E, out]
        tensors = [t.reshape(-1) for t in tensors]
    return add_constant(ep, fqn, torch.stack(tensors).contiguous())


def why_not_fused(ep, topk) -> str | None:
    """The first check the block at this top-k node fails, or None when it matches (then nothing fused it)."""
    try:
        _match(ep, topk)
    except NoMatch as miss:
        return str(miss)
    return None


def fuse_moe_block(ep) -> int:
    graph, count = ep.graph, 0
    for topk in [n for n in graph.nodes if is_op(n, aten.topk.default)]:
        try:
            m = _match(ep, topk)
        except NoMatch:
            continue
        base = spec_for(ep, m["router"]).target.rsplit(".", 1)[0] + ".experts"   # e.g. ...layers.3.mlp.gate.experts
        stacked = {}
        for proj, which in (("gate", 0), ("up", 1), ("down", 2)):
            nodes = [ex[which] for ex in m["experts"]]
            stacked[f"{proj}_packed"] = _stack(ep, nodes, 1, f"{base}.{proj}_packed")
            stacked[f"{proj}_scale"] = _stack(ep, nodes, 2, f"{base}.{proj}_scale")
        wg, wu, wd = m["shared"]
        args = MoeFfnArgs(x=m["h"], shared_gate=wg, shared_up=wu, shared_down=wd, shared_expert_gate=m["shared_gate"],
                          router=m["router"], **stacked, top_k=int(m["top_k"]), norm_topk_prob=bool(m["renorm"]))
        if m["shared_outside"] is None:
            replace_call(graph, m["output"], torch.ops.mote.moe_ffn.default, args.args())
        else:   # y = shared + moe_ffn(no shared): the quantized shared expert stays as its own ops
            routed = call(graph, torch.ops.mote.moe_ffn.default, args.args(), m["output"])
            replace_call(graph, m["output"], aten.add.Tensor, (m["shared_outside"], routed))
        count += 1
    finish_rewrite(ep)
    return count
