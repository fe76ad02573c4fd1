// Input validation shared by every backend (CPU, CUDA, Meta), so each op reports bad input the same way
// whichever device it runs on, and FakeTensor tracing fails with the same message as eager mode.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <utility>
#include <vector>

namespace flash_attn2 {

// Sizes are SymInts so the Meta kernels can check symbolic (dynamic-shape) tensors; the device kernels
// take concrete() of them.
struct AttentionShape {
  c10::SymInt batch;
  c10::SymInt heads_q;
  c10::SymInt heads_kv;
  c10::SymInt seqlen_q;
  c10::SymInt seqlen_k;
  c10::SymInt head_dim;
};

struct ConcreteShape {
  int64_t batch, heads_q, heads_kv, seqlen_q, seqlen_k, head_dim;
};
ConcreteShape concrete(const AttentionShape& s);

// Checks q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D): defined, rank 4, one dtype, one device, matching sizes,
// Hq divisible by Hkv, and a finite positive scale if one is given. `op` names the op in error messages.
AttentionShape check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, std::optional<double> scale);

// The forward checks plus dout and out shaped like q in q's dtype, and lse (B, Hq, Nq) in lse_dtype.
AttentionShape check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const at::Tensor& lse, std::optional<double> scale);

// The attention variants of every op (window, softcap, ALiBi, dropout, deterministic backward), validated.
// causal is folded into the window: right = 0. Window sides < 0 mean unbounded (stored as -1).
struct Variant {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  at::Tensor alibi_slopes;  // undefined, or float32 (Hq,) / (B, Hq) on the inputs' device
  double dropout_p = 0.0;
  at::Tensor rng_state;     // int64 CPU [seed, offset]; defined when dropout_p > 0
  bool deterministic = false;

  // Anything beyond masking: the kernels then apply the score transform / dropout.
  bool needs_score_mod() const { return softcap > 0 || alibi_slopes.defined() || dropout_p > 0; }
};

// Checks the variant options against the shape (batch is the number of sequences for the varlen ops):
// window values >= -1, softcap finite and >= 0, dropout_p in [0, 1), alibi_slopes float32 (Hq,) or (B, Hq) on
// q's device, rng_state an int64 CPU tensor of 2 elements (required when dropout_p > 0). Reads no tensor data.
Variant check_variant(const char* op, const at::Tensor& q, const c10::SymInt& batch, const c10::SymInt& heads_q,
                      bool causal, c10::IntArrayRef window_size, double softcap,
                      const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                      const std::optional<at::Tensor>& rng_state, bool deterministic = false);

// The (seed, offset) of a checked rng_state (reads the CPU tensor; not for Meta).
std::pair<uint64_t, uint64_t> read_rng_state(const Variant& v);

// Packed variable-length batches: q (Tq, Hq, D), k and v (Tk, Hkv, D), cu_seqlens int32 (B + 1,) on q's
// device. Returns the shape with batch = B, seqlen_q = Tq, seqlen_k = Tk (the packed totals).
AttentionShape check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                   const c10::SymInt& max_seqlen_q, const c10::SymInt& max_seqlen_k,
                                   std::optional<double> scale);
AttentionShape check_varlen_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                            const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                            const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                            const c10::SymInt& max_seqlen_k, std::optional<double> scale);
// The values of cu_seqlens (CPU kernels): start at 0, non-decreasing, end at `total`, lengths <= max_seqlen.
std::vector<int64_t> read_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                                     int64_t max_seqlen);

// KV-cache attention (fwd_kvcache). q (B, Hq, Nq, D); dense caches (B, Hkv, capacity, D) or, with block_table
// (B, max_pages) int32, paged caches (num_pages, page_size, Hkv, D) with page_size a power of two; k_new and
// v_new (B, Hkv, Nnew, D), both or neither; cache_seqlens (B,) int32 (required with paged caches or k_new);
// num_splits >= 0. Reads no tensor data (KvCacheValues does, on the CPU).
struct KvCacheShape {
  AttentionShape s;  // seqlen_q = Nq, seqlen_k = the capacity of one sequence (max_pages * page_size if paged)
  c10::SymInt seqlen_new;
  bool paged = false;
  c10::SymInt page_size, num_pages;
};
KvCacheShape check_kvcache_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                  const std::optional<at::Tensor>& v_new,
                                  const std::optional<at::Tensor>& cache_seqlens,
                                  const std::optional<at::Tensor>& block_table, std::optional<double> scale,
                                  int64_t num_splits);
// The values a CPU kernel checks before writing: each cache_seqlens[b] + Nnew within [0, capacity], and every
// block_table entry a sequence uses within [0, num_pages). Returns the lengths before the append.
std::vector<int64_t> read_kvcache_lengths(const char* op, const KvCacheShape& shape,
                                          const std::optional<at::Tensor>& cache_seqlens,
                                          const std::optional<at::Tensor>& block_table);

// The log-sum-exp dtype: float64 for float64 inputs (so float64 gradients stay exact), float32 otherwise.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

// The scale the kernels use: the given one, else 1/sqrt(D).
double softmax_scale(std::optional<double> scale, int64_t head_dim);

}  // namespace flash_attn2
