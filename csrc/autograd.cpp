// Autograd for the flash_attn2 ops, in C++ so LibTorch programs get gradients without Python.
// fwd / fwd_with_lse (and their varlen forms) save (q, k, v, out, lse) with the options and call bwd through the
// dispatcher; the LSE output is not differentiable. fwd and fwd_varlen draw rng_state from the default generator
// of q's device when dropout is on and none is given (the *_with_lse ops hand no state back, so they require
// it); the backward reuses it, and runs deterministically when at::globalContext().deterministicAlgorithms()
// is on. bwd itself has an Autograd kernel whose backward refuses double backward clearly.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include "flash_attn2/flash_attn2.h"
#include "op_args.h"

namespace flash_attn2 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// The options as saved between forward and backward.
struct SavedOptions {
  static void save(AutogradContext* ctx, bool causal, std::optional<double> scale, c10::IntArrayRef window_size,
                   double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                   const at::Tensor& rng_state) {
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale.has_value() ? c10::IValue(*scale) : c10::IValue();
    ctx->saved_data["window"] = window_size.vec();
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["alibi"] = alibi_slopes.has_value() ? c10::IValue(*alibi_slopes) : c10::IValue();
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["rng_state"] = rng_state.defined() ? c10::IValue(rng_state) : c10::IValue();
  }
  explicit SavedOptions(AutogradContext* ctx)
      : causal(ctx->saved_data["causal"].toBool()),
        scale(ctx->saved_data["scale"].toOptional<double>()),
        window(ctx->saved_data["window"].toIntVector()),
        softcap(ctx->saved_data["softcap"].toDouble()),
        alibi(ctx->saved_data["alibi"].toOptional<at::Tensor>()),
        dropout_p(ctx->saved_data["dropout_p"].toDouble()),
        rng_state(ctx->saved_data["rng_state"].toOptional<at::Tensor>()),
        deterministic(at::globalContext().deterministicAlgorithms()) {}
  bool causal;
  std::optional<double> scale;
  std::vector<int64_t> window;
  double softcap;
  std::optional<at::Tensor> alibi;
  double dropout_p;
  std::optional<at::Tensor> rng_state;
  bool deterministic;
};

// rng_state for a differentiable call: the given one, or (draw = true) a fresh one when dropout is on.
at::Tensor resolve_rng_state(const std::optional<at::Tensor>& given, double dropout_p, bool draw,
                             const at::Tensor& q) {
  if (given.has_value() && given->defined()) return *given;
  if (!draw || !(dropout_p > 0 && dropout_p < 1)) return at::Tensor();  // invalid p: the op's check reports it
  // Meta tensors (shape inference) have no generator; any state gives the same shapes.
  if (q.device().is_meta()) return at::zeros({2}, at::TensorOptions().dtype(at::kLong));
  return draw_rng_state(q.device());
}

std::optional<at::Tensor> as_optional(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// What both forwards keep for their backward: the options (rng_state included) and the LSE marked
// non-differentiable.
void finish_forward(AutogradContext* ctx, const at::Tensor& lse, bool causal, std::optional<double> scale,
                    c10::IntArrayRef window_size, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                    double dropout_p, const at::Tensor& rng) {
  SavedOptions::save(ctx, causal, scale, window_size, softcap, alibi_slopes, dropout_p, rng);
  ctx->mark_non_differentiable({lse});
}

// The backward's gradient list: dq, dk, dv, then none for the n - 3 other inputs.
variable_list input_grads(Tensor3 g, size_t n) {
  variable_list grads(n);
  std::tie(grads[0], grads[1], grads[2]) = std::move(g);
  return grads;
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               bool causal, std::optional<double> scale, c10::IntArrayRef window_size,
                               double softcap, const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                               const std::optional<at::Tensor>& rng_state_in, bool draw_rng) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor rng = resolve_rng_state(rng_state_in, dropout_p, draw_rng, q);
    static const auto op = op_handle<FwdLseSig>("flash_attn2::fwd_with_lse");
    auto [out, lse] = op.call(q, k, v, causal, scale, window_size, softcap, alibi_slopes, dropout_p, as_optional(rng));
    ctx->save_for_backward({q, k, v, out, lse});
    finish_forward(ctx, lse, causal, scale, window_size, softcap, alibi_slopes, dropout_p, rng);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dout = grad_outputs[0];
    constexpr size_t kInputs = 11;
    if (!dout.defined()) return variable_list(kInputs);
    const SavedOptions o(ctx);
    static const auto op = op_handle<BwdSig>("flash_attn2::bwd");
    return input_grads(op.call(dout, saved[0], saved[1], saved[2], saved[3], saved[4], o.causal, o.scale, o.window,
                               o.softcap, o.alibi, o.dropout_p, o.rng_state, o.deterministic),
                       kInputs);
  }
};

