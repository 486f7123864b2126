// The int32 epilogue both NEON sources share (ternary_neon.cpp, ternary_neon_dotprod.cpp). Private to the kernel
// library, and in an anonymous namespace: each source compiles its own copy with its own flags, so the linker never
// picks the dotprod build's copy for the armv8-a path (see ternary_isa.h).
#pragma once

#include <arm_neon.h>

#include <cstdint>

namespace mote::isa {
namespace {

// out[t * out_stride + r] = the lane sum of s[r][t] for r < valid_rows; pairwise adds reduce four vectors at a time.
template <int R, int T>
void store_sums(const int32x4_t (&s)[R][T], int64_t valid_rows, int32_t* out, int64_t out_stride) {
  constexpr int N = R * T, Padded = (N + 3) / 4 * 4;
  int32x4_t v[Padded];
  for (int i = 0; i < Padded; ++i) v[i] = i < N ? s[i / T][i % T] : vdupq_n_s32(0);
  int32_t sums[Padded];
  for (int i = 0; i < Padded; i += 4) {
    vst1q_s32(sums + i, vpaddq_s32(vpaddq_s32(v[i], v[i + 1]), vpaddq_s32(v[i + 2], v[i + 3])));
  }
  for (int r = 0; r < valid_rows; ++r) {
    for (int t = 0; t < T; ++t) out[t * out_stride + r] = sums[r * T + t];
  }
}

}  // namespace
}  // namespace mote::isa
