// Warp-specialised FlashAttention backward on Hopper (sm_90a), d = 128 and 64: the default on sm_90 where the TMA
// can address the tensors (measured, perf.md v12-v15; flash_bwd_launch.cuh: FLASH_ATTN2_BWD_WS=0 turns it off,
// =1 on, =require raises where it would fall back). The algorithm and
// variants of flash_bwd_sm90_kernel (one block per key tile of 128, keys as rows, dK / dV in registers), with the
// loads moved to a producer and each step's dQ written back by the TMA: every consumer stages its 64 x 64
// float32 dQ in shared memory (swizzled boxes, double-buffered) and a writer warp issues bulk reduce-adds into
// dq_accum, which the L2 performs, instead of 128 threads' red.add per consumer (FLASH_ATTN2_BWD_WS_DQ=red, for
// A/B runs). In the deterministic mode the writer alone waits for the block's turn at each query tile
// (DqOrder), adds, and passes the turn on once the additions are complete (a step later), while the consumers
// go on:
//
//   warpgroup 0 (producer, 24 registers): thread 0 issues TMA copies of the block's K and V tiles once, then of
//     each step's Q and dO tiles into a kStages ring; warp 1 copies the step's LSE and D rows (rows past the
//     sequence's end: LSE = +inf, D = 0, so that P = 0 there whatever the Q / dO rows hold). A stage's "full"
//     barrier takes the copies' bytes and an arrival from thread 0 and from each lane of warp 1; its "empty"
//     barrier an arrival from every consumer thread once its reads of the stage are done (per thread, so that
//     each generic read of LSE / D is ordered before the next write by the barrier itself: racecheck). Warp 2's
//     first lane writes dQ back: step i's dQ buffer (i % 2) has a "full" barrier (every consumer thread arrives
//     once its part is stored) and an "empty" one (the writer arrives once the reduce-adds have read it).
//   warpgroups 1 and 2 (consumers, 240 registers): 64 keys each, the step of flash_bwd_sm90_kernel, with
//     named barriers among the 256 consumer threads where that kernel has block-wide ones (dS^T complete for
//     the dQ product; the epilogue); dS^T is double-buffered, so the next step's may be written
//     while the other consumer still reads this one.
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda/block_info.cuh"
#include "cuda/bwd_tile_io.cuh"
#include "cuda/flash_bwd_sm90_kernel.cuh"  // the step's math: probs / dscores (transposed), add_dq_tile
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

