// Online softmax over the rows of mma C fragments held in registers (FlashAttention-2 forward).
// Each thread owns rows g and g+8 of every m16 tile; a row's values are spread over the 4 lanes of a quad.
#pragma once

#include <cmath>

#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

template <int MT>
struct OnlineSoftmax {
  float row_max[MT][2];  // running max of raw scores (unscaled), -inf while the row has seen no key
  float row_sum[MT][2];  // this thread's partial sum of exp2(s*scale_log2 - max*scale_log2)

  FA2_DEVICE OnlineSoftmax() {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[mi][h] = -INFINITY;
        row_sum[mi][h] = 0.f;
      }
  }

  // Folds a new score tile s into the running state: updates the max, rescales the output accumulator o and
  // the sums, and overwrites s with P = exp2(s*scale_log2 - max*scale_log2). Assumes scale_log2 > 0.
  template <int NS, int NO>
  FA2_DEVICE void update(float (&s)[MT][NS][4], float (&o)[MT][NO][4], float scale_log2) {
    float alpha[MT][2];
    update_scores(s, scale_log2, alpha);
    rescale(o, alpha);
  }

  // update() without touching o: returns the factor alpha each row's o must be multiplied by, so that a kernel
  // can overlap this softmax with an MMA still accumulating into o and rescale once that MMA is done.
  //
  // kSlackLog2 > 0: a lazy running max (FlashAttention-4's conditional rescaling). A row's max, the offset of
  // its P = exp2(s scale_log2 - max scale_log2), moves only when a new score exceeds it by more than
  // 2^kSlackLog2 in P, so that most tiles leave alpha = 1 and O need not be rescaled (rescale_if_needed). P then
  // stays below 2^kSlackLog2 (256 at 8: finite in bf16 and fp16 alike, rounded as relatively as P <= 1 is), and
  // the LSE and the final division use the same offset as P did. kSlackLog2 = 0 moves it whenever it grows.
  //
  // kTree: the row's max as a tree (depth log2 NS + 1) instead of a chain through every score, and its sum in two
  // chains (exp2_row): the exps cannot start before the max. Measured per kernel on an H200 (perf.md v31): the d64
  // WS forward 1.02-1.06x on plain rows, whose three consumers share each SMSP's MUFU pipe; the d128 one
  // 0.95-0.99x, d256 0.95-1.03x, so only d64 takes it.
  //
  // kRowsTogether: every row's maximum first, then all their quad shuffles side by side, then each row's exps
  // (FlashAttention-4's order; the WS forward, perf.md v33), instead of row by row.
  template <int kSlackLog2 = 0, bool kTree = false, bool kRowsTogether = false, int NS>
  FA2_DEVICE void update_scores(float (&s)[MT][NS][4], float scale_log2, float (&alpha)[MT][2]) {
    if constexpr (kRowsTogether) {
      // Both rows' maxima first, then their quad shuffles side by side (two shuffle latencies on the path to the
      // first exp, not four), then each row's exps.
      float m[MT][2];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) m[mi][h] = local_max<kTree>(s, mi, h, row_max[mi][h]);
      quad_reduce_rows<true>(m);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) fold_row<kSlackLog2, kTree>(s, mi, h, m[mi][h], scale_log2, alpha);
    } else {
#pragma unroll
      for (int mi = 0; mi < MT; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          fold_row<kSlackLog2, kTree>(s, mi, h, quad_max(local_max<kTree>(s, mi, h, row_max[mi][h])), scale_log2,
                                      alpha);
    }
  }

  // This thread's max of row h of m16 tile mi of s and m0. kTree: as a tree (the max is exact in any order).
  template <bool kTree, int NS>
  FA2_DEVICE static float local_max(const float (&s)[MT][NS][4], int mi, int h, float m0) {
    if constexpr (kTree) {
      float mx[NS];
#pragma unroll
      for (int ni = 0; ni < NS; ++ni) mx[ni] = fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]);
#pragma unroll
      for (int w = 1; w < NS; w *= 2)
