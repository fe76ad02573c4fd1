// FlashAttention-2 forward kernel: one thread block per (query tile, q head, batch).
//
//   load Q tile, K tile (last visible one first)                        cp.async
//   for each K/V tile j the tile's rows can see (descending, so the masked tiles come first):
//     wait K_j; sync; issue V_j                                         V_j load overlaps S and softmax
//     S = Q K_j^T                  (warp-private rows, ldmatrix + mma, fp32)
//     score rule (softcap, ALiBi; kScoreMod kernels), mask (only tiles crossing a window edge or seqlen_k)
//     online softmax: rescale O and l, P = exp2(S*scale_log2 - m*scale_log2); dropout zeroes P entries
//       after the row sums (kScoreMod kernels; O is scaled by 1 / (1 - p) at the end)
//     wait V_j; sync; issue K_{j-1}                                     K_{j-1} load overlaps P V
//     O += P V_j                   (P re-packed in registers as the A operand; V via ldmatrix.trans)
//   O /= l, LSE = (m*scale_log2 + log2 l) * ln2; O staged through smem for 16-byte coalesced stores.
#pragma once

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/softmax.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace flash_attn2::cuda {

// Global memory a forward block works on, and the key tiles it visits.
template <typename T>
struct FwdBlockIO {
  const T* q;  // row 0 of the query tile
  const T* k;  // key 0 of the kv head (of the sequence)
  const T* v;
  T* o;        // row 0 of the query tile
  float* lse;  // row 0 of the query tile
  // Key tiles [n_begin, n_end) hold the keys visible to at least one row of the tile (causal and window
  // bounds: tiles outside are never loaded); empty when no row sees any key.
  int n_begin, n_end;
  template <int kBlockM>
  FA2_DEVICE FwdBlockIO(const FwdParams& p, const FwdBlockInfo<kBlockM>& blk, const Visibility<int>& vis,
                        int block_n) {
    const SeqInfo& sq = blk.seq;
    q = static_cast<const T*>(p.q) +
        row_offset(blk.batch, blk.head, sq.q_start + blk.row0, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
    k = static_cast<const T*>(p.k) +
        row_offset(blk.batch, blk.head_kv, sq.k_start, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
    v = static_cast<const T*>(p.v) +
        row_offset(blk.batch, blk.head_kv, sq.k_start, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
    o = static_cast<T*>(p.out) +
        row_offset(blk.batch, blk.head, sq.q_start + blk.row0, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
    lse = p.lse + blk.row_index(p);
    const int key_begin = vis.key_begin(blk.row0 + blk.row_lo), key_end = vis.key_end(blk.row0 + blk.rows - 1);
    n_begin = key_begin / block_n;
    n_end = key_end > key_begin ? ceil_div(key_end, block_n) : n_begin;
  }
};

// Output of query rows that see no key: O = 0, LSE = -inf (rows [0, rows) of a tile, d valid columns).
template <typename T, int kHeadDim, int kThreads>
FA2_DEVICE void store_empty_rows(T* o, index_t row_stride, float* lse, int rows, int d, int tid) {
  constexpr int kCPR = kHeadDim / 8;
  for (int idx = tid; idx < rows * kCPR; idx += kThreads) {
    const int r = idx / kCPR, ch = idx % kCPR;
    if (ch * 8 < d) *reinterpret_cast<uint4*>(o + static_cast<index_t>(r) * row_stride + ch * 8) = make_uint4(0, 0, 0, 0);
  }
  for (int r = tid; r < rows; r += kThreads) lse[r] = -INFINITY;
}

template <class Kt, bool kScoreMod>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_fwd_kernel(const __grid_constant__ FwdParams p) {
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kMT = Kt::kMT;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  const uint32_t sQ_u = smem_u32(smem);
  const uint32_t sK_u = sQ_u + Kt::kSmemQ;
  const uint32_t sV_u = sK_u + Kt::kSmemKV;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const FwdBlockInfo<kBlockM> blk(p);
  if (blk.rows <= 0) return;  // varlen: past the end of this sequence
  const int d = p.head_dim;
  const int seqlen_k = blk.seq.seqlen_k;
  const Visibility<int> vis = blk.seq.visibility(p);
  const FwdBlockIO<T> io(p, blk, vis, kBlockN);
  const T *q = io.q, *k = io.k, *v = io.v;
  T* o = io.o;
  float* lse = io.lse;

  if (io.n_end == io.n_begin) {  // no row of this tile sees any key
    store_empty_rows<T, Kt::kHeadDim, Kt::kNThreads>(o, p.o_row_stride, lse, blk.rows, d, tid);
    return;
  }
  const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, blk.head) : ScoreRule<float>{};
  const uint32_t rng_head = static_cast<uint32_t>(blk.batch * p.heads_q + blk.head);

  // Prologue: Q and the last visible K tile.
  g2s_tile_async<TileQ, Kt::kNThreads>(sQ_u, q, p.q_row_stride, blk.rows, d, tid);
  {
    const int key0 = (io.n_end - 1) * kBlockN;
    g2s_tile_async<TileKV, Kt::kNThreads>(sK_u, k + static_cast<index_t>(key0) * p.k_row_stride, p.k_row_stride,
                                          seqlen_k - key0, d, tid);
  }
  cp_async_commit();

  float acc_o[kMT][Kt::kNT_O][4];
  zero_acc(acc_o);
  OnlineSoftmax<kMT> softmax;

  const int warp_row0 = warp * Kt::kWarpRows;  // first tile row owned by this warp

  for (int n_block = io.n_end - 1; n_block >= io.n_begin; --n_block) {
    const int key0 = n_block * kBlockN;
    cp_async_wait<0>();
    __syncthreads();  // K_j landed for everyone; everyone is done with V_{j+1}
    g2s_tile_async<TileKV, Kt::kNThreads>(sV_u, v + static_cast<index_t>(key0) * p.v_row_stride, p.v_row_stride,
                                          seqlen_k - key0, d, tid);
    cp_async_commit();

    float acc_s[kMT][Kt::kNT_S][4];
    zero_acc(acc_s);
    gemm_ss<T, kMT, Kt::kNT_S, Kt::kKS_QK, Operand<TileQ, false>, Operand<TileKV, false>>(acc_s, sQ_u, warp_row0,
                                                                                       sK_u, 0, lane);

    const int r0 = blk.row0 + warp_row0 + g, c0 = key0 + 2 * t;  // this thread's first query / key
    if constexpr (kScoreMod) apply_score_rule(acc_s, r0, c0, vis.diag(), rule);
    if (vis.tile_needs_mask(blk.row0, kBlockM, key0, kBlockN)) apply_mask(acc_s, r0, c0, vis);

    softmax.update(acc_s, acc_o, p.scale_log2);
    if constexpr (kScoreMod) {
      if (p.dropout.enabled()) apply_keep(acc_s, dropout_bits<kMT, Kt::kNT_S>(p.dropout, rng_head, r0, c0), 1.f);
    }
    uint32_t frag_p[kMT][Kt::kKS_PV][4];
    acc_to_a_frags<T>(frag_p, acc_s);

    cp_async_wait<0>();
    __syncthreads();  // V_j landed for everyone; everyone is done with K_j
    if (n_block > io.n_begin) {
      const int key_prev = key0 - kBlockN;
      g2s_tile_async<TileKV, Kt::kNThreads>(sK_u, k + static_cast<index_t>(key_prev) * p.k_row_stride,
                                            p.k_row_stride, seqlen_k - key_prev, d, tid);
      cp_async_commit();
    }
    gemm_rs<T, kMT, Kt::kNT_O, Kt::kKS_PV, Operand<TileKV, true>>(acc_o, frag_p, sV_u, 0, lane);
  }

  float row_lse[kMT][2];
  softmax.finalize(acc_o, p.scale_log2, row_lse);

  // Epilogue: stage O (as T) in the Q buffer, then 16-byte stores.
  __syncthreads();  // every warp is done reading sQ / sV
  store_acc<T, TileQ>(sQ, acc_o, warp_row0, 0, lane, dropout_scale(p, kScoreMod));
  if (t == 0) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = warp_row0 + mi * 16 + h * 8 + g;
        if (r < blk.rows) lse[r] = row_lse[mi][h];
      }
  }
  __syncthreads();
  s2g_tile<TileQ, Kt::kNThreads>(o, p.o_row_stride, sQ, blk.rows, d, tid);
}

}  // namespace flash_attn2::cuda
