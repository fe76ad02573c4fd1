// Tile shapes per compiled head dim, in one table, and the derived per-kernel constants.
#pragma once

#include "cuda/smem_tile.cuh"

namespace flash_attn2::cuda {

struct TileConfig {
  int head_dim;
  // Forward: block_m query rows x block_n keys per step, warps split the query rows.
  int fwd_m, fwd_n, fwd_warps;
  // Backward main kernel: block_n keys per thread block, block_m query rows per step.
  //   S/dP (block_m x block_n) are computed by a bwd_sdp_wm x (warps/bwd_sdp_wm) warp grid;
  //   dK/dV (block_n x d) by a bwd_dkv_wn x (warps/bwd_dkv_wn) grid; dQ (block_m x d) by bwd_dq_wm x rest.
  //   bwd_stages = 2 double-buffers Q/dO (prefetch the next query tile during the current one).
  //   bwd_d_in_acc = 1 starts the dP accumulator at -D (so it ends as dP - D) instead of keeping D live during
  //   the dP GEMM and subtracting afterwards.
  //   bwd_addr_in_loop: a mask of the GEMMs (1 S, 2 dP, 4 dV, 8 dK, 16 dQ; 31 all) whose warp fragment addresses
  //   are rebuilt inside the query-tile loop instead of being kept live across it by the compiler: a few
  //   integer ops per GEMM for up to ~20 free registers, which is what lets the larger-reuse warp grids fit in
  //   255 registers.
  //   The last two are register-allocation choices, picked per head dim from ptxas -v (spills) and timings;
  //   they do not change the results beyond fp32 rounding order.
  int bwd_m, bwd_n, bwd_warps, bwd_dkv_wn, bwd_dq_wm, bwd_stages, bwd_sdp_wm, bwd_d_in_acc, bwd_addr_in_loop;
};

// Starting point: FlashAttention-2's sm80/sm90 choices (flash_fwd_launch_template.h /
// flash_bwd_launch_template.h; backward: the >= 144 KB shared-memory variants). The d64 and d128 backward rows
// were then picked by timing variants on an H100 (scripts/tile_sweep.sh, docs/perf.md v3).
//                                     d   fwd M   N  W   bwd M   N  W dKV dQ stages S/dP Dacc Addr
inline constexpr TileConfig kTileTable[] = {{32, 128, 128, 4, 128, 128, 8, 8, 8, 2, 4, 1, 0},
                                             {64, 128, 128, 4, 128, 128, 8, 4, 4, 2, 2, 1, 3},
                                             {96, 128, 64, 4, 64, 128, 8, 8, 4, 2, 4, 1, 0},
                                             {128, 128, 64, 4, 64, 128, 8, 4, 2, 2, 2, 0, 28},
                                             {160, 128, 32, 4, 64, 64, 8, 4, 4, 2, 4, 1, 0},
                                             {192, 128, 64, 8, 64, 64, 8, 2, 2, 2, 4, 1, 0},
                                             {224, 128, 64, 8, 64, 64, 8, 4, 4, 1, 4, 1, 0},
                                             {256, 128, 64, 8, 64, 64, 8, 2, 2, 1, 4, 0, 31}};

// Backward fallbacks for GPUs whose per-block shared memory opt-in is below the main table's backward
// footprint (e.g. sm86 / sm89: 99 KB): FlashAttention-2's < 144 KB choices. Forward columns are unused here.
inline constexpr TileConfig kTileTableLowSmem[] = {{64, 128, 64, 4, 64, 128, 8, 4, 4, 2, 4, 1, 0}};

constexpr TileConfig tile_config(int head_dim, bool low_smem = false) {
  if (low_smem)
    for (const TileConfig& c : kTileTableLowSmem)
      if (c.head_dim == head_dim) return c;
  for (const TileConfig& c : kTileTable)
    if (c.head_dim == head_dim) return c;
  return TileConfig{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
}

template <typename T, int kHeadDim_>
struct FwdTraits {
  static constexpr TileConfig kCfg = tile_config(kHeadDim_);
  static_assert(kCfg.head_dim == kHeadDim_, "no tile configuration for this head dim");
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kCfg.fwd_m;
  static constexpr int kBlockN = kCfg.fwd_n;
  static constexpr int kNWarps = kCfg.fwd_warps;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kWarpRows = kBlockM / kNWarps;  // query rows owned by one warp
  static constexpr int kMT = kWarpRows / 16;           // m16 tiles per warp
  static constexpr int kNT_S = kBlockN / 8;            // n8 tiles of S per warp
  static constexpr int kNT_O = kHeadDim / 8;           // n8 tiles of O per warp
  static constexpr int kKS_QK = kHeadDim / 16;         // k16 steps of Q K^T
  static constexpr int kKS_PV = kBlockN / 16;          // k16 steps of P V
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 16 == 0);

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;  // also stages O for the output store
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kSmemBytes = kSmemQ + 2 * kSmemKV;  // Q | K | V
};

template <typename T, int kHeadDim_, bool kLowSmem = false>
struct BwdTraits {
  static constexpr TileConfig kCfg = tile_config(kHeadDim_, kLowSmem);
  static_assert(kCfg.head_dim == kHeadDim_, "no tile configuration for this head dim");
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kCfg.bwd_m;
  static constexpr int kBlockN = kCfg.bwd_n;
  static constexpr int kNWarps = kCfg.bwd_warps;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kStages = kCfg.bwd_stages;
  static constexpr bool kDInAcc = kCfg.bwd_d_in_acc != 0;
  static constexpr int kAddrInLoop = kCfg.bwd_addr_in_loop;
  static constexpr int kGemmS = 1, kGemmDP = 2, kGemmDV = 4, kGemmDK = 8, kGemmDQ = 16;

