#include "checks.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace flash_attn2 {
namespace {

void check_rank4(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined; expected a tensor of shape ", layout);
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must have 4 dimensions ", layout, ", got ", t.dim(),
              " with shape ", t.sym_sizes());
}

void check_same_kind(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device(),
              "; all inputs must be on one device");
}

void check_dtype(const char* op, const at::Tensor& q) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": q has dtype ", dtype, "; expected float32, float64, float16 or bfloat16");
}

// The checks the dense (B, H, N, D) and packed (T, H, D) layouts share: v's heads, the head dims (last axis),
// GQA divisibility and the scale.
void check_heads_dims_scale(const char* op, const AttentionShape& s, const at::Tensor& k, const at::Tensor& v,
                            std::optional<double> scale) {
  const int64_t d_axis = k.dim() - 1;
  TORCH_CHECK(v.sym_size(1) == s.heads_kv, op, ": k has ", s.heads_kv, " heads but v has ", v.sym_size(1),
              "; k and v must have the same number of heads");
  TORCH_CHECK(k.sym_size(d_axis) == s.head_dim && v.sym_size(d_axis) == s.head_dim, op, ": head dims differ: q has ",
              s.head_dim, ", k has ", k.sym_size(d_axis), ", v has ", v.sym_size(d_axis),
              "; q, k and v must share the head dim D");
  TORCH_CHECK(s.heads_kv > 0 ? s.heads_q % s.heads_kv == 0 : s.heads_q == 0, op, ": q has ", s.heads_q,
              " heads, which is not a multiple of the ", s.heads_kv,
              " heads of k and v (grouped-query attention needs Hq % Hkv == 0)");
  if (scale.has_value()) {
    TORCH_CHECK(std::isfinite(*scale) && *scale > 0, op, ": scale must be a finite positive number, got ", *scale);
  }
}

// dout and out like q (dtype, device, shape) and lse defined in lse_dtype(q) on q's device: common to the dense
// and packed backward checks. layout / producer name lse's expected shape and the op that returns it.
void check_dout_out_lse(const char* op, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                        const at::Tensor& lse, const char* layout, const char* producer) {
  check_same_kind(op, "dout", dout, q);
  check_same_kind(op, "out", out, q);
  TORCH_CHECK(dout.sym_sizes() == q.sym_sizes(), op, ": dout has shape ", dout.sym_sizes(), " but q has shape ",
              q.sym_sizes(), "; dout must match the attention output's shape");
  TORCH_CHECK(out.sym_sizes() == q.sym_sizes(), op, ": out has shape ", out.sym_sizes(), " but q has shape ",
              q.sym_sizes(), "; out must be the forward output");
  TORCH_CHECK(lse.defined(), op, ": lse is undefined; expected the ", layout, " log-sum-exp from ", producer);
  TORCH_CHECK(lse.scalar_type() == lse_dtype(q.scalar_type()), op, ": lse has dtype ", lse.scalar_type(),
              "; expected ", lse_dtype(q.scalar_type()), " for ", q.scalar_type(), " inputs (the log-sum-exp returned by ",
              producer, ")");
  TORCH_CHECK(lse.device() == q.device(), op, ": lse is on ", lse.device(), " but q is on ", q.device());
}

}  // namespace

AttentionShape check_forward_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, std::optional<double> scale) {
  check_rank4(op, "q", q, "(B, Hq, Nq, D)");
  check_rank4(op, "k", k, "(B, Hkv, Nk, D)");
  check_rank4(op, "v", v, "(B, Hkv, Nk, D)");
  check_same_kind(op, "k", k, q);
  check_same_kind(op, "v", v, q);
  check_dtype(op, q);

  AttentionShape s{q.sym_size(0), q.sym_size(1), k.sym_size(1), q.sym_size(2), k.sym_size(2), q.sym_size(3)};
  TORCH_CHECK(k.sym_size(0) == s.batch && v.sym_size(0) == s.batch, op, ": batch sizes differ: q has ", s.batch,
              ", k has ", k.sym_size(0), ", v has ", v.sym_size(0));
  TORCH_CHECK(v.sym_size(2) == s.seqlen_k, op, ": k has sequence length ", s.seqlen_k, " but v has ", v.sym_size(2),
              "; k and v must have the same sequence length");
  check_heads_dims_scale(op, s, k, v, scale);
  return s;
}

