#include "flash_attn2/flash_attn2.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace flash_attn2 {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Undefined tensors cannot reach the kernels' checks: the dispatcher needs each one's device first.
void require_defined(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& [name, tensor] : args) {
    TORCH_CHECK(tensor->defined(), op, ": ", name, " is undefined; expected a tensor");
  }
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     std::optional<double> scale) {
  static const auto op = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                              std::optional<double>)>("flash_attn2::fwd");
  require_defined("flash_attn2::fwd", {{"q", &q}, {"k", &k}, {"v", &v}});
  return op.call(q, k, v, causal, scale);
}

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, std::optional<double> scale) {
  static const auto op =
      op_handle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool,
                                                   std::optional<double>)>("flash_attn2::fwd_with_lse");
  require_defined("flash_attn2::fwd_with_lse", {{"q", &q}, {"k", &k}, {"v", &v}});
  return op.call(q, k, v, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, std::optional<double> scale) {
  static const auto op = op_handle<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, bool, std::optional<double>)>("flash_attn2::bwd");
  require_defined("flash_attn2::bwd",
                  {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  return op.call(dout, q, k, v, out, lse, causal, scale);
}

}  // namespace flash_attn2
