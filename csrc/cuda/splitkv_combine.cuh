// The split-KV combine: merges the num_splits float32 partials (out_accum, lse_accum) of the split-KV forward
// (flash_splitkv_kernel.cuh) into out (T) and lse with the log-sum-exp rule. Instantiated per (T, head dim) beside
// the split-KV kernel (flash_splitkv_launch.cuh), so the row's layout over the threads is known at compile time.
//
// One block per output row (b, h, query): O = sum_s w_s O_s / sum_s w_s, w_s = exp(lse_s - max lse), lse = max +
// log(sum w). It runs once per call after the split-KV grid, one block per row on mostly idle SMs, so its time is
// the latency of one thread's dependent instructions (perf.md v20: ~5 cycles per instruction, one warp per
// scheduler; not memory round trips, not code fetched cold). Hence no division and little 64-bit arithmetic on
// that path: the grid is (query, q head, batch), the row's partials are split over the threads as (4-float chunk
// of the head dim) x (group of splits) with both counts compile-time constants, and every thread issues all its
// partial loads at once (kBatch of them, up to kBatch x groups splits: 32 at d128) before warp 0 has the weights.
#pragma once

#include <cmath>

#include "cuda/flash_fwd_launch.cuh"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kSplitKvCombineThreads) splitkv_combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr int kChunks = kHeadDim / 4;                         // 4-float chunks of a row
  constexpr int kGroups = kSplitKvCombineThreads / kChunks;     // groups of splits (2 at d256, 4 at d128)
  constexpr int kBatch = 8;                                     // partial loads per thread in flight
  static_assert(kHeadDim % 8 == 0 && kGroups >= 2);
  __shared__ float s_weight[kMaxSplits];
  __shared__ float4 s_sum[kGroups * kChunks];
  __shared__ float s_inv_l;
  FA2_TIMELINE(p, 0, timeline_ns());
  FA2_TIMELINE(p, 1, clock64());
  wait_for_previous_grid();  // launched while the split-KV kernel runs: its partials are visible past here
  FA2_TIMELINE(p, 2, clock64());
  const int tid = static_cast<int>(threadIdx.x);
  const int c = tid % kChunks, g = min(tid / kChunks, kGroups - 1);  // threads past kGroups x kChunks: duplicates
  const int qi = static_cast<int>(blockIdx.x);
  const int splits = p.num_splits, d = p.head_dim;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const index_t split_stride = plane * d, group_stride = kGroups * split_stride;
  // gridDim.y / .z are the heads / the batch up to 65535; beyond, blocks take several (block-uniform loops, so
  // the barriers inside are too).
  for (int b = static_cast<int>(blockIdx.z); b < p.batch; b += static_cast<int>(gridDim.z))
  for (int h = static_cast<int>(blockIdx.y); h < p.heads_q; h += static_cast<int>(gridDim.y)) {
    const index_t row = (static_cast<index_t>(b) * p.heads_q + h) * p.seqlen_q + qi;
    // Lanes past the head dim (d < kHeadDim) re-read its last chunk and store nothing.
    const float* src = p.out_accum + row * d + min(4 * c, d - 4) + g * split_stride;
    float4 x[kBatch];
    auto load_batch = [&](int s0) {  // splits s0 + g + kGroups j, j < kBatch; none past the last
#pragma unroll
      for (int j = 0; j < kBatch; ++j)
        x[j] = s0 + g + kGroups * j < splits
                   ? __ldcg(reinterpret_cast<const float4*>(src + (s0 / kGroups + j) * group_stride))
                   : make_float4(0.f, 0.f, 0.f, 0.f);
    };
    load_batch(0);

    if (tid < 32) {  // warp 0: the weights and the LSE
      float m = -INFINITY;
#pragma unroll 1
      for (int s = tid; s < splits; s += 32) {
        const float ls = __ldcg(p.lse_accum + s * plane + row);
        s_weight[s] = ls;
        m = fmaxf(m, ls);
      }
      FA2_TIMELINE(p, 10, clock64());  // thread 0's LSE loads landed (its shared-memory stores waited for them)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float l = 0.f;
#pragma unroll 1
      for (int s = tid; s < splits; s += 32) {
        const float ls = s_weight[s];
        const float e = m == -INFINITY || ls == -INFINITY ? 0.f : __expf(ls - m);
        s_weight[s] = e;
        l += e;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
      FA2_TIMELINE(p, 11, clock64() + (l != l));  // max, weights and their sum reduced across the warp
      const bool empty = !(l > 0.f);
      if (tid == 0) {
        p.lse[static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + qi] =
            empty ? -INFINITY : m + __logf(l);
        s_inv_l = empty ? 0.f : __frcp_rn(l);
      }
    }
    __syncthreads();  // the weights
    FA2_TIMELINE(p, 8, clock64());

    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
    for (int s0 = 0; s0 < splits; s0 += kGroups * kBatch) {
      if (s0 > 0) load_batch(s0);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int s = s0 + g + kGroups * j;
        const float w = s < splits ? s_weight[s] : 0.f;
        acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
      }
    }
    if (tid < kGroups * kChunks) s_sum[tid] = acc;
    __syncthreads();  // the groups' sums
    FA2_TIMELINE(p, 9, clock64());
    if (tid < kChunks && 4 * tid < d) {
      float4 o = s_sum[tid];
#pragma unroll
      for (int k = 1; k < kGroups; ++k) {
        const float4 y = s_sum[k * kChunks + tid];
        o.x += y.x, o.y += y.y, o.z += y.z, o.w += y.w;
      }
      const float inv_l = s_inv_l;
      T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
      *reinterpret_cast<uint2*>(out + 4 * tid) =
          make_uint2(pack2<T>(o.x * inv_l, o.y * inv_l), pack2<T>(o.z * inv_l, o.w * inv_l));
    }
    __syncthreads();  // s_weight, s_sum and s_inv_l free for the block's next row
  }
  FA2_TIMELINE(p, 5, clock64());
  FA2_TIMELINE(p, 6, timeline_ns());
  FA2_TIMELINE(p, 7, timeline_smid());
}

// Grid (query, q head up to 65535, batch up to 65535), kSplitKvCombineThreads threads per block; PDL launch
// after the split-KV kernel.
template <typename T, int kHeadDim>
void run_splitkv_combine(const FwdParams& params, cudaStream_t stream) {
  if (static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q == 0) return;
  const dim3 grid(detail::grid_1d(params.seqlen_q), static_cast<unsigned>(params.heads_q < 65535 ? params.heads_q : 65535),
                  static_cast<unsigned>(params.batch < 65535 ? params.batch : 65535));
  detail::launch_dependent(&splitkv_combine_kernel<T, kHeadDim>, grid, kSplitKvCombineThreads, 0, params, stream);
}

}  // namespace flash_attn2::cuda
