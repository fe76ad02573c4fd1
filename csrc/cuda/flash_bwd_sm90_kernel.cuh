// FlashAttention-2 backward main kernel on Hopper warpgroup MMA (wgmma, sm_90a), for head dims 64 and 128.
//
// Same algorithm and contract as flash_bwd_kernel (preprocess and dQ conversion kernels are shared): one block
// per (key tile of 128, kv head, batch) loops over the q heads of its GQA group and the query tiles that see
// the key tile. Two warpgroups each own 64 keys and compute everything transposed, keys as rows:
//       S^T  = K Q^T,  dP^T = V dO^T                       (wgmma, both operands in shared memory)
//       P^T  = exp2(S^T * scale_log2 - lse * log2e),  dS^T = P^T * (dP^T - D)      (registers)
//       dV  += P^T dO, dK += dS^T Q                        (wgmma, A = P^T / dS^T straight from registers:
//                                                           the accumulator layout is the A-fragment layout)
//       dQ_accum += dS K                                   (dS^T via shared memory; fp32 red.global.add)
// Keeping keys as rows is what lets P^T and dS^T feed the dV / dK products without a trip through shared
// memory; only dQ needs dS in shared memory, as the M-major A operand.
// Q/dO (with their LSE and D rows) are double-buffered with cp.async.
#pragma once

#include <climits>
#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/bwd_tile_io.cuh"
#include "cuda/cycle_probe.cuh"
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/warp_mma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

namespace sm90 {

// Shared by the Hopper backward kernels, whose accumulators hold a warp's 16 keys (rows key, key + 8) by the
// step's queries (columns row0 + 8 ni + 2t + {0, 1}): S^T, dP^T, P^T and dS^T.
//
// P^T = exp2(S^T * scale_log2 - LSE * log2 e) in place of S^T (already transformed by the score rule in the
// kScoreMod kernels); invisible entries are masked first where the tile needs it. s_lse holds the step's LSE rows
// as staged from BwdParams::lse_log2: in log2 units, +inf for a row that sees no key, so that P = 0 there. Query
// rows past the sequence's end read 0 (cp.async zero fill) or +inf and zero-filled Q / dO rows: dO = 0 and
// dS = 0 there, so they add nothing.
// key: this thread's first key row; q0: its first query column.
template <int NT>
FA2_DEVICE void probs_transposed(float (&s)[1][NT][4], const float* s_lse, int key, int q0, bool need_mask,
                                 const Visibility<int>& vis, float scale_log2, int t) {
  if (need_mask) apply_mask<true>(s, key, q0, vis);
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) {
    const float2 l = *reinterpret_cast<const float2*>(s_lse + 8 * ni + 2 * t);
    const float l2[2] = {l.x, l.y};
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[0][ni][2 * h + e];
        x = fast_exp2(fmaf(x, scale_log2, -l2[e]));
      }
  }
}

// dS^T = P^T (dP^T - D) in place of dP^T; s_d holds the step's D.
template <int NT>
FA2_DEVICE void dscores_transposed(float (&dp)[1][NT][4], const float (&pr)[1][NT][4], const float* s_d, int t) {
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) {
    const float2 dd = *reinterpret_cast<const float2*>(s_d + 8 * ni + 2 * t);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      dp[0][ni][2 * h] = pr[0][ni][2 * h] * (dp[0][ni][2 * h] - dd.x);
      dp[0][ni][2 * h + 1] = pr[0][ni][2 * h + 1] * (dp[0][ni][2 * h + 1] - dd.y);
    }
  }
}

