// What every backward main kernel (mma.sync and wgmma) does around its math: which query tiles a key-tile
// block visits, the copies of K/V in, Q/dO/LSE/D per step, and dK/dV out, and the ordered dQ accumulation of
// the deterministic mode.
#pragma once

#include "attention_rule.h"
#include "cuda/block_info.cuh"
#include "cuda/flash_params.h"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// The rotated deterministic walk (RotatedDqWalk) of a call's key and query tiles: one helper, so that the step
// order (BwdSteps) and the turns (DqOrder) cannot disagree on the tile counts.
template <int kBlockM, int kBlockN>
FA2_DEVICE RotatedDqWalk<int> rotated_dq_walk(const Visibility<int>& vis) {
  return {ceil_div(vis.seqlen_k, kBlockN), ceil_div(vis.seqlen_q, kBlockM)};
}

// Steps of a backward block: the q heads of its GQA group x the query tiles that see its key tile (only those:
// causal and window bounds skip the rest), heads outermost. The steps' rows start at a multiple of kBlockM below
// the tile's first visible query, or at the multiple of 16 below it (BwdParams::steps_from_first_row, not
// deterministic): then a window's band, whose first and last visible rows both fall inside steps, is covered by
// about ceil(rows / kBlockM) steps instead of up to one more. 16, not 1: the dropout draws come in groups of 16
// queries (Dropout::group_i), which the kernels' fragments take whole. Rows past the sequence's end are harmless
// as in the aligned walk's last step (zero-filled Q / dO, LSE = +inf, exact zeros added to dQ).
// Deterministic and rotated (BwdParams::dq_rotate, unmasked calls only, so the walk starts at row 0 and m_count is
// the walk's query tile count): each head's walk starts at the key tile's RotatedDqWalk::start and wraps around.
template <int kBlockM>
struct BwdSteps {
  // row_end: one past the key tile's last visible query (a last step's rows from it on add nothing: the WS
  // kernel's kWsBwdPartialRows)
  int group, row_begin, row_end, m_count, total, rot = 0;
  template <int kBlockN>
  FA2_DEVICE BwdSteps(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, const Visibility<int>& vis) {
    group = p.heads_q / p.heads_kv;
    const int q_begin = vis.query_begin(blk.key0), q_end = vis.query_end(blk.key0 + blk.keys - 1);
    const bool from_first_row = p.steps_from_first_row && p.dq_semaphore == nullptr;
    row_begin = from_first_row ? q_begin / 16 * 16 : q_begin / kBlockM * kBlockM;
    row_end = q_end;
    m_count = q_end > q_begin ? ceil_div(q_end - row_begin, kBlockM) : 0;
    total = group * m_count;
    if (p.dq_rotate && m_count > 0) rot = rotated_dq_walk<kBlockM, kBlockN>(vis).start(blk.n_block);
  }
  FA2_DEVICE int head(int it, int head_kv) const { return head_kv * group + it / m_count; }
  FA2_DEVICE int row0(int it) const {
    int i = it % m_count + rot;
    if (i >= m_count) i -= m_count;
    return row_begin + i * kBlockM;
  }
};

