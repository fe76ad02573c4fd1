// Autograd for the flash_attn2 ops, in C++ so LibTorch programs get gradients without Python.
// fwd and fwd_with_lse save (q, k, v, out, lse) and call flash_attn2::bwd through the dispatcher; the LSE output
// is not differentiable. bwd itself has an Autograd kernel whose backward refuses double backward clearly.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include "flash_attn2/flash_attn2.h"

namespace flash_attn2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_with_lse(q, k, v, causal, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dout = grad_outputs[0];
    if (!dout.defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const bool causal = ctx->saved_data["causal"].toBool();
    const auto scale = ctx->saved_data["scale"].toOptional<double>();
    auto [dq, dk, dv] = attention_backward(dout, saved[0], saved[1], saved[2], saved[3], saved[4], causal, scale);
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

// Gives bwd an Autograd kernel; differentiating through it (double backward) stops with a clear error.
class AttentionBackwardFunction : public torch::autograd::Function<AttentionBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, bool causal, std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = attention_backward(dout, q, k, v, out, lse, causal, scale);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "flash_attn2: double backward (differentiating the attention gradient, e.g. "
                "create_graph=True followed by another backward) is not supported");
  }
};

at::Tensor fwd_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                        std::optional<double> scale) {
  return AttentionFunction::apply(q, k, v, causal, scale)[0];
}

std::tuple<at::Tensor, at::Tensor> fwd_with_lse_autograd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, bool causal,
                                                         std::optional<double> scale) {
  auto outputs = AttentionFunction::apply(q, k, v, causal, scale);
  return {outputs[0], outputs[1]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_autograd(const at::Tensor& dout, const at::Tensor& q,
                                                            const at::Tensor& k, const at::Tensor& v,
                                                            const at::Tensor& out, const at::Tensor& lse,
                                                            bool causal, std::optional<double> scale) {
  auto grads = AttentionBackwardFunction::apply(dout, q, k, v, out, lse, causal, scale);
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, Autograd, m) {
  m.impl("fwd", &fwd_autograd);
  m.impl("fwd_with_lse", &fwd_with_lse_autograd);
  m.impl("bwd", &bwd_autograd);
}

}  // namespace flash_attn2