// The score-modifier form of probs_transposed, one pass per element over S^T (raw scores):
//   x = cap_out tanh(cap_in s) - alibi |i + diag - j|   (each term when enabled), -inf where invisible
//   P = exp2(x * scale_log2 - LSE * log2 e)
// leaves P^T G in `s`, G = 1 - tanh^2 (the softcap's derivative; 1 without softcap), and writes P^T K as the
// A fragments of dV += (P Z)^T dO into `a`, K the dropout keep mask (1 without dropout): Z = K / (1 - p), whose
// 1 / (1 - p) the kernels apply to dV once, in their epilogue (dropout_scale), as the forward does to O. Computing G
// here, while tanh is at hand, costs one FFMA per score; recomputing it at the dS step cost a lg2, the ALiBi term
// and a branch per score (docs/perf.md v8). The exponent is formed in log2 units (cap_out and the slope scaled by
// scale_log2 once), so the softcap costs no multiply after its tanh. Softcap, ALiBi and the mask are compile-time
// flags of the loop (with_flags): the mask as a run-time condition cost three compares and a select per score on
// every tile, the diagonal's or not (SASS, perf.md v15). Dropout is neither: as a flag too, its keep bits lived
// across the branches and the consumers of the WS backward spilled 52-412 B more (ptxas -v); as a select per
// score (to v29) it cost every score-modifier call 2 FMUL, 2.7 LOP3 and 1 FSEL a score, dropout or not (ncu's
// source counters, perf.md v30). It is now one AND a pair of P^T, taken only with dropout (keep_pairs).
template <typename T, bool kSoftcap, bool kAlibi, bool kMask, int NT>
FA2_DEVICE void probs_mod_transposed_impl(float (&s)[1][NT][4], uint32_t (&a)[1][NT / 2][4], const float* s_lse,
                                          int key, int q0, const Visibility<int>& vis, const ScoreRule<float>& rule,
                                          float scale_log2, int t) {
  const float cap_log2 = rule.cap_out * scale_log2, alibi_log2 = rule.alibi * scale_log2;
  VisibleSpan visible[2] = {{0, 0}, {0, 0}};  // visible queries of the thread's key rows key and key + 8
  float rel[2];  // i - j + diag for the thread's first query column and each key row (ALiBi)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = key + 8 * h;
    if constexpr (kMask) {
      const int lo = vis.query_begin(row);
      visible[h] = VisibleSpan(lo, row < vis.seqlen_k ? vis.query_end(row) : lo);
    }
    if constexpr (kAlibi) rel[h] = static_cast<float>(q0 + vis.diag() - row);
  }
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) {
    const float2 l = *reinterpret_cast<const float2*>(s_lse + 8 * ni + 2 * t);
    const float l2[2] = {l.x, l.y};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float pr[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = s[0][ni][2 * h + e];
        float g = 1.f, arg;
        if constexpr (kSoftcap) {
          const float th = fast_tanh(x * rule.cap_in);
          g = fmaf(-th, th, 1.f);
          arg = fmaf(th, cap_log2, -l2[e]);
        } else {
          arg = fmaf(x, scale_log2, -l2[e]);
        }
        if constexpr (kAlibi) arg = fmaf(-alibi_log2, fabsf(rel[h] + static_cast<float>(8 * ni + e)), arg);
        if constexpr (kMask) arg = visible[h](q0 + 8 * ni + e) ? arg : -INFINITY;
        pr[e] = fast_exp2(arg);
        x = pr[e] * g;
      }
      a[0][ni / 2][2 * (ni % 2) + h] = pack2<T>(pr[0], pr[1]);
    }
  }
}

// P^T K from P^T as A fragments (probs_mod_transposed_impl's `a`): each pair's dropped halves zeroed by one AND.
// The pair of (n8 tile ni, key row +8 h) holds the scores 2 h and 2 h + 1 of the tile, keep bits 4 ni + 2 h and
// the next, the first in the low half (pack2).
template <int NT>
FA2_DEVICE void keep_pairs(uint32_t (&a)[1][NT / 2][4], const KeepBits<1, NT>& keep) {
#pragma unroll
  for (int ni = 0; ni < NT; ++ni)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int bit = 4 * ni + 2 * h;
      const uint32_t two = keep.w[bit / 32] >> (bit % 32);
      const uint32_t halves = ((two & 1u) | ((two & 2u) << 15)) * 0xFFFFu;  // bit 0 -> 0x0000FFFF, 1 -> 0xFFFF0000
      a[0][ni / 2][2 * (ni % 2) + h] &= halves;
    }
}

