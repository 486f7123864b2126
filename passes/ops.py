"""The `mote::` ops (DESIGN.md section 4): what the passes produce and every target lowers.

    mote::unpack_trits(packed u8[out, ceil(in/4)], in_features) -> f32[out, in]          values in {-1, 0, 1}
    mote::ternary_linear(x f32[..., in], packed u8[out, ceil(in/4)], scale f32[1|out], in_features) -> f32[..., out]
    mote::moe_ffn(x f32[..., d],
                  shared_gate f32[I_s, d], shared_up f32[I_s, d], shared_down f32[d, I_s], shared_expert_gate f32[1, d]?,
                  router f32[E, d],
                  gate_packed u8[E, I, ceil(d/4)], gate_scale f32[E, 1|I],
                  up_packed   u8[E, I, ceil(d/4)], up_scale   f32[E, 1|I],
                  down_packed u8[E, d, ceil(I/4)], down_scale f32[E, 1|d],
                  top_k, norm_topk_prob) -> f32[..., d]

Canonical packing: 2-bit codes `code = trit + 2` (1, 2, 3 = -1, 0, +1; code 0 is never produced), four per byte,
lowest bits first along the input dimension; the input dimension is zero-padded (code 2) to a multiple of 4.
This is ONNX Runtime's MatMulNBits/QMoE 2-bit layout with its default zero point 2.

The reference kernels call `export.semantics`, the same functions the eager model uses, so a fused op equals the
graph it replaced bit for bit.
"""
from __future__ import annotations

import torch

from mote.export import semantics

ZERO_CODE = 2


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Trits [..., K] (any dtype, values in {-1,0,1}) -> uint8 [..., ceil(K/4)]."""
    codes = (trits.to(torch.int16) + ZERO_CODE).to(torch.uint8)
    k = codes.shape[-1]
    pad = (-k) % 4
    if pad:
        codes = torch.cat([codes, torch.full((*codes.shape[:-1], pad), ZERO_CODE, dtype=torch.uint8)], dim=-1)
    codes = codes.reshape(*codes.shape[:-1], -1, 4)
    return codes[..., 0] | (codes[..., 1] << 2) | (codes[..., 2] << 4) | (codes[..., 3] << 6)


def unpack_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/4)] -> 2-bit codes uint8 [..., K]."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3
    return codes.reshape(*packed.shape[:-1], -1)[..., :k]


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K/4)] -> float32 trits [..., K]."""
    return unpack_codes(packed, k).to(torch.float32) - ZERO_CODE


def _check_packed(packed: torch.Tensor, in_features: int) -> None:
    torch._check(packed.dtype == torch.uint8, lambda: "mote: packed trits must be uint8")
    torch._check(packed.shape[-1] == (in_features + 3) // 4, lambda: "mote: packed trits do not match in_features")


# -- unpack_trits ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mote::unpack_trits", mutates_args=())
def unpack_trits(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    _check_packed(packed, in_features)
    return unpack(packed, in_features)


@unpack_trits.register_fake
def _(packed, in_features):
    return packed.new_empty((*packed.shape[:-1], in_features), dtype=torch.float32)


# -- ternary_linear ----------------------------------------------------------------------------------------------

@torch.library.custom_op("mote::ternary_linear", mutates_args=())
def ternary_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, in_features: int) -> torch.Tensor:
    _check_packed(packed, in_features)
    return semantics.bitlinear(x, unpack(packed, in_features), scale)


@ternary_linear.register_fake
def _(x, packed, scale, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


# -- moe_ffn -------------------------------------------------------------------------------------------------------

@torch.library.custom_op("mote::moe_ffn", mutates_args=())
def moe_ffn(x: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
            shared_expert_gate: torch.Tensor | None, router: torch.Tensor,
            gate_packed: torch.Tensor, gate_scale: torch.Tensor, up_packed: torch.Tensor, up_scale: torch.Tensor,
            down_packed: torch.Tensor, down_scale: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    d, inter = x.shape[-1], gate_packed.shape[1]
    shared = semantics.swiglu(x, shared_gate, shared_up, shared_down)
    if shared_expert_gate is not None:
        shared = torch.sigmoid(torch.nn.functional.linear(x, shared_expert_gate)) * shared
    combine = semantics.route(torch.nn.functional.linear(x, router), top_k, norm_topk_prob)
    experts = [
        (unpack(gate_packed[e], d), _expert_scale(gate_scale[e]), unpack(up_packed[e], d), _expert_scale(up_scale[e]),
         unpack(down_packed[e], inter), _expert_scale(down_scale[e]))
        for e in range(gate_packed.shape[0])
    ]
    return semantics.moe_combine(x, shared, combine, experts)


def _expert_scale(scale: torch.Tensor) -> torch.Tensor:
    # One scale per tensor is stored as [1]; a 0-d scalar multiplies identically.
    return scale.reshape(()) if scale.numel() == 1 else scale


@moe_ffn.register_fake
def _(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_packed, gate_scale, up_packed,
      up_scale, down_packed, down_scale, top_k, norm_topk_prob):
    return torch.empty_like(x)


MOTE_OPS = (torch.ops.mote.unpack_trits.default, torch.ops.mote.ternary_linear.default, torch.ops.mote.moe_ffn.default)
