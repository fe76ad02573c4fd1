// CPU kernels: the FlashAttention-2 algorithm on packed tiles.
// Forward: parallel over (batch, head, query tile); each task streams K/V tiles with an online softmax and never
// holds more than a Br x Bc score tile. Backward: parallel over (batch, q head); each task recomputes P from the
// saved LSE tile by tile, owns its head's dQ and writes per-q-head dK/dV partials that are summed over the GQA
// group afterwards, so no two tasks write the same memory and results are deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "trivial_cases.h"
#include "cpu/tile_math.h"

namespace flash_attn2::cpu {
namespace {

constexpr int64_t kBlockQ = 64;    // Br: query rows per tile
constexpr int64_t kBlockKV = 128;  // Bc: key rows per tile

// Strided view of one tensor (B, H, N, D) as a base pointer and element strides.
template <typename scalar_t>
struct HeadView {
  const scalar_t* data;
  int64_t sb, sh, sn, sd;
  explicit HeadView(const at::Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)), sd(t.stride(3)) {}
  const scalar_t* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
  template <typename acc_t>
  void pack(int64_t b, int64_t h, int64_t row0, int64_t rows, int64_t D, acc_t* tile) const {
    pack_rows(head(b, h), sn, sd, row0, rows, D, tile);
  }
};

// The causal offset: query i sees key j iff j <= i + (Nk - Nq).
struct CausalMask {
  bool enabled;
  int64_t offset;
  // One past the last key any of queries [0, q_end) may see.
  int64_t key_end(int64_t q_end, int64_t Nk) const {
    return enabled ? std::clamp<int64_t>(q_end + offset, 0, Nk) : Nk;
  }
  // The first query that may see key k0.
  int64_t query_begin(int64_t k0) const { return enabled ? std::max<int64_t>(k0 - offset, 0) : 0; }
  // Sets scores of keys above the diagonal to -inf in a qn x kn tile at (q0, k0), row stride ld.
  template <typename acc_t>
  void apply(acc_t* S, int64_t ld, int64_t q0, int64_t qn, int64_t k0, int64_t kn) const {
    if (!enabled || k0 + kn - 1 <= q0 + offset) return;  // tile wholly at or below the diagonal
    for (int64_t i = 0; i < qn; ++i) {
      const int64_t first_hidden = std::max<int64_t>(q0 + i + offset + 1 - k0, 0);
      for (int64_t j = first_hidden; j < kn; ++j) S[i * ld + j] = -std::numeric_limits<acc_t>::infinity();
    }
  }
};

// One online-softmax step on a row of scores: updates the running max and sum, turns s into p in place and
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

// p = exp(s - lse) for one row of recomputed scores; a row that sees no key (lse = -inf) gets p = 0.
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

template <typename scalar_t, typename acc_t>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, const ConcreteShape& s, bool causal, double scale) {
  const HeadView<scalar_t> Q(q), K(k), V(v);
  scalar_t* out_data = out.data_ptr<scalar_t>();  // contiguous (B, Hq, Nq, D)
  acc_t* lse_data = lse.data_ptr<acc_t>();        // contiguous (B, Hq, Nq), in lse_dtype == acc_t
  const int64_t D = s.head_dim, Nq = s.seqlen_q, Nk = s.seqlen_k;
  const int64_t group = s.heads_q / s.heads_kv;
  const int64_t q_tiles = (Nq + kBlockQ - 1) / kBlockQ;
  const CausalMask mask{causal, Nk - Nq};
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, s.batch * s.heads_q * q_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(kBlockQ * D), k_tile(kBlockKV * D), v_tile(kBlockKV * D);
    std::vector<acc_t> scores(kBlockQ * kBlockKV), acc(kBlockQ * D), row_max(kBlockQ), row_sum(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task % q_tiles, bh = task / q_tiles;
      const int64_t b = bh / s.heads_q, h = bh % s.heads_q, h_kv = h / group;
      const int64_t q0 = tile * kBlockQ, qn = std::min(kBlockQ, Nq - q0);

      Q.pack(b, h, q0, qn, D, q_tile.data());
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));

      const int64_t k_end = mask.key_end(q0 + qn, Nk);
      for (int64_t k0 = 0; k0 < k_end; k0 += kBlockKV) {
        const int64_t kn = std::min(kBlockKV, k_end - k0);
        K.pack(b, h_kv, k0, kn, D, k_tile.data());
        V.pack(b, h_kv, k0, kn, D, v_tile.data());
        // S = scale * Q K^T
        gemm_rm(false, true, qn, kn, D, static_cast<acc_t>(scale), q_tile.data(), D, k_tile.data(), D,
                       acc_t(0), scores.data(), kBlockKV);
        mask.apply(scores.data(), kBlockKV, q0, qn, k0, kn);
        for (int64_t i = 0; i < qn; ++i) {
          const acc_t rescale = online_softmax_row(&scores[i * kBlockKV], kn, row_max[i], row_sum[i]);
          if (rescale != acc_t(1)) {
            for (int64_t d = 0; d < D; ++d) acc[i * D + d] *= rescale;
          }
        }
        // O += P V
        gemm_rm(false, false, qn, D, kn, acc_t(1), scores.data(), kBlockKV, v_tile.data(), D, acc_t(1),
                       acc.data(), D);
      }

      const int64_t row_offset = (b * s.heads_q + h) * Nq + q0;
      for (int64_t i = 0; i < qn; ++i) {
        const bool any_visible = row_sum[i] > 0;
        const acc_t inv = any_visible ? acc_t(1) / row_sum[i] : acc_t(0);
        scalar_t* o_row = out_data + (row_offset + i) * D;
        for (int64_t d = 0; d < D; ++d) o_row[d] = static_cast<scalar_t>(acc[i * D + d] * inv);
        lse_data[row_offset + i] = any_visible ? row_max[i] + std::log(row_sum[i]) : kNegInf;
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq_acc, at::Tensor& dk_acc,
                     at::Tensor& dv_acc, const ConcreteShape& s, bool causal, double scale) {
  const HeadView<scalar_t> Q(q), K(k), V(v), dO(dout), O(out);
  const auto lse_a = lse.accessor<acc_t, 3>();
  acc_t* dq_data = dq_acc.data_ptr<acc_t>();  // contiguous (B, Hq, Nq, D)
  acc_t* dk_data = dk_acc.data_ptr<acc_t>();  // contiguous (B, Hq, Nk, D): per-q-head partials
  acc_t* dv_data = dv_acc.data_ptr<acc_t>();
  const int64_t D = s.head_dim, Nq = s.seqlen_q, Nk = s.seqlen_k;
  const int64_t group = s.heads_q / s.heads_kv;
  const CausalMask mask{causal, Nk - Nq};
  const acc_t scale_acc = static_cast<acc_t>(scale);

  at::parallel_for(0, s.batch * s.heads_q, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_tile(kBlockQ * D), do_tile(kBlockQ * D), o_tile(kBlockQ * D);
    std::vector<acc_t> k_tile(kBlockKV * D), v_tile(kBlockKV * D);
    std::vector<acc_t> p(kBlockQ * kBlockKV), dp(kBlockQ * kBlockKV);
    std::vector<acc_t> delta(Nq), row_lse(Nq);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / s.heads_q, h = bh % s.heads_q, h_kv = h / group;
      acc_t* dq_head = dq_data + bh * Nq * D;
      acc_t* dk_head = dk_data + bh * Nk * D;
      acc_t* dv_head = dv_data + bh * Nk * D;

      // delta_i = rowsum(dO * O), the softmax-gradient correction of FlashAttention-2.
      for (int64_t q0 = 0; q0 < Nq; q0 += kBlockQ) {
        const int64_t qn = std::min(kBlockQ, Nq - q0);
        dO.pack(b, h, q0, qn, D, do_tile.data());
        O.pack(b, h, q0, qn, D, o_tile.data());
        for (int64_t i = 0; i < qn; ++i) {
          acc_t sum = 0;
          for (int64_t d = 0; d < D; ++d) sum += do_tile[i * D + d] * o_tile[i * D + d];
          delta[q0 + i] = sum;
          row_lse[q0 + i] = lse_a[b][h][q0 + i];
        }
      }

      for (int64_t k0 = 0; k0 < Nk; k0 += kBlockKV) {
        const int64_t kn = std::min(kBlockKV, Nk - k0);
        K.pack(b, h_kv, k0, kn, D, k_tile.data());
        V.pack(b, h_kv, k0, kn, D, v_tile.data());
        acc_t* dk_tile = dk_head + k0 * D;  // accumulated in place: zero-initialised by the caller
        acc_t* dv_tile = dv_head + k0 * D;
        for (int64_t q0 = mask.query_begin(k0) / kBlockQ * kBlockQ; q0 < Nq; q0 += kBlockQ) {
          const int64_t qn = std::min(kBlockQ, Nq - q0);
          Q.pack(b, h, q0, qn, D, q_tile.data());
          dO.pack(b, h, q0, qn, D, do_tile.data());
          // P = exp(scale * Q K^T - lse)
          gemm_rm(false, true, qn, kn, D, scale_acc, q_tile.data(), D, k_tile.data(), D, acc_t(0),
                         p.data(), kBlockKV);
          mask.apply(p.data(), kBlockKV, q0, qn, k0, kn);
          for (int64_t i = 0; i < qn; ++i) probabilities_row(&p[i * kBlockKV], kn, row_lse[q0 + i]);
          // dV += P^T dO
          gemm_rm(true, false, kn, D, qn, acc_t(1), p.data(), kBlockKV, do_tile.data(), D, acc_t(1),
                         dv_tile, D);
          // dP = dO V^T, then dS = P * (dP - delta), stored over dP
          gemm_rm(false, true, qn, kn, D, acc_t(1), do_tile.data(), D, v_tile.data(), D, acc_t(0),
                         dp.data(), kBlockKV);
          for (int64_t i = 0; i < qn; ++i) {
            const acc_t d_i = delta[q0 + i];
            acc_t* dp_row = &dp[i * kBlockKV];
            const acc_t* p_row = &p[i * kBlockKV];
            for (int64_t j = 0; j < kn; ++j) dp_row[j] = p_row[j] * (dp_row[j] - d_i);
          }
          // dK += scale * dS^T Q;  dQ += scale * dS K
          gemm_rm(true, false, kn, D, qn, scale_acc, dp.data(), kBlockKV, q_tile.data(), D, acc_t(1),
                         dk_tile, D);
          gemm_rm(false, false, qn, D, kn, scale_acc, dp.data(), kBlockKV, k_tile.data(), D, acc_t(1),
                         dq_head + q0 * D, D);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fwd_with_lse_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    bool causal, std::optional<double> scale) {
  const ConcreteShape s = concrete(check_forward_inputs("flash_attn2::fwd_with_lse", q, k, v, scale));
  auto [out, lse, done] = forward_outputs(q, s, causal);
  if (done) return {out, lse};
  const double sm_scale = softmax_scale(scale, s.head_dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn2_fwd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    forward_kernel<scalar_t, acc_t>(q, k, v, out, lse, s, causal, sm_scale);
  });
  return {out, lse};
}

at::Tensor fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                   std::optional<double> scale) {
  return std::get<0>(fwd_with_lse_cpu(q, k, v, causal, scale));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd_cpu(const at::Tensor& dout, const at::Tensor& q,
                                                       const at::Tensor& k, const at::Tensor& v,
                                                       const at::Tensor& out, const at::Tensor& lse, bool causal,
                                                       std::optional<double> scale) {
  const ConcreteShape s =
      concrete(check_backward_inputs("flash_attn2::bwd", dout, q, k, v, out, lse, scale));
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = q.options().dtype(acc_dtype);
  at::Tensor dq_acc = at::zeros(q.sizes(), acc_options);
  at::Tensor dk_acc = at::zeros({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, acc_options);
  at::Tensor dv_acc = at::zeros({s.batch, s.heads_q, s.seqlen_k, s.head_dim}, acc_options);
  if (dq_acc.numel() > 0 && dk_acc.numel() > 0) {
    const double sm_scale = softmax_scale(scale, s.head_dim);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "flash_attn2_bwd_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      backward_kernel<scalar_t, acc_t>(dout, q, k, v, out, lse, dq_acc, dk_acc, dv_acc, s, causal, sm_scale);
    });
  }
  // Sum the per-q-head partials over each GQA group.
  const int64_t group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 1;
  auto reduce_group = [&](const at::Tensor& partial) {
    if (group == 1) return partial.to(q.scalar_type());
    return partial.view({s.batch, s.heads_kv, group, s.seqlen_k, s.head_dim}).sum(2).to(q.scalar_type());
  };
  return {dq_acc.to(q.scalar_type()), reduce_group(dk_acc), reduce_group(dv_acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(flash_attn2, CPU, m) {
  m.impl("fwd", &fwd_cpu);
  m.impl("fwd_with_lse", &fwd_with_lse_cpu);
  m.impl("bwd", &bwd_cpu);
}

}  // namespace flash_attn2::cpu