template <typename T, int NT>
FA2_DEVICE void probs_mod_transposed(float (&s)[1][NT][4], uint32_t (&a)[1][NT / 2][4], const float* s_lse, int key,
                                     int q0, bool need_mask, const Visibility<int>& vis, const ScoreRule<float>& rule,
                                     const KeepBits<1, NT>& keep, bool dropout, float scale_log2, int t) {
  with_flags(
      [&](auto softcap, auto alibi, auto mask) {
        probs_mod_transposed_impl<T, decltype(softcap)::value, decltype(alibi)::value, decltype(mask)::value>(
            s, a, s_lse, key, q0, vis, rule, scale_log2, t);
      },
      rule.has_softcap(), rule.alibi != 0.f, need_mask);
  if (dropout) keep_pairs(a, keep);
}

// The score-modifier form of dscores_transposed: dS^T = P^T G (Z dP^T - D) in place of dP^T, from `pg` = P^T G
// (probs_mod_transposed); Z = keep / (1 - p) with dropout. Without dropout, dscores_transposed's two operations
// a score (the select of Z cost two more and a LOP3 there).
template <int NT>
FA2_DEVICE void dscores_transposed_mod(float (&dp)[1][NT][4], const float (&pg)[1][NT][4], const float* s_d,
                                       const KeepBits<1, NT>& keep, bool dropout, float keep_scale, int t) {
  if (!dropout) {
    dscores_transposed(dp, pg, s_d, t);
    return;
  }
#pragma unroll
  for (int ni = 0; ni < NT; ++ni) {
    const float2 dd = *reinterpret_cast<const float2*>(s_d + 8 * ni + 2 * t);
    const float d2[2] = {dd.x, dd.y};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float z = keep.get(0, ni, j) ? keep_scale : 0.f;
      dp[0][ni][j] = pg[0][ni][j] * fmaf(z, dp[0][ni][j], -d2[j % 2]);
    }
  }
}

// dQ_accum[rows r0 + (16 (warp % 4) + g, +8), cols c0 + 8 ni + 2t] += a warpgroup's 64 x 64 dQ tile, for the
// step's query rows starting at row0 of (batch, head); rows past the sequence and columns past d are skipped.
FA2_DEVICE void add_dq_tile(const BwdParams& p, const SeqInfo& seq, const float (&acc)[1][8][4], int batch,
                            int head, int row0, int r0, int c0, int warp, int g, int t, bool full_tile) {
  const int d = p.head_dim;
  float* dq = p.dq_accum + seq.stat_index(p, batch, head, row0) * d;
#pragma unroll
  for (int ni = 0; ni < 8; ++ni)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = r0 + 16 * (warp % 4) + g + 8 * h;
      const int c = c0 + 8 * ni + 2 * t;
      if (full_tile || (row0 + r < seq.seqlen_q && c < d))
        red_add_f32x2(dq + static_cast<index_t>(r) * d + c, acc[0][ni][2 * h], acc[0][ni][2 * h + 1]);
    }
}

// dK += dS^T Q (B operand M-major: Q's query rows are the K dim), issued, not committed: bwd_step_dk_dv's with dV,
// the WS kernel's after the dQ product. kN: the step's first kN queries (bwd_step_dk_dv).
template <class Kt, int kN = Kt::kBlockM, class T = typename Kt::Elem>
FA2_DEVICE void issue_dk(float (&acc_dk)[1][Kt::kHeadDim / 8][4], uint32_t (&ds_frag)[1][kN / 16][4],
                         uint32_t sQ_s) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk)
    WgmmaOp<T, Kt::kHeadDim>::template rs<1>(flat(acc_dk), ds_frag[0][kk],
                                             desc_mn_major<typename Kt::TileQ>(sQ_s, 0, kk), 1);
}

