// Host launcher of the forward kernel; explicitly instantiated per (T, head dim, score modifiers) by the
// generated .cu files.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cuda/cuda_check.cuh"
#include "cuda/flash_fwd_kernel.cuh"
#include "cuda/flash_fwd_sm90_ws_kernel.cuh"
#include "cuda/flash_fwd_sm90_kernel.cuh"
#include "cuda/flash_params.h"
#include "cuda/kernel_traits.cuh"

namespace flash_attn2::cuda {

namespace detail {
inline void check_shapes(const FwdParams& p, int compiled_head_dim) {
  if (p.batch < 0 || p.heads_q < 0 || p.seqlen_q < 0 || p.seqlen_k < 0 || p.heads_kv <= 0 ||
      p.heads_q % p.heads_kv != 0 || p.head_dim <= 0 || p.head_dim % 8 != 0 || p.head_dim > compiled_head_dim) {
    throw std::invalid_argument("flash_attn2: invalid shapes for the CUDA kernel (head_dim " +
                                std::to_string(p.head_dim) + ", compiled " + std::to_string(compiled_head_dim) +
                                ", heads " + std::to_string(p.heads_q) + "/" + std::to_string(p.heads_kv) + ")");
  }
}

inline unsigned grid_1d(int64_t blocks) {
  if (blocks > INT_MAX) throw std::invalid_argument("flash_attn2: problem too large (grid exceeds 2^31-1 blocks)");
  return static_cast<unsigned>(blocks);
}

template <class Kernel>
inline void set_smem_limit(Kernel kernel, int smem_bytes) {
  if (smem_bytes > 48 * 1024)
    FA2_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
}

// The wgmma kernels exist in builds that include sm_90a code (FLASH_ATTN2_CUDA_ARCHS with 90a) and run on
// sm_90 devices only; FLASH_ATTN2_PORTABLE_KERNELS=1 in the environment selects the mma.sync kernels there too
// (tests use it to cover both on one GPU).
inline bool use_sm90_kernels() {
#if defined(FLASH_ATTN2_SM90A)
  const char* portable = std::getenv("FLASH_ATTN2_PORTABLE_KERNELS");
  if (portable != nullptr && std::strcmp(portable, "0") != 0 && portable[0] != '\0') return false;
  int dev = 0, major = 0, minor = 0;
  FA2_CUDA_CHECK(cudaGetDevice(&dev));
  FA2_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  FA2_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major == 9 && minor == 0;
#else
  return false;
#endif
}

// Keys a query row sees on average, estimated from the shapes and the window (causal = right bound 0: about
// half of them; a window: its width): the measure of how long a block's key loop runs.
inline int64_t visible_keys_per_row(const FwdParams& p) {
  const int64_t nq = p.seqlen_q, nk = p.seqlen_k;
  if (p.window_left < 0 && p.window_right == 0) return nk >= nq ? nk - nq / 2 : nk / 2;  // causal
  if (p.window_left >= 0 || p.window_right >= 0) {
    const int64_t left = p.window_left < 0 ? nk : p.window_left, right = p.window_right < 0 ? nk : p.window_right;
    return std::min<int64_t>(nk, left + right + 1);
  }
  return nk;
}

// Whether the d = 128 Hopper forward should take its overlapped loop: it pays when blocks walk many key tiles
// (about 12 or more: measured -6% at 8.5 tiles per block, +7% at 16; docs/perf.md v7.1). FLASH_ATTN2_FWD_OVERLAP=0
// or 1 in the environment forces the choice (A/B runs, tests of both loops).
inline bool fwd_overlap_pays(const FwdParams& p, int block_n) {
  const char* force = std::getenv("FLASH_ATTN2_FWD_OVERLAP");
  if (force != nullptr && force[0] != '\0') return std::strcmp(force, "0") != 0;
  return visible_keys_per_row(p) >= 12 * static_cast<int64_t>(block_n);
}

template <class Kernel, class Params>
inline void launch(Kernel kernel, int64_t blocks, int threads, int smem_bytes, const Params& params,
                   cudaStream_t stream) {
  set_smem_limit(kernel, smem_bytes);
  kernel<<<grid_1d(blocks), threads, smem_bytes, stream>>>(params);
  FA2_CHECK_LAUNCH();
}

// Programmatic dependent launch (sm_90+): the kernel may be launched while the previous kernel of the stream
// is still running, and must call griddepcontrol.wait (wait_for_previous_grid) before it reads or writes memory
// that kernel may touch; the previous kernel lets it in early with griddepcontrol.launch_dependents, or by
// finishing. It hides the launch latency between the short kernels of a decode step (split-KV, then combine).
// FLASH_ATTN2_PDL=0 in the environment launches these kernels plainly (A/B runs).
inline bool pdl_enabled() {
  if (env_is("FLASH_ATTN2_PDL", "0")) return false;
  int dev = 0, major = 0;
  FA2_CUDA_CHECK(cudaGetDevice(&dev));
  FA2_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 9;
}

template <class Params>
inline void launch_dependent(void (*kernel)(Params), dim3 grid, int threads, int smem_bytes, const Params& params,
                             cudaStream_t stream) {
  set_smem_limit(kernel, smem_bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(static_cast<unsigned>(threads));
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = pdl_enabled() ? 1 : 0;
  FA2_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
}
template <class Params>
inline void launch_dependent(void (*kernel)(Params), int64_t blocks, int threads, int smem_bytes,
                             const Params& params, cudaStream_t stream) {
  launch_dependent(kernel, dim3(grid_1d(blocks)), threads, smem_bytes, params, stream);
}

// The warp-specialised forward (flash_fwd_sm90_ws_kernel.cuh) runs where the TMA can address the tensors and its
// traits say it pays (rows see Kt::kDefaultMinKeyTiles key tiles or more; measured, perf.md v11); anything else
// keeps the other kernels.
// FLASH_ATTN2_FWD_WS=0 turns it off, =1 on for every head dim it has, =require (tests) raises instead of
// falling back, so a test knows which kernel ran.
inline int fwd_ws_mode() {  // -1 by the traits, 0 off, 1 on, 2 required
  const char* env = std::getenv("FLASH_ATTN2_FWD_WS");
  if (env == nullptr || env[0] == '\0') return -1;
  if (std::strcmp(env, "0") == 0) return 0;
  return std::strcmp(env, "require") == 0 ? 2 : 1;
}

// The WS forward's softcap against a fixed offset (OnlineSoftmax::update_scores_fixed; the d128 and d256 kernels, where
// Kt::kSoftcapFixed), where it is exact: a softcap without ALiBi in bfloat16. Every logit then lies in [-c, c] (c =
// softcap * log2 e in log2 units), and P = exp2(logit - offset) in [2^(top - 2c), 2^top]. top = max(0, 2c - 102) keeps
// the smallest P a normal float with 24 bits to spare (a row whose scores all sit at -softcap still sums exactly); top
// <= 60 keeps the row sum and O = sum P V finite for up to 2^31 keys of |V| < 2^37: softcaps up to 56 (Gemma 2's 50:
// top = 42; up to 35, top = 0, P <= 1 as with the running max). bfloat16 P (the P V product's operand) has float32's
// exponent range; float16 has not, so it keeps the running max. FLASH_ATTN2_SOFTCAP_FIXED=0 turns it off (A/B runs,
// tests).
// Whether the fixed offset applies to p, and then its scale and offset in log2 units.
inline bool softcap_fixed_offset(const FwdParams& p, float& scale_log2, float& offset_log2) {
  if (env_is("FLASH_ATTN2_SOFTCAP_FIXED", "0")) return false;
  if (!(p.softcap_out > 0.f) || p.alibi_slopes != nullptr || !p.is_bf16) return false;
  const float c = p.softcap_out * p.scale_log2;  // (softcap / scale) * (scale * log2 e)
  const float top = std::max(0.f, 2.f * c - 102.f);
  if (!(top <= 60.f)) return false;
  scale_log2 = c;
  offset_log2 = c - top;
  return true;
}
inline void set_softcap_fixed_offset(FwdParams& p) {
  softcap_fixed_offset(p, p.softcap_scale_log2, p.softcap_offset_log2);
}

// Calls the WS forward's softcap kernel (FwdSm90WsTraits::kSoftcapKernel) takes: a softcap against the fixed
// offset (softcap_fixed_offset: bfloat16, no ALiBi, softcaps up to 56) and no dropout.
// FLASH_ATTN2_FWD_SOFTCAP_KERNEL=0 leaves them to the score-modifier kernel (A/B runs, tests).
inline bool softcap_kernel_takes(const FwdParams& p) {
  float scale_log2, offset_log2;
  // (scale_log2 > 0: the kernels take the fixed offset only then; a negative scale gives a non-positive one.)
  return !p.dropout.enabled() && !env_is("FLASH_ATTN2_FWD_SOFTCAP_KERNEL", "0") &&
         softcap_fixed_offset(p, scale_log2, offset_log2) && scale_log2 > 0.f;
}

// A launch of `blocks` blocks (even) in clusters of two (cudaLaunchKernelEx(&config, ...)); config points into
// the object, which therefore stays where it was made.
struct PairLaunch {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t config = {};
  PairLaunch(int64_t blocks, int threads, int smem_bytes, cudaStream_t stream) {
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = 2;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    config.gridDim = dim3(grid_1d(blocks));
    config.blockDim = dim3(static_cast<unsigned>(threads));
    config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
    config.stream = stream;
    config.attrs = attr;
    config.numAttrs = 1;
  }
  PairLaunch(const PairLaunch&) = delete;
  PairLaunch& operator=(const PairLaunch&) = delete;
};

// How many clusters of two blocks of `kernel` (one block an SM) the current device runs at once: a cluster's
// blocks share a GPC, so a GPC with an odd number of free SMs leaves one idle. Cached per device and traits.
template <class Kt, class Kernel>
inline int max_active_pairs(Kernel kernel, int threads, int smem_bytes) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not asked yet; -1: none
  int device = 0;
  FA2_CUDA_CHECK(cudaGetDevice(&device));
  int* slot = device < kMaxDevices ? &cached[device] : nullptr;
  if (slot != nullptr && *slot != 0) return std::max(*slot, 0);
  int sms = 0;
  FA2_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const PairLaunch pair(std::max(2, sms / 2 * 2), threads, smem_bytes, nullptr);
  int pairs = 0;
  FA2_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&pairs, kernel, &pair.config));
  if (slot != nullptr) *slot = pairs > 0 ? pairs : -1;
  return pairs;
}

