// Split-KV forward ("flash decoding"): the kernel for few queries over many keys (decoding, speculative decoding,
// chunked prefill against a KV cache, and `fwd` with Nq <= 16). Memory bound, so it is shaped for bandwidth:
//
//   - GQA packed: a block works on one kv head and 16 or 64 rows of (query, q head of the group) pairs, so every
//     K/V byte is read once per group instead of once per query head;
//   - up to 16 packed rows (decoding: Nq x group <= 16), the four warps split each key tile (warp w takes keys
//     [w kWarpN, (w + 1) kWarpN)) of one m16 row tile, each keeps its own online softmax, and the block merges
//     the four with the log-sum-exp rule at the end; beyond 16 (speculative decoding, chunked prefill) the four
//     warps split 64 rows instead (16 each, every key of the tile), so K/V is read once per 64 rows, not once per
//     16, and each warp writes its own rows;
//   - keys are split over blocks (num_splits): each split writes a float32 partial O and LSE, and
//     splitkv_combine_kernel (splitkv_combine.cuh) merges them; with one split the block writes O and LSE itself;
//   - K/V tiles stream through a kStages-deep cp.async ring; rows come from a dense cache or through a block
//     table (paged cache: (pages, page_size, Hkv, d)), per row, so any power-of-two page size works (the
//     staggered loop: per run of 16 rows a thread, pages of 16 or more);
//   - the attention rule (visibility, softcap, ALiBi) is the same as every other kernel's (attention_rule.h),
//     applied per row since the rows of a packed tile belong to different queries and heads. No dropout: the
//     launcher keeps dropout calls on the main forward kernels.
//
//   (splits of 8 key tiles or more, dense caches: prefetch the first two into L2 before the PDL wait)
//   load Q (16 or 64 packed rows), K/V tiles t0 .. t0 + kStages - 2
//   for each key tile t of this split:
//     wait tile t; sync; issue tile t + kStages - 1
//     S_w = Q_w K_w^T (16 x kWarpN); score rule; mask (tiles crossing a window edge or the sequence end)
//     online softmax (per warp); O_w += P_w V_w
//   16 rows: merge the warps' (max, sum, O) through shared memory; 64 rows: each warp has whole rows;
//   store O / LSE (one split) or the float32 partials.
#pragma once

#include <cmath>

#include "cuda/block_info.cuh"
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/softmax.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/warp_mma.cuh"

namespace flash_attn2::cuda {

template <typename T, int kHeadDim_, bool kSplitKeys_ = true, bool kStagger_ = false>
struct SplitKvTraits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  // true: one m16 row tile whose key tiles the warps split; false: kSplitKvBlockMWide rows, 16 per warp, each
  // warp every key of a tile.
  static constexpr bool kSplitKeys = kSplitKeys_;
  // K and V staggered (FwdParams::splitkv_stagger, where splitkv_stagger_fits): 128-key tiles (cuDNN's decode
  // shape: half the loop trips and softmax updates a key, 32 KB contiguous reads), K_t and V_t each in its own
  // slot of a 3-slot ring, so that 64 KB stay in flight while one slot is read and two blocks still fit an SM.
  static constexpr bool kStagger = kStagger_;
  static_assert(!kStagger || (kSplitKeys && kHeadDim_ == 128), "staggered K / V: d128, 16-row tiles");
  static constexpr int kNWarps = 4;
  static constexpr int kBlockM = kSplitKeys ? kSplitKvBlockM : kSplitKvBlockMWide;  // packed (query, head) rows
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockN = kStagger ? kSplitKvStaggerBlockN : splitkv_block_n(kHeadDim);  // keys per tile
  static constexpr int kWarpN = kSplitKeys ? kBlockN / kNWarps : kBlockN;  // keys per warp per tile
  static constexpr int kNT_S = kWarpN / 8;
  static constexpr int kNT_O = kHeadDim / 8;
  static constexpr int kKS_QK = kHeadDim / 16;
  static constexpr int kKS_PV = kWarpN / 16;
  // The score GEMM's k steps over this many accumulators (gemm_ss_chains): chains of at most four mmas.
  static constexpr int kQkChains = kSplitKeys ? (kKS_QK + 3) / 4 : 1;
  using TileQ = SwizzledTile<kBlockM, kHeadDim>;
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  // kStagger: the ring's 3 slots of one K or V tile each (kStages counts slots there).
  static constexpr int kStages = kStagger ? 3 : 3 * 2 * kSmemKV <= 100 * 1024 ? 3 : 2;
  static constexpr int kSmemStages = kStagger ? kStages * kSmemKV : kStages * 2 * kSmemKV;
  // Split keys: the warps' partial O rows (float32, padded rows) reuse the K/V stages once the loop is done.
  static constexpr int kORowStride = kHeadDim + 8;
  static constexpr int kSmemMerge = kSplitKeys ? kNWarps * kBlockM * kORowStride * 4 : 0;
  static constexpr int kSmemStats = kSplitKeys ? 2 * kNWarps * kBlockM * 4 : 0;  // per warp and row: max, sum
  // Paged caches: the page of every staged row (the staggered loop keeps its run's page in a register).
  static constexpr int kSmemPages = kStagger ? 0 : kStages * kBlockN * 4;
  static constexpr int kSmemBytes =
      kSmemQ + (kSmemStages > kSmemMerge ? kSmemStages : kSmemMerge) + kSmemStats + kSmemPages;
  static_assert(kBlockM == 16 * (kSplitKeys ? 1 : kNWarps) && kWarpN % 16 == 0 && kHeadDim % 16 == 0);
};

