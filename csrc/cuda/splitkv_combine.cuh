// The split-KV combine: merges the num_splits float32 partials (out_accum, lse_accum) of the split-KV forward
// (flash_splitkv_kernel.cuh) into out (T) and lse with the log-sum-exp rule. Instantiated per (T, head dim) beside
// the split-KV kernel (flash_splitkv_launch.cuh), so the row's layout over the threads is known at compile time.
//
// One block per output row (b, h, query): O = sum_s w_s O_s / sum_s w_s, w_s = exp(lse_s - max lse), lse = max +
// log(sum w). It runs once per call after the split-KV grid, one block per row on mostly idle SMs, so its time is
// the latency of one thread's dependent instructions (perf.md v20-v21: ~5 cycles per instruction, one warp per
// scheduler; not memory round trips, not code fetched cold). Hence no division and little 64-bit arithmetic on
// that path: the grid is (query, q head, batch), the row's partials are split over the threads as (4-float chunk
// of the head dim) x (group of splits) with both counts compile-time constants; every warp loads the splits' LSEs
// first and computes the weights itself, and every thread issues a batch of partial loads (kBatch of them, kBatch
// x groups splits: 32 at d128) before the weights are known.
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
  constexpr int kWarps = kSplitKvCombineThreads / 32;
  constexpr int kLsePerLane = kMaxSplits / 32;
  // Splits whose weights the threads take by shuffle: those one batch of loads covers, up to a warp's lanes (32
  // at d64 / d128, 16 at d192-d256, 24 at d160); more go through the per-warp copies and further batches.
  constexpr int kShflSplits = kGroups * kBatch < 32 ? kGroups * kBatch : 32;
  static_assert(kHeadDim % 8 == 0 && kGroups >= 2 && kSplitKvCombineThreads % 32 == 0);
  __shared__ float s_weight[kWarps][kMaxSplits];  // more than 32 splits only: each warp's own copy
  __shared__ float4 s_sum[kGroups * kChunks];
  FA2_TIMELINE(p, 0, timeline_ns());
  FA2_TIMELINE(p, 1, clock64());
  // The next kernel (the next step's split-KV blocks, which prefetch their first key tiles into L2 before their
  // own wait) may launch now (pdl_trigger bit 2, the default) or once this block's partials are visible (bit 4).
  if (p.pdl_trigger & 2) allow_next_grid();
  wait_for_previous_grid();  // launched while the split-KV kernel runs: its partials are visible past here
  if (p.pdl_trigger & 4) allow_next_grid();
  FA2_TIMELINE(p, 2, clock64());
  const int tid = static_cast<int>(threadIdx.x), lane = tid & 31, warp = tid >> 5;
  const int c = tid % kChunks, g = min(tid / kChunks, kGroups - 1);  // threads past kGroups x kChunks: duplicates
  const int qi = static_cast<int>(blockIdx.x);
  const int splits = p.num_splits, d = p.head_dim;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const index_t split_stride = plane * d, group_stride = kGroups * split_stride, lse_stride = 32 * plane;
  // Lanes past the head dim (d < kHeadDim) re-read its last chunk and store nothing.
  const index_t thread_off = min(4 * c, d - 4) + g * split_stride;
  const index_t lane_off = lane * plane;
  // gridDim.y / .z are the heads / the batch up to 65535; beyond, blocks take several (block-uniform loops, so
  // the barriers inside are too).
  for (int b = static_cast<int>(blockIdx.z); b < p.batch; b += static_cast<int>(gridDim.z))
  for (int h = static_cast<int>(blockIdx.y); h < p.heads_q; h += static_cast<int>(gridDim.y)) {
    const index_t row = (static_cast<index_t>(b) * p.heads_q + h) * p.seqlen_q + qi;
    // Every warp reads the splits' LSEs (lane + 32 i) and computes the weights itself: no barrier and no shared
    // memory before the sums where 32 splits or fewer (the rule's counts but for one kv head and long caches).
    // Issued before the partial loads, with the addresses stepped, not multiplied: this path is a chain of
    // dependent instructions at ~5 cycles each (perf.md v21).
    const float* lp = p.lse_accum + row + lane_off;
    float ls[kLsePerLane];
    ls[0] = lane < splits ? __ldcg(lp) : -INFINITY;
#pragma unroll
    for (int i = 1; i < kLsePerLane; ++i) ls[i] = -INFINITY;
    if (splits > 32) {
#pragma unroll
      for (int i = 1; i < kLsePerLane; ++i) {
        lp += lse_stride;
        if (32 * i + lane < splits) ls[i] = __ldcg(lp);
      }
    }
    float4 x[kBatch];
    auto load_batch = [&](const float* ptr, int s_first) {  // splits s_first + kGroups j, none past the last
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        x[j] = s_first + kGroups * j < splits ? __ldcg(reinterpret_cast<const float4*>(ptr))
                                              : make_float4(0.f, 0.f, 0.f, 0.f);
        ptr += group_stride;
      }
    };
    const float* src = p.out_accum + row * d + thread_off;
    load_batch(src, g);

    float m = ls[0];
#pragma unroll
    for (int i = 1; i < kLsePerLane; ++i) m = fmaxf(m, ls[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    FA2_TIMELINE(p, 10, clock64() + (m != m));  // the LSEs landed, their max reduced
    float l = 0.f;
#pragma unroll
    for (int i = 0; i < kLsePerLane; ++i) {
      if (i > 0 && splits <= 32) break;  // block-uniform
      ls[i] = ls[i] == -INFINITY ? 0.f : __expf(ls[i] - m);  // all -inf when m is: no split saw a key
      l += ls[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    const bool empty = !(l > 0.f);
    const float inv_l = empty ? 0.f : __fdividef(1.f, l);  // l >= 1 (the largest LSE has weight 1)
    if (tid == 0)
      p.lse[static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + qi] =
          empty ? -INFINITY : m + __logf(l);
    FA2_TIMELINE(p, 8, clock64() + (l != l));  // weights and their sum

    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    if (splits <= kShflSplits) {  // split s's weight is lane s's ls[0]; x[j] is zero past the last split
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = __shfl_sync(0xffffffffu, ls[0], (g + kGroups * j) & 31);
        acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kLsePerLane; ++i)
        if (32 * i + lane < splits) s_weight[warp][32 * i + lane] = ls[i];
      __syncwarp();
#pragma unroll 1
      for (int s0 = 0; s0 < splits; s0 += kGroups * kBatch) {
        if (s0 > 0) {
          src += kBatch * group_stride;
          load_batch(src, s0 + g);
        }
#pragma unroll
        for (int j = 0; j < kBatch; ++j) {
          const int s = s0 + g + kGroups * j;
          const float w = s < splits ? s_weight[warp][s] : 0.f;
          acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
        }
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
      T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
      *reinterpret_cast<uint2*>(out + 4 * tid) =
          make_uint2(pack2<T>(o.x * inv_l, o.y * inv_l), pack2<T>(o.z * inv_l, o.w * inv_l));
    }
    __syncthreads();  // s_sum (and s_weight) free for the block's next row
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
