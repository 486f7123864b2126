// Portable kernels: plain C++ for any architecture, the fallback and the model the vector kernels follow.
#include "ternary_isa.h"
#include "ternary_quantize.h"

namespace mote::isa {
namespace {

constexpr int64_t kGroup = 32;  // code bytes per activation block (any size works here; 32 as AVX2)

// sum over one row of code * q, walking the row's bytes block by block in the permuted activation layout.
int32_t code_dot(const uint8_t* codes, int64_t row_bytes, const int8_t* q) {
  int32_t acc = 0;
  for (int64_t block = 0; block * kGroup < row_bytes; ++block) {
    const uint8_t* c = codes + block * kGroup;
    const int8_t* qb = q + block * 4 * kGroup;
    const int64_t bytes = row_bytes - block * kGroup < kGroup ? row_bytes - block * kGroup : kGroup;
    for (int64_t i = 0; i < bytes; ++i) {
      for (int j = 0; j < 4; ++j) acc += ((c[i] >> (2 * j)) & 3) * qb[j * kGroup + i];
    }
  }
  return acc;
}

void code_dots(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
               int32_t* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < rows; ++r) out[t * rows + r] = code_dot(codes + r * row_bytes, row_bytes, q[t]);
  }
}

// Four partial sums so that the loop is not one long chain of dependent additions.
float float_dot(const float* w, const float* x, int64_t k) {
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 4 <= k; i += 4) {
    for (int j = 0; j < 4; ++j) s[j] += w[i + j] * x[i + j];
  }
  for (; i < k; ++i) s[0] += w[i] * x[i];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void float_dots(const float* w, int64_t k, int64_t rows, const float* const* x, int64_t tokens, float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < rows; ++r) out[t * rows + r] = float_dot(w + r * k, x[t], k);
  }
}

// Value i of an int4 span (its 16 bytes at b).
inline int int4_value(const uint8_t* b, int64_t i) { return i < 16 ? (b[i] & 15) - 8 : (b[i - 16] >> 4) - 8; }

// sum_k W[k] * x[k] of one row: per group, sum q * x (four partial sums), then acc += scale * sum.
template <int Bits>
float quantized_dot(const uint8_t* row, const float* scale, const QuantizedRows& m, const float* x) {
  float acc = 0.0f;
  for (int64_t g = 0; g < m.groups; ++g) {
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t i = g * m.group; i < (g + 1) * m.group; i += 4) {  // int4 groups are multiples of 32
      for (int j = 0; j < 4 && i + j < (g + 1) * m.group; ++j) {
        const int64_t k = i + j;
        const int q = Bits == 4 ? int4_value(row + k / kInt4Span * 16, k % kInt4Span) : static_cast<int8_t>(row[k]);
        s[j] += static_cast<float>(q) * x[k];
      }
    }
    acc += ((s[0] + s[1]) + (s[2] + s[3])) * scale[g];
  }
  return acc;
}

template <int Bits>
void quantized_dots(const QuantizedRows& m, const float* const* x, int64_t tokens, float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t r = 0; r < m.rows; ++r) {
      out[t * m.rows + r] = quantized_dot<Bits>(m.data + r * m.row_bytes, m.scale + r * m.groups, m, x[t]);
    }
  }
}

// Panels of one row: the prefill tile is plain row-major, and panel_dots is float_dots.
constexpr int64_t kPanelRows = 1;

// One run per group the inputs overlap (a division per run, not per value).
template <int Bits>
void dequantize(const QuantizedRows& m, int64_t k0, int64_t len, float* w) {
  for (int64_t i = 0; i < len;) {
    const int64_t g = (k0 + i) / m.group, group_end = (g + 1) * m.group - k0;
    const int64_t end = group_end < len ? group_end : len;
    for (int64_t r = 0; r < m.rows; ++r) {
      const uint8_t* row = m.data + r * m.row_bytes;
      const float s = m.scale[r * m.groups + g];
      for (int64_t j = i; j < end; ++j) {
        const int64_t k = k0 + j;
        const int q = Bits == 4 ? int4_value(row + k / kInt4Span * 16, k % kInt4Span) : static_cast<int8_t>(row[k]);
        w[r * len + j] = static_cast<float>(q) * s;
      }
    }
    i = end;
  }
}

}  // namespace

const Kernels& scalar_kernels() {
  static const Kernels kernels{kGroup,        quantize<kGroup>,  code_dots,         float_dots,
                               kPanelRows,    quantized_dots<4>, quantized_dots<8>, dequantize<4>,
                               dequantize<8>, float_dots};
  return kernels;
}

}  // namespace mote::isa
