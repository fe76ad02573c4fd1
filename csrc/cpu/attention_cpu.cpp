// CPU kernels: the FlashAttention-2 algorithm on packed tiles, with every variant of attention_rule.h.
// Forward: parallel over (batch, head, query tile); each task streams the K/V tiles its rows can see (tiles
// outside the causal / sliding window are never visited) with an online softmax and never holds more than a
// Br x Bc score tile. Backward: parallel over (batch, q head); each task recomputes P from the saved LSE tile by
// tile, owns its head's dQ and writes per-q-head dK/dV partials that are summed over the GQA group afterwards,
// so no two tasks write the same memory and results are deterministic.
// Variable-length batches run the dense kernels on each sequence's slice (views, no copies of the inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <utility>
#include <memory>
#include <vector>

#include "attention_rule.h"
#include "checks.h"
#include "op_args.h"
#include "trivial_cases.h"
#include "cpu/tile_math.h"

namespace flash_attn2::cpu {
namespace {

constexpr int64_t kBlockQ = 64;       // Br: query rows per tile
constexpr int64_t kBlockKV = 128;     // Bc: key rows per tile (backward)
constexpr int64_t kBlockKVFwd = 512;  // Bc of the forward: fewer, larger GEMMs and rescales (a 64 x 512 score tile)
// Br of the forward where every query row sees every key (no causal mask, no window): MKL packs each K / V tile
// once per GEMM, so 256-row GEMMs pack a quarter as often (PyTorch's CPU flash kernel uses 256 x 512 too). Masked
// layouts keep 64-row tiles, whose diagonal tiles waste less.
constexpr int64_t kBlockQFwdWide = 256;
constexpr int64_t kBlockQBwdWide = 256;  // Br of the backward where the queries see a key tile whole

// Strided view of one tensor (B, H, N, D) as a base pointer and element strides.
template <typename scalar_t>
struct HeadView {
  scalar_t* data;
  int64_t sb, sh, sn, sd;
  explicit HeadView(const at::Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)),
        sd(t.stride(3)) {}
  scalar_t* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
  template <typename acc_t>
  void pack(int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D, acc_t* tile) const {
    pack_rows(head(b, h), sn, sd, row0, rows, D, tile);
  }
  // Rows [row0, row0 + rows) of a head as a row-major acc_t matrix (pointer, leading dimension): the input
  // itself where it already is one (same type, contiguous last dim, rows at least D apart), else a packed copy
  // in `tile`.
  template <typename acc_t>
  std::pair<const acc_t*, int64_t> rows(int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D,
                                        acc_t* tile) const {
    if constexpr (std::is_same_v<std::remove_const_t<scalar_t>, acc_t>) {
      if (sd == 1 && sn >= std::max<int64_t>(D, 1) && sn <= std::numeric_limits<int>::max())
        return {head(b, h) + row0 * sn, sn};
    }
    pack(b, h, row0, rows, D, tile);
    return {tile, D};
  }
};

// The variant state of one call, resolved for the CPU kernels (scores here are already scaled: unit = 1).
template <typename acc_t>
struct CpuVariant {
  Visibility<int64_t> vis;
  double softcap;
  const float* alibi;  // slopes, or nullptr
  int64_t alibi_batch_stride;
  Dropout dropout;
  acc_t keep_scale;    // 1 / (1 - p)
  int64_t batch_base;  // batch index of this call's batch 0 (a sequence index for varlen slices)
  int64_t heads_q;

  CpuVariant(const Variant& v, const ConcreteShape& s, int64_t batch_base_)
      : vis{s.seqlen_q, s.seqlen_k, v.window_left, v.window_right}, softcap(v.softcap), alibi(nullptr),
        alibi_batch_stride(0), keep_scale(acc_t(1)), batch_base(batch_base_), heads_q(s.heads_q) {
    if (v.alibi_slopes.defined()) {
      alibi = v.alibi_slopes.const_data_ptr<float>();
      alibi_batch_stride = v.alibi_slopes.dim() == 2 ? s.heads_q : 0;
    }
    if (v.dropout_p > 0) {
      const auto [seed, offset] = read_rng_state(v);
      dropout = Dropout::make(seed, offset, v.dropout_p);
      keep_scale = static_cast<acc_t>(1.0 / (1.0 - v.dropout_p));
    }
  }
  ScoreRule<acc_t> score_rule(int64_t b, int64_t h) const {
    const double slope = alibi ? alibi[(batch_base + b) * alibi_batch_stride + h] : 0.0;
    return ScoreRule<acc_t>::make(1.0, softcap, slope);
  }
  uint32_t rng_head(int64_t b, int64_t h) const { return static_cast<uint32_t>((batch_base + b) * heads_q + h); }

