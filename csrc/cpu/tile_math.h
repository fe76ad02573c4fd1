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

// 2^t for t <= 0 in float, about 2 ulp, written so the compiler vectorises loops over it: t = n + f with n =
// round(t) (adding 1.5 * 2^23 leaves n in the low mantissa bits), 2^f for f in [-0.5, 0.5] by a degree-5
// polynomial fitted for relative error (1.9e-7 in float arithmetic; c0 = 1 exactly), then n added to the exponent
// field. 12 vector operations; t below -127 (and -inf) give +0, between -127 and -126 a value under 2^-126.
__attribute__((always_inline)) inline float exp2_nonpositive(float t) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  t = std::max(t, -127.0f);
  const float r = t + kRound;
  const float f = t - (r - kRound);
  float p = 0.0013264727f;
  p = p * f + 0.0096715130f;
  p = p * f + 0.055507336f;
  p = p * f + 0.24022242f;
  p = p * f + 0.69314700f;
  p = p * f + 1.0f;
  int32_t pb, rb;
  std::memcpy(&pb, &p, sizeof(pb));
  std::memcpy(&rb, &r, sizeof(rb));
  pb += static_cast<int32_t>(static_cast<uint32_t>(rb) << 23);
  float out;
  std::memcpy(&out, &pb, sizeof(out));
  return out;
}
// exp(x) for x <= 0 in float (exp2_nonpositive of x log2 e). The softmax passes x = s - m, the difference taken
// first: its rounding is relative to s - m, so the scores that dominate a row (s near m) keep full precision
// whatever m's magnitude. Folding the difference into one FMA, s log2 e - m log2 e, carried m log2 e's rounding
// into every score (3e-5 relative at m = 1000; test_tile_math).
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  return exp2_nonpositive(x * 1.44269504088896341f);
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace flash_attn2::cpu
