// Small tile primitives for the CPU kernel, so attention_cpu.cpp reads like the FlashAttention algorithm:
// row-major GEMMs on packed tiles (through ATen's BLAS), tile packing with upcast, and a vectorisable exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace flash_attn2::cpu {

// C[M x N] = alpha * op(A) * op(B) + beta * C, all row-major with leading dimensions lda, ldb, ldc.
// op(A) is M x K. Column-major BLAS computes C^T = op(B)^T op(A)^T instead. We call the Fortran BLAS that
// libtorch_cpu exports (MKL in the x86-64 wheels); where a torch build has none, ATen's mm is the fallback.
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
             int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc);

// Copies rows [row0, row0 + rows) of one (N, D) head, with arbitrary strides, into a dense rows x D tile,
// converting to the accumulation type.
template <typename scalar_t, typename acc_t>
inline void pack_rows(const scalar_t* head, int64_t row_stride, int64_t col_stride, int64_t row0, int64_t rows,
                      int64_t D, acc_t* tile) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = head + (row0 + r) * row_stride;
    acc_t* dst = tile + r * D;
    if (col_stride == 1) {
      for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<acc_t>(src[c]);
    } else {
      for (int64_t c = 0; c < D; ++c) dst[c] = static_cast<acc_t>(src[c * col_stride]);
    }
  }
}

// exp(x) for x <= 0 in float, about 2 ulp, written so the compiler vectorises loops over it: 2^n from the
// exponent bits times a degree-6 polynomial for 2^f, f in [-0.5, 0.5]. Inputs below -87 (and -inf) give 0.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  const float t = std::max(x * kLog2e, -126.0f);
  // Round to nearest by adding and removing 1.5 * 2^23: plain SSE2, so the loop vectorises on any x86-64.
  const float n = (t + 12582912.0f) - 12582912.0f;
  const float f = (t - n) * 0.693147180559945309f;  // e^f with |f| <= ln2/2
  float p = 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace flash_attn2::cpu