// Larger steps (the default where they run; FLASH_ATTN2_BWD_WS_BLOCKM=64 keeps 64): more work per step for the
// same per-step costs (barriers, the stage hand-over, the drain of the tensor pipe at the step's end), as
// FlashAttention-3's backward takes them (80 x 128 non-causal at d128, 128 x 128 at d64). Both keep one dQ buffer
// (two do not fit beside the larger stages), which the writer hands back as soon as its adds have read it (in
// the deterministic mode too, where the turn passes on a step later).
//   kBlockM_ = 80 (d128): wgmma's M is 64, so dQ is computed transposed (dQ^T = K^T dS^T: the head dim as M,
//     the 80 queries as N), with dS stored query-major for it.
//   kBlockM_ = 128 (d64): each consumer computes the dQ of its own 64 of the step's queries at every step
//     (kDqSplitRows), where with 64 queries the consumers took the steps' dQ in turn.
//   kLateDp_: dP^T issued after P^T (bwd_step_dk_dv; the launcher's choice on every score-modifier call of the
//     larger steps).
template <typename T, int kHeadDim_, int kBlockM_ = 64, bool kLateDp_ = false>
struct BwdSm90WsTraits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;
  static constexpr int kNThreads = (kConsumers + 1) * 128;
  static constexpr int kBlockN = 64 * kConsumers;  // keys per block, 64 per consumer
  static constexpr int kBlockM = kBlockM_;         // queries per step
  static constexpr bool kLateDp = kLateDp_;
  // A kernel of its own (flash_bwd_sm90_ws_kernel's kSoftcapOnly) for bfloat16 d128 calls whose only score
  // modifier is a softcap (windows and packed batches allowed; the launcher's softcap_bwd_kernel_takes), on the
  // larger steps with dP^T after P^T: its score loop has no ALiBi or dropout paths, so its consumers spill 64 /
  // 68 B (the score-modifier kernel: 124 / 172 B, with spill stores and reloads around the dP^T product every
  // step) and its SASS is 3610 lines against 6324. Against the score-modifier kernel, softcap 50: non-causal 2k /
  // 8k +4.4 / +6.2%, causal 2k / 8k / 16k +4.8 / +6.9 / +7.1% on an H200 (dP^T beside S^T instead: +2.9-6.5%,
  // 188 B of spills; perf.md v43). One more instantiation, so bfloat16 only, as the forward's softcap kernel.
  static constexpr bool kSoftcapKernel =
      kHeadDim == 128 && kBlockM == 80 && kLateDp && std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBlockM == 64 || (kBlockM == 80 && kHeadDim == 128) || (kBlockM == 128 && kHeadDim == 64),
                "64 queries a step, 80 at d128 or 128 at d64");
  // dQ^T = K^T dS^T (N = kBlockM queries) where kBlockM is not wgmma's M; dS then [query][key] in shared memory.
  static constexpr bool kDqTransposed = kBlockM == 80;
  static constexpr bool kDsQueryMajor = kDqTransposed;
  // The step's dQ rows split between the consumers (query rows 64 c of the step for consumer c, every step).
  static constexpr bool kDqSplitRows = kBlockM == 128;
  static constexpr int kStages = 2;
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "warp-specialised backward: d = 64 or 128");
  // dQ of a step (64 queries x d = dS K over the block's 128 keys) in 64-column chunks: at d128 each consumer
  // computes one (columns 64 c), at d64 the one chunk is computed by the consumers in turn (step i: consumer
  // i % 2), so that each does the same work over two steps and the other only signals its dS^T.
  static constexpr int kDqChunks = kHeadDim / 64;
  // At d64 the consumer without the step's dQ arrives on the dS^T barrier without waiting; two barrier ids
  // (by step parity) keep its arrivals apart, which holds while the 2-stage ring keeps it within two steps.
  static_assert(kDqChunks == kConsumers || kStages == 2, "dS^T barrier ids assume a 2-stage ring");
  static_assert(kProducerRegs * 128 + kConsumers * kConsumerRegs * 128 <= 65536, "register file");

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;   // Q and dO
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;  // K and V (later dK and dV staging)
  // dS^T as [key][query], or dS as [query][key] (kDsQueryMajor)
  using TileDS = std::conditional_t<kDsQueryMajor, SwizzledTile<kBlockM, kBlockN>, SwizzledTile<kBlockN, kBlockM>>;
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kSmemDS = TileDS::kElems * 2;
  static constexpr int kSmemStats = 2 * kBlockM * 4;  // LSE and D of one step, fp32
  static constexpr int kSmemDq = kBlockM * 64 * 4;     // a kBlockM x 64 float32 dQ chunk: two kBlockM x 32 boxes
  static constexpr int kDqBox = kBlockM * 32 * 4;      // bytes of one such box
  static constexpr int kDqBufs = kBlockM == 64 ? 2 : 1;  // dQ buffers (steps) in flight to the writer
  // Consumer threads that store into a step's dQ buffer (its "full" barrier's count): the chunks' owners, or both
  // consumers where they split the rows.
  static constexpr int kDqWriterThreads = (kDqSplitRows ? kConsumers : kDqChunks) * 128;
  static constexpr int kAlign = 1024;
  // Barriers: K/V full, per stage full and empty, per dQ buffer full and empty, per stage the peer's release (a
  // cluster of two: BwdTmaMaps::cluster).
  static constexpr int kBarriers = 1 + 2 * kStages + 2 * kDqBufs + kStages;
  // K | V | Q[kStages] | dO[kStages] | dS^T[2] | dQ[kDqBufs][kDqChunks] | stats[kStages] | barriers, plus slack
  static constexpr int kSmemBytes = 2 * kSmemKV + 2 * kStages * kSmemQ + 2 * kSmemDS +
                                    kDqBufs * kDqChunks * kSmemDq + kStages * kSmemStats + kBarriers * 8 + kAlign;
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// A key tile's last step of 80 queries whose rows from this many on see none of its keys (its row_end: the tile's
// last visible query + 1, or the sequence's end) runs its products on these rows only, a second form of the
// WS kernel's step (bwd_step_dk_dv's kN): the steps of 80 divide few lengths (2048 = 25 x 80 + 48, 4096 = 51 x 80
// + 16, 8192 = 102 x 80 + 32), and the last one's padding rows otherwise cost a full step's products. One form
// only, 48, not one per multiple of 16: products of several widths on the same accumulators made ptxas serialise
// every wgmma of the kernel (C7511), and each form is another copy of the step's code.
constexpr int kWsBwdPartialRows = 48;