// The WS backward's cycle probe (cycle_probe.cuh; -DFLASH_ATTN2_BWD_TIMELINE builds, scripts/bwd_probe.py): where a
// consumer warpgroup's cycles go, per step. kSteps counts steps, kTotal spans the consumer's whole walk.
#ifdef FLASH_ATTN2_BWD_TIMELINE
using BwdProbeBase = CycleProbe<true, kBwdProbeConsumers, kBwdProbeSlots>;
#else
using BwdProbeBase = CycleProbe<false, 1, 1>;
#endif
struct BwdProbe : BwdProbeBase {
  // kFullWait: the stage (Q, dO, LSE, D); kIssueSdP: S^T and dP^T issued (dP^T later with kLateDp: counted in
  // kProbs); kSWait / kDpWait: the waits for them; kProbs: P^T; kDs: dS^T and its store for dQ; kIssueDv: dV issued;
  // kDsBarrier: both consumers' dS^T stored; kIssueDq / kIssueDk: those products issued; kDqWait: dV and dQ done;
  // kDqBufWait: the writer's buffer free; kDqStore: dQ stored and handed over; kDkWait: dK done, the stage released.
  enum Slot { kFullWait, kIssueSdP, kSWait, kProbs, kDpWait, kDs, kIssueDv, kDsBarrier, kIssueDq, kIssueDk, kDqWait,
              kDqBufWait, kDqStore, kDkWait, kSteps, kTotal };
  FA2_DEVICE BwdProbe(const BwdParams& p, int c, bool lane) : BwdProbeBase(probe_timeline(p), c, lane) {}
};

// One step of a Hopper backward for one warpgroup's 64 keys (rows [64 wg, 64 wg + 64) of the block's K and V),
// shared by flash_bwd_sm90_kernel and the warp-specialised flash_bwd_sm90_ws_kernel: S^T = K Q^T and
// dP^T = V dO^T; P^T by the score rule and dS^T from the step's LSE and D rows (s_lse, s_d = s_lse + kBlockM);
// dS^T stored to sdS for the dQ product; then dV += P^T dO and dK += dS^T Q issued and committed, not waited
// for. p_frag and ds_frag are those products' A operands: the caller keeps them untouched until its wait.
// kIssueDk = false: dV is issued and committed alone, and the caller issues dK (issue_dk) when it chooses.
// kN: the products run on the step's first kN of its Kt::kBlockM queries (the WS kernel's partial last step, whose
// other rows see none of the block's keys: kWsBwdPartialRows); the shared-memory tiles keep Kt's layout.
// kSoftcapOnly (with kScoreMod): the score rule is a softcap alone, no ALiBi or dropout (the WS backward's softcap
// kernel): the softcap's form of the score loop with only the mask chosen at run time, and dS^T without dropout.
// probe: the WS kernel's cycle probe (BwdProbe; nullptr elsewhere).
template <class Kt, bool kScoreMod, bool kIssueDk = true, bool kSoftcapOnly = false, int kN = Kt::kBlockM,
          class T = typename Kt::Elem>
