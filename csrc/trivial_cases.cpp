#include "trivial_cases.h"

#include <ATen/ATen.h>

#include <limits>

namespace flash_attn2 {

ForwardOutputs forward_outputs(const at::Tensor& q, const ConcreteShape& s, bool causal) {
  ForwardOutputs r{at::empty(q.sizes(), q.options()),
                   at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type()))),
                   true};
  if (r.lse.numel() == 0) return r;
  if (s.seqlen_k == 0) {
    r.out.zero_();
    r.lse.fill_(-std::numeric_limits<double>::infinity());
    return r;
  }
  if (s.head_dim == 0) {
    // Query row i sees keys j <= i + (Nk - Nq) when causal, all Nk otherwise.
    at::Tensor visible = at::full({s.seqlen_q}, static_cast<double>(s.seqlen_k), r.lse.options());
    if (causal) {
      visible = at::arange(s.seqlen_q, r.lse.options()).add_(static_cast<double>(s.seqlen_k - s.seqlen_q + 1))
                    .clamp_(0, static_cast<double>(s.seqlen_k));
    }
    r.lse.copy_(visible.log().expand_as(r.lse));  // log(0) = -inf for rows that see nothing
    return r;
  }
  r.done = false;
  return r;
}

}  // namespace flash_attn2
