// The contract between the PyTorch-facing launcher (attention_cuda.cpp) and the CUDA kernels.
// Kernels see only raw pointers, element strides and sizes: no ATen types, so the .cu files compile fast.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime.h>

#include "attention_rule.h"

namespace flash_attn2::cuda {

using index_t = int64_t;

// Q is (B, Hq, Nq, d), K and V are (B, Hkv, Nk, d), O is (B, Hq, Nq, d); strides are in elements and the
// last dimension is contiguous. Every row start is 16-byte aligned (the launcher copies tensors that are not).
// Head h of Q reads K/V head h / (Hq / Hkv) (GQA/MQA).
// Variable-length batches (cu_seqlens_q != nullptr): Q/O are packed (Tq, Hq, d) and K/V (Tk, Hkv, d) with batch
// strides 0; sequence b is rows [cu_seqlens[b], cu_seqlens[b + 1]) (clamped to the packed totals, so no offsets
// can make a kernel leave the tensors); seqlen_q / seqlen_k are then the max_seqlen bounds that size the grid.
// Per-row statistics (lse, softmax_d, and dq_accum rows of d floats) live at
//   b * stat_batch_stride + h * stat_head_stride + (sequence start) + row:  (B, Hq, Nq) dense, (Hq, Tq) varlen.
#ifdef FLASH_ATTN2_FWD_TIMELINE
constexpr int kFwdProbeConsumers = 3, kFwdProbeSlots = 19;  // FwdProbe (flash_fwd_sm90_ws_kernel.cuh)
#endif
#ifdef FLASH_ATTN2_BWD_TIMELINE
constexpr int kBwdProbeConsumers = 2, kBwdProbeSlots = 16;  // BwdProbe (flash_bwd_sm90_kernel.cuh)
#endif
#ifdef FLASH_ATTN2_SPLITKV_TIMELINE
constexpr int kTimelineSlots = 12;  // stamps per block of the split-KV and combine kernels (tile_primitives.cuh)
#endif

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // (B, Hq, Nq) contiguous, natural-log units; -inf for a row that sees no key.

  index_t q_batch_stride, q_head_stride, q_row_stride;
  index_t k_batch_stride, k_head_stride, k_row_stride;
  index_t v_batch_stride, v_head_stride, v_row_stride;
  index_t o_batch_stride, o_head_stride, o_row_stride;

  int batch;
  int heads_q;
  int heads_kv;
  int seqlen_q;
  int seqlen_k;
  int head_dim;  // the real d: a multiple of 8, at most the kernel's compiled head dim (the rest is padding).

  const int* cu_seqlens_q;  // (B + 1,) or nullptr (dense)
  const int* cu_seqlens_k;
  int total_q, total_k;     // packed rows (varlen)
  index_t stat_batch_stride, stat_head_stride;

  float scale;       // softmax scale applied to Q.K^T
  float scale_log2;  // scale * log2(e), for exp2

  // Visibility (attention_rule.h): key j is visible to query i iff i + diag - left <= j <= i + diag + right,
  // diag = seqlen_k - seqlen_q of the sequence; -1 = unbounded. causal is window_right = 0.
  int window_left, window_right;
  // Score transform (kernels built with score modifiers only): softcap in raw-score units (ScoreRule with
  // unit = scale), ALiBi slopes / scale per (batch, head) = alibi_slopes[b * alibi_batch_stride + h].
  float softcap_in, softcap_out;  // 0, 0: no softcap
  const float* alibi_slopes;      // nullptr: no ALiBi
  int alibi_batch_stride;
  float inv_scale;                // 1 / scale
  Dropout dropout;                // threshold 0: no dropout
  float keep_scale;               // 1 / (1 - p)

  bool is_bf16;  // else fp16
  bool score_mod;  // softcap, ALiBi or dropout present: the launcher picks the kernels built for them