AttentionShape check_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                     const at::Tensor& lse, std::optional<double> scale) {
  const AttentionShape s = check_forward_inputs(op, q, k, v, scale);
  check_rank4(op, "dout", dout, "(B, Hq, Nq, D)");
  check_rank4(op, "out", out, "(B, Hq, Nq, D)");
  check_dout_out_lse(op, dout, q, out, lse, "(B, Hq, Nq)", "fwd_with_lse");
  TORCH_CHECK(lse.dim() == 3 && lse.sym_size(0) == s.batch && lse.sym_size(1) == s.heads_q && lse.sym_size(2) == s.seqlen_q,
              op, ": lse has shape ", lse.sym_sizes(), "; expected (B, Hq, Nq) = (", s.batch, ", ", s.heads_q, ", ",
              s.seqlen_q, ")");
  return s;
}

Variant check_variant(const char* op, const at::Tensor& q, const c10::SymInt& batch, const c10::SymInt& heads_q,
                      bool causal, c10::IntArrayRef window_size, double softcap,
                      const std::optional<at::Tensor>& alibi_slopes, double dropout_p,
                      const std::optional<at::Tensor>& rng_state, bool deterministic) {
  Variant v;
  TORCH_CHECK(window_size.size() == 2, op, ": window_size must have 2 elements (left, right), got ",
              window_size.size());
  TORCH_CHECK(window_size[0] >= -1 && window_size[1] >= -1, op, ": window_size must be -1 (unbounded) or >= 0 on ",
              "each side, got (", window_size[0], ", ", window_size[1], ")");
  v.window_left = window_size[0];
  v.window_right = causal ? 0 : window_size[1];
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be a finite number >= 0 (0 disables it), got ",
              softcap);
  v.softcap = softcap;
  TORCH_CHECK(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1, op,
              ": dropout_p must be in [0, 1), got ", dropout_p);
  v.dropout_p = dropout_p;
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK(a.scalar_type() == at::kFloat, op, ": alibi_slopes has dtype ", a.scalar_type(),
                "; expected float32");
    TORCH_CHECK(a.device() == q.device(), op, ": alibi_slopes is on ", a.device(), " but q is on ", q.device());
    const bool per_head = a.dim() == 1 && a.sym_size(0) == heads_q;
    const bool per_batch = a.dim() == 2 && a.sym_size(0) == batch && a.sym_size(1) == heads_q;
    TORCH_CHECK(per_head || per_batch, op, ": alibi_slopes has shape ", a.sym_sizes(), "; expected (Hq,) = (",
                heads_q, ",) or (B, Hq) = (", batch, ", ", heads_q, ")");
    v.alibi_slopes = a;
  }
  if (rng_state.has_value() && rng_state->defined()) {
    const at::Tensor& r = *rng_state;
    // Under FakeTensor tracing every tensor, rng_state included, reaches the Meta kernels as a meta tensor.
    const bool cpu = r.device().is_cpu() || (r.device().is_meta() && q.device().is_meta());
    TORCH_CHECK(r.scalar_type() == at::kLong && cpu && r.dim() == 1 && r.sym_numel() == 2, op,
                ": rng_state must be an int64 CPU tensor [seed, offset] of 2 elements, got ", r.scalar_type(), " on ",
                r.device(), " with shape ", r.sym_sizes());
    v.rng_state = r;
  }
  TORCH_CHECK(dropout_p == 0 || v.rng_state.defined(), op, ": dropout_p = ", dropout_p,
              " needs rng_state (an int64 CPU tensor [seed, offset]); the differentiable attention functions draw "
              "one for you");
  v.deterministic = deterministic;
  return v;
}

