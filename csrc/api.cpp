#include "flash_attn2/flash_attn2.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>

#include "op_args.h"

namespace flash_attn2 {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Undefined tensors cannot reach the kernels' checks: the dispatcher needs each one's device first.
void require_defined(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  for (const auto& [name, tensor] : args) {
    TORCH_CHECK(tensor->defined(), op, ": ", name, " is undefined; expected a tensor");
  }
}

}  // namespace

// The option values of AttentionOptions in the ops' argument order.
#define FA2_OPTS(o) \
  c10::IntArrayRef(o.window_size), o.softcap, o.alibi_slopes, o.dropout_p, o.rng_state

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o) {
  static const auto op = op_handle<FwdSig>("flash_attn2::fwd");
  require_defined("flash_attn2::fwd", {{"q", &q}, {"k", &k}, {"v", &v}});
  return op.call(q, k, v, o.causal, o.scale, FA2_OPTS(o));
}

std::tuple<at::Tensor, at::Tensor> attention_kvcache(const at::Tensor& q, const at::Tensor& k_cache,
                                                     const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                                     const std::optional<at::Tensor>& v_new,
                                                     const std::optional<at::Tensor>& cache_seqlens,
                                                     const std::optional<at::Tensor>& block_table,
                                                     const AttentionOptions& o, int64_t num_splits) {
  constexpr const char* name = "flash_attn2::fwd_kvcache";
  static const auto op = op_handle<KvCacheSig>(name);
  require_defined(name, {{"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}});
  TORCH_CHECK(o.dropout_p == 0, name, ": dropout does not apply to KV-cache attention (inference), got dropout_p = ",
              o.dropout_p);
  return op.call(q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, o.causal, o.scale,
                 c10::IntArrayRef(o.window_size), o.softcap, o.alibi_slopes, num_splits);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     std::optional<double> scale) {
  AttentionOptions o;
  o.causal = causal;
  o.scale = scale;
  return attention(q, k, v, o);
}

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const AttentionOptions& o) {
  static const auto op = op_handle<FwdLseSig>("flash_attn2::fwd_with_lse");
  require_defined("flash_attn2::fwd_with_lse", {{"q", &q}, {"k", &k}, {"v", &v}});
  return op.call(q, k, v, o.causal, o.scale, FA2_OPTS(o));
}

std::tuple<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      bool causal, std::optional<double> scale) {
  AttentionOptions o;
  o.causal = causal;
  o.scale = scale;
  return attention_with_lse(q, k, v, o);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  const AttentionOptions& o) {
  static const auto op = op_handle<BwdSig>("flash_attn2::bwd");
  require_defined("flash_attn2::bwd",
                  {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}});
  return op.call(dout, q, k, v, out, lse, o.causal, o.scale, FA2_OPTS(o), o.deterministic);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& dout, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& lse,
                                                                  bool causal, std::optional<double> scale) {
  AttentionOptions o;
  o.causal = causal;
  o.scale = scale;
  return attention_backward(dout, q, k, v, out, lse, o);
}

at::Tensor attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                            int64_t max_seqlen_k, const AttentionOptions& o) {
  static const auto op = op_handle<VarlenFwdSig>("flash_attn2::fwd_varlen");
  require_defined("flash_attn2::fwd_varlen", {{"q", &q}, {"k", &k}, {"v", &v}, {"cu_seqlens_q", &cu_seqlens_q},
                                              {"cu_seqlens_k", &cu_seqlens_k}});
  return op.call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o.causal, o.scale, FA2_OPTS(o));
}

std::tuple<at::Tensor, at::Tensor> attention_varlen_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, const AttentionOptions& o) {
  static const auto op = op_handle<VarlenFwdLseSig>("flash_attn2::fwd_varlen_with_lse");
  require_defined("flash_attn2::fwd_varlen_with_lse", {{"q", &q}, {"k", &k}, {"v", &v},
                                                       {"cu_seqlens_q", &cu_seqlens_q},
                                                       {"cu_seqlens_k", &cu_seqlens_k}});
  return op.call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o.causal, o.scale, FA2_OPTS(o));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, const AttentionOptions& o) {
  static const auto op = op_handle<VarlenBwdSig>("flash_attn2::bwd_varlen");
  require_defined("flash_attn2::bwd_varlen", {{"dout", &dout}, {"q", &q}, {"k", &k}, {"v", &v}, {"out", &out},
                                              {"lse", &lse}, {"cu_seqlens_q", &cu_seqlens_q},
                                              {"cu_seqlens_k", &cu_seqlens_k}});
  return op.call(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, o.causal, o.scale,
                 FA2_OPTS(o), o.deterministic);
}

at::Tensor dropout_keep_mask(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                             int64_t seqlen_k, double dropout_p, std::optional<c10::Device> device) {
  static const auto op =
      op_handle<at::Tensor(const at::Tensor&, int64_t, int64_t, int64_t, int64_t, double, std::optional<c10::Device>)>(
          "flash_attn2::dropout_keep_mask");
  require_defined("flash_attn2::dropout_keep_mask", {{"rng_state", &rng_state}});
  return op.call(rng_state, batch, heads, seqlen_q, seqlen_k, dropout_p, device);
}

at::Tensor draw_rng_state(c10::Device device) {
  at::Generator gen = at::globalContext().defaultGenerator(device);
  uint64_t seed = 0, offset = 0;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    if (device.is_cpu()) {
      auto* cpu = gen.get<at::CPUGeneratorImpl>();
      seed = cpu->random64();
      offset = cpu->random64();
    } else {
      // Philox-based device generators (CUDA): the current seed, and an offset reserved by advancing the
      // generator's, as PyTorch's own dropout kernels do.
      seed = gen.current_seed();
      offset = gen.get_offset();
      gen.set_offset(offset + 4);
    }
  }
  return at::tensor({static_cast<int64_t>(seed), static_cast<int64_t>(offset)}, at::TensorOptions().dtype(at::kLong));
}

TORCH_LIBRARY_IMPL(flash_attn2, CompositeExplicitAutograd, m) {
  m.impl("draw_rng_state", [](c10::Device device) { return draw_rng_state(device); });
}

}  // namespace flash_attn2
