// The attention variants from C++: the AttentionOptions API against a float64 reference, varlen against
// per-sequence calls, every bad option's message, and a training loop with a sliding window and dropout
// (CPU always, CUDA when a GPU is present).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

// The op's semantics with ATen ops in q's dtype (see attention_rule.h).
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o,
                     const at::Tensor& keep = {}) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = k.size(2), group = Hq / k.size(1);
  const at::Tensor kr = k.repeat_interleave(group, 1), vr = v.repeat_interleave(group, 1);
  const double scale = o.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.size(3))));
  at::Tensor s = at::matmul(q, kr.transpose(-1, -2)) * scale;
  if (o.softcap > 0) s = at::tanh(s / o.softcap) * o.softcap;
  const auto idx = at::TensorOptions().dtype(at::kLong).device(q.device());
  const at::Tensor i = at::arange(Nq, idx).unsqueeze(1), j = at::arange(Nk, idx).unsqueeze(0);
  const int64_t diag = Nk - Nq;
  if (o.alibi_slopes.has_value()) {
    at::Tensor slopes = o.alibi_slopes->to(q.scalar_type());
    if (slopes.dim() == 1) slopes = slopes.unsqueeze(0).expand({B, Hq});
    s = s - slopes.view({B, Hq, 1, 1}) * (i + diag - j).abs().to(q.scalar_type());
  }
  at::Tensor visible = at::ones({Nq, Nk}, idx.dtype(at::kBool));
  const int64_t left = o.window_size[0], right = o.causal ? 0 : o.window_size[1];
  if (left >= 0) visible = visible & (j >= i + diag - left);
  if (right >= 0) visible = visible & (j <= i + diag + right);
  s = s.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  at::Tensor p = at::nan_to_num(at::exp(s - at::logsumexp(s, -1, true)), 0.0, 0.0, 0.0);
  if (keep.defined()) p = p * keep.to(p.scalar_type()) / (1.0 - o.dropout_p);
  return at::matmul(p, vr);
}

TEST(Variants, OptionsApiMatchesReferenceWithGradients) {
  const Inputs in = random_inputs({2, 4, 2, 37, 51, 16, false, at::kDouble, true}, at::kCPU, true);
  AttentionOptions o;
  o.set_causal(true).set_window(9, -1).set_softcap(2.5).set_alibi_slopes(at::rand({2, 4})).set_dropout(
      0.2, at::tensor({int64_t{11}, int64_t{22}}));
  const at::Tensor keep = dropout_keep_mask(*o.rng_state, 2, 4, 37, 51, 0.2);
  const at::Tensor out = attention(in.q, in.k, in.v, o);
  const at::Tensor ref = reference(in.q, in.k, in.v, o, keep);
  EXPECT_LT(max_abs_diff(out, ref), 1e-12);
  const auto grads = torch::autograd::grad({out}, {in.q, in.k, in.v}, {in.dout});
  const auto ref_grads = torch::autograd::grad({ref}, {in.q, in.k, in.v}, {in.dout});
  for (int g = 0; g < 3; ++g) EXPECT_LT(max_abs_diff(grads[g], ref_grads[g]), 1e-12) << "gradient " << g;
}

TEST(Variants, VarlenEqualsPerSequenceCalls) {
  const std::vector<int64_t> lengths{4, 0, 29, 1};
  int64_t total = 0;
  std::vector<int32_t> cu{0};
  for (int64_t n : lengths) cu.push_back(static_cast<int32_t>(total += n));
  const at::Tensor q = at::randn({total, 4, 16}, at::kDouble), k = at::randn({total, 2, 16}, at::kDouble),
                   v = at::randn({total, 2, 16}, at::kDouble);
  const at::Tensor cu_t = at::tensor(cu, at::TensorOptions().dtype(at::kInt));
  AttentionOptions o;
  o.set_causal(true).set_window(5, -1).set_softcap(3.0);
  const at::Tensor out = attention_varlen(q, k, v, cu_t, cu_t, 29, 29, o);
  for (size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] == 0) continue;
    auto seq = [&](const at::Tensor& t) { return t.narrow(0, cu[b], lengths[b]).transpose(0, 1).unsqueeze(0); };
    EXPECT_TRUE(at::equal(seq(out), attention(seq(q), seq(k), seq(v), o))) << "sequence " << b;
  }
}

