// FlashAttention-2 backward on Hopper warpgroup MMA (wgmma, sm_90a) for wide heads (d = 256).
//
// At d = 256 the keys-as-rows layout of flash_bwd_sm90_kernel would give each thread both dK and dV of 64
// keys (256 fp32 registers). Here a block owns 64 keys and its two warpgroups split the work by role instead,
// each holding one 64 x d accumulator:
//   warpgroup 0:  S^T = K Q^T -> P^T (handed to warpgroup 1 through shared memory),  dV += P^T dO
//   warpgroup 1:  dP^T = V dO^T,  dS^T = P^T (dP^T - D) (to shared memory),          dK += dS^T Q
//   both:         dQ_accum += dS K, each on half of the columns, 64 at a time
// Both warpgroups cover the same 64 keys with the same thread layout, so P^T crosses over element for element.
// dQ (64 queries x 256 columns of float32 per step: twice the d128 kernels' per key) goes out as TMA bulk
// reduce-adds, which the L2 performs: each warpgroup stages its 64 x 128 part in the step's stage buffer that
// its own last product read (warpgroup 0: dO, after dV += P^T dO; warpgroup 1: Q, after dK += dS^T Q; 32 KB
// each, the size of the part) and one thread issues four 64 x 64 chunks' boxes. The next step's Q / dO loads
// into the other stage are issued after that step's S^T / dP^T products, once the issuers have seen the reads
// of the last reduce-adds complete. The deterministic mode (ordered adds) and FLASH_ATTN2_BWD_WS_DQ=red keep
// the threads' red.global.add.
#pragma once

#include "cuda/block_info.cuh"
#include "cuda/bwd_tile_io.cuh"
#include "cuda/flash_bwd_sm90_kernel.cuh"     // probs_transposed, dscores_transposed, add_dq_tile
#include "cuda/flash_bwd_sm90_ws_kernel.cuh"  // store_dq_boxes
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/tma.cuh"
#include "cuda/warp_mma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

template <typename T, int kHeadDim_>
struct BwdSm90WideTraits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNThreads = 256;  // two warpgroups
  static constexpr int kBlockN = 64;     // keys per block
  static constexpr int kBlockM = 64;     // queries per step
  static constexpr int kSliceN = 128;    // dV / dK products are issued in column slices of this width
  static_assert(kHeadDim == 256, "the split-role wgmma backward is built for d = 256");

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;   // Q and dO
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;  // K and V (later dK and dV staging)
  using TileDS = SwizzledTile<kBlockN, kBlockM>;   // dS^T, [key][query]
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kSmemDS = TileDS::kElems * 2;
  // P^T hand-over: kBlockM / 2 values per thread, float32 (kHalfHandOver: float16 pairs, flash_bwd_sm90_wide_ws)
  static constexpr bool kHalfHandOver = false;
  static constexpr int kSmemP = kBlockM / 2 * 128 * 4;
  static constexpr int kSmemRowStats = 2 * kBlockM * 4;  // LSE and D of one query tile, fp32
  static constexpr int kAlign = 1024;
  // K | V | Q[2] | dO[2] | dS^T | P^T | (LSE, D)[2], plus slack to align the start.
  static constexpr int kSmemBytes = 2 * kSmemKV + 4 * kSmemQ + kSmemDS + kSmemP + 2 * kSmemRowStats + kAlign;
};

// The pieces of a step both d256 backwards share (this kernel and flash_bwd_sm90_wide_ws_kernel.cuh). Both
// compute warpgroups cover the same 64 keys x kBlockM queries with the same thread layout: warpgroup 0 (is_p)
// holds S^T and then P^T, warpgroup 1 dP^T and then dS^T, and P^T crosses over element for element.
namespace wide_step {

template <class Kt>
using ScoreAcc = float[1][Kt::kBlockM / 8][4];
template <class Kt>
using KvFrags = uint32_t[1][Kt::kBlockM / 16][4];

// Issues S^T = K Q^T (warpgroup 0) or dP^T = V dO^T (warpgroup 1) for the stage's Q / dO, and commits.
template <class Kt>
FA2_DEVICE void issue_scores(ScoreAcc<Kt>& acc_x, bool is_p, uint32_t sK_u, uint32_t sV_u, uint32_t sQ_s,
                             uint32_t sdO_s) {
  using namespace sm90;
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < Kt::kHeadDim / 16; ++ks)
    WgmmaOp<typename Kt::Elem, Kt::kBlockM>::template ss<0, 0>(
        flat(acc_x), desc_k_major<typename Kt::TileKV>(is_p ? sK_u : sV_u, 0, ks),
        desc_k_major<typename Kt::TileQ>(is_p ? sQ_s : sdO_s, 0, ks), ks > 0);
  wgmma_commit();
}