FA2_DEVICE void bwd_step_dk_dv(const BwdParams& p, const BwdBlockInfo<Kt::kBlockN>& blk, const Visibility<int>& vis,
                               int head, int row0, int wg, int warp, int lane, uint32_t sK_u, uint32_t sV_u,
                               uint32_t sQ_s, uint32_t sdO_s, const float* s_lse, T* sdS,
                               float (&acc_dk)[1][Kt::kHeadDim / 8][4], float (&acc_dv)[1][Kt::kHeadDim / 8][4],
                               uint32_t (&p_frag)[1][kN / 16][4], uint32_t (&ds_frag)[1][kN / 16][4],
                               BwdProbe* probe = nullptr) {
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using TileDS = typename Kt::TileDS;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  static_assert(kN % 16 == 0 && kN <= kBlockM, "a step's first kN queries");
  constexpr int kNT_S = kN / 8;     // n8 tiles of S^T / dP^T (64 keys x kN queries per warpgroup)
  constexpr int kKSteps = kN / 16;  // k16 steps of dV / dK (over queries)
  const int g = lane >> 2, t = lane & 3;
  const int wg_row0 = 64 * wg + 16 * (warp % 4);  // first block-local key row of this warp's accumulators

  float acc_s[1][kNT_S][4], acc_dp[1][kNT_S][4];
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < kHeadDim / 16; ++ks)
    WgmmaOp<T, kN>::template ss<0, 0>(flat(acc_s), desc_k_major<TileKV>(sK_u, 64 * wg, ks),
                                           desc_k_major<TileQ>(sQ_s, 0, ks), ks > 0);
  wgmma_commit();
  // dP^T = V dO^T, issued and committed. Kt::kLateDp: after P^T is computed, not beside S^T, so that its
  // accumulators are not live during the score rule (the larger steps' score-modifier kernels spill 496-600 bytes
  // otherwise, 160 so); the WS launcher takes it on every score-modifier call of the larger steps.
  auto issue_dp = [&] {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks)
      WgmmaOp<T, kN>::template ss<0, 0>(flat(acc_dp), desc_k_major<TileKV>(sV_u, 64 * wg, ks),
                                             desc_k_major<TileQ>(sdO_s, 0, ks), ks > 0);
    wgmma_commit();
  };
  constexpr bool kLateDp = Kt::kLateDp;
  if constexpr (!kLateDp) issue_dp();
  if (probe) probe->mark(BwdProbe::kIssueSdP);

  const float* s_d = s_lse + kBlockM;
  const int key_r0 = blk.key0 + wg_row0 + g, q_c0 = row0 + 2 * t;  // this thread's first key / query
  const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, head) : ScoreRule<float>{};
  const bool need_mask = vis.tile_needs_mask(row0, kN, blk.key0, kBlockN);
  // The keep mask depends on positions only: draw it while the tensor cores work on S^T and dP^T.
  KeepBits<1, kNT_S> keep{};
  const bool dropout = kScoreMod && !kSoftcapOnly && p.dropout.enabled();
  if (dropout)
    keep = dropout_bits_keys_as_rows<kNT_S>(p.dropout, static_cast<uint32_t>(blk.batch * p.heads_q + head), key_r0,
                                            q_c0);
  if constexpr (kLateDp) wgmma_wait<0>(); else wgmma_wait<1>();
  fence_regs(acc_s);
  if (probe) probe->mark(BwdProbe::kSWait);
  if constexpr (kSoftcapOnly) {  // P^T G in acc_s, P^T in p_frag
    with_flags(
        [&](auto mask) {
          probs_mod_transposed_impl<T, true, false, decltype(mask)::value>(acc_s, p_frag, s_lse, key_r0, q_c0, vis,
                                                                           rule, p.scale_log2, t);
        },
        need_mask);
  } else if constexpr (kScoreMod) {  // P^T G in acc_s, P^T Z in p_frag
    probs_mod_transposed<T>(acc_s, p_frag, s_lse, key_r0, q_c0, need_mask, vis, rule, keep, dropout, p.scale_log2,
                            t);
  } else {
    probs_transposed(acc_s, s_lse, key_r0, q_c0, need_mask, vis, p.scale_log2, t);
    acc_to_a_frags<T>(p_frag, acc_s);
  }

  if constexpr (kLateDp) {
    wgmma_fence();
    issue_dp();
  }
  if (probe) probe->mark(BwdProbe::kProbs);
  // dS^T in place of dP^T, as A fragments for dK and into shared memory for dQ.
  wgmma_wait<0>();
  fence_regs(acc_dp);
  if (probe) probe->mark(BwdProbe::kDpWait);
  if constexpr (kScoreMod && !kSoftcapOnly) {
    dscores_transposed_mod(acc_dp, acc_s, s_d, keep, dropout, p.keep_scale, t);
  } else {
    dscores_transposed(acc_dp, acc_s, s_d, t);
  }
  acc_to_a_frags<T>(ds_frag, acc_dp);
  if constexpr (Kt::kDsQueryMajor) {  // dS as [query][key] (the WS kernel's 80-query steps: dQ^T = K^T dS^T)
    store_frags_transposed<TileDS>(static_cast<uint32_t>(__cvta_generic_to_shared(sdS)), ds_frag, wg_row0, lane);
  } else {
    store_frags<TileDS>(static_cast<uint32_t>(__cvta_generic_to_shared(sdS)), ds_frag, wg_row0, lane);
  }
  if (probe) probe->mark(BwdProbe::kDs);

  // dV += P^T dO, dK += dS^T Q (B operands M-major: the query rows of dO / Q are the K dim).
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
    WgmmaOp<T, kHeadDim>::template rs<1>(flat(acc_dv), p_frag[0][kk], desc_mn_major<TileQ>(sdO_s, 0, kk), 1);
  if constexpr (kIssueDk) issue_dk<Kt, kN>(acc_dk, ds_frag, sQ_s);
  wgmma_commit();
  if (probe) probe->mark(BwdProbe::kIssueDv);
}
}  // namespace sm90