  // Turns a qn x kn tile of scaled scores at (q0, k0) into logits in place: -inf where invisible, softcap and
  // ALiBi elsewhere. With `dtanh`, also stores dlogit / dscore (1 - tanh^2; 1 without softcap).
  void logits(acc_t* S, int64_t ld, int64_t q0, int64_t qn, int64_t k0, int64_t kn, const ScoreRule<acc_t>& r,
              acc_t* dtanh) const {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const bool mask = vis.tile_needs_mask(q0, qn, k0, kn), softcap = r.has_softcap(), alibi = r.alibi != acc_t(0);
    if (!mask && !softcap && !alibi) return;  // the plain tile: scores are the logits already
    for (int64_t i = 0; i < qn; ++i) {
      acc_t* row = S + i * ld;
      const int64_t qi = q0 + i;
      if (softcap) {
        acc_t* g = dtanh ? dtanh + i * ld : nullptr;
        for (int64_t j = 0; j < kn; ++j) {
          const acc_t t = std::tanh(row[j] * r.cap_in);
          row[j] = r.cap_out * t;
          if (g) g[j] = acc_t(1) - t * t;
        }
      }
      if (alibi) {
        for (int64_t j = 0; j < kn; ++j) row[j] -= r.alibi * static_cast<acc_t>(std::abs(qi + vis.diag() - (k0 + j)));
      }
      if (mask) {  // visible keys of this row: [lo, hi) in tile columns
        const int64_t lo = std::clamp<int64_t>(vis.key_begin(qi) - k0, 0, kn);
        const int64_t hi = std::clamp<int64_t>(vis.key_end(qi) - k0, lo, kn);
        for (int64_t j = 0; j < lo; ++j) row[j] = kNegInf;
        for (int64_t j = hi; j < kn; ++j) row[j] = kNegInf;
        if (dtanh) {
          for (int64_t j = 0; j < lo; ++j) dtanh[i * ld + j] = 0;
          for (int64_t j = hi; j < kn; ++j) dtanh[i * ld + j] = 0;
        }
      }
    }
  }
  // z[i][j] = keep(i, j) / (1 - p) for the tile (1 everywhere without dropout).
  void keep_tile(acc_t* z, int64_t ld, uint32_t bh, int64_t q0, int64_t qn, int64_t k0, int64_t kn) const {
    for (int64_t i = 0; i < qn; ++i)
      for (int64_t j = 0; j < kn; ++j)
        z[i * ld + j] = dropout.keep(bh, static_cast<uint32_t>(q0 + i), static_cast<uint32_t>(k0 + j)) ? keep_scale
                                                                                                   : acc_t(0);
  }
};

// n elements of scratch, not initialised (new T[n] default-initialises arithmetic types).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

// One online-softmax step on a row of logits: updates the running max and sum, turns s into p in place and
// returns the factor by which the row's output accumulator must be rescaled.
template <typename acc_t>
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
acc_t online_softmax_row(acc_t* s, int64_t n, acc_t& row_max, acc_t& row_sum) {
  acc_t m = row_max;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  if (m == -std::numeric_limits<acc_t>::infinity()) {  // nothing visible yet: p = 0, nothing to rescale
    for (int64_t j = 0; j < n; ++j) s[j] = 0;
    return acc_t(1);
  }
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - m);
    sum += s[j];
  }
  const acc_t rescale = exp_nonpositive(row_max - m);  // row_max = -inf gives 0
  row_sum = row_sum * rescale + sum;
  row_max = m;
  return rescale;
}

// p = exp(s - lse) for one row of recomputed logits; a row that sees no key (lse = -inf) gets p = 0.
template <typename acc_t>
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void probabilities_row(acc_t* s, int64_t n, acc_t lse) {
  if (lse == -std::numeric_limits<acc_t>::infinity()) {
    for (int64_t j = 0; j < n; ++j) s[j] = 0;
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - lse);
}