// The Q, K, V and dO maps of a backward call, and the float32 map over dq_accum its dQ reduce-adds write.
struct BwdTmaMaps {
  CUtensorMap q, k, v, dout, dq;
  // 2: the grid runs in clusters of two blocks, consecutive key tiles of one head, whose steps copy the same Q and
  // dO tiles: each block copies half of each into both (q and dout then have boxes of half a step); 0: every
  // block copies its own. Set by the launcher (flash_bwd_launch.cuh) for uniform rows outside the deterministic
  // mode.
  int cluster;
};

namespace sm90 {

template <class Kt>
struct BwdWsSmem {
  unsigned char* base;  // K
  uint32_t base_u;
  FA2_DEVICE static constexpr int v_off() { return Kt::kSmemKV; }
  FA2_DEVICE static constexpr int q_off(int s) { return 2 * Kt::kSmemKV + s * Kt::kSmemQ; }
  FA2_DEVICE static constexpr int do_off(int s) { return 2 * Kt::kSmemKV + (Kt::kStages + s) * Kt::kSmemQ; }
  FA2_DEVICE static constexpr int ds_off(int b) { return 2 * Kt::kSmemKV + 2 * Kt::kStages * Kt::kSmemQ + b * Kt::kSmemDS; }
  FA2_DEVICE static constexpr int dq_off(int b, int c) { return ds_off(2) + (b * Kt::kDqChunks + c) * Kt::kSmemDq; }
  FA2_DEVICE static constexpr int stats_off(int s) { return dq_off(Kt::kDqBufs, 0) + s * Kt::kSmemStats; }
  FA2_DEVICE uint64_t* bar(int i) const {
    return reinterpret_cast<uint64_t*>(base + stats_off(Kt::kStages)) + i;
  }
  FA2_DEVICE uint64_t* kv_full() const { return bar(0); }
  FA2_DEVICE uint64_t* full(int s) const { return bar(1 + s); }
  FA2_DEVICE uint64_t* empty(int s) const { return bar(1 + Kt::kStages + s); }
  FA2_DEVICE uint64_t* dq_full(int b) const { return bar(1 + 2 * Kt::kStages + b); }
  FA2_DEVICE uint64_t* dq_empty(int b) const { return bar(1 + 2 * Kt::kStages + Kt::kDqBufs + b); }
  // A cluster's: the peer block's producer arrives once its own consumers have released stage s.
  FA2_DEVICE uint64_t* peer_free(int s) const { return bar(1 + 2 * Kt::kStages + 2 * Kt::kDqBufs + s); }
  FA2_DEVICE float* stats(int s) const { return reinterpret_cast<float*>(base + stats_off(s)); }
};

// A warpgroup's 64 x 64 float32 dQ accumulators (rows 16 (warp % 4) + g + 8 h, columns 8 ni + 2 t) into the
// two 64 x 32 boxes at dst as the TMA reads them with the 128-byte swizzle: row r, column c of box b at byte
// b * 8192 + r * 128 + ((c / 4) ^ (r % 8)) * 16 + (c % 4) * 4. A warp's stores spread over every bank.
// Row r = 16 (warp % 4) + g + 8 h has r % 8 = g, and column c = 8 (ni % 4) + 2 t has c / 4 = 2 (ni % 4) + t / 2.
// The per-thread part is made opaque to the compiler, so that it recomputes the few offsets at each call rather
// than keeping sixteen of them live across the backward's loop (which spilled). kBoxBytes: the boxes' size where
// they hold more rows than the warpgroup's 64 (dst then points at its first row inside the first box).
// kFirstBox, kBoxes: only boxes [kFirstBox, kFirstBox + kBoxes) (columns 32 kFirstBox on), the first at dst.
template <int kBoxBytes = 8192, int kFirstBox = 0, int kBoxes = 2>
FA2_DEVICE void store_dq_boxes(unsigned char* dst, const float (&acc)[1][8][4], int warp, int g, int t) {
  static_assert(kFirstBox >= 0 && kBoxes >= 1 && kFirstBox + kBoxes <= 2, "a 64 x 64 chunk has two boxes");
  int base = (16 * (warp % 4) + g) * 128 + (t & 1) * 8, x = g, t2 = t >> 1;
  asm volatile("" : "+r"(base), "+r"(x), "+r"(t2));
#pragma unroll
  for (int ni = 4 * kFirstBox; ni < 4 * (kFirstBox + kBoxes); ++ni)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int byte = base + (ni / 4 - kFirstBox) * kBoxBytes + h * 1024 + (((2 * (ni % 4) + t2) ^ x) << 4);
      *reinterpret_cast<float2*>(dst + byte) = make_float2(acc[0][ni][2 * h], acc[0][ni][2 * h + 1]);
    }
}

