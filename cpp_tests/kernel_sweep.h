// The shape sweep shared by the CPU and CUDA kernel tests: each case checks fwd, LSE and bwd of one device
// against the float64 reference, with PyTorch's own same-dtype result setting the tolerance.
#pragma once

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {

inline void check_case_on(const Case& c, at::Device device) {
  const Inputs in = random_inputs(c, device);
  const Inputs in64{in.q.to(at::kDouble), in.k.to(at::kDouble), in.v.to(at::kDouble), in.dout.to(at::kDouble)};

  poison_allocator(device);
  const auto [out, lse] = attention_with_lse(in.q, in.k, in.v, c.causal);
  const auto [ref_out, ref_lse] = naive_attention(in64.q.cpu(), in64.k.cpu(), in64.v.cpu(), c.causal);
  const auto [torch_out, torch_lse] = naive_attention(in.q, in.k, in.v, c.causal);
  ASSERT_EQ(out.scalar_type(), c.dtype);
  ASSERT_EQ(out.device(), device);
  // out follows q's memory order (contiguous for (B, H, N, D) inputs, (B, N, H, D)-ordered for the bnhd ones).
  ASSERT_EQ(out.strides(), at::empty_like(in.q).strides());
  expect_close_to_reference("out", out.cpu(), torch_out.cpu(), ref_out);

  // LSE: -inf exactly where the reference row sees no key, close elsewhere.
  const at::Tensor visible = at::isfinite(ref_lse);
  ASSERT_TRUE(at::equal(at::isfinite(lse.cpu()), visible)) << "lse must be -inf exactly on rows with no key";
  if (visible.any().item<bool>()) {
    expect_close_to_reference("lse", lse.cpu().masked_select(visible),
                              torch_lse.cpu().to(at::kDouble).masked_select(visible),
                              ref_lse.masked_select(visible));
  }

  poison_allocator(device);
  const auto [dq, dk, dv] = attention_backward(in.dout, in.q, in.k, in.v, out, lse, c.causal);
  const Grads ref = naive_gradients({in64.q.cpu(), in64.k.cpu(), in64.v.cpu(), in64.dout.cpu()}, c.causal);
  const Grads torch_grads = naive_gradients(in, c.causal);
  expect_close_to_reference("dq", dq.cpu(), torch_grads.dq.cpu(), ref.dq);
  expect_close_to_reference("dk", dk.cpu(), torch_grads.dk.cpu(), ref.dk);
  expect_close_to_reference("dv", dv.cpu(), torch_grads.dv.cpu(), ref.dv);
}

}  // namespace flash_attn2::testing
