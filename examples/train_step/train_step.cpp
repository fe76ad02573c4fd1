// Trains a one-layer causal self-attention model for a few SGD steps with flash_attn2 from C++ alone.
// Exits non-zero unless the loss falls. Runs on CUDA (bf16 attention) when a GPU is present, else on the CPU.
#include <flash_attn2/flash_attn2.h>
#include <torch/torch.h>

#include <iostream>

struct SelfAttention : torch::nn::Module {
  SelfAttention(int64_t dim, int64_t heads) : heads(heads) {
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    // (B, N, 3, H, D) -> three (B, H, N, D) views; flash_attn2 takes the strided views as they are.
    auto parts = qkv->forward(x).view({B, N, 3, heads, C / heads}).permute({2, 0, 3, 1, 4});
    const auto attn_dtype = x.is_cuda() ? torch::kBFloat16 : x.scalar_type();
    torch::Tensor y = flash_attn2::attention(parts[0].to(attn_dtype), parts[1].to(attn_dtype),
                                             parts[2].to(attn_dtype), /*causal=*/true);
    return proj->forward(y.to(x.scalar_type()).transpose(1, 2).reshape({B, N, C}));
  }
  int64_t heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
};

int main() {
  torch::manual_seed(0);
  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  auto model = std::make_shared<SelfAttention>(128, 4);
  model->to(device);
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(0.5));
  const auto x = torch::randn({2, 64, 128}, device), target = torch::randn({2, 64, 128}, device);

  double first = 0, last = 0;
  for (int step = 0; step < 5; ++step) {
    optimizer.zero_grad();
    const auto loss = torch::mse_loss(model->forward(x), target);
    loss.backward();
    optimizer.step();
    last = loss.item<double>();
    if (step == 0) first = last;
    std::cout << "step " << step << " loss " << last << "\n";
  }
  std::cout << "device " << device << ": loss " << first << " -> " << last << "\n";
  return last < first ? 0 : 1;
}
