// FlashAttention-2 backward on Hopper (sm_90a) for wide heads (d = 256), with a dQ warpgroup: the default d256
// backward, 1.09-1.35x flash_bwd_sm90_wide_kernel on an H200 (perf.md v17). FLASH_ATTN2_BWD_WIDE=2wg keeps that
// kernel. The deterministic mode orders the dQ warpgroup's adds (1.01-1.06x the split-role kernel's, v18).
//
// The split-role kernel (flash_bwd_sm90_wide_kernel.cuh) ran its two warpgroups in lock step through three
// block-wide barriers per step, and nothing was queued on the tensor cores while warpgroup 0 computed P^T
// (ncu: tensor pipe 29% busy, 39% of the cycles between issues at a barrier). Here a third warpgroup takes the
// dQ product off the other two and runs a step behind them, so that step i's dQ = dS_i K (a quarter of the
// step's tensor work) is queued while warpgroup 0 computes step i + 1's exponentials:
//
//   warpgroup 0:  S^T = K Q^T -> P^T (handed to warpgroup 1 through shared memory),  dV += P^T dO
//   warpgroup 1:  dP^T = V dO^T,  dS^T = P^T (dP^T - D) (to shared memory, two buffers), dK += dS^T Q
//   warpgroup 2:  dQ_accum += dS K, 64 columns at a time, by TMA bulk reduce-adds of 16 x 32 float32 boxes,
//                 each warp its own rows of an 8 KB buffer (the deterministic mode and FLASH_ATTN2_BWD_WS_DQ=red:
//                 the threads' red.global.add)
//
// The threads' red.add of 64 x 256 floats a step kept the L2 71% busy (ncu, non-causal 8k, perf.md v25; cuDNN's
// d256 backward on the same 64 x 64 tiles: 32%): each warp instruction adds 32 bytes to each of 8 rows, so every
// 128-byte line took four requests. The box buffer's 8 KB come from the P^T hand-over, now float16 pairs.
//
// Warpgroups 0 and 1 load Q, dO, LSE and D (two stages: Q and dO by one thread's TMA copies where the TMA can
// address them, 1.02-1.08x their 256 threads' cp.async, perf.md v26; LSE and D by cp.async) and meet at two
// named barriers per step (the step's data, the P^T hand-over); warpgroup 1 and warpgroup 2 meet at the dS^T
// buffers ("stored": 1 arrives, 2 waits; "free": 2 arrives once its products that read it are done, 1 waits
// before writing that buffer two steps later). setmaxnreg: 216 / 216 / 72 registers (the 504 per thread of 384
// threads at launch).
#pragma once

#include <type_traits>

#include "cuda/block_info.cuh"
#include "cuda/bwd_tile_io.cuh"
#include "cuda/flash_bwd_sm90_kernel.cuh"       // add_dq_tile
#include "cuda/flash_bwd_sm90_wide_kernel.cuh"  // wide_step
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

