#include "trivial_cases.h"

#include <ATen/ATen.h>

#include <limits>

namespace flash_attn2 {

at::Tensor empty_like_input(const at::Tensor& t) {
  if (t.dim() > 0 && t.sym_stride(-1) == 1 && t.is_non_overlapping_and_dense()) {
    return at::empty_like(t, at::MemoryFormat::Preserve);
  }
  return at::empty_symint(t.sym_sizes(), t.options());
}

ForwardOutputs forward_outputs(const at::Tensor& q, const ConcreteShape& s, const Variant& var) {
  ForwardOutputs r{empty_like_input(q),
                   at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type()))),
                   true};
  if (r.lse.numel() == 0) return r;
  if (s.seqlen_k == 0) {
    r.out.zero_();
    r.lse.fill_(-std::numeric_limits<double>::infinity());
    return r;
  }
  if (s.head_dim == 0 && !var.alibi_slopes.defined()) {
    // Query row i sees keys [i + diag - left, i + diag + right] within [0, Nk).
    const auto opts = r.lse.options().dtype(at::kLong).device(at::kCPU);
    const at::Tensor i = at::arange(s.seqlen_q, opts);
    const int64_t diag = s.seqlen_k - s.seqlen_q;
    at::Tensor begin = var.window_left >= 0 ? (i + (diag - var.window_left)).clamp_min(0) : at::zeros_like(i);
    at::Tensor end = var.window_right >= 0 ? (i + (diag + var.window_right + 1)).clamp(0, s.seqlen_k)
                                           : at::full_like(i, s.seqlen_k);
    const at::Tensor visible = (end - begin).clamp_min(0).to(r.lse.scalar_type()).to(r.lse.device());
    r.lse.copy_(visible.log().expand_as(r.lse));  // log(0) = -inf for rows that see nothing
    return r;
  }
  r.done = false;
  return r;
}

}  // namespace flash_attn2