  // S = Q K^T and dP = dO V^T: warp grid kWM_S x kWN_S over (block_m, block_n).
  static constexpr int kWM_S = kCfg.bwd_sdp_wm;
  static constexpr int kWN_S = kNWarps / kWM_S;
  static constexpr int kMT_S = kBlockM / kWM_S / 16;
  static constexpr int kNT_S = kBlockN / kWN_S / 8;
  // dV = P^T dO and dK = dS^T Q: warp grid over (block_n, d).
  static constexpr int kWN_KV = kCfg.bwd_dkv_wn;
  static constexpr int kWD_KV = kNWarps / kWN_KV;
  static constexpr int kMT_KV = kBlockN / kWN_KV / 16;
  static constexpr int kNT_KV = kHeadDim / kWD_KV / 8;
  // dQ = dS K: warp grid over (block_m, d).
  static constexpr int kWM_Q = kCfg.bwd_dq_wm;
  static constexpr int kWD_Q = kNWarps / kWM_Q;
  static constexpr int kMT_Q = kBlockM / kWM_Q / 16;
  static constexpr int kNT_Q = kHeadDim / kWD_Q / 8;

  static_assert(kMT_S * kWM_S * 16 == kBlockM && kNT_S * kWN_S * 8 == kBlockN && kNT_S % 2 == 0);
  static_assert(kMT_KV * kWN_KV * 16 == kBlockN && kNT_KV * kWD_KV * 8 == kHeadDim && kNT_KV % 2 == 0);
  static_assert(kMT_Q * kWM_Q * 16 == kBlockM && kNT_Q * kWD_Q * 8 == kHeadDim && kNT_Q % 2 == 0);

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;   // Q and dO
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;  // K and V (later dK and dV staging)
  using TileP = SwizzledTile<kBlockM, kBlockN>;    // P and dS
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kSmemP = TileP::kElems * 2;
  static constexpr int kSmemRowStats = 2 * kBlockM * 4;  // LSE and D of one query tile, fp32
  // K | V | Q[stages] | dO[stages] | P | dS | (LSE, D)[stages]
  static constexpr int kSmemBytes = 2 * kSmemKV + 2 * kStages * kSmemQ + 2 * kSmemP + kStages * kSmemRowStats;
};

}  // namespace flash_attn2::cuda
