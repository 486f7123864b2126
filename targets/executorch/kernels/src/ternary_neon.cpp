// NEON kernels for baseline armv8-a (every aarch64 CPU).
//
// Ternary: 16 code bytes per vector; plane j = (bytes >> 2j) & 3 (0..3) times the activations' plane j with widening
// int8 multiplies (vmull/vmlal_s8: four planes add up to at most 4*3*128 = 1536 in int16), then vpadalq_s16 widens
// pairs into the int32 accumulator.
//
// Weight-only int4 and int8: 16 int8 values (an int4 span's low nibbles minus 8, its high nibbles minus 8, or 16 int8
// weights) widen to int16 and int32 and convert to float; FMAs add them times x into a per-group sum (two per pair,
// so that the chains overlap) that the group's scale multiplies at the group's end.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <cstring>

#include "ternary_isa.h"
#include "ternary_neon_sums.h"
#include "ternary_quantize.h"

namespace mote::isa {
namespace {

constexpr int64_t kGroup = 16;

// R rows x T tokens of sum code*q. Each code vector is split into its planes once and used for all T tokens.
struct CodeTile {
  static constexpr int kRowsSingle = 4, kRows = 1, kTokens = 6;

  template <int R, int T>
  static void run(const uint8_t* const* row, int64_t row_bytes, const int8_t* const* q, int64_t valid_rows,
                  int32_t* out, int64_t out_stride) {
    int32x4_t acc[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_s32(0);
    }
    const uint8x16_t three = vdupq_n_u8(3);
    // One loop over the row's vectors; the last one, if partial, comes from a zero-padded copy (no read past the
    // row). A single loop body keeps the accumulators in registers.
    const int64_t whole = row_bytes / kGroup * kGroup;
    alignas(16) uint8_t tail[R][kGroup];
    if (whole < row_bytes) {
      for (int r = 0; r < R; ++r) {
        std::memset(tail[r], 0, kGroup);
        std::memcpy(tail[r], row[r] + whole, row_bytes - whole);
      }
    }
    for (int64_t off = 0; off < row_bytes; off += kGroup) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* vec = off < whole ? row[r] + off : tail[r];
        if (off % 64 == 0) __builtin_prefetch(row[r] + off + kPrefetchTiles * R * row_bytes);
        const uint8x16_t b = vld1q_u8(vec);
        const int8x16_t plane[4] = {vreinterpretq_s8_u8(vandq_u8(b, three)),
                                    vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 2), three)),
                                    vreinterpretq_s8_u8(vandq_u8(vshrq_n_u8(b, 4), three)),
                                    vreinterpretq_s8_u8(vshrq_n_u8(b, 6))};
        for (int t = 0; t < T; ++t) {
          const int8_t* a = q[t] + off * 4;
          int8x16_t qj = vld1q_s8(a);
          int16x8_t lo = vmull_s8(vget_low_s8(plane[0]), vget_low_s8(qj));
          int16x8_t hi = vmull_high_s8(plane[0], qj);
          for (int j = 1; j < 4; ++j) {
            qj = vld1q_s8(a + j * kGroup);
            lo = vmlal_s8(lo, vget_low_s8(plane[j]), vget_low_s8(qj));
            hi = vmlal_high_s8(hi, plane[j], qj);
          }
          acc[r][t] = vpadalq_s16(vpadalq_s16(acc[r][t], lo), hi);
        }
      }
    }
    store_sums(acc, valid_rows, out, out_stride);
  }
};

// R rows x T tokens of fp32 dot products; one token: two accumulators per row keep eight FMAs in flight.
struct FloatTile {
  static constexpr int kRowsSingle = 4, kRows = 4, kTokens = 4;

