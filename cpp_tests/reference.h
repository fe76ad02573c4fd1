// Test support: a float64 reference for attention, random inputs, and the FlashAttention-style pass rule.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <optional>
#include <string>
#include <tuple>

namespace flash_attn2::testing {

struct Case {
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
  bool causal;
  at::ScalarType dtype;
  bool transposed;  // q, k, v are (B, N, H, D) buffers viewed as (B, H, N, D)
};
std::string case_name(const Case& c);
std::ostream& operator<<(std::ostream& os, const Case& c);

struct Inputs {
  at::Tensor q, k, v, dout;
};
// Fresh random inputs (never zeros) in the case's dtype on `device`.
Inputs random_inputs(const Case& c, at::Device device, bool requires_grad = false);

// Naive softmax(q k^T * scale) v computed in the inputs' own dtype with ATen ops (what PyTorch itself gives
// in that precision), with bottom-right causal masking and GQA by repeating k/v heads. Returns (out, lse).
std::tuple<at::Tensor, at::Tensor> naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   bool causal, std::optional<double> scale = std::nullopt);

struct Grads {
  at::Tensor dq, dk, dv;
};
// Gradients of naive_attention, in the inputs' dtype, by autograd.
Grads naive_gradients(const Inputs& in, bool causal);

double max_abs_diff(const at::Tensor& a, const at::Tensor& b);

// FlashAttention's rule: error vs the float64 reference within `factor` times PyTorch's own error in the
// same dtype, plus an absolute floor for outputs that PyTorch happens to compute almost exactly.
void expect_close_to_reference(const char* what, const at::Tensor& ours, const at::Tensor& torch_same_dtype,
                               const at::Tensor& reference, double factor = 2.0);

// Runs fn and expects a c10::Error whose message contains needle.
template <typename Fn>
void expect_error(Fn&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an error mentioning '" << needle << "'";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' should mention '" << needle << "'";
  }
}

// Fills the allocator's free blocks with NaN so an output element the kernel never writes shows up.
void poison_allocator(at::Device device, int64_t bytes = 64 << 20);

}  // namespace flash_attn2::testing