// The split-role kernel's tiles and buffers (BwdSm90WideTraits), with a third warpgroup and a second dS^T buffer.
template <typename T, int kHeadDim_>
struct BwdSm90WideWsTraits : BwdSm90WideTraits<T, kHeadDim_> {
  using Base = BwdSm90WideTraits<T, kHeadDim_>;
  static constexpr int kNThreads = 384;     // three warpgroups
  static constexpr int kLoadThreads = 256;  // warpgroups 0 and 1 load Q, dO, LSE and D
  static constexpr int kComputeRegs = 216, kDqRegs = 72;
  // With the dQ warpgroup's chunks pipelined (two 64 x 64 accumulators live; the plain kernels): at 88 registers
  // ptxas serialised its wgmma (C7512), at 104 not; the kernel's spills stay those of 216 / 72 (24 bytes, before
  // the loop). The score-modifier kernels keep one chunk at a time (at 200 their compute warpgroups serialised
  // and spilled 196 bytes).
  static constexpr int kComputeRegsPipelined = 200, kDqRegsPipelined = 104;
  static constexpr bool kHalfHandOver = true;               // P^T handed over as float16 pairs (wide_step)
  static constexpr int kSmemP = Base::kBlockM / 2 * 128 * 2;
  static constexpr int kSmemDqBox = 64 * 32 * 4;            // 4 warps' 16 x 32 float32 boxes of dQ (128-byte swizzle)
  // 384 threads launch with 168 registers each (65536 / 384, in steps of 8): 504 per thread across the three.
  static_assert(2 * kComputeRegs + kDqRegs <= 3 * 168, "setmaxnreg: more registers than the launch gives");
  static_assert(2 * kComputeRegsPipelined + kDqRegsPipelined <= 3 * 168, "setmaxnreg: as above");
  // K | V | Q[2] | dO[2] | dS^T[2] | dQ box | P^T | (LSE, D)[2] | the stages' "full" mbarriers (TMA loads), plus
  // slack to align the start.
  static constexpr int kSmemBars = 2 * 8;
  static constexpr int kSmemBytes = 2 * Base::kSmemKV + 4 * Base::kSmemQ + 2 * Base::kSmemDS + kSmemDqBox + kSmemP +
                                    2 * Base::kSmemRowStats + kSmemBars + Base::kAlign;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// The d256 dQ-warpgroup kernel's tensor maps: dQ (float32 rows, reduce-adds) and, where BwdParams::wide_tma_loads,
// Q and dO (boxes of 64 columns x kBlockM rows, 128-byte swizzle: one column block of a TileQ).
struct WideWsMaps {  // CUtensorMap is 64-byte aligned itself
  CUtensorMap dq, q, dout;
};

namespace wide_step {

// The dQ warpgroup's box kBox (columns 32 kBox on) of a 64 x 64 chunk, added at (col0, row) by bulk reduce-adds
// through the 8 KB buffer sdQ: each warp stages its own 16 rows (2 KB at 2048 (warp % 4), 1024-byte aligned, so
// the swizzle of its rows is a 64-row box's) and its lane 0 adds them as one 16-row box; the warps meet no one,
// only their own lanes (the map's boxes are 16 rows). Each warp's own boxes measured 1.00-1.03x the
// warpgroup's 64-row boxes behind two barriers each (perf.md v25), which are gone.
template <int kBox>
FA2_DEVICE void add_dq_warp_box(unsigned char* sdQ, const float (&acc)[1][8][4], const CUtensorMap* map, int col0,
                                int row, bool issuer, int warp, int g, int t) {
  using namespace sm90;
  if (issuer) tma::bulk_wait_read<0>();  // this warp's last reduce-add has read its rows
  __syncwarp();
  store_dq_boxes<8192, kBox, 1>(sdQ, acc, warp, g, t);
  fence_proxy_async_smem();  // the stores before the bulk read
  __syncwarp();
  if (issuer) {
    tma::reduce_add_box(map, sdQ + 2048 * (warp % 4), col0, row + 16 * (warp % 4));
    tma::bulk_commit();
  }
}

}  // namespace wide_step

template <class Kt, bool kScoreMod>
__global__ void __launch_bounds__(Kt::kNThreads, 1)
    flash_bwd_sm90_wide_ws_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ WideWsMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using TileDS = typename Kt::TileDS;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kLoaders = Kt::kLoadThreads;
  constexpr int kNT_S = kBlockM / 8;     // n8 tiles of S^T / dP^T (64 keys x kBlockM queries)
  constexpr int kKSteps = kBlockM / 16;  // k16 steps of dV / dK (over queries)
  // Named barriers (0 is __syncthreads): the step's data landed (warpgroups 0 and 1), P^T handed over (0 and
  // 1), dS^T buffer b stored (1 arrives, 2 waits), dS^T buffer b free (2 arrives, 1 waits), warpgroup w's
  // epilogue (7 + w), the dQ warpgroup's deterministic turns (9: its 128 threads only).
  constexpr int kBarTop = 1, kBarP = 2, kBarDsFull = 3, kBarDsFree = 5, kBarEpilogue = 7, kBarDq = 9;
  // The dQ warpgroup's chunks pipelined (chunk c + 1's product under chunk c's second box) in the plain kernels,
  // with registers moved to it from the compute warpgroups; FLASH_ATTN2_WIDE_DQ_PIPELINE=0 (A/B builds) keeps one
  // chunk at a time everywhere.
#ifndef FLASH_ATTN2_WIDE_DQ_PIPELINE
#define FLASH_ATTN2_WIDE_DQ_PIPELINE 1
#endif
  constexpr bool kPipelinedDq = FLASH_ATTN2_WIDE_DQ_PIPELINE != 0 && !kScoreMod;
  constexpr int kComputeRegs = kPipelinedDq ? Kt::kComputeRegsPipelined : Kt::kComputeRegs;
  constexpr int kDqRegs = kPipelinedDq ? Kt::kDqRegsPipelined : Kt::kDqRegs;

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  unsigned char* smem = aligned.ptr;
  const uint32_t sK_u = aligned.addr;
  const uint32_t sV_u = sK_u + Kt::kSmemKV;
  const uint32_t sQ_u = sV_u + Kt::kSmemKV;      // stage s at + s * kSmemQ
  const uint32_t sdO_u = sQ_u + 2 * Kt::kSmemQ;  // stage s at + s * kSmemQ
  const uint32_t sdS_u = sdO_u + 2 * Kt::kSmemQ;  // buffer b at + b * kSmemDS
  const uint32_t sdQ_u = sdS_u + 2 * Kt::kSmemDS;  // 1024-byte aligned: 208 KB from the start
  const uint32_t sP_u = sdQ_u + Kt::kSmemDqBox;
  const uint32_t sStats_u = sP_u + Kt::kSmemP;   // stage s: LSE at s * 2M, D at + M (floats)
  void* sP = smem + (sP_u - sK_u);
  unsigned char* sdQ = smem + (sdQ_u - sK_u);
  const float* sStats = reinterpret_cast<const float*>(smem + (sStats_u - sK_u));
  uint64_t* full_bar = reinterpret_cast<uint64_t*>(smem + (sStats_u + 2 * Kt::kSmemRowStats - sK_u));  // [stage]
  const CUtensorMap& dq_map = maps.dq;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wg_tid = tid % 128;
  // The warpgroup index, broadcast from lane 0 so that ptxas knows it is warp-uniform (flash_bwd_sm90_ws_kernel).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int warp_row0 = 16 * (warp % 4);  // first key row of this warp's accumulators

