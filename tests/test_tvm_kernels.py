"""targets/tvm/kernels.py: the TensorIR kernels of the TVM target, built for this host (x86-64-v3) and run against
PyTorch, and built for the phones' aarch64 targets and inspected (nothing here can run aarch64 code).

- ternary_linear equals the mote.ternary_linear op bit for bit (odd K, per-tensor and per-channel scales, a
  partial block of rows, token runs with every remainder, zero / tiny / tie-rounding activation rows);
- routed_experts equals the composition of export.semantics that mote.moe_ffn computes (minus the shared expert),
  top-1 and top-2, and never reads an expert no token chose; routed_experts_float equals the float SwiGLU experts;
  linear equals F.linear; batch_matmul equals torch.matmul;
- quantized_linear equals F.linear with the weight `semantics.dequantize_weight` gives (int8 and int4, groups of 32
  and 64 and per output channel, odd K, biases), quantized_embedding the dequantized rows bit for bit; int4 weights
  are stored two per byte (`pack_int4`, checked against a decoder written here);
- the same loops with the other instruction choices: x86 without AVX2 (the portable loop, as on aarch64 without
  dotprod) and, where this CPU has AVX-VNNI, its four-bytes-per-lane dot product (the loop shape of sdot);
- aarch64: +dotprod builds use sdot, +neon builds compile without it; the quantized kernels dequantize with NEON.

Compiled kernels are cached per (target, builder, sizes) so that the file compiles each one once.
"""
from __future__ import annotations

import functools
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch

tvm = pytest.importorskip("tvm")

from mote.export import semantics  # noqa: E402
from mote.export.trits import pack_trits, unpack  # noqa: E402
from mote.passes import ops  # noqa: E402
from mote.targets.tvm import kernels  # noqa: E402

TARGETS = {
    "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"},
    "x86_portable": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"},
    "x86_vnni": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3", "mattr": ["+avxvnni"]},
    "aarch64_dotprod": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
    "aarch64_neon": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
}


def _cpu_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    return set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()


_RUNNABLE = {"host": {"avx2", "fma"}, "x86_portable": set(), "x86_vnni": {"avx2", "fma", "avx_vnni"}}


def on(target_key: str, *args):
    """Test parameters (target_key, *args), skipped unless this machine can run the target's code."""
    ok = platform.machine() == "x86_64" and _RUNNABLE[target_key] <= _cpu_flags()
    return pytest.param(target_key, *args, marks=pytest.mark.skipif(not ok, reason=f"this CPU cannot run {target_key}"))


needs_x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="runs x86-64 code")


@functools.cache
def compiled(target_key: str, builder: str, *sizes):
    target = tvm.target.Target(TARGETS[target_key])
    return tvm.compile(getattr(kernels, builder)(*sizes, target), target=target)


