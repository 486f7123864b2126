// mote-export's ternary kernels: the compute of the `mote::` ops, free of any runtime dependency.
//
// The ExecuTorch bindings (mote_executorch.cpp) wrap these functions as `mote::*.out` kernels; the self-test
// (selftest.cpp) checks every instruction set this CPU runs against a plain reference written from the spec below.
//
// Numerics (export/semantics.py, restated because a kernel must):
//   Q8(v[K]):  amax = max(max_k |v_k|, 1e-5f);  inv = (1.0f / amax) * 127.0f;
//              q_k = clamp(round_half_even(v_k * inv), -128, 127);  s_v = amax / 127.0f
//   bitlinear: y_r = ((float)(sum_k t_rk q_k) * s_v) * s_w[r]      (t = code - 2; the integer sum is exact)
//   expert(x) = bitlinear_down(silu(bitlinear_gate(x)) * bitlinear_up(x)),  silu(g) = g / (1.0f + expf(-g))
//   routed(x_t) = sum over the token's chosen experts e, in ascending e, of p_te * expert_e(x_t), from 0.0f
//
// Storage (export/trits.py): 2-bit codes `code = trit + 2`, four per byte, lowest bits first along K, each row
// ceil(K/4) bytes (the last byte's unused codes are 2), rows contiguous. Scales: one per tensor or one per row.
//
// The weight-only quantized linear of `--quantize int4|int8` (mote.quantized_linear; export/semantics.py
// dequantize_weight), on fp32 activations, so that it keeps the reference's numerics (no activation quantisation):
//   W[r, k] = (float)q[r, k] * scale[r, k / group]       q in [-8, 7] (bits 4) or [-128, 127] (bits 8)
//   y[t, r] = bias[r] (or 0) + sum_k x[t, k] * W[r, k]   fp32; the order of the sums is the kernel's own (and
//                                                        scale * sum_{k in group} q * x counts as that): results
//                                                        agree with a plain fp32 reference to fp32 rounding, not
//                                                        bit for bit
// Storage (targets/executorch/quantized.py): scale fp32 [rows, K / group], row-major.
//   bits 8: q int8 [rows, K] row-major; `group` divides K (K itself: per output channel).
//   bits 4: uint8 [rows, K/2]; K and group multiples of 32. Each row is K/32 spans of 16 bytes, byte i of span s
//           holding q[32s + i] + 8 in its low nibble and q[32s + 16 + i] + 8 in its high nibble (llama.cpp's Q4_0
//           order: a mask gives values 0..15 of the span, a shift 16..31, each 16 consecutive inputs).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>

