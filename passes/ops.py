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

    mote::dequantize_weight(q i8[out, K], scale f32[out, K/g], bits, group_size) -> f32[out, K]     q * its group's scale
    mote::quantized_linear(x f32[..., K], q i8[out, K], scale f32[out, K/g], bias f32[out]?, bits, group_size)
        -> f32[..., out]                                                 linear(x, dequantize_weight(q, scale)) + bias
    mote::quantized_embedding(tokens i64[...], q i8[V, d], scale f32[V, d/g], bits, group_size) -> f32[..., d]

The quantized ops hold post-training quantized full-precision parts (`--quantize`, `export.quantization`): q are
symmetric integers of `bits` bits (int4 values in int8 storage; a target packs them as its runtime wants), one
fp32 scale per group of `group_size` inputs (group_size = K: per output channel). A `mote.moe_ffn` whose shared
expert is quantized has no shared weights (all None): its shared expert is quantized_linear ops outside it, added
to its output.

Packed trits are the canonical storage of `export.trits` (2-bit codes `trit + 2`, four per byte, lowest bits first
along the input dimension).

The reference kernels call `export.semantics`, the same functions the eager model uses, so a fused op equals the
graph it replaced bit for bit.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mote.export import semantics
from mote.export.trits import ZERO_CODE, pack_trits, unpack, unpack_codes  # noqa: F401  (the storage codec)


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
def moe_ffn(x: torch.Tensor, shared_gate: torch.Tensor | None, shared_up: torch.Tensor | None,
            shared_down: torch.Tensor | None,
            shared_expert_gate: torch.Tensor | None, router: torch.Tensor,
            gate_packed: torch.Tensor, gate_scale: torch.Tensor, up_packed: torch.Tensor, up_scale: torch.Tensor,
            down_packed: torch.Tensor, down_scale: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    d, inter = x.shape[-1], gate_packed.shape[1]

    def expert_output(e):   # decoded only for the experts some row selected (semantics.moe_ffn skips the others)
        return semantics.ternary_expert(x, unpack(gate_packed[e], d), _expert_scale(gate_scale[e]),
                                        unpack(up_packed[e], d), _expert_scale(up_scale[e]),
                                        unpack(down_packed[e], inter), _expert_scale(down_scale[e]))

    return semantics.moe_ffn(x, (shared_gate, shared_up, shared_down), shared_expert_gate,
                             torch.nn.functional.linear(x, router), top_k, norm_topk_prob, expert_output)


def _expert_scale(scale: torch.Tensor) -> torch.Tensor:
    # One scale per tensor is stored as [1]; a 0-d scalar multiplies identically.
    return scale.reshape(()) if scale.numel() == 1 else scale


@moe_ffn.register_fake
def _(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_packed, gate_scale, up_packed,
      up_scale, down_packed, down_scale, top_k, norm_topk_prob):
    return torch.empty_like(x)


# -- post-training quantized full-precision weights --------------------------------------------------------------------

def _check_quantized(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> None:
    torch._check(q.dtype == torch.int8, lambda: "mote: quantized weights must be int8")
    torch._check(bits in (4, 8), lambda: f"mote: {bits}-bit weights are not supported (4 or 8)")
    torch._check(q.shape[-1] % group_size == 0 and scale.shape[-1] * group_size == q.shape[-1],
                 lambda: "mote: quantization scales do not match the weight's groups")


@torch.library.custom_op("mote::dequantize_weight", mutates_args=())
def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    _check_quantized(q, scale, bits, group_size)
    return semantics.dequantize_weight(q, scale, group_size)


@dequantize_weight.register_fake
def _(q, scale, bits, group_size):
    return q.new_empty(q.shape, dtype=torch.float32)


@torch.library.custom_op("mote::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                     group_size: int) -> torch.Tensor:
    _check_quantized(q, scale, bits, group_size)
    return torch.nn.functional.linear(x, semantics.dequantize_weight(q, scale, group_size), bias)


@quantized_linear.register_fake
def _(x, q, scale, bias, bits, group_size):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


@torch.library.custom_op("mote::quantized_embedding", mutates_args=())
def quantized_embedding(tokens: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bits: int,
                        group_size: int) -> torch.Tensor:
    _check_quantized(q, scale, bits, group_size)
    flat = tokens.reshape(-1)    # gather the rows, then dequantize only them: the same values as the whole table's
    rows = semantics.dequantize_weight(q.index_select(0, flat), scale.index_select(0, flat), group_size)
    return rows.reshape(*tokens.shape, q.shape[1])


@quantized_embedding.register_fake
def _(tokens, q, scale, bits, group_size):
    return scale.new_empty((*tokens.shape, q.shape[1]))


@dataclasses.dataclass(frozen=True)
class MoeFfnArgs:
    """The arguments of one `mote.moe_ffn` call, by the names of the op's schema.

    Passes and lowerings read a fused block through this instead of unpacking `node.args` by position:
    `MoeFfnArgs.of(node)` (graph nodes), `MoeFfnArgs(*tensors)` (values), `.replace(...)`, and `.args()` to call the
    op again. The fields are the schema's arguments in order (a unit test holds them equal).
    """

    x: Any
    shared_gate: Any           # the shared expert's three weights: None when it is outside the op (quantized)
    shared_up: Any
    shared_down: Any
    shared_expert_gate: Any    # None without a shared-expert gate (or with the shared expert outside)
    router: Any
    gate_packed: Any
    gate_scale: Any
    up_packed: Any
    up_scale: Any
    down_packed: Any
    down_scale: Any
    top_k: int
    norm_topk_prob: bool

    @classmethod
    def of(cls, node: torch.fx.Node) -> "MoeFfnArgs":
        names = [a.name for a in torch.ops.mote.moe_ffn.default._schema.arguments]
        return cls(**dict(zip(names, node.args)), **node.kwargs)

    def args(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def replace(self, **changes) -> "MoeFfnArgs":
        return dataclasses.replace(self, **changes)

    @property
    def shared(self) -> tuple:
        """(W_gate, W_up, W_down) of the full-precision shared expert."""
        return self.shared_gate, self.shared_up, self.shared_down

    def projections(self, hidden: int, expert_width: int) -> tuple:
        """The routed experts' stacked projections as (name, packed codes [E, rows, ceil(K/4)], scales [E, 1|rows],
        K): gate and up read the hidden state (K = hidden), down reads the expert's activation (K = expert_width)."""
        return (("gate", self.gate_packed, self.gate_scale, hidden), ("up", self.up_packed, self.up_scale, hidden),
                ("down", self.down_packed, self.down_scale, expert_width))

    def routed_operands(self) -> tuple:
        """The routed experts' packed codes and scales (what only this op may read)."""
        return (self.gate_packed, self.gate_scale, self.up_packed, self.up_scale, self.down_packed, self.down_scale)


MOTE_OPS = (torch.ops.mote.unpack_trits.default, torch.ops.mote.ternary_linear.default, torch.ops.mote.moe_ffn.default,
            torch.ops.mote.dequantize_weight.default, torch.ops.mote.quantized_linear.default,
            torch.ops.mote.quantized_embedding.default)
QUANTIZED_OPS = (torch.ops.mote.quantized_linear.default, torch.ops.mote.quantized_embedding.default)
