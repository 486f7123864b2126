// NEON kernels for baseline armv8-a (every aarch64 CPU).
//
// Ternary: 16 code bytes per vector; plane j = (bytes >> 2j) & 3 (0..3) times the activations' plane j with widening
// int8 multiplies (vmull/vmlal_s8: four planes add up to at most 4*3*128 = 1536 in int16), then vpadalq_s16 widens
// pairs into the int32 accumulator.
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

void code_dots(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
               int32_t* out) {
  tiled_dots<CodeTile>(codes, row_bytes, row_bytes, rows, q, tokens, out);
}

void float_dots(const float* w, int64_t k, int64_t rows, const float* const* x, int64_t tokens, float* out) {
  tiled_dots<FloatTile>(w, k, k, rows, x, tokens, out);
}

}  // namespace

const Kernels& neon_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots};
  return kernels;
}

}  // namespace mote::isa

#endif