#pragma unroll
        for (int i = 0; i + w < NS; i += 2 * w) mx[i] = fmaxf(mx[i], mx[i + w]);
      return fmaxf(m0, mx[0]);
    } else {
      float m = m0;
#pragma unroll
      for (int ni = 0; ni < NS; ++ni) m = fmaxf(m, fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]));
      return m;
    }
  }

  // Row h of m16 tile mi, given its new max m over the quad (and the old max): alpha, the max kept, P in place of
  // s and the running sum.
  template <int kSlackLog2, bool kTree, int NS>
  FA2_DEVICE void fold_row(float (&s)[MT][NS][4], int mi, int h, float m, float scale_log2, float (&alpha)[MT][2]) {
    const float m_old = row_max[mi][h];
    // -inf - -inf is NaN: false, the row keeps -inf; a first finite max gives +inf: true.
    const bool move = (m - m_old) * scale_log2 > static_cast<float>(kSlackLog2);
    alpha[mi][h] = move ? fast_exp2((m_old - m) * scale_log2) : 1.f;  // exp2(-inf) = 0: O and sums were 0
    if (move) row_max[mi][h] = m;
    const float m_scaled = row_max[mi][h] == -INFINITY ? 0.f : row_max[mi][h] * scale_log2;
    row_sum[mi][h] = row_sum[mi][h] * alpha[mi][h] + exp2_row<kTree>(s, mi, h, scale_log2, m_scaled);
  }

  // Ends ptxas's instruction block once every P of the last update is computed (issue_boundary in
  // tile_primitives.cuh): a wgmma_wait placed after this call then waits after the softmax, not before it.
  FA2_DEVICE void issue_boundary() const {
    float v = 0.f;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) v += row_sum[mi][0] + row_sum[mi][1];
    cuda::issue_boundary(v);
  }

  // P = exp2(s * scale_log2 - offset_log2) in place of s, against an offset fixed for the whole row instead of
  // its running max: for scores bounded above and below (a softcap without ALiBi, in units where the bound is
  // +-1), whose P over the whole range stay normal floats with the offset the launcher picks. No max, no
  // quad shuffles, nothing to rescale. Masked scores (-inf) give P = 0. finalize_at(o, offset_log2) ends it.
  template <int NS>
  FA2_DEVICE void update_scores_fixed(float (&s)[MT][NS][4], float scale_log2, float offset_log2) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) row_sum[mi][h] += exp2_row<false>(s, mi, h, scale_log2, offset_log2);
  }

  // Row h of m16 tile mi of s into P = exp2(s * scale_log2 - offset_log2) in place (-inf gives 0); returns this
  // thread's sum of the row's P. The step both update_scores forms share. kTwoChains: the two columns of each
  // pair summed apart (two chains of NS adds, not one of 2 NS).
  template <bool kTwoChains, int NS>
  FA2_DEVICE static float exp2_row(float (&s)[MT][NS][4], int mi, int h, float scale_log2, float offset_log2) {
    float sum[2] = {0.f, 0.f};
#pragma unroll
    for (int ni = 0; ni < NS; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float p = fast_exp2(fmaf(s[mi][ni][2 * h + e], scale_log2, -offset_log2));
        s[mi][ni][2 * h + e] = p;
        sum[kTwoChains ? e : 0] += p;
      }
    return kTwoChains ? sum[0] + sum[1] : sum[0];
  }

  // rescale(o, alpha), skipped when no row of the warp has alpha != 1 (all lanes of the warp must call it).
  template <int NO>
  FA2_DEVICE static void rescale_if_needed(float (&o)[MT][NO][4], const float (&alpha)[MT][2]) {
    bool needed = false;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) needed |= alpha[mi][0] != 1.f || alpha[mi][1] != 1.f;
    if (__any_sync(0xffffffffu, needed)) rescale(o, alpha);
  }

  template <int NO>
  FA2_DEVICE static void rescale(float (&o)[MT][NO][4], const float (&alpha)[MT][2]) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int ni = 0; ni < NO; ++ni) {
          o[mi][ni][2 * h] *= alpha[mi][h];
          o[mi][ni][2 * h + 1] *= alpha[mi][h];
        }
  }

  // Divides o by the row sums and returns the natural-log LSE per row; a row that saw no key gets
  // o = 0 and lse = -inf.
  template <int NO>
  FA2_DEVICE void finalize(float (&o)[MT][NO][4], float scale_log2, float (&lse)[MT][2]) {
    float offset[MT][2];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) offset[mi][h] = row_max[mi][h] * scale_log2;
    finalize_at(o, offset, lse);
  }

  // finalize() for P taken as exp2(... - offset_log2[mi][h]) (update_scores_fixed: the same offset for all rows).
  // Every row's quad shuffles side by side, then a reciprocal without IEEE division's slow-path branch (a sum is
  // 0 for a row that saw no key, else at least 1 under the running max and at least 2^-102 against the softcap's
  // fixed offset: normal floats, whose approximate reciprocal is within an ulp): the rows' dependent chains
  // (shuffles, reciprocal, log) overlap instead of running one after the other, and no call to the division's
  // slow path is left (the WS forward's finalize 690 -> 350 cycles a tile, perf.md v33).
  template <int NO>
  FA2_DEVICE void finalize_at(float (&o)[MT][NO][4], const float (&offset_log2)[MT][2], float (&lse)[MT][2]) {
    constexpr float kLn2 = 0.6931471805599453f;
    float sum[MT][2];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) sum[mi][h] = row_sum[mi][h];
    quad_reduce_rows<false>(sum);
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool empty = !(sum[mi][h] > 0.f);
        const float inv = empty ? 0.f : fast_rcp(sum[mi][h]);
        lse[mi][h] = empty ? -INFINITY : (offset_log2[mi][h] + __log2f(sum[mi][h])) * kLn2;
#pragma unroll
        for (int ni = 0; ni < NO; ++ni) {
          o[mi][ni][2 * h] *= inv;
          o[mi][ni][2 * h + 1] *= inv;
        }
      }
  }
};

}  // namespace flash_attn2::cuda
