// Host launcher of the backward pass; explicitly instantiated per (T, head dim, score modifiers) by the
// generated .cu files.
// Order on `stream`: preprocess (softmax_d) -> main kernel (dK, dV, dq_accum) -> convert (dq).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "cuda/cuda_check.cuh"
#include "cuda/flash_bwd_kernel.cuh"
#include "cuda/flash_bwd_sm90_kernel.cuh"
#include "cuda/flash_bwd_sm90_wide_kernel.cuh"
#include "cuda/flash_bwd_sm90_wide_ws_kernel.cuh"
#include "cuda/flash_bwd_sm90_ws_kernel.cuh"
#include "cuda/flash_fwd_launch.cuh"  // detail:: helpers
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"

namespace flash_attn2::cuda {

namespace detail {
// The deterministic mode's walk for a kernel of Kt's tiles: rotated (RotatedDqWalk) where the call has no mask,
// the grid keeps a head's key tiles together and they are at most a quarter of the SMs (dq_walk_rotates);
// FLASH_ATTN2_DET_ROTATE=0 keeps the walk from query tile 0 (A/B runs).
template <class Kt>
void choose_dq_walk(BwdParams& p) {
  p.dq_rotate = 0;
  if (p.dq_semaphore == nullptr || !p.dq_order_by_head) return;
  if (env_is("FLASH_ATTN2_DET_ROTATE", "0")) return;
  int device = 0, sms = 0;
  FA2_CUDA_CHECK(cudaGetDevice(&device));
  FA2_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t num_n = (p.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  const int64_t num_m = (p.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM;
  p.dq_rotate = dq_walk_rotates(p.window_left < 0 && p.window_right < 0, num_n, num_m, sms) ? 1 : 0;
}

// Main backward kernels: one block per (key tile, kv head, batch).
template <class Kt, class Kernel>
void launch_per_key_tile(Kernel kernel, const BwdParams& params, cudaStream_t stream) {
  BwdParams launch_params = params;
  choose_dq_walk<Kt>(launch_params);
  const int64_t num_n = (params.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  launch(kernel, num_n * params.heads_kv * params.batch, Kt::kNThreads, Kt::kSmemBytes, launch_params, stream);
}

// The mma.sync kernel (sm_80+), or its smaller-tile variant where the GPU's per-block shared memory is below
// the main configuration's (sm86 / sm89: 99 KB).
template <typename T, int kHeadDim, bool kScoreMod>
void launch_bwd_portable(const BwdParams& params, cudaStream_t stream) {
  using Kt = BwdTraits<T, kHeadDim>;
  using KtLow = BwdTraits<T, kHeadDim, true>;
  if constexpr (KtLow::kSmemBytes < Kt::kSmemBytes) {
    int dev = 0, optin = 0;
    FA2_CUDA_CHECK(cudaGetDevice(&dev));
    FA2_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (optin < Kt::kSmemBytes)
      return launch_per_key_tile<KtLow>(&flash_bwd_kernel<KtLow, kScoreMod>, params, stream);
  }
  launch_per_key_tile<Kt>(&flash_bwd_kernel<Kt, kScoreMod>, params, stream);
}

// Rows of dq_accum (float32, d per row): (Hq, B * Nq), or (Hq, Tq) for a packed batch; the Hopper backwards' dQ
// maps cover them all.
inline int64_t dq_accum_rows(const BwdParams& p) {
  return static_cast<int64_t>(p.heads_q) *
         (p.cu_seqlens_q != nullptr ? p.total_q : static_cast<int64_t>(p.batch) * p.seqlen_q);
}
// FLASH_ATTN2_BWD_WS_DQ=red: the Hopper backwards add dQ by the threads' red.add instead of TMA reduce-adds
// (A/B runs).
inline bool dq_red_add_requested() { return env_is("FLASH_ATTN2_BWD_WS_DQ", "red"); }

// The WS backward takes FlashAttention-3's larger steps where they are built and can run (BwdSm90WsTraits): 80
// queries at d128, 128 at d64, with dQ by TMA reduce-adds, in the deterministic mode too (1.04-1.24x the 64-query
// steps on an H200; 80 on causal and windowed d128 calls, where FlashAttention-3 takes 64: 1.03-1.08x from 8k
// keys, 0.98-1.04x at 2k; perf.md v24).
// FLASH_ATTN2_BWD_WS_BLOCKM=64 keeps 64 queries a step everywhere (A/B runs), =80 or =128 takes only that one.
inline bool ws_bwd_blockm_requested(int blockm) {
  const char* env = std::getenv("FLASH_ATTN2_BWD_WS_BLOCKM");
  if (env == nullptr || env[0] == '\0' || std::strcmp(env, "big") == 0) return true;
  return std::atoi(env) == blockm;
}

// The WS backward's grid order: heads in groups of 8, key tile rank by rank within a group, on dense masked
// (causal, windowed) calls of at most 4096 queries and keys, where head by head a late head's longest key tiles
// start near the grid's end and run alone: 0.98-1.07x on causal 2k / 4k rows, d64 and d128, plain and GQA
// (1.03x geomean over 12 rows of two calls, perf.md v26). Rows of 4097-8192 bounded at the diagonal (causal,
// sliding windows) take groups of 4: causal 8k +1.6 / +2.0 / +3.3% (d128), softcap +2.6 / +3.8 / +4.2%, GQA 4:1
// +9.1 / +7.3 / +5.1% (d128) and +8.9 / +4.4% (d64), dropout and ALiBi +3%, d64 / d256 plain level (three
// readings, perf.md v38; groups of 8 gain less there). Longer d128 rows under such a sliding window keep groups
// of 4: window 4096 at 16k +2.1% on average over five readings in four calls (other group sizes level to -4%;
// d64 and two-sided windows level; perf.md v36). Head by head elsewhere (16k, GQA 16k included, and non-causal
// rows: 0.96-1.03x in groups, v26 / v38).
// FLASH_ATTN2_BWD_GRID_GROUP=n forces groups of n (1: head by head).
inline constexpr int64_t kGroupedBwdGridMaxRows = 4096;
inline constexpr int64_t kGroupedBwdGridMaxRowsBy4 = 8192;
inline int ws_bwd_grid_group(const BwdParams& p) {
  if (p.grid_head_group >= 0) return p.grid_head_group;
  if (p.cu_seqlens_q != nullptr) return 1;
  const bool masked = p.window_left >= 0 || p.window_right >= 0;
  const int64_t rows = std::max(p.seqlen_q, p.seqlen_k);
  if (masked && rows <= kGroupedBwdGridMaxRows) return 8;
  const bool sliding = p.window_left >= 0 && p.window_right == 0;
  return p.window_right == 0 && (rows <= kGroupedBwdGridMaxRowsBy4 || (sliding && p.head_dim == 128)) ? 4 : 1;
}

// The backward's TMA maps of Q and dO in boxes of box_rows rows (packed batches: one map over all sequences);
// false where there are no query rows or the TMA cannot address them.
inline bool make_q_dout_maps(const BwdParams& p, CUtensorMap* q, CUtensorMap* dout, int box_rows) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int nq = varlen ? p.total_q : p.seqlen_q, maps_b = varlen ? 1 : p.batch;
  return nq > 0 &&
         make_tensor_map(q, p.q, p.is_bf16, p.head_dim, nq, p.heads_q, maps_b, p.q_row_stride, p.q_head_stride,
                         p.q_batch_stride, box_rows) &&
         make_tensor_map(dout, p.dout, p.is_bf16, p.head_dim, nq, p.heads_q, maps_b, p.do_row_stride,
                         p.do_head_stride, p.do_batch_stride, box_rows);
}

// The WS backward of traits Kt: its TMA maps, then the launch; false where the TMA cannot address the tensors.
template <class Kt, bool kScoreMod, bool kSoftcapOnly = false>
bool launch_bwd_ws(const BwdParams& p, cudaStream_t stream, bool required) {
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int nk = varlen ? p.total_k : p.seqlen_k, maps_b = varlen ? 1 : p.batch;
  BwdTmaMaps maps;
  const bool ok =
      make_q_dout_maps(p, &maps.q, &maps.dout, Kt::kBlockM) &&
      make_tensor_map(&maps.k, p.k, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.k_row_stride, p.k_head_stride,
                      p.k_batch_stride, Kt::kBlockN) &&
      make_tensor_map(&maps.v, p.v, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.v_row_stride, p.v_head_stride,
                      p.v_batch_stride, Kt::kBlockN) &&
      make_f32_rows_map(&maps.dq, p.dq_accum, p.head_dim, dq_accum_rows(p), Kt::kBlockM);
  if (!ok) {
    if (required)
      throw std::invalid_argument("flash_attn2: FLASH_ATTN2_BWD_WS=require, but the TMA cannot address these tensors");
    return false;
  }
  // FLASH_ATTN2_BWD_WS_DQ=red: dQ by the consumers' red.add as before the TMA reduce-adds (A/B runs; not in the
  // deterministic mode, whose order only the dQ writer keeps, nor with larger steps).
  BwdParams launch = p;
  launch.dq_red_add = dq_red_add_requested() && p.dq_semaphore == nullptr && Kt::kBlockM == 64;
  launch.ws_prefetch_maps = ws_prefetch_maps();
  launch.grid_head_group = ws_bwd_grid_group(p);
  // Steps from each key tile's first visible query (BwdSteps, which keeps the deterministic mode's aligned walk):
  // FLASH_ATTN2_BWD_FIRST_ROW=0 aligns them (A/B runs).
  launch.steps_from_first_row = !env_is("FLASH_ATTN2_BWD_FIRST_ROW", "0");
  launch.partial_steps = !env_is("FLASH_ATTN2_BWD_PARTIAL_STEP", "0");
  choose_dq_walk<Kt>(launch);
  auto kernel = &flash_bwd_sm90_ws_kernel<Kt, kScoreMod, kSoftcapOnly>;
  set_smem_limit(kernel, Kt::kSmemBytes);
  const int64_t num_n = (p.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  // Clusters of two blocks sharing each step's Q and dO (flash_bwd_sm90_ws_kernel's producer): where the grid
  // keeps a head's key tiles together (head by head), every head has an even number of them and they walk the
  // same steps: uniform rows (no mask, no packed batch), outside the deterministic mode (its walk and dQ turns
  // are per key tile), in the d128 kernels without score modifiers. Blocks 2i and 2i + 1 are then consecutive
  // key tiles of one head. Against one block each (two readings, perf.md v44): d128 non-causal 8k / 16k +1.2-1.4 /
  // +0.6-1.6%, GQA 4k +0.7-1.3%, 2k level (1.00); d64 2k / 8k level to -1%, so not there.
  // FLASH_ATTN2_BWD_CLUSTER=0 turns it off (A/B runs, tests), =require raises where a call to these kernels
  // cannot take it (tests).
  maps.cluster = 0;
  if constexpr (!kScoreMod && Kt::kHeadDim == 128) {
    const bool off = env_is("FLASH_ATTN2_BWD_CLUSTER", "0"), require = env_is("FLASH_ATTN2_BWD_CLUSTER", "require");
    const bool fits = !varlen && p.window_left < 0 && p.window_right < 0 && p.dq_semaphore == nullptr &&
                      !launch.dq_red_add && launch.grid_head_group <= 1 && num_n % 2 == 0 &&
                      max_active_pairs<Kt>(kernel, Kt::kNThreads, Kt::kSmemBytes) > 0;
    // Q and dO in boxes of half a step, each block's half (the maps replaced only once both are made).
    CUtensorMap q_half, dout_half;
    if (!off && fits && make_q_dout_maps(p, &q_half, &dout_half, Kt::kBlockM / 2)) {
      maps.q = q_half;
      maps.dout = dout_half;
      maps.cluster = 2;
    }
    if (require && maps.cluster == 0)
      throw std::invalid_argument(
          "flash_attn2: FLASH_ATTN2_BWD_CLUSTER=require, but this call cannot run in clusters (uniform rows, an even "
          "number of key tiles a head, not deterministic)");
    if (maps.cluster == 2) {
      const PairLaunch pair(num_n * p.heads_kv * p.batch, Kt::kNThreads, Kt::kSmemBytes, stream);
      FA2_CUDA_CHECK(cudaLaunchKernelEx(&pair.config, kernel, launch, maps));
      return true;
    }
  }
  kernel<<<grid_1d(num_n * p.heads_kv * p.batch), Kt::kNThreads, Kt::kSmemBytes, stream>>>(launch, maps);
  FA2_CHECK_LAUNCH();
  return true;
}

// Calls the WS backward's softcap kernel (BwdSm90WsTraits::kSoftcapKernel, flash_bwd_sm90_ws_kernel's
// kSoftcapOnly) takes: a softcap without ALiBi or dropout. FLASH_ATTN2_BWD_SOFTCAP_KERNEL=0 leaves them to the
// score-modifier kernel (A/B runs, tests).
inline bool softcap_bwd_kernel_takes(const BwdParams& p) {
  return p.softcap_out > 0.f && p.alibi_slopes == nullptr && !p.dropout.enabled() &&
         !env_is("FLASH_ATTN2_BWD_SOFTCAP_KERNEL", "0");
}

// FLASH_ATTN2_BWD_WS=0: the WS backward off (try_launch_bwd_ws, below).
inline bool ws_bwd_off() { return env_is("FLASH_ATTN2_BWD_WS", "0"); }

// The larger steps of the WS backward: FlashAttention-3's 80 queries at d128, 128 at d64.
template <int kHeadDim>
constexpr int kWsBwdBigBlockM = kHeadDim == 128 ? 80 : 128;

// The query rows of a step of the WS backward at d64 / d128 (its traits' kBlockM): the larger steps, unless an A/B
// switch keeps 64: FLASH_ATTN2_BWD_WS_DET_BIG=0 in the deterministic mode, _MOD_BIG=0 with score modifiers (600
// and 496 bytes of spills on sm_90a, yet 1.02-1.12x the 64-query steps on softcap, ALiBi and dropout rows),
// _M80_MASKED=0 on masked d128 calls without them; none with red.add.
template <int kHeadDim, bool kScoreMod>
int ws_bwd_block_m(const BwdParams& p) {
  constexpr int kBig = kWsBwdBigBlockM<kHeadDim>;
  const bool masked = p.window_left >= 0 || p.window_right >= 0;
  const bool big = ws_bwd_blockm_requested(kBig) && !dq_red_add_requested() &&
                   !(p.dq_semaphore != nullptr && env_is("FLASH_ATTN2_BWD_WS_DET_BIG", "0")) &&
                   !(kScoreMod && env_is("FLASH_ATTN2_BWD_WS_MOD_BIG", "0")) &&
                   !(kHeadDim == 128 && !kScoreMod && masked && env_is("FLASH_ATTN2_BWD_WS_M80_MASKED", "0"));
  return big ? kBig : 64;
}

// The warp-specialised backward (flash_bwd_sm90_ws_kernel.cuh) is the default at d128 on sm_90 where the TMA can
// address q, k, v and dout (1.09-1.36x flash_bwd_sm90_kernel over d128 plain, softcap and dropout, causal or
// not, N = 2k and 16k; perf.md v12-v13), and at d64: 1.11-1.19x over plain, softcap and dropout, causal or
// not, N = 2k and 16k (perf.md v15; 0.89-0.99x in v14, before ptxas stopped serialising its wgmma).
// FLASH_ATTN2_BWD_WS=0 turns it off, =1 on wherever it runs, =require (tests) raises instead of falling back.
template <typename T, int kHeadDim, bool kScoreMod>
bool try_launch_bwd_ws(const BwdParams& p, cudaStream_t stream) {
  if constexpr (kHeadDim != 64 && kHeadDim != 128) {
    return false;
  } else {
    if (ws_bwd_off()) return false;
    const bool required = env_is("FLASH_ATTN2_BWD_WS", "require");
    constexpr int kBig = kWsBwdBigBlockM<kHeadDim>;
    const bool big = ws_bwd_block_m<kHeadDim, kScoreMod>(p) == kBig;
    if constexpr (kScoreMod) {
      // The larger steps issue dP^T after P^T (Kt::kLateDp) on every score-modifier call: its accumulators are then
      // not live while the score rule runs (softcap and dropout 1.00-1.04x, perf.md v25; ALiBi 1.07-1.20x since
      // the score loop lost dropout's per-score select, v30). Beside S^T those kernels spilled 812 B at d128 and
      // ptxas serialised every wgmma in them (C7512, perf.md v43); the switch that kept them is gone.
      if (big) {
        using KtLate = BwdSm90WsTraits<T, kHeadDim, kBig, true>;
        if constexpr (KtLate::kSoftcapKernel) {
          if (softcap_bwd_kernel_takes(p)) return launch_bwd_ws<KtLate, true, true>(p, stream, required);
        }
        return launch_bwd_ws<KtLate, kScoreMod>(p, stream, required);
      }
    } else {
      if (big) return launch_bwd_ws<BwdSm90WsTraits<T, kHeadDim, kBig>, kScoreMod>(p, stream, required);
    }
    return launch_bwd_ws<BwdSm90WsTraits<T, kHeadDim>, kScoreMod>(p, stream, required);
  }
}

// The d256 backwards (flash_bwd_sm90_wide_kernel.cuh, flash_bwd_sm90_wide_ws_kernel.cuh), their dQ as TMA bulk
// reduce-adds into dq_accum where the map (boxes of 32 columns x box_rows) can be made and the adds need no
// order; the deterministic mode and FLASH_ATTN2_BWD_WS_DQ=red (A/B runs) keep the threads' red.global.add.
inline void make_wide_dq_map(BwdParams& launch, CUtensorMap* dq_map, int box_rows) {
  launch.dq_red_add = launch.dq_semaphore != nullptr || dq_red_add_requested() ||
                      !make_f32_rows_map(dq_map, launch.dq_accum, launch.head_dim, dq_accum_rows(launch), box_rows);
}
template <class Kt, class Kernel, class Maps>
void launch_bwd_wide_kernel(Kernel kernel, BwdParams launch, const Maps& maps, cudaStream_t stream) {
  choose_dq_walk<Kt>(launch);
  set_smem_limit(kernel, Kt::kSmemBytes);
  const int64_t num_n = (launch.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  kernel<<<grid_1d(num_n * launch.heads_kv * launch.batch), Kt::kNThreads, Kt::kSmemBytes, stream>>>(launch, maps);
  FA2_CHECK_LAUNCH();
}

// The split-role kernel: each warpgroup's 64 x 128 part in 64-row boxes.
template <class Kt, bool kScoreMod>
void launch_bwd_wide(const BwdParams& p, cudaStream_t stream) {
  BwdParams launch = p;
  CUtensorMap dq_map{};
  make_wide_dq_map(launch, &dq_map, Kt::kBlockM);
  launch_bwd_wide_kernel<Kt>(&flash_bwd_sm90_wide_kernel<Kt, kScoreMod>, launch, dq_map, stream);
}

// The dQ-warpgroup kernel: dQ in boxes of 16 rows, one warp's; Q and dO by the TMA where it can address them
// (1.02-1.08x the compute threads' cp.async, perf.md v26), FLASH_ATTN2_BWD_WIDE_TMA_LOADS=0 keeps cp.async.
template <class Kt, bool kScoreMod>
void launch_bwd_wide_ws(const BwdParams& p, cudaStream_t stream) {
  BwdParams launch = p;
  WideWsMaps maps{};
  make_wide_dq_map(launch, &maps.dq, 16);
  launch.wide_tma_loads =
      !env_is("FLASH_ATTN2_BWD_WIDE_TMA_LOADS", "0") && make_q_dout_maps(p, &maps.q, &maps.dout, Kt::kBlockM);
  launch_bwd_wide_kernel<Kt>(&flash_bwd_sm90_wide_ws_kernel<Kt, kScoreMod>, launch, maps, stream);
}

}  // namespace detail

template <typename T, int kHeadDim, bool kScoreMod>
void run_flash_bwd(const BwdParams& params, cudaStream_t stream) {
  detail::check_shapes(params, kHeadDim);
  if (params.batch == 0 || params.heads_q == 0) return;
  constexpr int64_t kMaxGrid = 1 << 20;  // grid-stride kernels: enough blocks to fill any GPU

  // The per-row kernels walk every row of the statistics arrays: for a packed batch that is one (Hq, Tq)
  // "batch" of Tq rows.
  BwdParams rows = params;
  if (params.cu_seqlens_q != nullptr) {
    rows.batch = 1;
    rows.seqlen_q = params.total_q;
    rows.q_batch_stride = rows.o_batch_stride = rows.do_batch_stride = rows.dq_batch_stride = 0;
  }
  const int64_t q_rows = static_cast<int64_t>(rows.batch) * rows.heads_q * rows.seqlen_q;
  if (q_rows > 0) {
    using Pre = PreprocessConfig<T, kHeadDim>;
    const int64_t blocks = std::min<int64_t>((q_rows + Pre::kRowsPerBlock - 1) / Pre::kRowsPerBlock, kMaxGrid);
    flash_bwd_preprocess_kernel<T, kHeadDim>
        <<<static_cast<unsigned>(blocks), Pre::kThreads, 0, stream>>>(rows);
    FA2_CHECK_LAUNCH();
  }

  // Also runs when seqlen_q == 0: every key tile then writes dK = dV = 0.
  if (params.seqlen_k > 0) {
    if constexpr (kHeadDim == 64 || kHeadDim == 128) {
      using K90 = BwdSm90Traits<T, kHeadDim>;
      if (!detail::use_sm90_kernels())
        detail::launch_bwd_portable<T, kHeadDim, kScoreMod>(params, stream);
      else if (!detail::try_launch_bwd_ws<T, kHeadDim, kScoreMod>(params, stream))
        detail::launch_per_key_tile<K90>(&flash_bwd_sm90_kernel<K90, kScoreMod>, params, stream);
    } else if constexpr (kHeadDim == 256) {
      using K90 = BwdSm90WideTraits<T, kHeadDim>;
      using K90Ws = BwdSm90WideWsTraits<T, kHeadDim>;
      // The dQ-warpgroup kernel (1.09-1.35x the split-role kernel on an H200, perf.md v17), in the deterministic
      // mode too (1.01-1.06x there, v18), unless FLASH_ATTN2_BWD_WIDE=2wg asks for the split-role kernel (A/B
      // runs, tests).
      const bool two_wg = env_is("FLASH_ATTN2_BWD_WIDE", "2wg");
      if (!detail::use_sm90_kernels())
        detail::launch_bwd_portable<T, kHeadDim, kScoreMod>(params, stream);
      else if (two_wg)
        detail::launch_bwd_wide<K90, kScoreMod>(params, stream);
      else
        detail::launch_bwd_wide_ws<K90Ws, kScoreMod>(params, stream);
    } else {
      detail::launch_bwd_portable<T, kHeadDim, kScoreMod>(params, stream);
    }
  }

  if (q_rows > 0) {
    const int64_t chunks = q_rows * (params.head_dim / 8);
    const int64_t blocks = std::min<int64_t>((chunks + 255) / 256, kMaxGrid);
    flash_bwd_convert_dq_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(rows);
    FA2_CHECK_LAUNCH();
  }
}

}  // namespace flash_attn2::cuda