// The transposed form (kDqTransposed): a warpgroup's dQ^T accumulators, 64 head-dim columns of the chunk as rows
// (16 (warp % 4) + g + 8 h) by kBlockM queries (8 ni + 2 t + e), into the same two kBlockM x 32 boxes, where the
// element of query q, column c lies at byte (c / 32) * kBlockM * 128 + q * 128 + ((c % 32 / 4) ^ (q % 8)) * 16 +
// (c % 4) * 4. A warp's columns lie in one box; for each register its lanes cover 4 queries x 8 columns, whose
// 16-byte chunks are 8 distinct ones of 8 rows with distinct swizzles: every bank once. Accumulators of the first
// 8 kNT queries only (a partial step's): zeros for the others.
template <int kBlockM, int kNT>
FA2_DEVICE void store_dq_boxes_transposed(unsigned char* dst, const float (&acc)[1][kNT][4], int warp, int g,
                                          int t) {
  static_assert(kNT <= kBlockM / 8, "at most the step's queries");
  unsigned char* box = dst + ((warp % 4) / 2) * (kBlockM * 128);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = 16 * (warp % 2) + g + 8 * h;  // column within the box
#pragma unroll
    for (int ni = 0; ni < kBlockM / 8; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int q = 8 * ni + 2 * t + e;
        *reinterpret_cast<float*>(box + q * 128 + (((c / 4) ^ (q % 8)) << 4) + (c % 4) * 4) =
            ni < kNT ? acc[0][ni < kNT ? ni : 0][2 * h + e] : 0.f;
      }
  }
}

}  // namespace sm90

