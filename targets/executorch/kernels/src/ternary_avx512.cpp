// AVX-512 VNNI kernels (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma; only called when the CPU
// has all of them).
//
// Ternary: 64 code bytes per vector. vpdpbusd multiplies unsigned bytes by signed bytes and adds each group of four
// products into an int32 lane, without saturation. Plane j is isolated with a single AND, bytes & (3 << 2j), which
// leaves code j scaled by 4^j (at most 192, still an unsigned byte): each plane gets its own accumulator, and the
// exact shifts acc_j >> 2j (every product is a multiple of 4^j) undo the scaling once at the end. That saves the
// three shifts per vector a full decode would cost.
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

void code_dots(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
               int32_t* out) {
  tiled_dots<CodeTile>(codes, row_bytes, row_bytes, rows, q, tokens, out);
}

void float_dots(const float* w, int64_t k, int64_t rows, const float* const* x, int64_t tokens, float* out) {
  tiled_dots<FloatTile>(w, k, k, rows, x, tokens, out);
}

}  // namespace

const Kernels& avx512_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots};
  return kernels;
}

}  // namespace mote::isa

#endif
