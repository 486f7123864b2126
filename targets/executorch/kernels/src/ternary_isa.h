// What each instruction set's source gives the dispatcher (ternary_dispatch.cpp): the dot-product kernels of the
// ternary, fp32 and weight-only quantized linears.
//
// Private to the kernel library. Every instruction-set source is compiled with its own flags, so nothing here may be
// an inline function or a template that two sources would both emit (the linker could keep the AVX-512 copy for the
// scalar path): the header declares, and the tiling templates below are only ever instantiated on types that live in
// an anonymous namespace, which gives each instantiation internal linkage.
#pragma once

#include <cstdint>
#include <cstring>

namespace mote::isa {

// Rows [0, rows) of a quantized matrix (mote_ternary.h: QuantizedMatrix), already validated: row r's packed values
// at data + r * row_bytes (bits 4: K/2 bytes; bits 8: K int8), its group scales at scale + r * groups.
struct QuantizedRows {
  const uint8_t* data;
  const float* scale;
  int64_t rows, k, group, groups, row_bytes;
};

// int4 rows are spans of 32 values in 16 bytes: byte i holds value i + 8 in its low nibble and value 16 + i + 8 in
// its high one, so one mask and one shift of a 16-byte vector give 16 consecutive values each.
constexpr int64_t kInt4Span = 32;

// The quantized prefill path's tile: kQuantTileRows rows (a multiple of every kernel's panel_rows) by kQuantTileCols
// inputs (a multiple of the int4 span), 32 KiB of fp32 that stays in L1 while every token passes over it.
constexpr int64_t kQuantTileRows = 32;
constexpr int64_t kQuantTileCols = 256;

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

