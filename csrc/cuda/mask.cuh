// The attention variants applied to score fragments held in registers: visibility (causal, sliding window,
// sequence ends), the score transform (softcap, ALiBi) and the dropout keep mask. Each is the device form of
// attention_rule.h, so every kernel (forward and backward, mma.sync and wgmma) decides the same way.
//
// A fragment s[MT][NT][4] is an mma C accumulator: element (mi, ni, e) is at row r0 + 16 mi + 8 (e / 2), column
// c0 + 8 ni + (e % 2), where (r0, c0) is the thread's position of (0, 0, 0). The forward kernels and the
// mma.sync backward hold queries as rows (kKeysAsRows = false); the Hopper backward holds keys as rows.
#pragma once

#include <cmath>

#include "attention_rule.h"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// with_flags(f, a, b, ...) calls f(std::bool_constant<a>{}, std::bool_constant<b>{}, ...): the run-time choices
// a per-score loop depends on (softcap, ALiBi, a tile that needs its mask) become one compiled copy of the loop
// per combination, the branch taken once per tile instead of a select per score. Each flag doubles the copies:
// flags whose state lives across the loop (dropout's keep bits) can cost registers instead (perf.md v15).
template <bool... kDone, class F>
FA2_DEVICE void with_flags(F&& f) {
  f(std::bool_constant<kDone>{}...);
}
template <bool... kDone, class F, class... Rest>
FA2_DEVICE void with_flags(F&& f, bool flag, Rest... rest) {
  if (flag) with_flags<kDone..., true>(f, rest...);
  else with_flags<kDone..., false>(f, rest...);
}

// Calls f(value, query, key) for every element of the fragment.
template <bool kKeysAsRows, int MT, int NT, class F>
FA2_DEVICE void for_each_score(float (&s)[MT][NT][4], int r0, int c0, F&& f) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = r0 + 16 * mi + 8 * (e / 2), c = c0 + 8 * ni + (e % 2);
        f(s[mi][ni][e], kKeysAsRows ? c : r, kKeysAsRows ? r : c);
      }
}

// Visibility of a column within a row's visible range [lo, lo + span): one unsigned compare (col - lo wraps to a
// large value below lo), so that a mask is an add, a compare and a select per score. The forward's former
// `if (j < vis.key_begin(i) || j >= vis.key_end(i))` per score compiled to two branches and a convergence
// barrier (BSSY / BSYNC) per score, about 10 instructions each: the d128 WS forward had 99 BSSY, now 35, and
// 3968 SASS instructions, now 3440 (perf.md v16).
struct VisibleSpan {
  int lo;
  unsigned span;
  FA2_DEVICE VisibleSpan(int lo_, int hi) : lo(lo_), span(static_cast<unsigned>(max(hi - lo_, 0))) {}
  FA2_DEVICE bool operator()(int col) const { return static_cast<unsigned>(col - lo) < span; }
};

// Sets invisible scores to -inf. The visible range of each row (keys of a query, or queries of a key) is
// computed once per row; each element then costs a compare and a select.
template <bool kKeysAsRows = false, int MT, int NT>
FA2_DEVICE void apply_mask(float (&s)[MT][NT][4], int r0, int c0, const Visibility<int>& vis) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r0 + 16 * mi + 8 * h;
      const int lo = kKeysAsRows ? vis.query_begin(row) : vis.key_begin(row);
      const int hi = kKeysAsRows ? (row < vis.seqlen_k ? vis.query_end(row) : lo) : vis.key_end(row);
      const VisibleSpan visible(lo, hi);
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[mi][ni][2 * h + e];
          x = visible(c0 + 8 * ni + e) ? x : -INFINITY;
        }
    }
}

FA2_DEVICE float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// The score rule of head h of batch b, in raw-score units (the kernels apply the softmax scale afterwards).
FA2_DEVICE ScoreRule<float> score_rule(const FwdParams& p, int b, int h) {
  ScoreRule<float> r;
  r.cap_in = p.softcap_in;
  r.cap_out = p.softcap_out;
  r.alibi = p.alibi_slopes != nullptr ? p.alibi_slopes[static_cast<index_t>(b) * p.alibi_batch_stride + h] * p.inv_scale
                                      : 0.f;
  return r;
}

// Raw scores -> transformed scores (softcap, then ALiBi). Runs before the mask, which overwrites with -inf.
template <bool kKeysAsRows = false, int MT, int NT>
FA2_DEVICE void apply_score_rule(float (&s)[MT][NT][4], int r0, int c0, int diag, const ScoreRule<float>& r) {
  if (r.has_softcap()) {
    for_each_score<kKeysAsRows>(s, r0, c0, [&](float& x, int, int) { x = r.cap_out * fast_tanh(x * r.cap_in); });
  }
  if (r.alibi != 0.f) {
    for_each_score<kKeysAsRows>(s, r0, c0, [&](float& x, int i, int j) { x -= r.alibi * fabsf(static_cast<float>(i + diag - j)); });
  }
}