  const BwdBlockInfo<kBlockN> blk(p);
  if (blk.keys <= 0) return;  // varlen: past the end of this sequence
  const Visibility<int> vis = blk.seq.visibility(p);
  const BwdSteps<kBlockM> steps(p, blk, vis);
  // With TMA loads (p.wide_tma_loads), thread 0 copies the step's Q and dO tiles (completing on the stage's full
  // barrier) and warpgroup 0's first 128 threads its LSE and D rows by cp.async; rows past the sequence's end
  // (another sequence's, in a packed batch, or the TMA's zeros) get LSE = +inf and D = 0, so that P = 0 there.
  // Otherwise the 256 compute threads copy all of it by cp.async, rows past the end zero-filled.
  const bool tma_loads = p.wide_tma_loads;
  const int map_b = p.cu_seqlens_q != nullptr ? 0 : blk.batch;  // packed: one map over every sequence
  auto load_q_do = [&](int it, int stage) {
    const int head = steps.head(it, blk.head_kv), row0 = steps.row0(it);
    if (!tma_loads) {
      load_q_do_async<TileQ, kLoaders, T>(p, blk.seq, blk.batch, head, row0, sQ_u + stage * Kt::kSmemQ,
                                          sdO_u + stage * Kt::kSmemQ, sStats_u + stage * Kt::kSmemRowStats, tid);
      return;
    }
    if (tid == 0) {
      const int row = blk.seq.q_start + row0;
      tma::arrive_expect_bytes(&full_bar[stage], 2 * Kt::kSmemQ);
      tma::load_tile<kBlockM, kHeadDim>(smem + (sQ_u + stage * Kt::kSmemQ - sK_u), &maps.q, row, head, map_b,
                                        &full_bar[stage]);
      tma::load_tile<kBlockM, kHeadDim>(smem + (sdO_u + stage * Kt::kSmemQ - sK_u), &maps.dout, row, head, map_b,
                                        &full_bar[stage]);
    }
    if (tid < 2 * kBlockM) {
      const int r = tid % kBlockM;
      const bool is_d = tid >= kBlockM;
      const uint32_t dst = sStats_u + stage * Kt::kSmemRowStats + static_cast<uint32_t>(tid * 4);
      if (row0 + r < blk.seq.seqlen_q) {
        const index_t idx = blk.seq.stat_index(p, blk.batch, head, row0 + r);
        cp_async_4(dst, (is_d ? p.softmax_d : p.lse_log2) + idx, true);
      } else {
        *reinterpret_cast<float*>(smem + (dst - sK_u)) = is_d ? 0.f : INFINITY;
      }
    }
  };
  if (tid == 0) {
    tma::init_barrier(&full_bar[0], 1);
    tma::init_barrier(&full_bar[1], 1);
    tma::fence_barrier_init();  // before this thread's copies complete on them; the others wait after the barrier below
  }
  if (wg < 2) {
    load_k_v_async<TileKV, kLoaders, T>(p, blk, sK_u, sV_u, tid);
    cp_async_commit();
    if (steps.total > 0) load_q_do(0, 0);
    cp_async_commit();
    cp_async_wait<1>();        // K and V landed (this thread's copies) ...
    fence_proxy_async_smem();  // ... for the async proxy (wgmma) too
  }
  __syncthreads();  // K and V for every warpgroup; the only block-wide barrier (the dQ warpgroup returns early)

