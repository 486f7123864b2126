// NEON kernels for CPUs with the dot-product extension (compiled with -march=armv8.2-a+dotprod; only called when
// HWCAP_ASIMDDP says so).
//
// Ternary: 16 code bytes per vector; sdot (vdotq_s32) adds each group of four int8 products into an int32 lane.
// The planes cost one instruction each: bytes & 3 and bytes >> 6 are codes 0..3, while bytes & 0x0C and
// bytes & 0x30 are codes scaled by 4 and 16 (at most 48: still a positive int8). The two unscaled planes share an
// accumulator, the scaled ones get their own, and exact shifts (every product is a multiple of the scale) undo the
// scaling once at the end.
#if defined(__aarch64__)

#include <arm_neon.h>

#include <cstring>

#include "ternary_isa.h"
#include "ternary_neon_sums.h"
#include "ternary_quantize.h"

namespace mote::isa {
namespace {

constexpr int64_t kGroup = 16;

// R rows x T tokens of sum code*q, three accumulators per pair (scales 1, 4, 16).
struct CodeTile {
  static constexpr int kRowsSingle = 4, kRows = 1, kTokens = 6;

  template <int R, int T>
  static void run(const uint8_t* const* row, int64_t row_bytes, const int8_t* const* q, int64_t valid_rows,
                  int32_t* out, int64_t out_stride) {
    int32x4_t acc[R][T][3];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        for (int s = 0; s < 3; ++s) acc[r][t][s] = vdupq_n_s32(0);
      }
    }
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
        const int8x16_t p0 = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x03)));
        const int8x16_t p1 = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x0C)));
        const int8x16_t p2 = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(0x30)));
        const int8x16_t p3 = vreinterpretq_s8_u8(vshrq_n_u8(b, 6));
        for (int t = 0; t < T; ++t) {
          const int8_t* a = q[t] + off * 4;
          acc[r][t][0] = vdotq_s32(vdotq_s32(acc[r][t][0], p0, vld1q_s8(a)), p3, vld1q_s8(a + 3 * kGroup));
          acc[r][t][1] = vdotq_s32(acc[r][t][1], p1, vld1q_s8(a + kGroup));
          acc[r][t][2] = vdotq_s32(acc[r][t][2], p2, vld1q_s8(a + 2 * kGroup));
        }
      }
    }
    int32x4_t sum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        sum[r][t] = vaddq_s32(acc[r][t][0], vaddq_s32(vshrq_n_s32(acc[r][t][1], 2), vshrq_n_s32(acc[r][t][2], 4)));
      }
    }
    store_sums(sum, valid_rows, out, out_stride);
  }
};

void code_dots(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
               int32_t* out) {
  tiled_dots<CodeTile>(codes, row_bytes, row_bytes, rows, q, tokens, out);
}

}  // namespace

// The fp32 and the weight-only kernels gain nothing from dotprod (their products are fp32): they reuse the armv8-a
// kernels.
const Kernels& neon_dotprod_kernels() {
  const Kernels& neon = neon_kernels();
  static const Kernels kernels{kGroup,          quantize<kGroup>,     code_dots,           neon.float_dots,
                               neon.panel_rows, neon.int4_dots,       neon.int8_dots,      neon.dequantize_int4,
                               neon.dequantize_int8,                  neon.panel_dots};
  return kernels;
}

}  // namespace mote::isa

#endif
