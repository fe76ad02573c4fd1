// Host launcher of the backward pass; explicitly instantiated per (T, head dim) by the generated .cu files.
// Order on `stream`: preprocess (softmax_d) -> main kernel (dK, dV, dq_accum) -> convert (dq).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/cuda_check.cuh"
#include "cuda/flash_bwd_kernel.cuh"
#include "cuda/flash_fwd_launch.cuh"  // detail:: helpers
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"

namespace flash_attn2::cuda {

namespace detail {
// Main backward kernel: one block per (key tile, kv head, batch).
template <class Kt>
void launch_bwd_main(const BwdParams& params, cudaStream_t stream) {
  const int64_t num_n = (params.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  auto kernel = &flash_bwd_kernel<Kt>;
  set_smem_limit(kernel, Kt::kSmemBytes);
  kernel<<<grid_1d(num_n * params.heads_kv * params.batch), Kt::kNThreads, Kt::kSmemBytes, stream>>>(params);
  FA2_CHECK_LAUNCH();
}
}  // namespace detail

template <typename T, int kHeadDim>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream) {
  using Kt = BwdTraits<T, kHeadDim>;
  detail::check_shapes(params, kHeadDim);
  if (params.batch == 0 || params.heads_q == 0) return;
  constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride kernels: enough blocks to fill any GPU

  const int64_t q_rows = static_cast<int64_t>(params.batch) * params.heads_q * params.seqlen_q;
  if (q_rows > 0) {
    using Pre = PreprocessConfig<T, kHeadDim>;
    const int64_t blocks = std::min<int64_t>((q_rows + Pre::kRowsPerBlock - 1) / Pre::kRowsPerBlock, kMaxGrid);
    flash_bwd_preprocess_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(blocks), Pre::kThreads, 0, stream>>>(params);
    FA2_CHECK_LAUNCH();
  }

  // Also runs when seqlen_q == 0: every key tile then writes dK = dV = 0.
  const int64_t num_n = (params.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  const int64_t main_blocks = num_n * params.heads_kv * params.batch;
  if (main_blocks > 0) {
    using KtLow = BwdTraits<T, kHeadDim, true>;
    if constexpr (KtLow::kSmemBytes < Kt::kSmemBytes) {
      // The main configuration needs more shared memory per block than some GPUs allow (sm86 / sm89: 99 KB):
      // use the fallback configuration there.
      int dev = 0, optin = 0;
      FA2_CUDA_CHECK(cudaGetDevice(&dev));
      FA2_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
      if (optin < Kt::kSmemBytes) detail::launch_bwd_main<KtLow>(params, stream);
      else detail::launch_bwd_main<Kt>(params, stream);
    } else {
      detail::launch_bwd_main<Kt>(params, stream);
    }
  }

  if (q_rows > 0) {
    const int64_t chunks = q_rows * (params.head_dim / 8);
    const int64_t blocks = std::min<int64_t>((chunks + 255) / 256, kMaxGrid);
    flash_bwd_convert_dq_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(params);
    FA2_CHECK_LAUNCH();
  }
}

}  // namespace flash_attn2::cuda
