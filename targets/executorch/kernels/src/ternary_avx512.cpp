// AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma; only called when the CPU
// has all of them).
//
// Ternary: 64 code bytes per vector. vpdpbusd multiplies unsigned bytes by signed bytes and adds each group of four
// products into an int32 lane, without saturation. Plane j is isolated with a single AND, bytes & (3 << 2j), which
// leaves code j scaled by 4^j (at most 192, still an unsigned byte): each plane gets its own accumulator, and the
// exact shifts acc_j >> 2j (every product is a multiple of 4^j) undo the scaling once at the end. That saves the
// three shifts per vector a full decode would cost.
//
// Weight-only int4: the 16 levels of a group, (float)(q) * scale for q = -8..7, are one vector, and vpermps picks a
// lane by the low 4 bits of each index: widening a span's 16 bytes to int32 lanes gives the low nibbles' weights
// with one permute and the high nibbles' after one shift, already scaled (W exactly as the spec rounds it). That is
// 3 shuffles, 1 shift and the FMAs per 32 weights, fewer than converting the integers and scaling them.
// Weight-only int8: sign-extend, convert, FMA into a per-group sum that the group's scale multiplies at its end.
#if defined(__x86_64__) || defined(_M_X64)

// GCC 12 warns about the deliberately undefined pass-through operand inside its own AVX-512 intrinsics (GCC bug
// 105593, fixed in 13); the warning points into the header, so silencing it for the include is enough.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#include <cstring>

#include "ternary_isa.h"
#include "ternary_quantize.h"

namespace mote::isa {
namespace {

constexpr int64_t kGroup = 64;

// {sum of a's lanes, b's, c's, d's}: interleave and add, halving the lanes per vector at each step.
inline __m128i hsum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512d abd = _mm512_castps_pd(ab), cdd = _mm512_castps_pd(cd);
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(abd, cdd)),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(abd, cdd)));
  const __m512d halves = _mm512_castps_pd(abcd);
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm256_castpd_ps(_mm512_extractf64x4_pd(halves, 1)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

inline void store4(__m128i v, int32_t* p) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
inline void store4(__m128 v, float* p) { _mm_storeu_ps(p, v); }

// out[t * out_stride + r] = the lane sum of s[r][t] for r < valid_rows, reducing four vectors at a time.
template <int R, int T, class V, class Out>
void store_sums(const V (&s)[R][T], int64_t valid_rows, Out* out, int64_t out_stride) {
  constexpr int N = R * T, Padded = (N + 3) / 4 * 4;
  V v[Padded];
  for (int i = 0; i < Padded; ++i) v[i] = i < N ? s[i / T][i % T] : V{};
  Out sums[Padded];
  for (int i = 0; i < Padded; i += 4) store4(hsum4(v[i], v[i + 1], v[i + 2], v[i + 3]), sums + i);
  for (int r = 0; r < valid_rows; ++r) {
    for (int t = 0; t < T; ++t) out[t * out_stride + r] = sums[r * T + t];
  }
}

// R rows x T tokens of sum code*q, four plane accumulators per pair.
struct CodeTile {
  static constexpr int kRowsSingle = 4, kRows = 1, kTokens = 6;

  template <int R, int T>
  static void run(const uint8_t* const* row, int64_t row_bytes, const int8_t* const* q, int64_t valid_rows,
                  int32_t* out, int64_t out_stride) {
    __m512i acc[R][T][4];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        for (int j = 0; j < 4; ++j) acc[r][t][j] = _mm512_setzero_si512();
      }
    }
    // One loop over the row's vectors; the last one, if partial, comes from a zero-padded copy (no read past the
    // row). A single loop body keeps the accumulators in registers.
    const int64_t whole = row_bytes / kGroup * kGroup;
    alignas(64) uint8_t tail[R][kGroup];
    if (whole < row_bytes) {
      for (int r = 0; r < R; ++r) {
        std::memset(tail[r], 0, kGroup);
        std::memcpy(tail[r], row[r] + whole, row_bytes - whole);
      }
    }
    for (int64_t off = 0; off < row_bytes; off += kGroup) {
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_loadu_si512(off < whole ? row[r] + off : tail[r]);
        __builtin_prefetch(row[r] + off + kPrefetchTiles * R * row_bytes);
        for (int j = 0; j < 4; ++j) {
          const __m512i plane = _mm512_and_si512(b, _mm512_set1_epi8(static_cast<char>(3 << (2 * j))));
          for (int t = 0; t < T; ++t) {
            const __m512i qj = _mm512_loadu_si512(q[t] + off * 4 + j * kGroup);
            acc[r][t][j] = _mm512_dpbusd_epi32(acc[r][t][j], plane, qj);
          }
        }
      }
    }
    __m512i sum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        const __m512i s01 = _mm512_add_epi32(acc[r][t][0], _mm512_srai_epi32(acc[r][t][1], 2));
        const __m512i s23 = _mm512_add_epi32(_mm512_srai_epi32(acc[r][t][2], 4), _mm512_srai_epi32(acc[r][t][3], 6));
        sum[r][t] = _mm512_add_epi32(s01, s23);
      }
    }
    store_sums(sum, valid_rows, out, out_stride);
  }
};

