// AVX2 + FMA kernels (compiled with -mavx2 -mfma; only called when the CPU has both).
//
// Ternary: 32 code bytes per vector; plane j = (bytes >> 2j) & 3 is the unsigned operand of vpmaddubsw against the
// activations' plane j. Pair sums are at most 2*3*128 = 768, so the four planes add up in int16 without saturating
// (<= 3072) before one vpmaddwd widens them to int32.
//
// Weight-only int4 and int8: 8 bytes widened to int32 lanes (vpmovzxbd straight from memory; an int4 byte's low
// nibble is a mask away and its high one a shift), converted to float, and FMAed into a per-group sum that the
// group's scale multiplies at the group's end: one multiply per group rather than one per vector. (AVX2's vpermps
// picks among 8 lanes only, so the 16-level table of the AVX-512 kernel does not carry over.)
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

// 8 bytes as int32 lanes.
inline __m256i widen8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The int4 values of a span's bytes 8h..8h+7 (widen8 of them): its values 8h.. (low nibbles) and 16+8h.. (high).
inline __m256 int4_low(__m256i v) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(v, _mm256_set1_epi32(15)), _mm256_set1_epi32(8)));
}
inline __m256 int4_high(__m256i v) {
  return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(v, 4), _mm256_set1_epi32(8)));
}

// R rows x T tokens straight from int4 rows: per group, sum q * x, then acc += scale * sum. One loop over the row's
// spans (a group of 32 is a single span: a nested loop per group would cost a loop per 32 weights).
struct Int4Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 2;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    __m256 acc[R][T], inner[R][T];
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = inner[r][t] = _mm256_setzero_ps();
    }
    const int64_t spans = m.k / kInt4Span, per_group = m.group / kInt4Span;
    for (int64_t sp = 0, g = 0, left = per_group; sp < spans; ++sp) {
      const int64_t k0 = sp * kInt4Span, byte = k0 / 2;
      if (byte % 64 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + byte + kPrefetchTiles * R * m.row_bytes);
      }
      for (int r = 0; r < R; ++r) {
        for (int h = 0; h < 2; ++h) {
          const __m256i v = widen8(row[r] + byte + 8 * h);
          const __m256 lo = int4_low(v), hi = int4_high(v);
          for (int t = 0; t < T; ++t) {
            inner[r][t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x[t] + k0 + 8 * h), inner[r][t]);
            inner[r][t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x[t] + k0 + 16 + 8 * h), inner[r][t]);
          }
        }
      }
      if (--left == 0) {  // the group's end: scale its sums
        if (g % 16 == 0) {
          for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
        }
        for (int r = 0; r < R; ++r) {
          const __m256 s = _mm256_set1_ps(scale[r][g]);
          for (int t = 0; t < T; ++t) {
            acc[r][t] = _mm256_fmadd_ps(inner[r][t], s, acc[r][t]);
            inner[r][t] = _mm256_setzero_ps();
          }
        }
        left = per_group;
        ++g;
      }
    }
    store_sums(acc, valid_rows, out, out_stride);
  }
};

// R rows x T tokens straight from int8 rows: per group, sum q * x, then acc += scale * sum. A group is walked 64
// bytes (a line, prefetched once) at a time, then in whole vectors of 8, then its last < 8 values one at a time.
struct Int8Tile {
  static constexpr int kRowsSingle = 4, kRows = 2, kTokens = 2;

