// The one definition of the attention variants, shared by every kernel (CPU and CUDA, forward and backward):
//   - Visibility: which keys a query sees (causal, sliding window, sequence bounds) and, from that, which
//     tiles a kernel may skip;
//   - ScoreRule: how a visible raw score becomes the softmax logit (softcap, ALiBi) and the derivative the
//     backward needs;
//   - Dropout: the Philox keep mask, a pure function of (seed, offset, batch, head, query, key), bitwise the
//     same on every device.
// Semantics (FlashAttention-2's), with diag = Nk - Nq (bottom-right alignment):
//   key j is visible to query i  iff  i + diag - left <= j <= i + diag + right   (left/right < 0: unbounded)
//   logit(i, j) = cap(scale * q_i . k_j) - slope_h * |i + diag - j|,  cap(x) = softcap * tanh(x / softcap)
//   dropout multiplies P by keep / (1 - p) after the softmax; the LSE does not see it.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FA2_HD __host__ __device__ __forceinline__
#else
#define FA2_HD inline
#endif

namespace flash_attn2 {

namespace rule_detail {
template <typename I>
FA2_HD I imin(I a, I b) { return a < b ? a : b; }
template <typename I>
FA2_HD I imax(I a, I b) { return a > b ? a : b; }
}  // namespace rule_detail

// Which keys query i sees: [key_begin(i), key_end(i)) intersected with [0, seqlen_k). I is int (CUDA) or
// int64_t (CPU); left / right < 0 mean unbounded on that side (the launcher turns windows wider than the
// sequences into -1 so that the sums below stay in range).
template <typename I>
struct Visibility {
  I seqlen_q, seqlen_k, left, right;

