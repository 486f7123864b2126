"""TensorIR compute kernels of the TVM target: float linear, ternary linear, the routed experts of a MoTE block, the
batched matmuls of attention, and the linear and embedding of post-training quantized weights (`--quantize`).

Every builder takes static sizes and a `tvm.target.Target` and returns a scheduled `tvm.tirx.PrimFunc` whose buffers
have a leading symbolic token count T (int64, T >= 1) and whose last parameter is the output (destination-passing
style, as `relax.call_tir` expects). The functions carry `tirx.is_scheduled`, so no default schedule touches them.

The kernels are written directly as scheduled loop nests (IRBuilder, no SBlocks below the root): explicit vector
loads, per-target dot-product instructions, register tiles unrolled in Python, and one parallel loop over blocks of
output rows per matrix. The instruction choices per target are in `_Isa`:

    aarch64 +dotprod       sdot (16 codes x 16 int8 activations -> 4 int32 lanes)
    aarch64 (plain NEON)   widening int16 multiply-adds (LLVM's smull/smlal/saddw)
    x86 with AVX-VNNI      vpdpbusd (the sdot shape on 32-byte vectors; lets this host test the sdot loop structure)
    x86 AVX2 (x86-64-v3)   pmaddubsw + pmaddwd

Ternary codes (the kernel layout)
---------------------------------
The canonical storage of `export.trits` (2-bit `code = trit + 2`, four per byte, lowest bits first along K), with
each row's bytes padded with 0xAA (four codes 2, trit 0) to a multiple of CODE_ALIGN = 32 bytes (128 weights), so
that every row is whole vectors: `kernel_codes` is that padding (identity when ceil(K/4) is already a multiple of 32,
as for K = 1024, 1536, 2048), `kernel_code_shape(rows, K)` its shape. Still 2 bits per weight; scales unchanged.

Integer dot products without decoding trits
--------------------------------------------
sum_k (c_k - 2) q_k = sum_k c_k q_k - 2 sum_k q_k, so the codes c in 0..3 feed the int8 dot-product instructions
as they are, and the per-token sum of q is subtracted once. A vector of code bytes shifted right by 2s and masked
with 3 holds the codes of k = 4j + s (j the byte index). The activations are quantized once per token straight into
that order, `q[t, s, j] = Q8(x[t])[4j + s]` (zero beyond K), so the weights are never shuffled: byte j of a row
meets q[t, s, j] for s = 0..3.

Numerics (bit-exact with `export.semantics.bitlinear` / `torch.ops.mote.ternary_linear`)
----------------------------------------------------------------------------------------
Q8 per token row: amax = max(max|v|, 1e-5), inv = (1 / amax) * 127 (torch's `127 / amax`), q = clamp(
round_half_even(v * inv), -128, 127), s_v = amax / 127; bitlinear = (float(acc) * s_v) * s_w with acc an exact int32.
LLVM contracts a * b + c into FMA here (TVM's default); the ternary path has no such pair before its rounding.

Quantized weights (weight-only dequantization, the semantics of `torch.ops.mote.quantized_linear`)
------------------------------------------------------------------------------------------------
int8 values are stored as they are, [rows, K]; int4 values two per byte (`pack_int4`), in spans of QUANT_SPAN = 32
weights: byte j of a span's 16 holds weight j in its low nibble and weight 16 + j in its high one, so a vector of
consecutive weights is one run of bytes, whatever the vector width (4 or 8 float lanes): sign-extended, then shifted
((b << 28) >> 28, b >> 4), never shuffled. Scales are float32 [rows, K / group], a group being K (per output channel)
or whole spans. The kernels walk K span by span, convert each weight vector to float32 and multiply it by its
group's scale (q * s, the reference's dequantized weight, exactly), then accumulate x * w in fp32 like `linear`, each
dequantized vector shared by the tile's tokens. The embedding dequantizes the gathered rows the same way.

Routed experts
--------------
The token -> expert choices are turned into per-expert slot lists inside the kernel; the experts are then visited in
ascending index order and one that no token chose is skipped before any of its weights is touched, so decode reads
only the chosen experts and its time does not depend on E. A chosen expert runs on all its tokens at once: gate and
up (parallel over blocks of rows; within a block, tiles of several tokens share every code vector), Q8 of
h = silu(g) * u, then down, accumulated into y as y[t] += top_p * expert(x[t]). Each chosen expert's codes are thus
read from memory once per call, whatever the number of tokens that chose it.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np
import tvm
from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T
from tvm.target.codegen import target_has_features

CODE_ALIGN = 32         # bytes: a kernel code row is whole 32-byte vectors (x86) / pairs of 16-byte vectors (NEON)
ZERO_CODES_BYTE = 0xAA  # four codes 2 (trit 0): the K padding
_ACT_EPS = 1e-5         # export.semantics.ACT_EPS
_Q_MAX = 127.0
_VL = 8                 # float32 lanes of the per-row activation passes (Q8, silu)
QUANT_SPAN = 32         # weights per step of the quantized kernels (16 bytes of int4, 32 of int8)


def kernel_code_shape(rows: int, k: int) -> tuple[int, int]:
    """Shape of one matrix's codes in the kernel layout: (rows, ceil(K/4) padded to a multiple of CODE_ALIGN)."""
    return rows, _code_bytes(k)