template <typename T, int kHeadDim_>
struct BwdSm90Traits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarpGroups = 2;
  static constexpr int kNThreads = kWarpGroups * 128;
  static constexpr int kBlockN = 64 * kWarpGroups;            // keys per block, 64 per warpgroup
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;   // queries per step
  static constexpr bool kLateDp = false;                      // dP^T beside S^T (bwd_step_dk_dv)
  // dQ of one step (kBlockM x d) is split into one 64 x 64 tile per warpgroup: by query rows when
  // kBlockM = 128 (d = 64), by columns when d = 128 (kBlockM = 64).
  static constexpr bool kDqSplitRows = kBlockM == 128;
  static_assert(kBlockM * kHeadDim == kWarpGroups * 64 * 64, "one 64 x 64 dQ tile per warpgroup");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma backward is built for d = 64 and 128");

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;   // Q and dO
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;  // K and V (later dK and dV staging)
  using TileDS = SwizzledTile<kBlockN, kBlockM>;   // dS^T, [key][query]
  static constexpr bool kDsQueryMajor = false;     // (bwd_step_dk_dv; see BwdSm90WsTraits)
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kSmemDS = TileDS::kElems * 2;
  static constexpr int kSmemRowStats = 2 * kBlockM * 4;  // LSE and D of one query tile, fp32
  static constexpr int kAlign = 1024;                    // the 128-byte swizzle repeats every 1024 bytes
  // K | V | Q[2] | dO[2] | dS^T | (LSE, D)[2], plus slack to align the start.
  static constexpr int kSmemBytes = 2 * kSmemKV + 4 * kSmemQ + kSmemDS + 2 * kSmemRowStats + kAlign;
};

