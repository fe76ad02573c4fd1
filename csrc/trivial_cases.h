// Results of the shapes no kernel needs to run on, shared by the CPU and CUDA backends so both give the same
// answer: no output elements, no keys, or a zero head dim.
#pragma once

#include <ATen/core/Tensor.h>

#include "checks.h"

namespace flash_attn2 {

struct ForwardOutputs {
  at::Tensor out;  // like q
  at::Tensor lse;  // (B, Hq, Nq) in lse_dtype(q)
  bool done;       // true: out and lse are final, the kernel must not run
};

// Allocates the forward's outputs on q's device. They come back final (done) when
//   - there are no keys: every row sees nothing, so out = 0 and lse = -inf (what the kernels give a row
//     whose keys are all masked), or
//   - the head dim is 0 and there is no ALiBi: every logit is 0, so out is empty and lse = log(number of keys
//     the row sees), -inf where it sees none (attention_rule.h's visibility), or
//   - there are no output elements at all.
ForwardOutputs forward_outputs(const at::Tensor& q, const ConcreteShape& s, const Variant& var);

// An uninitialised tensor shaped like `t` (an input: q, k or v), laid out in t's memory order when t is dense with
// a contiguous last dim (a (B, N, H, D) buffer viewed as (B, H, N, D) gives an output with those strides, so the
// caller's transpose back is free), contiguous otherwise. Outputs and gradients are allocated with it on every
// backend, Meta included, so traced strides equal eager ones.
at::Tensor empty_like_input(const at::Tensor& t);

}  // namespace flash_attn2