// The step's dropout keep bits: both warpgroups hold the same (key, query) positions, so each draws the same
// mask (while the tensor cores work on S^T / dP^T).
template <class Kt>
FA2_DEVICE KeepBits<1, Kt::kBlockM / 8> keep_bits(const BwdParams& p, int batch, int head, int key_r0, int q_c0,
                                                  bool dropout) {
  using namespace sm90;
  KeepBits<1, Kt::kBlockM / 8> keep{};
  if (dropout)
    keep = dropout_bits_keys_as_rows<Kt::kBlockM / 8>(p.dropout, static_cast<uint32_t>(batch * p.heads_q + head),
                                                      key_r0, q_c0);
  return keep;
}

// Warpgroup 0: S^T into P^T (with score modifiers P^T G, and P^T Z into frag), masked where the tile crosses
// a visibility edge; then P^T (G) into the hand-over buffer sP, kBlockM / 2 floats per thread (Kt::kHalfHandOver:
// as float16 pairs, half the bytes; P^T G lies in [0, 1], where float16 keeps 11 bits, dS^T then goes to T).
template <class Kt, bool kScoreMod>
FA2_DEVICE void probs_to_hand_over(ScoreAcc<Kt>& acc_x, KvFrags<Kt>& frag, void* sP, const float* s_lse,
                                   int key_r0, int q_c0, int row0, int key0, const Visibility<int>& vis,
                                   const ScoreRule<float>& rule, const KeepBits<1, Kt::kBlockM / 8>& keep,
                                   bool dropout, const BwdParams& p, int t, int wg_tid) {
  using namespace sm90;
  const bool need_mask = vis.tile_needs_mask(row0, Kt::kBlockM, key0, Kt::kBlockN);
  if constexpr (kScoreMod) {
    probs_mod_transposed<typename Kt::Elem>(acc_x, frag, s_lse, key_r0, q_c0, need_mask, vis, rule, keep, dropout,
                                            p.scale_log2, t);
  } else {
    probs_transposed(acc_x, s_lse, key_r0, q_c0, need_mask, vis, p.scale_log2, t);
  }
  if constexpr (Kt::kHalfHandOver) {
#pragma unroll
    for (int j = 0; j < Kt::kBlockM / 4; ++j)
      static_cast<uint32_t*>(sP)[j * 128 + wg_tid] = pack2<__half>(flat(acc_x)[2 * j], flat(acc_x)[2 * j + 1]);
  } else {
#pragma unroll
    for (int j = 0; j < Kt::kBlockM / 2; ++j) static_cast<float*>(sP)[j * 128 + wg_tid] = flat(acc_x)[j];
  }
}

// Warpgroup 1: dP^T into dS^T = P^T (dP^T - D) (Z and G with score modifiers), P^T (G) taken from sP.
template <class Kt, bool kScoreMod>
FA2_DEVICE void dscores_from_hand_over(ScoreAcc<Kt>& acc_x, const void* sP, const float* s_d,
                                       const KeepBits<1, Kt::kBlockM / 8>& keep, bool dropout, const BwdParams& p,
                                       int t, int wg_tid) {
  using namespace sm90;
  float pr[1][Kt::kBlockM / 8][4];
  if constexpr (Kt::kHalfHandOver) {
#pragma unroll
    for (int j = 0; j < Kt::kBlockM / 4; ++j) {
      const float2 v = unpack2<__half>(static_cast<const uint32_t*>(sP)[j * 128 + wg_tid]);
      flat(pr)[2 * j] = v.x;
      flat(pr)[2 * j + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int j = 0; j < Kt::kBlockM / 2; ++j) flat(pr)[j] = static_cast<const float*>(sP)[j * 128 + wg_tid];
  }
  if constexpr (kScoreMod) {
    dscores_transposed_mod(acc_x, pr, s_d, keep, dropout, p.keep_scale, t);
  } else {
    dscores_transposed(acc_x, pr, s_d, t);
  }
}

// Issues dV += P^T dO (warpgroup 0) or dK += dS^T Q (warpgroup 1), A from registers, B N-major, in column
// slices of kSliceN, and commits.
template <class Kt>
FA2_DEVICE void issue_kv_grad(float (&acc_kv)[1][Kt::kHeadDim / 8][4], const KvFrags<Kt>& frag, bool is_p,
                              uint32_t sQ_s, uint32_t sdO_s) {
  using namespace sm90;
  wgmma_fence();
#pragma unroll
  for (int n0 = 0; n0 < Kt::kHeadDim; n0 += Kt::kSliceN)
#pragma unroll
    for (int kk = 0; kk < Kt::kBlockM / 16; ++kk)
      WgmmaOp<typename Kt::Elem, Kt::kSliceN>::template rs<1>(
          acc_cols<Kt::kSliceN>(acc_kv, n0), frag[0][kk],
          desc_mn_major<typename Kt::TileQ>(is_p ? sdO_s : sQ_s, n0 / 64, kk), 1);
  wgmma_commit();
}

}  // namespace wide_step

