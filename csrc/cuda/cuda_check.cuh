// Host-side CUDA error checking: every runtime call and every launch goes through these.
#pragma once

#include <cuda_runtime.h>
#include <stdexcept>
#include <string>

namespace flash_attn2::cuda::detail {
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  throw std::runtime_error(std::string("CUDA error at ") + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorString(err) + " (" + expr + ")");
}
}  // namespace flash_attn2::cuda::detail

#define FA2_CUDA_CHECK(expr)                                                            \
  do {                                                                                  \
    const cudaError_t fa2_err_ = (expr);                                                \
    if (fa2_err_ != cudaSuccess) {                                                      \
      ::flash_attn2::cuda::detail::throw_cuda_error(fa2_err_, #expr, __FILE__, __LINE__); \
    }                                                                                   \
  } while (0)

// After a <<<...>>> launch: catches bad configurations (too much smem, too many blocks, ...).
#define FA2_CHECK_LAUNCH() FA2_CUDA_CHECK(cudaGetLastError())
