// The C++ parameter lists of the ops in ops.cpp, written once: every backend (CPU, CUDA, Meta, Autograd) and
// the C++ API use these, so a new option is added in one place per list.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

// The keyword options of fwd / fwd_with_lse / fwd_varlen / fwd_varlen_with_lse, and their names.
#define FA2_OPTION_PARAMS                                                                                \
  c10::IntArrayRef window_size, double softcap, const std::optional<at::Tensor>&alibi_slopes, double dropout_p, \
      const std::optional<at::Tensor>&rng_state
#define FA2_OPTION_ARGS window_size, softcap, alibi_slopes, dropout_p, rng_state
// bwd / bwd_varlen add `deterministic`.
#define FA2_BWD_OPTION_PARAMS FA2_OPTION_PARAMS, bool deterministic
#define FA2_BWD_OPTION_ARGS FA2_OPTION_ARGS, deterministic

#define FA2_FWD_PARAMS \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, bool causal, std::optional<double> scale, FA2_OPTION_PARAMS
#define FA2_FWD_ARGS q, k, v, causal, scale, FA2_OPTION_ARGS
#define FA2_BWD_PARAMS                                                                                       \
  const at::Tensor &dout, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out, \
      const at::Tensor &lse, bool causal, std::optional<double> scale, FA2_BWD_OPTION_PARAMS
#define FA2_BWD_ARGS dout, q, k, v, out, lse, causal, scale, FA2_BWD_OPTION_ARGS
#define FA2_VARLEN_FWD_PARAMS                                                                             \
  const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &cu_seqlens_q,             \
      const at::Tensor &cu_seqlens_k, c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal, \
      std::optional<double> scale, FA2_OPTION_PARAMS
#define FA2_VARLEN_FWD_ARGS q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, FA2_OPTION_ARGS
#define FA2_VARLEN_BWD_PARAMS                                                                                \
  const at::Tensor &dout, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, const at::Tensor &out, \
      const at::Tensor &lse, const at::Tensor &cu_seqlens_q, const at::Tensor &cu_seqlens_k,                    \
      c10::SymInt max_seqlen_q, c10::SymInt max_seqlen_k, bool causal, std::optional<double> scale,           \
      FA2_BWD_OPTION_PARAMS
#define FA2_VARLEN_BWD_ARGS \
  dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale, FA2_BWD_OPTION_ARGS

#define FA2_KVCACHE_PARAMS                                                                                     \
  const at::Tensor &q, const at::Tensor &k_cache, const at::Tensor &v_cache, const std::optional<at::Tensor>&k_new, \
      const std::optional<at::Tensor>&v_new, const std::optional<at::Tensor>&cache_seqlens,                          \
      const std::optional<at::Tensor>&block_table, bool causal, std::optional<double> scale,                        \
      c10::IntArrayRef window_size, double softcap, const std::optional<at::Tensor>&alibi_slopes, int64_t num_splits
#define FA2_KVCACHE_ARGS \
  q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, causal, scale, window_size, softcap, alibi_slopes, num_splits

namespace flash_attn2 {
using Tensor2 = std::tuple<at::Tensor, at::Tensor>;
using Tensor3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using FwdSig = at::Tensor(FA2_FWD_PARAMS);
using FwdLseSig = Tensor2(FA2_FWD_PARAMS);
using BwdSig = Tensor3(FA2_BWD_PARAMS);
using VarlenFwdSig = at::Tensor(FA2_VARLEN_FWD_PARAMS);
using VarlenFwdLseSig = Tensor2(FA2_VARLEN_FWD_PARAMS);
using VarlenBwdSig = Tensor3(FA2_VARLEN_BWD_PARAMS);
using KvCacheSig = Tensor2(FA2_KVCACHE_PARAMS);
}  // namespace flash_attn2