  // KV caches and split-KV (flash_splitkv_kernel.cuh; the main kernels leave these null / 1):
  // cache_seqlens (B,) int32: keys of sequence b are min(cache_seqlens[b] + seqlen_k_new, seqlen_k), where
  // seqlen_k is then the cache capacity (nullptr: seqlen_k keys). block_table (B, block_table_batch_stride)
  // int32: paged K/V (num_pages, 2^page_size_log2, Hkv, d), k/v_batch_stride being the page stride.
  const int* cache_seqlens;
  int seqlen_k_new;
  const int* block_table;
  index_t block_table_batch_stride;
  int page_size_log2, num_pages;
  // Keys split over num_splits blocks; with more than one, each writes float32 partials
  //   out_accum (num_splits, B, Hq, Nq, head_dim) and lse_accum (num_splits, B, Hq, Nq), contiguous,
  // and run_splitkv_combine (splitkv_combine.cuh) merges them into out / lse.
  int num_splits;
  float* out_accum;
  float* lse_accum;
  // The split-KV kernel's K/V loads under L2 evict-first where a row tile reads them alone (its launcher: 1, or 0
  // with FLASH_ATTN2_SPLITKV_EVICT_FIRST=0 for A/B runs); 0: evict-unchanged everywhere.
  int splitkv_evict_first;
  // The split-KV kernel's L2 prefetch before its PDL wait: the first splitkv_prefetch_tiles key tiles of a block's
  // split of a dense cache (0: none); pdl_trigger, bits: where the split-KV and combine kernels let the next
  // kernel of the stream launch early (griddepcontrol.launch_dependents; flash_splitkv_launch.cuh says which),
  // so that its blocks reach that prefetch under this kernel's tail. Their launcher sets both
  // (FLASH_ATTN2_SPLITKV_PREFETCH / FLASH_ATTN2_PDL_TRIGGER, A/B runs).
  int splitkv_prefetch_tiles;
  int pdl_trigger;
  // The split-KV kernel with K and V staggered (SplitKvTraits::kStagger: 128-key tiles, K and V of a tile in
  // separate slots of a 3-slot ring) where splitkv_stagger_fits; set by launch_splitkv (use_splitkv_stagger: the
  // default there but on short rows in grids of a wave or more).
  int splitkv_stagger;
#if defined(FLASH_ATTN2_SPLITKV_TIMELINE) || defined(FLASH_ATTN2_FWD_TIMELINE) || defined(FLASH_ATTN2_BWD_TIMELINE)
  // Debug builds only: -DFLASH_ATTN2_SPLITKV_TIMELINE (scripts/splitkv_timeline.py), kTimelineSlots stamps per
  // split-KV block, then per combine block (flash_splitkv_kernel.cuh says which); -DFLASH_ATTN2_FWD_TIMELINE
  // (scripts/fwd_probe.py), the WS forward's FwdProbe counters, kFwdProbeSlots per (block, consumer) for
  // kFwdProbeConsumers consumers a block; -DFLASH_ATTN2_BWD_TIMELINE (scripts/bwd_probe.py), the WS backward's
  // BwdProbe counters, kBwdProbeSlots per (block, consumer), kBwdProbeConsumers a block. nullptr: none.
  unsigned long long* timeline;
#endif
  // The warp-specialised forward's tile counter, where its persistent blocks take masked or packed tiles (of
  // unequal cost) dynamically; nullptr: blocks walk tiles statically or take one each. The launcher gets it from
  // zeroed_ints (host: n zeroed int32 on the call's device and stream, alive until the call returns; nullptr
  // where the caller gives none).
  int* tile_counter;
  int* (*zeroed_ints)(void* ctx, int n);
  void* zeroed_ints_ctx;
  // The warp-specialised forward's Q buffers in use (1 or its traits' kQStages; set by its launcher).
  int ws_q_stages;
  // The warp-specialised kernels prefetch their tensor maps at the start (set by their launchers; 0 for A/B runs).
  int ws_prefetch_maps;
  // The WS forward's producer copies each tile's Q during the tile before (flash_fwd_sm90_ws_kernel.cuh; its
  // launcher: uniform rows on the static stride; 0 for A/B runs).
  int ws_q_ahead;
  // The warp-specialised forward's softcap against a fixed offset (its launcher; softcap_scale_log2 = 0: not):
  // P = exp2(tanh(cap_in s) * softcap_scale_log2 - softcap_offset_log2), softcap_scale_log2 = softcap * log2 e.
  float softcap_scale_log2, softcap_offset_log2;
  // The grid's order over (tile, head): at most 1, head by head (a head's tiles neighbours); g > 1, heads in
  // groups of g, tile by tile within a group (each group's longest tiles first). From FLASH_ATTN2_FWD_GRID_GROUP /
  // FLASH_ATTN2_BWD_GRID_GROUP, else -1: the launcher's choice (GridOrder, attention_rule.h; ws_bwd_grid_group).
  int grid_head_group;
  // The forward's query tiles of each sequence start above its row 0 (FwdBlockInfo: by kBlockM - seqlen_q %
  // kBlockM rounded down to a multiple of row_shift_unit; the rows above 0 are never stored), so that where a
  // sequence's length is not a multiple of the tile, its partial tile is the first, not the last: under a causal
  // mask the first sees the fewest keys and the last the most. The unit is gcd(kBlockM, kBlockN), a power of two
  // and a multiple of 16 (the dropout draws' query groups): a shift by it only permutes where the tiles' diagonals
  // fall on the key tiles, while other shifts move every tile's diagonal off a key tile's edge and cost as much
  // as they save (where kBlockM = kBlockN, the unit is the tile and nothing shifts). 0: no shift. Set by the WS
  // forward's launcher only (the other forward kernels store rows [0, rows) of a tile).
  int row_shift_unit;
  // The WS forward's stream-K tail (flash_fwd_sm90_ws_kernel.cuh, StreamKTail; set by its launcher): after
  // sk_dp_rounds rounds of the static stride, the walkers (blocks, or clusters of two) share the remaining tiles'
  // sk_units (tile group, key tile) units evenly, so that no walker ends a whole tile after the others. A tile
  // split between two walkers is finished by whichever ends its piece second: the first leaves its (O, max, sum)
  // in sk_partial and raises its flag in sk_sync ([count, ready] per split and consumer, zeroed per call by a
  // memset on the stream).
  // sk_units = 0: no tail (every tile whole).
  int sk_dp_rounds, sk_units, sk_key_tiles;
  float* sk_partial;
  int* sk_sync;
  // Host: n bytes on the call's device and stream, uninitialised, alive until the call returns (the context is
  // zeroed_ints_ctx; nullptr where the caller gives none).
  void* (*scratch_bytes)(void* ctx, int64_t n);
};

