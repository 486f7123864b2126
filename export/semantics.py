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


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric post-training quantization of a full-precision weight [out, K] (DESIGN.md section 4), round to
    nearest: per group of `group_size` consecutive inputs of one output row (group_size = K: per output channel),
    s = max(|w_group|_inf, 1e-5) / (2^(bits-1) - 1) and q = clamp(round(w / s), -2^(bits-1), 2^(bits-1) - 1).

    Returns q (int8 [out, K], int4 values in int8 storage) and the scales (float32 [out, K / group_size]).
    The largest magnitude of a group maps to +-(2^(bits-1) - 1), so -2^(bits-1) is never produced (zero point 0:
    the stored codes are q + 2^(bits-1), ONNX Runtime's MatMulNBits default zero point).
    """
    out, k = weight.shape
    qmax = 2 ** (bits - 1) - 1
    grouped = weight.reshape(out, k // group_size, group_size).to(torch.float32)
    scale = grouped.abs().amax(dim=-1, keepdim=True).clamp(min=WEIGHT_EPS) / qmax
    q = torch.clamp(torch.round(grouped / scale), -qmax - 1, qmax).to(torch.int8)
    return q.reshape(out, k), scale.reshape(out, k // group_size)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """q [out, K] (integers) * its group's scale [out, K / group_size] -> float32 [out, K]."""
    out, k = q.shape
    w = q.to(torch.float32)     # scaled in place: one float copy of the matrix, not two (the reference at 3B)
    w.view(out, k // group_size, group_size).mul_(scale.unsqueeze(-1))
    return w


def swiglu(x, w_gate, w_up, w_down):
    """Full-precision SwiGLU FFN: W_down (silu(W_gate x) * (W_up x))."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def shared_expert(x, w_gate, w_up, w_down, w_shared_gate=None):
    """The full-precision shared expert: swiglu(x), times sigmoid(w_g . x) where the model has a shared-expert gate
    (Qwen2-MoE). None without its weights: a fused block whose shared expert is computed outside it (quantized
    weights, see `passes.fuse_moe_block`)."""
    if w_gate is None:
        return None
    out = swiglu(x, w_gate, w_up, w_down)
    if w_shared_gate is not None:
        out = torch.sigmoid(F.linear(x, w_shared_gate)) * out
    return out


def route_top_k(logits: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Softmax router + top-k: (probs [.., E], top_p [.., k], top_i [.., k]); top_p renormalised to sum 1 if asked."""
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
    return probs, top_p, top_i


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """`route_top_k` as a dense combine matrix [tokens, E] (zero for unselected experts).

    Dense weights instead of index lists keep the graph free of data-dependent shapes (no nonzero / masks).
    """
    probs, top_p, top_i = route_top_k(logits, top_k, norm_topk_prob)
    return torch.zeros_like(probs).scatter(-1, top_i, top_p)


def moe_combine(shared_out, combine, expert_output, selected=None):
    """y = shared(x) + sum_e combine[:, e] * expert_e(x), summed in expert order.

    `expert_output(e)` computes expert e's output for all rows. With `selected` (see `selected_experts`), experts no
    row selected are left out: they carry weight 0 and would add exact zeros, so the sum equals the sum over the
    selected experts only (in expert-index order).
    """
    y = shared_out
    for e in range(combine.shape[-1]):
        if selected is None or selected[e]:
            y = y + combine[..., e : e + 1] * expert_output(e)
    return y


def selected_experts(combine: torch.Tensor) -> list[bool]:
    """Per expert: does any row give it a nonzero weight (the experts `moe_combine` needs)."""
    return (combine != 0).flatten(0, -2).any(0).tolist()


def moe_ffn(x, shared, w_shared_gate, router_logits, top_k: int, norm_topk_prob: bool, expert_output,
            skip_unselected: bool = True):
    """The MoTE block (DESIGN.md section 1): y = shared_expert(x) + sum_{e in top-k(x)} g_e(x) * expert_e(x).

    `shared` = (W_gate, W_up, W_down) of the shared expert, `router_logits` = W_r x, `expert_output(e)` = expert e
    on every row of x (however a kernel stores it). `skip_unselected` leaves out experts no row chose (eager only:
    a traced graph must not branch on data).
    """
    shared_out = shared_expert(x, *shared, w_shared_gate)
    if shared_out is None:      # the shared expert is added outside the block: the routed sum starts from zero
        shared_out = torch.zeros_like(x)
    combine = route(router_logits, top_k, norm_topk_prob)
    selected = selected_experts(combine) if skip_unselected else None
    return moe_combine(shared_out, combine, expert_output, selected)