std::pair<uint64_t, uint64_t> read_rng_state(const Variant& v) {
  if (!v.rng_state.defined()) return {0, 0};
  const at::Tensor r = v.rng_state.contiguous();
  const int64_t* d = r.const_data_ptr<int64_t>();
  return {static_cast<uint64_t>(d[0]), static_cast<uint64_t>(d[1])};
}

namespace {
void check_rank3(const char* op, const char* name, const at::Tensor& t, const char* layout) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined; expected a tensor of shape ", layout);
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must have 3 dimensions ", layout, " (packed variable-length batch), got ",
              t.dim(), " with shape ", t.sym_sizes());
}

void check_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, const at::Tensor& q) {
  TORCH_CHECK(cu.defined(), op, ": ", name, " is undefined; expected int32 (B + 1,) offsets");
  TORCH_CHECK(cu.scalar_type() == at::kInt, op, ": ", name, " has dtype ", cu.scalar_type(), "; expected int32");
  TORCH_CHECK(cu.device() == q.device(), op, ": ", name, " is on ", cu.device(), " but q is on ", q.device(),
              "; cu_seqlens must be on the inputs' device");
  TORCH_CHECK(cu.dim() == 1 && cu.sym_size(0) >= 1, op, ": ", name, " has shape ", cu.sym_sizes(),
              "; expected (B + 1,) with B >= 0");
}
}  // namespace

AttentionShape check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                   const c10::SymInt& max_seqlen_q, const c10::SymInt& max_seqlen_k,
                                   std::optional<double> scale) {
  check_rank3(op, "q", q, "(Tq, Hq, D)");
  check_rank3(op, "k", k, "(Tk, Hkv, D)");
  check_rank3(op, "v", v, "(Tk, Hkv, D)");
  check_same_kind(op, "k", k, q);
  check_same_kind(op, "v", v, q);
  check_dtype(op, q);
  check_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, q);
  check_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK(cu_seqlens_q.sym_size(0) == cu_seqlens_k.sym_size(0), op, ": cu_seqlens_q has ",
              cu_seqlens_q.sym_size(0), " elements but cu_seqlens_k has ", cu_seqlens_k.sym_size(0),
              "; both must be (B + 1,)");
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0, op, ": max_seqlen_q and max_seqlen_k must be >= 0, got ",
              max_seqlen_q, " and ", max_seqlen_k);
  AttentionShape s{cu_seqlens_q.sym_size(0) - 1, q.sym_size(1), k.sym_size(1), q.sym_size(0), k.sym_size(0),
                   q.sym_size(2)};
  TORCH_CHECK(v.sym_size(0) == s.seqlen_k, op, ": k has ", s.seqlen_k, " tokens but v has ", v.sym_size(0),
              "; k and v must have the same number of tokens");
  check_heads_dims_scale(op, s, k, v, scale);
  return s;
}

AttentionShape check_varlen_backward_inputs(const char* op, const at::Tensor& dout, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                            const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
                                            const at::Tensor& cu_seqlens_k, const c10::SymInt& max_seqlen_q,
                                            const c10::SymInt& max_seqlen_k, std::optional<double> scale) {
  const AttentionShape s =
      check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  check_rank3(op, "dout", dout, "(Tq, Hq, D)");
  check_rank3(op, "out", out, "(Tq, Hq, D)");
  check_dout_out_lse(op, dout, q, out, lse, "(Hq, Tq)", "fwd_varlen_with_lse");
  TORCH_CHECK(lse.dim() == 2 && lse.sym_size(0) == s.heads_q && lse.sym_size(1) == s.seqlen_q, op, ": lse has shape ",
              lse.sym_sizes(), "; expected (Hq, Tq) = (", s.heads_q, ", ", s.seqlen_q, ")");
  return s;
}

