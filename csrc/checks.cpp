#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace flash_attn2 {
namespace {

void check_rank4(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined; expected a tensor of shape ", layout);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dimensions ", layout, ", got ", t.dim(),
              " with shape ", t.sym_sizes());
}

void check_same_kind(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device(),
              "; all inputs must be on one device");
}

}  // namespace

AttentionShape check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, std::optional<double> scale) {
  check_rank4(op, "q", q, "(B, Hq, Nq, D)");
  check_rank4(op, "k", k, "(B, Hkv, Nk, D)");
  check_rank4(op, "v", v, "(B, Hkv, Nk, D)");
  check_same_kind(op, "k", k, q);
  check_same_kind(op, "v", v, q);
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q has dtype ", dtype, "; expected float32, float64, float16 or bfloat16");

  AttentionShape s{q.sym_size(0), q.sym_size(1), k.sym_size(1), q.sym_size(2), k.sym_size(2), q.sym_size(3)};
  TORCH_CHECK(k.sym_size(0) == s.batch && v.sym_size(0) == s.batch, op, ": batch sizes differ: q has ", s.batch,
              ", k has ", k.sym_size(0), ", v has ", v.sym_size(0));
  TORCH_CHECK(v.sym_size(1) == s.heads_kv, op, ": k has ", s.heads_kv, " heads but v has ", v.sym_size(1),
              "; k and v must have the same number of heads");
  TORCH_CHECK(v.sym_size(2) == s.seqlen_k, op, ": k has sequence length ", s.seqlen_k, " but v has ", v.sym_size(2),
              "; k and v must have the same sequence length");
  TORCH_CHECK(k.sym_size(3) == s.head_dim && v.sym_size(3) == s.head_dim, op, ": head dims differ: q has ", s.head_dim,
              ", k has ", k.sym_size(3), ", v has ", v.sym_size(3), "; q, k and v must share the head dim D");
  TORCH_CHECK(s.heads_kv > 0 ? s.heads_q % s.heads_kv == 0 : s.heads_q == 0, op, ": q has ", s.heads_q,
              " heads, which is not a multiple of the ", s.heads_kv,
              " heads of k and v (grouped-query attention needs Hq % Hkv == 0)");
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op, ": scale must be a finite positive number, got ",
                *scale);
  }
  return s;
}

AttentionShape check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const at::Tensor& lse, std::optional<double> scale) {
  const AttentionShape s = check_forward_inputs(op, q, k, v, scale);
  check_rank4(op, "dout", dout, "(B, Hq, Nq, D)");
  check_rank4(op, "out", out, "(B, Hq, Nq, D)");
  check_same_kind(op, "dout", dout, q);
  check_same_kind(op, "out", out, q);
  TORCH_CHECK(dout.sym_sizes() == q.sym_sizes(), op, ": dout has shape ", dout.sym_sizes(), " but q has shape ", q.sym_sizes(),
              "; dout must match the attention output's shape");
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), op, ": out has shape ", out.sym_sizes(), " but q has shape ", q.sym_sizes(),
              "; out must be the forward output");
  TORCH_CHECK(lse.defined(), op, ": lse is undefined; expected the (B, Hq, Nq) log-sum-exp from fwd_with_lse");
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse has dtype ", lse.scalar_type(),
              "; expected ", lse_dtype(q.scalar_type()), " for ", q.scalar_type(),
              " inputs (the log-sum-exp returned by fwd_with_lse)");
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
  TORCH_CHECK(lse.dim() == 3 && lse.sym_size(0) == s.batch && lse.sym_size(1) == s.heads_q && lse.sym_size(2) == s.seqlen_q,
              op, ": lse has shape ", lse.sym_sizes(), "; expected (B, Hq, Nq) = (", s.batch, ", ", s.heads_q, ", ",
              s.seqlen_q, ")");
  return s;
}

ConcreteShape concrete(const AttentionShape& s) {
  return {s.batch.expect_int(),    s.heads_q.expect_int(),  s.heads_kv.expect_int(),
          s.seqlen_q.expect_int(), s.seqlen_k.expect_int(), s.head_dim.expect_int()};
}

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

double softmax_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) return *scale;
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

}  // namespace flash_attn2
