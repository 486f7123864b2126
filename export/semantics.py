"""The MoTE numerics of DESIGN.md section 1, written once.

The eager reference model (`export.model`) and the reference kernels of the `mote::` ops (`passes.ops`) both call
these functions, so "the fused op equals the reference" holds bit for bit by construction, and a target is compared
against exactly one definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACT_EPS = 1e-5      # clamp of max|v| before computing the per-token activation scale
WEIGHT_EPS = 1e-5   # clamp of mean|W| when ternarising latent weights
Q_MAX = 127.0       # int8 symmetric: round(v * 127 / max|v|), clamped to [-128, 127]
Q_MIN = -128.0


def quantize_activations(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: returns the integer values (as float, exact) and the scale s_v = max|v| / 127."""
    amax = v.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_EPS)
    q = torch.clamp(torch.round(v * (Q_MAX / amax)), Q_MIN, Q_MAX)
    return q, amax / Q_MAX


def ternarize(weight: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmean ternarisation of a latent (QAT) weight [out, in]: trits in {-1,0,1} (float) and the scale.

    The scale has shape [] per tensor or [out, 1] per output channel.
    """
    if per_channel:
        scale = weight.abs().mean(dim=-1, keepdim=True).clamp(min=WEIGHT_EPS)
    else:
        scale = weight.abs().mean().clamp(min=WEIGHT_EPS)
    trits = torch.clamp(torch.round(weight / scale), -1.0, 1.0)
    return trits, scale


def bitlinear(v: torch.Tensor, trits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(Q8(v) . T^T) * s_v * s_w: integer dot product (exact in fp32), then the two scalings.

    `trits` is float [out, in] with values in {-1,0,1}; `scale` is [] or [out, 1].
    """
    q, s_v = quantize_activations(v)
    acc = torch.matmul(q, trits.transpose(0, 1))
    return acc * s_v * _row_scale(scale)


def _row_scale(scale: torch.Tensor) -> torch.Tensor:
    # [out, 1] (per output channel) broadcasts along the output dim as [out]; [] stays a scalar.
    return scale.reshape(-1) if scale.dim() > 0 else scale


def ternary_expert(x, t_gate, s_gate, t_up, s_up, t_down, s_down):
    """expert(x) = bitlinear(silu(bitlinear(x, T_gate)) * bitlinear(x, T_up), T_down)."""
    h = F.silu(bitlinear(x, t_gate, s_gate)) * bitlinear(x, t_up, s_up)
    return bitlinear(h, t_down, s_down)


def swiglu(x, w_gate, w_up, w_down):
    """Full-precision SwiGLU FFN: W_down (silu(W_gate x) * (W_up x))."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """Softmax router + top-k as a dense combine matrix [tokens, E] (zero for unselected experts).

    Dense weights instead of index lists keep the graph free of data-dependent shapes (no nonzero / masks).
    """
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_p)


def moe_combine(x, shared_out, combine, experts):
    """y = shared(x) + sum_e combine[:, e] * expert_e(x), summed in expert order.

    `experts` is a list of (t_gate, s_gate, t_up, s_up, t_down, s_down), or None for an expert no row selected.
    Unselected experts carry weight 0, which adds exact zeros, so the sum equals the sum over the selected experts
    only (in expert-index order), and an expert no row selected can be left out.
    """
    y = shared_out
    for e, weights in enumerate(experts):
        if weights is not None:
            y = y + combine[..., e : e + 1] * ternary_expert(x, *weights)
    return y


def selected_experts(combine: torch.Tensor) -> list[bool]:
    """Per expert: does any row give it a nonzero weight (the experts `moe_combine` needs)."""
    return (combine != 0).flatten(0, -2).any(0).tolist()
