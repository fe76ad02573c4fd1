// flash_attn2: exact FlashAttention-2 attention for LibTorch.
//
// Plain C++ entry points that call the flash_attn2 ops through the PyTorch dispatcher, so they reach the
// CPU, CUDA, Meta and Autograd kernels exactly as torch.ops.flash_attn2.* does from Python.
//
// Shapes: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); Hq % Hkv == 0 (grouped-query attention). Any strides.
// Returns fresh contiguous tensors in q's dtype on q's device; lse is (B, Hq, Nq), float32 (float64 for
// float64 inputs).
// causal masks key j for query i when j > i + (Nk - Nq) (bottom-right aligned); scale defaults to 1/sqrt(D).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace flash_attn2 {

// softmax(q k^T * scale) v, differentiable.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal = false,
                     std::optional<double> scale = std::nullopt);

// The attention output and the natural-log log-sum-exp of each query row's scaled scores
// (-inf for a row that sees no key, whose output is 0). Differentiable in the output; lse is not.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal = false,
                                                      std::optional<double> scale = std::nullopt);

// Gradients (dq, dk, dv) given dout and the forward's q, k, v, out and lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal = false,
                                                                  std::optional<double> scale = std::nullopt);

}  // namespace flash_attn2
