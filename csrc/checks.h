// Input validation shared by every backend (CPU, CUDA, Meta), so each op reports bad input the same way
// whichever device it runs on, and FakeTensor tracing fails with the same message as eager mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

namespace flash_attn2 {

// Sizes are SymInts so the Meta kernels can check symbolic (dynamic-shape) tensors; the device kernels
// take concrete() of them.
struct AttentionShape {
  c10::SymInt batch;
  c10::SymInt heads_q;
  c10::SymInt heads_kv;
  c10::SymInt seqlen_q;
  c10::SymInt seqlen_k;
  c10::SymInt head_dim;
};

struct ConcreteShape {
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
};
ConcreteShape concrete(const AttentionShape& s);

// Checks q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D): defined, rank 4, one dtype, one device, matching sizes,
// Hq divisible by Hkv, and a finite positive scale if one is given. `op` names the op in error messages.
AttentionShape check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, std::optional<double> scale);

// The forward checks plus dout and out shaped like q in q's dtype, and lse (B, Hq, Nq) in lse_dtype.
AttentionShape check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const at::Tensor& lse, std::optional<double> scale);

// The log-sum-exp dtype: float64 for float64 inputs (so float64 gradients stay exact), float32 otherwise.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

// The scale the kernels use: the given one, else 1/sqrt(D).
double softmax_scale(std::optional<double> scale, int64_t head_dim);

}  // namespace flash_attn2