def run(lib, out_shape, *arrays) -> np.ndarray:
    out = tvm.runtime.empty(out_shape, "float32")
    lib(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


def activations(tokens: int, k: int, seed: int) -> torch.Tensor:
    """Random rows with outliers, plus (when there is room) an all-zero row, a row below the 1e-5 amax clamp and a
    row whose quantization has exact .5 ties (amax 127 makes 1/amax * 127 exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g) * torch.rand(tokens, 1, generator=g) * 4
    x[:, 0] += 20 * torch.randn(tokens, generator=g)
    if tokens >= 5:
        x[1] = 0
        x[2] *= 1e-7
        x[3] = torch.randint(-60, 60, (k,), generator=g) + 0.5
        x[3, 0] = 127
    return x


def random_codes(shape, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Random trits [..., rows, k] packed canonically, and in the kernel layout."""
    trits = torch.randint(-1, 2, (*shape, k), generator=torch.Generator().manual_seed(seed))
    packed = pack_trits(trits)
    return packed, kernels.kernel_codes(packed.numpy(), k)


# -- layout ------------------------------------------------------------------------------------------------------------

def test_kernel_codes_pad_rows_with_zero_trits():
    """The kernel layout is the canonical codes plus trit-0 padding, and identity when rows are already whole."""
    packed, padded = random_codes((2, 3), 72, seed=0)
    assert padded.shape == (2, *kernels.kernel_code_shape(3, 72)) == (2, 3, 32)
    assert np.array_equal(padded[..., :18], packed.numpy())
    assert torch.equal(unpack(torch.from_numpy(padded), 128)[..., 72:], torch.zeros(2, 3, 56))
    packed, padded = random_codes((5,), 1024, seed=1)
    assert np.array_equal(padded, packed.numpy())
    with pytest.raises(ValueError):
        kernels.kernel_codes(packed.numpy(), 1000)


# -- ternary_linear ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_key, n_out, k, per_channel", [
    on("host", 40, 72, True),
    on("host", 33, 80, False),
    on("host", 24, 1030, True),
    on("x86_portable", 33, 80, True),
    on("x86_vnni", 33, 80, True),
])
def test_ternary_linear_is_bit_exact(target_key, n_out, k, per_channel):
    """ternary_linear == the mote.ternary_linear op bit for bit: odd K (partial last byte, padding), whole vector
    groups plus a scalar tail (K = 1030), a partial last block of rows (33), per-tensor and per-channel scales, and
    1, 2, 5, 7 tokens (decode, and runs of token tiles with each remainder), on every instruction choice."""
    lib = compiled(target_key, "ternary_linear", n_out, k, per_channel)
    packed, codes = random_codes((n_out,), k, seed=k)
    scale = torch.rand(n_out if per_channel else 1, generator=torch.Generator().manual_seed(1)) + 0.05
    for tokens in (1, 2, 5, 7):
        x = activations(tokens, k, seed=tokens)
        expected = ops.ternary_linear(x, packed, scale, k).numpy()     # torch.ops.mote.ternary_linear
        got = run(lib, (tokens, n_out), x.numpy(), codes, scale.numpy())
        assert np.array_equal(got, expected), f"T={tokens}: max diff {np.abs(got - expected).max()}"


# -- routed experts ----------------------------------------------------------------------------------------------------

E, D, INTER = 4, 72, 100


def routed_weights(per_channel: bool, seed: int):
    """Stacked packed codes and scales of E experts: [(packed, kernel codes, scales)] for gate, up, down."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (rows, k) in enumerate(((INTER, D), (INTER, D), (D, INTER))):
        packed, codes = random_codes((E, rows), k, seed=seed + i)
        out.append((packed, codes, torch.rand(E, rows if per_channel else 1, generator=g) + 0.05))
    return out


def route(tokens: int, top_k: int, seed: int, experts=range(E)):
    """top_i int32 [T, k], top_p [T, k] as the router computes them (softmax, top-k, renormalised for k > 1), over
    the given experts only (the others get -inf logits)."""
    logits = torch.full((tokens, E), -torch.inf)
    logits[:, list(experts)] = torch.randn(tokens, len(experts), generator=torch.Generator().manual_seed(seed))
    _, top_p, top_i = semantics.route_top_k(logits, top_k, norm_topk_prob=top_k > 1)
    return top_i.to(torch.int32), top_p


def routed_reference(x, top_i, top_p, expert_output) -> np.ndarray:
    """mote.moe_ffn's routed part: semantics.moe_combine over the chosen experts, in expert order, shared = 0."""
    combine = torch.zeros(x.shape[0], E).scatter(-1, top_i.long(), top_p)
    return semantics.moe_combine(torch.zeros_like(x), combine, expert_output,
                                 semantics.selected_experts(combine)).numpy()


def ternary_reference(x, top_i, top_p, weights) -> np.ndarray:
    def scale(s):   # one scale per tensor is stored as [1]; semantics takes it as a scalar
        return s.reshape(()) if s.numel() == 1 else s

    (gate, _, gate_s), (up, _, up_s), (down, _, down_s) = weights

    def expert_output(e):
        return semantics.ternary_expert(x, unpack(gate[e], D), scale(gate_s[e]), unpack(up[e], D), scale(up_s[e]),
                                        unpack(down[e], INTER), scale(down_s[e]))

    return routed_reference(x, top_i, top_p, expert_output)


