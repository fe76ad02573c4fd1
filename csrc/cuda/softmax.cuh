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
  template <int NS>
  FA2_DEVICE void update_scores(float (&s)[MT][NS][4], float scale_log2, float (&alpha)[MT][2]) {
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = row_max[mi][h];
#pragma unroll
        for (int ni = 0; ni < NS; ++ni) m = fmaxf(m, fmaxf(s[mi][ni][2 * h], s[mi][ni][2 * h + 1]));
        m = quad_max(m);
        // A row with nothing visible yet keeps max = -inf: use 0 as the offset so exp2(-inf - 0) = 0 instead
        // of exp2(-inf + inf) = NaN.
        const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
        alpha[mi][h] = fast_exp2(row_max[mi][h] * scale_log2 - m_scaled);
        row_max[mi][h] = m;
        float sum = 0.f;
#pragma unroll
        for (int ni = 0; ni < NS; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(s[mi][ni][2 * h + e], scale_log2, -m_scaled));
            s[mi][ni][2 * h + e] = p;
            sum += p;
          }
        row_sum[mi][h] = row_sum[mi][h] * alpha[mi][h] + sum;
      }
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
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[mi][h]);
        const bool empty = !(sum > 0.f);
        const float inv = empty ? 0.f : 1.f / sum;
        lse[mi][h] = empty ? -INFINITY : (row_max[mi][h] * scale_log2 + __log2f(sum)) * kLn2;
#pragma unroll
        for (int ni = 0; ni < NO; ++ni) {
          o[mi][ni][2 * h] *= inv;
          o[mi][ni][2 * h + 1] *= inv;
        }
      }
  }
};

}  // namespace flash_attn2::cuda
