// Which (tile, head, batch) a thread block works on, and the 64-bit offsets of its rows.
// Grids are 1-D (gridDim.x <= 2^31 - 1) so batch * heads * tiles is not limited by gridDim.y/z <= 65535.
#pragma once

#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// Offset of (batch b, head h, row r) with element strides; everything is widened before multiplying.
FA2_DEVICE index_t row_offset(int b, int h, int r, index_t batch_stride, index_t head_stride, index_t row_stride) {
  return static_cast<index_t>(b) * batch_stride + static_cast<index_t>(h) * head_stride +
         static_cast<index_t>(r) * row_stride;
}

FA2_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Forward: one block per (query tile, q head, batch). Query tiles vary fastest so blocks sharing K/V run
// together (L2 reuse); the last (for causal: most expensive) tile of each head is scheduled first.
template <int kBlockM>
struct FwdBlockInfo {
  int m_block, head, head_kv, batch;
  int row0;   // first query row of the tile
  int rows;   // valid query rows in the tile (<= kBlockM)
  FA2_DEVICE explicit FwdBlockInfo(const FwdParams& p) {
    const int num_m = ceil_div(p.seqlen_q, kBlockM);
    const int bid = static_cast<int>(blockIdx.x);
    m_block = num_m - 1 - bid % num_m;
    const int bh = bid / num_m;
    head = bh % p.heads_q;
    batch = bh / p.heads_q;
    head_kv = head / (p.heads_q / p.heads_kv);
    row0 = m_block * kBlockM;
    rows = min(kBlockM, p.seqlen_q - row0);
  }
  // Index of (batch, head, row 0) in the (B, Hq, Nq) row-wise arrays (lse, softmax_d).
  FA2_DEVICE index_t row_index(const FwdParams& p) const {
    return (static_cast<index_t>(batch) * p.heads_q + head) * p.seqlen_q + row0;
  }
};

// Backward main kernel: one block per (key tile, kv head, batch); key tile 0 (which sees the most query tiles
// under causal masking) first.
template <int kBlockN>
struct BwdBlockInfo {
  int n_block, head_kv, batch;
  int key0;  // first key of the tile
  int keys;  // valid keys in the tile (<= kBlockN)
  FA2_DEVICE explicit BwdBlockInfo(const BwdParams& p) {
    const int num_n = ceil_div(p.seqlen_k, kBlockN);
    const int bid = static_cast<int>(blockIdx.x);
    n_block = bid % num_n;
    const int bh = bid / num_n;
    head_kv = bh % p.heads_kv;
    batch = bh / p.heads_kv;
    key0 = n_block * kBlockN;
    keys = min(kBlockN, p.seqlen_k - key0);
  }
};

}  // namespace flash_attn2::cuda
