"""Lowering helpers more than one target needs, written once (the target contract is in `base.py`).

- Reading the fused op: `MoeFfnArgs` (in `passes.ops`) names a `mote.moe_ffn` call's arguments;
  `moe_nodes` finds them; `routed_expert_weights` counts what a program's routed experts hold.
- The gathered-top-k decomposition of `mote.moe_ffn` into ATen ops that read only the chosen experts:

      shared  = semantics.shared_expert(x)                              [* sigmoid(w_g x)]
      p, i    = semantics.route_top_k(W_r x, k)                         [p /= sum p]
      ids     = the experts some token chose (U <= E of them, U = k at decode)   `chosen_experts`
      Y[u]    = expert_ids[u](every token), from the gathered weights of those U experts   `grouped_ternary_experts`
      y_t     = shared_t + sum_u P[u, t] Y[u, t],  P[u, t] = sum_j p[t, j] [i[t, j] = ids[u]]   `gathered_top_k_moe`

  Each chosen expert's weights are read (and decoded) once per call, however long the prompt: memory is bounded by
  the expert count, not by T x k expert copies. A target supplies how its packed codes are decoded.
- The split of `mote.moe_ffn` for runtimes that run our kernel library: shared expert and router in ATen ops around
  one `mote.routed_experts` call (`split_moe_ffn`, `fused_routed_experts`); the op's reference kernel is the
  section 1 formula over the experts the tokens chose.
- Padding and block packing of 2-bit codes for block-wise kernels (ONNX Runtime's QMoE / MatMulNBits, and any kernel
  that wants K a multiple of 32): `padded`, `block_size`, `pad_codes`, `block_scales`, `pack_codes`.
- The benchmark's fp32-expert baseline (never a deployment artifact): `use_float_experts` rewrites each
  `mote.moe_ffn` into `mote_bench.moe_ffn_float` over `dequantized_experts` (float32 [E, rows, K]);
  `float_moe_ffn` is its gathered-top-k decomposition, `fused_routed_experts_float` its split around
  `mote_bench.routed_experts_float`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mote.export import semantics
from mote.passes.match import is_op
from mote.passes.ops import ZERO_CODE, MoeFfnArgs, pack_trits, unpack
from mote.passes.program import add_constant, constant_value, finish_rewrite, replace_call, spec_for

MIN_BLOCK, MAX_BLOCK = 32, 512   # block sizes of ONNX Runtime's 2-bit kernels that run at full speed (DESIGN.md section 9)


# -- reading and replacing the fused op ------------------------------------------------------------------------------

def moe_nodes(ep) -> list[tuple[torch.fx.Node, MoeFfnArgs]]:
    """The program's mote.moe_ffn nodes with their arguments by name."""
    return [(n, MoeFfnArgs.of(n)) for n in ep.graph.nodes if is_op(n, torch.ops.mote.moe_ffn.default)]


def moe_dims(ep, args: MoeFfnArgs) -> tuple[int, int, int]:
    """(E experts, hidden size d, expert width I) of one fused block."""
    experts, width = constant_value(ep, args.gate_packed).shape[:2]
    return experts, args.x.meta["val"].shape[-1], width


def routed_expert_weights(ep) -> int:
    """The number of routed-expert weights (trits) of the program's mote.moe_ffn ops: 3 matrices of I x d each."""
    total = 0
    for _, args in moe_nodes(ep):
        experts, d, width = moe_dims(ep, args)
        total += 3 * experts * d * width
    return total


# -- the gathered-top-k decomposition ---------------------------------------------------------------------------------

def chosen_experts(top_i: torch.Tensor, num_experts: int) -> torch.Tensor:
    """top_i [N, k] -> ids [U] of the experts at least one token chose, ascending (U <= E, data-dependent)."""
    chosen = (top_i.unsqueeze(-1) == torch.arange(num_experts, device=top_i.device)).flatten(0, 1).any(dim=0)
    return torch.nonzero(chosen).view(-1)   # (squeeze would disagree with ExecuTorch on the [U, 1] dim order)


def gathered_top_k_moe(x, shared, shared_expert_gate, router, num_experts: int, top_k: int, norm_topk_prob: bool,
                       experts):
    """shared(x) + sum_u P[u] * Y[u]. `experts(flat, ids)` -> Y [U, N, d]: every token through each chosen expert,
    reading only those experts' weights."""
    shared_out = semantics.shared_expert(x, *shared, shared_expert_gate)
    flat = x.reshape(-1, x.shape[-1])
    _, top_p, top_i = semantics.route_top_k(F.linear(flat, router), top_k, norm_topk_prob)
    ids = chosen_experts(top_i, num_experts)
    # P^T [U, N]: U (data-dependent) stays the leading dim of every tensor, so ExecuTorch can order strides.
    weight = (top_p.unsqueeze(0) * (top_i.unsqueeze(0) == ids.view(-1, 1, 1)).to(top_p.dtype)).sum(dim=-1)
    routed = (weight.unsqueeze(-1) * experts(flat, ids)).sum(dim=0).reshape(x.shape)
    return routed if shared_out is None else shared_out + routed   # None: the shared expert is outside (quantized)