// Where the rows of key tiles live, for K and V (element offsets). Dense caches: (batch, kv head, key) with
// the strides. Paged caches: the page of every row of a tile is read from block_table two tiles ahead into a
// register (read_page) and stored into shared memory a loop iteration later (store_page), so neither the
// cp.async issue of a tile nor the warp's math waits for the table load. Stored at once, as fetch_pages does in
// the prologue, its latency fell inside every tile's step: pages of 16 read the cache at 0.83 of a dense one,
// and did so whether or not a sequence's pages lay in order (the same addresses as pages of 256, at 0.94);
// now every page size reads at 0.90-0.94 (perf.md v16).
template <int kBlockN, int kStages>
struct KvRows {
  const FwdParams& p;
  int batch, head_kv, k_start, seqlen_k;
  int* s_pages;  // [kStages][kBlockN] page per row, one slot per pipeline stage (paged only)
  // Element offsets that do not change from row to row, computed once: dense, the (batch, kv head)'s key 0 of
  // this sequence; paged, the kv head within a page.
  index_t k_base, v_base;

  FA2_DEVICE KvRows(const FwdParams& p_, int batch_, int head_kv_, int k_start_, int seqlen_k_, int* s_pages_)
      : p(p_), batch(batch_), head_kv(head_kv_), k_start(k_start_), seqlen_k(seqlen_k_), s_pages(s_pages_) {
    k_base = static_cast<index_t>(head_kv) * p.k_head_stride;
    v_base = static_cast<index_t>(head_kv) * p.v_head_stride;
    if (!paged()) {
      k_base += static_cast<index_t>(batch) * p.k_batch_stride + static_cast<index_t>(k_start) * p.k_row_stride;
      v_base += static_cast<index_t>(batch) * p.v_batch_stride + static_cast<index_t>(k_start) * p.v_row_stride;
    }
  }
  FA2_DEVICE bool paged() const { return p.block_table != nullptr; }
  // The page of row tid of `tile` (threads tid < kBlockN, one row each; 0 past the sequence, whose entries are
  // never read), as a load whose result the caller stores later.
  FA2_DEVICE int read_page(int tile, int tid) const {
    const int key = tile * kBlockN + tid;
    if (!paged() || tid >= kBlockN || key >= seqlen_k) return 0;
    return p.block_table[static_cast<index_t>(batch) * p.block_table_batch_stride + (key >> p.page_size_log2)];
  }
  // A page from read_page into slot `stage`, clamped into the cache; visible after a barrier.
  FA2_DEVICE void store_page(int page, int stage, int tid) const {
    if (!paged() || tid >= kBlockN) return;
    s_pages[stage * kBlockN + tid] = min(max(page, 0), p.num_pages - 1);
  }
  FA2_DEVICE void fetch_pages(int tile, int stage, int tid) const { store_page(read_page(tile, tid), stage, tid); }
  // Row r of the tile staged in `stage`, key `key`.
  FA2_DEVICE void offsets(int key, int stage, int r, index_t& k_off, index_t& v_off) const {
    if (!paged()) {
      k_off = k_base + static_cast<index_t>(key) * p.k_row_stride;
      v_off = v_base + static_cast<index_t>(key) * p.v_row_stride;
      return;
    }
    // k/v_batch_stride is the page stride
    const int page = s_pages[stage * kBlockN + r], in_page = key & ((1 << p.page_size_log2) - 1);
    k_off = k_base + static_cast<index_t>(page) * p.k_batch_stride + static_cast<index_t>(in_page) * p.k_row_stride;
    v_off = v_base + static_cast<index_t>(page) * p.v_batch_stride + static_cast<index_t>(in_page) * p.v_row_stride;
  }
};

// Keys of a KV-cache sequence whose cache_seqlens entry is `cached`: the valid prefix plus the rows appended by
// this call, within the capacity p.seqlen_k.
FA2_DEVICE int cache_keys(const FwdParams& p, int cached) {
  return min(min(max(cached, 0), p.seqlen_k) + p.seqlen_k_new, p.seqlen_k);
}

