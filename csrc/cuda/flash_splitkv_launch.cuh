// Host launcher of the split-KV kernel; explicitly instantiated per (T, head dim) by the generated forward .cu
// files (those without score modifiers: this kernel reads its rules at run time).
#pragma once

#include "cuda/flash_fwd_launch.cuh"
#include "cuda/flash_splitkv_kernel.cuh"
#include "cuda/splitkv_combine.cuh"

namespace flash_attn2::cuda {

namespace detail {
// FLASH_ATTN2_SPLITKV_EVICT_FIRST=0: the K/V loads evict-unchanged everywhere (A/B runs).
inline bool splitkv_evict_first() { return !env_is("FLASH_ATTN2_SPLITKV_EVICT_FIRST", "0"); }

// FLASH_ATTN2_SPLITKV_PREFETCH=n: key tiles a split-KV block prefetches into L2 before its PDL wait (default
// kSplitKvPrefetchTiles; 0: none). FLASH_ATTN2_PDL_TRIGGER (FwdParams::pdl_trigger, default kPdlTrigger): where
// the next kernel may launch early, bits: 1, the split-KV kernel past its PDL wait; 2, the combine from its start;
// 4, the combine past its wait; 0: each kernel only when it ends (A/B runs).
constexpr int kSplitKvPrefetchTiles = 2;
constexpr int kPdlTrigger = 2;
inline int splitkv_prefetch_tiles() {
  const char* env = std::getenv("FLASH_ATTN2_SPLITKV_PREFETCH");
  return env == nullptr ? kSplitKvPrefetchTiles : std::max(0, std::atoi(env));
}
inline int pdl_trigger() {
  const char* env = std::getenv("FLASH_ATTN2_PDL_TRIGGER");
  return env == nullptr ? kPdlTrigger : std::atoi(env) & 7;
}

template <class Kt>
void launch_splitkv_kernel(const FwdParams& params_in, cudaStream_t stream) {
  FwdParams params = params_in;
  params.splitkv_evict_first = splitkv_evict_first() ? 1 : 0;
  params.splitkv_prefetch_tiles = splitkv_prefetch_tiles();
  params.pdl_trigger = pdl_trigger();
  static_assert(Kt::kBlockM == (Kt::kSplitKeys ? kSplitKvBlockM : kSplitKvBlockMWide));
  const int64_t blocks =
      splitkv_row_tiles(params.batch, params.heads_q, params.heads_kv, params.seqlen_q) * params.num_splits;
#ifdef FLASH_ATTN2_SPLITKV_TIMELINE
  // FLASH_ATTN2_TIMELINE_TWICE=1: the whole step twice, the second's stamps kept: its code is warm in the
  // instruction caches (and its K/V partly in L2), so epilogue and combine times that drop are code fetched cold.
  const char* twice = std::getenv("FLASH_ATTN2_TIMELINE_TWICE");
  const int runs = twice != nullptr && std::strcmp(twice, "1") == 0 ? 2 : 1;
  for (int run = 0; run < runs; ++run) {
    launch_dependent(&flash_splitkv_kernel<Kt>, blocks, Kt::kNThreads, Kt::kSmemBytes, params, stream);
    FwdParams combine = params;  // the combine's blocks stamp after the split-KV blocks
    if (combine.timeline != nullptr) combine.timeline += blocks * kTimelineSlots;
    if (params.num_splits > 1) run_splitkv_combine<typename Kt::Elem, Kt::kHeadDim>(combine, stream);
  }
#else
  launch_dependent(&flash_splitkv_kernel<Kt>, blocks, Kt::kNThreads, Kt::kSmemBytes, params, stream);
  if (params.num_splits > 1) run_splitkv_combine<typename Kt::Elem, Kt::kHeadDim>(params, stream);
#endif
}
}  // namespace detail

// Up to 16 packed (query, q head) rows the warps split the key tiles of one m16 tile; beyond, they split 64 rows.
template <typename T, int kHeadDim>
void run_flash_splitkv(const FwdParams& params, cudaStream_t stream) {
  detail::check_shapes(params, kHeadDim);
  if (params.num_splits < 1) throw std::invalid_argument("flash_attn2: num_splits must be >= 1");
  if (params.batch == 0 || params.heads_q == 0 || params.seqlen_q == 0) return;
  const int64_t packed_rows = static_cast<int64_t>(params.seqlen_q) * (params.heads_q / params.heads_kv);
  if constexpr (kHeadDim == 128) {
    if (params.splitkv_stagger &&
        splitkv_stagger_fits(kHeadDim, packed_rows, params.block_table != nullptr, params.page_size_log2))
      return detail::launch_splitkv_kernel<SplitKvTraits<T, kHeadDim, true, true>>(params, stream);
  }
  if (splitkv_block_m(packed_rows) == kSplitKvBlockM)
    detail::launch_splitkv_kernel<SplitKvTraits<T, kHeadDim, true>>(params, stream);
  else
    detail::launch_splitkv_kernel<SplitKvTraits<T, kHeadDim, false>>(params, stream);
}

}  // namespace flash_attn2::cuda