// out and lse are written through their strides (dense outputs, or a varlen sequence's slice).
template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                    const at::Tensor& lse, const ConcreteShape& s, const CpuVariant<acc_t>& var, double scale) {
  const HeadView<scalar_t> Q(q), K(k), V(v), O(out);
  acc_t* lse_data = lse.data_ptr<acc_t>();
  const int64_t lse_sb = lse.stride(0), lse_sh = lse.stride(1), lse_sn = lse.stride(2);
  const int64_t D = s.head_dim, Nq = s.seqlen_q;
  const int64_t group = s.heads_q / s.heads_kv;
  const bool unmasked = var.vis.left < 0 && var.vis.right < 0;
  // Wide tiles only where they leave every thread several tasks.
  const int64_t block_q =
      unmasked && s.batch * s.heads_q * ((Nq + kBlockQFwdWide - 1) / kBlockQFwdWide) >= 4 * at::get_num_threads()
          ? kBlockQFwdWide
          : kBlockQ;
  const int64_t q_tiles = (Nq + block_q - 1) / block_q;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  constexpr int64_t kBlockKV = kBlockKVFwd;
  // Per-thread scratch, sized by the largest tiles this call has (short sequences: small buffers) and not
  // value-initialised (every element is written before it is read). Zero-filled full-size vectors cost ~40 us
  // a call, more than the attention itself below N ~ 128. ld: row stride of the score and keep tiles.
  const int64_t rows_cap = std::min(block_q, Nq), ld = std::min(kBlockKV, s.seqlen_k);
  at::parallel_for(0, s.batch * s.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const auto q_tile = scratch<acc_t>(rows_cap * D), k_tile = scratch<acc_t>(ld * D),
               v_tile = scratch<acc_t>(ld * D), scores = scratch<acc_t>(rows_cap * ld),
               acc = scratch<acc_t>(rows_cap * D), row_max = scratch<acc_t>(rows_cap),
               row_sum = scratch<acc_t>(rows_cap);
    const auto keep = scratch<acc_t>(var.dropout.enabled() ? rows_cap * ld : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % q_tiles, bh = task / q_tiles;
      const int64_t b = bh / s.heads_q, h = bh % s.heads_q, h_kv = h / group;
      const int64_t q0 = tile * block_q, qn = std::min(block_q, Nq - q0);
      const ScoreRule<acc_t> rule = var.score_rule(b, h);

      const auto [q_rows, ldq] = Q.rows(b, h, q0, qn, D, q_tile.get());
      std::fill(acc.get(), acc.get() + qn * D, acc_t(0));
      std::fill(row_max.get(), row_max.get() + qn, kNegInf);
      std::fill(row_sum.get(), row_sum.get() + qn, acc_t(0));

      // Keys any row of the tile sees: only these tiles are visited.
      const int64_t k_begin = var.vis.key_begin(q0), k_end = var.vis.key_end(q0 + qn - 1);
      for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockKV) {
        const int64_t kn = std::min(kBlockKV, k_end - k0);
        const auto [k_rows, ldk] = K.rows(b, h_kv, k0, kn, D, k_tile.get());
        const auto [v_rows, ldv] = V.rows(b, h_kv, k0, kn, D, v_tile.get());
        // S = scale * Q K^T, then logits
        gemm_rm(false, true, qn, kn, D, static_cast<acc_t>(scale), q_rows, ldq, k_rows, ldk, acc_t(0),
                scores.get(), ld);
        var.logits(scores.get(), ld, q0, qn, k0, kn, rule, nullptr);
        if (var.dropout.enabled()) var.keep_tile(keep.get(), ld, var.rng_head(b, h), q0, qn, k0, kn);
        for (int64_t i = 0; i < qn; ++i) {
          acc_t* p = &scores[i * ld];
          const acc_t rescale = online_softmax_row(p, kn, row_max[i], row_sum[i]);
          if (rescale != acc_t(1)) {
            for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= rescale;
          }
          if (var.dropout.enabled()) {  // after the sum: the LSE does not see dropout
            for (int64_t j = 0; j < kn; ++j) p[j] *= keep[i * ld + j];
          }
        }
        // O += P V
        gemm_rm(false, false, qn, D, kn, acc_t(1), scores.get(), ld, v_rows, ldv, acc_t(1), acc.get(), D);
      }

      for (int64_t i = 0; i < qn; ++i) {
        const bool any_visible = row_sum[i] > 0;
        const acc_t inv = any_visible ? acc_t(1) / row_sum[i] : acc_t(0);
        scalar_t* o_row = O.head(b, h) + (q0 + i) * O.sn;
        for (int64_t d = 0; d < D; ++d) o_row[d * O.sd] = static_cast<scalar_t>(acc[i * D + d] * inv);
        lse_data[b * lse_sb + h * lse_sh + (q0 + i) * lse_sn] =
            any_visible ? row_max[i] + std::log(row_sum[i]) : kNegInf;
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq_acc, at::Tensor& dk_acc,
                     at::Tensor& dv_acc, const ConcreteShape& s, const CpuVariant<acc_t>& var, double scale) {
  const HeadView<const scalar_t> Q(q), K(k), V(v), dO(dout), O(out);
  const auto lse_a = lse.accessor<acc_t, 3>();
  acc_t* dq_data = dq_acc.data_ptr<acc_t>();  // contiguous (B, Hq, Nq, D)
  acc_t* dk_data = dk_acc.data_ptr<acc_t>();  // contiguous (B, Hq, Nk, D): per-q-head partials
  acc_t* dv_data = dv_acc.data_ptr<acc_t>();
  const int64_t D = s.head_dim, Nq = s.seqlen_q, Nk = s.seqlen_k;
  const int64_t group = s.heads_q / s.heads_kv;
  const acc_t scale_acc = static_cast<acc_t>(scale);
  const bool softcap = var.softcap > 0, dropout = var.dropout.enabled();
  // Queries that see every key of a key tile take 256-row query tiles, as the unmasked forward does: a quarter of
  // the GEMM calls, each packing its K / V operand once for four times the rows (with the operands read in place,
  // the non-causal backward 10-12% faster than on 64-row tiles: perf.md, CPU backward, session 32); the band's
  // edges (queries that see part of the tile) keep 64, whose masked scores waste less. ld: row stride of the
  // score-sized tiles.
  const int64_t rows_cap = std::min(kBlockQBwdWide, Nq), ld = std::min(kBlockKV, Nk);

  at::parallel_for(0, s.batch * s.heads_q, 1, [&](int64_t begin, int64_t end) {
    // Not value-initialised: every element is written before it is read.
    const auto q_tile = scratch<acc_t>(rows_cap * D), do_tile = scratch<acc_t>(rows_cap * D),
               o_tile = scratch<acc_t>(rows_cap * D), k_tile = scratch<acc_t>(ld * D),
               v_tile = scratch<acc_t>(ld * D), p = scratch<acc_t>(rows_cap * ld), dp = scratch<acc_t>(rows_cap * ld);
    const auto keep = scratch<acc_t>(dropout ? rows_cap * ld : 0), pz = scratch<acc_t>(dropout ? rows_cap * ld : 0);
    const auto dtanh = scratch<acc_t>(softcap ? rows_cap * ld : 0);
    const auto delta = scratch<acc_t>(Nq), row_lse = scratch<acc_t>(Nq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads_q, h = bh % s.heads_q, h_kv = h / group;
      const ScoreRule<acc_t> rule = var.score_rule(b, h);
      acc_t* dq_head = dq_data + bh * Nq * D;
      acc_t* dk_head = dk_data + bh * Nk * D;
      acc_t* dv_head = dv_data + bh * Nk * D;

      // delta_i = rowsum(dO * O), the softmax-gradient correction of FlashAttention-2.
      for (int64_t q0 = 0; q0 < Nq; q0 += kBlockQBwdWide) {
        const int64_t qn = std::min(kBlockQBwdWide, Nq - q0);
        const auto [do_rows, ldo] = dO.rows(b, h, q0, qn, D, do_tile.get());
        const auto [o_rows, ldoo] = O.rows(b, h, q0, qn, D, o_tile.get());
        for (int64_t i = 0; i < qn; ++i) {
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += do_rows[i * ldo + d] * o_rows[i * ldoo + d];
          delta[q0 + i] = sum;
          row_lse[q0 + i] = lse_a[b][h][q0 + i];
        }
      }

      for (int64_t k0 = 0; k0 < Nk; k0 += kBlockKV) {
        const int64_t kn = std::min(kBlockKV, Nk - k0);
        // Queries that see any key of the tile: only their tiles are visited.
        const int64_t q_begin = var.vis.query_begin(k0), q_end = var.vis.query_end(k0 + kn - 1);
        if (q_begin >= q_end) continue;
        const auto [k_rows, ldk] = K.rows(b, h_kv, k0, kn, D, k_tile.get());
        const auto [v_rows, ldv] = V.rows(b, h_kv, k0, kn, D, v_tile.get());
        acc_t* dk_tile = dk_head + k0 * D;  // accumulated in place: zero-initialised by the caller
        acc_t* dv_tile = dv_head + k0 * D;
        // One query tile [q0, q0 + qn) against this key tile.
        auto query_tile = [&](int64_t q0, int64_t qn) {
          const auto [q_rows, ldq] = Q.rows(b, h, q0, qn, D, q_tile.get());
          const auto [do_rows, ldo] = dO.rows(b, h, q0, qn, D, do_tile.get());
          // P = exp(logits - lse)
          gemm_rm(false, true, qn, kn, D, scale_acc, q_rows, ldq, k_rows, ldk, acc_t(0), p.get(), ld);
          var.logits(p.get(), ld, q0, qn, k0, kn, rule, softcap ? dtanh.get() : nullptr);
          for (int64_t i = 0; i < qn; ++i) probabilities_row(&p[i * ld], kn, row_lse[q0 + i]);
          // With dropout, O used P * Z (Z = keep / (1 - p)): dV += (P Z)^T dO
          const acc_t* p_used = p.get();
          if (dropout) {
            var.keep_tile(keep.get(), ld, var.rng_head(b, h), q0, qn, k0, kn);
            for (int64_t i = 0; i < qn; ++i)
              for (int64_t j = 0; j < kn; ++j) pz[i * ld + j] = p[i * ld + j] * keep[i * ld + j];
            p_used = pz.get();
          }
          gemm_rm(true, false, kn, D, qn, acc_t(1), p_used, ld, do_rows, ldo, acc_t(1), dv_tile, D);
          // dP = dO V^T, then dS = P * (Z dP - delta) [* (1 - tanh^2)], stored over dP
          gemm_rm(false, true, qn, kn, D, acc_t(1), do_rows, ldo, v_rows, ldv, acc_t(0), dp.get(), ld);
          for (int64_t i = 0; i < qn; ++i) {
            const acc_t d_i = delta[q0 + i];
            acc_t* dp_row = &dp[i * ld];
            const acc_t* p_row = &p[i * ld];
            if (!dropout && !softcap) {  // the common case as its own loop, so that it vectorises
              for (int64_t j = 0; j < kn; ++j) dp_row[j] = p_row[j] * (dp_row[j] - d_i);
              continue;
            }
            for (int64_t j = 0; j < kn; ++j) {
              const acc_t z = dropout ? keep[i * ld + j] : acc_t(1);
              acc_t ds = p_row[j] * (z * dp_row[j] - d_i);
              if (softcap) ds *= dtanh[i * ld + j];
              dp_row[j] = ds;
            }
          }
          // dK += scale * dS^T Q;  dQ += scale * dS K
          gemm_rm(true, false, kn, D, qn, scale_acc, dp.get(), ld, q_rows, ldq, acc_t(1), dk_tile, D);
          gemm_rm(false, false, qn, D, kn, scale_acc, dp.get(), ld, k_rows, ldk, acc_t(1), dq_head + q0 * D, D);
        };
        // Queries [full_lo, full_hi) see every key of the tile (i sees k0 and the last key, so all between).
        int64_t full_lo = std::max(q_begin, var.vis.query_begin(k0 + kn - 1));
        int64_t full_hi = std::min(q_end, var.vis.query_end(k0));
        if (full_lo >= full_hi) full_lo = full_hi = q_end;
        for (int64_t q0 = q_begin; q0 < full_lo; q0 += kBlockQ) query_tile(q0, std::min(kBlockQ, full_lo - q0));
        for (int64_t q0 = full_lo; q0 < full_hi; q0 += kBlockQBwdWide)
          query_tile(q0, std::min(kBlockQBwdWide, full_hi - q0));
        for (int64_t q0 = full_hi; q0 < q_end; q0 += kBlockQ) query_tile(q0, std::min(kBlockQ, q_end - q0));
      }
    }
  });
}

// Dense forward into the given outputs (views allowed). batch_base: see CpuVariant.
void forward_into(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                  const at::Tensor& lse, const ConcreteShape& s, const Variant& var, double scale,
                  int64_t batch_base) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn2_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, k, v, out, lse, s, CpuVariant<acc_t>(var, s, batch_base), scale);
  });
}

