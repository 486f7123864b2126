// What each instruction set's source gives the dispatcher (ternary_dispatch.cpp): two dot-product kernels.
//
// Private to the kernel library. Every instruction-set source is compiled with its own flags, so nothing here may be
// an inline function or a template that two sources would both emit (the linker could keep the AVX-512 copy for the
// scalar path): the header declares, and the tiling template below is only ever instantiated on types that live in an
// anonymous namespace, which gives each instantiation internal linkage.
#pragma once

#include <cstdint>

namespace mote::isa {

// Activation layout. The packed codes are never shuffled; instead each token's Q8 activations are stored in blocks
// of 4*G values (G = the kernel's `group_bytes`, one vector of code bytes) such that block position j*G + i holds
// the value at K index 4*i + j of the block: code j of byte i (bits 2j..2j+1) and the int8 it multiplies share a
// lane once plane j of the code vector has been isolated. Positions at or past K hold 0, so that the padding codes
// of a row's last byte, and the zeros of a row's zero-padded last block, contribute nothing.
//
// The kernels sum raw codes times activations: sum_k code_k * q_k, codes in 0..3. The caller subtracts
// 2 * sum_k q_k to get sum_k trit_k * q_k.
struct Kernels {
  int64_t group_bytes;  // G: code bytes per vector, 16, 32 or 64

  // Q8 of v[0, k) into q[0, len) in the layout above (len: whole blocks, as many as the longest row needs); writes
  // sum_k q_k and s_v. The numerics of mote_ternary.h, bit for bit (ternary_quantize.h).
  void (*quantize)(const float* v, int64_t k, int8_t* q, int64_t len, int32_t* q_sum, float* s_v);

  // out[t * rows + r] = sum_k code[r][k] * q[t][k] for r < rows, t < tokens; row r's codes at codes + r*row_bytes,
  // q[t] laid out as above over whole blocks (ceil(row_bytes / G) of them).
  void (*code_dots)(const uint8_t* codes, int64_t row_bytes, int64_t rows, const int8_t* const* q, int64_t tokens,
                    int32_t* out);

  // out[t * rows + r] = sum_i w[r * k + i] * x[t][i] over i < k, fp32, in the kernel's own summation order.
  void (*float_dots)(const float* w, int64_t k, int64_t rows, const float* const* x, int64_t tokens, float* out);
};

// Software prefetch distance of the streaming kernels, in row tiles. Rows are contiguous, so the same offset
// kPrefetchTiles * R rows further on is the line a later tile will load: prefetching it lets the matrix stream from
// DRAM while the current tile computes (on a Xeon a 12.6 MB expert took 1.5 ms without, load latency and compute
// adding up, and 1.0-1.1 ms with; distances of 4 and 8 tiles gained nothing). A prefetch past the matrix's end is
// harmless.
constexpr int64_t kPrefetchTiles = 2;

const Kernels& scalar_kernels();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels& avx2_kernels();
const Kernels& avx512_kernels();
#endif
#if defined(__aarch64__)
const Kernels& neon_kernels();
const Kernels& neon_dotprod_kernels();
#endif

// Runs a register-tiled micro-kernel over a [rows x tokens] block of dot products.
//
// `Tile` (a type in the caller's anonymous namespace) provides kRowsSingle (rows per tile when there is one token:
// the decode GEMV), kRows and kTokens (the tile for several tokens) and
//     template <int R, int T> static void run(const Src* const* row, int64_t len, const Act* const* act,
//                                               int64_t valid_rows, Out* out, int64_t out_stride);
// which writes out[t * out_stride + r] for r < valid_rows. A partial row tile repeats the last row (read, never
// written), so no tile reads outside the matrix; a partial token tile uses the exact smaller instantiation. Row
// tiles are the outer loop: a tile's rows stay in L1 while every token passes over them.
template <class Tile, int R, int T>
struct TokenTile {
  template <class Src, class Act, class Out>
  static void run(int64_t nt, const Src* const* row, int64_t len, const Act* const* act, int64_t valid_rows, Out* out,
                  int64_t out_stride) {
    if (nt < T) return TokenTile<Tile, R, T - 1>::run(nt, row, len, act, valid_rows, out, out_stride);
    Tile::template run<R, T>(row, len, act, valid_rows, out, out_stride);
  }
};
template <class Tile, int R>
struct TokenTile<Tile, R, 0> {
  template <class Src, class Act, class Out>
  static void run(int64_t, const Src* const*, int64_t, const Act* const*, int64_t, Out*, int64_t) {}
};

template <class Tile, int R, int T, class Src, class Act, class Out>
void row_tiles(const Src* src, int64_t stride, int64_t len, int64_t rows, const Act* const* act, int64_t tokens,
               Out* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += R) {
    const Src* row[R];
    for (int r = 0; r < R; ++r) row[r] = src + (r0 + r < rows ? r0 + r : rows - 1) * stride;
    const int64_t valid = rows - r0 < R ? rows - r0 : R;
    for (int64_t t0 = 0; t0 < tokens; t0 += T) {
      const int64_t nt = tokens - t0 < T ? tokens - t0 : T;
      TokenTile<Tile, R, T>::run(nt, row, len, act + t0, valid, out + t0 * rows + r0, rows);
    }
  }
}

// out[t * rows + r] for all rows and tokens.
template <class Tile, class Src, class Act, class Out>
void tiled_dots(const Src* src, int64_t stride, int64_t len, int64_t rows, const Act* const* act, int64_t tokens,
                Out* out) {
  if (tokens == 1) return row_tiles<Tile, Tile::kRowsSingle, 1>(src, stride, len, rows, act, tokens, out);
  row_tiles<Tile, Tile::kRows, Tile::kTokens>(src, stride, len, rows, act, tokens, out);
}

}  // namespace mote::isa