def grouped_bitlinear(q, s_v, trits, scale):
    """Q8 activations q [N, K] or [U, N, K] (scales s_v [.., N, 1]) through U ternary matrices trits [U, out, K]
    with scales [U, 1 or out] -> [U, N, out]: (q . T_u^T) * s_v * s_u, the reference's bitlinear per expert."""
    acc = torch.matmul(q, trits.transpose(1, 2))
    return acc * s_v * scale.unsqueeze(1)


def grouped_ternary_experts(args: MoeFfnArgs, decode):
    """`experts(flat, ids)` for `gathered_top_k_moe` over the op's packed experts: the reference's ternary expert
    (DESIGN.md section 1) on the gathered experts. `decode(packed [U, rows, ceil(K/4)], K)` -> trits [U, rows, K] is
    the target's way of decoding 2-bit codes."""
    d, width = args.x.shape[-1], args.gate_packed.shape[1]
    (_, gate_p, gate_s, _), (_, up_p, up_s, _), (_, down_p, down_s, _) = args.projections(d, width)

    def experts(flat, ids):
        def gathered(packed, scale, k):
            return decode(torch.index_select(packed, 0, ids), k), torch.index_select(scale, 0, ids)

        q, s_v = semantics.quantize_activations(flat)
        h = F.silu(grouped_bitlinear(q, s_v, *gathered(gate_p, gate_s, d))) \
            * grouped_bitlinear(q, s_v, *gathered(up_p, up_s, d))                                  # [U, N, I]
        return grouped_bitlinear(*semantics.quantize_activations(h), *gathered(down_p, down_s, width))

    return experts


# -- the routed experts as one op (for targets whose runtime runs our kernel library) --------------------------------

@torch.library.custom_op("mote::routed_experts", mutates_args=())
def routed_experts(x: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor, gate_packed: torch.Tensor,
                   gate_scale: torch.Tensor, up_packed: torch.Tensor, up_scale: torch.Tensor, down_packed: torch.Tensor,
                   down_scale: torch.Tensor) -> torch.Tensor:
    """x [N, d] -> sum over each token's chosen experts (top_i [N, k], weights top_p [N, k]) of p * expert(x): the
    routed half of `mote.moe_ffn` (`split_moe_ffn` computes the other half around it), summed from zero in expert
    order as `semantics.moe_combine` does."""
    d, width = x.shape[-1], gate_packed.shape[1]

    def expert_output(e):
        return semantics.ternary_expert(x, unpack(gate_packed[e], d), _scalar_if_one(gate_scale[e]),
                                        unpack(up_packed[e], d), _scalar_if_one(up_scale[e]),
                                        unpack(down_packed[e], width), _scalar_if_one(down_scale[e]))

    return _routed_sum(x, top_p, top_i, gate_packed.shape[0], expert_output)


@routed_experts.register_fake
def _(x, *args):
    return torch.empty_like(x)


def _scalar_if_one(scale: torch.Tensor) -> torch.Tensor:
    return scale.reshape(()) if scale.numel() == 1 else scale


def _routed_sum(x, top_p, top_i, num_experts: int, expert_output):
    combine = torch.zeros(x.shape[0], num_experts, dtype=x.dtype).scatter(-1, top_i, top_p)
    return semantics.moe_combine(torch.zeros_like(x), combine, expert_output, semantics.selected_experts(combine))


def split_moe_ffn(args: MoeFfnArgs, routed):
    """`mote.moe_ffn` as shared expert and router in ATen ops (a target's dense kernels take them) around one call
    `routed(flat x [N, d], top_p [N, k], top_i [N, k])` of the routed experts:

        y = shared_expert(x) + routed(x, route_top_k(W_r x))
    """
    shared_out = semantics.shared_expert(args.x, *args.shared, args.shared_expert_gate)
    flat = args.x.reshape(-1, args.x.shape[-1])
    _, top_p, top_i = semantics.route_top_k(F.linear(flat, args.router), args.top_k, args.norm_topk_prob)
    out = routed(flat, top_p, top_i).reshape(args.x.shape)
    return out if shared_out is None else shared_out + out   # None: the shared expert is outside (quantized)


def fused_routed_experts(args: MoeFfnArgs):
    """`split_moe_ffn` with `mote.routed_experts` over the op's packed experts."""
    return split_moe_ffn(args, lambda flat, top_p, top_i: torch.ops.mote.routed_experts(
        flat, top_p, top_i, *args.routed_operands()))


# -- the benchmark's fp32-expert baseline ------------------------------------------------------------------------

def dequantized_experts(packed: torch.Tensor, scale: torch.Tensor, k: int) -> torch.Tensor:
    """Stacked packed codes [E, rows, ceil(K/4)] and scales [E, 1|rows] -> fp32 weights [E, rows, K]."""
    return (unpack(packed, k) * scale.unsqueeze(-1)).contiguous()


