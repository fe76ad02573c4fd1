// CUDA kernels vs the float64 reference, plus a C++ training loop. Without a GPU every test here skips and says so.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "kernel_sweep.h"

namespace flash_attn2::testing {
namespace {

#define SKIP_WITHOUT_CUDA() \
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device on this machine: CUDA kernel test not run"

class CudaKernel : public ::testing::TestWithParam<Case> {};

TEST_P(CudaKernel, MatchesFloat64Reference) {
  SKIP_WITHOUT_CUDA();
  check_case_on(GetParam(), at::Device(at::kCUDA, 0));
}

std::vector<Case> cuda_cases() {
  std::vector<Case> cases;
  for (auto dtype : {at::kBFloat16, at::kHalf}) {
    // 40, 120 and 240 run padded on the 64 / 128 / 256 kernels (wgmma ones on sm_90), 72 on the 96 one.
    for (int64_t d : {32, 40, 64, 72, 96, 120, 128, 160, 192, 224, 240, 256}) {
      cases.push_back({2, 4, 4, 257, 257, d, false, dtype, false});
      cases.push_back({1, 4, 2, 128, 1000, d, true, dtype, d % 64 == 0});
    }
    for (bool causal : {false, true}) {
      for (int64_t n : {1, 17, 128, 1000, 4096}) cases.push_back({1, 2, 2, n, n, 64, causal, dtype, false});
      cases.push_back({2, 8, 1, 1000, 17, 128, causal, dtype, true});   // MQA, Nq > Nk
      cases.push_back({2, 8, 1, 17, 1000, 64, causal, dtype, false});   // MQA, Nq < Nk
      cases.push_back({3, 16, 2, 257, 300, 128, causal, dtype, true});  // GQA 8:1, (B, N, H, D) views
      cases.push_back({1, 2, 2, 4096, 128, 256, causal, dtype, false});
    }
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Sweep, CudaKernel, ::testing::ValuesIn(cuda_cases()),
                         [](const auto& info) { return case_name(info.param); });

TEST(CudaKernel, RunsOnTheCurrentStreamAndUnderGraphCapture) {
  SKIP_WITHOUT_CUDA();
  const Inputs in = random_inputs({2, 4, 2, 300, 300, 64, true, at::kBFloat16, false}, at::kCUDA);
  const at::Tensor expected = attention(in.q, in.k, in.v, true);

  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::cuda::CUDAEvent inputs_ready;
  inputs_ready.record(c10::cuda::getCurrentCUDAStream());
  inputs_ready.block(side);
  at::Tensor on_side;
  {
    const c10::cuda::CUDAStreamGuard guard(side);
    on_side = attention(in.q, in.k, in.v, true);
  }
  at::cuda::CUDAEvent side_done;
  side_done.record(side);
  side_done.block(c10::cuda::getCurrentCUDAStream());
  EXPECT_TRUE(at::equal(on_side, expected));

  at::cuda::CUDAGraph graph;
  at::Tensor captured_out;
  {
    const c10::cuda::CUDAStreamGuard guard(side);
    attention(in.q, in.k, in.v, true);  // warm-up on the capture stream
    graph.capture_begin();
    captured_out = attention(in.q, in.k, in.v, true);
    graph.capture_end();
  }
  in.q.copy_(at::randn_like(in.q));
  graph.replay();
  at::cuda::getCurrentCUDAStream().synchronize();
  EXPECT_TRUE(at::equal(captured_out, attention(in.q, in.k, in.v, true)));
}

TEST(CudaKernel, DeviceGuardForNonCurrentDevice) {
  SKIP_WITHOUT_CUDA();
  if (at::cuda::device_count() < 2) GTEST_SKIP() << "one GPU: inputs on a non-current device not testable";
  const Inputs in = random_inputs({1, 2, 2, 100, 100, 64, true, at::kHalf, false}, at::Device(at::kCUDA, 1));
  const at::Tensor out = attention(in.q, in.k, in.v, true);
  EXPECT_EQ(out.device(), in.q.device());
  EXPECT_LT(max_abs_diff(out.cpu(), attention(in.q.cpu().to(at::kFloat), in.k.cpu().to(at::kFloat),
                                              in.v.cpu().to(at::kFloat), true)),
            1e-2);
}

// A one-layer attention model trained from C++ with the op; the same model with SDPA gives the same gradients.
struct TinyAttention : torch::nn::Module {
  TinyAttention(int64_t dim, int64_t heads) : heads(heads) {
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
  }
  at::Tensor forward(const at::Tensor& x, bool use_flash_attn2) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    auto parts = qkv->forward(x).view({B, N, 3, heads, C / heads}).permute({2, 0, 3, 1, 4}).to(at::kBFloat16);
    at::Tensor y = use_flash_attn2 ? attention(parts[0], parts[1], parts[2], true)
                                   : at::scaled_dot_product_attention(parts[0], parts[1], parts[2], {}, 0.0, true);
    return proj->forward(y.to(at::kFloat).transpose(1, 2).reshape({B, N, C}));
  }
  int64_t heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
};

TEST(CudaTraining, LossDecreasesAndGradientsMatchSdpa) {
  SKIP_WITHOUT_CUDA();
  torch::manual_seed(0);
  auto model = std::make_shared<TinyAttention>(256, 4);
  model->to(at::kCUDA);
  auto twin = std::make_shared<TinyAttention>(256, 4);
  twin->to(at::kCUDA);
  {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < model->parameters().size(); ++i) twin->parameters()[i].copy_(model->parameters()[i]);
  }
  const at::Tensor x = torch::randn({4, 200, 256}, at::kCUDA), target = torch::randn({4, 200, 256}, at::kCUDA);

  torch::mse_loss(twin->forward(x, false), target).backward();
  torch::mse_loss(model->forward(x, true), target).backward();
  for (size_t i = 0; i < model->parameters().size(); ++i) {
    const at::Tensor ours = model->parameters()[i].grad(), sdpa = twin->parameters()[i].grad();
    EXPECT_LT((ours - sdpa).norm().item<double>(), 2e-2 * sdpa.norm().item<double>() + 1e-6) << "parameter " << i;
  }

  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.5));
  opt.zero_grad();
  std::vector<double> losses;
  for (int step = 0; step < 8; ++step) {
    opt.zero_grad();
    const at::Tensor loss = torch::mse_loss(model->forward(x, true), target);
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), losses.front()) << "loss " << losses.front() << " -> " << losses.back();
}

}  // namespace
}  // namespace flash_attn2::testing