template <class Kt, bool kScoreMod>
__global__ void __launch_bounds__(Kt::kNThreads, 1)
    flash_bwd_sm90_wide_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ CUtensorMap dq_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using TileDS = typename Kt::TileDS;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kThreads = Kt::kNThreads;
  constexpr int kNT_S = kBlockM / 8;     // n8 tiles of S^T / dP^T (64 keys x kBlockM queries)
  constexpr int kKSteps = kBlockM / 16;  // k16 steps of dV / dK (over queries)

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  unsigned char* smem = aligned.ptr;
  const uint32_t sK_u = aligned.addr;
  const uint32_t sV_u = sK_u + Kt::kSmemKV;
  const uint32_t sQ_u = sV_u + Kt::kSmemKV;      // stage s at + s * kSmemQ
  const uint32_t sdO_u = sQ_u + 2 * Kt::kSmemQ;  // stage s at + s * kSmemQ
  const uint32_t sdS_u = sdO_u + 2 * Kt::kSmemQ;
  const uint32_t sP_u = sdS_u + Kt::kSmemDS;
  const uint32_t sStats_u = sP_u + Kt::kSmemP;   // stage s: LSE at s * 2M, D at + M (floats)
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + Kt::kSmemKV);
  T* sdS = reinterpret_cast<T*>(smem + (sdS_u - sK_u));
  float* sP = reinterpret_cast<float*>(smem + (sP_u - sK_u));
  const float* sStats = reinterpret_cast<const float*>(smem + (sStats_u - sK_u));

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wg_tid = tid % 128;
  const bool is_p = __shfl_sync(0xffffffffu, warp < 4, 0);  // warpgroup 0: S^T, P^T, dV; 1: dP^T, dS^T, dK
  const bool dq_tma = !p.dq_red_add;        // dQ by bulk reduce-adds (the launcher made dq_map)
  const bool dq_issuer = dq_tma && wg_tid == 0;
  const int warp_row0 = 16 * (warp % 4);    // first key row of this warp's accumulators

  const BwdBlockInfo<kBlockN> blk(p);
  if (blk.keys <= 0) return;  // varlen: past the end of this sequence
  const Visibility<int> vis = blk.seq.visibility(p);
  const BwdSteps<kBlockM> steps(p, blk, vis);
  auto load_q_do = [&](int it, int stage) {
    load_q_do_async<TileQ, kThreads, T>(p, blk.seq, blk.batch, steps.head(it, blk.head_kv), steps.row0(it),
                                        sQ_u + stage * Kt::kSmemQ, sdO_u + stage * Kt::kSmemQ,
                                        sStats_u + stage * Kt::kSmemRowStats, tid);
  };
  load_k_v_async<TileKV, kThreads, T>(p, blk, sK_u, sV_u, tid);
  if (steps.total > 0) load_q_do(0, 0);
  cp_async_commit();

  float acc_kv[1][kHeadDim / 8][4];  // dV (warpgroup 0) or dK (warpgroup 1)
  zero_acc(acc_kv);

  DqOrderChain dq_chain;  // deterministic mode
  for (int it = 0; it < steps.total; ++it) {
    const int head = steps.head(it, blk.head_kv);
    const int row0 = steps.row0(it);
    const int stage = it & 1;
    cp_async_wait<0>();
    fence_proxy_async_smem();  // cp.async wrote through the generic proxy; wgmma reads through the async one
    __syncthreads();           // ... and every warp is done with the previous step's buffers
    if (!dq_tma && it + 1 < steps.total) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
    }
    const uint32_t sQ_s = sQ_u + stage * Kt::kSmemQ;
    const uint32_t sdO_s = sdO_u + stage * Kt::kSmemQ;
    const float* s_lse = sStats + stage * (Kt::kSmemRowStats / 4);
    const float* s_d = s_lse + kBlockM;

    // S^T = K Q^T (warpgroup 0) or dP^T = V dO^T (warpgroup 1).
    float acc_x[1][kNT_S][4];
    wide_step::issue_scores<Kt>(acc_x, is_p, sK_u, sV_u, sQ_s, sdO_s);
    const int key_r0 = blk.key0 + warp_row0 + g, q_c0 = row0 + 2 * t;  // this thread's first key / query
    const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, head) : ScoreRule<float>{};
    const bool dropout = kScoreMod && p.dropout.enabled();
    const KeepBits<1, kNT_S> keep = wide_step::keep_bits<Kt>(p, blk.batch, head, key_r0, q_c0, dropout);
    wgmma_wait<0>();
    fence_regs(acc_x);
    uint32_t frag[1][kKSteps][4];  // A of dV += (P Z)^T dO (warpgroup 0) or dK += dS^T Q (warpgroup 1)
    if (is_p)
      wide_step::probs_to_hand_over<Kt, kScoreMod>(acc_x, frag, sP, s_lse, key_r0, q_c0, row0, blk.key0, vis, rule,
                                                   keep, dropout, p, t, wg_tid);
    if (dq_issuer) tma::bulk_wait_read<0>();  // the last step's dQ boxes (in the other stage) are read
    __syncthreads();                          // P^T (G) handed over; the other stage is free
    if (dq_tma && it + 1 < steps.total) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
    }
    if (!is_p) {
      wide_step::dscores_from_hand_over<Kt, kScoreMod>(acc_x, sP, s_d, keep, dropout, p, t, wg_tid);
      store_acc<T, TileDS>(sdS, acc_x, warp_row0, 0, lane, 1.f);
    }
    if (!kScoreMod || !is_p) acc_to_a_frags<T>(frag, acc_x);

    // dV += P^T dO (warpgroup 0) or dK += dS^T Q (warpgroup 1).
    wide_step::issue_kv_grad<Kt>(acc_kv, frag, is_p, sQ_s, sdO_s);

    // dQ = dS K: warpgroup w takes columns [w d / 2, (w + 1) d / 2), 64 at a time.
    fence_proxy_async_smem();
    __syncthreads();  // dS^T is in shared memory
    const bool full_tile = row0 + kBlockM <= blk.seq.seqlen_q && p.head_dim == kHeadDim;
    if (!dq_tma) dq_chain.acquire(DqOrder::make<kBlockM>(p, blk, vis, head, row0), tid);
    // The warpgroup's staging buffer: the stage's dO (warpgroup 0) or Q (warpgroup 1), free once the first
    // chunk's wait has retired dV += P^T dO / dK += dS^T Q (the other warpgroup's reads of it, S^T = K Q^T and
    // dP^T = V dO^T, were done before the barrier above).
    unsigned char* dq_buf = smem + ((is_p ? sdO_s : sQ_s) - sK_u);