Tensor3 backward_dense(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, const ConcreteShape& s, const Variant& var,
                       double scale, int64_t batch_base) {
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = q.options().dtype(acc_dtype);
  at::Tensor dq_acc = at::zeros({s.batch, s.heads_q, s.seqlen_q, s.head_dim}, acc_options);
  at::Tensor dk_acc = at::zeros({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, acc_options);
  at::Tensor dv_acc = at::zeros({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, acc_options);
  if (dq_acc.numel() > 0 && dk_acc.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn2_bwd_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_kernel<scalar_t, acc_t>(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, s,
                                       CpuVariant<acc_t>(var, s, batch_base), scale);
    });
  }
  // Sum the per-q-head partials over each GQA group.
  const int64_t group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 1;
  // Gradients in their inputs' memory order (empty_like_input), summing each GQA group's per-q-head partials.
  auto group_sum = [&](const at::Tensor& partial) {
    return group == 1 ? partial : partial.view({s.batch, s.heads_kv, group, s.seqlen_k, s.head_dim}).sum(2);
  };
  // A contiguous input of the accumulation type gets the accumulator itself (same shape, same memory order): no
  // copy (three of a 2 MB gradient each at B = 1, H = 8, N = 1024, D = 64).
  auto finish = [&](const at::Tensor& input, at::Tensor grad) {
    if (input.scalar_type() == grad.scalar_type() && input.is_contiguous() && grad.is_contiguous()) return grad;
    return empty_like_input(input).copy_(grad);
  };
  return {finish(q, dq_acc), finish(k, group_sum(dk_acc)), finish(v, group_sum(dv_acc))};
}