// The WS forward's stream-K tail (sm90::StreamKTail), in the d128 kernel without score modifiers (clusters or
// not): where the static stride over uniform rows would end on a partial round and every tile has two key tiles
// or more, the last full round and the partial one are shared out by key tiles. It needs O stored by the TMA (the
// first piece of a split tile then has nothing of the tile's to release) and the call's scratch.
// FLASH_ATTN2_FWD_STREAMK=0 turns it off (A/B runs, tests); =require raises where a call cannot take it (tests).
template <class Kt>
void set_stream_k_tail(FwdParams& launch, const FwdTmaMaps& maps, bool uniform, int64_t grid, int64_t tiles,
                       cudaStream_t stream) {
  const bool off = env_is("FLASH_ATTN2_FWD_STREAMK", "0"), require = env_is("FLASH_ATTN2_FWD_STREAMK", "require");
  const int64_t cs = maps.cluster == 2 ? 2 : 1, walkers = grid / cs, groups = tiles / cs;
  const int64_t key_tiles = (launch.seqlen_k + Kt::kBlockN - 1) / Kt::kBlockN;
  const bool fits = uniform && launch.tile_counter == nullptr && launch.grid_head_group <= 1 && maps.store_o &&
                    launch.scratch_bytes != nullptr && key_tiles >= 2 &&
                    walkers >= 2 && groups > walkers && groups % walkers != 0 && tiles % cs == 0;
  if (require && !fits)
    throw std::invalid_argument(
        "flash_attn2: FLASH_ATTN2_FWD_STREAMK=require, but this call has no stream-K tail (uniform rows on the "
        "static stride with a partial last round, two key tiles or more, O stored by the TMA)");
  if (off || !fits) return;
  launch.sk_key_tiles = static_cast<int>(key_tiles);
  launch.sk_dp_rounds = static_cast<int>(groups / walkers - 1);
  const int64_t units = (groups - launch.sk_dp_rounds * walkers) * key_tiles;
  if (units > INT_MAX / 2) return;
  launch.sk_units = static_cast<int>(units);
  // One scratch allocation: the flags, zeroed by a memset on the stream (not a fill kernel: the host's share of
  // a call stays small), then the partials.
  const int64_t slots = walkers * cs * Kt::kConsumers;  // per split (walker boundary), tile of the group, consumer
  const int64_t sync_bytes = (2 * slots * static_cast<int64_t>(sizeof(int)) + 255) / 256 * 256;
  auto* scratch = static_cast<unsigned char*>(launch.scratch_bytes(
      launch.zeroed_ints_ctx, sync_bytes + slots * 128 * (Kt::kHeadDim / 2 + 4) * static_cast<int64_t>(sizeof(float))));
  launch.sk_sync = reinterpret_cast<int*>(scratch);
  launch.sk_partial = reinterpret_cast<float*>(scratch + sync_bytes);
  FA2_CUDA_CHECK(cudaMemsetAsync(launch.sk_sync, 0, sync_bytes, stream));
}

