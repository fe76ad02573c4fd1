// flash_attn2: exact FlashAttention-2 attention for LibTorch.
//
// Plain C++ entry points that call the flash_attn2 ops through the PyTorch dispatcher, so they reach the
// CPU, CUDA, Meta and Autograd kernels exactly as torch.ops.flash_attn2.* does from Python.
//
// Shapes: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D); Hq % Hkv == 0 (grouped-query attention). Any strides.
// Packed variable-length batches (the *_varlen functions): q (Tq, Hq, D), k, v (Tk, Hkv, D) with int32
// cu_seqlens (B + 1,) on the inputs' device; sequence b is rows [cu[b], cu[b + 1]).
// Returns fresh tensors in q's dtype on q's device, in the memory order of the corresponding input when it is
// dense with a contiguous last dim (out like q, dq/dk/dv like q/k/v), else contiguous; lse is (B, Hq, Nq)
// (varlen: (Hq, Tq)), contiguous float32
// (float64 for float64 inputs).
//
// Options (AttentionOptions; FlashAttention-2's semantics, with diag = Nk - Nq, bottom-right aligned):
//   causal        key j hidden from query i when j > i + diag (same as window right = 0)
//   scale         softmax scale, default 1/sqrt(D)
//   window_size   (left, right): key j visible iff i + diag - left <= j <= i + diag + right; -1 = unbounded
//   softcap       > 0: logits become softcap * tanh(scale q.k / softcap)
//   alibi_slopes  float32 (Hq,) or (B, Hq): logits get - slope_h * |i + diag - j|
//   dropout_p     P is multiplied by keep / (1 - p) after the softmax; the keep mask is a pure function of
//                 rng_state = int64 CPU [seed, offset] and (b, h, i, j), identical on CPU and CUDA
//                 (dropout_keep_mask materialises it). The differentiable functions draw rng_state from the
//                 device's default generator when it is not given.
//   deterministic backward only: bitwise reproducible gradients (the differentiable functions set it when
//                 at::globalContext().deterministicAlgorithms() is on).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <array>
#include <optional>
#include <tuple>

namespace flash_attn2 {

struct AttentionOptions {
  bool causal = false;
  std::optional<double> scale;
  std::array<int64_t, 2> window_size{-1, -1};
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes;
  double dropout_p = 0.0;
  std::optional<at::Tensor> rng_state;
  bool deterministic = false;  // backward only

  AttentionOptions& set_causal(bool v) { causal = v; return *this; }
  AttentionOptions& set_scale(double v) { scale = v; return *this; }
  AttentionOptions& set_window(int64_t left, int64_t right) { window_size = {left, right}; return *this; }
  AttentionOptions& set_softcap(double v) { softcap = v; return *this; }
  AttentionOptions& set_alibi_slopes(at::Tensor v) { alibi_slopes = std::move(v); return *this; }
  AttentionOptions& set_dropout(double p, std::optional<at::Tensor> state = std::nullopt) {
    dropout_p = p;
    rng_state = std::move(state);
    return *this;
  }
  AttentionOptions& set_deterministic(bool v) { deterministic = v; return *this; }
};

// softmax(q k^T * scale) v, differentiable.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal = false,
                     std::optional<double> scale = std::nullopt);
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& options);

// The attention output and the natural-log log-sum-exp of each query row's logits
// (-inf for a row that sees no key, whose output is 0). Differentiable in the output; lse is not.
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal = false,
                                                      std::optional<double> scale = std::nullopt);
std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttentionOptions& options);

// Gradients (dq, dk, dv) given dout and the forward's q, k, v, out and lse (and the forward's options,
// rng_state included when dropout was used).
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal = false,
                                                                  std::optional<double> scale = std::nullopt);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const AttentionOptions& options);

// Packed variable-length batches; each sequence behaves exactly like the dense functions on its own slice.
at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, const AttentionOptions& options = {});
std::tuple<at::Tensor, at::Tensor> attention_varlen_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k,
                                                             const AttentionOptions& options = {});
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const AttentionOptions& options = {});

// KV-cache attention for decoding (inference only; raises under grad mode when an input requires grad).
// q (B, Hq, Nq, D). Dense caches (B, Hkv, capacity, D), any strides with a contiguous last dim; paged caches
// (num_pages, page_size, Hkv, D) with block_table (B, max_pages) int32 (page_size a power of two).
// cache_seqlens (B,) int32: valid keys per sequence before this call (nullopt: the whole capacity; required when
// paged or appending). k_new / v_new (B, Hkv, Nnew, D) are written into the caches in place at
// [cache_seqlens[b], + Nnew) first; the attention then sees cache_seqlens[b] + Nnew keys (bottom-right aligned
// options as for attention; dropout and deterministic do not apply). The caller advances cache_seqlens.
// num_splits: 0 picks how many blocks split the keys, 1 disables splitting. No host synchronisation on CUDA,
// so a decode step can be captured in a CUDA graph. Returns (out like q, lse (B, Hq, Nq) float32).
std::tuple<at::Tensor, at::Tensor> attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache,
                                                     const std::optional<at::Tensor>& k_new = std::nullopt,
                                                     const std::optional<at::Tensor>& v_new = std::nullopt,
                                                     const std::optional<at::Tensor>& cache_seqlens = std::nullopt,
                                                     const std::optional<at::Tensor>& block_table = std::nullopt,
                                                     const AttentionOptions& options = {}, int64_t num_splits = 0);

// The dropout keep mask the kernels apply for rng_state, as a bool (batch, heads, seqlen_q, seqlen_k) tensor.
at::Tensor dropout_keep_mask(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                             int64_t seqlen_k, double dropout_p, std::optional<c10::Device> device = std::nullopt);

// A fresh [seed, offset] from the default generator of `device` (what the differentiable functions use).
at::Tensor draw_rng_state(c10::Device device);


// The SDPA backend provider: routes PyTorch's flash-attention ops (aten::_scaled_dot_product_flash_attention and
// its backward, the flash path of F.scaled_dot_product_attention; aten::_flash_attention_forward / _backward,
// which torch.nn.attention.varlen.varlen_attn calls) to flash_attn2's kernels with aten's exact semantics
// (FlashAttention-2's bottom-right causal alignment and window rules, aten's layouts and return values, +inf LSE
// for rows that see no key, dropout state from the device's default generator in aten's rng_state tensors).
// What flash_attn2 cannot run (return_debug_mask, seqused_k, alibi_slopes on _flash_attention_forward, devices
// older than sm_80, dropout under CUDA graph capture, a backward whose dropout forward ran on PyTorch's kernel)
// falls back to PyTorch's kernel. While active the same ops also run on the CPU, where PyTorch has no kernel
// for them. The Python package registers this as torch.nn.attention's "flash_attn2" implementation
// (activate_flash_attention_impl / restore_flash_attention_impl); from C++ call these.
namespace sdpa {
void activate();  // idempotent
void restore();   // back to PyTorch's kernels; idempotent
bool is_active();
// Calls the adapters ran on flash_attn2 and calls they handed to PyTorch's kernel, since the process started.
struct Counters {
  int64_t forward, backward, fallback_forward, fallback_backward;
};
Counters counters();
}  // namespace sdpa

}  // namespace flash_attn2