// Windows wider than the sequences are unbounded (keeps the index arithmetic in range).
Variant clamp_window(Variant var, int64_t seqlen_q, int64_t seqlen_k) {
  if (var.window_left >= seqlen_k) var.window_left = -1;
  if (var.window_right >= seqlen_q) var.window_right = -1;
  return var;
}

Tensor2 fwd_with_lse_cpu(FA2_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_with_lse";
  const ConcreteShape s = concrete(check_forward_inputs(op, q, k, v, scale));
  const Variant var = clamp_window(check_variant(op, q, s.batch, s.heads_q, causal, FA2_OPTION_ARGS),
                                   s.seqlen_q, s.seqlen_k);
  auto [out, lse, done] = forward_outputs(q, s, var);
  if (done) return {out, lse};
  forward_into(q, k, v, out, lse, s, var, softmax_scale(scale, s.head_dim), 0);
  return {out, lse};
}

at::Tensor fwd_cpu(FA2_FWD_PARAMS) { return std::get<0>(fwd_with_lse_cpu(FA2_FWD_ARGS)); }

Tensor3 bwd_cpu(FA2_BWD_PARAMS) {
  constexpr const char* op = "flash_attn2::bwd";
  const ConcreteShape s = concrete(check_backward_inputs(op, dout, q, k, v, out, lse, scale));
  const Variant var = clamp_window(check_variant(op, q, s.batch, s.heads_q, causal, FA2_BWD_OPTION_ARGS),
                                   s.seqlen_q, s.seqlen_k);
  return backward_dense(dout, q, k, v, out, lse, s, var, softmax_scale(scale, s.head_dim), 0);
}