  template <int R, int T>
  static void run(const float* const* row, int64_t k, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    constexpr int U = T == 1 ? 2 : 1;  // vectors of K per step
    float32x4_t acc[R][T][U];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        for (int u = 0; u < U; ++u) acc[r][t][u] = vdupq_n_f32(0.0f);
      }
    }
    int64_t i = 0;
    for (; i + 4 * U <= k; i += 4 * U) {
      for (int u = 0; u < U; ++u) {
        float32x4_t w[R];
        for (int r = 0; r < R; ++r) {
          w[r] = vld1q_f32(row[r] + i + 4 * u);
          if ((i + 4 * u) % 16 == 0) __builtin_prefetch(row[r] + i + 4 * u + kPrefetchTiles * R * k);
        }
        for (int t = 0; t < T; ++t) {
          const float32x4_t xv = vld1q_f32(x[t] + i + 4 * u);
          for (int r = 0; r < R; ++r) acc[r][t][u] = vfmaq_f32(acc[r][t][u], w[r], xv);
        }
      }
    }
    float tail[R][T] = {};  // the last < 4*U values, one at a time
    for (; i < k; ++i) {
      for (int r = 0; r < R; ++r) {
        for (int t = 0; t < T; ++t) tail[r][t] += row[r][i] * x[t][i];
      }
    }
    for (int r = 0; r < valid_rows; ++r) {
      for (int t = 0; t < T; ++t) {
        float32x4_t s = acc[r][t][0];
        for (int u = 1; u < U; ++u) s = vaddq_f32(s, acc[r][t][u]);
        out[t * out_stride + r] = vaddvq_f32(s) + tail[r][t];
      }
    }
  }
};

// 16 int8 values as four float vectors, in order.
inline void widen16(int8x16_t v, float32x4_t (&w)[4]) {
  const int16x8_t lo = vmovl_s8(vget_low_s8(v)), hi = vmovl_high_s8(v);
  w[0] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo)));
  w[1] = vcvtq_f32_s32(vmovl_high_s16(lo));
  w[2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi)));
  w[3] = vcvtq_f32_s32(vmovl_high_s16(hi));
}

// An int4 span's 16 bytes as its values 0..15 (low nibbles) and 16..31 (high nibbles), each minus the stored 8.
inline void int4_span(const uint8_t* p, int8x16_t& lo, int8x16_t& hi) {
  const uint8x16_t b = vld1q_u8(p);
  const int8x16_t eight = vdupq_n_s8(8);
  lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), eight);
  hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), eight);
}

// inner[t][*] += w[0..3] * x[t][0..15] for the 16 weights w (four vectors) of one row; two accumulators per token,
// so that two FMA chains overlap.
template <int T>
inline void fma16(const float32x4_t (&w)[4], const float* const* x, int64_t at, float32x4_t (&inner)[T][2]) {
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < 4; ++j) inner[t][j & 1] = vfmaq_f32(inner[t][j & 1], w[j], vld1q_f32(x[t] + at + 4 * j));
  }
}

// R rows x T tokens straight from int4 rows: per group, sum q * x, then acc += scale * sum. One loop over the row's
// spans (a group of 32 is a single span: a nested loop per group would cost a loop per 32 weights).
struct Int4Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 2;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    float32x4_t acc[R][T], inner[R][T][2];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = inner[r][t][0] = inner[r][t][1] = vdupq_n_f32(0.0f);
    }
    const int64_t spans = m.k / kInt4Span, per_group = m.group / kInt4Span;
    for (int64_t sp = 0, g = 0, left = per_group; sp < spans; ++sp) {
      const int64_t k0 = sp * kInt4Span, byte = k0 / 2;
      if (byte % 64 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + byte + kPrefetchTiles * R * m.row_bytes);
      }
      for (int r = 0; r < R; ++r) {
        int8x16_t v[2];
        int4_span(row[r] + byte, v[0], v[1]);
        for (int h = 0; h < 2; ++h) {
          float32x4_t w[4];
          widen16(v[h], w);
          fma16(w, x, k0 + 16 * h, inner[r]);
        }
      }
      if (--left == 0) {  // the group's end: scale its sums
        if (g % 16 == 0) {
          for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
        }
        for (int r = 0; r < R; ++r) {
          const float s = scale[r][g];
          for (int t = 0; t < T; ++t) {
            acc[r][t] = vfmaq_n_f32(acc[r][t], vaddq_f32(inner[r][t][0], inner[r][t][1]), s);
            inner[r][t][0] = inner[r][t][1] = vdupq_n_f32(0.0f);
          }
        }
        left = per_group;
        ++g;
      }
    }
    for (int r = 0; r < valid_rows; ++r) {
      for (int t = 0; t < T; ++t) out[t * out_stride + r] = vaddvq_f32(acc[r][t]);
    }
  }
};

