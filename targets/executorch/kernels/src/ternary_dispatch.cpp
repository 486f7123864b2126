// The ops around the instruction-set kernels: CPU detection, activation quantisation, routing, threading and the
// workspace. Compiled for the architecture's baseline: every vector instruction lives in a ternary_<isa>.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "mote_ternary.h"
#include "ternary_isa.h"

#if defined(__aarch64__) && defined(__linux__)  // Linux and Android
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace mote {
namespace {

// ---- instruction sets

#if defined(__x86_64__) || defined(_M_X64)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512vnni() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}
#endif

#if defined(__aarch64__)
bool cpu_has_dotprod() {
#if defined(__linux__)
  return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#elif defined(__APPLE__)
  int has = 0;
  size_t size = sizeof(has);
  return sysctlbyname("hw.optional.arm.FEAT_DotProd", &has, &size, nullptr, 0) == 0 && has != 0;
#else
  return false;
#endif
}
#endif

// The kernels of `isa`; one this build or CPU cannot run falls back to the portable kernels rather than fault.
const isa::Kernels& kernels_for(Isa isa) {
  if (!isa_supported(isa)) return isa::scalar_kernels();
  switch (isa) {
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2: return isa::avx2_kernels();
    case Isa::kAvx512Vnni: return isa::avx512_kernels();
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return isa::neon_kernels();
    case Isa::kNeonDot: return isa::neon_dotprod_kernels();
#endif
    default: return isa::scalar_kernels();
  }
}

// The kernels for a ternary matrix of K columns. AVX-512 VNNI reads 64 code bytes (256 weights) per vector, and below
// 512 weights per row AVX2's 32-byte vectors win: on a Sapphire Rapids Xeon (one thread, top-1 routed block, n = 1)
// 0.0032 vs 0.0057 ms at d=128, I=256 and 0.0084 vs 0.0099 ms at d=256, I=512; 0.024 vs 0.026 ms at d=512,
// I=1024. Every kernel gives the same bits, so the choice is only one of speed. (The fp32 kernels keep `isa`.)
constexpr int64_t kVnniMinK = 512;
const isa::Kernels& code_kernels_for(Isa isa, int64_t k) {
  if (isa == Isa::kAvx512Vnni && k < kVnniMinK) return kernels_for(Isa::kAvx2);
  return kernels_for(isa);
}

// ---- sizes, scratch and threads

constexpr int64_t kMaxGroup = 64;     // widest `group_bytes` of any kernel: the activation buffers fit them all
constexpr int64_t kRowChunk = 32;     // output rows per parallel work item
constexpr int64_t kTokenChunk = 32;   // tokens per kernel call, bounding the per-item stack buffers
constexpr int64_t kQuantGrain = 1 << 15;  // values quantised per work item (a call with fewer runs inline)

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
int64_t ceil_div(int64_t v, int64_t m) { return (v + m - 1) / m; }
int64_t row_bytes(int64_t k) { return ceil_div(k, 4); }
// One token's quantised activations: whole blocks of every kernel's layout.
int64_t act_len(int64_t k) { return round_up(row_bytes(k), kMaxGroup) * 4; }

// Hands out 64-byte aligned arrays from the workspace; with no workspace it only adds up their size, so that one
// function both sizes and carves each op's scratch.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<char*>(base)) {}
  template <class T>
  T* take(int64_t count) {
    used_ = static_cast<size_t>(round_up(static_cast<int64_t>(used_), 64));
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += static_cast<size_t>(count) * sizeof(T);
    return p;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// Runs body(begin, end) over [0, count) on the caller's ParallelFor, each index a work item. The body goes by
// reference (std::cref): no std::function allocation per call.
template <class Body>
void run_parallel(const ParallelFor& parallel, int64_t count, const Body& body) {
  if (count <= 0) return;
  if (count == 1) return body(0, 1);
  parallel(count, 1, std::cref(body));
}

// ---- activation quantisation (numerics in mote_ternary.h)

// Q8 values as the kernels read them: q, the sum of q, and s_v per token, `len` values per token.
struct Activations {
  int8_t* q;
  int32_t* sum;
  float* scale;
  int64_t len;

  const int8_t* token(int64_t t) const { return q + t * len; }
};

Activations take_activations(Carver& c, int64_t tokens, int64_t k) {
  Activations a{};
  a.len = act_len(k);
  a.q = c.take<int8_t>(tokens * a.len);
  a.sum = c.take<int32_t>(tokens);
  a.scale = c.take<float>(tokens);
  return a;
}

// Q8 of `tokens` rows of v (row stride k), in parallel when there is enough of it.
void quantize_rows(const isa::Kernels& kernels, const float* v, int64_t tokens, int64_t k, const Activations& out,
                   const ParallelFor& parallel) {
  const int64_t per_item = std::max<int64_t>(1, kQuantGrain / std::max<int64_t>(k, 1));
  run_parallel(parallel, ceil_div(tokens, per_item), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin * per_item; t < std::min(tokens, end * per_item); ++t) {
      kernels.quantize(v + t * k, k, out.q + t * out.len, out.len, out.sum + t, out.scale + t);
    }
  });
}

// out[r] = ((float)(sum_k t_k q_k) * s_v) * s_w[r0 + r] for one token's `rows` code dots (codes = trits + 2, so
// sum_k t_k q_k = dot - 2 * sum_k q_k). One loop per scale kind, so that both vectorise.
void dequantize_rows(const int32_t* dots, int64_t rows, int32_t q_sum, float s_v, const TernaryMatrix& m, int64_t r0,
                     float* out) {
  const int32_t bias = 2 * q_sum;
  if (m.per_row_scale) {
    for (int64_t r = 0; r < rows; ++r) out[r] = (static_cast<float>(dots[r] - bias) * s_v) * m.scale[r0 + r];
  } else {
    const float s_w = m.scale[0];
    for (int64_t r = 0; r < rows; ++r) out[r] = (static_cast<float>(dots[r] - bias) * s_v) * s_w;
  }
}

float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ---- ternary_linear

struct LinearScratch {
  Activations x;
  const int8_t** x_ptr;  // per token
};

LinearScratch carve_linear(Carver& c, int64_t n, const TernaryMatrix& w) {
  LinearScratch s{};
  s.x = take_activations(c, n, w.k);
  s.x_ptr = c.take<const int8_t*>(n);
  return s;
}

// ---- routing: the (token, slot) pairs grouped by expert, experts ascending, tokens ascending within an expert

const char* check_ids(const int64_t* top_i, int64_t count, int64_t experts) {
  for (int64_t i = 0; i < count; ++i) {
    if (top_i[i] < 0 || top_i[i] >= experts) return "mote: a routed expert id (top_i) is outside [0, E)";
  }
  return nullptr;
}

struct Routing {
  int64_t* offset;  // [E + 1]: expert e's pairs are [offset[e], offset[e + 1]) of the sorted order
  int64_t* active;  // the experts with pairs, ascending
  int64_t n_active;
  int64_t* token;   // [n * top_k] per sorted pair: its token
  float* weight;    // [n * top_k] per sorted pair: its p
};

Routing take_routing(Carver& c, int64_t pairs, int64_t experts) {
  Routing r{};
  r.offset = c.take<int64_t>(experts + 1);
  r.active = c.take<int64_t>(experts);
  r.token = c.take<int64_t>(pairs);
  r.weight = c.take<float>(pairs);
  return r;
}

// A counting sort of the pairs by expert id (stable: each expert's tokens stay in ascending order).
void group_by_expert(const float* top_p, const int64_t* top_i, int64_t n, int64_t top_k, int64_t experts,
                     Routing& route) {
  std::fill(route.offset, route.offset + experts + 1, 0);
  for (int64_t i = 0; i < n * top_k; ++i) ++route.offset[top_i[i] + 1];
  route.n_active = 0;
  for (int64_t e = 0; e < experts; ++e) {
    if (route.offset[e + 1] > 0) route.active[route.n_active++] = e;
    route.offset[e + 1] += route.offset[e];
  }
  // Fill with offset[e] as expert e's cursor (it ends at the next expert's start), then shift the starts back.
  for (int64_t i = 0; i < n * top_k; ++i) {
    const int64_t pos = route.offset[top_i[i]]++;
    route.token[pos] = i / top_k;
    route.weight[pos] = top_p[i];
  }
  for (int64_t e = experts; e > 0; --e) route.offset[e] = route.offset[e - 1];
  route.offset[0] = 0;
}

// The two passes of the routed experts, shared by the ternary and the fp32 experts (`Ops`, below):
//   1. for each (active expert, chunk of I rows): gate and up of the expert's tokens, h = silu(g) * u per pair;
//   2. Ops::prepare_hidden (the ternary experts quantise h);
//   3. for each chunk of d rows: y = 0, then for each active expert in ascending id, y_t = y_t + p * down(h).
// Each y element is written by one work item, experts ascending: the summation order of the spec.
template <class Ops>
void routed_passes(const Ops& ops, const Routing& route, int64_t n, float* h, float* y,
                   const ParallelFor& parallel) {
  const int64_t inter = ops.inter(), d = ops.dim();
  const int64_t chunks = ceil_div(inter, kRowChunk);
  run_parallel(parallel, route.n_active * chunks, [&](int64_t begin, int64_t end) {
    float g[kTokenChunk * kRowChunk], u[kTokenChunk * kRowChunk];
    for (int64_t item = begin; item < end; ++item) {
      // Chunk-major, so that a static split of the items (ExecuTorch's pool) gives every thread all the experts.
      const int64_t e = route.active[item % route.n_active], r0 = item / route.n_active * kRowChunk;
      const int64_t rows = std::min(kRowChunk, inter - r0);
      for (int64_t p0 = route.offset[e]; p0 < route.offset[e + 1]; p0 += kTokenChunk) {
        const int64_t nt = std::min(kTokenChunk, route.offset[e + 1] - p0);
        ops.gate_up(e, r0, rows, p0, nt, g, u);
        for (int64_t t = 0; t < nt; ++t) {
          for (int64_t r = 0; r < rows; ++r) h[(p0 + t) * inter + r0 + r] = silu(g[t * rows + r]) * u[t * rows + r];
        }
      }
    }
  });
  ops.prepare_hidden(h, parallel);
  run_parallel(parallel, ceil_div(d, kRowChunk), [&](int64_t begin, int64_t end) {
    float o[kTokenChunk * kRowChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kRowChunk, rows = std::min(kRowChunk, d - r0);
      for (int64_t t = 0; t < n; ++t) std::fill(y + t * d + r0, y + t * d + r0 + rows, 0.0f);
      for (int64_t a = 0; a < route.n_active; ++a) {
        const int64_t e = route.active[a];
        for (int64_t p0 = route.offset[e]; p0 < route.offset[e + 1]; p0 += kTokenChunk) {
          const int64_t nt = std::min(kTokenChunk, route.offset[e + 1] - p0);
          ops.down(e, r0, rows, p0, nt, o);
          for (int64_t t = 0; t < nt; ++t) {
            float* yt = y + route.token[p0 + t] * d + r0;
            const float p = route.weight[p0 + t];
            for (int64_t r = 0; r < rows; ++r) yt[r] = yt[r] + p * o[t * rows + r];
          }
        }
      }
    }
  });
}

// ---- routed ternary experts

struct RoutedScratch {
  Activations x;         // per token
  Routing route;
  const int8_t** x_ptr;  // per sorted pair: its token's quantised x
  float* h;              // per sorted pair: silu(gate x) * up x, [I]
  Activations hq;        // per sorted pair: Q8(h)
  const int8_t** h_ptr;  // per sorted pair
};

RoutedScratch carve_routed(Carver& c, int64_t n, int64_t top_k, const RoutedExperts& w) {
  RoutedScratch s{};
  const int64_t pairs = n * top_k;
  s.x = take_activations(c, n, w.gate.k);
  s.route = take_routing(c, pairs, w.gate.experts);
  s.x_ptr = c.take<const int8_t*>(pairs);
  s.h = c.take<float>(pairs * w.down.k);
  s.hq = take_activations(c, pairs, w.down.k);
  s.h_ptr = c.take<const int8_t*>(pairs);
  return s;
}

class TernaryOps {
 public:
  // x_kernels for gate and up (K = d), h_kernels for down (K = I): each quantises its own activations
  TernaryOps(const isa::Kernels& x_kernels, const isa::Kernels& h_kernels, const RoutedExperts& w,
             const RoutedScratch& s)
      : x_kernels_(x_kernels), h_kernels_(h_kernels), w_(w), s_(s) {}
  int64_t inter() const { return w_.gate.rows; }
  int64_t dim() const { return w_.down.rows; }

  void gate_up(int64_t e, int64_t r0, int64_t rows, int64_t p0, int64_t nt, float* g, float* u) const {
    const auto token = [&](int64_t t) { return s_.route.token[p0 + t]; };
    project(x_kernels_, w_.gate.expert(e), r0, rows, s_.x_ptr + p0, nt, g, token, s_.x);
    project(x_kernels_, w_.up.expert(e), r0, rows, s_.x_ptr + p0, nt, u, token, s_.x);
  }
  void prepare_hidden(const float* h, const ParallelFor& parallel) const {
    quantize_rows(h_kernels_, h, s_.route.offset[w_.gate.experts], w_.down.k, s_.hq, parallel);
  }
  void down(int64_t e, int64_t r0, int64_t rows, int64_t p0, int64_t nt, float* o) const {
    project(h_kernels_, w_.down.expert(e), r0, rows, s_.h_ptr + p0, nt, o, [&](int64_t t) { return p0 + t; },
            s_.hq);
  }

 private:
  // out[t * rows + r] = bitlinear row r0 + r of m for the activations act[t], whose sum and scale sit at index
  // slot(t) of `a`.
  template <class Slot>
  static void project(const isa::Kernels& kernels, const TernaryMatrix& m, int64_t r0, int64_t rows,
                      const int8_t* const* act, int64_t nt, float* out, Slot slot, const Activations& a) {
    int32_t dots[kTokenChunk * kRowChunk];
    const int64_t rb = row_bytes(m.k);
    kernels.code_dots(m.codes + r0 * rb, rb, rows, act, nt, dots);
    for (int64_t t = 0; t < nt; ++t) {
      dequantize_rows(dots + t * rows, rows, a.sum[slot(t)], a.scale[slot(t)], m, r0, out + t * rows);
    }
  }

  const isa::Kernels& x_kernels_;
  const isa::Kernels& h_kernels_;
  const RoutedExperts& w_;
  const RoutedScratch& s_;
};

// ---- routed fp32 experts

struct FloatScratch {
  Routing route;
  const float** x_ptr;  // per sorted pair: its token's x
  float* h;             // per sorted pair, [I]
  const float** h_ptr;  // per sorted pair
};

FloatScratch carve_float(Carver& c, int64_t n, int64_t top_k, const RoutedFloatExperts& w) {
  FloatScratch s{};
  const int64_t pairs = n * top_k;
  s.route = take_routing(c, pairs, w.gate.experts);
  s.x_ptr = c.take<const float*>(pairs);
  s.h = c.take<float>(pairs * w.down.k);
  s.h_ptr = c.take<const float*>(pairs);
  return s;
}

class FloatOps {
 public:
  FloatOps(const isa::Kernels& kernels, const RoutedFloatExperts& w, const FloatScratch& s)
      : kernels_(kernels), w_(w), s_(s) {}
  int64_t inter() const { return w_.gate.rows; }
  int64_t dim() const { return w_.down.rows; }

  void gate_up(int64_t e, int64_t r0, int64_t rows, int64_t p0, int64_t nt, float* g, float* u) const {
    project(w_.gate, e, r0, rows, s_.x_ptr + p0, nt, g);
    project(w_.up, e, r0, rows, s_.x_ptr + p0, nt, u);
  }
  void prepare_hidden(const float*, const ParallelFor&) const {}
  void down(int64_t e, int64_t r0, int64_t rows, int64_t p0, int64_t nt, float* o) const {
    project(w_.down, e, r0, rows, s_.h_ptr + p0, nt, o);
  }

 private:
  void project(const FloatExperts& m, int64_t e, int64_t r0, int64_t rows, const float* const* act, int64_t nt,
               float* out) const {
    kernels_.float_dots(m.weight + (e * m.rows + r0) * m.k, m.k, rows, act, nt, out);
  }

  const isa::Kernels& kernels_;
  const RoutedFloatExperts& w_;
  const FloatScratch& s_;
};

// ---- the weight-only quantized linear

// Up to this many tokens the kernels read the packed rows directly (each token tile unpacks them again); from more
// on, a tile of rows is dequantized once and panel_dots runs every token over it. The crossovers on a Sapphire
// Rapids Xeon (one thread, AVX-512, [4096 x 1024] streamed from DRAM; int4 in groups of 32, int8 per channel):
// int4 at n = 8 took 1.22 ms direct and 1.40 ms tiled, at n = 12 2.15 and 1.61 ms; int8 at n = 12 1.75 and 2.14 ms,
// at n = 16 2.36 and 2.39 ms.
constexpr int64_t kDirectMaxTokens4 = 8;
constexpr int64_t kDirectMaxTokens8 = 12;
constexpr int64_t kDirectMaxTokens = kDirectMaxTokens8;  // the larger: the direct path's buffers

const char* check_quantized(const QuantizedMatrix& w) {
  if (w.bits != 4 && w.bits != 8) return "mote: quantized_linear: bits must be 4 or 8";
  if (w.rows < 0 || w.k <= 0 || w.group <= 0) return "mote: quantized_linear: rows, K or group out of range";
  if (w.k % w.group != 0) return "mote: quantized_linear: the group does not divide K";
  if (w.bits == 4 && (w.k % isa::kInt4Span != 0 || w.group % isa::kInt4Span != 0)) {
    return "mote: quantized_linear: int4 needs K and the group to be multiples of 32";
  }
  return nullptr;
}

// Rows [r0, r0 + rows) of w as the kernels read them.
isa::QuantizedRows quantized_rows(const QuantizedMatrix& w, int64_t r0, int64_t rows) {
  const int64_t groups = w.k / w.group, rb = w.bits == 4 ? w.k / 2 : w.k;
  return isa::QuantizedRows{w.data + r0 * rb, w.scale + r0 * groups, rows, w.k, w.group, groups, rb};
}

// Rows per work item of the direct path: about kDirectItemBytes of packed rows, whole kRowChunk chunks. The kernels
// prefetch a few row tiles ahead within a call's rows, so every item starts with a few rows nobody prefetched; with
// 32-row items of 512-byte rows, two threads taking alternate items spent a quarter of their rows waiting on DRAM.
constexpr int64_t kDirectItemBytes = 64 << 10;

// Decode: each work item computes its rows, kRowChunk at a time, for all (at most kDirectMaxTokens) tokens from the
// packed rows.
void quantized_direct(const isa::Kernels& kernels, const float* x, int64_t n, const QuantizedMatrix& w,
                      const float* bias, float* y, const ParallelFor& parallel) {
  const auto dots = w.bits == 4 ? kernels.int4_dots : kernels.int8_dots;
  const float* xp[kDirectMaxTokens];
  for (int64_t t = 0; t < n; ++t) xp[t] = x + t * w.k;
  const int64_t row_bytes = w.bits == 4 ? w.k / 2 : w.k;
  const int64_t item_rows = round_up(std::max<int64_t>(1, kDirectItemBytes / row_bytes), kRowChunk);
  run_parallel(parallel, ceil_div(w.rows, item_rows), [&](int64_t begin, int64_t end) {
    float o[kDirectMaxTokens * kRowChunk];
    for (int64_t r0 = begin * item_rows; r0 < std::min(w.rows, end * item_rows); r0 += kRowChunk) {
      const int64_t rows = std::min(kRowChunk, w.rows - r0);
      dots(quantized_rows(w, r0, rows), xp, n, o);
      for (int64_t t = 0; t < n; ++t) {
        float* yt = y + t * w.rows + r0;
        if (bias) {
          for (int64_t r = 0; r < rows; ++r) yt[r] = bias[r0 + r] + o[t * rows + r];
        } else {
          std::copy(o + t * rows, o + (t + 1) * rows, yt);
        }
      }
    }
  });
}

// Prefill: each work item dequantizes its kQuantTileRows rows kQuantTileCols inputs at a time and adds panel_dots of
// every token over that tile into y (the first tile writes bias + its sums).
void quantized_tiled(const isa::Kernels& kernels, const float* x, int64_t n, const QuantizedMatrix& w,
                     const float* bias, float* y, const ParallelFor& parallel) {
  const auto dequantize = w.bits == 4 ? kernels.dequantize_int4 : kernels.dequantize_int8;
  constexpr int64_t kRows = isa::kQuantTileRows, kCols = isa::kQuantTileCols;
  run_parallel(parallel, ceil_div(w.rows, kRows), [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kRows * kCols];
    float part[kTokenChunk * kRows];
    const float* xp[kTokenChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kRows, rows = std::min(kRows, w.rows - r0);
      const isa::QuantizedRows m = quantized_rows(w, r0, rows);
      for (int64_t k0 = 0; k0 < w.k; k0 += kCols) {
        const int64_t len = std::min(kCols, w.k - k0);
        dequantize(m, k0, len, tile);
        for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
          const int64_t nt = std::min(kTokenChunk, n - t0);
          for (int64_t t = 0; t < nt; ++t) xp[t] = x + (t0 + t) * w.k + k0;
          kernels.panel_dots(tile, len, rows, xp, nt, part);
          for (int64_t t = 0; t < nt; ++t) {
            float* yt = y + (t0 + t) * w.rows + r0;
            const float* pt = part + t * rows;
            if (k0 > 0) {
              for (int64_t r = 0; r < rows; ++r) yt[r] = yt[r] + pt[r];
            } else if (bias) {
              for (int64_t r = 0; r < rows; ++r) yt[r] = bias[r0 + r] + pt[r];
            } else {
              std::copy(pt, pt + rows, yt);
            }
          }
        }
      }
    }
  });
}

}  // namespace