  FA2_HD I diag() const { return seqlen_k - seqlen_q; }
  // First visible key of query i (may be >= key_end: nothing visible).
  FA2_HD I key_begin(I i) const { return left < 0 ? I(0) : rule_detail::imax<I>(I(0), i + diag() - left); }
  // One past the last visible key of query i (may be <= key_begin).
  FA2_HD I key_end(I i) const {
    return right < 0 ? seqlen_k : rule_detail::imax<I>(I(0), rule_detail::imin<I>(seqlen_k, i + diag() + right + 1));
  }
  // First query that sees key j, and one past the last (clamped to [0, seqlen_q]).
  FA2_HD I query_begin(I j) const {
    return right < 0 ? I(0) : rule_detail::imin<I>(seqlen_q, rule_detail::imax<I>(I(0), j - diag() - right));
  }
  FA2_HD I query_end(I j) const {
    return left < 0 ? seqlen_q : rule_detail::imax<I>(I(0), rule_detail::imin<I>(seqlen_q, j - diag() + left + 1));
  }
  // The backward's tiles (key tiles of block_n keys, query tiles of block_m queries): key tile n visits the query
  // tiles [query_begin(k0) / block_m, ceil(query_end(k_last) / block_m)) (none where query_end <= query_begin),
  // so query tile m is visited by the key tiles [first_key_tile(m), last_key_tile(m)], one contiguous range
  // (cpp_tests/test_attention_rule.cpp checks both ends against that walk); last < first: no visitor.
  FA2_HD I first_key_tile(I q0, I block_n) const { return key_begin(q0) / block_n; }
  FA2_HD I last_key_tile(I q0, I qn, I block_n) const {
    const I end = key_end(rule_detail::imin<I>(q0 + qn, seqlen_q) - 1);
    return end > 0 ? (end - 1) / block_n : I(-1);
  }
  // Keys [k0, k0 + kn) for queries [q0, q0 + qn): does any pair need masking (some pair invisible)?
  FA2_HD bool tile_needs_mask(I q0, I qn, I k0, I kn) const {
    const I last_q = q0 + qn - 1, last_k = k0 + kn - 1;
    if (last_k >= seqlen_k) return true;
    if (right >= 0 && last_k > q0 + diag() + right) return true;  // the first row's right bound
    if (left >= 0 && k0 < last_q + diag() - left) return true;    // the last row's left bound
    return false;
  }
};

// The deterministic backward's walk where every key tile of a sequence visits every query tile (no causal mask,
// no window) and the launcher chose to rotate it (BwdParams::dq_rotate): key tile n of the K starts at query
// tile start(n) = floor(n M / K) of the M and wraps around, and query tile m takes its K visitors' dQ adds in the
// order they arrive: first the key tiles that start at or before m, the latest start first, then the others,
// again the latest start first. Without the rotation every key tile walks the query tiles from 0 and the turns
// run from the last key tile down, so key tile n reaches each query tile with key tile n + 1 and waits for its
// adds: the hand-offs add up along the chain (perf.md v21: 0.71-0.80 of the default backward at 2k). Rotated,
// under equal step times no key tile waits on one that arrives after it (where M < K, those sharing a start
// still chain). But its waits are not all on lower block indices: the launcher rotates only where a head's K
// blocks fit on the GPU several times over, so that they are co-resident (cpp_tests/test_attention_rule.cpp
// simulates both). All in int64 on the host, int on the device: K, M < 2^24.
template <typename I>
struct RotatedDqWalk {
  I num_n, num_m;  // K key tiles, M query tiles of the sequence
  FA2_HD I start(I n) const { return static_cast<I>(static_cast<long long>(n) * num_m / num_n); }
  // Query tile of key tile n's step s (0 <= s < M), and the step at which key tile n reaches query tile m.
  FA2_HD I tile_at(I n, I s) const {
    const I m = start(n) + s;
    return m >= num_m ? m - num_m : m;
  }
  FA2_HD I arrival(I n, I m) const {
    const I s = m - start(n);
    return s < 0 ? s + num_m : s;
  }
  // Key tile n's turn at query tile m, 0-based: (last(m) - n) mod K, last(m) the last key tile starting at or
  // before m, i.e. n <= last(m) iff n M / K < m + 1.
  FA2_HD I rank(I n, I m) const {
    const long long last = (static_cast<long long>(m + 1) * num_n + num_m - 1) / num_m - 1;
    const I l = static_cast<I>(last < num_n - 1 ? last : num_n - 1);
    const I r = l - n;
    return r < 0 ? r + num_n : r;
  }
};

// Whether the deterministic backward rotates its walk (RotatedDqWalk): no mask, at least two key tiles, and a
// head's key tiles (one block each) at most a quarter of the SMs, so they run together even beside other work
// (a collective's kernels, say) that holds up to half the GPU.
FA2_HD bool dq_walk_rotates(bool unmasked, long long num_n, long long num_m, long long sms) {
  return unmasked && num_n >= 2 && num_m >= 2 && 4 * num_n <= sms;
}

// The score transform, in "score units": a kernel that keeps raw scores q.k (and applies the softmax scale
// later) uses unit = scale; one that works on scaled scores uses unit = 1. Then
//   transform(x) = cap_out * tanh(cap_in * x) - alibi * |i + diag - j|   (each term only when enabled)
// is the logit divided by unit, and dlogit / d(scale q.k) = 1 - tanh^2 (1 without softcap).
template <typename F>
struct ScoreRule {
  F cap_in = 0, cap_out = 0;  // unit / softcap and softcap / unit; cap_in == 0: no softcap
  F alibi = 0;                // slope / unit for this head (0: no ALiBi)