#pragma unroll
    for (int c0 = 0; c0 < kHeadDim / 2; c0 += 64) {
      const int col0 = (is_p ? 0 : kHeadDim / 2) + c0;
      float acc_dq[1][8][4];
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks)
        WgmmaOp<T, 64>::template ss<1, 1>(flat(acc_dq), desc_mn_major<TileDS>(sdS_u, 0, ks),
                                          desc_mn_major<TileKV>(sK_u, col0 / 64, ks), ks > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(acc_dq);
      // Rows past the sequence's end add exact zeros (zero-filled dO / Q rows there: dS = 0) to the rows that
      // follow; rows past the array and columns past d are clipped by the map.
      if (dq_tma) store_dq_boxes(dq_buf + (c0 / 64) * 16384, acc_dq, warp, g, t);
      else add_dq_tile(p, blk.seq, acc_dq, blk.batch, head, row0, 0, col0, warp, g, t, full_tile);
    }
    if (dq_tma) {
      fence_proxy_async_smem();                // the stores before the issuer's bulk reads
      tma::named_sync(1 + (is_p ? 0 : 1), 128);  // the warpgroup's part is staged
      if (dq_issuer) {
        const int row = static_cast<int>(blk.seq.stat_index(p, blk.batch, head, row0));
        const int col0 = is_p ? 0 : kHeadDim / 2;
#pragma unroll
        for (int c = 0; c < kHeadDim / 128; ++c) {
          tma::reduce_add_box(&dq_map, dq_buf + c * 16384, col0 + 64 * c, row);
          tma::reduce_add_box(&dq_map, dq_buf + c * 16384 + 8192, col0 + 64 * c + 32, row);
        }
        tma::bulk_commit();
      }
    }
    fence_regs(acc_kv);
    fence_regs(frag);  // the A fragments stay untouched until the MMAs reading them are done
  }
  if (!dq_tma) dq_chain.finish(tid);
  if (dq_issuer) tma::bulk_wait<0>();  // the last reduce-adds are done before the block's shared memory goes

  // Epilogue: dV (warpgroup 0) and dK * scale (warpgroup 1) as T through the V / K buffers.
  cp_async_wait<0>();
  __syncthreads();
  store_acc<T, TileKV>(is_p ? sV : sK, acc_kv, warp_row0, 0, lane, is_p ? dropout_scale(p, kScoreMod) : p.scale);
  __syncthreads();
  store_dk_dv<TileKV, kThreads>(p, blk, sK, sV, tid);
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