template <class Kt, bool kScoreMod>
__global__ void __launch_bounds__(Kt::kNThreads, 1) flash_bwd_sm90_kernel(const __grid_constant__ BwdParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  using TileDS = typename Kt::TileDS;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kThreads = Kt::kNThreads;

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  unsigned char* smem = aligned.ptr;
  const uint32_t sK_u = aligned.addr;
  const uint32_t sV_u = sK_u + Kt::kSmemKV;
  const uint32_t sQ_u = sV_u + Kt::kSmemKV;               // stage s at + s * kSmemQ
  const uint32_t sdO_u = sQ_u + 2 * Kt::kSmemQ;           // stage s at + s * kSmemQ
  const uint32_t sdS_u = sdO_u + 2 * Kt::kSmemQ;
  const uint32_t sStats_u = sdS_u + Kt::kSmemDS;          // stage s: LSE at s * 2M, D at + M (floats)
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = reinterpret_cast<T*>(smem + Kt::kSmemKV);
  T* sdS = reinterpret_cast<T*>(smem + (sdS_u - sK_u));
  const float* sStats = reinterpret_cast<const float*>(smem + (sStats_u - sK_u));

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int wg = warp / 4;
  const int g = lane >> 2, t = lane & 3;

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

  constexpr int kNT_KV = kHeadDim / 8;   // n8 tiles of dK / dV (64 keys x d)
  constexpr int kKSteps = kBlockM / 16;  // k16 steps of dV / dK (over queries)
  const int wg_row0 = 64 * wg + 16 * (warp % 4);  // first block-local key row of this warp's accumulators
  float acc_dk[1][kNT_KV][4], acc_dv[1][kNT_KV][4];
  zero_acc(acc_dk);
  zero_acc(acc_dv);

  DqOrderChain dq_chain;  // deterministic mode
  for (int it = 0; it < steps.total; ++it) {
    const int head = steps.head(it, blk.head_kv);
    const int row0 = steps.row0(it);
    const int stage = it & 1;
    cp_async_wait<0>();
    fence_proxy_async_smem();  // cp.async wrote Q/dO (and K/V) through the generic proxy; wgmma reads them
    __syncthreads();           // ... and every warp is done with the previous step's Q/dO stage and dS^T
    if (it + 1 < steps.total) {
      load_q_do(it + 1, stage ^ 1);
      cp_async_commit();
    }
    const uint32_t sQ_s = sQ_u + stage * Kt::kSmemQ;
    const uint32_t sdO_s = sdO_u + stage * Kt::kSmemQ;

    // S^T, dP^T, P^T, dS^T (to shared memory for dQ); dV and dK issued.
    uint32_t p_frag[1][kKSteps][4], ds_frag[1][kKSteps][4];
    bwd_step_dk_dv<Kt, kScoreMod>(p, blk, vis, head, row0, wg, warp, lane, sK_u, sV_u, sQ_s, sdO_s,
                                  sStats + stage * (Kt::kSmemRowStats / 4), sdS, acc_dk, acc_dv, p_frag, ds_frag);

    // dQ (64 x 64 per warpgroup) = dS K over the block's 128 keys: A = dS from dS^T (M-major), B = K (N-major).
    fence_proxy_async_smem();
    __syncthreads();  // both warpgroups' dS^T are in shared memory
    float acc_dq[1][8][4];
    const int dq_row0 = Kt::kDqSplitRows ? 64 * wg : 0;
    const int dq_col0 = Kt::kDqSplitRows ? 0 : 64 * wg;
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
      WgmmaOp<T, 64>::template ss<1, 1>(flat(acc_dq), desc_mn_major<TileDS>(sdS_u, dq_row0 / 64, ks),
                                        desc_mn_major<TileKV>(sK_u, dq_col0 / 64, ks), ks > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_regs(acc_dq);
    fence_regs(acc_dv);
    fence_regs(acc_dk);
    fence_regs(p_frag);  // the A fragments stay untouched until the MMAs reading them are done
    fence_regs(ds_frag);

    const DqOrder order = DqOrder::make<kBlockM>(p, blk, vis, head, row0);
    dq_chain.acquire(order, tid);
    add_dq_tile(p, blk.seq, acc_dq, blk.batch, head, row0, dq_row0, dq_col0, warp, g, t,
                row0 + kBlockM <= blk.seq.seqlen_q && p.head_dim == kHeadDim);
  }
  dq_chain.finish(tid);

  // Epilogue: dK * scale and dV as T through the K / V buffers, then 16-byte stores.
  cp_async_wait<0>();
  __syncthreads();
  store_acc<T, TileKV>(sK, acc_dk, wg_row0, 0, lane, p.scale);
  store_acc<T, TileKV>(sV, acc_dv, wg_row0, 0, lane, dropout_scale(p, kScoreMod));
  __syncthreads();
  store_dk_dv<TileKV, kThreads>(p, blk, sK, sV, tid);
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
