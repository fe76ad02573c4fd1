#include "reference.h"

#include <torch/torch.h>

#include <sstream>

namespace flash_attn2::testing {

std::string case_name(const Case& c) {
  std::ostringstream os;
  os << "B" << c.batch << "_Hq" << c.heads_q << "_Hkv" << c.heads_kv << "_Nq" << c.seqlen_q << "_Nk"
     << c.seqlen_k << "_D" << c.head_dim << (c.causal ? "_causal" : "") << "_" << c10::toString(c.dtype)
     << (c.transposed ? "_bnhd" : "");
  return os.str();
}

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << case_name(c); }

Inputs random_inputs(const Case& c, at::Device device, bool requires_grad) {
  auto make = [&](int64_t heads, int64_t n) {
    const auto opts = at::TensorOptions().dtype(c.dtype).device(device);
    at::Tensor t = c.transposed ? at::randn({c.batch, n, heads, c.head_dim}, opts).transpose(1, 2)
                                : at::randn({c.batch, heads, n, c.head_dim}, opts);
    return t.requires_grad_(requires_grad);
  };
  Inputs in{make(c.heads_q, c.seqlen_q), make(c.heads_kv, c.seqlen_k), make(c.heads_kv, c.seqlen_k), {}};
  in.dout = at::randn(in.q.sizes(), in.q.options().requires_grad(false));
  return in;
}

std::tuple<at::Tensor, at::Tensor> naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   bool causal, std::optional<double> scale) {
  const int64_t group = q.size(1) / k.size(1), Nq = q.size(2), Nk = k.size(2);
  const double s = scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  const at::Tensor kr = k.repeat_interleave(group, 1), vr = v.repeat_interleave(group, 1);
  at::Tensor scores = at::matmul(q, kr.transpose(-1, -2)) * s;
  if (causal) {
    const auto idx = at::TensorOptions().dtype(at::kLong).device(q.device());
    const at::Tensor hidden = at::arange(Nk, idx).unsqueeze(0) > at::arange(Nq, idx).unsqueeze(1) + (Nk - Nq);
    scores = scores.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  }
  const at::Tensor lse = at::logsumexp(scores, -1);
  // A row with no visible key: lse = -inf and p = 0 (exp(-inf - -inf) would be NaN).
  const at::Tensor p = at::nan_to_num(at::exp(scores - lse.unsqueeze(-1)), 0.0, 0.0, 0.0);
  return {at::matmul(p, vr), lse};
}

Grads naive_gradients(const Inputs& in, bool causal) {
  const at::Tensor q = in.q.detach().requires_grad_(), k = in.k.detach().requires_grad_(),
                   v = in.v.detach().requires_grad_();
  const at::Tensor out = std::get<0>(naive_attention(q, k, v, causal));
  const auto grads = torch::autograd::grad({out}, {q, k, v}, {in.dout});
  return {grads[0], grads[1], grads[2]};
}

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0) return 0.0;
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

void expect_close_to_reference(const char* what, const at::Tensor& ours, const at::Tensor& torch_same_dtype,
                               const at::Tensor& reference, double factor) {
  ASSERT_EQ(ours.sizes(), reference.sizes()) << what;
  ASSERT_TRUE(at::isfinite(ours).all().item<bool>() || !at::isfinite(reference).all().item<bool>())
      << what << ": non-finite values (unwritten or NaN output)";
  const double ours_err = max_abs_diff(ours, reference);
  const double torch_err = max_abs_diff(torch_same_dtype, reference);
  const auto dtype = ours.scalar_type();
  const double floor = dtype == at::kDouble ? 1e-12 : dtype == at::kFloat ? 1e-5 : 1e-3;
  EXPECT_LE(ours_err, factor * torch_err + floor)
      << what << ": max error vs float64 " << ours_err << ", PyTorch's own in " << dtype << ": " << torch_err;
}

void poison_allocator(at::Device device, int64_t bytes) {
  at::Tensor poison = at::empty({bytes / 4}, at::TensorOptions().dtype(at::kFloat).device(device));
  poison.fill_(std::numeric_limits<float>::quiet_NaN());
}

}  // namespace flash_attn2::testing
