// Q8 of one token into the activation layout of ternary_isa.h, the numerics of mote_ternary.h.
//
// Included by every instruction-set source, each of which exposes its own copy as Kernels::quantize: plain C++ that
// the compiler vectorises with that source's flags. Everything here sits in an anonymous namespace (one private
// copy per source, so the linker can never hand the AVX-512 copy to the scalar path) and uses no std:: templates for
// the same reason. The sources are built with -ffp-contract=off: v * inv must be rounded to float before the
// rounding shift below, as PyTorch rounds it.
#pragma once

#include <cstdint>
#include <cstring>

namespace mote::isa {
namespace {

// max_k |v_k| from the bit patterns: for non-negative floats the integer order is the numeric order, and integer
// max vectorises where a float max with C++ semantics would not.
inline float abs_max(const float* v, int64_t k) {
  uint32_t m = 0;
  for (int64_t i = 0; i < k; ++i) {
    uint32_t bits;
    std::memcpy(&bits, v + i, sizeof bits);
    bits &= 0x7FFFFFFFu;
    m = bits > m ? bits : m;
  }
  float amax;
  std::memcpy(&amax, &m, sizeof amax);
  return amax;
}

// round-half-even of |v| < 2^22 in the default rounding mode: adding 1.5 * 2^23 leaves no fraction bits, so the
// addition itself rounds (to nearest, ties to even) and the subtraction is exact. No libm call, vectorisable.
inline float round_half_even(float v) {
  constexpr float kShift = 12582912.0f;
  return (v + kShift) - kShift;
}

inline int8_t quantize_one(float scaled) {
  float r = round_half_even(scaled);
  r = r < -128.0f ? -128.0f : r;
  r = r > 127.0f ? 127.0f : r;
  return static_cast<int8_t>(static_cast<int32_t>(r));
}

// Q8 of v[0, k) into q[0, len) (len a multiple of 4*G), in blocks of 4*G values where position j*G + i holds K index
// 4*i + j; also the sum of the q and s_v. Each block is quantised in K order and then transposed: both vectorise.
template <int64_t G>
void quantize(const float* v, int64_t k, int8_t* q, int64_t len, int32_t* q_sum, float* s_v) {
  float amax = abs_max(v, k);
  amax = amax < 1e-5f ? 1e-5f : amax;
  const float inv = (1.0f / amax) * 127.0f;
  int8_t plain[4 * G];
  for (int64_t base = 0; base < len; base += 4 * G) {
    const int64_t n = k - base < 0 ? 0 : (k - base < 4 * G ? k - base : 4 * G);
    for (int64_t i = 0; i < n; ++i) plain[i] = quantize_one(v[base + i] * inv);
    for (int64_t i = n; i < 4 * G; ++i) plain[i] = 0;
    for (int64_t j = 0; j < 4; ++j) {
      for (int64_t i = 0; i < G; ++i) q[base + j * G + i] = plain[4 * i + j];
    }
  }
  int32_t sum = 0;
  for (int64_t i = 0; i < len; ++i) sum += q[i];
  *q_sum = sum;
  *s_v = amax / 127.0f;
}

}  // namespace
}  // namespace mote::isa