def kernel_codes(codes: np.ndarray, k: int) -> np.ndarray:
    """Canonical packed codes uint8 [..., rows, ceil(K/4)] -> the kernel layout [..., rows, kernel_code_shape[1]]:
    each row padded with trit-0 bytes (identity when no padding is needed)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.shape[-1] != (k + 3) // 4:
        raise ValueError(f"expected uint8 codes [..., ceil({k}/4)], got {codes.dtype} {codes.shape}")
    pad = _code_bytes(k) - codes.shape[-1]
    return np.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)], constant_values=ZERO_CODES_BYTE)


def _code_bytes(k: int) -> int:
    return -(-((k + 3) // 4) // CODE_ALIGN) * CODE_ALIGN


# -- post-training quantized weights (--quantize) ---------------------------------------------------------------------

def quantized_weight_shape(rows: int, k: int, bits: int) -> tuple[int, int]:
    """Shape of one quantized matrix in the kernel layout: int8 [rows, K] as it is, int4 uint8 [rows, 16 per span]."""
    if bits == 8:
        return rows, k
    if bits == 4:
        return rows, -(-k // QUANT_SPAN) * (QUANT_SPAN // 2)
    raise ValueError(f"{bits}-bit weights: the kernels take 4 or 8")


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values in int8 storage [..., rows, K] -> uint8 [..., rows, ceil(K/32) * 16]: per span of 32 weights,
    byte j holds weight j in its low nibble and weight 16 + j in its high one (two's complement nibbles); the last
    span is padded with zeros."""
    q = np.asarray(q)
    if q.dtype != np.int8 or q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"expected int8 values in [-8, 7], got {q.dtype} in [{q.min()}, {q.max()}]")
    q = np.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, -q.shape[-1] % QUANT_SPAN)])
    nibbles = q.reshape(*q.shape[:-1], -1, 2, QUANT_SPAN // 2).astype(np.uint8) & 0xF
    return (nibbles[..., 0, :] | (nibbles[..., 1, :] << 4)).reshape(*q.shape[:-1], -1)


# -- per-target instruction choices ------------------------------------------------------------------------------

def _dot_sdot(acc, codes, qs):
    for c, q in zip(codes, qs):
        acc = T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot.v4i32.v16i8", acc,
                                      T.reinterpret("int8x16", c), q)
    return acc


def _dot_vnni(acc, codes, qs):
    # vpdpbusd: unsigned bytes (the codes) times signed bytes (q), four products per int32 lane, no saturation.
    for c, q in zip(codes, qs):
        acc = T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx512.vpdpbusd.256", acc, c, q)
    return acc


def _dot_maddubs(acc, codes, qs):
    # pmaddubsw: u8 x s8 products summed in pairs to int16 (|pair| <= 2 * 3 * 128, and four shifts <= 3072: no
    # saturation), then pmaddwd by ones widens pairs of int16 to int32.
    pairs = None
    for c, q in zip(codes, qs):
        p = T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", c, q)
        pairs = p if pairs is None else pairs + p
    return acc + T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", pairs, _splat(T.int16(1), 16))


def _dot_widening(acc, codes, qs):
    # No dot-product instruction: int16 products (|c q| <= 384, four of them <= 1536) widened into int32 lanes.
    lanes = codes[0].ty.dtype.lanes
    prods = None
    for c, q in zip(codes, qs):
        p = T.Cast(f"int16x{lanes}", c) * T.Cast(f"int16x{lanes}", q)
        prods = p if prods is None else prods + p
    return acc + T.Cast(f"int32x{lanes}", prods)


@dataclasses.dataclass(frozen=True)
class _Tiles:
    """Register tiling of one kind of dot product. A parallel task owns `block_rows` output rows; runs of `tokens`
    tokens are computed `rows` x `tokens` at a time, and a lone token (decode) against all `block_rows` rows."""

    block_rows: int
    rows: int
    tokens: int


@dataclasses.dataclass(frozen=True)
class _MatmulTiles:
    """Register tiling of `batch_matmul`. A parallel task owns `rows` rows of one batch's output and a block of
    `block_vectors` float vectors of its columns; the tile is cut into column chunks whose accumulators (rows x
    vectors), the chunk's b vectors and one broadcast a value fit the `registers` vector registers. So a lone row
    (decode) keeps the whole block's vectors in flight at once."""

    rows: int
    block_vectors: int
    registers: int


@dataclasses.dataclass(frozen=True)
class _Isa:
    chunk: int              # code bytes per step of the integer dot product (one vector register of codes)
    acc_lanes: int          # int32 lanes of an integer accumulator
    int_dot: Callable       # (acc, [codes of shift s], [q of shift s]) -> acc + sum_s codes_s . q_s, lanewise
    f32_lanes: int          # float32 lanes of a float accumulator
    int_tiles: _Tiles
    float_tiles: _Tiles
    matmul_tiles: _MatmulTiles


# Tiles: accumulators + decoded codes + activations fit the register file (32 NEON registers, 16 AVX2 ones), chosen
# by timing on the x86 host (the x86 rows) and by register count (the aarch64 rows, which cannot run here). The
# matmul tiles are BLIS-like micro-kernels: 6 rows x 2 vectors on AVX2 (~100 GFLOP/s, near one core's FMA peak),
# 6 x 4 on NEON.
_SDOT = _Isa(chunk=16, acc_lanes=4, int_dot=_dot_sdot, f32_lanes=4,
             int_tiles=_Tiles(8, 4, 4), float_tiles=_Tiles(4, 4, 4),
             matmul_tiles=_MatmulTiles(6, 8, 32))
_NEON = _Isa(chunk=16, acc_lanes=16, int_dot=_dot_widening, f32_lanes=4,
             int_tiles=_Tiles(4, 2, 2), float_tiles=_Tiles(4, 4, 4),
             matmul_tiles=_MatmulTiles(6, 8, 32))
_VNNI = _Isa(chunk=32, acc_lanes=8, int_dot=_dot_vnni, f32_lanes=8,
             int_tiles=_Tiles(8, 2, 4), float_tiles=_Tiles(4, 2, 4),
             matmul_tiles=_MatmulTiles(6, 4, 16))
_AVX2 = _Isa(chunk=32, acc_lanes=8, int_dot=_dot_maddubs, f32_lanes=8,
             int_tiles=_Tiles(8, 4, 4), float_tiles=_Tiles(4, 2, 4),
             matmul_tiles=_MatmulTiles(6, 4, 16))
_PORTABLE = _Isa(chunk=16, acc_lanes=16, int_dot=_dot_widening, f32_lanes=4,
                 int_tiles=_Tiles(4, 2, 2), float_tiles=_Tiles(4, 2, 2),
                 matmul_tiles=_MatmulTiles(6, 4, 16))


def _isa(target: tvm.target.Target) -> _Isa:
    if target.kind.name != "llvm":
        raise ValueError(f"the TVM kernels are CPU (llvm) kernels, not for {target.kind.name}")
    if target.attrs.get("feature.is_aarch64", False):
        return _SDOT if target.attrs.get("feature.has_dotprod", False) else _NEON
    if target_has_features("avxvnni", target):
        return _VNNI
    if target_has_features("avx2", target):
        return _AVX2
    return _PORTABLE