// R rows x T tokens straight from int8 rows: per group, sum q * x, then acc += scale * sum. A group is walked 64
// bytes (a line, prefetched once) at a time, then in whole vectors of 16, then its last < 16 values one at a time.
struct Int8Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 2;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    float32x4_t acc[R][T];
    float tail[R][T] = {};
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = vdupq_n_f32(0.0f);
    }
    const int64_t prefetch = kPrefetchTiles * R * m.row_bytes;
    for (int64_t g = 0; g < m.groups; ++g) {
      float32x4_t inner[R][T][2];
      float rest[R][T] = {};
      for (int r = 0; r < R; ++r) {
        for (int t = 0; t < T; ++t) inner[r][t][0] = inner[r][t][1] = vdupq_n_f32(0.0f);
      }
      if (g % 16 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
      }
      const int64_t end = (g + 1) * m.group;
      int64_t i = g * m.group;
      const auto step = [&](int64_t at) {
        for (int r = 0; r < R; ++r) {
          float32x4_t w[4];
          widen16(vld1q_s8(reinterpret_cast<const int8_t*>(row[r] + at)), w);
          fma16(w, x, at, inner[r]);
        }
      };
      for (; i + 64 <= end; i += 64) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + i + prefetch);
        for (int j = 0; j < 64; j += 16) step(i + j);
      }
      for (; i + 16 <= end; i += 16) step(i);
      for (; i < end; ++i) {
        for (int r = 0; r < R; ++r) {
          const float w = static_cast<float>(static_cast<int8_t>(row[r][i]));
          for (int t = 0; t < T; ++t) rest[r][t] += w * x[t][i];
        }
      }
      for (int r = 0; r < R; ++r) {
        const float s = scale[r][g];
        for (int t = 0; t < T; ++t) {
          acc[r][t] = vfmaq_n_f32(acc[r][t], vaddq_f32(inner[r][t][0], inner[r][t][1]), s);
          tail[r][t] += rest[r][t] * s;
        }
      }
    }
    for (int r = 0; r < valid_rows; ++r) {
      for (int t = 0; t < T; ++t) out[t * out_stride + r] = vaddvq_f32(acc[r][t]) + tail[r][t];
    }
  }
};

void code_dots(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
               int32_t* out) {
  tiled_dots<CodeTile>(codes, row_bytes, row_bytes, rows, q, tokens, out);
}

void float_dots(const float* w, int64_t k, int64_t rows, const float* const* x, int64_t tokens, float* out) {
  tiled_dots<FloatTile>(w, k, k, rows, x, tokens, out);
}

// ---- the prefill tile (ternary_isa.h: dequantize_panels, panel_dots): row-major dequantisation into a small
// buffer, transposed 4 x 4 into panels of 8 rows, then per input of a panel, two vectors of weights (8 rows) times
// each token's x, taken by lane from a vector of four of its inputs (one load of x per four inputs).
struct PanelTile {
  static constexpr int64_t kRows = 8;    // two vectors of rows per panel
  static constexpr int64_t kChunk = 32;  // inputs dequantized row-major at a time before the transpose
  static constexpr int64_t kBlock = 4;
  static constexpr int kTokens = 8;  // 16 accumulators, 8 vectors of x and 2 of weights: 26 of 32 registers

  static void dequantize_span(const uint8_t* span, float s, float* w) {
    int8x16_t v[2];
    int4_span(span, v[0], v[1]);
    for (int h = 0; h < 2; ++h) {
      float32x4_t f[4];
      widen16(v[h], f);
      for (int j = 0; j < 4; ++j) vst1q_f32(w + 16 * h + 4 * j, vmulq_n_f32(f[j], s));
    }
  }