// R rows x T tokens of fp32 dot products; one token: two accumulators per row keep eight FMAs in flight.
struct FloatTile {
  static constexpr int kRowsSingle = 4, kRows = 4, kTokens = 4;

  template <int R, int T>
  static void run(const float* const* row, int64_t k, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    constexpr int U = T == 1 ? 2 : 1;  // vectors of K per step
    __m512 acc[R][T][U];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        for (int u = 0; u < U; ++u) acc[r][t][u] = _mm512_setzero_ps();
      }
    }
    int64_t i = 0;
    for (; i + 16 * U <= k; i += 16 * U) {
      for (int u = 0; u < U; ++u) {
        __m512 w[R];
        for (int r = 0; r < R; ++r) {
          w[r] = _mm512_loadu_ps(row[r] + i + 16 * u);
          __builtin_prefetch(row[r] + i + 16 * u + kPrefetchTiles * R * k);
        }
        for (int t = 0; t < T; ++t) {
          const __m512 xv = _mm512_loadu_ps(x[t] + i + 16 * u);
          for (int r = 0; r < R; ++r) acc[r][t][u] = _mm512_fmadd_ps(w[r], xv, acc[r][t][u]);
        }
      }
    }
    for (; i < k; i += 16) {  // the last < 16*U values: whole vectors, then one masked vector
      const int64_t left = k - i < 16 ? k - i : 16;
      const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_maskz_loadu_ps(mask, x[t] + i);
        for (int r = 0; r < R; ++r) {
          acc[r][t][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, row[r] + i), xv, acc[r][t][0]);
        }
      }
    }
    __m512 sum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        sum[r][t] = acc[r][t][0];
        for (int u = 1; u < U; ++u) sum[r][t] = _mm512_add_ps(sum[r][t], acc[r][t][u]);
      }
    }
    store_sums(sum, valid_rows, out, out_stride);
  }
};

// The 16 weights of a group's int4 levels: lane i holds (float)(i - 8) * s.
inline __m512 int4_levels(float s) {
  const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  return _mm512_mul_ps(levels, _mm512_set1_ps(s));
}

// A span's 16 bytes as int32 lanes: the permute index of its low nibbles (vpermps ignores the bits above the 4th).
inline __m512i int4_span(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// R rows x T tokens straight from int4 rows; each pair keeps two accumulators (low and high half of a span).
struct Int4Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 4;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    __m512 acc[R][T][2];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t][0] = acc[r][t][1] = _mm512_setzero_ps();
    }
    // One loop over the row's spans (a group of 32 is a single span: a nested loop per group would cost a loop per
    // 32 weights); the tables are rebuilt where a group starts.
    const int64_t spans = m.k / kInt4Span, per_group = m.group / kInt4Span;
    __m512 table[R];
    for (int64_t sp = 0, g = 0, left = 0; sp < spans; ++sp, --left) {
      if (left == 0) {
        for (int r = 0; r < R; ++r) table[r] = int4_levels(scale[r][g]);
        if (g % 16 == 0) {
          for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
        }
        left = per_group;
        ++g;
      }
      const int64_t byte = sp * 16;
      if (byte % 64 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + byte + kPrefetchTiles * R * m.row_bytes);
      }
      __m512 xv[T][2];
      for (int t = 0; t < T; ++t) {
        xv[t][0] = _mm512_loadu_ps(x[t] + sp * kInt4Span);
        xv[t][1] = _mm512_loadu_ps(x[t] + sp * kInt4Span + 16);
      }
      for (int r = 0; r < R; ++r) {
        const __m512i v = int4_span(row[r] + byte);
        const __m512 lo = _mm512_permutexvar_ps(v, table[r]);
        const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[r]);
        for (int t = 0; t < T; ++t) {
          acc[r][t][0] = _mm512_fmadd_ps(lo, xv[t][0], acc[r][t][0]);
          acc[r][t][1] = _mm512_fmadd_ps(hi, xv[t][1], acc[r][t][1]);
        }
      }
    }
    __m512 sum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) sum[r][t] = _mm512_add_ps(acc[r][t][0], acc[r][t][1]);
    }
    store_sums(sum, valid_rows, out, out_stride);
  }
};