// The softcap in units of the cap: x = tanh(cap_in x) in [-1, 1] (update_scores_fixed scales it by the cap).
template <int MT, int NT>
FA2_DEVICE void apply_softcap_unit(float (&s)[MT][NT][4], const ScoreRule<float>& r) {
  for_each_score<false>(s, 0, 0, [&](float& x, int, int) { x = fast_tanh(x * r.cap_in); });
}

// d logit / d (scale q.k) = 1 - tanh^2 for a score whose probability p = exp2(x * scale_log2 - lse2) is known
// (the backward recomputes tanh from P instead of keeping it in registers): cap_out tanh = x + alibi |i + diag - j|.
FA2_DEVICE float softcap_grad(float p, float lse2, int i, int j, int diag, const ScoreRule<float>& r, float inv_scale_log2) {
  if (!(p > 0.f)) return 0.f;
  const float x = (__log2f(p) + lse2) * inv_scale_log2 + r.alibi * fabsf(static_cast<float>(i + diag - j));
  const float t = x * r.cap_in;  // cap_in * cap_out = 1
  return fmaxf(0.f, 1.f - t * t);
}

// The dropout keep mask of a fragment as bits: bit (mi * NT + ni) * 4 + e. bh = b * Hq + h; queries and keys
// are positions within the sequence. Row / column bases must be multiples of 16 plus the lane's g / 2t.
template <int MT, int NT>
struct KeepBits {
  static constexpr int kWords = (MT * NT * 4 + 31) / 32;
  uint32_t w[kWords];
  FA2_DEVICE bool get(int mi, int ni, int e) const {
    const int bit = (mi * NT + ni) * 4 + e;
    return (w[bit / 32] >> (bit % 32)) & 1u;
  }
  FA2_DEVICE void set(int mi, int ni, int e, bool v) {
    const int bit = (mi * NT + ni) * 4 + e;
    w[bit / 32] |= static_cast<uint32_t>(v) << (bit % 32);
  }
};

// The factor a score-modifier kernel's epilogue applies to O (forward) or dV (backward): 1 / (1 - p) with dropout,
// whose products took P K (K the keep mask) rather than P Z, else 1.
template <class Params>
FA2_DEVICE float dropout_scale(const Params& p, bool score_mod) {
  return score_mod && p.dropout.enabled() ? p.keep_scale : 1.f;
}

// Queries as rows: one Philox call covers the thread's 8 elements of an (mi, pair of n8 tiles) block.
template <int MT, int NT>
FA2_DEVICE KeepBits<MT, NT> dropout_bits(const Dropout& d, uint32_t bh, int r0, int c0) {
  static_assert(NT % 2 == 0, "dropout draws cover two n8 tiles");
  KeepBits<MT, NT> k;
#pragma unroll
  for (int i = 0; i < KeepBits<MT, NT>::kWords; ++i) k.w[i] = 0;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      const Philox4 r = d.draws(bh, Dropout::group_i(r0 + 16 * mi), Dropout::group_j(c0 + 16 * np));
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) k.set(mi, 2 * np + n, e, d.keep_draw(r, (e / 2) * 4 + n * 2 + (e % 2)));
    }
  return k;
}

// Keys as rows (MT = 1, rows key0 + g and + 8; columns queries). A Philox call covers queries {i0, i0 + 8} x
// keys {j0, j0 + 1, j0 + 8, j0 + 9}: for one query parity e, this lane holds half of it (keys g, g + 8) and
// the lane with g ^ 1 (lane ^ 4) the other half. So each lane of the pair draws for one parity and hands the
// partner its 4 bits: one call per pair of n8 tiles, as in the queries-as-rows layout.
template <int NT>
FA2_DEVICE KeepBits<1, NT> dropout_bits_keys_as_rows(const Dropout& d, uint32_t bh, int r0, int c0) {
  static_assert(NT % 2 == 0, "dropout draws cover two n8 tiles");
  KeepBits<1, NT> k;
#pragma unroll
  for (int i = 0; i < KeepBits<1, NT>::kWords; ++i) k.w[i] = 0;
  const uint32_t gj = Dropout::group_j(r0), mine = r0 & 1, other = mine ^ 1u;
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    // The draw for query parity e = mine: my keys' slots and the partner's.
    const Philox4 r = d.draws(bh, Dropout::group_i(c0 + 16 * np + mine), gj);
    uint32_t partner = 0;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        k.set(0, 2 * np + n, 2 * h + mine, d.keep_draw(r, n * 4 + h * 2 + mine));
        partner |= static_cast<uint32_t>(d.keep_draw(r, n * 4 + h * 2 + other)) << (2 * n + h);
      }
    // The partner drew parity e = other for my keys.
    const uint32_t got = __shfl_xor_sync(0xffffffffu, partner, 4);
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int h = 0; h < 2; ++h) k.set(0, 2 * np + n, 2 * h + other, (got >> (2 * n + h)) & 1u);
  }
  return k;
}

// P -> P * keep / (1 - p) (scale = 1 / (1 - p), or 1 when the caller rescales the output later).
template <int MT, int NT>
FA2_DEVICE void apply_keep(float (&s)[MT][NT][4], const KeepBits<MT, NT>& k, float scale) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[mi][ni][e] = k.get(mi, ni, e) ? s[mi][ni][e] * scale : 0.f;
}

}  // namespace flash_attn2::cuda