// Sequence b of a packed (T, H, D) tensor as a (1, H, n, D) view.
at::Tensor sequence(const at::Tensor& packed, int64_t start, int64_t length) {
  return packed.narrow(0, start, length).transpose(0, 1).unsqueeze(0);
}

struct VarlenPlan {
  ConcreteShape packed;
  std::vector<int64_t> cu_q, cu_k;
  Variant var;
  double scale;
  ConcreteShape seq(int64_t b) const {
    return {1, packed.heads_q, packed.heads_kv, cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], packed.head_dim};
  }
};

VarlenPlan plan_varlen(const char* op, const AttentionShape& shape, const at::Tensor& q,
                       const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, const c10::SymInt& max_q,
                       const c10::SymInt& max_k, Variant var, std::optional<double> scale) {
  VarlenPlan plan{concrete(shape), {}, {}, std::move(var), 0.0};
  plan.cu_q = read_cu_seqlens(op, "cu_seqlens_q", cu_seqlens_q, plan.packed.seqlen_q, max_q.expect_int());
  plan.cu_k = read_cu_seqlens(op, "cu_seqlens_k", cu_seqlens_k, plan.packed.seqlen_k, max_k.expect_int());
  plan.scale = softmax_scale(scale, plan.packed.head_dim);
  return plan;
}

