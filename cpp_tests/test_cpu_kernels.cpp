#include <gtest/gtest.h>

#include "kernel_sweep.h"

namespace flash_attn2::testing {
namespace {

class CpuKernel : public ::testing::TestWithParam<Case> {};

TEST_P(CpuKernel, MatchesFloat64Reference) { check_case_on(GetParam(), at::kCPU); }

std::vector<Case> cpu_cases() {
  std::vector<Case> cases;
  // Odd sizes, Nq != Nk both ways, causal, GQA/MQA, strided (B, N, H, D) views, across dtypes.
  for (auto dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (bool causal : {false, true}) {
      cases.push_back({2, 4, 2, 17, 17, 64, causal, dtype, false});
      cases.push_back({1, 2, 1, 257, 100, 32, causal, dtype, true});
      cases.push_back({1, 3, 3, 100, 257, 72, causal, dtype, false});
    }
  }
  for (int64_t d : {32, 96, 128, 160, 192, 224, 256}) cases.push_back({1, 2, 2, 130, 70, d, d % 64 == 0, at::kFloat, false});
  cases.push_back({1, 1, 1, 1, 1, 64, false, at::kFloat, false});
  cases.push_back({1, 1, 1, 1, 1000, 64, true, at::kFloat, false});
  cases.push_back({1, 8, 1, 1000, 1, 64, true, at::kFloat, true});  // MQA, most rows see no key
  cases.push_back({2, 8, 1, 1000, 1000, 64, true, at::kBFloat16, false});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CpuKernel, ::testing::ValuesIn(cpu_cases()),
                         [](const auto& info) { return case_name(info.param); });

TEST(CpuKernel, EmptyInputs) {
  for (auto sizes : std::vector<std::array<int64_t, 4>>{{0, 2, 5, 8}, {1, 0, 5, 8}, {1, 2, 0, 8}}) {
    const at::Tensor q = at::randn({sizes[0], sizes[1], sizes[2], sizes[3]});
    const auto [out, lse] = attention_with_lse(q, q, q, true);
    EXPECT_EQ(out.sizes(), q.sizes());
    EXPECT_EQ(lse.sizes(), (std::vector<int64_t>{sizes[0], sizes[1], sizes[2]}));
  }
  // No keys at all: output 0, lse -inf, zero gradients.
  const at::Tensor q = at::randn({1, 2, 3, 8}), kv = at::randn({1, 2, 0, 8});
  const auto [out, lse] = attention_with_lse(q, kv, kv);
  EXPECT_TRUE(at::equal(out, at::zeros_like(out)));
  EXPECT_TRUE(at::isinf(lse).all().item<bool>());
  const auto [dq, dk, dv] = attention_backward(at::randn_like(q), q, kv, kv, out, lse);
  EXPECT_TRUE(at::equal(dq, at::zeros_like(dq)));
  EXPECT_EQ(dk.sizes(), kv.sizes());
}

TEST(CpuKernel, ZeroHeadDimGivesTheLogOfTheVisibleKeyCount) {
  // Every score is 0, so softmax is uniform over the keys a row sees: lse = log(count), -inf for none.
  for (bool causal : {false, true}) {
    const at::Tensor q = at::randn({2, 2, 5, 0}, at::kDouble), kv = at::randn({2, 1, 3, 0}, at::kDouble);
    const auto [out, lse] = attention_with_lse(q, kv, kv, causal);
    EXPECT_EQ(out.sizes(), q.sizes());
    const at::Tensor ref = std::get<1>(naive_attention(q, kv, kv, causal, 1.0));
    EXPECT_TRUE(at::allclose(lse, ref.to(lse.dtype()), 1e-12, 1e-12, /*equal_nan=*/false)) << "causal " << causal;
  }
}

TEST(CpuKernel, ExplicitScale) {
  const Case c{1, 2, 2, 33, 40, 16, true, at::kDouble, false};
  const Inputs in = random_inputs(c, at::kCPU);
  const at::Tensor out = attention(in.q, in.k, in.v, true, 0.3);
  const at::Tensor ref = std::get<0>(naive_attention(in.q, in.k, in.v, true, 0.3));
  EXPECT_LT(max_abs_diff(out, ref), 1e-12);
}

}  // namespace
}  // namespace flash_attn2::testing