TEST(Variants, BadOptionsRaiseClearErrors) {
  for (const at::Device d : {at::Device(at::kCPU), at::Device(at::kMeta)}) {
    const auto opts = at::TensorOptions().device(d);
    const at::Tensor q = at::randn({2, 4, 8, 16}, opts), kv = at::randn({2, 2, 8, 16}, opts);
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_window(-3, 0)); }, "window_size must be -1");
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_softcap(-2)); }, "softcap must be a finite number");
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_dropout(1.0)); }, "dropout_p must be in [0, 1)");
    expect_error([&] { attention_with_lse(q, kv, kv, AttentionOptions().set_dropout(0.5)); },
                 "dropout_p = 0.5 needs rng_state");
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_alibi_slopes(at::rand({3}, opts))); },
                 "alibi_slopes has shape [3]; expected (Hq,) = (4,) or (B, Hq) = (2, 4)");
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_alibi_slopes(at::rand({4}, opts.dtype(at::kHalf)))); },
                 "alibi_slopes has dtype Half; expected float32");
    expect_error([&] { attention(q, kv, kv, AttentionOptions().set_dropout(0.1, at::tensor({1.0, 2.0}))); },
                 "rng_state must be an int64 CPU tensor");
  }
  const at::Tensor q = at::randn({10, 4, 16}), kv = at::randn({12, 2, 16});
  const at::Tensor cu_q = at::tensor({0, 4, 10}, at::TensorOptions().dtype(at::kInt));
  const at::Tensor cu_k = at::tensor({0, 5, 12}, at::TensorOptions().dtype(at::kInt));
  expect_error([&] { attention_varlen(q, kv, kv, cu_q.to(at::kLong), cu_k, 6, 7); }, "cu_seqlens_q has dtype Long");
  expect_error([&] { attention_varlen(q, kv, kv, cu_q, cu_k.narrow(0, 0, 2), 6, 7); },
               "cu_seqlens_q has 3 elements but cu_seqlens_k has 2");
  expect_error([&] { attention_varlen(q, kv, kv, cu_q + 1, cu_k, 6, 7); }, "cu_seqlens_q must start at 0, got 1");
  expect_error([&] { attention_varlen(q, kv, kv, cu_q, cu_k, 5, 7); },
               "sequence 1 has length 6 (from cu_seqlens_q) but max_seqlen is 5");
  expect_error([&] { attention_varlen(q, kv, kv, at::tensor({0, 11, 10}, cu_q.options()), cu_k, 11, 7); },
               "cu_seqlens_q must be non-decreasing");
  expect_error([&] { attention_varlen(q, kv, kv, at::tensor({0, 4, 9}, cu_q.options()), cu_k, 6, 7); },
               "cu_seqlens_q must end at the number of packed tokens, 10, got 9");
  expect_error([&] { attention_varlen(q.unsqueeze(0), kv, kv, cu_q, cu_k, 6, 7); }, "q must have 3 dimensions");
}

// A one-layer causal model with a sliding window and attention dropout, trained from C++.
struct WindowedAttention : torch::nn::Module {
  WindowedAttention(int64_t dim, int64_t heads) : heads(heads) {
    qkv = register_module("qkv", torch::nn::Linear(dim, 3 * dim));
    proj = register_module("proj", torch::nn::Linear(dim, dim));
  }
  at::Tensor forward(const at::Tensor& x, const AttentionOptions& o, at::ScalarType dtype) {
    const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
    auto parts = qkv->forward(x).view({B, N, 3, heads, C / heads}).permute({2, 0, 3, 1, 4}).to(dtype);
    at::Tensor y = attention(parts[0], parts[1], parts[2], o);
    return proj->forward(y.to(at::kFloat).transpose(1, 2).reshape({B, N, C}));
  }
  int64_t heads;
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
};

void train_with_window_and_dropout(at::Device device, at::ScalarType dtype) {
  torch::manual_seed(0);
  auto model = std::make_shared<WindowedAttention>(64, 4);
  model->to(device);
  const at::Tensor x = torch::randn({2, 96, 64}, device), target = torch::randn({2, 96, 64}, device);
  AttentionOptions o;
  o.set_causal(true).set_window(16, 0).set_dropout(0.1);  // rng_state drawn per step by the autograd path
  torch::optim::SGD opt(model->parameters(), torch::optim::SGDOptions(0.5));
  std::vector<double> losses;
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    const at::Tensor loss = torch::mse_loss(model->forward(x, o, dtype), target);
    loss.backward();
    for (const auto& p : model->parameters()) ASSERT_TRUE(at::isfinite(p.grad()).all().item<bool>());
    opt.step();
    losses.push_back(loss.item<double>());
  }
  EXPECT_LT(losses.back(), losses.front()) << "loss " << losses.front() << " -> " << losses.back();
}

TEST(VariantsTraining, CpuLoopWithWindowAndDropout) { train_with_window_and_dropout(at::kCPU, at::kFloat); }

TEST(VariantsTraining, CudaLoopWithWindowAndDropout) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device on this machine: CUDA training loop not run";
  train_with_window_and_dropout(at::kCUDA, at::kBFloat16);
}

}  // namespace
}  // namespace flash_attn2::testing
