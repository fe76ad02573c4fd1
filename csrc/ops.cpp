// The one place the flash_attn2 schemas are defined. Kernels register per dispatch key in their own files:
// cpu/attention_cpu.cpp (CPU), cuda/attention_cuda.cpp (CUDA), meta.cpp (Meta), autograd.cpp (Autograd).
// Every attention op takes the same keyword options (attention_rule.h defines what they mean).
#include <torch/library.h>

#define FA2_FWD_OPTIONS \
  "*, int[2] window_size=[-1, -1], float softcap=0.0, Tensor? alibi_slopes=None, float dropout_p=0.0, " \
  "Tensor? rng_state=None"
#define FA2_BWD_OPTIONS FA2_FWD_OPTIONS ", bool deterministic=False"
#define FA2_VARLEN_ARGS "Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, "

TORCH_LIBRARY(flash_attn2, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None, " FA2_FWD_OPTIONS ") -> Tensor");
  m.def("fwd_with_lse(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None, " FA2_FWD_OPTIONS
        ") -> (Tensor out, Tensor lse)");
  m.def("bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal=False, "
        "float? scale=None, " FA2_BWD_OPTIONS ") -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("fwd_varlen(Tensor q, Tensor k, Tensor v, " FA2_VARLEN_ARGS "bool causal=False, float? scale=None, "
        FA2_FWD_OPTIONS ") -> Tensor");
  m.def("fwd_varlen_with_lse(Tensor q, Tensor k, Tensor v, " FA2_VARLEN_ARGS "bool causal=False, "
        "float? scale=None, " FA2_FWD_OPTIONS ") -> (Tensor out, Tensor lse)");
  m.def("bwd_varlen(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, " FA2_VARLEN_ARGS
        "bool causal=False, float? scale=None, " FA2_BWD_OPTIONS ") -> (Tensor dq, Tensor dk, Tensor dv)");
  // KV-cache attention (decoding): appends k_new / v_new into the caches in place, then attends over the
  // valid prefix. Not differentiable.
  m.def("fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new=None, Tensor? v_new=None, "
        "Tensor? cache_seqlens=None, Tensor? block_table=None, bool causal=False, float? scale=None, *, "
        "int[2] window_size=[-1, -1], float softcap=0.0, Tensor? alibi_slopes=None, int num_splits=0) "
        "-> (Tensor out, Tensor lse)");
  m.def("dropout_keep_mask(Tensor rng_state, int batch, int heads, int seqlen_q, int seqlen_k, float dropout_p, "
        "Device? device=None) -> Tensor");
  // A fresh [seed, offset] from the default generator of `device`. An op (nondeterministic_seeded, so never
  // folded or deduplicated) rather than a host-side draw, so that torch.compile graphs draw a new state on
  // every call instead of baking the one seen while tracing.
  m.def("draw_rng_state(Device device) -> Tensor", {at::Tag::nondeterministic_seeded});
  // The SDPA backend provider's switch (sdpa_provider.cpp): "activate", "restore" or "status".
  m.def("_sdpa_provider(str action) -> int[]");
}