# -- loop-nest pieces (each emits statements into the current IRBuilder frame) ----------------------------------------

def _registers(shape, dtype: str):
    """A small per-task buffer (accumulators, running maxima). TVM puts constant-size CPU allocations under 1 KiB of
    scope "global" on the stack, where LLVM promotes them to registers; scope "local" would be a heap workspace
    allocated and freed at every use (measured: it made the ternary GEMV 2.5x slower)."""
    return T.alloc_buffer(shape, dtype, scope="global")


def _splat(value, lanes: int):
    """`value` in every lane (the scalar itself for lanes = 1)."""
    return T.broadcast(value, lanes) if lanes > 1 else value


def _vtype(dtype: str, lanes: int) -> str:
    return f"{dtype}x{lanes}" if lanes > 1 else dtype


def _lanes(start, lanes: int):
    """Index of `lanes` consecutive elements from `start` (the element itself for lanes = 1)."""
    return T.ramp(start, 1, lanes) if lanes > 1 else start


def _fill(buf, index, lanes: int, value):
    T.buffer_store(buf, _splat(value, lanes), [*index, _lanes(0, lanes)])


def _hsum(buf, index, lanes: int):
    total = buf[(*index, 0)]
    for lane in range(1, lanes):
        total = total + buf[(*index, lane)]
    return total


