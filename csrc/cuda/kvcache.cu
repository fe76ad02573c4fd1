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

// One block per output row (b, h, query) of the (B, Hq, Nq) plane: O = sum_s w_s O_s / sum_s w_s with
// w_s = exp(lse_s - max lse), lse = max + log(sum w). Latency bound and run once per call, so shaped for one L2
// round trip: the block's threads split the row's partials as (head-dim chunk of 4 floats) x (group of splits),
// so for up to kBatch x groups splits (32 at d = 128) every thread issues all its partial loads at once, before
// warp 0 has the weights (its LSE loads fly beside them); then each thread weighs its splits, and the groups'
// sums meet in shared memory. Loads past the last split re-read it and weigh 0 (no predicates on the loads).
template <typename T>
__global__ void __launch_bounds__(kSplitKvCombineThreads) splitkv_combine_kernel(const __grid_constant__ FwdParams p) {
  constexpr int kBatch = 8;  // partial loads per thread in flight
  __shared__ float s_weight[kMaxSplits];
  __shared__ float4 s_sum[kSplitKvCombineThreads];
  __shared__ float s_inv_l;
  FA2_TIMELINE(p, 0, timeline_ns());
  FA2_TIMELINE(p, 1, clock64());
  wait_for_previous_grid();  // launched while the split-KV kernel runs: its partials are visible past here
  FA2_TIMELINE(p, 2, clock64());
  const int tid = static_cast<int>(threadIdx.x);
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;
  const unsigned r32 = blockIdx.x;  // the grid is under 2^31 blocks: 32-bit divisions
  const int qi = static_cast<int>(r32 % static_cast<unsigned>(p.seqlen_q));
  const int h = static_cast<int>(r32 / static_cast<unsigned>(p.seqlen_q) % static_cast<unsigned>(p.heads_q));
  const int b = static_cast<int>(r32 / static_cast<unsigned>(p.seqlen_q) / static_cast<unsigned>(p.heads_q));
  const index_t row = r32;
  const int splits = p.num_splits, d = p.head_dim;
  const int chunks = d / 4, groups = kSplitKvCombineThreads / chunks;  // d <= 256: 2 groups at least
  const int c = tid % chunks, g = min(tid / chunks, groups - 1);       // threads past groups * chunks: duplicates
  const index_t split_stride = plane * d;
  const float* partial = p.out_accum + row * d + 4 * c;
  float4 x[kBatch];
  auto load_batch = [&](int s0) {  // splits s0 + g + groups j, j < kBatch
#pragma unroll
    for (int j = 0; j < kBatch; ++j)
      x[j] = __ldcg(reinterpret_cast<const float4*>(
          partial + static_cast<index_t>(min(s0 + g + groups * j, splits - 1)) * split_stride));
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
    const bool empty = !(l > 0.f);
    if (tid == 0) {
      p.lse[static_cast<index_t>(b) * p.stat_batch_stride + static_cast<index_t>(h) * p.stat_head_stride + qi] =
          empty ? -INFINITY : m + __logf(l);
      s_inv_l = empty ? 0.f : 1.f / l;
    }
  }
  __syncthreads();

  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 1
  for (int s0 = 0; s0 < splits; s0 += groups * kBatch) {
    if (s0 > 0) load_batch(s0);
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const int s = s0 + g + groups * j;
      const float w = s < splits ? s_weight[s] : 0.f;
      acc.x += w * x[j].x, acc.y += w * x[j].y, acc.z += w * x[j].z, acc.w += w * x[j].w;
    }
  }
  if (tid < groups * chunks) s_sum[tid] = acc;
  __syncthreads();
  if (tid < chunks) {
    float4 o = s_sum[tid];
    for (int k = 1; k < groups; ++k) {
      const float4 y = s_sum[k * chunks + tid];
      o.x += y.x, o.y += y.y, o.z += y.z, o.w += y.w;
    }
    const float inv_l = s_inv_l;
    T* out = static_cast<T*>(p.out) + row_offset(b, h, qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
    *reinterpret_cast<uint2*>(out + 4 * tid) =
        make_uint2(pack2<T>(o.x * inv_l, o.y * inv_l), pack2<T>(o.z * inv_l, o.w * inv_l));
  }
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
  detail::launch_dependent(&splitkv_combine_kernel<T>, rows, kSplitKvCombineThreads, 0, params, stream);
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