// ---- the interface of mote_ternary.h

// AVX-512 VNNI ahead of AVX2: on a Sapphire Rapids Xeon (one thread, d=1024, I=1536) it takes 0.015 ms instead of
// 0.022 ms for a [1536 x 1024] GEMV and 0.050 ms instead of 0.068 ms for a top-1 routed block, and streams a
// DRAM-resident expert in 1.01 ms instead of 1.10 ms (12.66 MB; the self-test's --bench). For K < 512 it runs the
// AVX2 kernels (code_kernels_for).
Isa detect_isa() {
  static const Isa best = [] {
    for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvx2, Isa::kNeonDot, Isa::kNeon}) {
      if (isa_supported(isa)) return isa;
    }
    return Isa::kScalar;
  }();
  return best;
}

bool isa_supported(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(__x86_64__) || defined(_M_X64)
    case Isa::kAvx2: return cpu_has_avx2();
    case Isa::kAvx512Vnni: return cpu_has_avx512vnni();
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return true;
    case Isa::kNeonDot: return cpu_has_dotprod();
#endif
    default: return false;
  }
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kNeon: return "neon";
    case Isa::kNeonDot: return "neon-dotprod";
  }
  return "unknown";
}

ParallelFor serial() {
  return [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (n > 0) fn(0, n);
  };
}

