// Host launcher of the forward kernel; explicitly instantiated per (T, head dim) by the generated .cu files.
#pragma once

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/cuda_check.cuh"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"

namespace flash_attn2::cuda {

namespace detail {
inline void check_shapes(const FwdParams& p, int compiled_head_dim) {
  if (p.batch < 0 || p.heads_q < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.heads_kv <= 0 ||
      p.heads_q % p.heads_kv != 0 || p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > compiled_head_dim) {
    throw std::invalid_argument("flash_attn2: invalid shapes for the CUDA kernel (head_dim " +
                                std::to_string(p.head_dim) + ", compiled " + std::to_string(compiled_head_dim) +
                                ", heads " + std::to_string(p.heads_q) + "/" + std::to_string(p.heads_kv) + ")");
  }
}

inline unsigned grid_1d(int64_t blocks) {
  if (blocks > INT_MAX) throw std::invalid_argument("flash_attn2: problem too large (grid exceeds 2^31-1 blocks)");
  return static_cast<unsigned>(blocks);
}

template <class Kernel>
inline void set_smem_limit(Kernel kernel, int smem_bytes) {
  if (smem_bytes > 48 * 1024)
    FA2_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
}
}  // namespace detail

template <typename T, int kHeadDim>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Kt = FwdTraits<T, kHeadDim>;
  detail::check_shapes(params, kHeadDim);
  if (params.batch == 0 || params.heads_q == 0 || params.seqlen_q == 0) return;
  const int64_t num_m = (params.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM;
  const unsigned grid = detail::grid_1d(num_m * params.heads_q * params.batch);
  auto kernel = &flash_fwd_kernel<Kt>;
  detail::set_smem_limit(kernel, Kt::kSmemBytes);
  kernel<<<grid, Kt::kNThreads, Kt::kSmemBytes, stream>>>(params);
  FA2_CHECK_LAUNCH();
}

}  // namespace flash_attn2::cuda
