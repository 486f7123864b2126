// AVX2 + FMA kernels (compiled with -mavx2 -mfma; only called when the CPU has both).
//
// Ternary: 32 code bytes per vector; plane j = (bytes >> 2j) & 3 is the unsigned operand of vpmaddubsw against the
// activations' plane j. Pair sums are at most 2*3*128 = 768, so the four planes add up in int16 without saturating
// (<= 3072) before one vpmaddwd widens them to int32.
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

#include <cstring>

#include "ternary_isa.h"
#include "ternary_quantize.h"

namespace mote::isa {
namespace {

constexpr int64_t kGroup = 32;

// {sum of a's lanes, b's, c's, d's}: two rounds of pairwise adds, then the two 128-bit halves.
inline __m128i hsum4(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
  return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
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

// R rows x T tokens of sum code*q. Each code vector is split into its planes once and used for all T tokens.
struct CodeTile {
  static constexpr int kRowsSingle = 4, kRows = 1, kTokens = 6;

  template <int R, int T>
  static void run(const uint8_t* const* row, int64_t row_bytes, const int8_t* const* q, int64_t valid_rows,
                  int32_t* out, int64_t out_stride) {
    __m256i acc[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_si256();
    }
    const __m256i three = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    // One loop over the row's vectors; the last one, if partial, comes from a zero-padded copy (no read past the
    // row). A single loop body keeps the accumulators in registers.
    const int64_t whole = row_bytes / kGroup * kGroup;
    alignas(32) uint8_t tail[R][kGroup];
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
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vec));
        const __m256i plane[4] = {_mm256_and_si256(b, three), _mm256_and_si256(_mm256_srli_epi16(b, 2), three),
                                  _mm256_and_si256(_mm256_srli_epi16(b, 4), three),
                                  _mm256_and_si256(_mm256_srli_epi16(b, 6), three)};
        for (int t = 0; t < T; ++t) {
          const int8_t* a = q[t] + off * 4;
          __m256i s = _mm256_maddubs_epi16(plane[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)));
          for (int j = 1; j < 4; ++j) {
            const __m256i qj = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + j * kGroup));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(plane[j], qj));
          }
          acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s, ones));
        }
      }
    }
    store_sums(acc, valid_rows, out, out_stride);
  }
};

// R rows x T tokens of fp32 dot products; with one token each row keeps two accumulators so that eight FMAs are
// in flight (the decode GEMV is a stream through memory and must not wait on FMA latency).
struct FloatTile {
  static constexpr int kRowsSingle = 4, kRows = 4, kTokens = 2;

  template <int R, int T>
  static void run(const float* const* row, int64_t k, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    constexpr int U = T == 1 ? 2 : 1;  // vectors of K per step
    __m256 acc[R][T][U];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        for (int u = 0; u < U; ++u) acc[r][t][u] = _mm256_setzero_ps();
      }
    }
    int64_t i = 0;
    for (; i + 8 * U <= k; i += 8 * U) {
      for (int u = 0; u < U; ++u) {
        __m256 w[R];
        for (int r = 0; r < R; ++r) {
          w[r] = _mm256_loadu_ps(row[r] + i + 8 * u);
          if ((i + 8 * u) % 16 == 0) __builtin_prefetch(row[r] + i + 8 * u + kPrefetchTiles * R * k);
        }
        for (int t = 0; t < T; ++t) {
          const __m256 xv = _mm256_loadu_ps(x[t] + i + 8 * u);
          for (int r = 0; r < R; ++r) acc[r][t][u] = _mm256_fmadd_ps(w[r], xv, acc[r][t][u]);
        }
      }
    }
    for (; i < k; i += 8) {  // the last < 8*U values: whole vectors, then one masked vector
      const int64_t left = k - i < 8 ? k - i : 8;
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(left)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int t = 0; t < T; ++t) {
        const __m256 xv = _mm256_maskload_ps(x[t] + i, mask);
        for (int r = 0; r < R; ++r) acc[r][t][0] = _mm256_fmadd_ps(_mm256_maskload_ps(row[r] + i, mask), xv,
                                                                   acc[r][t][0]);
      }
    }
    __m256 sum[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) {
        sum[r][t] = acc[r][t][0];
        for (int u = 1; u < U; ++u) sum[r][t] = _mm256_add_ps(sum[r][t], acc[r][t][u]);
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

const Kernels& avx2_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots};
  return kernels;
}

}  // namespace mote::isa

#endif
