// The in-place append of new keys / values into a KV cache, before the split-KV forward on the same stream (the
// combine after it is splitkv_combine.cuh, instantiated beside the split-KV kernel).
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

void run_kvcache_append(const FwdParams& cache, const AppendParams& append, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(cache.batch) * cache.heads_kv * append.seqlen_new * (cache.head_dim / 8);
  if (total == 0) return;
  constexpr int kThreads = 256;
  kvcache_append_kernel<<<detail::grid_1d((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(cache, append);
  FA2_CHECK_LAUNCH();
}

}  // namespace flash_attn2::cuda
