// Meta kernels: shapes, dtypes and strides of the outputs without touching data, so FakeTensor,
// torch.compile and torch.export can trace the ops. They run the same checks as the real kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"

namespace flash_attn2 {
namespace {

std::tuple<at::Tensor, at::Tensor> fwd_with_lse_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     bool /*causal*/, std::optional<double> scale) {
  const AttentionShape s = check_forward_inputs("flash_attn2::fwd_with_lse", q, k, v, scale);
  return {at::empty_symint(q.sym_sizes(), q.options()),
          at::empty_symint({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

at::Tensor fwd_meta(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool /*causal*/,
                    std::optional<double> scale) {
  check_forward_inputs("flash_attn2::fwd", q, k, v, scale);
  return at::empty_symint(q.sym_sizes(), q.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_meta(const at::Tensor& dout, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& out, const at::Tensor& lse,
                                                        bool /*causal*/, std::optional<double> scale) {
  check_backward_inputs("flash_attn2::bwd", dout, q, k, v, out, lse, scale);
  return {at::empty_symint(q.sym_sizes(), q.options()), at::empty_symint(k.sym_sizes(), k.options()),
          at::empty_symint(v.sym_sizes(), v.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, Meta, m) {
  m.impl("fwd", &fwd_meta);
  m.impl("fwd_with_lse", &fwd_with_lse_meta);
  m.impl("bwd", &bwd_meta);
}

}  // namespace flash_attn2
