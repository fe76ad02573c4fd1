// Meta kernels: shapes, dtypes and strides of the outputs without touching data, so FakeTensor,
// torch.compile and torch.export can trace the ops. They run the same checks as the real kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "op_args.h"
#include "trivial_cases.h"

namespace flash_attn2 {
namespace {

Tensor2 fwd_with_lse_meta(FA2_FWD_PARAMS) {
  const AttentionShape s = check_forward_inputs("flash_attn2::fwd_with_lse", q, k, v, scale);
  check_variant("flash_attn2::fwd_with_lse", q, s.batch, s.heads_q, causal, FA2_OPTION_ARGS);
  return {empty_like_input(q),
          at::empty_symint({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

at::Tensor fwd_meta(FA2_FWD_PARAMS) {
  const AttentionShape s = check_forward_inputs("flash_attn2::fwd", q, k, v, scale);
  check_variant("flash_attn2::fwd", q, s.batch, s.heads_q, causal, FA2_OPTION_ARGS);
  return empty_like_input(q);
}

Tensor3 bwd_meta(FA2_BWD_PARAMS) {
  const AttentionShape s = check_backward_inputs("flash_attn2::bwd", dout, q, k, v, out, lse, scale);
  check_variant("flash_attn2::bwd", q, s.batch, s.heads_q, causal, FA2_BWD_OPTION_ARGS);
  return {empty_like_input(q), empty_like_input(k),
          empty_like_input(v)};
}

Tensor2 fwd_varlen_with_lse_meta(FA2_VARLEN_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_varlen_with_lse";
  const AttentionShape s =
      check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_variant(op, q, s.batch, s.heads_q, causal, FA2_OPTION_ARGS);
  return {empty_like_input(q),
          at::empty_symint({s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

at::Tensor fwd_varlen_meta(FA2_VARLEN_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_varlen";
  const AttentionShape s =
      check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_variant(op, q, s.batch, s.heads_q, causal, FA2_OPTION_ARGS);
  return empty_like_input(q);
}

Tensor3 bwd_varlen_meta(FA2_VARLEN_BWD_PARAMS) {
  constexpr const char* op = "flash_attn2::bwd_varlen";
  const AttentionShape s = check_varlen_backward_inputs(op, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                        max_seqlen_q, max_seqlen_k, scale);
  check_variant(op, q, s.batch, s.heads_q, causal, FA2_BWD_OPTION_ARGS);
  return {empty_like_input(q), empty_like_input(k),
          empty_like_input(v)};
}

Tensor2 fwd_kvcache_meta(FA2_KVCACHE_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_kvcache";
  const KvCacheShape ks = check_kvcache_inputs(op, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                               scale, num_splits);
  check_variant(op, q, ks.s.batch, ks.s.heads_q, causal, window_size, softcap, alibi_slopes, 0.0, std::nullopt);
  return {empty_like_input(q),
          at::empty_symint({ks.s.batch, ks.s.heads_q, ks.s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())))};
}

at::Tensor dropout_keep_mask_meta(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                                  int64_t seqlen_k, double dropout_p, std::optional<c10::Device> device) {
  return at::empty({batch, heads, seqlen_q, seqlen_k}, rng_state.options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, Meta, m) {
  m.impl("fwd", &fwd_meta);
  m.impl("fwd_with_lse", &fwd_with_lse_meta);
  m.impl("bwd", &bwd_meta);
  m.impl("fwd_varlen", &fwd_varlen_meta);
  m.impl("fwd_varlen_with_lse", &fwd_varlen_with_lse_meta);
  m.impl("bwd_varlen", &bwd_varlen_meta);
  m.impl("dropout_keep_mask", &dropout_keep_mask_meta);
  m.impl("fwd_kvcache", &fwd_kvcache_meta);
}

}  // namespace flash_attn2