TernaryMatrix TernaryExperts::expert(int64_t e) const {
  return TernaryMatrix{codes + e * rows * row_bytes(k), scale + (per_row_scale ? e * rows : e), rows, k,
                       per_row_scale};
}

size_t ternary_linear_workspace(int64_t n, const TernaryMatrix& w) {
  Carver c(nullptr);
  carve_linear(c, n, w);
  return c.used();
}

size_t routed_experts_workspace(int64_t n, int64_t top_k, const RoutedExperts& w) {
  Carver c(nullptr);
  carve_routed(c, n, top_k, w);
  return c.used();
}

size_t routed_experts_float_workspace(int64_t n, int64_t top_k, const RoutedFloatExperts& w) {
  Carver c(nullptr);
  carve_float(c, n, top_k, w);
  return c.used();
}

size_t quantized_linear_workspace(int64_t, const QuantizedMatrix&) { return 0; }

const char* quantized_linear(Isa isa, const float* x, int64_t n, const QuantizedMatrix& w, const float* bias,
                             float* y, void*, const ParallelFor& parallel) {
  if (const char* error = check_quantized(w)) return error;
  if (n <= 0 || w.rows == 0) return nullptr;
  const isa::Kernels& kernels = kernels_for(isa);
  if (n <= (w.bits == 4 ? kDirectMaxTokens4 : kDirectMaxTokens8)) {
    quantized_direct(kernels, x, n, w, bias, y, parallel);
  } else {
    quantized_tiled(kernels, x, n, w, bias, y, parallel);
  }
  return nullptr;
}