std::vector<int64_t> read_cu_seqlens(const char* op, const char* name, const at::Tensor& cu, int64_t total,
                                     int64_t max_seqlen) {
  const at::Tensor c = cu.to(at::kCPU).contiguous();
  const int32_t* d = c.const_data_ptr<int32_t>();
  std::vector<int64_t> values(d, d + c.numel());
  TORCH_CHECK(values[0] == 0, op, ": ", name, " must start at 0, got ", values[0]);
  for (size_t b = 1; b < values.size(); ++b) {
    TORCH_CHECK(values[b] >= values[b - 1], op, ": ", name, " must be non-decreasing, but element ", b, " (",
                values[b], ") < element ", b - 1, " (", values[b - 1], ")");
    TORCH_CHECK(values[b] - values[b - 1] <= max_seqlen, op, ": sequence ", b - 1, " has length ",
                values[b] - values[b - 1], " (from ", name, ") but max_seqlen is ", max_seqlen);
  }
  TORCH_CHECK(values.back() == total, op, ": ", name, " must end at the number of packed tokens, ", total, ", got ",
              values.back());
  return values;
}

namespace {
// An optional int32 index tensor on q's device with the given rank: cache_seqlens (B,), block_table (B, pages).
void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q, int64_t rank,
                        const char* layout) {
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " has dtype ", t.scalar_type(), "; expected int32 ",
              layout);
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device(),
              "; it must be on the inputs' device");
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have shape ", layout, ", got ", t.sym_sizes());
}
}  // namespace

KvCacheShape check_kvcache_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
                                  const std::optional<at::Tensor>& v_new,
                                  const std::optional<at::Tensor>& cache_seqlens,
                                  const std::optional<at::Tensor>& block_table, std::optional<double> scale,
                                  int64_t num_splits) {
  const bool paged = block_table.has_value() && block_table->defined();
  const char* cache_layout = paged ? "(num_pages, page_size, Hkv, D) (paged, with block_table)" : "(B, Hkv, capacity, D)";
  check_rank4(op, "q", q, "(B, Hq, Nq, D)");
  check_rank4(op, "k_cache", k_cache, cache_layout);
  check_rank4(op, "v_cache", v_cache, cache_layout);
  check_same_kind(op, "k_cache", k_cache, q);
  check_same_kind(op, "v_cache", v_cache, q);
  check_dtype(op, q);
  TORCH_CHECK(v_cache.sym_sizes() == k_cache.sym_sizes(), op, ": k_cache has shape ", k_cache.sym_sizes(),
              " but v_cache has shape ", v_cache.sym_sizes(), "; the caches must have the same shape");
  KvCacheShape ks;
  ks.paged = paged;
  const c10::SymInt batch = q.sym_size(0);
  if (paged) {
    const at::Tensor& bt = *block_table;
    check_index_tensor(op, "block_table", bt, q, 2, "(B, max_pages_per_seq)");
    TORCH_CHECK(bt.sym_size(0) == batch, op, ": block_table has ", bt.sym_size(0), " rows but q has batch ", batch);
    ks.num_pages = k_cache.sym_size(0);
    ks.page_size = k_cache.sym_size(1);
    const c10::SymInt& ps = ks.page_size;
    if (const auto p = ps.maybe_as_int()) {
      TORCH_CHECK(*p >= 1 && (*p & (*p - 1)) == 0, op,
                  ": the page size (k_cache.size(1)) must be a power of two, got ", *p);
    }
    TORCH_CHECK(cache_seqlens.has_value() && cache_seqlens->defined(), op,
                ": paged caches (block_table given) need cache_seqlens, the valid keys of each sequence");
    ks.s = AttentionShape{batch, q.sym_size(1), k_cache.sym_size(2), q.sym_size(2), bt.sym_size(1) * ps, q.sym_size(3)};
  } else {
    TORCH_CHECK(k_cache.sym_size(0) == batch, op, ": k_cache has batch ", k_cache.sym_size(0), " but q has batch ",
                batch, "; dense caches are ", cache_layout);
    ks.s = AttentionShape{batch, q.sym_size(1), k_cache.sym_size(1), q.sym_size(2), k_cache.sym_size(2), q.sym_size(3)};
  }
  check_heads_dims_scale(op, ks.s, paged ? k_cache.transpose(1, 2) : k_cache, paged ? v_cache.transpose(1, 2) : v_cache,
                         scale);
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    check_index_tensor(op, "cache_seqlens", *cache_seqlens, q, 1, "(B,)");
    TORCH_CHECK(cache_seqlens->sym_size(0) == batch, op, ": cache_seqlens has ", cache_seqlens->sym_size(0),
                " elements but q has batch ", batch);
  }
  const bool has_k = k_new.has_value() && k_new->defined(), has_v = v_new.has_value() && v_new->defined();
  TORCH_CHECK(has_k == has_v, op, ": k_new and v_new must be given together, got ", has_k ? "k_new" : "v_new",
              " only");
  ks.seqlen_new = 0;
  if (has_k) {
    check_rank4(op, "k_new", *k_new, "(B, Hkv, Nnew, D)");
    check_rank4(op, "v_new", *v_new, "(B, Hkv, Nnew, D)");
    check_same_kind(op, "k_new", *k_new, q);
    check_same_kind(op, "v_new", *v_new, q);
    const auto& kn = *k_new;
    TORCH_CHECK(kn.sym_size(0) == batch && kn.sym_size(1) == ks.s.heads_kv && kn.sym_size(3) == ks.s.head_dim, op,
                ": k_new has shape ", kn.sym_sizes(), "; expected (B, Hkv, Nnew, D) with B = ", batch, ", Hkv = ",
                ks.s.heads_kv, ", D = ", ks.s.head_dim);
    TORCH_CHECK(v_new->sym_sizes() == kn.sym_sizes(), op, ": v_new has shape ", v_new->sym_sizes(),
                " but k_new has shape ", kn.sym_sizes());
    TORCH_CHECK(cache_seqlens.has_value() && cache_seqlens->defined(), op,
                ": k_new needs cache_seqlens (where to append); without it the caches count as full");
    ks.seqlen_new = kn.sym_size(2);
  }
  TORCH_CHECK(num_splits >= 0 && num_splits <= 256, op, ": num_splits must be in [0, 256] (0 picks one), got ",
              num_splits);
  return ks;
}