  FA2_HD static ScoreRule make(double unit, double softcap, double slope) {
    ScoreRule r;
    if (softcap > 0) {
      r.cap_in = static_cast<F>(unit / softcap);
      r.cap_out = static_cast<F>(softcap / unit);
    }
    r.alibi = static_cast<F>(slope / unit);
    return r;
  }
  FA2_HD bool has_softcap() const { return cap_in != F(0); }
};

// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"), the generator of cuRAND and
// PyTorch's CUDA generator.
struct Philox4 {
  uint32_t x[4];
};
FA2_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}
FA2_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, c0, hi0, lo0);
    mulhilo32(kM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The dropout keep mask. One Philox call yields eight 16-bit draws for the 2 x 4 group of (query, key) pairs
//   queries {i0, i0 + 8} x keys {j0, j0 + 1, j0 + 8, j0 + 9},  i0 = 16 a + (0..7),  j0 = 16 b + 2 (0..3),
// which is exactly what one thread of an mma.sync / wgmma accumulator holds of two adjacent n8 tiles, so the
// kernels draw each number once (the transposed Hopper backward uses half of each call).
// Element (i, j) is kept iff its draw >= threshold, threshold = round(p * 65536) (keep probability 1 - p to
// within 2^-17); the kept values are scaled by 1 / (1 - p).
struct Dropout {
  uint32_t seed_lo = 0, seed_hi = 0, offset_lo = 0, offset_hi = 0;
  uint32_t threshold = 0;  // 0: dropout off

  static Dropout make(uint64_t seed, uint64_t offset, double p) {
    Dropout d;
    d.seed_lo = static_cast<uint32_t>(seed);
    d.seed_hi = static_cast<uint32_t>(seed >> 32);
    d.offset_lo = static_cast<uint32_t>(offset);
    d.offset_hi = static_cast<uint32_t>(offset >> 32);
    double t = p * 65536.0 + 0.5;
    d.threshold = p <= 0 ? 0u : t >= 65535.0 ? 65535u : static_cast<uint32_t>(t);
    if (p > 0 && d.threshold == 0) d.threshold = 1;  // any p > 0 drops something
    return d;
  }
  FA2_HD bool enabled() const { return threshold != 0; }
  // The group counter of (i, j) and the draw's index in the call's eight.
  FA2_HD static uint32_t group_i(uint32_t i) { return ((i >> 4) << 3) | (i & 7u); }
  FA2_HD static uint32_t group_j(uint32_t j) { return ((j >> 4) << 2) | ((j >> 1) & 3u); }
  FA2_HD static uint32_t slot(uint32_t i, uint32_t j) { return (((i >> 3) & 1u) << 2) | (((j >> 3) & 1u) << 1) | (j & 1u); }
  // The eight draws of group (gi, gj) of head bh = b * H + h.
  FA2_HD Philox4 draws(uint32_t bh, uint32_t gi, uint32_t gj) const {
    return philox4x32_10(gj, gi, bh, offset_lo, seed_lo, seed_hi ^ offset_hi);
  }
  FA2_HD static uint32_t draw16(const Philox4& r, uint32_t slot) { return (r.x[slot >> 1] >> ((slot & 1u) * 16)) & 0xFFFFu; }
  FA2_HD bool keep_draw(const Philox4& r, uint32_t slot) const { return draw16(r, slot) >= threshold; }
  // Single-element form (CPU kernel, dropout_keep_mask): i, j local to the sequence.
  FA2_HD bool keep(uint32_t bh, uint32_t i, uint32_t j) const {
    return keep_draw(draws(bh, group_i(i), group_j(j)), slot(i, j));
  }
};

// Block index -> (tile rank, head) for grids of `tiles` tiles per head over `heads` heads (batch * heads).
// group <= 1: head by head, a head's tiles neighbours (its tile ranks in order). group > 1: heads in groups of
// `group`, and within a group tile rank by tile rank, every head of the group taking rank r before any takes
// r + 1 (the last group may be smaller). Blocks are dispatched in index order as SMs free up, so head by head a
// late head's long tiles (rank 0: causal's most expensive) start near the end of the grid and run alone; in
// groups, each group's long tiles go first while the tiles running together still share a few heads' K/V
// (forward) or Q/dO (backward) in L2 (cpp_tests/test_attention_rule.cpp checks the map is one to one). A
// list-scheduling model of 132 SMs puts the head-by-head tail at 3-7% of a causal 2k-8k call and 12-14% of the
// GQA backward rows, grouped by 8 at 0-3% (scripts/grid_order_model.py). Measured: the WS backward's causal
// 2k / 4k rows 1.03x grouped by 8 (v26), its causal 8k rows 1.03-1.05x grouped by 4 (v38; ws_bwd_grid_group); the
// WS forward's causal rows up to 8192 1.02-1.07x grouped by 8 (v37; try_launch_fwd_ws); 16k rows level or
// slower in groups.
template <typename I>
struct GridOrder {
  I rank, head;
  FA2_HD GridOrder(I bid, I tiles, I heads, I group) {
    // One formula for both: groups of one head are the head-by-head order.
    const I gsize = group > 1 ? group : 1;
    const I per_group = gsize * tiles;
    const I g = bid / per_group, base = g * gsize;
    const I in_group = heads - base < gsize ? heads - base : gsize;  // >= 1 for any bid < tiles * heads
    const I r = bid - g * per_group;
    rank = r / in_group;
    head = base + (r - rank * in_group);
  }
  // The bid of a given (rank, head): the inverse of the constructor.
  static FA2_HD I index(I rank, I head, I tiles, I heads, I group) {
    const I gsize = group > 1 ? group : 1;
    const I base = head / gsize * gsize;
    const I in_group = heads - base < gsize ? heads - base : gsize;
    return base * tiles + rank * in_group + (head - base);
  }
};

}  // namespace flash_attn2