def run_routed(lib, x, top_i, top_p, weights) -> np.ndarray:
    tensors = [a for _, codes, scale in weights for a in (codes, scale.numpy())]
    return run(lib, tuple(x.shape), x.numpy(), top_i.numpy(), top_p.numpy(), *tensors)


def assert_close(got, expected, rtol=1e-5):
    """Equal up to float rounding: |got - expected| <= rtol * max|expected| everywhere."""
    assert np.isfinite(got).all()
    err = np.abs(got - expected).max() / np.abs(expected).max()
    assert err <= rtol, f"max relative difference {err}"


@pytest.mark.parametrize("target_key, top_k, per_channel", [
    on("host", 1, False),
    on("host", 2, True),
    on("x86_portable", 2, True),
    on("x86_vnni", 2, True),
])
def test_routed_experts_match_semantics(target_key, top_k, per_channel):
    """routed_experts == sum_j top_p * ternary_expert_{top_i}(x) of export.semantics (what mote.moe_ffn computes,
    minus the shared expert) for decode and for prefills whose experts get 0 .. 5 tokens each (token runs and
    remainders), top-1 and top-2, per-tensor and per-channel scales. Only silu's exp differs from torch's (by an
    ulp at most), and the combine uses FMA: ~1e-7 relative."""
    lib = compiled(target_key, "routed_experts", E, D, INTER, top_k, per_channel)
    weights = routed_weights(per_channel, seed=top_k)
    for tokens in (1, 6, 11):
        x = activations(tokens, D, seed=10 + tokens)
        top_i, top_p = route(tokens, top_k, seed=tokens)
        assert_close(run_routed(lib, x, top_i, top_p, weights), ternary_reference(x, top_i, top_p, weights))


@needs_x86
def test_routed_experts_read_only_chosen_experts():
    """An expert no token chose is never read: with its codes and scales replaced by garbage (code 0, NaN scales)
    the output is finite and unchanged, at decode and in a prefill."""
    lib = compiled("host", "routed_experts", E, D, INTER, 2, True)
    weights = routed_weights(True, seed=5)
    poisoned = [(packed, codes.copy(), scale.clone()) for packed, codes, scale in weights]
    for _, codes, scale in poisoned:
        codes[2] = 0
        scale[2] = torch.nan
    for tokens in (1, 9):
        x = activations(tokens, D, seed=tokens)
        top_i, top_p = route(tokens, 2, seed=tokens, experts=(0, 1, 3))
        clean = run_routed(lib, x, top_i, top_p, weights)
        assert np.array_equal(run_routed(lib, x, top_i, top_p, poisoned), clean)
        assert np.isfinite(clean).all()


@needs_x86
def test_routed_experts_float_match_swiglu():
    """routed_experts_float == sum_j top_p * swiglu_{top_i}(x) with float32 expert weights (the benchmark baseline),
    top-2, decode and prefill, up to float rounding."""
    lib = compiled("host", "routed_experts_float", E, D, INTER, 2)
    g = torch.Generator().manual_seed(3)
    gate, up = (torch.randn(E, INTER, D, generator=g) * 0.1 for _ in range(2))
    down = torch.randn(E, D, INTER, generator=g) * 0.1
    for tokens in (1, 6, 11):
        x = activations(tokens, D, seed=tokens)
        top_i, top_p = route(tokens, 2, seed=tokens)
        expected = routed_reference(x, top_i, top_p, lambda e: semantics.swiglu(x, gate[e], up[e], down[e]))
        got = run(lib, (tokens, D), x.numpy(), top_i.numpy(), top_p.numpy(), gate.numpy(), up.numpy(), down.numpy())
        assert_close(got, expected)


# -- linear ------------------------------------------------------------------------------------------------------------