struct BwdParams : FwdParams {
  const void* dout;  // (B, Hq, Nq, d), same rules as Q
  index_t do_batch_stride, do_head_stride, do_row_stride;

  void* dq;  // (B, Hq, Nq, d)
  void* dk;  // (B, Hkv, Nk, d)
  void* dv;  // (B, Hkv, Nk, d)
  index_t dq_batch_stride, dq_head_stride, dq_row_stride;
  index_t dk_batch_stride, dk_head_stride, dk_row_stride;
  index_t dv_batch_stride, dv_head_stride, dv_row_stride;

  // Workspaces allocated by the launcher, contiguous float32:
  float* dq_accum;    // stat rows x head_dim, zero-filled by the launcher before the kernels run.
  float* softmax_d;   // stat rows: rowsum(dO * O), written by the preprocessing kernel.
  // stat rows: LSE * log2 e, +inf where the LSE is -inf (a row that sees no key: P = 0 there), written by the
  // preprocessing kernel beside D. Every backward kernel stages these rows, not the LSE, so that P = exp2(S *
  // scale_log2 - lse_log2) takes one FFMA a score: converting and guarding the LSE per query column in every
  // consumer thread cost the d64 WS backward 96 of its 835 instructions a step (an FMUL, FSETP and FSEL per
  // column, SASS, perf.md v38).
  float* lse_log2;
  // Deterministic mode: one zeroed counter per (batch, q head, query tile); the key-tile blocks that see a
  // query tile add their dQ in descending key-tile order, each waiting for the counter to reach its rank.
  // nullptr: atomics in any order.
  int* dq_semaphore;
  int dq_semaphore_tiles;  // query tiles per (batch, head) in dq_semaphore
  // Deterministic mode's grid order (BwdBlockInfo): 1 (the default) keeps a head's key tiles together, 0 spreads
  // each wave over every head, key tile slowest (FLASH_ATTN2_DET_ORDER=spread, A/B runs).
  int dq_order_by_head;
  // Deterministic mode, unmasked calls: the rotated walk (RotatedDqWalk, attention_rule.h), set per kernel by
  // the launcher (detail::choose_dq_walk) where a head's key tiles are few enough to be co-resident.
  int dq_rotate;
  bool dq_red_add;         // the warp-specialised kernel adds dQ with red.add, not TMA reduce-adds (A/B runs)
  // A key tile's steps start at its first visible query row (rounded down to 16, BwdSteps), not at the multiple
  // of the step's rows below it: a band's two edges (sliding windows) then cost one partial step, not two. Set
  // per kernel by the launcher; BwdSteps ignores it in the deterministic mode, whose turns count aligned tiles.
  bool steps_from_first_row;
  // The 80-query steps of the WS d128 backward (plain and softcap-only kernels) run a key tile's last step on 48
  // queries where its rows from the 48th on lie past the tile's row_end (kWsBwdPartialRows); off
  // (FLASH_ATTN2_BWD_PARTIAL_STEP=0, A/B runs): every step on 80.
  bool partial_steps;
  // The d256 dQ-warpgroup kernel loads each step's Q and dO by the TMA (one thread, an mbarrier per stage) instead
  // of the compute threads' cp.async (the default where the TMA can address them, FLASH_ATTN2_BWD_WIDE_TMA_LOADS=0
  // keeps cp.async; its launcher made the maps).
  bool wide_tma_loads;
  // The preprocessing kernel zero-fills dq_accum's rows beside D (run_backward then allocates it uninitialised):
  // one pass over the rows instead of a fill kernel before that pass (perf.md v44). false: run_backward zeroed it
  // (FLASH_ATTN2_BWD_PRE_ZERO=0, A/B runs).
  bool pre_zeroes_dq;
};

