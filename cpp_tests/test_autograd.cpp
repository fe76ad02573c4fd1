// Gradients from C++ alone: the Autograd kernel registered in csrc/autograd.cpp, reached via the dispatcher.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

TEST(Autograd, GradMatchesFloat64ReferenceFromCpp) {
  const Case c{2, 4, 2, 37, 29, 32, true, at::kDouble, true};
  const Inputs in = random_inputs(c, at::kCPU, /*requires_grad=*/true);
  const at::Tensor out = attention(in.q, in.k, in.v, c.causal);
  ASSERT_TRUE(out.requires_grad());
  const auto grads = torch::autograd::grad({out}, {in.q, in.k, in.v}, {in.dout});
  const Grads ref = naive_gradients(in, c.causal);
  EXPECT_LT(max_abs_diff(grads[0], ref.dq), 1e-10);
  EXPECT_LT(max_abs_diff(grads[1], ref.dk), 1e-10);
  EXPECT_LT(max_abs_diff(grads[2], ref.dv), 1e-10);
}

TEST(Autograd, WithLseOutputIsDifferentiableLseIsNot) {
  const Case c{1, 2, 2, 9, 9, 16, false, at::kDouble, false};
  const Inputs in = random_inputs(c, at::kCPU, true);
  const auto [out, lse] = attention_with_lse(in.q, in.k, in.v);
  EXPECT_TRUE(out.requires_grad());
  EXPECT_FALSE(lse.requires_grad());
  out.sum().backward();
  EXPECT_TRUE(in.q.grad().defined());
  EXPECT_GT(in.v.grad().abs().sum().item<double>(), 0.0);
}

TEST(Autograd, DoubleBackwardIsRefusedClearly) {
  const Case c{1, 1, 1, 5, 5, 8, false, at::kDouble, false};
  const Inputs in = random_inputs(c, at::kCPU, true);
  const at::Tensor out = attention(in.q, in.k, in.v);
  const auto grads = torch::autograd::grad({out}, {in.q}, {in.dout}, /*retain_graph=*/true, /*create_graph=*/true);
  try {
    torch::autograd::grad({grads[0].sum()}, {in.k});
    FAIL() << "double backward should raise";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("double backward"), std::string::npos) << e.what();
  }
}

TEST(Autograd, NoGradModeRecordsNothing) {
  const Inputs in = random_inputs({1, 1, 1, 4, 4, 8, false, at::kFloat, false}, at::kCPU, true);
  torch::NoGradGuard no_grad;
  EXPECT_FALSE(attention(in.q, in.k, in.v).requires_grad());
}

}  // namespace
}  // namespace flash_attn2::testing
