// FlashAttention-2 forward on Hopper warpgroup MMA (wgmma, sm_90a), for head dims 64, 128 and 256.
//
// The algorithm, pipeline and contract of flash_fwd_kernel, with two warpgroups each owning 64 query rows of
// a 128-row tile: S = Q K_j^T with both operands in shared memory, the online softmax of softmax.cuh on the
// accumulators (their per-warp layout is the mma.sync one), then O += P V_j with P straight from registers
// as the A operand and V as the N-major B operand.
//
// d = 256 (and d = 128 over long key ranges) overlaps each tile's softmax with MMAs (FlashAttention-3's
// intra-warpgroup pipelining): K and V are double-buffered, and step j issues S_j = Q K_j^T and
// O += P_{j+1} V_{j+1} together, runs the softmax of S_j once the first is done (while the tensor cores still work
// on the second), then rescales O:
//
//   S_last = Q K_last^T; P_last = softmax(S_last)
//   for j = last - 1 down to first:   (loads of V_j and K_{j-1} in flight meanwhile)
//     issue S_j = Q K_j^T; issue O += P_{j+1} V_{j+1}; wait S_j
//     P_j, alpha = softmax(S_j)        (overlaps O += P_{j+1} V_{j+1})
//     wait O; O *= alpha
//   O += P_first V_first
//
// d = 64 (and d = 128 over short key ranges) keeps one K and one V buffer and runs the steps back to back (at
// d = 64 two blocks per SM overlap one block's softmax with the other's MMAs).
#pragma once

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/flash_fwd_kernel.cuh"  // FwdBlockIO, store_empty_rows
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/softmax.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/warp_mma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

template <typename T, int kHeadDim_>
struct FwdSm90Traits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kNThreads = kWarpGroups * 128;
  static constexpr int kBlockM = 64 * kWarpGroups;  // query rows per block, 64 per warpgroup
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 64;  // keys per step (d256: O alone is 128 registers)
  static constexpr int kPvN = kHeadDim <= 128 ? kHeadDim : 128;  // O += P V in column slices of kPvN
  // d = 64 does half the MMA work of d = 128 per softmax element: two blocks per SM (<= 128 registers per
  // thread) let one block's softmax overlap the other's MMAs.
  static constexpr int kMinBlocksPerSm = kHeadDim <= 64 ? 2 : 1;
  // The softmax's row max as a tree and its sum in two chains (OnlineSoftmax kTree) at d64, whose two blocks' four
  // warpgroups share each SMSP's MUFU pipe, as the d64 WS forward's three consumers do: 1.01-1.04x in one A/B
  // (causal 4k, non-causal 1k, packed causal 2k; softcap 0.98-1.01x), the causal 2k row's 1.08x there not borne
  // out by the bench (0.91-0.92 of cuDNN before and after; perf.md v31).
  static constexpr bool kTreeMax = kHeadDim == 64;
  // The overlapped loop (softmax of tile j beside the MMAs of tiles j and j + 1, K/V double-buffered) is the only
  // one at d = 256 (+2-5% forward) and one of two at d = 128, where it gains 6-7% on long key ranges but loses 6%
  // on short ones (causal N = 2048): the launcher picks it from the average key range (docs/perf.md v7.1).
  static constexpr bool kMayOverlap = kHeadDim >= 128, kMustOverlap = kHeadDim >= 256;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "wgmma forward: d = 64, 128 or 256");

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;  // also stages O for the output store
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kAlign = 1024;  // the 128-byte swizzle repeats every 1024 bytes
  // Q | K_0 | V_0 [| K_1 | V_1 when overlapped], plus alignment slack
  static constexpr int smem_bytes(bool overlap) { return kSmemQ + 2 * kSmemKV * (overlap ? 2 : 1) + kAlign; }
};