// kSoftcapOnly: the softcap kernel (Kt::kSoftcapKernel; kScoreMod too): a softcap and no other score modifier.
template <class Kt, bool kScoreMod, bool kSoftcapOnly = false>
__global__ void __launch_bounds__(Kt::kNThreads, 1)
    flash_bwd_sm90_ws_kernel(const __grid_constant__ BwdParams p, const __grid_constant__ BwdTmaMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using TileKV = typename Kt::TileKV;
  using TileDS = typename Kt::TileDS;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kStages = Kt::kStages;

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  const BwdWsSmem<Kt> sm{aligned.ptr, aligned.addr};
  const int tid = static_cast<int>(threadIdx.x);
  // The warpgroup index, broadcast from lane 0 (CUTLASS's canonical_warp_group_idx) so that ptxas knows it is
  // warp-uniform: computed from threadIdx.x, the d64 consumers' `if (dq_mine)` around the dQ wgmma (every
  // other step) looked divergent, and ptxas serialised every wgmma of the kernel (warning C7520).
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);

  // The larger-step kernels have no red.add path: the launcher never sends them those calls.
  if constexpr (Kt::kBlockM != 64) {
    if (p.dq_red_add) __trap();
  }
  const BwdBlockInfo<kBlockN> blk(p);
  if (blk.keys <= 0) return;  // varlen: past the end of this sequence
  const Visibility<int> vis = blk.seq.visibility(p);
  const BwdSteps<kBlockM> steps(p, blk, vis);

  if (tid == 0) {
    if (p.ws_prefetch_maps) {  // the first copies' descriptors load under the barrier set-up
      tma::prefetch_map(&maps.k);
      tma::prefetch_map(&maps.v);
      tma::prefetch_map(&maps.q);
      tma::prefetch_map(&maps.dout);
      tma::prefetch_map(&maps.dq);
    }
    tma::init_barrier(sm.kv_full(), 1);
    for (int s = 0; s < kStages; ++s) {
      tma::init_barrier(sm.full(s), 1 + 32);              // the copies' thread and each lane of the LSE / D warp
      tma::init_barrier(sm.empty(s), Kt::kConsumers * 128);  // every consumer thread
    }
    for (int b = 0; b < Kt::kDqBufs; ++b) {
      tma::init_barrier(sm.dq_full(b), Kt::kDqWriterThreads);  // every thread of the step's dQ, its part stored
      tma::init_barrier(sm.dq_empty(b), 1);                    // the writer, once the reduce-adds read it
    }
    for (int s = 0; s < kStages; ++s) tma::init_barrier(sm.peer_free(s), 1);  // the peer's producer thread
    tma::fence_barrier_init();
  }
  // The last block-wide barrier. In a cluster, across both blocks: each block's barriers are initialised before
  // the other's copies and arrivals reach them.
  const bool cluster = maps.cluster == 2;
  if (cluster) tma::cluster_sync();
  else __syncthreads();

  if (wg == 0) {
    tma::shrink_registers<Kt::kProducerRegs>();
    // Packed batches: one (d, T, H, 1) map over all sequences (batch coordinate 0), rows offset by the
    // sequence's start; rows past its end hold the next sequence's rows, made harmless by LSE = +inf (P = 0).
    const int map_b = p.cu_seqlens_q != nullptr ? 0 : blk.batch;
    if (tid == 0) {
      tma::arrive_expect_bytes(sm.kv_full(), 2 * Kt::kSmemKV);
      const int key = blk.seq.k_start + blk.key0;
      tma::load_tile<kBlockN, kHeadDim>(sm.base, &maps.k, key, blk.head_kv, map_b, sm.kv_full());
      tma::load_tile<kBlockN, kHeadDim>(sm.base + sm.v_off(), &maps.v, key, blk.head_kv, map_b, sm.kv_full());
      // A cluster of two (maps.cluster): both blocks walk the same steps (the same query rows and heads), and
      // each copies half of every Q and dO tile into both. A stage is refilled once both blocks' consumers have
      // released it: this block's (its empty barrier), then the peer's, whose producer arrives on this block's
      // peer_free barrier as this one does on the peer's. Every such arrival is awaited by the block it reaches
      // (and every copy into a block by its consumers), so neither block leaves while the other still signals it.
      const uint32_t rank = cluster ? tma::cluster_rank() : 0u;
      const uint32_t peer_base = cluster ? tma::map_to_rank(sm.base_u, rank ^ 1u) : 0u;
      for (int it = 0; it < steps.total; ++it) {
        const int s = it % kStages;
        if (it >= kStages) {
          tma::wait(sm.empty(s), ((it / kStages) - 1) & 1);
          if (cluster) {
            tma::arrive_remote(peer_base + static_cast<uint32_t>(
                                               reinterpret_cast<unsigned char*>(sm.peer_free(s)) - sm.base),
                               true);
            tma::wait(sm.peer_free(s), ((it / kStages) - 1) & 1);
          }
        }
        const int head = steps.head(it, blk.head_kv), row = blk.seq.q_start + steps.row0(it);
        tma::arrive_expect_bytes(sm.full(s), 2 * Kt::kSmemQ);
        if (cluster) {
          tma::load_tile_part_multicast<kBlockM, kHeadDim, 2>(sm.base + sm.q_off(s), &maps.q, row,
                                                              static_cast<int>(rank), head, map_b, sm.full(s),
                                                              uint16_t{0b11});
          tma::load_tile_part_multicast<kBlockM, kHeadDim, 2>(sm.base + sm.do_off(s), &maps.dout, row,
                                                              static_cast<int>(rank), head, map_b, sm.full(s),
                                                              uint16_t{0b11});
        } else {
          tma::load_tile<kBlockM, kHeadDim>(sm.base + sm.q_off(s), &maps.q, row, head, map_b, sm.full(s));
          tma::load_tile<kBlockM, kHeadDim>(sm.base + sm.do_off(s), &maps.dout, row, head, map_b, sm.full(s));
        }
      }
    } else if (tid / 32 == 1) {
      const int lane = tid % 32;
      for (int it = 0; it < steps.total; ++it) {
        const int s = it % kStages;
        if (it >= kStages) tma::wait(sm.empty(s), ((it / kStages) - 1) & 1);
        const int head = steps.head(it, blk.head_kv), row0 = steps.row0(it);
        float* st = sm.stats(s);
        for (int r = lane; r < kBlockM; r += 32) {
          const bool ok = row0 + r < blk.seq.seqlen_q;
          const index_t idx = blk.seq.stat_index(p, blk.batch, head, row0 + r);
          st[r] = ok ? p.lse_log2[idx] : INFINITY;
          st[kBlockM + r] = ok ? p.softmax_d[idx] : 0.f;
        }
        tma::arrive(sm.full(s));  // each lane releases its own stores to the waiters
      }
    } else if (tid == 64 && !p.dq_red_add) {
      // The dQ writer: each step's dQ chunks (64 queries x d) as bulk reduce-adds. In the deterministic mode they
      // go in the block's turn, and the turn passes on once they are complete: a step late, after the next step's
      // adds are issued, so that the writer does not wait out every step's round trip to memory (in that mode the
      // blocks running together add into different query tiles, and the adds miss L2). The chain of waits still
      // runs to later key tiles only (DqOrder), as with DqOrderChain.
      const bool deterministic = p.dq_semaphore != nullptr;
      DqOrder pending{nullptr, 0};  // the last step's turn, passed on once its adds are complete
      int pending_buf = -1;         // >= 0 while a turn is pending
      for (int it = 0; it < steps.total; ++it) {
        const int b = it % Kt::kDqBufs;
        const int head = steps.head(it, blk.head_kv), row0 = steps.row0(it);
        const DqOrder order = DqOrder::make<kBlockM>(p, blk, vis, head, row0);
        const int row = static_cast<int>(blk.seq.stat_index(p, blk.batch, head, row0));
        tma::wait(sm.dq_full(b), (it / Kt::kDqBufs) & 1);
        if (deterministic) {
          // Rotated (BwdParams::dq_rotate), the last step's turn passes on before this one is waited for: taking
          // this turn first and then passing the last one on, as below, makes a cycle of waits wherever a head
          // has no more query tiles than key tiles (cpp_tests/test_attention_rule.cpp simulates both).
          if (p.dq_rotate && pending_buf >= 0) {
            tma::bulk_wait<0>();  // its adds had this step's products to drain under
            tma::fence_proxy_async_global();
            pending.pass_turn();
            pending_buf = -1;
          }
          order.wait_turn();
          tma::fence_proxy_async_global();  // the turn's acquire before this thread's reduce-adds
        }
        for (int c = 0; c < Kt::kDqChunks; ++c) {
          const unsigned char* src = sm.base + sm.dq_off(b, c);
          tma::reduce_add_box(&maps.dq, src, 64 * c, row);
          tma::reduce_add_box(&maps.dq, src + Kt::kDqBox, 64 * c + 32, row);
        }
        tma::bulk_commit();
        if (deterministic) {
          // The buffer goes back once the adds have read it (the larger steps have one); the turn passes later.
          tma::bulk_wait_read<0>();
          tma::arrive(sm.dq_empty(b));
          // Unrotated: the last step's adds are done in global memory (this step's may run on) ...
          if (!p.dq_rotate) tma::bulk_wait<1>();
          if (pending_buf >= 0) {
            tma::fence_proxy_async_global();  // ... and ordered before the release that passes its turn on
            pending.pass_turn();
          }
          pending = order;
          pending_buf = b;
        } else {
          tma::bulk_wait_read<0>();
          tma::arrive(sm.dq_empty(b));
        }
      }
      tma::bulk_wait<0>();
      if (pending_buf >= 0) {
        tma::fence_proxy_async_global();
        pending.pass_turn();
      }
    }
  } else {
    tma::grow_registers<Kt::kConsumerRegs>();
    const int c = wg - 1, ctid = tid - 128;
    const int lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    T* sK = reinterpret_cast<T*>(sm.base);
    T* sV = reinterpret_cast<T*>(sm.base + sm.v_off());
    const uint32_t sK_u = sm.base_u, sV_u = sm.base_u + sm.v_off();
    constexpr int kNT_KV = kHeadDim / 8;   // n8 tiles of dK / dV (64 keys x d)
    // Named barriers: kBarDs + step parity (dS^T, both consumers), kBarEpilogue (both), kBarEpilogue + 1 + c (one)
    constexpr int kBarDs = 1, kBarEpilogue = 3;
    // This consumer's dQ chunk: at d128 columns 64 c at every step, at d64 all columns at every other step, or
    // with 128 queries a step (kDqSplitRows) all columns of the step's query rows 64 c at every step.
    constexpr bool kDqEveryStep = Kt::kDqChunks == Kt::kConsumers || Kt::kDqSplitRows;
    const int dq_chunk = Kt::kDqChunks == Kt::kConsumers ? c : 0, dq_col0 = 64 * dq_chunk;
    const int dq_rows = Kt::kDqSplitRows ? c : 0;  // column block of dS^T (64 queries) this consumer's dQ takes
    const int wg_row0 = 64 * c + 16 * (warp % 4);  // first block-local key row of this warp's accumulators
    float acc_dk[1][kNT_KV][4], acc_dv[1][kNT_KV][4];
    zero_acc(acc_dk);
    zero_acc(acc_dv);
    tma::wait(sm.kv_full(), 0);

    // dK is issued after the dQ product, so that the step's dQ is stored for the writer while the tensor cores work
    // on dK (FlashAttention-4's order, read in its SASS), not beside dV with dQ stored after waiting for all three,
    // the tensor cores then idle: 1.04-1.07x on the d128 backward (GQA 1.06-1.10x, varlen 1.07x, perf.md v29), and
    // since v40 on the d64 plain kernels too, 1.02-1.04x (level there in v29, before v39's shorter d64 loop).
    BwdProbe probe(p, c, ctid % 128 == 0), whole(p, c, ctid % 128 == 0);  // no-ops unless FLASH_ATTN2_BWD_TIMELINE
    for (int it = 0; it < steps.total; ++it) {
      const int s = it % kStages;
      const int head = steps.head(it, blk.head_kv);
      const int row0 = steps.row0(it);
      const uint32_t sQ_s = sm.base_u + sm.q_off(s), sdO_s = sm.base_u + sm.do_off(s);
      T* sdS = reinterpret_cast<T*>(sm.base + sm.ds_off(it & 1));
      const uint32_t sdS_u = sm.base_u + sm.ds_off(it & 1);
      probe.mark(BwdProbe::kDkWait);  // (the loop's own arithmetic between steps)
      tma::wait(sm.full(s), (it / kStages) & 1);
      probe.mark(BwdProbe::kFullWait);
      probe.add(BwdProbe::kSteps, 1);

      // The step's products on its first kN queries: all kBlockM of them, or, on a key tile's last step of 80
      // whose rows from kWsBwdPartialRows on see none of its keys, those rows only (the tile's other steps and
      // the shared-memory layout unchanged; FLASH_ATTN2_BWD_PARTIAL_STEP=0 runs every step on 80).
      auto step = [&](auto kn) {
        constexpr int kN = decltype(kn)::value;
        // S^T, dP^T, P^T, dS^T (to shared memory for dQ); dV issued (dK after the dQ product).
        constexpr int kKSteps = kN / 16;  // k16 steps of dV / dK (over queries)
        uint32_t p_frag[1][kKSteps][4], ds_frag[1][kKSteps][4];
        bwd_step_dk_dv<Kt, kScoreMod, false, kSoftcapOnly, kN>(p, blk, vis, head, row0, c, warp, lane, sK_u, sV_u,
                                                               sQ_s, sdO_s, sm.stats(s), sdS, acc_dk, acc_dv, p_frag,
                                                               ds_frag, &probe);

        // dQ chunk (64 queries x 64 columns) = dS K over the block's 128 keys, by the consumers whose step it is;
        // with 80 queries a step, its transpose (64 columns x 80 queries) = K^T dS^T (kDqTransposed).
        const bool dq_mine = kDqEveryStep || it % Kt::kConsumers == c;
        fence_proxy_async_smem();
        if (dq_mine) tma::named_sync(kBarDs + (it & 1), 256);  // both consumers' dS^T are in shared memory
        else tma::named_arrive(kBarDs + (it & 1), 256);        // this one's is
        probe.mark(BwdProbe::kDsBarrier);
        float acc_dq[1][Kt::kDqTransposed ? kN / 8 : 8][4];
        if (dq_mine) {
#pragma unroll
          for (int ks = 0; ks < kBlockN / 16; ++ks) {
            if constexpr (Kt::kDqTransposed) {  // A = K^T (MN-major: K's rows are the k dim), B = dS (K-major)
              WgmmaOp<T, kN>::template ss<1, 0>(flat(acc_dq), desc_mn_major<TileKV>(sK_u, dq_chunk, ks),
                                                desc_k_major<TileDS>(sdS_u, 0, ks), ks > 0);
            } else {
              WgmmaOp<T, 64>::template ss<1, 1>(flat(acc_dq), desc_mn_major<TileDS>(sdS_u, dq_rows, ks),
                                                desc_mn_major<TileKV>(sK_u, dq_chunk, ks), ks > 0);
            }
          }
          wgmma_commit();
        }
        probe.mark(BwdProbe::kIssueDq);
        issue_dk<Kt, kN>(acc_dk, ds_frag, sQ_s);
        wgmma_commit();
        probe.mark(BwdProbe::kIssueDk);
        wgmma_wait<1>();  // dV and dQ done; dK may still run
        fence_regs(acc_dq);
        fence_regs(acc_dv);
        fence_regs(p_frag);
        probe.mark(BwdProbe::kDqWait);

        if (!dq_mine) {
          // no dQ this step
        } else if (!p.dq_red_add) {
          // dQ to this step's buffer (once the writer's reduce-adds of two steps ago have read it), for the writer.
          // Rows past the sequence's end add exact zeros (P = 0 there, LSE = +inf) to the rows that follow; rows
          // past the array are clipped.
          const int b = it % Kt::kDqBufs;
          if (it >= Kt::kDqBufs) tma::wait(sm.dq_empty(b), ((it / Kt::kDqBufs) - 1) & 1);
          probe.mark(BwdProbe::kDqBufWait);
          if constexpr (Kt::kDqTransposed) {
            // (zeros for the queries past kN: the writer adds the whole box)
            store_dq_boxes_transposed<kBlockM>(sm.base + sm.dq_off(b, dq_chunk), acc_dq, warp, g, t);
          } else {  // (split rows: this consumer's 64 rows start 64 dq_rows rows into each box)
            store_dq_boxes<Kt::kDqBox>(sm.base + sm.dq_off(b, dq_chunk) + dq_rows * 64 * 128, acc_dq, warp, g, t);
          }
          fence_proxy_async_smem();  // the stores before the writer's bulk reads
          tma::arrive(sm.dq_full(b));
        } else if constexpr (kBlockM == 64) {  // FLASH_ATTN2_BWD_WS_DQ=red (never deterministic, nor larger steps)
          add_dq_tile(p, blk.seq, acc_dq, blk.batch, head, row0, 0, dq_col0, warp, g, t,
                      row0 + kBlockM <= blk.seq.seqlen_q && p.head_dim == kHeadDim);
        }
        probe.mark(BwdProbe::kDqStore);
        // dK's registers and the stage are released once dK is done, after the dQ store.
        wgmma_wait<0>();
        fence_regs(acc_dk);
        fence_regs(ds_frag);       // the A fragments stay untouched until the MMAs reading them are done
        tma::arrive(sm.empty(s));  // this thread is done with the stage's Q, dO, LSE and D
      };
      // (not in the kernel with every score modifier: its second form took its spills from 124 / 172 to 164 / 268
      // bytes; the plain and softcap-only kernels' moved by -4 / -8 and +4 / +16)
      if constexpr (Kt::kDqTransposed && (!kScoreMod || kSoftcapOnly)) {
        if (p.partial_steps && steps.row_end - row0 <= kWsBwdPartialRows) {
          step(std::integral_constant<int, kWsBwdPartialRows>{});
          continue;
        }
      }
      step(std::integral_constant<int, kBlockM>{});
    }
    probe.mark(BwdProbe::kDkWait);
    whole.mark(BwdProbe::kTotal);

    // Epilogue: dK * scale and dV as T through the K / V buffers, once both consumers are done reading them
    // (the dQ product reads every key row), each consumer into its own 64 rows, which it then copies out itself
    // behind a barrier of its own four warps. (With both consumers copying all 128 rows behind a second
    // 256-thread barrier, racecheck reported the stores and the copy-out as racing in the d64 kernel: session 20;
    // the d256 kernel's epilogue met the same report and the same cure, perf.md v17.)
    tma::named_sync(kBarEpilogue, 256);
    store_acc<T, TileKV>(sK, acc_dk, wg_row0, 0, lane, p.scale);
    store_acc<T, TileKV>(sV, acc_dv, wg_row0, 0, lane, dropout_scale(p, kScoreMod));
    tma::named_sync(kBarEpilogue + 1 + c, 128);
    store_dk_or_dv_rows<TileKV, 64, 128>(p, blk, true, sK, 64 * c, ctid - 128 * c);
    store_dk_or_dv_rows<TileKV, 64, 128>(p, blk, false, sV, 64 * c, ctid - 128 * c);
  }
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
