"""ExecuTorch lowering of the `mote::` ops into portable ATen ops that read only the chosen experts' 2-bit weights.

    mote.moe_ffn(x, shared..., router, gate/up/down packed [E, rows, K/4] u8 + scales, k, renorm)
      shared  = W_down (silu(W_gate x) * W_up x)  [* sigmoid(w_g x)]            -> XNNPACK (fp32 linears)
      p, i    = topk(softmax(W_r x), k)    [p /= sum p]
      ids     = the experts some token chose (nonzero: U <= E of them, U = k at decode)
      G, U, D = unpack(index_select(gate_packed, 0, ids)), ...      each chosen expert's bytes decoded once
      Y[u, t] = bitlinear(silu(bitlinear(x_t, G_u)) * bitlinear(x_t, U_u), D_u)     every token through every chosen
      y_t     = sum_u P[u, t] Y[u, t],   P[u, t] = sum_j p[t, j] [i[t, j] = ids[u]]     expert, kept where chosen
    mote.ternary_linear(x, packed, scale, K) -> bitlinear(x, unpack(packed), scale)

The 2-bit codes stay packed in the program (4 per byte, `code = trit + 2`) and are decoded per call by a 256-entry
table; activations are quantized exactly as the reference (per-token symmetric int8), and the integer dot products
are exact in fp32, so the numerics are the reference's up to the order of the top-k sum.

Memory and work are bounded by the expert count, not the prompt: a prefill of T tokens decodes each chosen expert
once (at most E of them) and runs the T tokens through it as one matrix product, instead of gathering a decoded copy
of its expert per token (T x k x expert size: 4.5 GB per projection for T = 256 at the Qwen2.5-0.5B shape, which
ExecuTorch's memory plan reserves for the upper bound of T). At decode, U = k: only the chosen experts are read.
The price is prefill compute: each token also runs through the other chosen experts (weight 0), at most E / k times
the routed work; a fused kernel that groups tokens by expert removes it.
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


def _chosen_experts(top_i: torch.Tensor, num_experts: int) -> torch.Tensor:
    """top_i [N, k] -> ids [U] of the experts at least one token chose, ascending (U <= E, data-dependent)."""
    chosen = (top_i.unsqueeze(-1) == torch.arange(num_experts, device=top_i.device)).flatten(0, 1).any(dim=0)
    return torch.nonzero(chosen).view(-1)   # (squeeze would disagree with ExecuTorch on the [U, 1] dim order)


def _grouped_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, num_experts: int, top_k: int,
                 norm_topk_prob: bool, experts):
    """shared(x) + sum_u P[u] * Y[u]: the routing both variants share. `experts(flat, ids)` -> Y [U, N, d], every
    token through each chosen expert, reading only those experts' weights."""
    shared = semantics.swiglu(x, shared_gate, shared_up, shared_down)
    if shared_expert_gate is not None:
        shared = torch.sigmoid(F.linear(x, shared_expert_gate)) * shared
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(F.linear(flat, router), dim=-1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    ids = _chosen_experts(top_i, num_experts)
    # P^T [U, N]: U (data-dependent) stays the leading dim of every tensor, so ExecuTorch can order strides.
    weight = (top_p.unsqueeze(0) * (top_i.unsqueeze(0) == ids.view(-1, 1, 1)).to(top_p.dtype)).sum(dim=-1)
    routed = (weight.unsqueeze(-1) * experts(flat, ids)).sum(dim=0)
    return shared + routed.reshape(x.shape)


def _bitlinear_grouped(q, s_v, trits, scale):
    """Q8 activations q [N, K] or [U, N, K] (scales s_v [.., N, 1]) through U ternary matrices trits [U, out, K]
    with scales [U, 1 or out] -> [U, N, out]: (q . T_u^T) * s_v * s_u, the reference's bitlinear per expert."""
    acc = torch.matmul(q, trits.transpose(1, 2))
    return acc * s_v * scale.unsqueeze(1)


def moe_ffn(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_packed, gate_scale,
            up_packed, up_scale, down_packed, down_scale, top_k: int, norm_topk_prob: bool):
    d, inter = x.shape[-1], gate_packed.shape[1]

    def ternary_experts(flat, ids):
        def decoded(packed, scale, k):
            return _unpack(torch.index_select(packed, 0, ids), k), torch.index_select(scale, 0, ids)

        q, s_v = semantics.quantize_activations(flat)
        h = F.silu(_bitlinear_grouped(q, s_v, *decoded(gate_packed, gate_scale, d))) \
            * _bitlinear_grouped(q, s_v, *decoded(up_packed, up_scale, d))                      # [U, N, I]
        return _bitlinear_grouped(*semantics.quantize_activations(h), *decoded(down_packed, down_scale, inter))

    return _grouped_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_packed.shape[0],
                        top_k, norm_topk_prob, ternary_experts)


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
    def float_experts(flat, ids):
        def proj(v, w):
            return torch.matmul(v, torch.index_select(w, 0, ids).transpose(1, 2))

        return proj(F.silu(proj(flat.unsqueeze(0), gate_w)) * proj(flat.unsqueeze(0), up_w), down_w)

    return _grouped_moe(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w.shape[0], top_k,
                        norm_topk_prob, float_experts)


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