// Key tiles [t_begin, t_end) of split `split` for the packed rows of queries [q_first, q_last]: the visible tiles
// in num_splits even runs.
template <int kBlockN>
FA2_DEVICE void split_tiles(const Visibility<int>& vis, int q_first, int q_last, int split, int num_splits,
                            int& t_begin, int& t_end) {
  const int key_begin = vis.key_begin(q_first), key_end = vis.key_end(q_last);
  const int n_begin = key_begin / kBlockN, n_end = key_end > key_begin ? ceil_div(key_end, kBlockN) : n_begin;
  const int per_split = ceil_div(n_end - n_begin, num_splits);
  t_begin = min(n_end, n_begin + split * per_split);
  t_end = min(n_end, t_begin + per_split);
}

// Before the PDL wait, where nothing the previous kernel writes may be read yet: the first
// p.splitkv_prefetch_tiles key tiles of this block's split of a dense cache into L2, where the split has
// kSplitKvPrefetchMinTiles tiles or more. The stream from DRAM then starts under the previous kernel's tail (the
// previous step's combine lets the next kernel launch from its start), and long splits gain even without one
// (a plain kernel before: B = 1, 32k 1.04x); splits of 4 tiles (B = 1, Hkv = 8, 8k) lost 3-8% with it (perf.md
// v36). A hint only, so the sequence length it uses may be stale: cache_seqlens is read past L1 (ld.cg: no line of
// it is left in L1 for the read after the wait) and every address stays inside the cache's capacity. Varlen
// batches and paged caches take no prefetch (their offsets come from tables the previous kernel may write).
constexpr int kSplitKvPrefetchMinTiles = 8;
template <class Kt>
FA2_DEVICE void prefetch_split_l2(const FwdParams& p, int batch, int head_kv, int q_first, int q_last, int split,
                                  int tid) {
  if (p.block_table != nullptr || p.cu_seqlens_q != nullptr) return;
  constexpr int kBlockN = Kt::kBlockN;
  const int seqlen_k = p.cache_seqlens != nullptr ? cache_keys(p, __ldcg(p.cache_seqlens + batch)) : p.seqlen_k;
  const Visibility<int> vis{p.seqlen_q, seqlen_k, p.window_left, p.window_right};
  int t_begin, t_end;
  split_tiles<kBlockN>(vis, q_first, q_last, split, p.num_splits, t_begin, t_end);
  if (t_end - t_begin < kSplitKvPrefetchMinTiles) return;
  const int key0 = t_begin * kBlockN;
  const int keys = min(min(t_end, t_begin + p.splitkv_prefetch_tiles) * kBlockN, seqlen_k) - key0;
  const char* k = static_cast<const char*>(p.k) +
                  2 * (static_cast<index_t>(batch) * p.k_batch_stride + static_cast<index_t>(head_kv) * p.k_head_stride);
  const char* v = static_cast<const char*>(p.v) +
                  2 * (static_cast<index_t>(batch) * p.v_batch_stride + static_cast<index_t>(head_kv) * p.v_head_stride);
  const int lines = (p.head_dim * 2 + 127) / 128;  // 128-byte lines of a row
  for (int i = tid; i < keys * lines; i += Kt::kNThreads) {
    const int key = key0 + i / lines, line = i % lines;
    prefetch_l2(k + 2 * static_cast<index_t>(key) * p.k_row_stride + 128 * line);
    prefetch_l2(v + 2 * static_cast<index_t>(key) * p.v_row_stride + 128 * line);
  }
}