  // Whole vectors, then the run's last < 16 values one at a time.
  static void dequantize_run(const uint8_t* row, float s, float* w, int64_t begin, int64_t end) {
    int64_t j = begin;
    for (; j + 16 <= end; j += 16) {
      float32x4_t f[4];
      widen16(vld1q_s8(reinterpret_cast<const int8_t*>(row + j)), f);
      for (int q = 0; q < 4; ++q) vst1q_f32(w + j + 4 * q, vmulq_n_f32(f[q], s));
    }
    for (; j < end; ++j) w[j] = static_cast<float>(static_cast<int8_t>(row[j])) * s;
  }

  static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t count) {
    const float32x4_t a = vld1q_f32(src), b = vld1q_f32(src + src_stride);
    const float32x4_t c = vld1q_f32(src + 2 * src_stride), d = vld1q_f32(src + 3 * src_stride);
    // {a0 b0 a2 b2}, {a1 b1 a3 b3}, {c0 d0 c2 d2}, {c1 d1 c3 d3}; then 64-bit halves pair them into columns
    const float64x2_t ab0 = vreinterpretq_f64_f32(vtrn1q_f32(a, b)), ab1 = vreinterpretq_f64_f32(vtrn2q_f32(a, b));
    const float64x2_t cd0 = vreinterpretq_f64_f32(vtrn1q_f32(c, d)), cd1 = vreinterpretq_f64_f32(vtrn2q_f32(c, d));
    const float32x4_t col[4] = {
        vreinterpretq_f32_f64(vzip1q_f64(ab0, cd0)), vreinterpretq_f32_f64(vzip1q_f64(ab1, cd1)),
        vreinterpretq_f32_f64(vzip2q_f64(ab0, cd0)), vreinterpretq_f32_f64(vzip2q_f64(ab1, cd1))};
    for (int i = 0; i < count; ++i) vst1q_f32(dst + i * dst_stride, col[i]);
  }

  template <int J, int T>
  static void lane(const float* w, const float32x4_t (&xq)[T], float32x4_t (&acc)[T][2]) {
    const float32x4_t w0 = vld1q_f32(w), w1 = vld1q_f32(w + 4);
    for (int t = 0; t < T; ++t) {
      acc[t][0] = vfmaq_laneq_f32(acc[t][0], w0, xq[t], J);
      acc[t][1] = vfmaq_laneq_f32(acc[t][1], w1, xq[t], J);
    }
  }

  template <int R, int T>
  static void run(const float* panel, int64_t len, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    float32x4_t acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = vdupq_n_f32(0.0f);
    int64_t i = 0;
    for (; i + 4 <= len; i += 4) {
      float32x4_t xq[T];
      for (int t = 0; t < T; ++t) xq[t] = vld1q_f32(x[t] + i);
      const float* w = panel + i * kRows;
      lane<0>(w, xq, acc);
      lane<1>(w + kRows, xq, acc);
      lane<2>(w + 2 * kRows, xq, acc);
      lane<3>(w + 3 * kRows, xq, acc);
    }
    for (; i < len; ++i) {
      const float32x4_t w0 = vld1q_f32(panel + i * kRows), w1 = vld1q_f32(panel + i * kRows + 4);
      for (int t = 0; t < T; ++t) {
        acc[t][0] = vfmaq_n_f32(acc[t][0], w0, x[t][i]);
        acc[t][1] = vfmaq_n_f32(acc[t][1], w1, x[t][i]);
      }
    }
    for (int t = 0; t < T; ++t) {
      if (valid_rows == kRows) {
        vst1q_f32(out + t * out_stride, acc[t][0]);
        vst1q_f32(out + t * out_stride + 4, acc[t][1]);
      } else {
        float all[kRows];
        vst1q_f32(all, acc[t][0]);
        vst1q_f32(all + 4, acc[t][1]);
        for (int r = 0; r < valid_rows; ++r) out[t * out_stride + r] = all[r];
      }
    }
  }
};

}  // namespace

const Kernels& neon_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots, PanelTile::kRows,
                               quantized_tiled_dots<Int4Tile>, quantized_tiled_dots<Int8Tile>,
                               dequantize_panels<PanelTile, 4>, dequantize_panels<PanelTile, 8>, panel_dots<PanelTile>};
  return kernels;
}

}  // namespace mote::isa

#endif