// 16 int8 weights (the first `mask` of them; the rest 0) as floats.
inline __m512 int8_weights(const uint8_t* p, __mmask16 mask) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// R rows x T tokens straight from int8 rows: per group, sum q * x, then acc += scale * sum. A group is walked 64
// bytes (a line, prefetched once) at a time, then in whole vectors, then one masked vector when it is no multiple
// of 16.
struct Int8Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 4;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    __m512 acc[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
    }
    const int64_t prefetch = kPrefetchTiles * R * m.row_bytes;
    for (int64_t g = 0; g < m.groups; ++g) {
      __m512 inner[R][T];
      for (int r = 0; r < R; ++r) {
        for (int t = 0; t < T; ++t) inner[r][t] = _mm512_setzero_ps();
      }
      if (g % 16 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
      }
      const int64_t end = (g + 1) * m.group;
      int64_t i = g * m.group;
      const auto step = [&](int64_t at, __mmask16 mask) {
        for (int r = 0; r < R; ++r) {
          const __m512 w = int8_weights(row[r] + at, mask);
          for (int t = 0; t < T; ++t) {
            inner[r][t] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, x[t] + at), inner[r][t]);
          }
        }
      };
      for (; i + 64 <= end; i += 64) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + i + prefetch);
        for (int j = 0; j < 64; j += 16) step(i + j, 0xFFFF);
      }
      for (; i + 16 <= end; i += 16) step(i, 0xFFFF);
      if (i < end) step(i, static_cast<__mmask16>((1u << (end - i)) - 1));
      for (int r = 0; r < R; ++r) {
        const __m512 s = _mm512_set1_ps(scale[r][g]);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(inner[r][t], s, acc[r][t]);
      }
    }
    store_sums(acc, valid_rows, out, out_stride);
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
// buffer, transposed 16 x 16 into panels of 32 rows, then per input of a panel, two vectors of weights (32 rows)
// times each token's x broadcast.
struct PanelTile {
  static constexpr int64_t kRows = 32;   // two vectors of rows per panel
  static constexpr int64_t kChunk = 32;  // inputs dequantized row-major at a time before the transpose
  static constexpr int64_t kBlock = 16;
  static constexpr int kTokens = 12;  // 24 accumulators, 2 weight vectors and a broadcast: 27 of 32 registers

  static void dequantize_span(const uint8_t* span, float sg, float* w) {
    const __m512 table = int4_levels(sg);
    const __m512i v = int4_span(span);
    _mm512_storeu_ps(w, _mm512_permutexvar_ps(v, table));
    _mm512_storeu_ps(w + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
  }

  // Whole vectors and a masked last one.
  static void dequantize_run(const uint8_t* row, float sg, float* w, int64_t begin, int64_t end) {
    const __m512 s = _mm512_set1_ps(sg);
    int64_t j = begin;
    for (; j + 16 <= end; j += 16) _mm512_storeu_ps(w + j, _mm512_mul_ps(int8_weights(row + j, 0xFFFF), s));
    if (j < end) {
      const auto mask = static_cast<__mmask16>((1u << (end - j)) - 1);
      _mm512_mask_storeu_ps(w + j, mask, _mm512_mul_ps(int8_weights(row + j, mask), s));
    }
  }

  static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t count) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * src_stride);
    // within each 128-bit lane: pairs of rows interleaved, then 64-bit pairs: t[4i + c] lane L = column 4L + c of
    // rows 4i..4i+3
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
      const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
      const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
      r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
      r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
      r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
      r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // then the lanes: column 4L + c takes lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
    for (int c = 0; c < 4; ++c) {
      const __m512 v0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
      const __m512 v2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
      const __m512 v3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
      t[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
      t[8 + c] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
      t[4 + c] = _mm512_shuffle_f32x4(v1, v3, 0x88);
      t[12 + c] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
    }
    for (int i = 0; i < count; ++i) _mm512_storeu_ps(dst + i * dst_stride, t[i]);
  }

  template <int R, int T>
  static void run(const float* panel, int64_t len, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    __m512 acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; ++i) {
      const __m512 w0 = _mm512_loadu_ps(panel + i * kRows), w1 = _mm512_loadu_ps(panel + i * kRows + 16);
      for (int t = 0; t < T; ++t) {
        const __m512 xv = _mm512_set1_ps(x[t][i]);
        acc[t][0] = _mm512_fmadd_ps(w0, xv, acc[t][0]);
        acc[t][1] = _mm512_fmadd_ps(w1, xv, acc[t][1]);
      }
    }
    const auto mask = [&](int64_t from) {
      const int64_t n = valid_rows - from;
      return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1);
    };
    const __mmask16 m0 = mask(0), m1 = mask(16);
    for (int t = 0; t < T; ++t) {
      _mm512_mask_storeu_ps(out + t * out_stride, m0, acc[t][0]);
      _mm512_mask_storeu_ps(out + t * out_stride + 16, m1, acc[t][1]);
    }
  }
};

}  // namespace

const Kernels& avx512_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots, PanelTile::kRows,
                               quantized_tiled_dots<Int4Tile>, quantized_tiled_dots<Int8Tile>,
                               dequantize_panels<PanelTile, 4>, dequantize_panels<PanelTile, 8>, panel_dots<PanelTile>};
  return kernels;
}

}  // namespace mote::isa

#endif
