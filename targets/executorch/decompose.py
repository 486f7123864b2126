"""ExecuTorch lowering of the `mote::` ops into portable ATen ops that read only the selected experts' 2-bit weights.

    mote.moe_ffn(x, shared..., router, gate/up/down packed [E, rows, K/4] u8 + scales, k, renorm)
      shared  = W_down (silu(W_gate x) * W_up x)  [* sigmoid(w_g x)]            -> XNNPACK (fp32 linears)
      p, i    = topk(softmax(W_r x), k)    [p /= sum p]
      for each token t and slot j:  e = i[t, j]
        G, U, D = unpack(index_select(gate_packed, 0, e)), ...                  only the chosen experts' bytes
        y_t    += p[t, j] * bitlinear(silu(bitlinear(x_t, G)) * bitlinear(x_t, U), D)
    mote.ternary_linear(x, packed, scale, K) -> bitlinear(x, unpack(packed), scale)

The 2-bit codes stay packed in the program (4 per byte, `code = trit + 2`) and are decoded per call with shifts and
masks; activations are quantized exactly as the reference (per-token symmetric int8), and the integer dot products
are exact in fp32, so the numerics are the reference's up to the order of the top-k sum.

Prefill gathers one copy of the chosen experts' decoded weights per token (memory grows with T * k * expert size);
a production kernel would group tokens by expert. At decode (T = 1) exactly k experts are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mote.export import semantics

_SHIFTS = (0, 2, 4, 6)


def _byte_to_trits(device) -> torch.Tensor:
    """[256, 4] float: the four trits (lowest bits first) each packed byte stands for.

    Built from arange inside the graph (1024 elements, negligible) rather than as a lifted constant tensor.
    """
    byte = torch.arange(256, dtype=torch.int64, device=device)
    codes = torch.stack([torch.bitwise_and(torch.bitwise_right_shift(byte, s), 3) for s in _SHIFTS], dim=-1)
    return codes.to(torch.float32) - 2.0


def _unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/4)] -> float trits [..., K]: one table lookup per byte (an embedding gather), which runs
    as a single portable kernel instead of four shift/mask passes and a stack."""
    trits = F.embedding(packed.to(torch.int64), _byte_to_trits(packed.device))
    trits = trits.reshape(*packed.shape[:-1], packed.shape[-1] * 4)
    return trits[..., :k] if k != packed.shape[-1] * 4 else trits


def _bitlinear_batched(v, trits, scale):
    """v [N, K], trits [N, out, K], scale [N, 1 or out] -> [N, out]: Q8(v) . T^T * s_v * s_w per row."""
    q, s_v = semantics.quantize_activations(v)
    acc = torch.bmm(trits, q.unsqueeze(-1)).squeeze(-1)
    return acc * s_v * scale


def _gathered_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, top_k: int,
                  norm_topk_prob: bool, expert):
    """shared(x) + sum_j p_j * expert(x_flat, e_j): the routing both variants share; `expert` reads expert e's
    weights with index_select, so only the top-k experts are touched."""
    shared = semantics.swiglu(x, shared_gate, shared_up, shared_down)
    if shared_expert_gate is not None:
        shared = torch.sigmoid(F.linear(x, shared_expert_gate)) * shared
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(F.linear(flat, router), dim=-1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    routed = torch.zeros_like(flat)
    for j in range(top_k):
        routed = routed + top_p[:, j : j + 1] * expert(flat, top_i[:, j])
    return shared + routed.reshape(x.shape)


def moe_ffn(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_packed, gate_scale,
            up_packed, up_scale, down_packed, down_scale, top_k: int, norm_topk_prob: bool):
    d, inter = x.shape[-1], gate_packed.shape[1]

    def ternary_expert(flat, e):
        def proj(v, packed, scale, k):
            return _bitlinear_batched(v, _unpack(torch.index_select(packed, 0, e), k), torch.index_select(scale, 0, e))

        h = F.silu(proj(flat, gate_packed, gate_scale, d)) * proj(flat, up_packed, up_scale, d)
        return proj(h, down_packed, down_scale, inter)

    return _gathered_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, top_k, norm_topk_prob,
                         ternary_expert)


def ternary_linear(x, packed, scale, in_features: int):
    return semantics.bitlinear(x, _unpack(packed, in_features), scale)


DECOMPOSITIONS = {
    torch.ops.mote.moe_ffn.default: moe_ffn,
    torch.ops.mote.ternary_linear.default: ternary_linear,
}


# -- fp32 baseline (benchmarks only): the same gather structure over float32 expert weights ------------------------

@torch.library.custom_op("mote_et::moe_ffn_float", mutates_args=())
def moe_ffn_float(x: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
                  shared_expert_gate: torch.Tensor | None, router: torch.Tensor, gate_w: torch.Tensor,
                  up_w: torch.Tensor, down_w: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    return _moe_ffn_float(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w, down_w,
                          top_k, norm_topk_prob)


@moe_ffn_float.register_fake
def _(x, *args):
    return torch.empty_like(x)


def _moe_ffn_float(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w, down_w,
                   top_k: int, norm_topk_prob: bool):
    def float_expert(flat, e):
        def proj(v, w):
            return torch.bmm(torch.index_select(w, 0, e), v.unsqueeze(-1)).squeeze(-1)

        return proj(F.silu(proj(flat, gate_w)) * proj(flat, up_w), down_w)

    return _gathered_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, top_k, norm_topk_prob,
                         float_expert)


DECOMPOSITIONS[torch.ops.mote_et.moe_ffn_float.default] = _moe_ffn_float


def use_float_experts(ep) -> None:
    """Rewrite each mote.moe_ffn into mote_et.moe_ffn_float with dequantized fp32 expert weights (in place)."""
    from mote.passes.match import is_op
    from mote.passes.ops import unpack
    from mote.passes.program import add_constant, call, constant_value, remove_unused_constants, spec_for

    for node in list(ep.graph.nodes):
        if not is_op(node, torch.ops.mote.moe_ffn.default):
            continue
        x, sg, su, sd, seg, router, gp, gs, upk, us, dp, ds, k, renorm = node.args
        d, inter = x.meta["val"].shape[-1], constant_value(ep, gp).shape[1]
        base = spec_for(ep, gp).target.rsplit(".", 1)[0]
        weights = []
        for name, packed, scale, k_in in (("gate", gp, gs, d), ("up", upk, us, d), ("down", dp, ds, inter)):
            w = unpack(constant_value(ep, packed), k_in) * constant_value(ep, scale).unsqueeze(-1)
            weights.append(add_constant(ep, f"{base}.{name}_fp32", w.contiguous()))
        new = call(ep.graph, torch.ops.mote_et.moe_ffn_float.default, (x, sg, su, sd, seg, router, *weights, k, renorm), node)
        node.replace_all_uses_with(new)
        ep.graph.erase_node(node)
    remove_unused_constants(ep)
    ep.graph_module.recompile()