template <class Kt>
__global__ void __launch_bounds__(Kt::kNThreads) flash_splitkv_kernel(const __grid_constant__ FwdParams p) {
  using T = typename Kt::Elem;
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kWarpN = Kt::kWarpN, kStages = Kt::kStages;
  constexpr int kCPR = Kt::kHeadDim / 8;  // 16-byte chunks per row

  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sQ_u = smem_u32(smem);
  const uint32_t sKV_u = sQ_u + Kt::kSmemQ;
  float* s_merge = reinterpret_cast<float*>(smem + Kt::kSmemQ);
  int* s_pages = reinterpret_cast<int*>(smem + Kt::kSmemBytes - Kt::kSmemPages);
  float* s_max = reinterpret_cast<float*>(smem + Kt::kSmemBytes - Kt::kSmemPages - Kt::kSmemStats);
  float* s_sum = s_max + Kt::kNWarps * kBlockM;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;

  FA2_TIMELINE(p, 0, timeline_ns());
  FA2_TIMELINE(p, 1, clock64());
  // Block -> (batch, kv head, packed row tile, split); splits vary fastest. Arithmetic on the parameters only,
  // so it runs before the PDL wait.
  const int group = p.heads_q / p.heads_kv;
  const int packed_rows = p.seqlen_q * group;
  const int num_m = ceil_div(packed_rows, kBlockM);
  int bid = static_cast<int>(blockIdx.x);
  const int split = bid % p.num_splits;
  bid /= p.num_splits;
  const int m_block = bid % num_m;
  bid /= num_m;
  const int head_kv = bid % p.heads_kv, batch = bid / p.heads_kv;
  const int row0 = m_block * kBlockM, rows = min(kBlockM, packed_rows - row0);
  // Packed row r is query r / group of q head head_kv * group + r % group.
  const int q_first = row0 / group, q_last = (row0 + rows - 1) / group;
  if (p.splitkv_prefetch_tiles > 0) prefetch_split_l2<Kt>(p, batch, head_kv, q_first, q_last, split, tid);
  // Launched with programmatic dependence (detail::launch_dependent): the previous kernel of the stream (an
  // append into the cache, the previous layer) may still run; wait before reading anything it may write. With
  // pdl_trigger bit 1 the combine may launch from here (it waits for this grid's end before it reads); off by
  // default: its blocks waiting beside these cost B = 1 rows 2-6% (perf.md v36).
  wait_for_previous_grid();
  if (p.pdl_trigger & 1) allow_next_grid();
  FA2_TIMELINE(p, 2, clock64());

  SeqInfo seq(p, batch);
  if (p.cache_seqlens != nullptr)  // KV cache: the valid prefix plus the rows appended by this call, within capacity
    seq.seqlen_k = cache_keys(p, p.cache_seqlens[batch]);
  const int d = p.head_dim;
  const int seqlen_k = seq.seqlen_k;
  const Visibility<int> vis = seq.visibility(p);
  int t_begin, t_end;
  split_tiles<kBlockN>(vis, q_first, q_last, split, p.num_splits, t_begin, t_end);

  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const KvRows<kBlockN, kStages> kv(p, batch, head_kv, seq.k_start, seqlen_k, s_pages);

  // The warp's 16 rows of the tile (all warps share them where they split the keys), and the thread's two rows
  // among them (g and g + 8): query, head, ALiBi slope.
  const int warp_row0 = Kt::kSplitKeys ? 0 : warp * 16;
  int row_q[2], row_h[2];
  float row_slope[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int pr = row0 + warp_row0 + g + 8 * h;
    row_q[h] = pr / group;
    row_h[h] = head_kv * group + pr % group;
    row_slope[h] = p.alibi_slopes != nullptr && warp_row0 + g + 8 * h < rows
                       ? p.alibi_slopes[static_cast<index_t>(batch) * p.alibi_batch_stride + row_h[h]] * p.inv_scale
                       : 0.f;
  }

  // Q: the tile's packed rows, each from its own (query, head).
  for (int idx = tid; idx < kBlockM * kCPR; idx += Kt::kNThreads) {
    const int r = idx / kCPR, ch = idx % kCPR;
    const int pr = row0 + r;
    const bool pred = r < rows && ch * 8 < d;
    const T* src = q + row_offset(batch, head_kv * group + pr % group, seq.q_start + pr / group, p.q_batch_stride,
                                  p.q_head_stride, p.q_row_stride) + ch * 8;
    cp_async_16(sQ_u + 2u * static_cast<uint32_t>(TileQ::chunk_offset(r, ch)), pred ? src : q, pred);
  }
  auto stage_k = [&](int s) { return sKV_u + static_cast<uint32_t>(s * 2 * Kt::kSmemKV); };
  // Where each K/V byte is read by one block (one packed row tile), evict it from L2 first, so that the stream
  // leaves the partials there for the combine; row tiles that share K/V leave it unchanged. Measured level with
  // loads without a hint (perf.md v20); an explicit evict-normal was up to 19% slower.
  const uint64_t stream_policy = l2_policy(num_m == 1 && p.splitkv_evict_first != 0);
  auto load_tile = [&](int tile) {
    const int stage = (tile - t_begin) % kStages;
    const uint32_t sK = stage_k(stage), sV = sK + Kt::kSmemKV;
    const int key0 = tile * kBlockN;
    if constexpr (Kt::kNThreads % kCPR == 0) {
      // A thread's chunk is the same in every row it copies (rows r0, r0 + kRowsPerPass, ...). Dense caches and
      // pages of at least a tile: one 64-bit row offset per tile, then a constant step per row, instead of each
      // row's offset from its index (the load issue was a quarter of this loop's instructions, and the loop waits
      // on its own instruction latency, not on memory: perf.md v22). Smaller pages: each row's page from shared
      // memory, the rest as constants.
      constexpr int kRowsPerPass = Kt::kNThreads / kCPR;
      constexpr int kBlockNLog2 = kBlockN == 128 ? 7 : 6;
      static_assert(kBlockN == (1 << kBlockNLog2));
      const int r0 = tid / kCPR, ch = tid % kCPR;
      const bool col_ok = ch * 8 < d;
      const uint32_t off0 = 2u * static_cast<uint32_t>(TileKV::chunk_offset(r0, ch));
      // kRowsPerPass is a multiple of 8 here or the swizzle of row r differs from row r0's
      auto smem_off = [&](int i) {
        return kRowsPerPass % 8 == 0 ? off0 + 2u * static_cast<uint32_t>(i * kRowsPerPass * TileKV::kBK)
                                     : 2u * static_cast<uint32_t>(TileKV::chunk_offset(r0 + i * kRowsPerPass, ch));
      };
      if (!kv.paged() || p.page_size_log2 >= kBlockNLog2) {
        const T* kp = k + kv.k_base + ch * 8;
        const T* vp = v + kv.v_base + ch * 8;
        if (!kv.paged()) {
          kp += static_cast<index_t>(key0 + r0) * p.k_row_stride;
          vp += static_cast<index_t>(key0 + r0) * p.v_row_stride;
        } else {  // the whole tile in one page: row r0's entry (past the sequence it is 0, but so are its rows)
          const index_t page = kv.s_pages[stage * kBlockN + r0];
          const index_t row = (key0 & ((1 << p.page_size_log2) - 1)) + r0;
          kp += page * p.k_batch_stride + row * p.k_row_stride;
          vp += page * p.v_batch_stride + row * p.v_row_stride;
        }
        const index_t k_step = static_cast<index_t>(kRowsPerPass) * p.k_row_stride;
        const index_t v_step = static_cast<index_t>(kRowsPerPass) * p.v_row_stride;
#pragma unroll
        for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
          const bool pred = col_ok && key0 + r0 + i * kRowsPerPass < seqlen_k;
          cp_async_16_policy(sK + smem_off(i), pred ? kp : k, pred, stream_policy);
          cp_async_16_policy(sV + smem_off(i), pred ? vp : v, pred, stream_policy);
          kp += k_step, vp += v_step;
        }
      } else {
#pragma unroll
        for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
          const int r = r0 + i * kRowsPerPass;
          const bool pred = col_ok && key0 + r < seqlen_k;
          index_t k_off = 0, v_off = 0;
          if (pred) kv.offsets(key0 + r, stage, r, k_off, v_off);
          cp_async_16_policy(sK + smem_off(i), k + k_off + ch * 8, pred, stream_policy);
          cp_async_16_policy(sV + smem_off(i), v + v_off + ch * 8, pred, stream_policy);
        }
      }
    } else {
      for (int idx = tid; idx < kBlockN * kCPR; idx += Kt::kNThreads) {
        const int r = idx / kCPR, ch = idx % kCPR;
        const bool pred = key0 + r < seqlen_k && ch * 8 < d;
        index_t k_off = 0, v_off = 0;
        if (pred) kv.offsets(key0 + r, stage, r, k_off, v_off);
        const uint32_t off = 2u * static_cast<uint32_t>(TileKV::chunk_offset(r, ch));
        cp_async_16_policy(sK + off, k + k_off + ch * 8, pred, stream_policy);
        cp_async_16_policy(sV + off, v + v_off + ch * 8, pred, stream_policy);
      }
    }
  };
  float acc_o[1][Kt::kNT_O][4];
  zero_acc(acc_o);
  OnlineSoftmax<1> softmax;
  const ScoreRule<float> rule{p.softcap_in, p.softcap_out, 0.f};
  const int diag = vis.diag();
  // S = Q K^T for this warp's keys of a tile, then the score rule, the mask, the online softmax and P.
  auto score_step = [&](uint32_t sK, int tile, uint32_t (&frag_p)[1][Kt::kKS_PV][4]) {
    const int warp_key0 = Kt::kSplitKeys ? warp * kWarpN : 0;  // this warp's first key within the tile
    float acc_s[1][Kt::kNT_S][4];
    zero_acc(acc_s);
    // Four-deep (or shallower) mma chains: at d128 one chain per n8 tile would be eight mmas deep (perf.md v22).
    gemm_ss_chains<T, 1, Kt::kNT_S, Kt::kKS_QK, Kt::kQkChains, Operand<TileQ, false>, Operand<TileKV, false>>(
        acc_s, sQ_u, warp_row0, sK + 2u * static_cast<uint32_t>(warp_key0 * TileKV::kBK), 0, lane);
    const int key_w = tile * kBlockN + warp_key0;  // this warp's first key
    if (rule.has_softcap() || p.alibi_slopes != nullptr) {
#pragma unroll
      for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float& x = acc_s[0][ni][e];
          const int h = e / 2, j = key_w + 8 * ni + 2 * t + (e % 2);
          if (rule.has_softcap()) x = rule.cap_out * fast_tanh(x * rule.cap_in);
          x -= row_slope[h] * fabsf(static_cast<float>(row_q[h] + diag - j));
        }
    }
    if (vis.tile_needs_mask(q_first, q_last - q_first + 1, key_w, kWarpN)) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int lo = vis.key_begin(row_q[h]), hi = vis.key_end(row_q[h]);
