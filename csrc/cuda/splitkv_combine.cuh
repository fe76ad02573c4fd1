// The log-sum-exp merge of one output row's split-KV partials, done by one warp: used by the combine kernel
// (kvcache.cu, one warp per row of the whole output) and by the split-KV kernel's last block of a row tile
// when it folds the combine in (flash_splitkv_kernel.cuh).
#pragma once

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// Row `row` = (b, h, qi) of the (B, Hq, Nq) plane: the LSE over the splits, each split's weight exp(lse_s - lse)
// into s_weight (kMaxSplits floats, this warp's), then O = sum_s weight_s O_s with the split loop unrolled so that
// several partial rows are in flight at once (a split that saw no key has weight 0 and a zero partial, so no
// branch is needed). The partials are read through L2 (ld.global.cg): in the folded combine other blocks wrote
// them during this grid.
template <typename T>
FA2_DEVICE void combine_split_row(const FwdParams& p, index_t row, int b, int h, int qi, int lane, float* s_weight) {
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int splits = p.num_splits;
  float m = -INFINITY;
  for (int s = lane; s < splits; s += 32) m = fmaxf(m, __ldcg(p.lse_accum + s * plane + row));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float l = 0.f;
  for (int s = lane; s < splits; s += 32) {
    const float ls = __ldcg(p.lse_accum + s * plane + row);
    const float e = m == -INFINITY || ls == -INFINITY ? 0.f : __expf(ls - m);
    s_weight[s] = e;
    l += e;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  const bool empty = !(l > 0.f);
  const float lse = empty ? -INFINITY : m + __logf(l);
  if (lane == 0) p.lse[static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + qi] = lse;
  const float inv_l = empty ? 0.f : 1.f / l;
  __syncwarp();

  const int d = p.head_dim;
  T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  const float* partial = p.out_accum + row * d;
  const index_t split_stride = plane * d;
  for (int c = lane * 4; c < d; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = 0; s < splits; ++s) {
      const float w = s_weight[s] * inv_l;
      const float4 x = __ldcg(reinterpret_cast<const float4*>(partial + s * split_stride + c));
      acc.x += w * x.x, acc.y += w * x.y, acc.z += w * x.z, acc.w += w * x.w;
    }
    *reinterpret_cast<uint2*>(out + c) = make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
  }
}

}  // namespace flash_attn2::cuda
