// The SDPA backend provider from C++ (flash_attn2::sdpa::activate / restore): a LibTorch program's calls of
// PyTorch's flash-attention ops run on flash_attn2 while it is active, with aten's return values, and go back to
// PyTorch's kernels after restore. On the CPU (PyTorch has no kernel there) and, when a GPU is present, on CUDA.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "flash_attn2/flash_attn2.h"
#include "reference.h"

namespace flash_attn2::testing {
namespace {

struct Active {
  Active() { sdpa::activate(); }
  ~Active() { sdpa::restore(); }
};

void sdpa_op_runs_on_flash_attn2(at::Device device) {
  torch::manual_seed(0);
  const auto opts = at::TensorOptions().dtype(at::kBFloat16).device(device);
  // (B, N, H, D) buffers viewed as (B, H, N, D), Nq != Nk, GQA.
  const at::Tensor q = at::randn({2, 33, 4, 64}, opts).transpose(1, 2);
  const at::Tensor k = at::randn({2, 50, 2, 64}, opts).transpose(1, 2);
  const at::Tensor v = at::randn({2, 50, 2, 64}, opts).transpose(1, 2);
  const sdpa::Counters before = sdpa::counters();
  ASSERT_FALSE(sdpa::is_active());
  {
    Active active;
    ASSERT_TRUE(sdpa::is_active());
    sdpa::activate();  // idempotent
    auto [out, lse, cum_q, cum_k, max_q, max_k, seed, offset, debug] =
        at::_scaled_dot_product_flash_attention(q, k, v, 0.0, /*is_causal=*/true);
    EXPECT_EQ(sdpa::counters().forward, before.forward + 1);
    EXPECT_FALSE(cum_q.defined());
    EXPECT_EQ(max_q, 33);
    EXPECT_EQ(max_k, 50);
    EXPECT_EQ(seed.scalar_type(), at::kUInt64);
    EXPECT_EQ(out.strides(), at::empty_like(q).strides());
    AttentionOptions o;
    o.causal = true;
    auto [want_out, want_lse] = attention_with_lse(q, k, v, o);
    EXPECT_TRUE(at::equal(out, want_out));
    EXPECT_TRUE(at::equal(lse, want_lse));  // Nq <= Nk: every row sees keys, so no +inf rows

    const at::Tensor dout = at::randn_like(out);
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, {}, {}, 33, 50, 0.0,
                                                                         true, seed, offset);
    EXPECT_EQ(sdpa::counters().backward, before.backward + 1);
    auto [want_dq, want_dk, want_dv] = attention_backward(dout, q, k, v, want_out, want_lse, o);
    EXPECT_TRUE(at::equal(dq, want_dq));
    EXPECT_TRUE(at::equal(dk, want_dk));
    EXPECT_TRUE(at::equal(dv, want_dv));
  }
  EXPECT_FALSE(sdpa::is_active());
  if (device.is_cpu()) {
    expect_error([&] { at::_scaled_dot_product_flash_attention(q, k, v); }, "CPU");
  } else {
    at::_scaled_dot_product_flash_attention(q, k, v);  // PyTorch's kernel again
    EXPECT_EQ(sdpa::counters().forward, before.forward + 1);
  }
}

TEST(SdpaProvider, ActivateRoutesAtenFlashOpsCpu) { sdpa_op_runs_on_flash_attn2(at::kCPU); }

TEST(SdpaProvider, ActivateRoutesAtenFlashOpsCuda) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  sdpa_op_runs_on_flash_attn2(at::kCUDA);
}

TEST(SdpaProvider, UnsupportedCallNamesTheReasonOnCpu) {
  Active active;
  const at::Tensor q = at::randn({1, 2, 8, 64}, at::kFloat);
  expect_error([&] { at::_scaled_dot_product_flash_attention(q, q, q); },
               "flash_attn2's SDPA provider cannot run dtype Float");
}

}  // namespace
}  // namespace flash_attn2::testing
