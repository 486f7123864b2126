"""ONNX-side lowering of the `mote::` ops into ONNX Runtime's weight layouts, as an ExportedProgram rewrite.

    mote.moe_ffn(x, shared..., router, gate/up/down packed + scales, k, renorm)
        -> mote_onnx.moe_block(x, shared..., router, fc1_w, fc1_s, fc2_w, fc2_s, k, renorm, block, d, i, d_pad, i_pad)
    mote.ternary_linear(x, packed, scale, in)
        -> mote_onnx.matmul_2bit(x, b, scales, in, in_pad, block)

QMoE wants fc1 = gate and up rows interleaved (row 2j = gate_j, row 2j+1 = up_j) and block-wise scales
[E, rows, K/block]; MatMulNBits wants B [N, K/block, block/4]. Both keep our 2-bit codes (zero point 2) as they are.
A per-row scale becomes the same value in every block. K (and the expert width) are padded with zero trits to a
multiple of 32 when needed: padded inputs are zero and padded weights are zero, so the result is exact.

The replacement ops have eager kernels that dequantize (float activations), so the repacking itself is testable
without ONNX Runtime.
"""
from __future__ import annotations

import torch

from mote.passes.match import is_op
from mote.passes.ops import ZERO_CODE, pack_trits, unpack, unpack_codes
from mote.passes.program import add_constant, call, constant_value, remove_unused_constants, spec_for

MIN_BLOCK, MAX_BLOCK = 32, 512   # QMoE/MatMulNBits block sizes that run at full speed (DESIGN.md section 9)


def padded(k: int) -> int:
    return k if k % MIN_BLOCK == 0 else k + (-k) % MIN_BLOCK


def block_size(*ks: int) -> int:
    """The largest power-of-two block in [32, 512] that divides every (padded) K."""
    b = MAX_BLOCK
    while any(k % b for k in ks):
        b //= 2
    return b