// Implemented once per (element type, compiled head dim, score modifiers) in the generated .cu files.
// T is cutlass-free: __half or __nv_bfloat16. kScoreMod: the kernels that apply softcap / ALiBi / dropout
// (read at run time); the others apply visibility (causal, window, varlen) only.
template <typename T, int kHeadDim, bool kScoreMod>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream);

// Whether environment variable `name` is set to `value` (the launchers' A/B switches, read on every call).
inline bool env_is(const char* name, const char* value) {
  const char* env = std::getenv(name);
  return env != nullptr && std::strcmp(env, value) == 0;
}

// Keys per tile of the split-KV kernel (SplitKvTraits), for the launcher's choice of num_splits.
constexpr int splitkv_block_n(int head_dim) { return head_dim <= 64 ? 128 : 64; }
constexpr int kSplitKvBlockM = 16;      // packed (query, q head) rows per split-KV block, up to 16 such rows
constexpr int kSplitKvBlockMWide = 64;  // ... and beyond 16 (SplitKvTraits::kSplitKeys = false)
constexpr int64_t splitkv_block_m(int64_t packed_rows) {
  return packed_rows > kSplitKvBlockM ? kSplitKvBlockMWide : kSplitKvBlockM;
}
// The calls the split-KV kernel's staggered loop (SplitKvTraits::kStagger, 128-key tiles) can run: compiled head
// dim 128, one 16-row tile of packed rows, dense caches or pages of at least the run of consecutive rows a thread
// copies (params: block_table, page_size_log2).
constexpr int kSplitKvStaggerBlockN = 128;
constexpr int kSplitKvStaggerRunRows = 16;  // 128 keys x 16 chunks a row / 128 threads
constexpr bool splitkv_stagger_fits(int compiled_head_dim, int64_t packed_rows, bool paged, int page_size_log2) {
  return compiled_head_dim == 128 && splitkv_block_m(packed_rows) == kSplitKvBlockM &&
         (!paged || (1 << page_size_log2) >= kSplitKvStaggerRunRows);
}
// Row tiles of the split-KV kernel: (batch, kv head, splitkv_block_m packed (query, q head of the group) rows);
// its grid is this times num_splits.
constexpr int64_t splitkv_row_tiles(int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q) {
  const int64_t packed_rows = seqlen_q * (heads_q / heads_kv), block_m = splitkv_block_m(packed_rows);
  return batch * heads_kv * ((packed_rows + block_m - 1) / block_m);
}
constexpr int kSplitKvCombineThreads = 128;  // threads of the split-KV combine kernel's blocks (one output row each)
constexpr int kMaxSplits = 256;

// The split-KV kernel (any variant but dropout; rules read at run time), then the combine when num_splits > 1.
template <typename T, int kHeadDim>
void run_flash_splitkv(const FwdParams& params, cudaStream_t stream);

// In-place append of the new keys / values (KV caches, kvcache.cu): rows [cache_seqlens[b], + Nnew) of the
// cache (dense or paged; rows past the capacity are skipped) get k_new / v_new (B, Hkv, Nnew, d), element size
// 2 bytes, rows 16-byte aligned.
struct AppendParams {
  const void* k_new;
  const void* v_new;
  index_t kn_batch_stride, kn_head_stride, kn_row_stride;
  index_t vn_batch_stride, vn_head_stride, vn_row_stride;
  int seqlen_new;
};
void run_kvcache_append(const FwdParams& cache, const AppendParams& append, cudaStream_t stream);

template <typename T, int kHeadDim, bool kScoreMod>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream);

}  // namespace flash_attn2::cuda