// Issues (no commit) the copies of the block's K and V tiles into s_k / s_v.
template <class TileKV, int kThreads, typename T, int kBlockN>
FA2_DEVICE void load_k_v_async(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, uint32_t s_k, uint32_t s_v,
                               int tid) {
  const int key = blk.seq.k_start + blk.key0;
  const T* k = static_cast<const T*>(p.k) +
               row_offset(blk.batch, blk.head_kv, key, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  const T* v = static_cast<const T*>(p.v) +
               row_offset(blk.batch, blk.head_kv, key, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  g2s_tile_async<TileKV, kThreads>(s_k, k, p.k_row_stride, blk.keys, p.head_dim, tid);
  g2s_tile_async<TileKV, kThreads>(s_v, v, p.v_row_stride, blk.keys, p.head_dim, tid);
}

// Issues (no commit) the copies of one step's Q and dO tiles (rows [row0, row0 + kBlockM) of `head`), and its
// LSE and D rows into s_stats (LSE at [0, kBlockM), D at [kBlockM, 2 kBlockM), floats), so their latency is
// hidden like Q's and dO's. Rows past the sequence's end are zero-filled.
template <class TileQ, int kThreads, typename T>
FA2_DEVICE void load_q_do_async(const BwdParams& p, const SeqInfo& seq, int batch, int head, int row0, uint32_t s_q,
                                uint32_t s_do, uint32_t s_stats, int tid) {
  constexpr int kBlockM = TileQ::kRows;
  static_assert(2 * kBlockM <= kThreads, "one thread per LSE / D element of a query tile");
  const int row = seq.q_start + row0;
  const T* q = static_cast<const T*>(p.q) + row_offset(batch, head, row, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  const T* dout =
      static_cast<const T*>(p.dout) + row_offset(batch, head, row, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
  const int rows = seq.seqlen_q - row0;
  g2s_tile_async<TileQ, kThreads>(s_q, q, p.q_row_stride, rows, p.head_dim, tid);
  g2s_tile_async<TileQ, kThreads>(s_do, dout, p.do_row_stride, rows, p.head_dim, tid);
  if (tid < 2 * kBlockM) {
    const int r = tid % kBlockM;
    const bool is_d = tid >= kBlockM;
    const index_t idx = seq.stat_index(p, batch, head, row0 + r);
    const bool ok = r < rows;
    cp_async_4(s_stats + static_cast<uint32_t>(tid * 4), ok ? (is_d ? p.softmax_d : p.lse_log2) + idx : p.lse_log2,
               ok);
  }
}

// Copies dK (is_dk) or dV, already staged as T in TileKV layout at s, to global memory (valid keys and head-dim
// columns only). The caller synchronises before.
template <class TileKV, int kThreads, typename T, int kBlockN>
FA2_DEVICE void store_dk_or_dv(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, bool is_dk, const T* s,
                               int tid) {
  const int key = blk.seq.k_start + blk.key0;
  const index_t row_stride = is_dk ? p.dk_row_stride : p.dv_row_stride;
  T* g = static_cast<T*>(is_dk ? p.dk : p.dv) +
         row_offset(blk.batch, blk.head_kv, key, is_dk ? p.dk_batch_stride : p.dv_batch_stride,
                    is_dk ? p.dk_head_stride : p.dv_head_stride, row_stride);
  s2g_tile<TileKV, kThreads>(g, row_stride, s, blk.keys, p.head_dim, tid);
}

// store_dk_or_dv for the kRows rows from block-local key row0 only (the rows a warpgroup staged itself).
template <class TileKV, int kRows, int kThreads, typename T, int kBlockN>
FA2_DEVICE void store_dk_or_dv_rows(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, bool is_dk, const T* s,
                                    int row0, int tid) {
  const int key = blk.seq.k_start + blk.key0 + row0;
  const index_t row_stride = is_dk ? p.dk_row_stride : p.dv_row_stride;
  T* g = static_cast<T*>(is_dk ? p.dk : p.dv) +
         row_offset(blk.batch, blk.head_kv, key, is_dk ? p.dk_batch_stride : p.dv_batch_stride,
                    is_dk ? p.dk_head_stride : p.dv_head_stride, row_stride);
  s2g_rows<TileKV, kRows, kThreads>(g, row_stride, s, row0, blk.keys - row0, p.head_dim, tid);
}

// Copies dK and dV, staged at s_dk / s_dv, to global memory (store_dk_or_dv for each).
template <class TileKV, int kThreads, typename T, int kBlockN>
FA2_DEVICE void store_dk_dv(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, const T* s_dk, const T* s_dv,
                            int tid) {
  store_dk_or_dv<TileKV, kThreads>(p, blk, true, s_dk, tid);
  store_dk_or_dv<TileKV, kThreads>(p, blk, false, s_dv, tid);
}

// Deterministic dQ: the key-tile blocks that visit query tile m of (batch, head) add into dq_accum one after the
// other, from the last key tile down. The visitors of m are the key tiles [first_key_tile(m), last_key_tile(m)]
// (attention_rule.h), so block n waits for the counter to reach last_key_tile(m) - n, adds, and bumps it. From
// the last visitor down, a causal (or windowed) block's first query tiles, on its diagonal, are its own turn at
// once and block n + 1 reaches each later tile two steps ahead of block n; in key-tile order every block waited
// at its first tile for all the tiles before it. Blocks are dispatched in blockIdx order and later key tiles
// have lower indices (BwdBlockInfo orders the grid last key tile first in this mode), so the block being waited
// for is resident or done. Unmasked calls with few key tiles rotate instead (BwdParams::dq_rotate,
// RotatedDqWalk): key tile n starts at its own query tile and each query tile takes its turns in arrival order,
// so no key tile trails the next by a hand-off at every step; their waits need a head's blocks co-resident,
// which the launcher's limit (a quarter of the SMs) leaves room for.
// The threads that add a block's dQ and meet around its turns: the whole block (bar 0: __syncthreads), or the
// `threads` threads of named barrier `bar` (the d256 backward's dQ warpgroup, whose turns the others never wait
// for). tid in DqOrder's calls counts within them.
struct DqAdders {
  int bar = 0, threads = 0;
  FA2_DEVICE void sync() const {
    if (bar == 0) {
      __syncthreads();
    } else {
      asm volatile("bar.sync %0, %1;\n" ::"r"(bar), "r"(threads) : "memory");
    }
  }
};

struct DqOrder {
  int* counter;  // nullptr: not deterministic
  int rank;
  template <int kBlockM, int kBlockN>
  static FA2_DEVICE DqOrder make(const BwdParams& p, const BwdBlockInfo<kBlockN>& blk, const Visibility<int>& vis,
                                 int head, int row0) {
    DqOrder o{nullptr, 0};
    if (p.dq_semaphore == nullptr) return o;
    const int m = row0 / kBlockM;
    o.counter = p.dq_semaphore + (static_cast<index_t>(blk.batch) * p.heads_q + head) * p.dq_semaphore_tiles + m;
    o.rank = p.dq_rotate ? rotated_dq_walk<kBlockM, kBlockN>(vis).rank(blk.n_block, m)
                         : vis.last_key_tile(row0, kBlockM, kBlockN) - blk.n_block;
    return o;
  }
  // One thread: waits for this block's turn (acquire), hands the turn on (release).
  FA2_DEVICE void wait_turn() const {
    int seen;
    do {
      asm volatile("ld.acquire.gpu.global.b32 %0, [%1];\n" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen != rank);
  }
  FA2_DEVICE void pass_turn() const {
    asm volatile("st.release.gpu.global.b32 [%0], %1;\n" ::"l"(counter), "r"(rank + 1) : "memory");
  }
  // Every adder (by default every thread of the block) calls these two around its dQ additions.
  FA2_DEVICE void acquire(int tid, DqAdders adders = {}) const {
    if (counter == nullptr) return;
    if (tid == 0) wait_turn();
    adders.sync();
  }
  FA2_DEVICE void release(int tid, DqAdders adders = {}) const {
    if (counter == nullptr) return;
    __threadfence();
    adders.sync();
    if (tid == 0) pass_turn();
  }
};

// A block's DqOrder releases, each deferred to its next acquire (or to finish()): the dQ additions of tile m
// drain while the block computes tile m + 1's products, so the fence before the release seldom waits. Releases
// never wait, so the chain of waits stays on lower block indices and cannot deadlock.
struct DqOrderChain {
  DqOrder pending{nullptr, 0};
  DqAdders adders{};  // who calls these: every thread of the block unless set
  FA2_DEVICE void acquire(const DqOrder& next, int tid) {
    pending.release(tid, adders);
    next.acquire(tid, adders);
    pending = next;
  }
  FA2_DEVICE void finish(int tid) {
    pending.release(tid, adders);
    pending.counter = nullptr;
  }
};

}  // namespace flash_attn2::cuda