Tensor2 fwd_varlen_with_lse_cpu(FA2_VARLEN_FWD_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_varlen_with_lse";
  const AttentionShape shape =
      check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale);
  const VarlenPlan plan = plan_varlen(op, shape, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      check_variant(op, q, shape.batch, shape.heads_q, causal, FA2_OPTION_ARGS),
                                      scale);
  at::Tensor out = empty_like_input(q);
  at::Tensor lse = at::empty({plan.packed.heads_q, plan.packed.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  for (int64_t b = 0; b + 1 < static_cast<int64_t>(plan.cu_q.size()); ++b) {
    const ConcreteShape s = plan.seq(b);
    const Variant var = clamp_window(plan.var, s.seqlen_q, s.seqlen_k);
    const at::Tensor q_b = sequence(q, plan.cu_q[b], s.seqlen_q), k_b = sequence(k, plan.cu_k[b], s.seqlen_k),
                     v_b = sequence(v, plan.cu_k[b], s.seqlen_k), o_b = sequence(out, plan.cu_q[b], s.seqlen_q);
    const at::Tensor lse_b = lse.narrow(1, plan.cu_q[b], s.seqlen_q).unsqueeze(0);
    auto trivial = forward_outputs(q_b, s, var);
    if (trivial.done) {
      o_b.copy_(trivial.out);
      lse_b.copy_(trivial.lse);
      continue;
    }
    forward_into(q_b, k_b, v_b, o_b, lse_b, s, var, plan.scale, b);
  }
  return {out, lse};
}

at::Tensor fwd_varlen_cpu(FA2_VARLEN_FWD_PARAMS) {
  return std::get<0>(fwd_varlen_with_lse_cpu(FA2_VARLEN_FWD_ARGS));
}

Tensor3 bwd_varlen_cpu(FA2_VARLEN_BWD_PARAMS) {
  constexpr const char* op = "flash_attn2::bwd_varlen";
  const AttentionShape shape = check_varlen_backward_inputs(op, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                            max_seqlen_q, max_seqlen_k, scale);
  const VarlenPlan plan = plan_varlen(op, shape, q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      check_variant(op, q, shape.batch, shape.heads_q, causal, FA2_BWD_OPTION_ARGS),
                                      scale);
  at::Tensor dq = empty_like_input(q).zero_(), dk = empty_like_input(k).zero_(), dv = empty_like_input(v).zero_();
  for (int64_t b = 0; b + 1 < static_cast<int64_t>(plan.cu_q.size()); ++b) {
    const ConcreteShape s = plan.seq(b);
    if (s.seqlen_q == 0 || s.seqlen_k == 0) continue;  // gradients stay zero
    const Variant var = clamp_window(plan.var, s.seqlen_q, s.seqlen_k);
    const int64_t sq = plan.cu_q[b], sk = plan.cu_k[b];
    auto [dq_b, dk_b, dv_b] = backward_dense(
        sequence(dout, sq, s.seqlen_q), sequence(q, sq, s.seqlen_q), sequence(k, sk, s.seqlen_k),
        sequence(v, sk, s.seqlen_k), sequence(out, sq, s.seqlen_q), lse.narrow(1, sq, s.seqlen_q).unsqueeze(0), s, var,
        plan.scale, b);
    sequence(dq, sq, s.seqlen_q).copy_(dq_b);
    sequence(dk, sk, s.seqlen_k).copy_(dk_b);
    sequence(dv, sk, s.seqlen_k).copy_(dv_b);
  }
  return {dq, dk, dv};
}

// KV cache: appends k_new / v_new in place, then runs the dense kernel per sequence on its valid prefix (paged
// caches: the sequence's pages gathered first). CpuVariant's batch_base keeps ALiBi rows per sequence.
Tensor2 fwd_kvcache_cpu(FA2_KVCACHE_PARAMS) {
  constexpr const char* op = "flash_attn2::fwd_kvcache";
  const KvCacheShape ks = check_kvcache_inputs(op, q, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                               scale, num_splits);
  const Variant var0 = check_variant(op, q, ks.s.batch, ks.s.heads_q, causal, window_size, softcap, alibi_slopes,
                                     0.0, std::nullopt);
  const ConcreteShape s = concrete(ks.s);
  const int64_t added = ks.seqlen_new.expect_int();
  const std::vector<int64_t> lengths = read_kvcache_lengths(op, ks, cache_seqlens, block_table);
  at::Tensor out = empty_like_input(q);
  at::Tensor lse = at::empty({s.batch, s.heads_q, s.seqlen_q}, q.options().dtype(lse_dtype(q.scalar_type())));
  const int64_t page = ks.paged ? ks.page_size.expect_int() : 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t keys = lengths[b] + added;
    at::Tensor k_b, v_b;  // (1, Hkv, keys, D)
    if (ks.paged) {
      const int64_t pages = (keys + page - 1) / page;
      const at::Tensor table = block_table->select(0, b).narrow(0, 0, pages).to(at::kLong);
      const at::Tensor rows = at::arange(lengths[b], keys, table.options());
      auto prefix = [&](const at::Tensor& cache, const std::optional<at::Tensor>& fresh) {
        if (added > 0)  // the new rows into their pages
          cache.index_put_({table.index_select(0, at::floor_divide(rows, page)), at::remainder(rows, page)},
                           fresh->select(0, b).transpose(0, 1));
        // (1, Hkv, keys, D) from the sequence's pages
        return cache.index_select(0, table).flatten(0, 1).narrow(0, 0, keys).transpose(0, 1).unsqueeze(0);
      };
      k_b = prefix(k_cache, k_new);
      v_b = prefix(v_cache, v_new);
    } else {
      if (added > 0) {
        k_cache.select(0, b).narrow(1, lengths[b], added).copy_(k_new->select(0, b));
        v_cache.select(0, b).narrow(1, lengths[b], added).copy_(v_new->select(0, b));
      }
      k_b = k_cache.narrow(0, b, 1).narrow(2, 0, keys);
      v_b = v_cache.narrow(0, b, 1).narrow(2, 0, keys);
    }
    const ConcreteShape sb{1, s.heads_q, s.heads_kv, s.seqlen_q, keys, s.head_dim};
    const Variant var = clamp_window(var0, sb.seqlen_q, sb.seqlen_k);
    const at::Tensor q_b = q.narrow(0, b, 1), o_b = out.narrow(0, b, 1), lse_b = lse.narrow(0, b, 1);
    auto trivial = forward_outputs(q_b, sb, var);
    if (trivial.done) {
      o_b.copy_(trivial.out);
      lse_b.copy_(trivial.lse);
      continue;
    }
    forward_into(q_b, k_b, v_b, o_b, lse_b, sb, var, softmax_scale(scale, s.head_dim), b);
  }
  return {out, lse};
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& rng_state, int64_t batch, int64_t heads, int64_t seqlen_q,
                                 int64_t seqlen_k, double dropout_p, std::optional<c10::Device> device) {
  constexpr const char* op = "flash_attn2::dropout_keep_mask";
  TORCH_CHECK(batch >= 0 && heads >= 0 && seqlen_q >= 0 && seqlen_k >= 0, op,
              ": sizes must be >= 0, got batch ", batch, ", heads ", heads, ", seqlen_q ", seqlen_q, ", seqlen_k ",
              seqlen_k);
  const at::Tensor q = at::empty({0}, rng_state.options().dtype(at::kFloat));
  const Variant var = check_variant(op, q, batch, heads, false, {-1, -1}, 0.0, std::nullopt, dropout_p, rng_state);
  const auto [seed, offset] = read_rng_state(var);
  const Dropout d = Dropout::make(seed, offset, dropout_p);
  at::Tensor mask = at::empty({batch, heads, seqlen_q, seqlen_k}, at::TensorOptions().dtype(at::kBool));
  bool* m = mask.data_ptr<bool>();
  at::parallel_for(0, batch * heads * seqlen_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint32_t bh = static_cast<uint32_t>(row / seqlen_q), i = static_cast<uint32_t>(row % seqlen_q);
      for (int64_t j = 0; j < seqlen_k; ++j) m[row * seqlen_k + j] = d.keep(bh, i, static_cast<uint32_t>(j));
    }
  });
  return device.has_value() ? mask.to(*device) : mask;
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("fwd_with_lse", &fwd_with_lse_cpu);
  m.impl("bwd", &bwd_cpu);
  m.impl("fwd_varlen", &fwd_varlen_cpu);
  m.impl("fwd_varlen_with_lse", &fwd_varlen_with_lse_cpu);
  m.impl("bwd_varlen", &bwd_varlen_cpu);
  m.impl("dropout_keep_mask", &dropout_keep_mask_cpu);
  m.impl("fwd_kvcache", &fwd_kvcache_cpu);
}

}  // namespace flash_attn2::cpu