def _pad_codes(codes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Pad the last two dims of a code tensor with the zero code."""
    out = torch.full((*codes.shape[:-2], rows, cols), ZERO_CODE, dtype=torch.uint8)
    out[..., : codes.shape[-2], : codes.shape[-1]] = codes
    return out


def _block_scales(scale: torch.Tensor, rows: int, rows_pad: int, n_blocks: int) -> torch.Tensor:
    """Scales [..., 1 or rows] -> [..., rows_pad, n_blocks] (padded rows get scale 1: their weights are zero)."""
    lead = scale.shape[:-1]
    full = scale.expand(*lead, rows) if scale.shape[-1] == 1 else scale
    out = torch.ones(*lead, rows_pad, n_blocks, dtype=torch.float32)
    out[..., :rows, :] = full.unsqueeze(-1)
    return out


def repack_moe(gate_p, gate_s, up_p, up_s, down_p, down_s, d: int, inter: int):
    """Stacked canonical experts -> QMoE fc1/fc2 (interleaved swiglu, block-wise scales). Returns tensors + block."""
    d_pad, i_pad = padded(d), padded(inter)
    block = block_size(d_pad, i_pad)
    gate = _pad_codes(unpack_codes(gate_p, d), i_pad, d_pad)
    up = _pad_codes(unpack_codes(up_p, d), i_pad, d_pad)
    down = _pad_codes(unpack_codes(down_p, inter), d_pad, i_pad)
    e = gate.shape[0]
    fc1 = torch.empty(e, 2 * i_pad, d_pad, dtype=torch.uint8)
    fc1[:, 0::2], fc1[:, 1::2] = gate, up
    fc1_s = torch.empty(e, 2 * i_pad, d_pad // block)
    fc1_s[:, 0::2] = _block_scales(gate_s, inter, i_pad, d_pad // block)
    fc1_s[:, 1::2] = _block_scales(up_s, inter, i_pad, d_pad // block)
    fc2_s = _block_scales(down_s, d, d_pad, i_pad // block)
    return _pack_codes(fc1), fc1_s, _pack_codes(down), fc2_s, block, d_pad, i_pad


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    return pack_trits(codes.to(torch.int16) - ZERO_CODE)


# -- the ONNX-side ops (eager kernels dequantize; only used to test the repacking) -------------------------------

def _dequant(packed, scales, k_pad, block):
    w = unpack(packed, k_pad)
    return w * scales.repeat_interleave(block, dim=-1)


@torch.library.custom_op("mote_onnx::moe_block", mutates_args=())
def moe_block(x: torch.Tensor, shared_gate: torch.Tensor, shared_up: torch.Tensor, shared_down: torch.Tensor,
              shared_expert_gate: torch.Tensor | None, router: torch.Tensor, fc1_w: torch.Tensor, fc1_s: torch.Tensor,
              fc2_w: torch.Tensor, fc2_s: torch.Tensor, top_k: int, norm_topk_prob: bool, block: int, d: int,
              inter: int, d_pad: int, i_pad: int) -> torch.Tensor:
    from mote.export import semantics

    shared = semantics.swiglu(x, shared_gate, shared_up, shared_down)
    if shared_expert_gate is not None:
        shared = torch.sigmoid(torch.nn.functional.linear(x, shared_expert_gate)) * shared
    combine = semantics.route(torch.nn.functional.linear(x, router), top_k, norm_topk_prob)
    xp = torch.nn.functional.pad(x, (0, d_pad - d))
    y = shared
    for e in range(fc1_w.shape[0]):
        w1 = _dequant(fc1_w[e], fc1_s[e], d_pad, block)
        w2 = _dequant(fc2_w[e], fc2_s[e], i_pad, block)
        h = torch.nn.functional.linear(xp, w1)
        out = torch.nn.functional.linear(torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2], w2)[..., :d]
        y = y + combine[..., e : e + 1] * out
    return y


@moe_block.register_fake
def _(x, *args):
    return torch.empty_like(x)


@torch.library.custom_op("mote_onnx::matmul_2bit", mutates_args=())
def matmul_2bit(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, k: int, k_pad: int, block: int) -> torch.Tensor:
    w = _dequant(b.reshape(b.shape[0], -1), scales, k_pad, block)
    return torch.nn.functional.linear(torch.nn.functional.pad(x, (0, k_pad - k)), w)


@matmul_2bit.register_fake
def _(x, b, scales, k, k_pad, block):
    return x.new_empty((*x.shape[:-1], b.shape[0]))


def lower_to_ort_layouts(ep) -> int:
    """Rewrite the program's mote:: ops into the mote_onnx:: ops above. Returns the number of routed-expert weights
    (trits) of the mote.moe_ffn ops it lowered; what they cost is read from the written file (see report.py)."""
    graph = ep.graph
    routed_weights = 0
    for node in list(graph.nodes):
        if is_op(node, torch.ops.mote.moe_ffn.default):
            x, sg, su, sd, seg, router, gp, gs, up, us, dp, ds, k, renorm = node.args
            vals = [constant_value(ep, n) for n in (gp, gs, up, us, dp, ds)]
            d, inter = x.meta["val"].shape[-1], vals[0].shape[1]
            fc1, fc1_s, fc2, fc2_s, block, d_pad, i_pad = repack_moe(*vals, d=d, inter=inter)
            base = spec_for(ep, gp).target.rsplit(".", 1)[0]
            consts = [add_constant(ep, f"{base}.ort_{n}", t) for n, t in
                      (("fc1_w", fc1), ("fc1_s", fc1_s), ("fc2_w", fc2), ("fc2_s", fc2_s))]
            new = call(graph, torch.ops.mote_onnx.moe_block.default,
                       (x, sg, su, sd, seg, router, *consts, k, renorm, block, d, inter, d_pad, i_pad), node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            routed_weights += 3 * vals[0].shape[0] * d * inter
        elif is_op(node, torch.ops.mote.ternary_linear.default):
            x, packed, scale, k = node.args
            p, s = constant_value(ep, packed), constant_value(ep, scale)
            n_out, k_pad = p.shape[0], padded(k)
            block = block_size(k_pad)
            codes = _pad_codes(unpack_codes(p, k), n_out, k_pad)
            b = _pack_codes(codes).reshape(n_out, k_pad // block, block // 4)
            scales = _block_scales(s.reshape(1, -1) if s.numel() > 1 else s.reshape(1, 1), n_out, n_out, k_pad // block)[0]
            base = spec_for(ep, packed).target
            consts = [add_constant(ep, f"{base}.ort_b", b), add_constant(ep, f"{base}.ort_scales", scales)]
            new = call(graph, torch.ops.mote_onnx.matmul_2bit.default, (x, *consts, k, k_pad, block), node)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif is_op(node, torch.ops.mote.unpack_trits.default):
            raise RuntimeError("onnx: an unfused mote.unpack_trits reached the target (the pass pipeline did not run)")
    graph.eliminate_dead_code()
    remove_unused_constants(ep)
    ep.graph_module.recompile()
    return routed_weights