  if (wg == 2) {
    // The dQ warpgroup: step it's dQ = dS_it K once warpgroup 1 has stored dS_it^T, 64 columns at a time. In the
    // deterministic mode it adds in the key tiles' turn (DqOrder), which only it waits for: the other two run on
    // up to two steps ahead meanwhile.
    tma::shrink_registers<kDqRegs>();
    const bool dq_tma = !p.dq_red_add;  // bulk reduce-adds (the launcher made dq_map; not in the deterministic mode)
    const bool dq_issuer = dq_tma && lane == 0;
    DqOrderChain dq_chain;
    dq_chain.adders = DqAdders{kBarDq, 128};
    // dQ chunk c (columns 64 c on) = dS K over the block's keys, issued and committed, not waited for.
    auto issue_dq_chunk = [&](float (&acc)[1][8][4], uint32_t sdS_b, int c) {
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kBlockN / 16; ++ks)
        WgmmaOp<T, 64>::template ss<1, 1>(flat(acc), desc_mn_major<TileDS>(sdS_b, 0, ks),
                                          desc_mn_major<TileKV>(sK_u, c, ks), ks > 0);
      wgmma_commit();
    };
    for (int it = 0; it < steps.total; ++it) {
      const int b = it & 1;
      const int head = steps.head(it, blk.head_kv), row0 = steps.row0(it);
      const uint32_t sdS_b = sdS_u + b * Kt::kSmemDS;
      tma::named_sync(kBarDsFull + b, 256);  // dS_it^T is in buffer b
      if (!dq_tma) dq_chain.acquire(DqOrder::make<kBlockM>(p, blk, vis, head, row0), wg_tid);
      const bool full_tile = row0 + kBlockM <= blk.seq.seqlen_q && p.head_dim == kHeadDim;
      // The step's first dQ row for the reduce-adds. Rows past the sequence's end add exact zeros (zero-filled
      // Q / dO rows there: dS = 0) to the rows that follow; rows past the array and columns past d are clipped
      // by the map.
      const int dq_row = static_cast<int>(blk.seq.stat_index(p, blk.batch, head, row0));
      const bool dq_release = it + 2 < steps.total;  // warpgroup 1 writes dS_{it+2}^T into buffer b
      if (dq_tma && kPipelinedDq) {
        // Chunk c + 1's product runs while chunk c's second box is staged and added: the wait for the TMA to
        // read chunk c's first box then overlaps that product instead of nothing (perf.md v29: this warpgroup
        // is busy all the time, and the other two wait for it at kBarDsFree).
        float acc_dq[2][1][8][4];
        issue_dq_chunk(acc_dq[0], sdS_b, 0);
        wgmma_wait<0>();
        fence_regs(acc_dq[0]);
#pragma unroll
        for (int c = 0; c < kHeadDim / 64; ++c) {
          float (&cur)[1][8][4] = acc_dq[c & 1];
          wide_step::add_dq_warp_box<0>(sdQ, cur, &dq_map, 64 * c, dq_row, dq_issuer, warp, g, t);
          if (c + 1 < kHeadDim / 64) issue_dq_chunk(acc_dq[(c + 1) & 1], sdS_b, c + 1);
          wide_step::add_dq_warp_box<1>(sdQ, cur, &dq_map, 64 * c + 32, dq_row, dq_issuer, warp, g, t);
          if (c + 1 < kHeadDim / 64) {
            wgmma_wait<0>();
            fence_regs(acc_dq[(c + 1) & 1]);
            if (c + 2 == kHeadDim / 64 && dq_release) tma::named_arrive(kBarDsFree + b, 256);  // buffer b read
          }
        }
        continue;
      }
#pragma unroll 1
      for (int col0 = 0; col0 < kHeadDim; col0 += 64) {
        float acc_dq[1][8][4];
        issue_dq_chunk(acc_dq, sdS_b, col0 / 64);
        wgmma_wait<0>();
        fence_regs(acc_dq);
        if (col0 + 64 >= kHeadDim && dq_release)
          tma::named_arrive(kBarDsFree + b, 256);  // buffer b read: warpgroup 1 may write dS_{it+2}^T there
        if (dq_tma) {
          // The chunk as two 32-column halves through the one buffer, each warp its own 16 rows.
          wide_step::add_dq_warp_box<0>(sdQ, acc_dq, &dq_map, col0, dq_row, dq_issuer, warp, g, t);
          wide_step::add_dq_warp_box<1>(sdQ, acc_dq, &dq_map, col0 + 32, dq_row, dq_issuer, warp, g, t);
        } else {
          add_dq_tile(p, blk.seq, acc_dq, blk.batch, head, row0, 0, col0, warp, g, t, full_tile);
        }
      }
    }
    if (dq_issuer) tma::bulk_wait<0>();  // the last reduce-adds done before the block's shared memory goes
    if (!dq_tma) dq_chain.finish(wg_tid);
    return;  // nothing to meet the others for: the epilogue stages dK and dV away from K, dS^T and the box
  }

  tma::grow_registers<kComputeRegs>();
  const bool is_p = wg == 0;  // warpgroup 0: S^T, P^T, dV; warpgroup 1: dP^T, dS^T, dK
  float acc_kv[1][kHeadDim / 8][4];  // dV (warpgroup 0) or dK (warpgroup 1)
  zero_acc(acc_kv);
  uint32_t frag[1][kKSteps][4];  // A of dV += (P Z)^T dO (warpgroup 0) or dK += dS^T Q (warpgroup 1)

  for (int it = 0; it < steps.total; ++it) {
    const int head = steps.head(it, blk.head_kv);
    const int row0 = steps.row0(it);
    const int stage = it & 1;
    if (tma_loads) tma::wait(&full_bar[stage], (it >> 1) & 1);  // the stage's Q and dO landed (its it/2-th use)
    cp_async_wait<0>();
    fence_proxy_async_smem();         // cp.async wrote through the generic proxy; wgmma reads through the async one
    tma::named_sync(kBarTop, kLoaders);  // the step's data landed for both; both are done with the other stage
    if (it + 1 < steps.total) load_q_do(it + 1, stage ^ 1);
    cp_async_commit();
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
    if (is_p)
      wide_step::probs_to_hand_over<Kt, kScoreMod>(acc_x, frag, sP, s_lse, key_r0, q_c0, row0, blk.key0, vis, rule,
                                                   keep, dropout, p, t, wg_tid);
    tma::named_sync(kBarP, kLoaders);  // P^T (G) handed over
    if (!is_p) {
      wide_step::dscores_from_hand_over<Kt, kScoreMod>(acc_x, sP, s_d, keep, dropout, p, t, wg_tid);
      // dS^T into buffer it % 2, once the dQ warpgroup has read what step it - 2 left there.
      const int b = it & 1;
      if (it >= 2) tma::named_sync(kBarDsFree + b, 256);
      store_acc<T, TileDS>(reinterpret_cast<T*>(smem + (sdS_u + b * Kt::kSmemDS - sK_u)), acc_x, warp_row0, 0, lane,
                           1.f);
      fence_proxy_async_smem();                 // the stores before the dQ warpgroup's wgmma reads
      tma::named_arrive(kBarDsFull + b, 256);  // dS_it^T stored
    }
    if (!kScoreMod || !is_p) acc_to_a_frags<T>(frag, acc_x);

    // dV += P^T dO (warpgroup 0) or dK += dS^T Q (warpgroup 1). Waited for within the step: left in flight
    // across the loop's back edge, ptxas serialised every wgmma of the kernel (C7515).
    wide_step::issue_kv_grad<Kt>(acc_kv, frag, is_p, sQ_s, sdO_s);
    wgmma_wait<0>();
    fence_regs(acc_kv);
    fence_regs(frag);  // the A fragments stay untouched until the MMAs reading them are done
  }

  // Epilogue: each warpgroup stages its gradient as T, dV (warpgroup 0) in stage 0's dO buffer and dK * scale
  // (warpgroup 1) in stage 0's Q buffer, and copies it out itself. The other compute warpgroup's last read of that
  // buffer came before the last P^T hand-over (dP^T = V dO^T, S^T = K Q^T), this one's were waited for, and the dQ
  // warpgroup reads neither; so only the warpgroup's own warps meet. (Staged in K / V behind a barrier of both
  // warpgroups, with the dQ warpgroup or not, racecheck reported the stores and the copy-out as racing.)
  static_assert(std::is_same_v<TileQ, TileKV>, "dK and dV are staged in the Q / dO buffers");
  T* s_grad = reinterpret_cast<T*>(smem + ((is_p ? sdO_u : sQ_u) - sK_u));
  cp_async_wait<0>();
  store_acc<T, TileKV>(s_grad, acc_kv, warp_row0, 0, lane, is_p ? dropout_scale(p, kScoreMod) : p.scale);
  tma::named_sync(kBarEpilogue + wg, 128);
  store_dk_or_dv<TileKV, 128>(p, blk, !is_p, s_grad, wg_tid);
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