void float_linear(Isa isa, const float* x, int64_t n, const float* w, int64_t rows, int64_t k, float* y,
                  const ParallelFor& parallel) {
  const isa::Kernels& kernels = kernels_for(isa);
  run_parallel(parallel, ceil_div(rows, kRowChunk), [&](int64_t begin, int64_t end) {
    float o[kTokenChunk * kRowChunk];
    const float* xp[kTokenChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kRowChunk, rc = std::min(kRowChunk, rows - r0);
      for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
        const int64_t nt = std::min(kTokenChunk, n - t0);
        for (int64_t t = 0; t < nt; ++t) xp[t] = x + (t0 + t) * k;
        kernels.float_dots(w + r0 * k, k, rc, xp, nt, o);
        for (int64_t t = 0; t < nt; ++t) std::copy(o + t * rc, o + (t + 1) * rc, y + (t0 + t) * rows + r0);
      }
    }
  });
}

void ternary_linear(Isa isa, const float* x, int64_t n, const TernaryMatrix& w, float* y, void* workspace,
                    const ParallelFor& parallel) {
  const isa::Kernels& kernels = code_kernels_for(isa, w.k);
  Carver c(workspace);
  const LinearScratch s = carve_linear(c, n, w);
  quantize_rows(kernels, x, n, w.k, s.x, parallel);
  for (int64_t t = 0; t < n; ++t) s.x_ptr[t] = s.x.token(t);
  const int64_t rb = row_bytes(w.k);
  run_parallel(parallel, ceil_div(w.rows, kRowChunk), [&](int64_t begin, int64_t end) {
    int32_t dots[kTokenChunk * kRowChunk];
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t r0 = chunk * kRowChunk, rows = std::min(kRowChunk, w.rows - r0);
      for (int64_t t0 = 0; t0 < n; t0 += kTokenChunk) {
        const int64_t nt = std::min(kTokenChunk, n - t0);
        kernels.code_dots(w.codes + r0 * rb, rb, rows, s.x_ptr + t0, nt, dots);
        for (int64_t t = 0; t < nt; ++t) {
          dequantize_rows(dots + t * rows, rows, s.x.sum[t0 + t], s.x.scale[t0 + t], w, r0,
                          y + (t0 + t) * w.rows + r0);
        }
      }
    }
  });
}

