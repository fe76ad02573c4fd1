// Every bad input raises c10::Error naming the problem, on every path (fwd, fwd_with_lse, bwd, Meta).
#include <gtest/gtest.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

at::Tensor t(std::vector<int64_t> sizes, at::ScalarType dtype = at::kFloat, at::Device device = at::kCPU) {
  return at::randn(sizes, at::TensorOptions().dtype(dtype).device(device));
}

class BadInput : public ::testing::TestWithParam<at::Device> {};

TEST_P(BadInput, ForwardArguments) {
  const at::Device d = GetParam();
  const at::Tensor q = t({2, 4, 8, 16}, at::kFloat, d), kv = t({2, 2, 8, 16}, at::kFloat, d);
  expect_error([&] { attention(t({4, 8, 16}, at::kFloat, d), kv, kv); }, "q must have 4 dimensions");
  expect_error([&] { attention(q, t({2, 2, 8}, at::kFloat, d), kv); }, "k must have 4 dimensions");
  expect_error([&] { attention(q, kv, t({2, 2, 8}, at::kFloat, d)); }, "v must have 4 dimensions");
  expect_error([&] { attention(q, kv.to(at::kDouble), kv); }, "k has dtype Double but q has dtype Float");
  expect_error([&] { attention(q, kv, kv.to(at::kHalf)); }, "v has dtype Half but q has dtype Float");
  expect_error([&] { attention(q.to(at::kInt), kv.to(at::kInt), kv.to(at::kInt)); },
               "expected float32, float64, float16 or bfloat16");
  expect_error([&] { attention(q, t({3, 2, 8, 16}, at::kFloat, d), kv); }, "batch sizes differ");
  expect_error([&] { attention(q, kv, t({2, 1, 8, 16}, at::kFloat, d)); }, "k has 2 heads but v has 1");
  expect_error([&] { attention(q, kv, t({2, 2, 9, 16}, at::kFloat, d)); }, "k has sequence length 8 but v has 9");
  expect_error([&] { attention(q, t({2, 2, 8, 32}, at::kFloat, d), kv); }, "head dims differ");
  expect_error([&] { attention(q, t({2, 3, 8, 16}, at::kFloat, d), t({2, 3, 8, 16}, at::kFloat, d)); },
               "not a multiple of the 3 heads");
  expect_error([&] { attention(q, kv, kv, false, -1.0); }, "scale must be a finite positive number");
  expect_error([&] { attention_with_lse(t({4, 8, 16}, at::kFloat, d), kv, kv); }, "fwd_with_lse: q must have 4");
}

TEST_P(BadInput, BackwardArguments) {
  const at::Device d = GetParam();
  const at::Tensor q = t({2, 4, 8, 16}, at::kFloat, d), kv = t({2, 2, 8, 16}, at::kFloat, d);
  const at::Tensor lse = t({2, 4, 8}, at::kFloat, d);
  expect_error([&] { attention_backward(t({2, 4, 7, 16}, at::kFloat, d), q, kv, kv, q, lse); },
               "dout has shape [2, 4, 7, 16] but q has shape [2, 4, 8, 16]");
  expect_error([&] { attention_backward(q, q, kv, kv, t({2, 4, 8, 8}, at::kFloat, d), lse); }, "out has shape");
  expect_error([&] { attention_backward(q, q, kv, kv, q, t({2, 4, 9}, at::kFloat, d)); },
               "lse has shape [2, 4, 9]; expected (B, Hq, Nq) = (2, 4, 8)");
  expect_error([&] { attention_backward(q, q, kv, kv, q, lse.to(at::kHalf)); }, "lse has dtype Half");
  expect_error([&] { attention_backward(q.to(at::kDouble), q, kv, kv, q, lse); }, "dout has dtype Double");
  expect_error([&] { attention_backward(q, q, kv, kv, q, at::Tensor()); }, "lse is undefined");
  expect_error([&] { attention(q, at::Tensor(), kv); }, "k is undefined");
}

std::vector<at::Device> devices() {
  std::vector<at::Device> result{at::kCPU, at::kMeta};
  return result;
}
INSTANTIATE_TEST_SUITE_P(Devices, BadInput, ::testing::ValuesIn(devices()),
                         [](const auto& info) { return info.param.is_cpu() ? "CPU" : "Meta"; });

TEST(BadInput, DeviceMix) {
  const at::Tensor q = t({1, 1, 4, 8});
  expect_error([&] { attention(q, q.to(at::kMeta), q); }, "k is on meta but q is on cpu");
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device: CPU/CUDA mix not checked";
  expect_error([&] { attention(q, q.cuda(), q); }, "k is on cuda:0 but q is on cpu");
}

TEST(BadInput, CudaSpecificLimits) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  const at::Tensor q32 = t({1, 1, 4, 8}, at::kFloat, at::kCUDA);
  expect_error([&] { attention(q32, q32, q32); }, "CUDA kernels take float16 or bfloat16");
  const at::Tensor odd = t({1, 1, 4, 12}, at::kHalf, at::kCUDA);
  expect_error([&] { attention(odd, odd, odd); }, "positive multiple of 8");
  const at::Tensor big = t({1, 1, 4, 264}, at::kHalf, at::kCUDA);
  expect_error([&] { attention(big, big, big); }, "at most 256");
}

}  // namespace
}  // namespace flash_attn2::testing
