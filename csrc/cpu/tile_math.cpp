#include "cpu/tile_math.h"

#include <ATen/ATen.h>

extern "C" {
// Fortran BLAS (LP64), weak so the library still loads against a torch build without BLAS.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

namespace flash_attn2::cpu {
namespace {

template <typename T>
using BlasFn = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                        const int*, const T*, const int*, const T*, T*, const int*);

// A row-major rows x cols matrix with leading dimension ld as a tensor view (no copy), transposed if asked.
template <typename T>
at::Tensor as_tensor(const T* data, int64_t rows, int64_t cols, int64_t ld, bool transpose) {
  auto t = at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return transpose ? t.t() : t;
}

template <typename T>
void gemm_impl(BlasFn<T> blas, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
               int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS rejects a zero leading dimension; the product is empty
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  if (blas != nullptr) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    blas(&tb, &ta, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  at::Tensor a = trans_a ? as_tensor(A, K, M, lda, true) : as_tensor(A, M, K, lda, false);
  at::Tensor b = trans_b ? as_tensor(B, N, K, ldb, true) : as_tensor(B, K, N, ldb, false);
  at::Tensor c = as_tensor(C, M, N, ldc, false);
  c.mul_(beta).add_(at::mm(a, b), alpha);
}

}  // namespace

void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
             int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  gemm_impl<float>(sgemm_, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, double alpha, const double* A,
             int64_t lda, const double* B, int64_t ldb, double beta, double* C, int64_t ldc) {
  gemm_impl<double>(dgemm_, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace flash_attn2::cpu