template <class Kt, bool kScoreMod, bool kSoftcapOnly = false>
bool try_launch_fwd_ws(const FwdParams& p, int64_t bh, cudaStream_t stream) {
  const int mode = fwd_ws_mode();
  const bool varlen = p.cu_seqlens_q != nullptr;
  const bool plain_causal = p.window_left < 0 && p.window_right == 0 && !kScoreMod && !varlen;
  const int min_tiles = plain_causal ? Kt::kDefaultMinKeyTilesCausal : Kt::kDefaultMinKeyTiles;
  if (mode == 0 || (mode == -1 && visible_keys_per_row(p) < static_cast<int64_t>(min_tiles) * Kt::kBlockN))
    return false;
  auto unavailable = [&](const char* why) {
    if (mode == 2) throw std::invalid_argument(std::string("flash_attn2: FLASH_ATTN2_FWD_WS=require, but ") + why);
    return false;
  };
  // Packed batches: one (d, T, H, 1) map over all sequences; the kernel offsets rows by cu_seqlens.
  const int nq = varlen ? p.total_q : p.seqlen_q, nk = varlen ? p.total_k : p.seqlen_k, maps_b = varlen ? 1 : p.batch;
  FwdTmaMaps maps;
  const bool ok =
      make_tensor_map(&maps.q, p.q, p.is_bf16, p.head_dim, nq, p.heads_q, maps_b, p.q_row_stride, p.q_head_stride,
                      p.q_batch_stride, Kt::kBlockM) &&
      make_tensor_map(&maps.k, p.k, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.k_row_stride, p.k_head_stride,
                      p.k_batch_stride, Kt::kBlockN) &&
      make_tensor_map(&maps.v, p.v, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.v_row_stride, p.v_head_stride,
                      p.v_batch_stride, Kt::kBlockN);
  if (!ok) return unavailable("the TMA cannot address these tensors (alignment or strides)");
  const int64_t num_m = (p.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM;
  // Persistent: at most one block per SM, each walking tiles (the next tile's loads then run under the last one's
  // epilogue). Where every tile costs the same (no causal mask or window, no packed batch) the blocks stride
  // through the tiles, at the head dims whose traits ask for it. Masked or packed tiles differ in cost: a static
  // stride gave some blocks only long tiles (0.59-0.66x at causal N = 16k, perf.md v12), so there blocks take
  // tiles from a counter zeroed per call (p.zeroed_ints) in FwdBlockInfo's order, longest first within a head: the
  // dynamic walk, at d64 / d128. It hides each tile's Q wait (~2500 cycles, a block per tile) under the previous
  // tile. It once lost 3-14% at N = 16k (perf.md v13, v34: 7% at causal 16k) because a block claimed its next tile
  // when it started the current one; claimed after the current tile's last copy (TileWalk), it measures 0.995-1.022x
  // a block per tile (window 4096 at 16k 1.022, causal 4k / 8k 1.016 / 1.009, packed causal 1.015, 16k level; v34).
  // At d256 too since v35 where rows see 1024 keys or more: over four calls, each with a noise floor of 2-3%, the
  // walk read +1.5% on average at causal 2k (-0.8 to +3.6%), +1.1% at 4k, +0.5% at 8k, +1.4% packed causal 2k,
  // window 4096 at 16k +5.4% and -2.0% (v34: -0.5% at causal 8k; 0.90-0.96x before the late claim, v25); at causal
  // 1k (512 keys a row) it lost 8% (0.915, packed 0.924), so shorter rows keep a block per tile.
  // Uniform rows take the walk too where their kernel has no static stride (d64, a block per tile until v38):
  // non-causal 2k +2.3% on average over five readings (-0.9 to +5.2%), 4k +1.1 / +1.3 / +2.7%, 8k and 16k level,
  // softcap 2k +3.5% (three readings), dropout 2k +2-3% (perf.md v38); at d128 / d256 the walk reads 0.98 / 0.93
  // of the static stride at 2k, level at 8k-16k, so they keep it.
  // FLASH_ATTN2_FWD_WS_WALK=dynamic asks for the dynamic walk (on uniform rows too), =tile for a block per tile
  // where the kernel has no static stride (A/B runs, tests).
  // FLASH_ATTN2_FWD_WS_BLOCKS=n caps the grid (tests: many tiles per block on small shapes; without the dynamic
  // walk the blocks then stride); =all gives every tile its own block (A/B runs).
  const bool uniform = !varlen && p.window_left < 0 && p.window_right < 0;
  const char* walk_env = std::getenv("FLASH_ATTN2_FWD_WS_WALK");
  const bool walk_forced = walk_env != nullptr && walk_env[0] != '\0';
  const bool dynamic_by_default = uniform ? !Kt::kPersistent  // d64: no static stride
                                          : Kt::kHeadDim <= 128 || visible_keys_per_row(p) >= 1024;
  const bool dynamic =
      p.zeroed_ints != nullptr && (walk_forced ? std::strcmp(walk_env, "dynamic") == 0 : dynamic_by_default);
  FwdParams launch = p;
  launch.tile_counter = nullptr;
  // The grid's heads in groups, tile rank by rank within a group, on dense rows bounded on the right (causal,
  // sliding windows): groups of 4 on sliding windows over 4096 rows (window 4096, three calls: +0.6% at 16k,
  // +1.5% at 8k, +1.6% at d64 16k on average); groups of 8 on other such rows up to 8192 (causal, two or three
  // readings: d256 2k / 4k / 8k +3-7% / +5% / +2-7%, d128 2k / 4k +2-3% / +2-3%, 8k level, d64 2k-8k +1-3%, GQA
  // 4:1 4k / 8k +3-6%, fp16 +3-5%); head by head elsewhere (causal 16k loses 1-3% to any group, non-causal rows
  // and packed batches are level; perf.md v37). FLASH_ATTN2_FWD_GRID_GROUP overrides.
  if (launch.grid_head_group < 0 && !varlen && p.window_right == 0) {
    const int rows = std::max(p.seqlen_q, p.seqlen_k);
    if (p.window_left >= 0 && rows > 4096) launch.grid_head_group = 4;
    else if (rows <= 8192) launch.grid_head_group = 8;
  }
  // Rows bounded on the right (causal, sliding windows), dense or packed: each sequence's tiles start above its
  // row 0 so that where its length is not a multiple of the tile, the partial tile is the first, which sees the
  // fewest keys, instead of the last, which sees the most (FwdParams::row_shift_unit). At d64 (192-row tiles,
  // 128-key tiles, shifts by 64) causal 2k takes 96 key-tile steps a head instead of 101 and causal 4k 363
  // instead of 384; at d128 (128 / 128) nothing shifts; at d256 (128 / 80, shifts by 16) only lengths that are
  // not multiples of 128. The first tile's rows above the sequence read zeros (TMA fill) or the previous
  // sequence's rows, and are never stored. Measured (two readings, perf.md v38): d64 causal 2k +5.7 / +1.7%, 4k
  // +4.6 / +4.0%, 8k / 16k +1%, packed d64 causal +3.2 / +2.7%. FLASH_ATTN2_FWD_ROW_SHIFT=0 keeps the tiles at
  // row 0 (A/B runs).
  constexpr int kShiftUnit = std::gcd(Kt::kBlockM, Kt::kBlockN);
  static_assert(kShiftUnit % 16 == 0 && (kShiftUnit & (kShiftUnit - 1)) == 0, "shifts in powers of two >= 16");
  static_assert(!Kt::kTmaStoreO || kShiftUnit % 64 == 0, "O's 64-row boxes wholly above a shifted tile's row 0 or not");
  launch.row_shift_unit =
      kShiftUnit < Kt::kBlockM && p.window_right >= 0 && !env_is("FLASH_ATTN2_FWD_ROW_SHIFT", "0") ? kShiftUnit : 0;
  // FLASH_ATTN2_FWD_WS_QBUF=1: one Q buffer where the traits have two (A/B runs, tests).
  launch.ws_q_stages = env_is("FLASH_ATTN2_FWD_WS_QBUF", "1") ? 1 : Kt::kQStages;
  launch.ws_prefetch_maps = ws_prefetch_maps();
  // O by the TMA where the traits have its buffer, without score modifiers or in the softcap kernel (the
  // score-modifier kernel spilled in its loop with both epilogues, and its dropout rows lost 5-8%, perf.md v41),
  // where the TMA can address O; packed
  // batches over one map as Q's, the boxes that would cross a sequence's end stored by the threads (the kernel).
  // FLASH_ATTN2_FWD_TMA_O=0: the consumers' threads store O (A/B runs, tests).
  maps.store_o =
      Kt::kTmaStoreO && (!kScoreMod || kSoftcapOnly) && !env_is("FLASH_ATTN2_FWD_TMA_O", "0") &&
      make_tensor_map(&maps.o, p.out, p.is_bf16, p.head_dim, nq, p.heads_q, maps_b, p.o_row_stride, p.o_head_stride,
                      p.o_batch_stride, 64);
  launch.softcap_scale_log2 = launch.softcap_offset_log2 = 0.f;
  if (kScoreMod && Kt::kSoftcapFixed) set_softcap_fixed_offset(launch);
  int device = 0, sms = INT_MAX;
  if ((uniform && Kt::kPersistent) || dynamic) {
    FA2_CUDA_CHECK(cudaGetDevice(&device));
    FA2_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  }
  if (const char* cap = std::getenv("FLASH_ATTN2_FWD_WS_BLOCKS"); cap != nullptr && cap[0] != '\0') {
    if (std::strcmp(cap, "all") == 0) sms = INT_MAX;
    else if (std::atoi(cap) > 0) sms = std::min(sms, std::atoi(cap));
  }
  const int64_t tiles = num_m * bh, blocks = std::min<int64_t>(tiles, std::max(sms, 1));
  if (dynamic && blocks < tiles) launch.tile_counter = p.zeroed_ints(p.zeroed_ints_ctx, 1);
  // Each tile's Q copied during the tile before, on uniform rows of the static stride (every tile there has rows
  // and keys); FLASH_ATTN2_FWD_Q_AHEAD=0 copies it when the producer reaches the tile (A/B runs, tests).
  launch.ws_q_ahead =
      uniform && launch.tile_counter == nullptr && p.seqlen_k > 0 && !env_is("FLASH_ATTN2_FWD_Q_AHEAD", "0");
  // Packed batches on the dynamic walk take their tiles longest sequence first and claim no tile past a sequence's
  // end (sm90::SeqOrder, a table each block builds from cu_seqlens_q), up to Kt::kSeqOrderCap sequences, in the
  // kernel without score modifiers. FLASH_ATTN2_FWD_SEQ_ORDER=0: the grid's order (A/B runs, tests).
  maps.seq_order = !kScoreMod && varlen && launch.tile_counter != nullptr && p.batch <= Kt::kSeqOrderCap &&
                   !env_is("FLASH_ATTN2_FWD_SEQ_ORDER", "0");
  auto kernel = &flash_fwd_sm90_ws_kernel<Kt, kScoreMod, kSoftcapOnly>;
  set_smem_limit(kernel, Kt::kSmemBytes);
  // Clusters of two blocks sharing each K / V tile (Kt::may_cluster: d128 without score modifiers), as
  // FlashAttention-3 runs non-causal rows from d128: where the blocks stride statically through uniform rows head
  // by head and every head has an even number of query tiles, blocks 2i and 2i + 1 of the grid (one cluster) walk
  // consecutive query tiles of one head, tile for tile, so they read the same K / V tiles; each copies half of
  // every key tile into both. The grid is then as many pairs as the GPU holds at once
  // (cudaOccupancyMaxActiveClusters). FLASH_ATTN2_FWD_CLUSTER=0 turns it off (A/B runs, tests), =require raises
  // where a call to these kernels cannot take it (tests).
  maps.cluster = 0;
  launch.sk_units = launch.sk_dp_rounds = launch.sk_key_tiles = 0;
  launch.sk_partial = nullptr;
  launch.sk_sync = nullptr;
  int64_t grid = blocks;
  if constexpr (Kt::may_cluster(kScoreMod)) {
    const bool off = env_is("FLASH_ATTN2_FWD_CLUSTER", "0"), require = env_is("FLASH_ATTN2_FWD_CLUSTER", "require");
    const bool fits = uniform && launch.tile_counter == nullptr && launch.grid_head_group <= 1 && num_m % 2 == 0 &&
                      blocks >= 2;
    if (!off && fits) {
      const int pairs = max_active_pairs<Kt>(kernel, Kt::kNThreads, Kt::kSmemBytes);
      const int64_t cluster_blocks = std::min<int64_t>(blocks / 2, pairs) * 2;
      // K and V in boxes of half a key tile, each block's half (the maps replaced only once both are made).
      CUtensorMap k_half, v_half;
      if (cluster_blocks >= 2 &&
          make_tensor_map(&k_half, p.k, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.k_row_stride,
                          p.k_head_stride, p.k_batch_stride, Kt::kBlockN / 2) &&
          make_tensor_map(&v_half, p.v, p.is_bf16, p.head_dim, nk, p.heads_kv, maps_b, p.v_row_stride,
                          p.v_head_stride, p.v_batch_stride, Kt::kBlockN / 2)) {
        maps.k = k_half;
        maps.v = v_half;
        maps.cluster = 2;
        grid = cluster_blocks;
      }
    }
    if (require && maps.cluster == 0)
      throw std::invalid_argument(
          "flash_attn2: FLASH_ATTN2_FWD_CLUSTER=require, but this call cannot run in clusters (uniform rows, an even "
          "number of query tiles a head, the static stride head by head)");
    set_stream_k_tail<Kt>(launch, maps, uniform, grid, tiles, stream);
    if (maps.cluster == 2) {
      const PairLaunch pair(grid, Kt::kNThreads, Kt::kSmemBytes, stream);
      FA2_CUDA_CHECK(cudaLaunchKernelEx(&pair.config, kernel, launch, maps));
      return true;
    }
  }
  kernel<<<grid_1d(grid), Kt::kNThreads, Kt::kSmemBytes, stream>>>(launch, maps);
  FA2_CHECK_LAUNCH();
  return true;
}

// The d256 WS forward's wider key tiles (FlashAttention-3's 80 keys): fewer, longer steps per block. 80 against
// 64 (perf.md v15, H200, one call): 1.07-1.11x non-causal, 1.02-1.09x causal, 1.01-1.11x packed, N = 2k-16k; so
// they are the default wherever the kernel has no score modifier. (d128 had a 176-key kernel, 1.02-1.08x the
// 128-key one in v14; since v27's ordering fix 128 keys were ahead, 1.00-1.03x over three calls (v29), and the
// 176-key kernel was dropped in v30.) FLASH_ATTN2_FWD_WS_BLOCKN=64 keeps 64 keys (A/B runs, tests).
inline bool use_wide_key_tiles() {
  const char* force = std::getenv("FLASH_ATTN2_FWD_WS_BLOCKN");
  return force == nullptr || force[0] == '\0' || std::atoi(force) == 80;
}
}  // namespace detail