std::vector<int64_t> read_kvcache_lengths(const char* op, const KvCacheShape& shape,
                                          const std::optional<at::Tensor>& cache_seqlens,
                                          const std::optional<at::Tensor>& block_table) {
  const int64_t batch = shape.s.batch.expect_int(), capacity = shape.s.seqlen_k.expect_int();
  const int64_t added = shape.seqlen_new.expect_int();
  std::vector<int64_t> lengths(batch, capacity);
  if (cache_seqlens.has_value() && cache_seqlens->defined()) {
    const at::Tensor c = cache_seqlens->to(at::kCPU).contiguous();
    const int32_t* d = c.const_data_ptr<int32_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK(d[b] >= 0 && d[b] + added <= capacity, op, ": cache_seqlens[", b, "] = ", d[b], " plus ", added,
                  " new keys does not fit the cache capacity of ", capacity, " keys per sequence");
      lengths[b] = d[b];
    }
  }
  if (shape.paged) {
    const at::Tensor t = block_table->to(at::kCPU).contiguous();
    const int32_t* d = t.const_data_ptr<int32_t>();
    const int64_t per_seq = t.size(1), page = shape.page_size.expect_int(), pages = shape.num_pages.expect_int();
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < (lengths[b] + added + page - 1) / page; ++i) {
        const int32_t e = d[b * per_seq + i];
        TORCH_CHECK(e >= 0 && e < pages, op, ": block_table[", b, ", ", i, "] = ", e, " is not a page of the cache (",
                    pages, " pages)");
      }
    }
  }
  return lengths;
}

ConcreteShape concrete(const AttentionShape& s) {
  return {s.batch.expect_int(),    s.heads_q.expect_int(),  s.heads_kv.expect_int(),
          s.seqlen_q.expect_int(), s.seqlen_k.expect_int(), s.head_dim.expect_int()};
}

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

double softmax_scale(std::optional<double> scale, int64_t head_dim) {
  if (scale.has_value()) return *scale;
  return head_dim > 0 ? 1.0 / std::sqrt(static_cast<double>(head_dim)) : 1.0;
}

}  // namespace flash_attn2
