"""How the `mote::` ops reach ExecuTorch: two decomposition tables, one per `--android-kernels` choice.

FUSED (the default): our kernel library (kernels/) runs the routed experts.

    mote.moe_ffn        -> lowering.split_moe_ffn: the shared expert and the router stay fp32 linears (for XNNPACK),
                           top-k in ATen; the routed experts are one `mote.routed_experts` call on the 2-bit codes
    mote.ternary_linear -> kept: the library's `mote::ternary_linear.out`

PORTABLE (`--android-kernels portable`, for runtimes that cannot link custom kernels): portable ATen ops only.

    mote.moe_ffn        -> lowering.gathered_top_k_moe: the chosen experts' codes are gathered by index_select and
                           decoded once per call
    mote.ternary_linear -> bitlinear(x, _unpack(packed), scale)

In the portable form the 2-bit codes stay packed in the program (4 per byte, `code = trit + 2`) and are decoded per
call by a 256-entry table; activations are quantized exactly as the reference (per-token symmetric int8), and the
integer dot products are exact in fp32, so the numerics are the reference's up to the order of the top-k sum.
Memory and work are bounded by the expert count, not the prompt: a prefill of T tokens decodes each chosen expert
once (at most E of them) and runs the T tokens through it as one matrix product, instead of gathering a decoded copy
of its expert per token (T x k x expert size: 4.5 GB per projection for T = 256 at the Qwen2.5-0.5B shape, which
ExecuTorch's memory plan reserves for the upper bound of T). At decode, U = k: only the chosen experts are read.
The price is prefill compute: each token also runs through the other chosen experts (weight 0), at most E / k times
the routed work; the fused kernel groups tokens by expert instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mote.export import semantics
from mote.passes.ops import MoeFfnArgs
from mote.targets.lowering import (float_moe_ffn, fused_routed_experts, fused_routed_experts_float, gathered_top_k_moe,
                                   grouped_ternary_experts)

from . import ops as _out_variants  # noqa: F401  (the .out overloads the fused form is emitted with)

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


def moe_ffn(*op_args):
    args = MoeFfnArgs(*op_args)
    return gathered_top_k_moe(args.x, args.shared, args.shared_expert_gate, args.router, args.gate_packed.shape[0],
                              args.top_k, args.norm_topk_prob, grouped_ternary_experts(args, _unpack))


def ternary_linear(x, packed, scale, in_features: int):
    return semantics.bitlinear(x, _unpack(packed, in_features), scale)


PORTABLE = {
    torch.ops.mote.moe_ffn.default: moe_ffn,
    torch.ops.mote.ternary_linear.default: ternary_linear,
    # the fp32 baseline (benchmarks only): the same gather structure over float32 expert weights
    torch.ops.mote_bench.moe_ffn_float.default: float_moe_ffn,
}

FUSED = {
    torch.ops.mote.moe_ffn.default: lambda *op_args: fused_routed_experts(MoeFfnArgs(*op_args)),
    torch.ops.mote_bench.moe_ffn_float.default: fused_routed_experts_float,
}

DECOMPOSITIONS = {"fused": FUSED, "portable": PORTABLE}