template <typename T, int kHeadDim, bool kScoreMod>
void run_flash_fwd(const FwdParams& params, cudaStream_t stream) {
  using Kt = FwdTraits<T, kHeadDim>;
  detail::check_shapes(params, kHeadDim);
  if (params.batch == 0 || params.heads_q == 0 || params.seqlen_q == 0) return;
  const int64_t bh = static_cast<int64_t>(params.heads_q) * params.batch;
  if constexpr (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256) {
    if (detail::use_sm90_kernels()) {
      if constexpr (kHeadDim == 256 && !kScoreMod) {
        if (detail::use_wide_key_tiles() &&
            detail::try_launch_fwd_ws<FwdSm90WsTraits<T, kHeadDim, 80>, false>(params, bh, stream))
          return;
      }
      using Kws = FwdSm90WsTraits<T, kHeadDim>;
      if constexpr (kScoreMod && Kws::kSoftcapKernel) {
        if (detail::softcap_kernel_takes(params) &&
            detail::try_launch_fwd_ws<typename Kws::SoftcapTraits, true, true>(params, bh, stream))
          return;
      }
      if (detail::try_launch_fwd_ws<Kws, kScoreMod>(params, bh, stream)) return;
      using K90 = FwdSm90Traits<T, kHeadDim>;
      const int64_t num_m = (params.seqlen_q + K90::kBlockM - 1) / K90::kBlockM;
      auto run = [&](auto overlap) {
        constexpr bool kOverlap = decltype(overlap)::value;
        detail::launch(&flash_fwd_sm90_kernel<K90, kScoreMod, kOverlap>, num_m * bh, K90::kNThreads,
                       K90::smem_bytes(kOverlap), params, stream);
      };
      if constexpr (K90::kMustOverlap || !K90::kMayOverlap) {
        return run(std::bool_constant<K90::kMustOverlap>{});
      } else {
        if (detail::fwd_overlap_pays(params, K90::kBlockN)) return run(std::true_type{});
        return run(std::false_type{});
      }
    }
  }
  const int64_t num_m = (params.seqlen_q + Kt::kBlockM - 1) / Kt::kBlockM;
  detail::launch(&flash_fwd_kernel<Kt, kScoreMod>, num_m * bh, Kt::kNThreads, Kt::kSmemBytes, params, stream);
}

}  // namespace flash_attn2::cuda