  // The weight-only quantized linear (storage and numerics in mote_ternary.h), one function per bit width so that
  // each is a straight loop over its own layout.
  //   *_dots: out[t * m.rows + r] = sum_k W[r][k] * x[t][k] read straight from the packed rows, fp32 in the
  //     kernel's own order: the decode GEMV, whose speed is that of streaming the packed bytes.
  //   dequantize_*: the prefill path's tile, rows [0, m.rows) (at most kQuantTileRows) by inputs [k0, k0 + len)
  //     (int4: k0 and len multiples of 32), dequantized once into panels of `panel_rows` rows stored k-major:
  //         tile[(p * len + i) * panel_rows + j] = W[p * panel_rows + j][k0 + i]      (rows past m.rows: 0)
  //     so that panel_dots broadcasts one x value against a whole vector of rows: an outer-product kernel keeps
  //     its accumulators in registers for every k and needs no horizontal sums, where float_dots' dot-product tile
  //     over row-major weights loads two streams per FMA (int4 [4096 x 1024], 64 tokens, one thread of a Sapphire
  //     Rapids Xeon: 60 GMAC/s, dequantisation included, against float_dots' 32 on the fp32 matrix).
  //   panel_dots: out[t * rows + r] = sum_{i < len} W(r, i) * x[t][i] over such a tile, for r < rows.
  int64_t panel_rows;
  void (*int4_dots)(const QuantizedRows& m, const float* const* x, int64_t tokens, float* out);
  void (*int8_dots)(const QuantizedRows& m, const float* const* x, int64_t tokens, float* out);
  void (*dequantize_int4)(const QuantizedRows& m, int64_t k0, int64_t len, float* tile);
  void (*dequantize_int8)(const QuantizedRows& m, int64_t k0, int64_t len, float* tile);
  void (*panel_dots)(const float* tile, int64_t len, int64_t rows, const float* const* x, int64_t tokens,
                     float* out);
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
// (TokenTile forwards whatever arguments its Tile's run takes: the quantized tiles below take more.)
template <class Tile, int R, int T>
struct TokenTile {
  template <class... Args>
  static void run(int64_t nt, const Args&... args) {
    if (nt < T) return TokenTile<Tile, R, T - 1>::run(nt, args...);
    Tile::template run<R, T>(args...);
  }
};
template <class Tile, int R>
struct TokenTile<Tile, R, 0> {
  template <class... Args>
  static void run(int64_t, const Args&...) {}
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

// The same walk over a quantized matrix. `Tile` (as above) provides kRowsSingle, kRows, kTokens and
//     template <int R, int T> static void run(const uint8_t* const* row, const float* const* scale,
//                                               const QuantizedRows& m, const float* const* x, int64_t valid_rows,
//                                               float* out, int64_t out_stride);
// row[r] and scale[r] being row r's packed values and group scales (a partial tile repeats the last row).
template <class Tile, int R, int T>
void quantized_row_tiles(const QuantizedRows& m, const float* const* x, int64_t tokens, float* out) {
  for (int64_t r0 = 0; r0 < m.rows; r0 += R) {
    const uint8_t* row[R];
    const float* scale[R];
    for (int r = 0; r < R; ++r) {
      const int64_t i = r0 + r < m.rows ? r0 + r : m.rows - 1;
      row[r] = m.data + i * m.row_bytes;
      scale[r] = m.scale + i * m.groups;
    }
    const int64_t valid = m.rows - r0 < R ? m.rows - r0 : R;
    for (int64_t t0 = 0; t0 < tokens; t0 += T) {
      const int64_t nt = tokens - t0 < T ? tokens - t0 : T;
      TokenTile<Tile, R, T>::run(nt, row, scale, m, x + t0, valid, out + t0 * m.rows + r0, m.rows);
    }
  }
}

template <class Tile>
void quantized_tiled_dots(const QuantizedRows& m, const float* const* x, int64_t tokens, float* out) {
  if (tokens == 1) return quantized_row_tiles<Tile, Tile::kRowsSingle, 1>(m, x, tokens, out);
  quantized_row_tiles<Tile, Tile::kRows, Tile::kTokens>(m, x, tokens, out);
}


// The prefill path's tile (Kernels::dequantize_* and panel_dots) over panels of Panel::kRows rows, the walk shared
// by the vector sources. `Panel` (a type in the caller's anonymous namespace) provides
//     kRows   (Kernels::panel_rows: two vectors of rows),
//     kChunk  (inputs dequantized row-major at a time before the transpose, a multiple of the int4 span),
//     kBlock  (the side of the transpose's square block, which divides kRows and kChunk),
//     kTokens (the widest token tile of run),
//     static void dequantize_span(const uint8_t* span, float s, float* w);   // w[0, 32) = int4 span times s
//     static void dequantize_run(const uint8_t* row, float s, float* w, int64_t begin, int64_t end);
//                                                   // w[j] = int8 row[j] times s for begin <= j < end
//     static void transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t count);
//                                                   // dst + i * dst_stride (kBlock floats) = column i of the
//                                                   // kBlock x kBlock block at src (rows src_stride apart), i < count
// and, for TokenTile, run<1, T>(panel, len, x, valid_rows, out, out_stride): the panel's rows times T tokens.

// w[r * len + i] = W[r][k0 + i] for r < m.rows, i < len (int4: k0 and len multiples of the span).
// (The group of each span or run is found once per call, outside the loop over rows: a division per row and span
// cost as much as the rest of the dequantisation.)
template <class Panel>
void rowmajor_int4(const QuantizedRows& m, int64_t k0, int64_t len, float* w) {
  for (int64_t i = 0; i < len; i += kInt4Span) {
    const int64_t g = (k0 + i) / m.group, byte = (k0 + i) / 2;
    for (int64_t r = 0; r < m.rows; ++r) {
      Panel::dequantize_span(m.data + r * m.row_bytes + byte, m.scale[r * m.groups + g], w + r * len + i);
    }
  }
}

// One run per group the inputs overlap.
template <class Panel>
void rowmajor_int8(const QuantizedRows& m, int64_t k0, int64_t len, float* w) {
  for (int64_t i = 0; i < len;) {
    const int64_t g = (k0 + i) / m.group, group_end = (g + 1) * m.group - k0;
    const int64_t end = group_end < len ? group_end : len;
    for (int64_t r = 0; r < m.rows; ++r) {
      Panel::dequantize_run(m.data + r * m.row_bytes + k0, m.scale[r * m.groups + g], w + r * len, i, end);
    }
    i = end;
  }
}

// Kernels::dequantize_*: each panel's rows dequantized kChunk inputs at a time into a row-major buffer (rows past
// m.rows zeroed), then transposed kBlock x kBlock into the panel.
template <class Panel, int Bits>
void dequantize_panels(const QuantizedRows& m, int64_t k0, int64_t len, float* tile) {
  constexpr int64_t P = Panel::kRows, C = Panel::kChunk, B = Panel::kBlock;
  alignas(64) float buf[P * C];
  for (int64_t p = 0; p * P < m.rows; ++p) {
    QuantizedRows sub = m;
    sub.data += p * P * m.row_bytes;
    sub.scale += p * P * m.groups;
    sub.rows = m.rows - p * P < P ? m.rows - p * P : P;
    float* panel = tile + p * len * P;
    for (int64_t i = 0; i < len; i += C) {
      const int64_t c = len - i < C ? len - i : C;
      if (Bits == 4) {
        rowmajor_int4<Panel>(sub, k0 + i, c, buf);
      } else {
        rowmajor_int8<Panel>(sub, k0 + i, c, buf);
      }
      if (sub.rows < P) std::memset(buf + sub.rows * c, 0, (P - sub.rows) * c * sizeof(float));
      for (int64_t h = 0; h < P; h += B) {
        for (int64_t j = 0; j < c; j += B) {
          Panel::transpose(buf + h * c + j, c, panel + (i + j) * P + h, P, c - j < B ? c - j : B);
        }
      }
    }
  }
}

// Kernels::panel_dots: each panel against token tiles of equal size (for kTokens 12, 16 tokens as 8 + 8, not
// 12 + 4): a narrow tile reuses each weight vector less.
template <class Panel>
void panel_dots(const float* tile, int64_t len, int64_t rows, const float* const* x, int64_t tokens, float* out) {
  constexpr int64_t P = Panel::kRows;
  constexpr int T = Panel::kTokens;
  for (int64_t p = 0; p * P < rows; ++p) {
    const int64_t valid = rows - p * P < P ? rows - p * P : P;
    const int64_t tiles = (tokens + T - 1) / T;
    for (int64_t j = 0, t0 = 0; j < tiles; ++j) {
      const int64_t nt = (tokens - t0) / (tiles - j);  // sizes never decrease and never pass T
      TokenTile<Panel, 1, T>::run(nt, tile + p * len * P, len, x + t0, valid, out + t0 * rows + p * P, rows);
      t0 += nt;
    }
  }
}

}  // namespace mote::isa
