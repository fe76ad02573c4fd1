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
// into s_weight (kMaxSplits floats, this warp's), then O = sum_s weight_s O_s. Latency bound (the partials sit in
// L2), so it is written for few round trips: the first kBatch partial rows are loaded before the weights are
// known, every lane loads its splits' LSEs at once (lane + 32 i), and the partial rows come kBatch at a time (a
// split that saw no key has weight 0 and a zero partial, so no branch is needed). The partials are read
// through L2 (ld.global.cg): in the folded combine other blocks wrote them during this grid.
template <typename T>
FA2_DEVICE void combine_split_row(const FwdParams& p, index_t row, int b, int h, int qi, int lane, float* s_weight) {
  constexpr int kBatch = 16, kLsePerLane = kMaxSplits / 32;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int splits = p.num_splits, d = p.head_dim;
  const float* partial = p.out_accum + row * d;
  const index_t split_stride = plane * d;
  float4 x[kBatch];
  auto load_batch = [&](int s0, int c) {
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      x[j] = s0 + j < splits && c < d ? __ldcg(reinterpret_cast<const float4*>(partial + (s0 + j) * split_stride + c))
                                      : make_float4(0.f, 0.f, 0.f, 0.f);
  };
  load_batch(0, lane * 4);

  __syncwarp();  // the warp's previous row (folded combine) is done reading s_weight
  float ls[kLsePerLane];
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kLsePerLane; ++i) {
    const int s = lane + 32 * i;
    ls[i] = s < splits ? __ldcg(p.lse_accum + s * plane + row) : -INFINITY;
    m = fmaxf(m, ls[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float l = 0.f;
#pragma unroll
  for (int i = 0; i < kLsePerLane; ++i) {
    const int s = lane + 32 * i;
    const float e = m == -INFINITY || ls[i] == -INFINITY ? 0.f : __expf(ls[i] - m);
    if (s < splits) s_weight[s] = e;
    l += e;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
  const bool empty = !(l > 0.f);
  const float lse = empty ? -INFINITY : m + __logf(l);
  if (lane == 0) p.lse[static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + qi] = lse;
  const float inv_l = empty ? 0.f : 1.f / l;
  __syncwarp();

  T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  for (int c = lane * 4; c < d; c += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s0 = 0; s0 < splits; s0 += kBatch) {
      if (s0 > 0 || c != lane * 4) load_batch(s0, c);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = s0 + j < splits ? s_weight[s0 + j] * inv_l : 0.f;
        acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
      }
    }
    *reinterpret_cast<uint2*>(out + c) = make_uint2(pack2<T>(acc.x, acc.y), pack2<T>(acc.z, acc.w));
  }
}

}  // namespace flash_attn2::cuda