#pragma unroll
        for (int ni = 0; ni < Kt::kNT_S; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = key_w + 8 * ni + 2 * t + e;
            if (j < lo || j >= hi) acc_s[0][ni][2 * h + e] = -INFINITY;
          }
      }
    }
    // A lazy running max (2^8 of slack in P): most tiles then leave O alone, where an eager max rescaled its 64
    // accumulators every tile (a tenth of this loop's instructions, which wait on their own latency: perf.md v22).
    float alpha[1][2];
    softmax.update_scores<8>(acc_s, p.scale_log2, alpha);
    OnlineSoftmax<1>::rescale_if_needed(acc_o, alpha);
    acc_to_a_frags<T>(frag_p, acc_s);
  };
  auto pv_step = [&](uint32_t sV, const uint32_t (&frag_p)[1][Kt::kKS_PV][4]) {
    const int warp_key0 = Kt::kSplitKeys ? warp * kWarpN : 0;
    gemm_rs<T, 1, Kt::kNT_O, Kt::kKS_PV, Operand<TileKV, true>>(
        acc_o, frag_p, sV + 2u * static_cast<uint32_t>(warp_key0 * TileKV::kBK), 0, lane);
  };

  if constexpr (Kt::kStagger) {
    // Half-steps h = 0, 1, .. read K_t (h = 2 t) and V_t (h = 2 t + 1) of the split's tiles from slot h % 3;
    // at each, after the barrier (everyone is done with slot (h + 2) % 3, read at h - 1), half h + 2 is issued,
    // so halves h + 1 and h + 2 are in flight while h is read.
    //
    // A thread copies one 16-byte chunk (ch) of kSplitKvStaggerRunRows consecutive rows of each K or V tile, its
    // run [run0, run0 + 16): a warp's copy i is rows run0 + i of two runs (two whole 256-byte rows), the block's
    // 16 copies the whole 32 KB tile. A run lies in one page wherever pages hold 16 keys or more
    // (splitkv_stagger_fits), so on a paged cache each thread reads one block_table entry a tile (an iteration
    // before its loads, into a register) and then copies through the dense loop's stepped pointer: vLLM's pages
    // of 16 take the same loop as a dense cache, with no page slots in shared memory.
    constexpr int kRunRows = kSplitKvStaggerRunRows;
    static_assert(kBlockN * kCPR == Kt::kNThreads * kRunRows && kRunRows % 8 == 0,
                  "a thread's run: one chunk of kRunRows rows, starting on a multiple of the swizzle's 8 rows");
    const int run0 = (tid / kCPR) * kRunRows, ch = tid % kCPR;
    const bool col_ok = ch * 8 < d;
    const int halves = 2 * (t_end - t_begin);
    auto slot = [&](int h) { return sKV_u + static_cast<uint32_t>((h % 3) * Kt::kSmemKV); };
    // This thread's run's page in `tile` (0: a dense cache, or a run past the sequence: its rows are not read).
    auto run_page = [&](int tile) -> index_t {
      const int key = tile * kBlockN + run0;
      if (!kv.paged() || key >= seqlen_k) return 0;
      const int page = p.block_table[static_cast<index_t>(batch) * p.block_table_batch_stride +
                                     (key >> p.page_size_log2)];
      return min(max(page, 0), p.num_pages - 1);
    };
    // Half h of the split's tiles: this thread's run, from `page` (paged caches: the run's page).
    auto load_half = [&](int h, index_t page) {
      const int key0 = (t_begin + h / 2) * kBlockN + run0;  // the run's first key
      const bool is_v = h & 1;
      const T* base = is_v ? v : k;
      const index_t row_stride = is_v ? p.v_row_stride : p.k_row_stride;
      // Dense: key0 from the sequence's key 0. Paged: row key0 within the page, page stride k/v_batch_stride.
      const index_t row = kv.paged() ? key0 & ((1 << p.page_size_log2) - 1) : key0;
      const T* src = base + (is_v ? kv.v_base : kv.k_base) + ch * 8 + row * row_stride +
                     page * (is_v ? p.v_batch_stride : p.k_batch_stride);
      const uint32_t dst = slot(h);
#pragma unroll
      for (int i = 0; i < kRunRows; ++i) {
        const bool pred = col_ok && key0 + i < seqlen_k;
        cp_async_16_policy(dst + 2u * static_cast<uint32_t>(TileKV::chunk_offset(run0 + i, ch)), pred ? src : base,
                           pred, stream_policy);
        src += row_stride;
      }
    };
    index_t page = run_page(t_begin);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h < halves) load_half(h, page);
      cp_async_commit();  // one group per half (the first also carries Q), empty or not
    }
    page = t_begin + 1 < t_end ? run_page(t_begin + 1) : 0;  // the next tile's, used an iteration later
    uint32_t frag_p[1][Kt::kKS_PV][4];
    for (int tile = t_begin; tile < t_end; ++tile) {
      const int h = 2 * (tile - t_begin);
      cp_async_wait<1>();
      __syncthreads();  // K_t landed for everyone; everyone is done with slot (h + 2) % 3
      if (tile == t_begin) FA2_TIMELINE(p, 3, clock64());
      const index_t later = tile + 2 < t_end ? run_page(tile + 2) : 0;  // read now, used next iteration
      if (h + 2 < halves) load_half(h + 2, page);
      cp_async_commit();
      score_step(slot(h), tile, frag_p);
      cp_async_wait<1>();
      __syncthreads();  // V_t landed; everyone is done with K_t's slot
      if (h + 3 < halves) load_half(h + 3, page);
      cp_async_commit();
      pv_step(slot(h + 1), frag_p);
      page = later;
    }
  } else {
    // Prologue: pages of the first kStages - 1 tiles, then their loads; then the pages of the next one.
    if (kv.paged()) {
#pragma unroll
      for (int s = 0; s < kStages - 1; ++s)
        if (t_begin + s < t_end) kv.fetch_pages(t_begin + s, s, tid);
      __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (t_begin + s < t_end) load_tile(t_begin + s);
      cp_async_commit();  // one group per stage (the first also carries Q), empty or not
    }
    if (t_begin + kStages - 1 < t_end) kv.fetch_pages(t_begin + kStages - 1, kStages - 1, tid);
    int next_page = t_begin + kStages < t_end ? kv.read_page(t_begin + kStages, tid) : 0;  // stored next

    for (int tile = t_begin; tile < t_end; ++tile) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // tile landed for everyone; everyone is done with the stage the next load overwrites
      if (tile == t_begin) FA2_TIMELINE(p, 3, clock64());
      if (tile + kStages - 1 < t_end) load_tile(tile + kStages - 1);
      cp_async_commit();
      // Pages of the tile after that (read an iteration ago), into the slot of tile `tile` (its load was issued
      // stages ago); the barrier at the top of the next iteration publishes them. Then the read for the next one.
      if (tile + kStages < t_end) kv.store_page(next_page, (tile - t_begin) % kStages, tid);
      next_page = tile + kStages + 1 < t_end ? kv.read_page(tile + kStages + 1, tid) : 0;

      const uint32_t sK = stage_k((tile - t_begin) % kStages);
      uint32_t frag_p[1][Kt::kKS_PV][4];
      score_step(sK, tile, frag_p);
      pv_step(sK + Kt::kSmemKV, frag_p);
    }
  }
  cp_async_wait<0>();
  allow_next_grid();  // the combine may launch now; it still waits for this grid's writes
  FA2_TIMELINE(p, 4, clock64());

  const bool partial = p.num_splits > 1;
  const index_t plane = static_cast<index_t>(p.batch) * p.heads_q * p.seqlen_q;  // rows of one split's partials
  if constexpr (!Kt::kSplitKeys) {
    // Each warp holds whole rows: its own max and sum are the row's; O and the LSE straight from registers.
    // Both rows' sums first, by every lane (the quad shuffles name the whole warp, so no lane may have left for a
    // row past the tile's end yet), side by side; then the reciprocal without IEEE division's slow-path call (a
    // sum is 0 or at least 1: see OnlineSoftmax::finalize_at).
    float l_row[1][2];
#pragma unroll
    for (int h = 0; h < 2; ++h) l_row[0][h] = softmax.row_sum[0][h];
    quad_reduce_rows<false>(l_row);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (warp_row0 + g + 8 * h >= rows) continue;
      const float m = softmax.row_max[0][h];
      const float l = l_row[0][h];
      const bool empty = m == -INFINITY || !(l > 0.f);
      const float lse = empty ? -INFINITY : (m * p.scale_log2 + __log2f(l)) * 0.6931471805599453f;
      const float f = empty ? 0.f : fast_rcp(l);
      const index_t row = (static_cast<index_t>(batch) * p.heads_q + row_h[h]) * p.seqlen_q + row_q[h];
#pragma unroll
      for (int ni = 0; ni < Kt::kNT_O; ++ni) {
        const int c = 8 * ni + 2 * t;
        if (c >= d) continue;
        const float x = acc_o[0][ni][2 * h] * f, y = acc_o[0][ni][2 * h + 1] * f;
        if (partial) {
          *reinterpret_cast<float2*>(p.out_accum + (split * plane + row) * d + c) = make_float2(x, y);
        } else {
          T* dst = static_cast<T*>(p.out) + row_offset(batch, row_h[h], seq.q_start + row_q[h], p.o_batch_stride,
                                                       p.o_head_stride, p.o_row_stride) + c;
          *reinterpret_cast<uint32_t*>(dst) = pack2<T>(x, y);
        }
      }
      if (t == 0) {
        if (partial) p.lse_accum[split * plane + row] = lse;
        else p.lse[seq.stat_index(p, batch, row_h[h], row_q[h])] = lse;
      }
    }
    FA2_TIMELINE(p, 5, clock64());
    FA2_TIMELINE(p, 6, timeline_ns());
    FA2_TIMELINE(p, 7, timeline_smid());
    return;
  }

  // Merge the four warps: each row's max (log2 units) and sum per warp, then O rescaled and summed.
  float my_max[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m = softmax.row_max[0][h];
    my_max[h] = m == -INFINITY ? -INFINITY : m * p.scale_log2;
    const float sum = quad_sum(softmax.row_sum[0][h]);
    if (t == 0) {
      s_max[warp * kBlockM + g + 8 * h] = my_max[h];
      s_sum[warp * kBlockM + g + 8 * h] = sum;
    }
  }
  __syncthreads();  // stats visible; every warp is done with the K/V stages (reused below)
  FA2_TIMELINE(p, 8, clock64());
  // Both rows' statistics first, then both rows' stores: one chain of independent loads and MUFU ops, no IEEE
  // division (it was a called subroutine per row) and no branch between them. This epilogue runs once per block
  // on the decode step's critical path, where a dependent instruction costs ~5 cycles (perf.md v21).
  float row_lse[2], row_f[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    float mw[Kt::kNWarps], lw[Kt::kNWarps];
#pragma unroll
    for (int w = 0; w < Kt::kNWarps; ++w) mw[w] = s_max[w * kBlockM + r], lw[w] = s_sum[w * kBlockM + r];
    float m = mw[0];
#pragma unroll
    for (int w = 1; w < Kt::kNWarps; ++w) m = fmaxf(m, mw[w]);
    float l = 0.f;
#pragma unroll
    for (int w = 0; w < Kt::kNWarps; ++w) l += mw[w] == -INFINITY ? 0.f : lw[w] * fast_exp2(mw[w] - m);
    const bool empty = !(l > 0.f);
    row_lse[h] = empty ? -INFINITY : (m + __log2f(l)) * 0.6931471805599453f;
    row_f[h] = empty || my_max[h] == -INFINITY ? 0.f : fast_exp2(my_max[h] - m) * __fdividef(1.f, l);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    if (r >= rows) continue;  // decoding with G < 16: most of the m16 tile's rows are padding
    float* dst = s_merge + (warp * kBlockM + r) * Kt::kORowStride + 2 * t;
#pragma unroll
    for (int ni = 0; ni < Kt::kNT_O; ++ni)
      *reinterpret_cast<float2*>(dst + 8 * ni) =
          make_float2(acc_o[0][ni][2 * h] * row_f[h], acc_o[0][ni][2 * h + 1] * row_f[h]);
  }
  __syncthreads();
  FA2_TIMELINE(p, 9, clock64());

  for (int idx = tid; idx < rows * (Kt::kHeadDim / 4); idx += Kt::kNThreads) {  // the tile's real rows only
    const int r = idx / (Kt::kHeadDim / 4), c = (idx % (Kt::kHeadDim / 4)) * 4;
    if (c >= d) continue;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < Kt::kNWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(s_merge + (w * kBlockM + r) * Kt::kORowStride + c);
      o.x += x.x, o.y += x.y, o.z += x.z, o.w += x.w;
    }
    const int pr = row0 + r, qi = pr / group, h = head_kv * group + pr % group;
    if (partial) {
      const index_t row = (static_cast<index_t>(batch) * p.heads_q + h) * p.seqlen_q + qi;
      *reinterpret_cast<float4*>(p.out_accum + (split * plane + row) * d + c) = o;
    } else {
      T* dst = static_cast<T*>(p.out) +
               row_offset(batch, h, seq.q_start + qi, p.o_batch_stride, p.o_head_stride, p.o_row_stride) + c;
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack2<T>(o.x, o.y), pack2<T>(o.z, o.w));
    }
  }
  FA2_TIMELINE(p, 10, clock64());
  if (warp == 0 && t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = g + 8 * h;
      if (r >= rows) continue;
      if (partial) {
        const index_t row = (static_cast<index_t>(batch) * p.heads_q + row_h[h]) * p.seqlen_q + row_q[h];
        p.lse_accum[split * plane + row] = row_lse[h];
      } else {
        p.lse[seq.stat_index(p, batch, row_h[h], row_q[h])] = row_lse[h];
      }
    }
  }
  FA2_TIMELINE(p, 5, clock64());  // thread 0's stores issued
  FA2_TIMELINE(p, 6, timeline_ns());
  FA2_TIMELINE(p, 7, timeline_smid());
}

}  // namespace flash_attn2::cuda
