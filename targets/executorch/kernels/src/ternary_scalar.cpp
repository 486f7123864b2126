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

}  // namespace

const Kernels& scalar_kernels() {
  static const Kernels kernels{kGroup, quantize<kGroup>, code_dots, float_dots};
  return kernels;
}

}  // namespace mote::isa