def _int_tile(isa: _Isa, k_bytes: int, codes_at, q_at, n_rows: int, n_tokens: int):
    """Integer dot products of `n_rows` code rows with `n_tokens` quantized activation rows, all of them
    (sum_k c_k q_k, before the -2 sum q correction).

    codes_at(r, byte) -> uint8 vector of `isa.chunk` code bytes of row r; q_at(t, s, byte) -> the matching int8
    activations of token t for shift s. Returns (r, t) -> int32 expression. Every code vector is loaded and split
    into its four shifts once and used for all tokens of the tile.
    """
    acc = _registers((n_rows, n_tokens, isa.acc_lanes), "int32")
    for r, t in itertools.product(range(n_rows), range(n_tokens)):
        _fill(acc, (r, t), isa.acc_lanes, T.int32(0))
    three = _splat(T.uint8(3), isa.chunk)
    with T.serial(0, k_bytes // isa.chunk) as c:
        byte = c * isa.chunk
        for r in range(n_rows):
            raw = T.Bind(codes_at(r, byte))
            codes = [T.Bind(T.bitwise_and(raw >> _splat(T.uint8(2 * s), isa.chunk) if s else raw, three))
                     for s in range(4)]
            for t in range(n_tokens):
                lanes = _lanes(0, isa.acc_lanes)
                T.buffer_store(acc, isa.int_dot(acc[r, t, lanes], codes, [q_at(t, s, byte) for s in range(4)]),
                               [r, t, lanes])
    return lambda r, t: _hsum(acc, (r, t), isa.acc_lanes)


def _float_tile(isa: _Isa, k: int, w_at, x_at, n_rows: int, n_tokens: int):
    """Float dot products of `n_rows` weight rows with `n_tokens` activation rows over K = k.

    w_at(r, kk, lanes) / x_at(t, kk, lanes) -> float32 vector (lanes > 1) or scalar. The K tail that does not fill a
    vector is added in scalar form. Returns (r, t) -> float32 expression.
    """
    lanes = isa.f32_lanes
    acc = _registers((n_rows, n_tokens, lanes), "float32")
    for r, t in itertools.product(range(n_rows), range(n_tokens)):
        _fill(acc, (r, t), lanes, T.float32(0))
    with T.serial(0, k // lanes) as c:
        for r in range(n_rows):
            w = T.Bind(w_at(r, c * lanes, lanes))
            for t in range(n_tokens):
                index = [r, t, _lanes(0, lanes)]
                T.buffer_store(acc, acc[tuple(index)] + w * x_at(t, c * lanes, lanes), index)

    def result(r, t):
        total = _hsum(acc, (r, t), lanes)
        for kk in range(k // lanes * lanes, k):
            total = total + w_at(r, kk, 1) * x_at(t, kk, 1)
        return total

    return result


def _quantize(x_at, k: int, q, q_sum, q_scale, row):
    """Q8 of one activation row into q[row, s, j] = Q8(x)[4j + s] (zero beyond k, up to the buffer's byte count),
    q_sum[row] = sum of q and q_scale[row] = s_v. x_at(kk, lanes) -> `lanes` consecutive activations from kk (a
    scalar for lanes = 1).

    Vectorized over _VL-byte groups of each plane: 4 * _VL consecutive activations are rounded as vectors, then
    split into the four planes by lane shuffles. The rounding is the same IEEE operations as torch's, lane by lane.
    """
    vl, k_bytes = _VL, int(q.shape[-1])
    amax = _registers((vl,), "float32")
    _fill(amax, (), vl, T.float32(0))
    with T.serial(0, k // vl) as c:
        T.buffer_store(amax, T.max(amax[_lanes(0, vl)], T.abs(x_at(c * vl, vl))), [_lanes(0, vl)])
    largest = amax[0]
    for lane in range(1, vl):
        largest = T.max(largest, amax[lane])
    for kk in range(k // vl * vl, k):
        largest = T.max(largest, T.abs(x_at(kk, 1)))
    clamped = T.Bind(T.max(largest, T.float32(_ACT_EPS)))
    inv = T.Bind(T.float32(1) / clamped * T.float32(_Q_MAX))
    T.buffer_store(q_scale, clamped / T.float32(_Q_MAX), [row])

    def q8(v, lanes):   # -> int32; nearbyint rounds half to even (the default rounding mode), as torch.round
        rounded = T.nearbyint(v * _splat(inv, lanes))
        bounded = T.max(T.min(rounded, _splat(T.float32(127), lanes)), _splat(T.float32(-128), lanes))
        return T.Cast(_vtype("int32", lanes), bounded)

    total = _registers((vl,), "int32")
    _fill(total, (), vl, T.int32(0))
    with T.serial(0, k // (4 * vl)) as g:
        values = [T.Bind(q8(x_at(g * 4 * vl + v * vl, vl), vl)) for v in range(4)]
        for s in range(4):
            plane = tirx.Shuffle(values, [T.int32(4 * j + s) for j in range(vl)])
            T.buffer_store(q, T.Cast(f"int8x{vl}", plane), [row, s, _lanes(g * vl, vl)])
        T.buffer_store(total, total[_lanes(0, vl)] + values[0] + values[1] + values[2] + values[3], [_lanes(0, vl)])
    rest = _registers((1,), "int32")
    T.buffer_store(rest, T.int32(0), [0])

    def store(j, s, value):
        T.buffer_store(q, T.Cast("int8", value), [row, s, j])
        T.buffer_store(rest, rest[0] + value, [0])

    with T.serial(k // (4 * vl) * vl, k // 4) as j:      # whole bytes after the vector groups
        for s in range(4):
            store(j, s, q8(x_at(j * 4 + s, 1), 1))
    if k % 4:                                            # the partial byte
        for s in range(4):
            store(k // 4, s, q8(x_at(k // 4 * 4 + s, 1), 1) if s < k % 4 else T.int32(0))
    with T.serial((k + 3) // 4, k_bytes) as j:           # the padding
        for s in range(4):
            T.buffer_store(q, T.int8(0), [row, s, j])
    T.buffer_store(q_sum, _hsum(total, (), vl) + rest[0], [row])


def _silu_times(h, u, slot, width: int):
    """h[slot, :] = silu(h[slot, :]) * u[slot, :] (h holds gate x, u up x), vectorized."""
    with T.serial(0, width // _VL) as c:
        lanes = _lanes(c * _VL, _VL)
        T.buffer_store(h, _silu(h[slot, lanes], _VL) * u[slot, lanes], [slot, lanes])
    for i in range(width // _VL * _VL, width):
        T.buffer_store(h, _silu(h[slot, i], 1) * u[slot, i], [slot, i])


def _silu(z, lanes: int):
    """z / (1 + exp(-z)) (torch's CPU silu), with a vectorizable exp."""
    return z / (_splat(T.float32(1), lanes) + _exp(-z, lanes))


def _exp(x, lanes: int):
    """exp(x) for float32 (vector) x: Cephes' expf (range reduction by ln 2 in two parts, polynomial, 2^n from the
    exponent bits); LLVM's exp would be one libm call per lane. Measured within 1 ulp of the true exp on
    [-87, 88] (equal to torch's exp for ~90% of inputs). x is clamped to [-88.38, 88]: results below 2^-126 may
    flush to 0, and above, exp(88) stands in (silu only needs a huge denominator there)."""
    def c(value):
        return _splat(T.float32(value), lanes)

    x = T.max(T.min(x, c(88.0)), c(-88.3762626647949))
    n = T.Bind(T.floor(x * c(1.44269504088896341) + c(0.5)))
    r = T.Bind(x - n * c(0.693359375) - n * c(-2.12194440e-4))
    p = c(1.9875691500e-4)
    for coef in (1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1):
        p = p * r + c(coef)
    p = p * r * r + r + c(1)
    exponent = (T.Cast(_vtype("int32", lanes), n) + _splat(T.int32(127), lanes)) << _splat(T.int32(23), lanes)
    return p * T.reinterpret(_vtype("float32", lanes), exponent)


def _row_blocks(n_rows: int, block: int, body):
    """Parallel loop over blocks of `block` output rows: body(rows, guards) with rows[r] the row index (clamped into
    range: a partial last block recomputes the last row) and guards[r] the condition of storing it (None when every
    block is full)."""
    with T.parallel(0, -(-n_rows // block)) as b:
        rows = [T.min(b * block + r, n_rows - 1) if n_rows % block else b * block + r for r in range(block)]
        guards = [b * block + r < n_rows if n_rows % block else None for r in range(block)]
        body(rows, guards)


def _guarded(guard, emit):
    """emit() under `guard` (None: unconditionally)."""
    if guard is None:
        emit()
        return
    with T.If(guard):
        with T.Then():
            emit()


def _token_tiles(tiles: _Tiles, n_tokens, rows, guards, tile):
    """All `n_tokens` tokens against the block's rows: runs of `tiles.tokens` tokens in sub-blocks of `tiles.rows`
    rows, then the 1 .. tiles.tokens - 1 remaining tokens as one tile (a lone token over the whole block: decode).
    tile(rows, guards, first_token, n) emits one register tile of len(rows) rows x n tokens (n static)."""
    def sub_blocks(first, n):
        for r0 in range(0, len(rows), tiles.rows):
            tile(rows[r0:r0 + tiles.rows], guards[r0:r0 + tiles.rows], first, n)

    with T.serial(0, n_tokens // tiles.tokens) as run:
        sub_blocks(run * tiles.tokens, tiles.tokens)
    rest = n_tokens % tiles.tokens
    first = n_tokens - rest
    for n in range(1, tiles.tokens):
        with T.If(rest == n):
            with T.Then():
                if n == 1:
                    tile(rows, guards, first, 1)
                else:
                    sub_blocks(first, n)


def _check_group(k: int, group: int) -> None:
    if k % group or (group != k and group % QUANT_SPAN):
        raise ValueError(f"groups of {group} along K = {k}: the kernels take K itself (per output channel) or a "
                         f"multiple of {QUANT_SPAN} that divides K")


_QUANT_DTYPE = {8: "int8", 4: "uint8"}


def _spans(k: int, lanes: int, step):
    """Walk K in spans of QUANT_SPAN weights: step(span, [(offset in the span, lanes)]) for each whole span (a
    serial loop), then for the k % QUANT_SPAN weights left (whole vectors, then scalars)."""
    with T.serial(0, k // QUANT_SPAN) as span:
        step(span, [(off, lanes) for off in range(0, QUANT_SPAN, lanes)])
    tail = k % QUANT_SPAN
    if tail:
        whole = tail // lanes * lanes
        step(k // QUANT_SPAN,
             [(off, lanes) for off in range(0, whole, lanes)] + [(off, 1) for off in range(whole, tail)])


def _group_index(span, group: int, k: int):
    """The scale column of a span's weights (a group is K itself or whole spans)."""
    return 0 if group == k else span // (group // QUANT_SPAN)


def _dequantized(q, row, bits: int, span, off: int, lanes: int, scale):
    """float32 weights span * QUANT_SPAN + off .. + lanes of a quantized row: q * scale (as
    `semantics.dequantize_weight`). int4 (`pack_int4`): the span's bytes hold weight j in the low nibble of byte j
    and weight 16 + j in its high nibble, so `lanes` consecutive weights (lanes divides 16) are one run of bytes,
    sign-extended, then shifted: (b << 28) >> 28 for the low nibble, b >> 4 for the high one."""
    if bits == 8:
        values = q[row, _lanes(span * QUANT_SPAN + off, lanes)]
    else:
        half = QUANT_SPAN // 2
        raw = q[row, _lanes(span * half + off % half, lanes)]
        wide = T.Cast(_vtype("int32", lanes), T.reinterpret(_vtype("int8", lanes), raw))
        if off >= half:
            values = wide >> _splat(T.int32(4), lanes)
        else:
            values = (wide << _splat(T.int32(28), lanes)) >> _splat(T.int32(28), lanes)
    return T.Cast(_vtype("float32", lanes), values) * _splat(scale, lanes)


def _quantized_tile(isa: _Isa, k: int, bits: int, group: int, q, scale, rows, x_at, n_tokens: int):
    """Float dot products of the quantized weight rows `rows`, dequantized in the loop, with `n_tokens` activation
    rows (x_at as in `_float_tile`): each weight vector is dequantized once and used for every token of the tile.
    Returns (r, t) -> float32 expression."""
    lanes = isa.f32_lanes
    acc = _registers((len(rows), n_tokens, lanes), "float32")
    for r, t in itertools.product(range(len(rows)), range(n_tokens)):
        _fill(acc, (r, t), lanes, T.float32(0))

    def step(span, segments):
        for r, row in enumerate(rows):
            s = T.Bind(scale[row, _group_index(span, group, k)])
            for off, n in segments:
                w = T.Bind(_dequantized(q, row, bits, span, off, n, s))
                for t in range(n_tokens):
                    index = [r, t, _lanes(0, n)]   # a scalar of the tail goes into lane 0
                    T.buffer_store(acc, acc[tuple(index)] + w * x_at(t, span * QUANT_SPAN + off, n), index)

    _spans(k, lanes, step)
    return lambda r, t: _hsum(acc, (r, t), lanes)


def _prim_func(name: str, body):
    """A PrimFunc named `name` from body() (which declares the arguments and returns nothing), with the root
    SBlock the Relax passes expect and the attributes that keep default schedules away."""
    with IRBuilder() as ib:
        with T.prim_func(s_tir=True):
            T.func_name(name)
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
            body()
    return ib.get()


def _token_var():
    return tirx.Var("T", "int64")


# -- public kernels ---------------------------------------------------------------------------------------------------

def linear(n_out: int, k: int, bias: bool, target: tvm.target.Target) -> tirx.PrimFunc:
    """y [T, n_out] = x [T, k] . w [n_out, k]^T (+ b [n_out]), float32. Arguments: x, w, (b), y."""
    def weights():
        return T.arg("w", T.buffer((n_out, k), "float32"))

    def dot(isa, w, rows, x_at, n_tokens):
        return _float_tile(isa, k, lambda r, kk, lanes: w[rows[r], _lanes(kk, lanes)], x_at, len(rows), n_tokens)

    return _linear_kernel("linear", n_out, k, bias, target, weights, dot)


def _linear_kernel(name: str, n_out: int, k: int, bias: bool, target: tvm.target.Target, weights, dot):
    """The GEMV / GEMM of `linear` and `quantized_linear`, parallel over blocks of output rows, in register tiles of
    rows x tokens. weights() declares the weight arguments (between x and the bias); dot(isa, weights, rows, x_at,
    n_tokens) -> (r, t) -> float32 emits one tile's dot products."""
    isa = _isa(target)

    def body():
        tokens = _token_var()
        x = T.arg("x", T.buffer((tokens, k), "float32"))
        w = weights()
        b = T.arg("b", T.buffer((n_out,), "float32")) if bias else None
        y = T.arg("y", T.buffer((tokens, n_out), "float32"))

        def tile(rows, guards, t0, n_tokens):
            result = dot(isa, w, rows, lambda t, kk, lanes: x[t0 + t, _lanes(kk, lanes)], n_tokens)
            for r, t in itertools.product(range(len(rows)), range(n_tokens)):
                value = result(r, t) + b[rows[r]] if bias else result(r, t)
                _guarded(guards[r], lambda: T.buffer_store(y, value, [t0 + t, rows[r]]))

        with T.sblock("root"):
            _row_blocks(n_out, isa.float_tiles.block_rows,
                        lambda rows, guards: _token_tiles(isa.float_tiles, tokens, rows, guards, tile))

    return _prim_func(name, body)


def quantized_linear(n_out: int, k: int, bits: int, group: int, bias: bool,
                     target: tvm.target.Target) -> tirx.PrimFunc:
    """y [T, n_out] = x [T, k] . (q * s)^T (+ b [n_out]): `torch.ops.mote.quantized_linear`, weight-only
    dequantization in the inner loop (each weight is q * its group's scale, as `semantics.dequantize_weight`), fp32
    accumulation; the tiling of `linear`.

    Arguments: x float32 [T, k], q `quantized_weight_shape(n_out, k, bits)` (int8 values, or int4 packed by
    `pack_int4`), scale float32 [n_out, k / group], (b float32 [n_out]), y float32 [T, n_out]. group = k is per
    output channel; other groups are multiples of QUANT_SPAN.
    """
    _check_group(k, group)

    def weights():
        q = T.arg("q", T.buffer(quantized_weight_shape(n_out, k, bits), _QUANT_DTYPE[bits]))
        return q, T.arg("scale", T.buffer((n_out, k // group), "float32"))

    def dot(isa, w, rows, x_at, n_tokens):
        return _quantized_tile(isa, k, bits, group, *w, rows, x_at, n_tokens)

    return _linear_kernel("quantized_linear", n_out, k, bias, target, weights, dot)


def quantized_embedding(vocab: int, d: int, bits: int, group: int, target: tvm.target.Target) -> tirx.PrimFunc:
    """y [T, d] = the rows tokens[t] of the table q * s, dequantized as they are gathered:
    `torch.ops.mote.quantized_embedding`. A token id outside [0, vocab) reads the nearest row (never out of bounds).

    Arguments: tokens int64 [T], q `quantized_weight_shape(vocab, d, bits)`, scale float32 [vocab, d / group],
    y float32 [T, d].
    """
    _check_group(d, group)
    lanes = _isa(target).f32_lanes

    def body():
        tokens = _token_var()
        ids = T.arg("tokens", T.buffer((tokens,), "int64"))
        q = T.arg("q", T.buffer(quantized_weight_shape(vocab, d, bits), _QUANT_DTYPE[bits]))
        scale = T.arg("scale", T.buffer((vocab, d // group), "float32"))
        y = T.arg("y", T.buffer((tokens, d), "float32"))
        with T.sblock("root"):
            with T.parallel(0, tokens) as t:
                row = T.Bind(T.max(T.min(ids[t], T.int64(vocab - 1)), T.int64(0)))

                def step(span, segments):
                    s = T.Bind(scale[row, _group_index(span, group, d)])
                    for off, n in segments:
                        T.buffer_store(y, _dequantized(q, row, bits, span, off, n, s),
                                       [t, _lanes(span * QUANT_SPAN + off, n)])

                _spans(d, lanes, step)

    return _prim_func("quantized_embedding", body)


def batch_matmul(batch: int, k: int, n: int, target: tvm.target.Target) -> tirx.PrimFunc:
    """y [batch, T, n] = a [batch, T, k] @ b [batch, k, n], float32, per batch (attention: scores = q @ k^T with
    k = head_dim, n = S; out = probs @ v with k = S, n = head_dim). Arguments: a, b, y.

    Parallel over (batch, block of `block_vectors` vectors of columns, run of `rows` rows), the row runs innermost so
    that a thread's consecutive tasks share one strip of b. A task accumulates its rows x columns over all of k in
    registers, vectorized over n (contiguous in b and y): per k, each column chunk's b vectors are loaded once and
    multiplied by every row's broadcast a value (fp32, k in natural order). The last run has 1 .. rows - 1 rows
    (static tiles chosen by the remainder; a lone row, decode, takes the whole block at once); the last block holds
    the n % block columns as whole vectors, then scalars.
    """
    isa = _isa(target)
    tiles, lanes = isa.matmul_tiles, isa.f32_lanes
    width = tiles.block_vectors * lanes
    full_blocks, tail = divmod(n, width)
    col_blocks = full_blocks + (tail > 0)
    # A block's columns as (offset in the block, lanes) segments.
    full_segments = [(v * lanes, lanes) for v in range(tiles.block_vectors)]
    tail_segments = ([(v * lanes, lanes) for v in range(tail // lanes)]
                     + [(c, 1) for c in range(tail // lanes * lanes, tail)])

    def body():
        tokens = _token_var()
        a = T.arg("a", T.buffer((batch, tokens, k), "float32"))
        b = T.arg("b", T.buffer((batch, k, n), "float32"))
        y = T.arg("y", T.buffer((batch, tokens, n), "float32"))

        def tile(bi, t0, n_rows: int, c0, segments):
            # Chunks of segments whose n_rows x chunk accumulators, b values and one broadcast fit the registers.
            most = max(1, (tiles.registers - 1) // (n_rows + 1))
            n_chunks = -(-len(segments) // most)
            per_chunk = -(-len(segments) // n_chunks)
            for s0 in range(0, len(segments), per_chunk):
                chunk = segments[s0:s0 + per_chunk]
                acc = _registers((n_rows, len(chunk), lanes), "float32")
                for r, (s, (_, w)) in itertools.product(range(n_rows), enumerate(chunk)):
                    _fill(acc, (r, s), w, T.float32(0))
                with T.serial(0, k) as kk:
                    bv = [T.Bind(b[bi, kk, _lanes(c0 + off, w)]) for off, w in chunk]
                    for r in range(n_rows):
                        x = T.Bind(a[bi, t0 + r, kk])
                        xv = T.Bind(T.broadcast(x, lanes)) if lanes > 1 and any(w > 1 for _, w in chunk) else x
                        for s, (_, w) in enumerate(chunk):
                            index = [r, s, _lanes(0, w)]
                            T.buffer_store(acc, acc[tuple(index)] + (xv if w > 1 else x) * bv[s], index)
                for r, (s, (off, w)) in itertools.product(range(n_rows), enumerate(chunk)):
                    T.buffer_store(y, acc[r, s, _lanes(0, w)], [bi, t0 + r, _lanes(c0 + off, w)])

        def row_tile(bi, cb, t0, n_rows: int):
            if full_blocks and tail:
                with T.If(cb < full_blocks):
                    with T.Then():
                        tile(bi, t0, n_rows, cb * width, full_segments)
                    with T.Else():
                        tile(bi, t0, n_rows, full_blocks * width, tail_segments)
            elif full_blocks:
                tile(bi, t0, n_rows, cb * width, full_segments)
            else:
                tile(bi, t0, n_rows, 0, tail_segments)

        with T.sblock("root"):
            runs = T.Bind((tokens + (tiles.rows - 1)) // tiles.rows)
            with T.parallel(0, batch * col_blocks * runs) as task:
                run = T.Bind(task % runs)
                cb = T.Bind(task // runs % col_blocks)
                bi = T.Bind(task // (runs * col_blocks))
                t0 = T.Bind(run * tiles.rows)
                left = T.Bind(tokens - t0)
                with T.If(left >= tiles.rows):
                    with T.Then():
                        row_tile(bi, cb, t0, tiles.rows)
                for m in range(1, tiles.rows):
                    with T.If(left == m):
                        with T.Then():
                            row_tile(bi, cb, t0, m)

    return _prim_func("batch_matmul", body)


def ternary_linear(n_out: int, k: int, per_channel: bool, target: tvm.target.Target) -> tirx.PrimFunc:
    """y [T, n_out] = bitlinear(x [T, k], codes, scale), bit-exact with `torch.ops.mote.ternary_linear`.

    Arguments: x float32 [T, k], codes uint8 `kernel_code_shape(n_out, k)`, scale float32 [n_out] (per_channel) or
    [1], y float32 [T, n_out].
    """
    isa = _isa(target)
    k_bytes = _code_bytes(k)

    def body():
        tokens = _token_var()
        x = T.arg("x", T.buffer((tokens, k), "float32"))
        codes = T.arg("codes", T.buffer((n_out, k_bytes), "uint8"))
        scale = T.arg("scale", T.buffer((n_out if per_channel else 1,), "float32"))
        y = T.arg("y", T.buffer((tokens, n_out), "float32"))
        with T.sblock("root"):
            q = T.alloc_buffer((tokens, 4, k_bytes), "int8")
            q_sum = T.alloc_buffer((tokens,), "int32")
            q_scale = T.alloc_buffer((tokens,), "float32")
            with T.parallel(0, tokens) as t:
                _quantize(lambda kk, n: x[t, _lanes(kk, n)], k, q, q_sum, q_scale, t)

            def tile(rows, guards, t0, n_tokens):
                dot = _int_tile(isa, k_bytes, lambda r, byte: codes[rows[r], _lanes(byte, isa.chunk)],
                                lambda t, s, byte: q[t0 + t, s, _lanes(byte, isa.chunk)], len(rows), n_tokens)
                for r, t in itertools.product(range(len(rows)), range(n_tokens)):
                    exact = dot(r, t) - 2 * q_sum[t0 + t]
                    value = T.Cast("float32", exact) * q_scale[t0 + t] * scale[rows[r] if per_channel else 0]
                    _guarded(guards[r], lambda: T.buffer_store(y, value, [t0 + t, rows[r]]))

            _row_blocks(n_out, isa.int_tiles.block_rows,
                        lambda rows, guards: _token_tiles(isa.int_tiles, tokens, rows, guards, tile))

    return _prim_func("ternary_linear", body)


def routed_experts(num_experts: int, hidden: int, width: int, top_k: int, per_channel: bool,
                   target: tvm.target.Target) -> tirx.PrimFunc:
    """y [T, d] = sum_j top_p[t, j] * expert_{top_i[t, j]}(x[t]), the ternary experts of `export.semantics`
    (`ternary_expert`), summed in ascending expert order; only the chosen experts' codes and scales are read.

    Arguments: x float32 [T, d], top_i int32 [T, top_k] (distinct experts per token, as top-k gives), top_p float32
    [T, top_k], gate_codes uint8 [E, *kernel_code_shape(I, d)], gate_scale float32 [E, I | 1], up_codes, up_scale
    (the same shapes), down_codes uint8 [E, *kernel_code_shape(d, I)], down_scale float32 [E, d | 1], y float32
    [T, d]. d = hidden, I = width (the expert's intermediate size), E = num_experts.
    """
    isa = _isa(target)
    e_count, d, inter = num_experts, hidden, width
    d_bytes, i_bytes = _code_bytes(d), _code_bytes(inter)

    def body():
        tokens = _token_var()
        x = T.arg("x", T.buffer((tokens, d), "float32"))
        top_i = T.arg("top_i", T.buffer((tokens, top_k), "int32"))
        top_p = T.arg("top_p", T.buffer((tokens, top_k), "float32"))
        gate_codes = T.arg("gate_codes", T.buffer((e_count, inter, d_bytes), "uint8"))
        gate_scale = T.arg("gate_scale", T.buffer((e_count, inter if per_channel else 1), "float32"))
        up_codes = T.arg("up_codes", T.buffer((e_count, inter, d_bytes), "uint8"))
        up_scale = T.arg("up_scale", T.buffer((e_count, inter if per_channel else 1), "float32"))
        down_codes = T.arg("down_codes", T.buffer((e_count, d, i_bytes), "uint8"))
        down_scale = T.arg("down_scale", T.buffer((e_count, d if per_channel else 1), "float32"))
        y = T.arg("y", T.buffer((tokens, d), "float32"))

        def row_scale(scale, e, row):
            return scale[e, row if per_channel else 0]

        with T.sblock("root"):
            qx = T.alloc_buffer((tokens, 4, d_bytes), "int8")
            qx_sum = T.alloc_buffer((tokens,), "int32")
            qx_scale = T.alloc_buffer((tokens,), "float32")
            with T.parallel(0, tokens) as t:
                _quantize(lambda kk, n: x[t, _lanes(kk, n)], d, qx, qx_sum, qx_scale, t)
                with T.serial(0, d) as i:
                    T.buffer_store(y, T.float32(0), [t, i])
            slot_token, slot_prob, chosen_experts = _route(e_count, top_k, tokens, top_i, top_p)
            # Per slot of the current expert: gate x and up x, h = silu(gate x) * (up x) (in place), its Q8.
            h = T.alloc_buffer((tokens, inter), "float32")
            u = T.alloc_buffer((tokens, inter), "float32")
            qh = T.alloc_buffer((tokens, 4, i_bytes), "int8")
            qh_sum = T.alloc_buffer((tokens,), "int32")
            qh_scale = T.alloc_buffer((tokens,), "float32")

            def expert(e, n_slots):
                def gate_up_tile(rows, guards, s0, n):
                    toks = [T.Bind(slot_token[e, s0 + t]) for t in range(n)]

                    def q_at(t, s, byte):
                        return qx[toks[t], s, _lanes(byte, isa.chunk)]

                    for codes, scale, out in ((gate_codes, gate_scale, h), (up_codes, up_scale, u)):
                        dot = _int_tile(isa, d_bytes, lambda r, byte: codes[e, rows[r], _lanes(byte, isa.chunk)],
                                        q_at, len(rows), n)
                        for r, t in itertools.product(range(len(rows)), range(n)):
                            exact = dot(r, t) - 2 * qx_sum[toks[t]]
                            v = T.Cast("float32", exact) * qx_scale[toks[t]] * row_scale(scale, e, rows[r])
                            _guarded(guards[r], lambda: T.buffer_store(out, v, [s0 + t, rows[r]]))

                def down_tile(rows, guards, s0, n):
                    dot = _int_tile(isa, i_bytes, lambda r, byte: down_codes[e, rows[r], _lanes(byte, isa.chunk)],
                                    lambda t, s, byte: qh[s0 + t, s, _lanes(byte, isa.chunk)], len(rows), n)
                    for t in range(n):
                        tok, prob = T.Bind(slot_token[e, s0 + t]), T.Bind(slot_prob[e, s0 + t])
                        for r in range(len(rows)):
                            exact = dot(r, t) - 2 * qh_sum[s0 + t]
                            v = T.Cast("float32", exact) * qh_scale[s0 + t] * row_scale(down_scale, e, rows[r])
                            _guarded(guards[r], lambda: T.buffer_store(y, y[tok, rows[r]] + prob * v,
                                                                        [tok, rows[r]]))

                tiles = isa.int_tiles
                _row_blocks(inter, tiles.block_rows,
                            lambda rows, guards: _token_tiles(tiles, n_slots, rows, guards, gate_up_tile))
                with T.parallel(0, n_slots) as s:
                    _silu_times(h, u, s, inter)
                    _quantize(lambda kk, n: h[s, _lanes(kk, n)], inter, qh, qh_sum, qh_scale, s)
                _row_blocks(d, tiles.block_rows,
                            lambda rows, guards: _token_tiles(tiles, n_slots, rows, guards, down_tile))

            chosen_experts(expert)

    return _prim_func("routed_experts", body)


def routed_experts_float(num_experts: int, hidden: int, width: int, top_k: int,
                         target: tvm.target.Target) -> tirx.PrimFunc:
    """The float32 baseline of `routed_experts`: y [T, d] = sum_j top_p[t, j] * swiglu_{top_i[t, j]}(x[t]) with
    swiglu(x) = down(silu(gate x) * up x), the same routing, visiting order and tiling.

    Arguments: x float32 [T, d], top_i int32 [T, top_k], top_p float32 [T, top_k], gate_w float32 [E, I, d],
    up_w [E, I, d], down_w [E, d, I], y float32 [T, d].
    """
    isa = _isa(target)
    e_count, d, inter = num_experts, hidden, width

    def body():
        tokens = _token_var()
        x = T.arg("x", T.buffer((tokens, d), "float32"))
        top_i = T.arg("top_i", T.buffer((tokens, top_k), "int32"))
        top_p = T.arg("top_p", T.buffer((tokens, top_k), "float32"))
        gate_w = T.arg("gate_w", T.buffer((e_count, inter, d), "float32"))
        up_w = T.arg("up_w", T.buffer((e_count, inter, d), "float32"))
        down_w = T.arg("down_w", T.buffer((e_count, d, inter), "float32"))
        y = T.arg("y", T.buffer((tokens, d), "float32"))
        with T.sblock("root"):
            with T.parallel(0, tokens) as t:
                with T.serial(0, d) as i:
                    T.buffer_store(y, T.float32(0), [t, i])
            slot_token, slot_prob, chosen_experts = _route(e_count, top_k, tokens, top_i, top_p)
            h = T.alloc_buffer((tokens, inter), "float32")     # gate x, then silu(gate x) * (up x)
            u = T.alloc_buffer((tokens, inter), "float32")     # up x

            def expert(e, n_slots):
                def gate_up_tile(rows, guards, s0, n):
                    toks = [T.Bind(slot_token[e, s0 + t]) for t in range(n)]
                    for w, out in ((gate_w, h), (up_w, u)):
                        dot = _float_tile(isa, d, lambda r, kk, lanes: w[e, rows[r], _lanes(kk, lanes)],
                                          lambda t, kk, lanes: x[toks[t], _lanes(kk, lanes)], len(rows), n)
                        for r, t in itertools.product(range(len(rows)), range(n)):
                            _guarded(guards[r], lambda: T.buffer_store(out, dot(r, t), [s0 + t, rows[r]]))

                def down_tile(rows, guards, s0, n):
                    dot = _float_tile(isa, inter, lambda r, kk, lanes: down_w[e, rows[r], _lanes(kk, lanes)],
                                      lambda t, kk, lanes: h[s0 + t, _lanes(kk, lanes)], len(rows), n)
                    for t in range(n):
                        tok, prob = T.Bind(slot_token[e, s0 + t]), T.Bind(slot_prob[e, s0 + t])
                        for r in range(len(rows)):
                            _guarded(guards[r], lambda: T.buffer_store(y, y[tok, rows[r]] + prob * dot(r, t),
                                                                        [tok, rows[r]]))

                tiles = isa.float_tiles
                _row_blocks(inter, tiles.block_rows,
                            lambda rows, guards: _token_tiles(tiles, n_slots, rows, guards, gate_up_tile))
                with T.parallel(0, n_slots) as s:
                    _silu_times(h, u, s, inter)
                _row_blocks(d, tiles.block_rows,
                            lambda rows, guards: _token_tiles(tiles, n_slots, rows, guards, down_tile))

            chosen_experts(expert)

    return _prim_func("routed_experts_float", body)


def _route(e_count: int, top_k: int, tokens, top_i, top_p):
    """Group the tokens by expert: slot_token[e, s] / slot_prob[e, s] for s < count[e] list the tokens that chose
    expert e (in token order) and their weights. Returns those two buffers and chosen_experts(expert), which emits
    expert(e, count[e]) for each expert some token chose, in ascending order (the others cost one comparison).
    Out-of-range expert indices are ignored."""
    count = T.alloc_buffer((e_count,), "int32")
    slot_token = T.alloc_buffer((e_count, tokens), "int32")
    slot_prob = T.alloc_buffer((e_count, tokens), "float32")
    with T.serial(0, e_count) as e:
        T.buffer_store(count, T.int32(0), [e])
    with T.serial(0, tokens) as t:
        for j in range(top_k):
            e = T.Bind(top_i[t, j])
            with T.If(T.And(T.And(e >= 0, e < e_count), count[e] < T.Cast("int32", tokens))):
                with T.Then():
                    T.buffer_store(slot_token, T.Cast("int32", t), [e, count[e]])
                    T.buffer_store(slot_prob, top_p[t, j], [e, count[e]])
                    T.buffer_store(count, count[e] + 1, [e])

    def chosen_experts(expert):
        with T.serial(0, e_count) as e:
            n_slots = T.Bind(count[e])
            with T.If(n_slots > 0):
                with T.Then():
                    expert(e, n_slots)

    return slot_token, slot_prob, chosen_experts