@torch.library.custom_op("mote_bench::moe_ffn_float", mutates_args=())
def moe_ffn_float(x: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
                  shared_expert_gate: torch.Tensor | None, router: torch.Tensor, gate_w: torch.Tensor,
                  up_w: torch.Tensor, down_w: torch.Tensor, top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    return float_moe_ffn(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w, down_w,
                         top_k, norm_topk_prob)


@moe_ffn_float.register_fake
def _(x, *args):
    return torch.empty_like(x)


def float_moe_ffn(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w, down_w,
                  top_k: int, norm_topk_prob: bool):
    """`gathered_top_k_moe` over float32 experts [E, rows, K]: the chosen experts' weights gathered, plain SwiGLU."""
    def float_experts(flat, ids):
        def proj(v, w):
            return torch.matmul(v, torch.index_select(w, 0, ids).transpose(1, 2))

        return proj(F.silu(proj(flat.unsqueeze(0), gate_w)) * proj(flat.unsqueeze(0), up_w), down_w)

    return gathered_top_k_moe(x, (shared_gate, shared_up, shared_down), shared_expert_gate, router, gate_w.shape[0],
                              top_k, norm_topk_prob, float_experts)


@torch.library.custom_op("mote_bench::routed_experts_float", mutates_args=())
def routed_experts_float(x: torch.Tensor, top_p: torch.Tensor, top_i: torch.Tensor, gate_w: torch.Tensor,
                         up_w: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    """`mote.routed_experts` over float32 experts [E, rows, K] (plain SwiGLU): the baseline's routed half."""
    def expert_output(e):
        return semantics.swiglu(x, gate_w[e], up_w[e], down_w[e])

    return _routed_sum(x, top_p, top_i, gate_w.shape[0], expert_output)


@routed_experts_float.register_fake
def _(x, *args):
    return torch.empty_like(x)


def fused_routed_experts_float(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, gate_w, up_w,
                               down_w, top_k: int, norm_topk_prob: bool):
    """`mote_bench.moe_ffn_float` as `split_moe_ffn` around `mote_bench.routed_experts_float`."""
    args = MoeFfnArgs(x, shared_gate, shared_up, shared_down, shared_expert_gate, router, None, None, None, None, None,
                      None, top_k, norm_topk_prob)
    return split_moe_ffn(args, lambda flat, top_p, top_i: torch.ops.mote_bench.routed_experts_float(
        flat, top_p, top_i, gate_w, up_w, down_w))


def use_float_experts(ep) -> None:
    """Rewrite each mote.moe_ffn into mote_bench.moe_ffn_float with dequantized fp32 expert weights (in place)."""
    for node, args in moe_nodes(ep):
        _, d, width = moe_dims(ep, args)
        base = spec_for(ep, args.gate_packed).target.rsplit(".", 1)[0]
        weights = [add_constant(ep, f"{base}.{name}_fp32", dequantized_experts(constant_value(ep, packed),
                                                                               constant_value(ep, scale), k))
                   for name, packed, scale, k in args.projections(d, width)]
        replace_call(ep.graph, node, torch.ops.mote_bench.moe_ffn_float.default,
                     (args.x, *args.shared, args.shared_expert_gate, args.router, *weights, args.top_k,
                      args.norm_topk_prob))
    finish_rewrite(ep)


# -- padding and block packing ------------------------------------------------------------------------------------------

def padded(k: int) -> int:
    """K rounded up to a multiple of MIN_BLOCK (padded inputs and weights are zero, so results are exact)."""
    return k if k % MIN_BLOCK == 0 else k + (-k) % MIN_BLOCK


def block_size(*ks: int) -> int:
    """The largest power-of-two block in [MIN_BLOCK, MAX_BLOCK] that divides every (padded) K."""
    b = MAX_BLOCK
    while any(k % b for k in ks):
        b //= 2
    return b


def pad_codes(codes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad the last two dims of a code tensor with the zero code."""
    out = torch.full((*codes.shape[:-2], rows, cols), ZERO_CODE, dtype=torch.uint8)
    out[..., : codes.shape[-2], : codes.shape[-1]] = codes
    return out


def block_scales(scale: torch.Tensor, rows: int, rows_pad: int, n_blocks: int) -> torch.Tensor:
    """Scales [..., 1 or rows] -> [..., rows_pad, n_blocks] (padded rows get scale 1: their weights are zero)."""
    lead = scale.shape[:-1]
    full = scale.expand(*lead, rows) if scale.shape[-1] == 1 else scale
    out = torch.ones(*lead, rows_pad, n_blocks, dtype=torch.float32)
    out[..., :rows, :] = full.unsqueeze(-1)
    return out


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """2-bit codes (trit + 2) [..., K] -> the canonical packed bytes [..., K/4]."""
    return pack_trits(codes.to(torch.int16) - ZERO_CODE)
