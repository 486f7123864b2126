"""ONNX-side lowering of the `mote::` ops into ONNX Runtime's weight layouts, as an ExportedProgram rewrite.

    mote.moe_ffn(x, shared..., router, gate/up/down packed + scales, k, renorm)
        -> mote_onnx.moe_block(x, shared..., router, fc1_w, fc1_s, fc2_w, fc2_s, k, renorm, block, d, i, d_pad, i_pad)
       (shared... all None: the shared expert was quantized and is computed outside the block)
    mote.ternary_linear(x, packed, scale, in)
        -> mote_onnx.matmul_2bit(x, b, scales, in, in_pad, block)
    mote.quantized_linear(x, q i8[N, K], scale [N, K/g], bias?, bits, g)
        -> mote_onnx.matmul_nbits(x, b u8[N, K/block, block*bits/8], scales [N, K/block], bias?, K, bits, block)
    mote.quantized_embedding(tokens, q i8[V, d], scale [V, d/g], bits, g)
        -> mote_onnx.gather_block_quantized(tokens, data u8[V, d*bits/8], scales [V, d/block], bits, block)

QMoE wants fc1 = gate and up rows interleaved (row 2j = gate_j, row 2j+1 = up_j) and block-wise scales
[E, rows, K/block]; MatMulNBits wants B [N, K/block, block/4]. Both keep our 2-bit codes (zero point 2) as they are.
A per-row scale becomes the same value in every block. K (and the expert width) are padded with zero trits to a
multiple of 32 when needed: padded inputs are zero and padded weights are zero, so the result is exact.

Post-training quantized weights (`--quantize`) become ORT's MatMulNBits / GatherBlockQuantized layout: codes
q + 2^(bits-1) (the ops' default zero point, so none is stored), two per byte low nibble first for 4 bits. A group
of 32..256 is the block; one group spanning K (per output channel) is one block of the next power of two >= K,
whose codes past K are the zero point (ORT reads ceil(K / block) blocks: no padding of the activations).

The replacement ops have eager kernels that dequantize (float activations), so the repacking itself is testable
without ONNX Runtime.
"""
from __future__ import annotations

import torch

from mote.passes.match import is_op
from mote.passes.ops import unpack, unpack_codes
from mote.passes.program import add_constant, constant_value, finish_rewrite, replace_call, spec_for
from mote.targets.lowering import (block_scales, block_size, moe_dims, moe_nodes, pack_codes, pad_codes, padded,
                                   routed_expert_weights)