class VarlenAttentionFunction : public torch::autograd::Function<VarlenAttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                               c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal,
                               std::optional<double> scale, c10::IntArrayRef window_size, double softcap,
                               const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                               const std::optional<at::Tensor>& rng_state_in, bool draw_rng) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const at::Tensor rng = resolve_rng_state(rng_state_in, dropout_p, draw_rng, q);
    static const auto op = op_handle<VarlenFwdLseSig>("flash_attn2::fwd_varlen_with_lse");
    auto [out, lse] = op.call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
                              window_size, softcap, alibi_slopes, dropout_p, as_optional(rng));
    ctx->save_for_backward({q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k});
    ctx->saved_data["max_seqlen_q"] = max_seqlen_q;
    ctx->saved_data["max_seqlen_k"] = max_seqlen_k;
    finish_forward(ctx, lse, causal, scale, window_size, softcap, alibi_slopes, dropout_p, rng);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& dout = grad_outputs[0];
    constexpr size_t kInputs = 15;
    if (!dout.defined()) return variable_list(kInputs);
    const SavedOptions o(ctx);
    static const auto op = op_handle<VarlenBwdSig>("flash_attn2::bwd_varlen");
    return input_grads(op.call(dout, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                               ctx->saved_data["max_seqlen_q"].toSymInt(), ctx->saved_data["max_seqlen_k"].toSymInt(),
                               o.causal, o.scale, o.window, o.softcap, o.alibi, o.dropout_p, o.rng_state,
                               o.deterministic),
                       kInputs);
  }
};

// Gives bwd an Autograd kernel: its outputs hang off the differentiable inputs through a node whose backward
// (double backward) stops with a clear error. The gradients are computed before, below autograd.
class NoDoubleBackward : public torch::autograd::Function<NoDoubleBackward> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, Tensor3* grads) {
    return {std::get<0>(*grads), std::get<1>(*grads), std::get<2>(*grads)};
  }
  static variable_list backward(AutogradContext* /*ctx*/, variable_list /*grad_outputs*/) {
    TORCH_CHECK(false,
                "flash_attn2: double backward (differentiating the attention gradient, e.g. "
                "create_graph=True followed by another backward) is not supported");
  }
};

template <typename Signature, typename... Args>
Tensor3 backward_op(const char* name, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& out, Args&&... args) {
  static const auto op = op_handle<Signature>(name);
  Tensor3 grads;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    grads = op.call(std::forward<Args>(args)...);
  }
  auto r = NoDoubleBackward::apply(dout, q, k, v, out, &grads);
  return {r[0], r[1], r[2]};
}

at::Tensor fwd_autograd(FA2_FWD_PARAMS) {
  return AttentionFunction::apply(FA2_FWD_ARGS, /*draw_rng=*/true)[0];
}

Tensor2 fwd_with_lse_autograd(FA2_FWD_PARAMS) {
  auto outputs = AttentionFunction::apply(FA2_FWD_ARGS, /*draw_rng=*/false);
  return {outputs[0], outputs[1]};
}

Tensor3 bwd_autograd(FA2_BWD_PARAMS) {
  return backward_op<BwdSig>("flash_attn2::bwd", dout, q, k, v, out, FA2_BWD_ARGS);
}

at::Tensor fwd_varlen_autograd(FA2_VARLEN_FWD_PARAMS) {
  return VarlenAttentionFunction::apply(FA2_VARLEN_FWD_ARGS, /*draw_rng=*/true)[0];
}

Tensor2 fwd_varlen_with_lse_autograd(FA2_VARLEN_FWD_PARAMS) {
  auto outputs = VarlenAttentionFunction::apply(FA2_VARLEN_FWD_ARGS, /*draw_rng=*/false);
  return {outputs[0], outputs[1]};
}

Tensor3 bwd_varlen_autograd(FA2_VARLEN_BWD_PARAMS) {
  return backward_op<VarlenBwdSig>("flash_attn2::bwd_varlen", dout, q, k, v, out, FA2_VARLEN_BWD_ARGS);
}

// fwd_kvcache is inference only: with grad mode on and an input that requires grad it refuses, instead of
// returning outputs that silently have no gradient. Otherwise it runs below autograd and bumps the caches'
// version counters (they were written in place).
Tensor2 fwd_kvcache_autograd(FA2_KVCACHE_PARAMS) {
  auto needs_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->requires_grad(); };
  const bool any = q.requires_grad() || k_cache.requires_grad() || v_cache.requires_grad() || needs_grad(k_new) ||
                   needs_grad(v_new) || needs_grad(alibi_slopes);
  TORCH_CHECK(!(any && at::GradMode::is_enabled()), "flash_attn2::fwd_kvcache is not differentiable (inference "
              "only), but an input requires grad; call it under torch.no_grad() / torch.inference_mode(), or use "
              "fwd for training");
  Tensor2 result;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    result = op_handle<KvCacheSig>("flash_attn2::fwd_kvcache").call(FA2_KVCACHE_ARGS);
  }
  if (!c10::InferenceMode::is_enabled()) {
    torch::autograd::impl::bump_version(k_cache);
    torch::autograd::impl::bump_version(v_cache);
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, Autograd, m) {
  m.impl("fwd_kvcache", &fwd_kvcache_autograd);
  m.impl("fwd", &fwd_autograd);
  m.impl("fwd_with_lse", &fwd_with_lse_autograd);
  m.impl("bwd", &bwd_autograd);
  m.impl("fwd_varlen", &fwd_varlen_autograd);
  m.impl("fwd_varlen_with_lse", &fwd_varlen_with_lse_autograd);
  m.impl("bwd_varlen", &bwd_varlen_autograd);
}

}  // namespace flash_attn2