namespace mote {

// Bumped whenever an op's schema or meaning changes; the .pte records the version it needs.
constexpr int kKernelsVersion = 2;  // 2: packed_quantized_linear

// Instruction sets with a kernel. `detect_isa()` is the best one compiled in that this CPU runs.
enum class Isa { kScalar, kAvx2, kAvx512Vnni, kNeon, kNeonDot };
Isa detect_isa();
bool isa_supported(Isa isa);   // compiled into this build and runnable on this CPU
const char* isa_name(Isa isa); // "scalar", "avx2", "avx512vnni", "neon", "neon-dotprod"

// fn(begin, end) over [0, n) in chunks of at least `grain` items; chunks may run concurrently, and the call returns
// when all of them finished. The bindings pass ExecuTorch's threadpool; `serial()` runs fn(0, n) inline.
using ParallelFor =
    std::function<void(int64_t n, int64_t grain, const std::function<void(int64_t begin, int64_t end)>& fn)>;
ParallelFor serial();

// One ternary matrix [rows, K].
struct TernaryMatrix {
  const uint8_t* codes;   // rows * ceil(K/4) bytes
  const float* scale;     // 1 value, or `rows` values when per_row_scale
  int64_t rows;
  int64_t k;
  bool per_row_scale;
};

// E stacked ternary matrices [E, rows, K]: expert e's codes at codes + e * rows * ceil(K/4), its scales at
// scale + e * (per_row_scale ? rows : 1).
struct TernaryExperts {
  const uint8_t* codes;
  const float* scale;
  int64_t experts;
  int64_t rows;
  int64_t k;
  bool per_row_scale;
  TernaryMatrix expert(int64_t e) const;
};

// The routed experts of one MoE block: gate and up [E, I, d], down [E, d, I].
struct RoutedExperts {
  TernaryExperts gate, up, down;
};

// E stacked fp32 matrices [E, rows, K] (row-major, rows contiguous): the benchmark's fp32-expert baseline.
struct FloatExperts {
  const float* weight;
  int64_t experts;
  int64_t rows;
  int64_t k;
};
struct RoutedFloatExperts {
  FloatExperts gate, up, down;
};

// Scratch bytes the calls below need for n tokens (64-byte aligned workspace; contents need not be initialised).
size_t ternary_linear_workspace(int64_t n, const TernaryMatrix& w);
size_t routed_experts_workspace(int64_t n, int64_t top_k, const RoutedExperts& w);
size_t routed_experts_float_workspace(int64_t n, int64_t top_k, const RoutedFloatExperts& w);

// y[n, rows] = bitlinear(x[n, K]) for each of the n rows of x.
void ternary_linear(Isa isa, const float* x, int64_t n, const TernaryMatrix& w, float* y, void* workspace,
                    const ParallelFor& parallel);

// y[n, d] = routed(x[n, d]) given the router's choice: top_i[n, top_k] expert ids (int64, each in [0, E), distinct
// per token) and top_p[n, top_k] their weights. Tokens are grouped by expert: each chosen expert's codes are read
// once per call, and experts nobody chose are not read. Returns nullptr, or a message when an id is out of range
// (y is then unspecified).
const char* routed_experts(Isa isa, const float* x, int64_t n, const float* top_p, const int64_t* top_i,
                           int64_t top_k, const RoutedExperts& w, float* y, void* workspace,
                           const ParallelFor& parallel);

// The same routing over fp32 experts: expert(x) = down(silu(gate x) * (up x)), plain fp32 dot products (the order
// of the sums is the kernel's own: results agree with torch to fp32 rounding, not bit for bit).
const char* routed_experts_float(Isa isa, const float* x, int64_t n, const float* top_p, const int64_t* top_i,
                                 int64_t top_k, const RoutedFloatExperts& w, float* y, void* workspace,
                                 const ParallelFor& parallel);

// One weight-only quantized matrix [rows, K] in the storage above.
struct QuantizedMatrix {
  const uint8_t* data;  // bits 4: rows * K/2 bytes as above; bits 8: rows * K int8 bytes
  const float* scale;   // rows * (K / group)
  int64_t rows, k, group;
  int bits;             // 4 or 8
};

// Scratch bytes quantized_linear needs for n tokens (64-byte aligned, contents need not be initialised). The kernels
// of this version need none (the prefill path's dequantized tiles, 32 KiB at most, live on the stack of the thread
// that uses them, which a shared workspace could not give per thread), so it is 0; the bindings ask for it anyway, so
// that a kernel that needs scratch later does not change their contract.
size_t quantized_linear_workspace(int64_t n, const QuantizedMatrix& w);

// y[n, rows] for x[n, K]; bias [rows] may be nullptr. Returns nullptr, or a message for an invalid matrix (bits not 4
// or 8, K or group not positive, group not dividing K, int4 with K or group not a multiple of 32); y is then
// untouched. Few tokens (decode) read the packed rows directly; more dequantize a tile of rows once and reuse it
// for every token. Work is split over `parallel` by blocks of rows.
const char* quantized_linear(Isa isa, const float* x, int64_t n, const QuantizedMatrix& w, const float* bias,
                             float* y, void* workspace, const ParallelFor& parallel);

// y[n, rows] = x[n, K] w^T for fp32 w [rows, K] (row-major): the benchmark's fp32 baseline of quantized_linear,
// split over `parallel` the same way, plain fp32 dot products in the kernel's own order.
void float_linear(Isa isa, const float* x, int64_t n, const float* w, int64_t rows, int64_t k, float* y,
                  const ParallelFor& parallel);

}  // namespace mote
