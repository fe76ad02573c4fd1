// Which (tile, head, batch) a thread block works on, where its sequence lies, and the 64-bit offsets of its rows.
// Grids are 1-D (gridDim.x <= 2^31 - 1) so batch * heads * tiles is not limited by gridDim.y/z <= 65535.
#pragma once

#include "attention_rule.h"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// Offset of (batch b, head h, row r) with element strides; everything is widened before multiplying.
FA2_DEVICE index_t row_offset(int b, int h, int r, index_t batch_stride, index_t head_stride, index_t row_stride) {
  return static_cast<index_t>(b) * batch_stride + static_cast<index_t>(h) * head_stride +
         static_cast<index_t>(r) * row_stride;
}

FA2_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Sequence b of the batch: its lengths and (varlen) first packed rows. Offsets are clamped to the packed totals
// so that no cu_seqlens values can send a kernel outside the tensors.
struct SeqInfo {
  int seqlen_q, seqlen_k;
  int q_start, k_start;  // 0 for dense batches (their batch strides do the work)
  SeqInfo() = default;
  FA2_DEVICE SeqInfo(const FwdParams& p, int b) {
    if (p.cu_seqlens_q != nullptr) {
      q_start = min(max(p.cu_seqlens_q[b], 0), p.total_q);
      seqlen_q = min(max(p.cu_seqlens_q[b + 1], q_start), p.total_q) - q_start;
      k_start = min(max(p.cu_seqlens_k[b], 0), p.total_k);
      seqlen_k = min(max(p.cu_seqlens_k[b + 1], k_start), p.total_k) - k_start;
    } else {
      q_start = k_start = 0;
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
    }
  }
  FA2_DEVICE Visibility<int> visibility(const FwdParams& p) const {
    return {seqlen_q, seqlen_k, p.window_left, p.window_right};
  }
  // Index of (b, h, row) in the row-statistics arrays (lse, softmax_d; dq_accum in units of head_dim).
  FA2_DEVICE index_t stat_index(const FwdParams& p, int b, int h, int row) const {
    return static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + q_start +
           row;
  }
};

// Forward: one block per (query tile, q head, batch). Query tiles vary fastest so blocks sharing K/V run
// together (L2 reuse); the last (for causal: most expensive) tile of each head is scheduled first.
template <int kBlockM>
struct FwdBlockInfo {
  int m_block, head, head_kv, batch;
  int row0;    // first query row of the tile (within the sequence; < 0 in the first, FwdParams::row_shift_unit)
  int row_lo;  // first valid row of the tile, from row0 (> 0 only in the first tile with a row shift)
  int rows;    // valid query rows are [row_lo, rows) from row0 (rows <= kBlockM; <= 0: past this sequence's end)
  SeqInfo seq;
  FwdBlockInfo() = default;  // to be assigned (the WS forward's producer: its next tile, worked out ahead)
  FA2_DEVICE explicit FwdBlockInfo(const FwdParams& p) : FwdBlockInfo(p, static_cast<int>(blockIdx.x)) {}
  // Tile `bid` of the same order (persistent kernels walk tiles themselves).
  FA2_DEVICE FwdBlockInfo(const FwdParams& p, int bid)
      : FwdBlockInfo(p, GridOrder<int>(bid, ceil_div(p.seqlen_q, kBlockM), p.batch * p.heads_q, p.grid_head_group)) {}

 private:
  FA2_DEVICE FwdBlockInfo(const FwdParams& p, GridOrder<int> order) : seq(p, order.head / p.heads_q) {
    const int num_m = ceil_div(p.seqlen_q, kBlockM);
    m_block = num_m - 1 - order.rank;
    const int bh = order.head;
    head = bh % p.heads_q;
    batch = bh / p.heads_q;
    head_kv = head / (p.heads_q / p.heads_kv);
    // FwdParams::row_shift_unit: the sequence's partial tile first (rows above 0 in it), in whole units.
    const int shift = p.row_shift_unit > 0 ? (kBlockM - seq.seqlen_q % kBlockM) % kBlockM & -p.row_shift_unit : 0;
    row0 = m_block * kBlockM - shift;
    row_lo = max(0, -row0);
    rows = min(kBlockM, seq.seqlen_q - row0);
  }

 public:
  // Index of (batch, head, row 0) in the row-statistics arrays.
  FA2_DEVICE index_t row_index(const FwdParams& p) const { return seq.stat_index(p, batch, head, row0); }
};

// Backward main kernel: one block per (key tile, kv head, batch); key tile 0 (which sees the most query tiles
// under causal masking) first.
template <int kBlockN>
struct BwdBlockInfo {
  int n_block, head_kv, batch;
  int key0;  // first key of the tile (within the sequence)
  int keys;  // valid keys in the tile (<= kBlockN; <= 0: the tile is past this sequence's end)
  SeqInfo seq;
  FA2_DEVICE explicit BwdBlockInfo(const BwdParams& p) : BwdBlockInfo(p, coords(p)) {}

 private:
  // (key tile, batch * heads_kv + head) of this block. The key tiles of one head are neighbours in the grid, so
  // that the blocks running together share its Q and dO (and, deterministic, its dQ rows) in L2. The
  // deterministic mode (DqOrder) turns a query tile's adds from its last visiting key tile down, so its grid
  // puts a head's last key tile first: every wait is on a later key tile of the same head, a lower block index
  // (resident or done), and that block walks its query tiles a step ahead of the waiting one (its diagonal is
  // one tile later). v11.1's order spread each wave over every head (the last key tile of every head first); a
  // head's tiles together read 1.0-1.56x that (perf.md v21), and `dq_order_by_head = 0` keeps it for A/B runs.
  static FA2_DEVICE int2 coords(const BwdParams& p) {
    const int bid = static_cast<int>(blockIdx.x);
    const int num_n = ceil_div(p.seqlen_k, kBlockN);
    if (p.dq_semaphore != nullptr) {
      if (p.dq_order_by_head) return make_int2(num_n - 1 - bid % num_n, bid / num_n);
      const int heads = p.batch * p.heads_kv;
      return make_int2(num_n - 1 - bid / heads, bid % heads);
    }
    const GridOrder<int> order(bid, num_n, p.batch * p.heads_kv, p.grid_head_group);
    return make_int2(order.rank, order.head);
  }
  FA2_DEVICE BwdBlockInfo(const BwdParams& p, int2 nb) : seq(p, nb.y / p.heads_kv) {
    n_block = nb.x;
    head_kv = nb.y % p.heads_kv;
    batch = nb.y / p.heads_kv;
    key0 = n_block * kBlockN;
    keys = min(kBlockN, seq.seqlen_k - key0);
  }
};

}  // namespace flash_attn2::cuda
