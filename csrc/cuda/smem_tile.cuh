// Swizzled shared-memory tiles and the 16-byte global<->shared copies that fill/drain them.
#pragma once

#include <cstdint>

#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// A kRows x kCols tile of 16-bit elements, stored as kCols/kBK column blocks of kRows x kBK elements.
// Inside a block, the 16-byte chunks of row r are XOR-permuted:
//   kBK == 64 (8 chunks = one 128-byte bank row per tile row): chunk ^= r % 8
//   kBK == 32 (4 chunks, two tile rows per bank row):          chunk ^= (r / 2) % 4
// so the 8 rows an ldmatrix 8x8 matrix reads (same logical chunk, 8 consecutive rows) hit 8 distinct
// 16-byte bank groups, and a quad-row of 4-byte fragment stores is conflict free too.
template <int kRows_, int kCols_>
struct SwizzledTile {
  static constexpr int kRows = kRows_;
  static constexpr int kCols = kCols_;
  static constexpr int kBK = (kCols % 64 == 0) ? 64 : 32;
  static constexpr int kChunksPerBlockRow = kBK / 8;
  static constexpr int kElems = kRows * kCols;
  static_assert(kCols % 32 == 0, "tile width must be a multiple of 32 elements");
  static_assert(kRows % 8 == 0, "tile height must be a multiple of 8 rows");

  // Element offset of chunk `ch` (columns 8*ch .. 8*ch+7) of row r.
  static FA2_DEVICE int chunk_offset(int r, int ch) {
    const unsigned ur = static_cast<unsigned>(r), uc = static_cast<unsigned>(ch);
    const unsigned swz = kBK == 64 ? (ur & 7u) : ((ur >> 1) & 3u);
    return static_cast<int>((uc / kChunksPerBlockRow) * (kRows * kBK) + ur * kBK +
                            (((uc % kChunksPerBlockRow) ^ swz) << 3));
  }
  // Element offset of (r, c).
  static FA2_DEVICE int offset(int r, int c) { return chunk_offset(r, c >> 3) + (c & 7); }

  // Shared-space byte address of chunk (r_var + r_const, ch_var + ch_const) for fragment loads, split so that
  // everything depending only on the lane / warp is computed once and the unrolled-loop constants become
  // immediates. r_const must be a multiple of 8 (the swizzle then depends on r_var only).
  //   kChunkVar = false: ch_var is 0 or 1 (a lane bit) and ch_const is even, so the constant chunk step is a
  //     XOR of the lane's base offset plus a block offset (one LOP3, the rest folds into the ldmatrix immediate).
  //   kChunkVar = true: ch_var also carries a runtime (per-warp) offset; the chunk part is computed in full.
  template <bool kChunkVar>
  static FA2_DEVICE uint32_t frag_addr(uint32_t base, int r_var, int r_const, int ch_var, int ch_const) {
    if constexpr (!kChunkVar) {
      const int off0 = chunk_offset(r_var, ch_var);
      return base + 2u * static_cast<uint32_t>((off0 ^ ((ch_const % kChunksPerBlockRow) << 3)) +
                                               (ch_const / kChunksPerBlockRow) * (kRows * kBK) + r_const * kBK);
    } else {
      return base + 2u * static_cast<uint32_t>(chunk_offset(r_var, ch_var + ch_const) + r_const * kBK);
    }
  }
};

// Thread mapping of the 16-byte copies: kCPR threads cover one row (consecutive threads, consecutive chunks:
// coalesced global access, and each 8-thread group fills one 128-byte smem bank row), kRowsPerPass rows per
// pass; threads beyond kRowsPerPass * kCPR idle when kThreads is not a multiple of kCPR.
template <class Tile, int kThreads>
struct TileCopy {
  static constexpr int kCPR = Tile::kCols / 8;
  static constexpr int kRowsPerPass = kThreads / kCPR;
  static constexpr int kPasses = (Tile::kRows + kRowsPerPass - 1) / kRowsPerPass;
  static constexpr bool kFull = kThreads % kCPR == 0 && Tile::kRows % kRowsPerPass == 0;
  // Rows per pass a multiple of 8: the swizzle of a thread's rows never changes, offsets step by constants.
  static constexpr bool kConstStep = kRowsPerPass % 8 == 0;
  static_assert(kRowsPerPass >= 1, "not enough threads for one row");
};

