// FlashAttention-2 backward kernels.
//
//   flash_bwd_preprocess_kernel : softmax_d[row] = sum_c dO[row, c] * O[row, c]                  (fp32)
//                                 lse_log2[row] = lse[row] * log2e (+inf where lse = -inf)     (fp32)
//   flash_bwd_kernel            : one block per (key tile, kv head, batch), looping over the q heads of its
//                                 GQA group and over the query tiles that see the key tile:
//       S = Q K^T, score rule (kScoreMod), P = exp2(S*scale_log2 - lse*log2e)   (registers, masked tiles
//                                                                  only where needed)
//       dP = dO V^T, dS = P * (Z dP - D) [* (1 - tanh^2)]        (registers) -> P Z, dS to smem as T
//                                                                  (Z = dropout keep / (1 - p); 1 without)
//       dV += P^T dO, dK += dS^T Q                                (registers across all query tiles)
//       dQ_accum += dS K                                          (fp32 red.global.add)
//     Q/dO are double-buffered (cp.async prefetch of the next query tile) where shared memory allows.
//     dK is scaled by `scale` at the end; dK, dV staged through smem for 16-byte stores.
//     Deterministic mode: the dQ additions of a query tile happen in descending key-tile order (DqOrder).
//   flash_bwd_convert_dq_kernel : dq = dq_accum * scale, converted to T.
//
// dS here is the gradient w.r.t. the scaled logits scale * Q K^T, hence dQ = scale * dS K, dK = scale * dS^T Q.
#pragma once

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/bwd_tile_io.cuh"
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace flash_attn2::cuda {

// ---------------------------------------------------------------------------------------------------------
// D = rowsum(dO * O): kLanes threads per row, each reading 16-byte chunks of dO and O, kRowSets rows a thread
// whose loads are all issued before any row's sum (more bytes in flight: the pass ran at ~3.2 TB/s with one,
// perf.md v44); and, where BwdParams::pre_zeroes_dq, the same rows of dq_accum zero-filled.
template <typename T, int kHeadDim>
struct PreprocessConfig {
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kLanes = kChunks >= 32 ? 32 : kChunks > 8 ? 16 : kChunks > 4 ? 8 : 4;
  static constexpr int kThreads = 256;
  static constexpr int kRowSets = 2;
  static constexpr int kRowsPerSet = kThreads / kLanes;
  static constexpr int kRowsPerBlock = kRowsPerSet * kRowSets;
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(256) flash_bwd_preprocess_kernel(const __grid_constant__ BwdParams p) {
  using Cfg = PreprocessConfig<T, kHeadDim>;
  constexpr int kPer = (Cfg::kChunks + Cfg::kLanes - 1) / Cfg::kLanes;  // chunks a lane, per row
  const int lane_in_row = static_cast<int>(threadIdx.x) % Cfg::kLanes;
  const int chunks = p.head_dim / 8;
  const index_t total_rows = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  // Block-uniform loop so that every lane reaches the shuffles.
  for (index_t row_base = static_cast<index_t>(blockIdx.x) * Cfg::kRowsPerBlock; row_base < total_rows;
       row_base += static_cast<index_t>(gridDim.x) * Cfg::kRowsPerBlock) {
    uint4 vd[Cfg::kRowSets][kPer], vo[Cfg::kRowSets][kPer];
#pragma unroll
    for (int r = 0; r < Cfg::kRowSets; ++r) {
      const index_t row = row_base + r * Cfg::kRowsPerSet + threadIdx.x / Cfg::kLanes;
      if (row < total_rows) {
        const int i = static_cast<int>(row % p.seqlen_q);
        const index_t bh = row / p.seqlen_q;
        const int h = static_cast<int>(bh % p.heads_q);
        const int b = static_cast<int>(bh / p.heads_q);
        const T* dout =
            static_cast<const T*>(p.dout) + row_offset(b, h, i, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
        const T* out =
            static_cast<const T*>(p.out) + row_offset(b, h, i, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int c = j * Cfg::kLanes + lane_in_row;
          if (c < chunks) {
            vd[r][j] = *reinterpret_cast<const uint4*>(dout + c * 8);
            vo[r][j] = *reinterpret_cast<const uint4*>(out + c * 8);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < Cfg::kRowSets; ++r) {
      const index_t row = row_base + r * Cfg::kRowsPerSet + threadIdx.x / Cfg::kLanes;
      const bool valid = row < total_rows;
      float acc = 0.f;
      if (valid) {
#pragma unroll
        for (int j = 0; j < kPer; ++j) {
          const int c = j * Cfg::kLanes + lane_in_row;
          if (c < chunks) {
            float fd[8], fo[8];
            unpack8<T>(vd[r][j], fd);
            unpack8<T>(vo[r][j], fo);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc = fmaf(fd[e], fo[e], acc);
            if (p.pre_zeroes_dq) {  // dq_accum's row (d floats) is the statistics row's
              float4* z = reinterpret_cast<float4*>(p.dq_accum + row * p.head_dim + c * 8);
              z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
              z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
            }
          }
        }
      }
#pragma unroll
      for (int off = Cfg::kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (valid && lane_in_row == 0) {
        constexpr float kLog2e = 1.4426950408889634f;
        const float lse = p.lse[row];  // the statistics rows share D's indexing (the launcher made them contiguous)
        p.softmax_d[row] = acc;
        p.lse_log2[row] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// dq = dq_accum * scale -> T (dq_accum is (B, Hq, Nq, head_dim) contiguous); one 8-element chunk per thread.
template <typename T>
__global__ void __launch_bounds__(256) flash_bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  const int chunks = p.head_dim / 8;
  const index_t total = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q * chunks;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % chunks);
    const index_t row = idx / chunks;
    const int i = static_cast<int>(row % p.seqlen_q);
    const index_t bh = row / p.seqlen_q;
    const int h = static_cast<int>(bh % p.heads_q);
    const int b = static_cast<int>(bh / p.heads_q);
    const float4* src = reinterpret_cast<const float4*>(p.dq_accum + idx * 8);
    const float4 v0 = src[0], v1 = src[1];
    const float s = p.scale;
    uint4 out;
    out.x = pack2<T>(v0.x * s, v0.y * s);
    out.y = pack2<T>(v0.z * s, v0.w * s);
    out.z = pack2<T>(v1.x * s, v1.y * s);
    out.w = pack2<T>(v1.z * s, v1.w * s);
    T* dq = static_cast<T*>(p.dq) + row_offset(b, h, i, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
    *reinterpret_cast<uint4*>(dq + c * 8) = out;
  }
}

// ---------------------------------------------------------------------------------------------------------
template <class Kt, bool kScoreMod>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_kernel(const __grid_constant__ BwdParams p) {
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using TileP = typename Kt::TileP;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kThreads = Kt::kNThreads;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + TileKV::kElems;
  T* sP = sV + TileKV::kElems + 2 * Kt::kStages * TileQ::kElems;
  T* sdS = sP + TileP::kElems;
  float* sRowStats = reinterpret_cast<float*>(sdS + TileP::kElems);  // stage s: LSE at s * 2M, D at + M
  const uint32_t sK_u = smem_u32(sK);
  const uint32_t sV_u = sK_u + Kt::kSmemKV;
  const uint32_t sQ_u = sV_u + Kt::kSmemKV;                 // stage s at + s * kSmemQ
  const uint32_t sdO_u = sQ_u + Kt::kStages * Kt::kSmemQ;   // stage s at + s * kSmemQ
  const uint32_t sP_u = smem_u32(sP);
  const uint32_t sdS_u = smem_u32(sdS);
  const uint32_t sRowStats_u = smem_u32(sRowStats);

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  const BwdBlockInfo<kBlockN> blk(p);
  if (blk.keys <= 0) return;  // varlen: past the end of this sequence
  const int d = p.head_dim;
  const Visibility<int> vis = blk.seq.visibility(p);
  const int seqlen_q = blk.seq.seqlen_q;
  const BwdSteps<kBlockM> steps(p, blk, vis);
  const float inv_scale_log2 = 1.f / p.scale_log2;

  // Warp roles.
  const int s_m0 = (warp % Kt::kWM_S) * (Kt::kMT_S * 16);    // S / dP rows
  const int s_n0 = (warp / Kt::kWM_S) * (Kt::kNT_S * 8);     // S / dP cols (keys)
  const int kv_n0 = (warp % Kt::kWN_KV) * (Kt::kMT_KV * 16); // dK / dV rows (keys)
  const int kv_d0 = (warp / Kt::kWN_KV) * (Kt::kNT_KV * 8);  // dK / dV cols
  const int q_m0 = (warp % Kt::kWM_Q) * (Kt::kMT_Q * 16);    // dQ rows
  const int q_d0 = (warp / Kt::kWM_Q) * (Kt::kNT_Q * 8);     // dQ cols
  // Per-GEMM copies of the lane / warp offsets; see TileConfig::bwd_addr_in_loop and opaque().
  auto in_loop = [](int x, int gemm_bit) { return (Kt::kAddrInLoop & gemm_bit) ? opaque(x) : x; };

  auto load_q_do = [&](int it, int stage) {
    load_q_do_async<TileQ, kThreads, T>(p, blk.seq, blk.batch, steps.head(it, blk.head_kv), steps.row0(it),
                                        sQ_u + stage * Kt::kSmemQ, sdO_u + stage * Kt::kSmemQ,
                                        sRowStats_u + stage * Kt::kSmemRowStats, tid);
  };
  load_k_v_async<TileKV, kThreads, T>(p, blk, sK_u, sV_u, tid);
  if (steps.total > 0) load_q_do(0, 0);
  cp_async_commit();

  float acc_dk[Kt::kMT_KV][Kt::kNT_KV][4];
  float acc_dv[Kt::kMT_KV][Kt::kNT_KV][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  DqOrderChain dq_chain;  // deterministic mode
  for (int it = 0; it < steps.total; ++it) {
    const int head = steps.head(it, blk.head_kv);
    const int row0 = steps.row0(it);
    const int stage = Kt::kStages == 2 ? (it & 1) : 0;
    if (Kt::kStages == 1 && it > 0) {
      __syncthreads();  // everyone is done with the previous Q/dO/P/dS
      load_q_do(it, 0);
      cp_async_commit();
    }
    cp_async_wait<0>();
    __syncthreads();  // Q/dO (and K/V) landed; everyone is done with the previous iteration's buffers
    if (Kt::kStages == 2 && it + 1 < steps.total) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
    }
    const uint32_t sQ_s = sQ_u + stage * Kt::kSmemQ;
    const uint32_t sdO_s = sdO_u + stage * Kt::kSmemQ;
    const index_t row_base = blk.seq.stat_index(p, blk.batch, head, 0);
    const float* s_lse = sRowStats + stage * (Kt::kSmemRowStats / 4);
    const float* s_d = s_lse + kBlockM;

    // Per-row LSE (staged pre-multiplied by log2 e, BwdParams::lse_log2; +inf for rows that see nothing or are
    // out of range, so P = 0) and D.
    float lse2[Kt::kMT_S][2], dsum[Kt::kMT_S][2];
    {
#pragma unroll
      for (int mi = 0; mi < Kt::kMT_S; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = s_m0 + mi * 16 + h * 8 + g;
          const bool ok = row0 + r < seqlen_q;
          lse2[mi][h] = ok ? s_lse[r] : INFINITY;
          dsum[mi][h] = ok ? s_d[r] : 0.f;
        }
    }

    // S = Q K^T -> P, packed as T and kept in registers through dP = dO V^T (writing P to smem here and
    // reading it back later cost 10% at d64: docs/perf.md v3).
    uint32_t p_packed[Kt::kMT_S][Kt::kNT_S][2];
    const int r0 = row0 + s_m0 + g, c0 = blk.key0 + s_n0 + 2 * t;  // this thread's first query / key
    const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, head) : ScoreRule<float>{};
    {
      float acc_s[Kt::kMT_S][Kt::kNT_S][4];
      zero_acc(acc_s);
      gemm_ss<T, Kt::kMT_S, Kt::kNT_S, Kt::kHeadDim / 16, Operand<TileQ, false>, Operand<TileKV, false>>(
          acc_s, sQ_s, in_loop(s_m0, Kt::kGemmS), sK_u, in_loop(s_n0, Kt::kGemmS), in_loop(lane, Kt::kGemmS));
      if constexpr (kScoreMod) apply_score_rule(acc_s, r0, c0, vis.diag(), rule);
      if (vis.tile_needs_mask(row0, kBlockM, blk.key0, kBlockN)) apply_mask(acc_s, r0, c0, vis);
#pragma unroll
      for (int mi = 0; mi < Kt::kMT_S; ++mi)
#pragma unroll
        for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float p0 = fast_exp2(fmaf(acc_s[mi][ni][2 * h], p.scale_log2, -lse2[mi][h]));
            const float p1 = fast_exp2(fmaf(acc_s[mi][ni][2 * h + 1], p.scale_log2, -lse2[mi][h]));
            p_packed[mi][ni][h] = pack2<T>(p0, p1);
          }
    }
    // With Kt::kDInAcc, acc_dp starts at -D so that it ends as dP - D and D is not live during the GEMM.
    float acc_dp[Kt::kMT_S][Kt::kNT_S][4];
#pragma unroll
    for (int mi = 0; mi < Kt::kMT_S; ++mi)
#pragma unroll
      for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_dp[mi][ni][e] = Kt::kDInAcc ? -dsum[mi][e / 2] : 0.f;
    gemm_ss<T, Kt::kMT_S, Kt::kNT_S, Kt::kHeadDim / 16, Operand<TileQ, false>, Operand<TileKV, false>>(
        acc_dp, sdO_s, in_loop(s_m0, Kt::kGemmDP), sV_u, in_loop(s_n0, Kt::kGemmDP), in_loop(lane, Kt::kGemmDP));

    // P and dS = P * (dP - D) to smem as T (the transposed A operands of dV / dK, and the A operand of dQ).
    if constexpr (!kScoreMod) {
#pragma unroll
      for (int mi = 0; mi < Kt::kMT_S; ++mi)
#pragma unroll
        for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = s_m0 + mi * 16 + h * 8 + g, c = s_n0 + ni * 8 + 2 * t;
            const uint32_t pp = p_packed[mi][ni][h];
            *reinterpret_cast<uint32_t*>(sP + TileP::offset(r, c)) = pp;
            const float2 pf = unpack2<T>(pp);
            const float dd = Kt::kDInAcc ? 0.f : dsum[mi][h];
            st_pair<TileP, T>(sdS, r, c, pf.x * (acc_dp[mi][ni][2 * h] - dd), pf.y * (acc_dp[mi][ni][2 * h + 1] - dd));
          }
    } else {
      // With dropout, O used P Z (Z = keep / (1 - p)): sP gets P Z and dS = P (Z dP - D); with softcap dS is
      // also multiplied by 1 - tanh^2, recomputed from P. D and the LSE are re-read from shared memory.
      // Dropout and softcap are compile-time flags of this loop (with_flags): as run-time selects the compiler
      // computed Z's keep-bit select and the P Z multiply for every score of every score-modifier call, dropout
      // or not (as in the Hopper backwards until perf.md v30).
      const bool dropout = p.dropout.enabled();
      KeepBits<Kt::kMT_S, Kt::kNT_S> keep{};
      if (dropout) keep = dropout_bits<Kt::kMT_S, Kt::kNT_S>(p.dropout, static_cast<uint32_t>(blk.batch * p.heads_q + head), r0, c0);
      with_flags(
          [&](auto drop, auto cap) {
            constexpr bool kDropout = decltype(drop)::value, kSoftcap = decltype(cap)::value;
#pragma unroll
            for (int mi = 0; mi < Kt::kMT_S; ++mi)
#pragma unroll
              for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                  const int r = s_m0 + mi * 16 + h * 8 + g, c = s_n0 + ni * 8 + 2 * t;
                  const float2 pf = unpack2<T>(p_packed[mi][ni][h]);
                  const float dd = s_d[r];
                  const float lse2_r = s_lse[r];
                  float pv[2] = {pf.x, pf.y}, pz[2], ds[2];  // pz: P Z (with dropout)
#pragma unroll
                  for (int e = 0; e < 2; ++e) {
                    const float dp = acc_dp[mi][ni][2 * h + e] + (Kt::kDInAcc ? dd : 0.f);
                    if constexpr (kDropout) {
                      const float z = keep.get(mi, ni, 2 * h + e) ? p.keep_scale : 0.f;
                      pz[e] = pv[e] * z;
                      ds[e] = pv[e] * (z * dp - dd);
                    } else {
                      ds[e] = pv[e] * (dp - dd);
                    }
                    if constexpr (kSoftcap)
                      ds[e] *= softcap_grad(pv[e], lse2_r, row0 + r, blk.key0 + c + e, vis.diag(), rule, inv_scale_log2);
                  }
                  if constexpr (kDropout) {
                    *reinterpret_cast<uint32_t*>(sP + TileP::offset(r, c)) = pack2<T>(pz[0], pz[1]);
                  } else {
                    *reinterpret_cast<uint32_t*>(sP + TileP::offset(r, c)) = p_packed[mi][ni][h];  // P as computed
                  }
                  st_pair<TileP, T>(sdS, r, c, ds[0], ds[1]);
                }
          },
          dropout, rule.has_softcap());
    }
    __syncthreads();  // P, dS visible to all warps

    // dV += P^T dO, dK += dS^T Q.
    constexpr bool kKVRowVar = Kt::kWN_KV > 1, kKVColVar = Kt::kWD_KV > 1;
    gemm_ss<T, Kt::kMT_KV, Kt::kNT_KV, kBlockM / 16, Operand<TileP, true, kKVRowVar>,
            Operand<TileQ, true, kKVColVar>>(acc_dv, sP_u, in_loop(kv_n0, Kt::kGemmDV), sdO_s,
                                             in_loop(kv_d0, Kt::kGemmDV), in_loop(lane, Kt::kGemmDV));
    gemm_ss<T, Kt::kMT_KV, Kt::kNT_KV, kBlockM / 16, Operand<TileP, true, kKVRowVar>,
            Operand<TileQ, true, kKVColVar>>(acc_dk, sdS_u, in_loop(kv_n0, Kt::kGemmDK), sQ_s,
                                             in_loop(kv_d0, Kt::kGemmDK), in_loop(lane, Kt::kGemmDK));

    // dQ_accum += dS K.
    {
      float acc_dq[Kt::kMT_Q][Kt::kNT_Q][4];
      zero_acc(acc_dq);
      gemm_ss<T, Kt::kMT_Q, Kt::kNT_Q, kBlockN / 16, Operand<TileP, false>, Operand<TileKV, true, (Kt::kWD_Q > 1)>>(
          acc_dq, sdS_u, in_loop(q_m0, Kt::kGemmDQ), sK_u, in_loop(q_d0, Kt::kGemmDQ), in_loop(lane, Kt::kGemmDQ));
      float* dq = p.dq_accum + (row_base + row0) * d;
      const bool full_tile = row0 + kBlockM <= seqlen_q && d == Kt::kHeadDim;  // no bounds checks needed
      const DqOrder order = DqOrder::make<kBlockM>(p, blk, vis, head, row0);
      dq_chain.acquire(order, tid);
#pragma unroll
      for (int mi = 0; mi < Kt::kMT_Q; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = q_m0 + mi * 16 + h * 8 + g;
          if (full_tile || row0 + r < seqlen_q) {
#pragma unroll
            for (int ni = 0; ni < Kt::kNT_Q; ++ni) {
              const int c = q_d0 + ni * 8 + 2 * t;
              if (full_tile || c < d)
                red_add_f32x2(dq + static_cast<index_t>(r) * d + c, acc_dq[mi][ni][2 * h], acc_dq[mi][ni][2 * h + 1]);
            }
          }
        }
    }
  }
  dq_chain.finish(tid);

  // Epilogue: dK * scale and dV as T through the K / V buffers, then 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  store_acc<T, TileKV>(sK, acc_dk, kv_n0, kv_d0, lane, p.scale);
  store_acc<T, TileKV>(sV, acc_dv, kv_n0, kv_d0, lane, 1.f);
  __syncthreads();
  store_dk_dv<TileKV, kThreads>(p, blk, sK, sV, tid);
}

}  // namespace flash_attn2::cuda