template <class Kt, bool kScoreMod, bool kOverlap>
__global__ void __launch_bounds__(Kt::kNThreads, Kt::kMinBlocksPerSm) flash_fwd_sm90_kernel(const __grid_constant__ FwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kThreads = Kt::kNThreads;

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  T* sQ = reinterpret_cast<T*>(aligned.ptr);
  const uint32_t sQ_u = aligned.addr;
  auto sK_u = [&](int stage) { return sQ_u + Kt::kSmemQ + static_cast<uint32_t>(stage * 2 * Kt::kSmemKV); };
  auto sV_u = [&](int stage) { return sK_u(stage) + Kt::kSmemKV; };

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;
  const int warp_row0 = 64 * wg + 16 * (warp % 4);  // first tile row of this warp's accumulators

  const FwdBlockInfo<kBlockM> blk(p);
  if (blk.rows <= 0) return;  // varlen: past the end of this sequence
  const int d = p.head_dim;
  const int seqlen_k = blk.seq.seqlen_k;
  const Visibility<int> vis = blk.seq.visibility(p);
  const FwdBlockIO<T> io(p, blk, vis, kBlockN);
  const T *q = io.q, *k = io.k, *v = io.v;
  T* o = io.o;
  float* lse = io.lse;
  if (io.n_end == io.n_begin) {
    store_empty_rows<T, kHeadDim, kThreads>(o, p.o_row_stride, lse, blk.rows, d, tid);
    return;
  }
  const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, blk.head) : ScoreRule<float>{};
  const uint32_t rng_head = static_cast<uint32_t>(blk.batch * p.heads_q + blk.head);

  auto load_k = [&](int n_block, int stage) {
    const int key0 = n_block * kBlockN;
    g2s_tile_async<TileKV, kThreads>(sK_u(stage), k + static_cast<index_t>(key0) * p.k_row_stride, p.k_row_stride,
                                     seqlen_k - key0, d, tid);
  };
  auto load_v = [&](int n_block, int stage) {
    const int key0 = n_block * kBlockN;
    g2s_tile_async<TileKV, kThreads>(sV_u(stage), v + static_cast<index_t>(key0) * p.v_row_stride, p.v_row_stride,
                                     seqlen_k - key0, d, tid);
  };
  // Issue S = Q K^T (K in `stage`) / O += P V (V in `stage`) on this warpgroup's rows; each is one wgmma group.
  auto issue_s = [&](float (&acc_s)[1][kBlockN / 8][4], int stage) {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks)
      WgmmaOp<T, kBlockN>::template ss<0, 0>(flat(acc_s), desc_k_major<TileQ>(sQ_u, 64 * wg, ks),
                                             desc_k_major<TileKV>(sK_u(stage), 0, ks), ks > 0);
    wgmma_commit();
  };
  float acc_o[1][kHeadDim / 8][4];
  zero_acc(acc_o);
  auto issue_o = [&](const uint32_t (&frag_p)[1][kBlockN / 16][4], int stage) {
#pragma unroll
    for (int n0 = 0; n0 < kHeadDim; n0 += Kt::kPvN)
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        WgmmaOp<T, Kt::kPvN>::template rs<1>(acc_cols<Kt::kPvN>(acc_o, n0), frag_p[0][kk],
                                             desc_mn_major<TileKV>(sV_u(stage), n0 / 64, kk), 1);
    wgmma_commit();
  };
  OnlineSoftmax<1> softmax;
  // Scores of key tile n_block -> P (in place): score rule, mask where the tile crosses a visibility edge, online
  // softmax (alpha: the factor O still owes), dropout keep.
  auto softmax_step = [&](float (&acc_s)[1][kBlockN / 8][4], int n_block, float (&alpha)[1][2]) {
    const int r0 = blk.row0 + warp_row0 + g, c0 = n_block * kBlockN + 2 * t;  // this thread's first query / key
    if constexpr (kScoreMod) apply_score_rule(acc_s, r0, c0, vis.diag(), rule);
    if (vis.tile_needs_mask(blk.row0, kBlockM, n_block * kBlockN, kBlockN)) apply_mask(acc_s, r0, c0, vis);
    softmax.template update_scores<0, Kt::kTreeMax>(acc_s, p.scale_log2, alpha);
    if constexpr (kScoreMod) {
      if (p.dropout.enabled()) apply_keep(acc_s, dropout_bits<1, kBlockN / 8>(p.dropout, rng_head, r0, c0), 1.f);
    }
  };
  auto landed = [] {
    fence_proxy_async_smem();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();
  };

  float acc_s[1][kBlockN / 8][4];
  uint32_t frag_p[1][kBlockN / 16][4];
  float alpha[1][2];
  const int n_last = io.n_end - 1;  // key tiles are walked from the last down, so masked diagonal tiles go first
  g2s_tile_async<TileQ, kThreads>(sQ_u, q, p.q_row_stride, blk.rows, d, tid);
  load_k(n_last, 0);
  cp_async_commit();

  static_assert(!kOverlap || Kt::kMayOverlap, "d = 64 keeps two blocks per SM instead");
  if constexpr (kOverlap) {
    load_v(n_last, 0);
    cp_async_commit();
    if (n_last > io.n_begin) load_k(n_last - 1, 1);
    cp_async_commit();
    cp_async_wait<2>();
    landed();  // Q and K_last
    wgmma_fence();
    issue_s(acc_s, 0);
    wgmma_wait<0>();
    fence_regs(acc_s);
    softmax_step(acc_s, n_last, alpha);  // O is still zero: nothing to rescale
    acc_to_a_frags<T>(frag_p, acc_s);
    for (int n_block = n_last - 1; n_block >= io.n_begin; --n_block) {
      const int cur = (n_last - n_block) & 1, prev = cur ^ 1;  // buffers of tile n_block and of n_block + 1
      cp_async_wait<0>();
      landed();  // K_j and V_{j+1} landed for everyone; everyone is done with V_{j+2} and K_{j+1}
      wgmma_fence();
      issue_s(acc_s, cur);
      issue_o(frag_p, prev);
      // The next loads go to the buffers these MMAs do not read, issued while the tensor cores work.
      load_v(n_block, cur);
      if (n_block > io.n_begin) load_k(n_block - 1, prev);
      cp_async_commit();
      wgmma_wait<1>();  // S_j done; O += P_{j+1} V_{j+1} may still run
      fence_regs(acc_s);
      softmax_step(acc_s, n_block, alpha);
      if constexpr (kHeadDim >= 128) softmax.issue_boundary();  // as in the WS forward (perf.md v27)
      wgmma_wait<0>();
      fence_regs(acc_o);
      fence_regs(frag_p);  // the A fragments stay untouched until the MMA reading them is done
      softmax.rescale(acc_o, alpha);
      acc_to_a_frags<T>(frag_p, acc_s);
    }
    cp_async_wait<0>();
    landed();  // V_first
    wgmma_fence();
    issue_o(frag_p, (n_last - io.n_begin) & 1);
    wgmma_wait<0>();
    fence_regs(acc_o);
  } else {
    for (int n_block = n_last; n_block >= io.n_begin; --n_block) {
      cp_async_wait<0>();
      landed();  // K_j landed for everyone; everyone is done with V_{j+1}
      load_v(n_block, 0);
      cp_async_commit();
      wgmma_fence();
      issue_s(acc_s, 0);
      wgmma_wait<0>();
      fence_regs(acc_s);
      softmax_step(acc_s, n_block, alpha);
      softmax.rescale(acc_o, alpha);
      acc_to_a_frags<T>(frag_p, acc_s);

      cp_async_wait<0>();
      landed();  // V_j landed for everyone; everyone is done with K_j
      if (n_block > io.n_begin) {
        load_k(n_block - 1, 0);
        cp_async_commit();
      }
      wgmma_fence();
      issue_o(frag_p, 0);
      wgmma_wait<0>();
      fence_regs(acc_o);
      fence_regs(frag_p);
    }
  }

  float row_lse[1][2];
  softmax.finalize(acc_o, p.scale_log2, row_lse);

  // Epilogue: stage O (as T) in the Q buffer, then 16-byte stores.
  __syncthreads();  // every warpgroup's MMAs are done reading sQ
  store_acc<T, TileQ>(sQ, acc_o, warp_row0, 0, lane, dropout_scale(p, kScoreMod));
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + h * 8 + g;
      if (r < blk.rows) lse[r] = row_lse[0][h];
    }
  }
  __syncthreads();
  s2g_tile<TileQ, kThreads>(o, p.o_row_stride, sQ, blk.rows, d, tid);
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