@needs_x86
@pytest.mark.parametrize("n_out, k, bias", [(37, 83, True), (40, 72, False)])
def test_linear_matches_torch(n_out, k, bias):
    """linear == F.linear up to float rounding: with and without bias, K not a multiple of the vector width, a
    partial block of rows, 1 and 7 tokens."""
    lib = compiled("host", "linear", n_out, k, bias)
    g = torch.Generator().manual_seed(k)
    w, b = torch.randn(n_out, k, generator=g), torch.randn(n_out, generator=g)
    for tokens in (1, 7):
        x = torch.randn(tokens, k, generator=g)
        expected = torch.nn.functional.linear(x, w, b if bias else None).numpy()
        got = run(lib, (tokens, n_out), x.numpy(), w.numpy(), *([b.numpy()] if bias else []))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# -- quantized weights (--quantize) ----------------------------------------------------------------------------------

def unpack_nibbles(packed: np.ndarray, k: int) -> np.ndarray:
    """The layout `pack_int4` documents, decoded independently: per span of 32 weights (16 bytes), byte j holds
    weight j in its low nibble and weight 16 + j in its high nibble, two's complement."""
    low, high = (packed & 0xF).astype(np.int8), (packed >> 4).astype(np.int8)
    low, high = np.where(low > 7, low - 16, low), np.where(high > 7, high - 16, high)
    spans = np.concatenate([low.reshape(*packed.shape[:-1], -1, 16), high.reshape(*packed.shape[:-1], -1, 16)], -1)
    return spans.reshape(*packed.shape[:-1], -1)[..., :k].astype(np.int8)