// Asynchronously copies rows [0, kRows) x cols [0, kCols) of a row-major global tile into `Tile` at s_base
// (a shared-space byte address). Rows >= rows_valid and columns >= cols_valid (a multiple of 8) are
// zero-filled instead of read. Issue only: the caller commits and waits.
template <class Tile, int kThreads, typename T>
FA2_DEVICE void g2s_tile_async(uint32_t s_base, const T* g, index_t row_stride, int rows_valid, int cols_valid,
                               int tid) {
  using C = TileCopy<Tile, kThreads>;
  const int r0 = tid / C::kCPR;
  const int ch = tid % C::kCPR;
  const bool active = C::kFull || r0 < C::kRowsPerPass;
  const bool col_ok = ch * 8 < cols_valid;
  const T* src = g + static_cast<index_t>(r0) * row_stride + ch * 8;
  const index_t pass_stride = static_cast<index_t>(C::kRowsPerPass) * row_stride;
  const int off0 = Tile::chunk_offset(r0, ch);
#pragma unroll
  for (int i = 0; i < C::kPasses; ++i) {
    const int r = r0 + i * C::kRowsPerPass;
    if (active && (C::kFull || r < Tile::kRows)) {
      const bool pred = col_ok && r < rows_valid;
      const int off = C::kConstStep ? off0 + i * C::kRowsPerPass * Tile::kBK : Tile::chunk_offset(r, ch);
      cp_async_16(s_base + 2u * static_cast<uint32_t>(off), pred ? src : g, pred);
    }
    src += pass_stride;
  }
}

// Copies rows [row0, row0 + kRows) of a Tile in shared memory to global memory (g points at global row row0;
// rows_valid counts from row0) with 16-byte loads and stores; rows >= rows_valid and columns >= cols_valid are not
// written. A warpgroup copies out the rows it staged itself this way, behind a barrier of its own warps. The caller
// synchronises before (producers done) and after (reuse).
template <class Tile, int kRows, int kThreads, typename T>
FA2_DEVICE void s2g_rows(T* g, index_t row_stride, const T* s, int row0, int rows_valid, int cols_valid, int tid) {
  using C = TileCopy<SwizzledTile<kRows, Tile::kCols>, kThreads>;
  static_assert(kRows <= Tile::kRows, "a row window of the tile");
  const int r0 = tid / C::kCPR;
  const int ch = tid % C::kCPR;
  const bool active = (C::kFull || r0 < C::kRowsPerPass) && ch * 8 < cols_valid;
  T* dst = g + static_cast<index_t>(r0) * row_stride + ch * 8;
  const index_t pass_stride = static_cast<index_t>(C::kRowsPerPass) * row_stride;
#pragma unroll
  for (int i = 0; i < C::kPasses; ++i) {
    const int r = r0 + i * C::kRowsPerPass;
    if (active && (C::kFull || r < kRows) && r < rows_valid) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(s + Tile::chunk_offset(row0 + r, ch));
    }
    dst += pass_stride;
  }
}

// The whole tile (s2g_rows over every row).
template <class Tile, int kThreads, typename T>
FA2_DEVICE void s2g_tile(T* g, index_t row_stride, const T* s, int rows_valid, int cols_valid, int tid) {
  s2g_rows<Tile, Tile::kRows, kThreads>(g, row_stride, s, 0, rows_valid, cols_valid, tid);
}

// Stores one mma C fragment pair (rows row, cols col..col+1), converted to T, into a swizzled tile.
template <class Tile, typename T>
FA2_DEVICE void st_pair(T* s, int row, int col, float v0, float v1) {
  *reinterpret_cast<uint32_t*>(s + Tile::offset(row, col)) = pack2<T>(v0, v1);
}

}  // namespace flash_attn2::cuda
