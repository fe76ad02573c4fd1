// KV-cache attention from C++ (attention_kvcache): a dense and a paged cache decoding token by token against
// attention() on the valid prefix, the in-place append, and the C++-side messages (dropout, grad mode). CPU
// always, CUDA when a GPU is present.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

std::vector<at::Device> devices() {
  std::vector<at::Device> d{at::kCPU};
  if (torch::cuda::is_available()) d.emplace_back(at::kCUDA);
  return d;
}

TEST(KvCache, DecodesLikeAttentionOnThePrefixDenseAndPaged) {
  for (const at::Device device : devices()) {
    torch::manual_seed(0);
    const auto dtype = device.is_cuda() ? at::kBFloat16 : at::kFloat;
    const auto opts = at::TensorOptions().dtype(dtype).device(device);
    const int64_t B = 2, Hq = 8, Hkv = 2, D = 64, cap = 64, page = 16, prompt = 20, steps = 6;
    const at::Tensor keys = at::randn({B, Hkv, prompt + steps, D}, opts), values = at::randn({B, Hkv, prompt + steps, D}, opts);
    // Dense (B, Hkv, cap, D) as a transposed (B, cap, Hkv, D) buffer; paged (pages, 16, Hkv, D), table reversed.
    at::Tensor kd = at::zeros({B, cap, Hkv, D}, opts).transpose(1, 2), vd = at::zeros({B, cap, Hkv, D}, opts).transpose(1, 2);
    const int64_t pages = B * cap / page;
    at::Tensor kp = at::zeros({pages, page, Hkv, D}, opts), vp = at::zeros({pages, page, Hkv, D}, opts);
    const at::Tensor table = at::arange(pages - 1, -1, -1, opts.dtype(at::kInt)).view({B, cap / page});
    at::Tensor lens = at::zeros({B}, opts.dtype(at::kInt));
    AttentionOptions causal;
    causal.set_causal(true).set_softcap(30.0);
    // Prefill: the prompt's keys appended through the op itself (chunked prefill, Nq = prompt).
    for (int64_t t = 0; t < prompt + steps; ++t) {
      const int64_t n = t < prompt ? prompt : 1, start = t < prompt ? 0 : t;
      if (t > 0 && t < prompt) continue;
      const at::Tensor q = at::randn({B, Hq, n, D}, opts);
      const at::Tensor kn = keys.narrow(2, start, n), vn = values.narrow(2, start, n);
      auto [od, lse_d] = attention_kvcache(q, kd, vd, kn, vn, lens, std::nullopt, causal);
      auto [op, lse_p] = attention_kvcache(q, kp, vp, kn, vn, lens, table, causal, /*num_splits=*/3);
      const at::Tensor want = attention(q, keys.narrow(2, 0, start + n), values.narrow(2, 0, start + n), causal);
      const double tol = device.is_cuda() ? 2e-2 : 1e-5;
      EXPECT_LT(max_abs_diff(od, want), tol) << device << " step " << t;
      EXPECT_LT(max_abs_diff(op, want), tol) << device << " step " << t;
      EXPECT_EQ(lse_d.sizes(), (std::vector<int64_t>{B, Hq, n}));
      lens.add_(n);
    }
    EXPECT_TRUE(at::equal(kd.narrow(2, 0, prompt + steps), keys)) << device;
    EXPECT_TRUE(at::equal(vd.narrow(2, 0, prompt + steps), values)) << device;
    EXPECT_EQ(at::count_nonzero(kd.narrow(2, prompt + steps, cap - prompt - steps)).item<int64_t>(), 0)
        << "rows past the append stay untouched";
    // Sequence 0 lives in the last pages, in reverse order.
    EXPECT_TRUE(at::equal(kp.select(0, pages - 1).transpose(0, 1), keys.select(0, 0).narrow(1, 0, page))) << device;
  }
}

TEST(KvCache, Errors) {
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor q = at::randn({1, 2, 1, 8}, opts), kc = at::randn({1, 2, 16, 8}, opts), vc = at::randn({1, 2, 16, 8}, opts);
  AttentionOptions dropout;
  dropout.set_dropout(0.1);
  expect_error([&] { attention_kvcache(q, kc, vc, std::nullopt, std::nullopt, std::nullopt, std::nullopt, dropout); },
               "dropout does not apply to KV-cache attention");
  const at::Tensor qg = q.clone().requires_grad_();
  expect_error([&] { attention_kvcache(qg, kc, vc); }, "fwd_kvcache is not differentiable");
  expect_error([&] { attention_kvcache(q, at::Tensor(), vc); }, "k_cache is undefined");
  expect_error([&] { attention_kvcache(q, kc, vc, kc.narrow(2, 0, 1), std::nullopt, at::zeros({1}, opts.dtype(at::kInt))); },
               "k_new and v_new must be given together");
}

}  // namespace
}  // namespace flash_attn2::testing
