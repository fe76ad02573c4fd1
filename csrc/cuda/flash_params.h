// The contract between the PyTorch-facing launcher (attention_cuda.cpp) and the CUDA kernels.
// Kernels see only raw pointers, element strides and sizes: no ATen types, so the .cu files compile fast.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace flash_attn2::cuda {

using index_t = int64_t;

// Q is (B, Hq, Nq, d), K and V are (B, Hkv, Nk, d), O is (B, Hq, Nq, d); strides are in elements and the
// last dimension is contiguous. Every row start is 16-byte aligned (the launcher copies tensors that are not).
// Head h of Q reads K/V head h / (Hq / Hkv) (GQA/MQA).
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, Hq, Nq) contiguous, natural-log units; -inf for a row that sees no key.

  index_t q_batch_stride, q_head_stride, q_row_stride;
  index_t k_batch_stride, k_head_stride, k_row_stride;
  index_t v_batch_stride, v_head_stride, v_row_stride;
  index_t o_batch_stride, o_head_stride, o_row_stride;

  int batch;
  int heads_q;
  int heads_kv;
  int seqlen_q;
  int seqlen_k;
  int head_dim;  // the real d: a multiple of 8, at most the kernel's compiled head dim (the rest is padding).

  float scale;       // softmax scale applied to Q.K^T
  float scale_log2;  // scale * log2(e), for exp2

  // Key j is visible to query i iff j <= i + (seqlen_k - seqlen_q) (bottom-right alignment).
  bool causal;
  bool is_bf16;  // else fp16
};

struct BwdParams : FwdParams {
  const void* dout;  // (B, Hq, Nq, d), same rules as Q
  index_t do_batch_stride, do_head_stride, do_row_stride;

  void* dq;  // (B, Hq, Nq, d)
  void* dk;  // (B, Hkv, Nk, d)
  void* dv;  // (B, Hkv, Nk, d)
  index_t dq_batch_stride, dq_head_stride, dq_row_stride;
  index_t dk_batch_stride, dk_head_stride, dk_row_stride;
  index_t dv_batch_stride, dv_head_stride, dv_row_stride;

  // Workspaces allocated by the launcher, contiguous float32:
  float* dq_accum;    // (B, Hq, Nq, head_dim), zero-filled by the launcher before the kernels run.
  float* softmax_d;   // (B, Hq, Nq): rowsum(dO * O), written by the preprocessing kernel.
};

// Implemented once per (element type, compiled head dim) in the generated .cu files.
// T is cutlass-free: __half or __nv_bfloat16.
template <typename T, int kHeadDim>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream);

template <typename T, int kHeadDim>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace flash_attn2::cuda
