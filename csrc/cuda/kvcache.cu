// The two small kernels around the split-KV forward: the in-place append of new keys / values into a KV cache
// (before the attention, same stream), and the combine that merges the splits' float32 partials with the
// log-sum-exp rule (after it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/cuda_check.cuh"
#include "cuda/flash_fwd_launch.cuh"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {
namespace {

// Row `row` = (b, h, qi) of the (B, Hq, Nq) plane: the LSE over the splits, each split's weight exp(lse_s - lse)
// into s_weight (kMaxSplits floats, this warp's), then O = sum_s weight_s O_s. Latency bound, and run once per
// call, so written for few round trips to L2 and little code (a call's combine starts with its code cold): the
// first kBatch partial rows are loaded before the weights are known, the LSEs one load per lane per 32 splits,
// then the partial rows kBatch at a time, without predicates: loads past the last split re-read it and weigh 0,
// lanes past the head dim re-read its last columns and store nothing (a split that saw no key has weight 0 and
// a zero partial, so no branch is needed either).
template <typename T>
FA2_DEVICE void combine_split_row(const FwdParams& p, index_t row, int b, int h, int qi, int lane, float* s_weight) {
  constexpr int kBatch = 16;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const int splits = p.num_splits, d = p.head_dim;
  const index_t split_stride = plane * d;
  const float* partial = p.out_accum + row * d;
  float4 x[kBatch];
  auto load_batch = [&](int s0, int col) {  // partial rows s0 .. s0 + kBatch - 1, this lane's columns in [col, +128)
    const float* src = partial + min(lane * 4 + col, d - 4);
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      x[j] = __ldcg(reinterpret_cast<const float4*>(src + static_cast<index_t>(min(s0 + j, splits - 1)) * split_stride));
  };
  load_batch(0, 0);

  const int padded = (splits + kBatch - 1) / kBatch * kBatch;
  float m = -INFINITY;  // the raw LSEs into s_weight first (each lane its own splits), then the weights in place
#pragma unroll 1
  for (int s = lane; s < splits; s += 32) {
    const float ls = __ldcg(p.lse_accum + s * plane + row);
    s_weight[s] = ls;
    m = fmaxf(m, ls);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  float l = 0.f;
#pragma unroll 1
  for (int s = lane; s < padded; s += 32) {
    const float ls = s < splits ? s_weight[s] : -INFINITY;
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

  T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
#pragma unroll 1
  for (int col = 0; col < d; col += 128) {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
    for (int s0 = 0; s0 < splits; s0 += kBatch) {
      if (s0 > 0 || col > 0) load_batch(s0, col);
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const float w = s_weight[s0 + j];
        acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
      }
    }
    if (lane * 4 + col < d)
      *reinterpret_cast<uint2*>(out + lane * 4 + col) =
          make_uint2(pack2<T>(acc.x * inv_l, acc.y * inv_l), pack2<T>(acc.z * inv_l, acc.w * inv_l));
  }
}

// One warp per output row (b, h, query).
template <typename T>
__global__ void __launch_bounds__(kSplitKvCombineWarps * 32) splitkv_combine_kernel(const __grid_constant__ FwdParams p) {
  __shared__ float s_weight[kSplitKvCombineWarps][kMaxSplits];
  FA2_TIMELINE(p, 0, timeline_ns());
  FA2_TIMELINE(p, 1, clock64());
  wait_for_previous_grid();  // launched while the split-KV kernel runs: its partials are visible past here
  FA2_TIMELINE(p, 2, clock64());
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const index_t row = static_cast<index_t>(blockIdx.x) * kSplitKvCombineWarps + warp;
  if (row >= plane) return;
  const int qi = static_cast<int>(row % p.seqlen_q);
  const int h = static_cast<int>((row / p.seqlen_q) % p.heads_q);
  const int b = static_cast<int>(row / p.seqlen_q / p.heads_q);
  combine_split_row<T>(p, row, b, h, qi, lane, s_weight[warp]);
  FA2_TIMELINE(p, 5, clock64());
  FA2_TIMELINE(p, 6, timeline_ns());
  FA2_TIMELINE(p, 7, timeline_smid());
}

// One thread per 16-byte chunk of a new row: k_new / v_new row n of (b, kv head) goes to cache row
// cache_seqlens[b] + n (skipped past the capacity; pages looked up and clamped as in the attention kernel).
__global__ void kvcache_append_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ AppendParams a) {
  const int chunks = p.head_dim / 8;
  const index_t idx = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t total = static_cast<index_t>(p.batch) * p.heads_kv * a.seqlen_new * chunks;
  if (idx >= total) return;
  const int ch = static_cast<int>(idx % chunks);
  const int n = static_cast<int>((idx / chunks) % a.seqlen_new);
  const int hk = static_cast<int>((idx / chunks / a.seqlen_new) % p.heads_kv);
  const int b = static_cast<int>(idx / chunks / a.seqlen_new / p.heads_kv);
  const int start = min(max(p.cache_seqlens[b], 0), p.seqlen_k);
  const int key = start + n;
  if (key >= p.seqlen_k) return;
  index_t k_off, v_off;
  if (p.block_table == nullptr) {
    k_off = row_offset(b, hk, key, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
    v_off = row_offset(b, hk, key, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  } else {
    int page = p.block_table[static_cast<index_t>(b) * p.block_table_batch_stride + (key >> p.page_size_log2)];
    page = min(max(page, 0), p.num_pages - 1);
    const int in_page = key & ((1 << p.page_size_log2) - 1);
    k_off = row_offset(page, hk, in_page, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
    v_off = row_offset(page, hk, in_page, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  }
  using Chunk = uint4;  // 8 elements of 2 bytes
  const auto* kn = static_cast<const uint16_t*>(a.k_new) + row_offset(b, hk, n, a.kn_batch_stride, a.kn_head_stride, a.kn_row_stride);
  const auto* vn = static_cast<const uint16_t*>(a.v_new) + row_offset(b, hk, n, a.vn_batch_stride, a.vn_head_stride, a.vn_row_stride);
  *reinterpret_cast<Chunk*>(static_cast<uint16_t*>(const_cast<void*>(p.k)) + k_off + ch * 8) =
      *reinterpret_cast<const Chunk*>(kn + ch * 8);
  *reinterpret_cast<Chunk*>(static_cast<uint16_t*>(const_cast<void*>(p.v)) + v_off + ch * 8) =
      *reinterpret_cast<const Chunk*>(vn + ch * 8);
}

}  // namespace

template <typename T>
void run_splitkv_combine(const FwdParams& params, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q;
  if (rows == 0) return;
  detail::launch_dependent(&splitkv_combine_kernel<T>, (rows + kSplitKvCombineWarps - 1) / kSplitKvCombineWarps,
                           kSplitKvCombineWarps * 32, 0, params, stream);
}
template void run_splitkv_combine<__half>(const FwdParams&, cudaStream_t);
template void run_splitkv_combine<__nv_bfloat16>(const FwdParams&, cudaStream_t);

void run_kvcache_append(const FwdParams& cache, const AppendParams& append, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(cache.batch) * cache.heads_kv * append.seqlen_new * (cache.head_dim / 8);
  if (total == 0) return;
  constexpr int kThreads = 256;
  kvcache_append_kernel<<<detail::grid_1d((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(cache, append);
  FA2_CHECK_LAUNCH();
}

}  // namespace flash_attn2::cuda