def repack_moe(gate_p, gate_s, up_p, up_s, down_p, down_s, d: int, inter: int):
    """Stacked canonical experts -> QMoE fc1/fc2 (interleaved swiglu, block-wise scales). Returns tensors + block."""
    d_pad, i_pad = padded(d), padded(inter)
    block = block_size(d_pad, i_pad)
    gate = pad_codes(unpack_codes(gate_p, d), i_pad, d_pad)
    up = pad_codes(unpack_codes(up_p, d), i_pad, d_pad)
    down = pad_codes(unpack_codes(down_p, inter), d_pad, i_pad)
    e = gate.shape[0]
    fc1 = torch.empty(e, 2 * i_pad, d_pad, dtype=torch.uint8)
    fc1[:, 0::2], fc1[:, 1::2] = gate, up
    fc1_s = torch.empty(e, 2 * i_pad, d_pad // block)
    fc1_s[:, 0::2] = block_scales(gate_s, inter, i_pad, d_pad // block)
    fc1_s[:, 1::2] = block_scales(up_s, inter, i_pad, d_pad // block)
    fc2_s = block_scales(down_s, d, d_pad, i_pad // block)
    return pack_codes(fc1), fc1_s, pack_codes(down), fc2_s, block, d_pad, i_pad


# -- the ONNX-side ops (eager kernels dequantize; only used to test the repacking) -------------------------------

def _dequant(packed, scales, k_pad, block):
    w = unpack(packed, k_pad)
    return w * scales.repeat_interleave(block, dim=-1)


@torch.library.custom_op("mote_onnx::moe_block", mutates_args=())
def moe_block(x: torch.Tensor, shared_gate: torch.Tensor | None, shared_up: torch.Tensor | None,
              shared_down: torch.Tensor | None, shared_expert_gate: torch.Tensor | None, router: torch.Tensor,
              fc1_w: torch.Tensor, fc1_s: torch.Tensor, fc2_w: torch.Tensor, fc2_s: torch.Tensor, top_k: int,
              norm_topk_prob: bool, block: int, d: int, inter: int, d_pad: int, i_pad: int) -> torch.Tensor:
    from mote.export import semantics

    xp = torch.nn.functional.pad(x, (0, d_pad - d))

    def expert_output(e):   # the interleaved swiglu of QMoE's fc1, then fc2, on dequantized block-wise weights
        h = torch.nn.functional.linear(xp, _dequant(fc1_w[e], fc1_s[e], d_pad, block))
        out = torch.nn.functional.silu(h[..., 0::2]) * h[..., 1::2]
        return torch.nn.functional.linear(out, _dequant(fc2_w[e], fc2_s[e], i_pad, block))[..., :d]

    return semantics.moe_ffn(x, (shared_gate, shared_up, shared_down), shared_expert_gate,
                             torch.nn.functional.linear(x, router), top_k, norm_topk_prob, expert_output)


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


# -- post-training quantized weights (--quantize) ------------------------------------------------------------------

MIN_NBITS_BLOCK = 16   # MatMulNBits / GatherBlockQuantized: block_size is a power of two >= 16


def nbits_block(group: int, k: int) -> int:
    """The ORT block of a quantization group along K: the group itself, or for one group spanning K (per output
    channel) the smallest power of two >= K (and >= 16)."""
    if group < k:
        if group < MIN_NBITS_BLOCK or group & (group - 1):
            raise ValueError(f"onnx: quantization group {group} is not a power of two >= {MIN_NBITS_BLOCK}")
        return group
    return max(MIN_NBITS_BLOCK, 1 << (k - 1).bit_length())


def zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def pack_nbits(q: torch.Tensor, bits: int, width: int | None = None) -> torch.Tensor:
    """Symmetric integers [rows, K] -> codes q + 2^(bits-1) [rows, width] (the zero point past K), packed along the
    last dim, lowest bits first: bytes [rows, width * bits / 8]."""
    rows, k = q.shape
    codes = torch.full((rows, width or k), zero_point(bits), dtype=torch.uint8)
    codes[:, :k] = (q.to(torch.int16) + zero_point(bits)).to(torch.uint8)
    per_byte = 8 // bits
    if codes.shape[1] % per_byte:
        raise ValueError(f"onnx: a row of {codes.shape[1]} {bits}-bit values does not fill whole bytes")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    return (codes.reshape(rows, -1, per_byte) << shifts).sum(dim=-1, dtype=torch.uint8)


def unpack_nbits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack_nbits' bytes [..., n] -> the symmetric integers [..., n * 8 / bits] (int16)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    codes = ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)
    return codes.to(torch.int16) - zero_point(bits)


def _dequant_nbits(packed, scales, bits: int, block: int, k: int):
    q = unpack_nbits(packed.reshape(packed.shape[0], -1), bits)
    per_value = scales.reshape(q.shape[0], -1).repeat_interleave(block, dim=-1)[:, :q.shape[1]]
    return (q.to(torch.float32) * per_value)[:, :k]


@torch.library.custom_op("mote_onnx::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, k: int, bits: int,
                 block: int) -> torch.Tensor:
    return torch.nn.functional.linear(x, _dequant_nbits(b, scales, bits, block, k), bias)


@matmul_nbits.register_fake
def _(x, b, scales, bias, k, bits, block):
    return x.new_empty((*x.shape[:-1], b.shape[0]))


@torch.library.custom_op("mote_onnx::gather_block_quantized", mutates_args=())
def gather_block_quantized(tokens: torch.Tensor, data: torch.Tensor, scales: torch.Tensor, bits: int,
                           block: int) -> torch.Tensor:
    flat = tokens.reshape(-1)
    d = data.shape[1] * 8 // bits
    rows = _dequant_nbits(data.index_select(0, flat), scales.index_select(0, flat), bits, block, d)
    return rows.reshape(*tokens.shape, d)


@gather_block_quantized.register_fake
def _(tokens, data, scales, bits, block):
    return scales.new_empty((*tokens.shape, data.shape[1] * 8 // bits))


def _lower_quantized_linear(ep, node) -> None:
    x, q, scale, bias, bits, group = node.args
    qv, sv = constant_value(ep, q), constant_value(ep, scale)
    n_out, k = qv.shape
    block = nbits_block(group, k)
    n_blocks = -(-k // block)
    b = pack_nbits(qv, bits, n_blocks * block).reshape(n_out, n_blocks, block * bits // 8)
    base = spec_for(ep, q).target
    consts = [add_constant(ep, f"{base}.ort_b", b), add_constant(ep, f"{base}.ort_scales", sv.reshape(n_out, n_blocks))]
    replace_call(ep.graph, node, torch.ops.mote_onnx.matmul_nbits.default, (x, *consts, bias, k, bits, block))


def _lower_quantized_embedding(ep, node) -> None:
    tokens, q, scale, bits, group = node.args
    qv, sv = constant_value(ep, q), constant_value(ep, scale)
    base = spec_for(ep, q).target
    consts = [add_constant(ep, f"{base}.ort_data", pack_nbits(qv, bits)), add_constant(ep, f"{base}.ort_scales", sv)]
    replace_call(ep.graph, node, torch.ops.mote_onnx.gather_block_quantized.default,
                 (tokens, *consts, bits, nbits_block(group, qv.shape[1])))


def lower_to_ort_layouts(ep) -> int:
    """Rewrite the program's mote:: ops into the mote_onnx:: ops above. Returns the number of routed-expert weights
    (trits) of the mote.moe_ffn ops it lowered; what they cost is read from the written file (see report.py)."""
    graph = ep.graph
    routed_weights = routed_expert_weights(ep)
    for node, args in moe_nodes(ep):
        _, d, inter = moe_dims(ep, args)
        fc1, fc1_s, fc2, fc2_s, block, d_pad, i_pad = repack_moe(
            *(constant_value(ep, n) for n in args.routed_operands()), d=d, inter=inter)
        base = spec_for(ep, args.gate_packed).target.rsplit(".", 1)[0]
        consts = [add_constant(ep, f"{base}.ort_{n}", t) for n, t in
                  (("fc1_w", fc1), ("fc1_s", fc1_s), ("fc2_w", fc2), ("fc2_s", fc2_s))]
        replace_call(graph, node, torch.ops.mote_onnx.moe_block.default,
                     (args.x, *args.shared, args.shared_expert_gate, args.router, *consts, args.top_k,
                      args.norm_topk_prob, block, d, inter, d_pad, i_pad))
    for node in list(graph.nodes):
        if is_op(node, torch.ops.mote.ternary_linear.default):
            x, packed, scale, k = node.args
            p, s = constant_value(ep, packed), constant_value(ep, scale)
            n_out, k_pad = p.shape[0], padded(k)
            block = block_size(k_pad)
            codes = pad_codes(unpack_codes(p, k), n_out, k_pad)
            b = pack_codes(codes).reshape(n_out, k_pad // block, block // 4)
            scales = block_scales(s.reshape(1, -1) if s.numel() > 1 else s.reshape(1, 1), n_out, n_out, k_pad // block)[0]
            base = spec_for(ep, packed).target
            consts = [add_constant(ep, f"{base}.ort_b", b), add_constant(ep, f"{base}.ort_scales", scales)]
            replace_call(graph, node, torch.ops.mote_onnx.matmul_2bit.default, (x, *consts, k, k_pad, block))
        elif is_op(node, torch.ops.mote.quantized_linear.default):
            _lower_quantized_linear(ep, node)
        elif is_op(node, torch.ops.mote.quantized_embedding.default):
            _lower_quantized_embedding(ep, node)
        elif is_op(node, torch.ops.mote.unpack_trits.default):
            raise RuntimeError("onnx: an unfused mote.unpack_trits reached the target (the pass pipeline did not run)")
    finish_rewrite(ep)
    return routed_weights