def quantized(rows: int, k: int, bits: int, group: int, seed: int):
    """A random weight quantized by `semantics.quantize_weight`: (q int8, scales, q in the kernel layout)."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)) * 0.2
    q, s = semantics.quantize_weight(w, bits, group)
    return q, s, kernels.pack_int4(q.numpy()) if bits == 4 else q.numpy()


@pytest.mark.parametrize("k", [32, 83, 1030])
def test_int4_weights_are_stored_two_per_byte(k):
    """pack_int4: half a byte per weight (the last span of 32 padded with zeros), every value in [-8, 7] recovered;
    values that do not fit 4 bits are refused."""
    q = torch.randint(-8, 8, (3, k), generator=torch.Generator().manual_seed(k), dtype=torch.int8).numpy()
    packed = kernels.pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == kernels.quantized_weight_shape(3, k, 4)
    assert packed.shape == (3, -(-k // 32) * 16)
    assert np.array_equal(unpack_nibbles(packed, k), q)
    assert not unpack_nibbles(packed, packed.shape[-1] * 2)[:, k:].any()
    with pytest.raises(ValueError):
        kernels.pack_int4(q * 2)


@pytest.mark.parametrize("target_key, n_out, k, bits, group, bias", [
    on("host", 37, 96, 4, 32, True),        # groups of 32, a partial block of rows
    on("host", 33, 128, 4, 64, False),
    on("host", 37, 83, 4, 83, False),       # per output channel, K = 2 spans + 19 (vectors, then scalars)
    on("host", 5, 1030, 4, 1030, True),
    on("host", 40, 83, 8, 83, True),
    on("host", 24, 96, 8, 32, False),
    on("x86_portable", 37, 83, 4, 83, True),
    on("x86_portable", 24, 96, 8, 32, True),
])
def test_quantized_linear_matches_dequantized_linear(target_key, n_out, k, bits, group, bias):
    """quantized_linear == F.linear(x, semantics.dequantize_weight(q, s), b) (what mote.quantized_linear computes)
    up to float rounding (the order of the fp32 sums), at decode and for 2, 5, 7 tokens (token runs and each
    remainder)."""
    lib = compiled(target_key, "quantized_linear", n_out, k, bits, group, bias)
    q, s, stored = quantized(n_out, k, bits, group, seed=n_out + k)
    b = torch.randn(n_out, generator=torch.Generator().manual_seed(2))
    weight = semantics.dequantize_weight(q, s, group)
    for tokens in (1, 2, 5, 7):
        x = activations(tokens, k, seed=tokens)
        expected = torch.nn.functional.linear(x, weight, b if bias else None).numpy()
        got = run(lib, (tokens, n_out), x.numpy(), stored, s.numpy(), *([b.numpy()] if bias else []))
        assert_close(got, expected)


@needs_x86
@pytest.mark.parametrize("vocab, d, bits, group", [(50, 96, 4, 32), (50, 83, 4, 83), (50, 83, 8, 83),
                                                   (50, 128, 8, 64)])
def test_quantized_embedding_gathers_dequantized_rows(vocab, d, bits, group):
    """quantized_embedding == the rows of semantics.dequantize_weight(q, s) bit for bit (one fp32 product per
    value), for 1 and 6 tokens (repeated ids, the first and the last row)."""
    lib = compiled("host", "quantized_embedding", vocab, d, bits, group)
    q, s, stored = quantized(vocab, d, bits, group, seed=d)
    table = semantics.dequantize_weight(q, s, group).numpy()
    for ids in ([7], [0, 49, 3, 3, 17, 0]):
        ids = np.array(ids, dtype=np.int64)
        assert np.array_equal(run(lib, (len(ids), d), ids, stored, s.numpy()), table[ids])


# -- batch_matmul ------------------------------------------------------------------------------------------------------

@needs_x86
@pytest.mark.parametrize("batch, k, n", [(8, 32, 128), (8, 128, 32), (3, 37, 100)])
def test_batch_matmul_matches_torch(batch, k, n):
    """batch_matmul == torch.matmul up to float rounding, for both attention shapes (q @ k^T: k = head_dim, n = S;
    p @ v: k = S, n = head_dim) and odd k and n (a last column block of whole vectors plus scalars), at decode (a
    lone row) and at 7 and 13 tokens (full runs of rows plus remainders)."""
    lib = compiled("host", "batch_matmul", batch, k, n)
    g = torch.Generator().manual_seed(k + n)
    b = torch.randn(batch, k, n, generator=g)
    for tokens in (1, 7, 13):
        a = torch.randn(batch, tokens, k, generator=g)
        assert_close(run(lib, (batch, tokens, n), a.numpy(), b.numpy()), torch.matmul(a, b).numpy())


# -- aarch64 -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_key", ["aarch64_dotprod", "aarch64_neon"])
@pytest.mark.parametrize("builder, sizes, ternary", [
    ("ternary_linear", (33, 80, True), True),
    ("routed_experts", (E, D, INTER, 2, True), True),
    ("routed_experts_float", (E, D, INTER, 2), False),
    ("linear", (37, 83, True), False),
    ("batch_matmul", (8, 37, 100), False),
])
def test_aarch64_builds(target_key, builder, sizes, ternary):
    """Every kernel compiles for the phones; the ternary ones use sdot exactly when the target has +dotprod (the
    plain NEON build falls back to widening multiplies), the float ones vector FMAs."""
    asm = compiled(target_key, builder, *sizes).mod.inspect_source("asm")
    if ternary:
        assert ("sdot" in asm) == (target_key == "aarch64_dotprod")
    else:
        assert "fmla" in asm


@pytest.mark.parametrize("target_key", ["aarch64_dotprod", "aarch64_neon"])
@pytest.mark.parametrize("builder, sizes", [
    ("quantized_linear", (37, 96, 4, 32, True)),
    ("quantized_linear", (40, 83, 8, 83, True)),
    ("quantized_embedding", (50, 96, 4, 32)),
])
def test_aarch64_quantized_builds(target_key, builder, sizes):
    """The quantized kernels compile for the phones, dequantizing with NEON: integer-to-float vector conversions
    (scvtf), int4 nibbles sign-extended by vector shifts (sshr), the linears accumulating with vector FMAs."""
    asm = compiled(target_key, builder, *sizes).mod.inspect_source("asm")
    bits = sizes[2]
    assert re.search(r"\bscvtf\s+v\d+\.4s", asm)
    assert bits != 4 or re.search(r"\bsshr\s+v\d+\.4s", asm)
    assert builder != "quantized_linear" or re.search(r"\bfmla\s+v\d+\.4s", asm)