const char* routed_experts(Isa isa, const float* x, int64_t n, const float* top_p, const int64_t* top_i,
                           int64_t top_k, const RoutedExperts& w, float* y, void* workspace,
                           const ParallelFor& parallel) {
  if (const char* error = check_ids(top_i, n * top_k, w.gate.experts)) return error;
  const isa::Kernels& x_kernels = code_kernels_for(isa, w.gate.k);
  Carver c(workspace);
  RoutedScratch s = carve_routed(c, n, top_k, w);
  quantize_rows(x_kernels, x, n, w.gate.k, s.x, parallel);
  group_by_expert(top_p, top_i, n, top_k, w.gate.experts, s.route);
  for (int64_t i = 0; i < n * top_k; ++i) {
    s.x_ptr[i] = s.x.token(s.route.token[i]);
    s.h_ptr[i] = s.hq.token(i);
  }
  routed_passes(TernaryOps(x_kernels, code_kernels_for(isa, w.down.k), w, s), s.route, n, s.h, y, parallel);
  return nullptr;
}

const char* routed_experts_float(Isa isa, const float* x, int64_t n, const float* top_p, const int64_t* top_i,
                                 int64_t top_k, const RoutedFloatExperts& w, float* y, void* workspace,
                                 const ParallelFor& parallel) {
  if (const char* error = check_ids(top_i, n * top_k, w.gate.experts)) return error;
  const isa::Kernels& kernels = kernels_for(isa);
  Carver c(workspace);
  FloatScratch s = carve_float(c, n, top_k, w);
  group_by_expert(top_p, top_i, n, top_k, w.gate.experts, s.route);
  for (int64_t i = 0; i < n * top_k; ++i) {
    s.x_ptr[i] = x + s.route.token[i] * w.gate.k;
    s.h_ptr[i] = s.h + i * w.down.k;
  }
  routed_passes(FloatOps(kernels, w, s), s.route, n, s.h, y, parallel);
  return nullptr;
}

}  // namespace mote