  template <int R, int T>
  static void run(const uint8_t* const* row, const float* const* scale, const QuantizedRows& m,
                  const float* const* x, int64_t valid_rows, float* out, int64_t out_stride) {
    __m256 acc[R][T];
    float tail[R][T] = {};
    for (int r = 0; r < R; ++r) {
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
    }
    const int64_t prefetch = kPrefetchTiles * R * m.row_bytes;
    for (int64_t g = 0; g < m.groups; ++g) {
      __m256 inner[R][T];
      float rest[R][T] = {};
      for (int r = 0; r < R; ++r) {
        for (int t = 0; t < T; ++t) inner[r][t] = _mm256_setzero_ps();
      }
      if (g % 16 == 0) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(scale[r] + g + kPrefetchTiles * R * m.groups);
      }
      const int64_t end = (g + 1) * m.group;
      int64_t i = g * m.group;
      const auto step = [&](int64_t at) {
        for (int r = 0; r < R; ++r) {
          const __m256 w = _mm256_cvtepi32_ps(
              _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row[r] + at))));
          for (int t = 0; t < T; ++t) inner[r][t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[t] + at), inner[r][t]);
        }
      };
      for (; i + 64 <= end; i += 64) {
        for (int r = 0; r < R; ++r) __builtin_prefetch(row[r] + i + prefetch);
        for (int j = 0; j < 64; j += 8) step(i + j);
      }
      for (; i + 8 <= end; i += 8) step(i);
      for (; i < end; ++i) {
        for (int r = 0; r < R; ++r) {
          const float w = static_cast<float>(static_cast<int8_t>(row[r][i]));
          for (int t = 0; t < T; ++t) rest[r][t] += w * x[t][i];
        }
      }
      for (int r = 0; r < R; ++r) {
        const float sg = scale[r][g];
        const __m256 s = _mm256_set1_ps(sg);
        for (int t = 0; t < T; ++t) {
          acc[r][t] = _mm256_fmadd_ps(inner[r][t], s, acc[r][t]);
          tail[r][t] += rest[r][t] * sg;
        }
      }
    }
    float sums[T * R];  // [t][r]
    store_sums(acc, R, sums, R);
    for (int r = 0; r < valid_rows; ++r) {
      for (int t = 0; t < T; ++t) out[t * out_stride + r] = sums[t * R + r] + tail[r][t];
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
// buffer, transposed 8 x 8 into panels of 16 rows, then per input of a panel, two vectors of weights (16 rows) times
// each token's x broadcast.
struct PanelTile {
  static constexpr int64_t kRows = 16;   // two vectors of rows per panel
  static constexpr int64_t kChunk = 32;  // inputs dequantized row-major at a time before the transpose
  static constexpr int64_t kBlock = 8;
  static constexpr int kTokens = 6;  // 12 accumulators, 2 weight vectors and a broadcast: 15 of 16 registers

  static void dequantize_span(const uint8_t* span, float sg, float* w) {
    const __m256 s = _mm256_set1_ps(sg);
    for (int h = 0; h < 2; ++h) {
      const __m256i v = widen8(span + 8 * h);
      _mm256_storeu_ps(w + 8 * h, _mm256_mul_ps(int4_low(v), s));
      _mm256_storeu_ps(w + 16 + 8 * h, _mm256_mul_ps(int4_high(v), s));
    }
  }

  // Whole vectors, then the run's last < 8 values one at a time.
  static void dequantize_run(const uint8_t* row, float sg, float* w, int64_t begin, int64_t end) {
    const __m256 s = _mm256_set1_ps(sg);
    int64_t j = begin;
    for (; j + 8 <= end; j += 8) {
      const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
      _mm256_storeu_ps(w + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), s));
    }
    for (; j < end; ++j) w[j] = static_cast<float>(static_cast<int8_t>(row[j])) * sg;
  }

  static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t count) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * src_stride);
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4h + c] lane L = column 4L + c of rows 4h..4h+3
    for (int h = 0; h < 2; ++h) {
      r[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
      r[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
      r[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
      r[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
      t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
      t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
    }
    for (int i = 0; i < count; ++i) _mm256_storeu_ps(dst + i * dst_stride, t[i]);
  }

  template <int R, int T>
  static void run(const float* panel, int64_t len, const float* const* x, int64_t valid_rows, float* out,
                  int64_t out_stride) {
    __m256 acc[T][2];
    for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < len; ++i) {
      const __m256 w0 = _mm256_loadu_ps(panel + i * kRows), w1 = _mm256_loadu_ps(panel + i * kRows + 8);
      for (int t = 0; t < T; ++t) {
        const __m256 xv = _mm256_broadcast_ss(x[t] + i);
        acc[t][0] = _mm256_fmadd_ps(w0, xv, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(w1, xv, acc[t][1]);
      }
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i m0 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid_rows)), lane);
    const __m256i m1 = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(valid_rows - 8)), lane);
    for (int t = 0; t < T; ++t) {
      _mm256_maskstore_ps(out + t * out_stride, m0, acc[t][0]);
      _mm256_maskstore_ps(out + t * out_stride + 8, m1, acc[t][1]);
    }
  }
};

}  // namespace

const Kernels& avx2_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots, PanelTile::kRows,
                               quantized_tiled_dots<Int4Tile>, quantized_tiled_dots<Int8Tile>,
                               dequantize_panels<PanelTile, 4>, dequantize_panels<PanelTile, 8>, panel_dots<PanelTile>};
  return kernels;
}

}  // namespace mote::isa

#endif
