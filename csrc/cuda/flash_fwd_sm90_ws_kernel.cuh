// Warp-specialised FlashAttention forward on Hopper (sm_90a), d = 64, 128 and 256: the default forward on
// sm_90 where its traits say it pays (kDefaultMinKeyTiles) and the TMA can address the tensors (flash_fwd_launch.cuh;
// FLASH_ATTN2_FWD_WS=0 / 1 / require override). The same algorithm and variants as flash_fwd_sm90_kernel's
// overlapped loop, with the loads moved to a producer.
//
//   warpgroup 0 (producer, 24 registers): one thread issues TMA copies of the Q tile and of K_j / V_j into a
//     2-stage ring; each stage has a "full" barrier (the copy's bytes landed) and an "empty" barrier (every
//     consumer is done reading it).
//   warpgroups 1 .. kConsumers (consumers, 240 registers for two, 160 for three): 64 query rows each, the
//     overlapped loop of the main Hopper forward (S_j = Q K_j^T issued together with O += P_{j+1} V_{j+1}; the
//     softmax of S_j runs while the second product does), waiting on the full barriers and releasing stages as
//     their products complete. No barrier spans the block after the prologue.
//
// The consumers take turns issuing their MMAs (ping-pong), so one's softmax runs under another's MMAs.
// Clusters of two on uniform rows (d128 without score modifiers, FwdSm90WsTraits::may_cluster): the two
// blocks walk consecutive query tiles of one head, tile for tile, and each copies half of every K / V tile into
// both (TMA multicast); a stage's empty barrier then waits for both blocks' consumers.
// Persistent where tiles are uniform: a grid of at most one block per SM walks the tiles (see the kernel and
// flash_fwd_launch.cuh); where tiles differ in cost, a dynamic walk (TileWalk) at d64 / d128 and one block per tile
// at d256 (FLASH_ATTN2_FWD_WS_WALK=dynamic / tile override). On the static stride of the d128 kernel without score
// modifiers, the last full round and the partial one are shared out by key tiles (StreamKTail), a split tile
// finished by whichever of its two pieces ends second. Where blocks walk tiles and shared memory has room
// (d128, 128-key tiles), two Q buffers: tile k's Q in buffer k % 2, copied while tile k - 1 still computes.
// O by the TMA from a buffer of its own where shared memory has room (d64, d128; FwdSm90WsTraits::kSmemO).
#pragma once

#include <algorithm>
#include <cmath>
#include <cuda/atomic>
#include <type_traits>

#include "cuda/block_info.cuh"
#include "cuda/cycle_probe.cuh"
#include "cuda/flash_fwd_kernel.cuh"  // FwdBlockIO, store_empty_rows
#include "cuda/flash_params.h"
#include "cuda/mask.cuh"
#include "cuda/smem_tile.cuh"
#include "cuda/softmax.cuh"
#include "cuda/tile_primitives.cuh"
#include "cuda/tma.cuh"
#include "cuda/warp_mma.cuh"
#include "cuda/wgmma.cuh"

namespace flash_attn2::cuda {

// kBlockN_: the key tile. 128 at d64 / d128 and 64 at d256 (O alone is 128 registers per thread) by default;
// d256 also has an 80-key kernel (every row) for the kernels without score modifiers, FlashAttention-3's tile
// (flash_fwd_launch.cuh, use_wide_key_tiles).
// kConsumers_: consumer warpgroups, 64 query rows each: three at d64 (FlashAttention-3's 192-row tile: two leave
// the tensor cores idle while both run their softmax), two above (O needs the registers), and three on 64-key
// tiles in the d128 softcap kernel (SoftcapTraits; the d256 one keeps two, on 80-key tiles).
template <typename T, int kHeadDim_, int kBlockN_ = (kHeadDim_ <= 128 ? 128 : 64),
          int kConsumers_ = (kHeadDim_ == 64 ? 3 : 2)>
struct FwdSm90WsTraits {
  using Elem = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = kConsumers_;
  static constexpr int kNThreads = (kConsumers + 1) * 128;  // + the producer warpgroup
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = kBlockN_;
  static_assert(kBlockN == (kHeadDim <= 128 ? 128 : 64) || (kHeadDim == 256 && kBlockN == 80) ||
                    (kHeadDim == 128 && kBlockN == 64),
                "warp-specialised forward: key tiles of 128 (d64, d128), 64 or 80 (d256), 64 (d128 softcap kernel)");
  static constexpr int kPvN = kHeadDim <= 128 ? kHeadDim : 128;  // O += P V in column slices of kPvN
  // Q's A fragments in registers: each consumer loads its 64 rows once a tile (ldmatrix) and takes S = Q K^T in
  // wgmma's register-A form, so the S product reads only K from shared memory (a third fewer operand bytes a key
  // tile, at the 690 W cap an energy saving). d128 on two consumers (32 registers a thread): the plain kernel
  // without score modifiers (its loop 731 -> 716 instructions, spills 92 -> 68 B outside it; non-causal and causal
  // 2k-16k +0.8-1.6% on average over two to five readings, GQA 4k +0.5%, packed 4k +1.0%, perf.md v45). Not the
  // score-modifier kernel (its loop's spill operations 24 -> 18, yet ALiBi 0.98-1.00x, dropout 0.87-0.91x), nor
  // the three-consumer kernels (d64, the d128 softcap kernel: 160 registers, ptxas serialised their wgmma), nor
  // d256 (O alone is 128 registers).
  static constexpr bool q_in_registers(bool score_mod) { return kHeadDim == 128 && kConsumers == 2 && !score_mod; }
  static constexpr int kStages = 2;
  // The default where query rows see at least this many key tiles on average (perf.md v11): at d64 blocks of
  // short loops are slower than flash_fwd_sm90_kernel's, whose two blocks per SM hide each other's prologue and
  // epilogue (non-causal 1k, 8 tiles: 0.97x; 1.5k, 12: 1.01x). Causal rows had a threshold of 32 (0.98x at causal
  // N = 4k in v11); since v31's softmax tree the WS kernel measures 0.97-0.98x at causal 2k / 2.5k (9-11 tiles)
  // and 1.05-1.14x from causal 3k (13 tiles) to 6k, 1.09x packed causal at 8k (perf.md v32): 12 both ways. Since
  // v34's walk claims its next tile late, dense causal rows without score modifiers gain a little from 8 tiles
  // (over four calls with a noise floor of 2-3%: causal 2k +1.7% on average, -1.4 to +3.6%; 2.5k +1.5%; GQA 2k
  // +2.0 / +4.6%), while causal 1k (4 tiles) loses 13%, and packed causal 2k (0.99x) and softcap / ALiBi causal 2k
  // (0.98x) lose a little (perf.md v35): kDefaultMinKeyTilesCausal for those rows, kDefaultMinKeyTiles for the
  // rest. At d128 and d256 it is faster everywhere measured.
  static constexpr int kDefaultMinKeyTiles = kHeadDim == 64 ? 12 : 0;
  static constexpr int kDefaultMinKeyTilesCausal = kHeadDim == 64 ? 8 : 0;
  // Lazy rescaling (OnlineSoftmax::update_scores, slack 2^8) where it measured faster: d256, whose O
  // rescale is 4 multiplies per score, and the score-modifier kernels; d128's plain kernel is level or slower.
  static constexpr int kRescaleSlackLog2 = 8;
  static constexpr bool lazy_rescale(bool score_mod) { return kHeadDim == 256 || score_mod; }
  // A softcap against a fixed offset (OnlineSoftmax::update_scores_fixed, flash_fwd_launch.cuh) at d256, where it
  // measured 1.08-1.17x the running max (softcap 50, N = 2k-16k, perf.md v16), and at d128: level there in v16
  // (0.95-1.01: tanh and ex2 per score keep the MUFU pipe as busy as the tensor cores either way), 1.01-1.03x since
  // v27's ordering fix (v30; ALiBi and dropout rows, on the same kernel, level). At d64 a second softmax form took
  // the score-modifier consumers (160 registers) from 32 to 112 B of spills.
  static constexpr bool kSoftcapFixed = kHeadDim >= 128;
  // A kernel of its own for bfloat16 calls whose only score modifier is a softcap (against the fixed offset; no
  // ALiBi, no dropout; windows and packed batches allowed), at d128: without the dropout and running-max paths
  // its loop does not spill, and it stores O by the TMA: against the score-modifier kernel on softcap 50 rows,
  // non-causal 2k +6.4-7.1%, causal 8k +0.7-5.0% over three readings (perf.md v42). One more instantiation per
  // head dim (bf16), so not at d64 (no fixed offset). At d256 too since v43, though without the O buffer: its
  // 80-key tiles (the plain kernel's; the score-modifier kernel takes 64) and no spill in its loop (52 / 80 B in
  // all, the score-modifier kernel 68 / 116 B with a reload every key tile): softcap 50 non-causal 2k / 8k +5.8 /
  // +10.6%, causal 2k / 8k +1.4 / +3.4% (one call, floor +-2%), Gemma 2's head dim.
  // Its tiles (SoftcapTraits): three consumers on 64-key tiles, as FlashAttention-3's d64 kernel, whose MUFU work
  // per tensor-core cycle a d128 softcap's tanh and ex2 per score equal. Two consumers alternate: one's softmax
  // has the MUFU pipe while the other's products run, and the tensor cores idle whenever a softmax runs past the
  // other consumer's products. Three keep a softmax and a product in flight more of the time. Against two on
  // 128-key tiles, softcap 50: non-causal 2k / 8k +2.5 / +4.4%, causal 2k / 8k / 16k +0.9 / +6.4 / +4.6% (one
  // call). At the 690 W power cap the SM clock is 1770 MHz against 1800, and the throughput is 528 against 493
  // TFLOP/s. Two consumers on 64-key tiles lose 7-10%, and the plain d128 kernel on three consumers 0-8% (its
  // exps are half the softcap's MUFU work; perf.md v43). d256: two consumers (O is 128 registers), 80-key tiles.
  static constexpr bool kSoftcapKernel = (kHeadDim == 128 || kHeadDim == 256) && std::is_same_v<T, __nv_bfloat16>;
  using SoftcapTraits = FwdSm90WsTraits<T, kHeadDim, kHeadDim == 128 ? 64 : 80, kHeadDim == 128 ? 3 : 2>;
  // The softmax's row max as a tree and its sum in two chains (OnlineSoftmax::update_scores' kTree) at d64, where
  // three consumers' exps share each SMSP's MUFU pipe: 1.02-1.06x on plain rows (2k-16k, causal and not), 1.03x
  // GQA, 1.04x packed, level with score modifiers; at d128 0.95-0.99x and d256 0.95-1.03x (perf.md v31).
  static constexpr bool kTreeMax = kHeadDim == 64;
  // Both rows' maxima before their quad shuffles (OnlineSoftmax::update_scores' kRowsTogether), as
  // FlashAttention-4 orders them: the probe's cycles per key tile (clock-independent) -2.4% at d64, -0.6% at d128,
  // level at d256; timed A/B of the default builds, within their +-3% noise (perf.md v33).
  static constexpr bool kRowsTogether = true;
  // The epilogue reads its O chunks out of shared memory this many at a time before storing them: at d256 (16
  // chunks a thread) four, whose reads' latencies overlap (the probe build: 0.5-1% fewer cycles a key tile than one
  // at a time); at d64 / d128 one, as four cost their loops 0.7-1% there (register allocation), and all at once
  // spilled at d256 (perf.md v33).
  static constexpr int kStoreGroup = kHeadDim == 256 ? 4 : 1;
  // Persistent grid where tiles are uniform (flash_fwd_launch.cuh): measured 1.02-1.07x one block per tile at
  // d128 / d256, 1.03x / 0.99x at d64 N = 2k / 16k (perf.md v12).
  static constexpr bool kPersistent = kHeadDim >= 128;
  // Clusters of two blocks that share each K / V tile (FwdTmaMaps::cluster, chosen per call by the launcher): in the
  // d128 kernel without score modifiers on the static stride (uniform rows), as FlashAttention-3 does for
  // non-causal rows from d128. Each block copies half of every key tile into both blocks' shared memory (TMA
  // multicast) and its consumers release each stage in both blocks, so the K / V bytes a pair reads from L2
  // halve: d128 non-causal 2k / 8k / 16k +0.8-1.2 / +1.1-1.2 / +0.7-1.6%, GQA 4k +1.2-1.5%; the d256 80-key
  // kernel lost 1-3% (perf.md v44). Compiled into that kernel only (the others' register allocation moves with
  // anything).
  static constexpr bool may_cluster(bool score_mod) { return !score_mod && kHeadDim == 128; }
  static constexpr int kProducerRegs = 24, kConsumerRegs = kConsumers == 2 ? 240 : 160;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "warp-specialised forward: d = 64, 128, 256");
  static_assert(kProducerRegs * 128 + kConsumers * kConsumerRegs * 128 <= 65536, "register file");
#ifdef FLASH_ATTN2_FWD_TIMELINE
  static_assert(kConsumers <= kFwdProbeConsumers, "FwdProbe's buffer holds kFwdProbeConsumers consumers a block");
#endif

  using TileQ = SwizzledTile<kBlockM, kHeadDim>;  // also stages O for the output store
  using TileKV = SwizzledTile<kBlockN, kHeadDim>;
  static constexpr int kSmemQ = TileQ::kElems * 2;
  static constexpr int kSmemKV = TileKV::kElems * 2;
  static constexpr int kAlign = 1024;
  // Q buffers: two where blocks walk several tiles (persistent) and shared memory has room (d128 with 128-key
  // tiles: 192 KB), so the next tile's Q lands while this one computes and stores O instead of after it; one
  // elsewhere. FLASH_ATTN2_FWD_WS_QBUF=1 keeps one (p.ws_q_stages; A/B runs, tests).
  static constexpr int kQStages =
      kPersistent && 2 * kSmemQ + 2 * kStages * kSmemKV + kAlign + 256 <= 227 * 1024 ? 2 : 1;
  // O staged in a buffer of its own and stored by the TMA (a 64-row box per consumer and column block, one
  // thread's bulk copy), where shared memory has room beside the Q buffers and the ring (d128: 225 KB, d64: 112
  // KB; not d256): the consumer's epilogue then ends once O is in shared memory, instead of after its threads'
  // trips of a 16-byte load and a global store (8 at d128, ~1600 cycles a tile, perf.md v33), and the Q buffer is
  // free once the last S product is done. Used by the kernel without score modifiers where the TMA can address O
  // (FwdTmaMaps::store_o), packed batches included: there a box that would cross its sequence's end (into the
  // next sequence's rows) is stored by the threads; and by the softcap kernel (kSoftcapKernel). The score-modifier
  // kernel with both epilogues spilled in its loop (its dropout rows 0.93-0.95x, perf.md v41): its consumers'
  // threads store O.
#ifndef FLASH_ATTN2_FWD_TMA_O
#define FLASH_ATTN2_FWD_TMA_O 1
#endif
  static constexpr int kSmemO =
      FLASH_ATTN2_FWD_TMA_O && kHeadDim <= 128 &&
              kQStages * kSmemQ + 2 * kStages * kSmemKV + kSmemQ + kAlign + 256 <= 227 * 1024
          ? kSmemQ
          : 0;
  static constexpr bool kTmaStoreO = kSmemO > 0;
  // Barriers: Q full per Q buffer, then per stage K full, K empty, V full, V empty, then Q empty per Q buffer,
  // then the two slots of the tile ring (TileWalk): full, full, empty, empty.
  static constexpr int kBarriers = 2 * kQStages + 4 * kStages + 4;
  // Q_0 (| Q_1) | K_0 | K_1 | V_0 | V_1 (| O) | barriers | the tile ring's two ints | SeqOrder's table, plus
  // alignment slack. The table (packed batches: the sequences longest first) takes up to 256 sequences where
  // shared memory has room for them (d128: 256 in its last 1.9 KB), 6 bytes each.
  static constexpr int kSmemBase = kQStages * kSmemQ + 2 * kStages * kSmemKV + kSmemO + kBarriers * 8 + 8 + kAlign;
  static constexpr int kSeqOrderCap = std::min(256, (227 * 1024 - kSmemBase - 4) / 6);
  static constexpr int kSmemBytes = kSmemBase + (kSeqOrderCap > 0 ? 6 * kSeqOrderCap + 4 : 0);
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

namespace sm90 {

// Where the tiles and barriers of the warp-specialised forward live in (1024-byte aligned) shared memory.
template <class Kt>
struct WsSmem {
  unsigned char* base;  // the first Q buffer
  uint32_t base_u;      // its shared-space address
  static constexpr int kQ = Kt::kQStages, kKv0 = kQ * Kt::kSmemQ;  // K/V stages follow the Q buffers
  FA2_DEVICE static constexpr int q_off(int qs) { return qs * Kt::kSmemQ; }
  FA2_DEVICE static constexpr int k_off(int s) { return kKv0 + s * Kt::kSmemKV; }
  FA2_DEVICE static constexpr int v_off(int s) { return kKv0 + (Kt::kStages + s) * Kt::kSmemKV; }
  FA2_DEVICE static constexpr int o_off() { return kKv0 + 2 * Kt::kStages * Kt::kSmemKV; }  // Kt::kTmaStoreO
  FA2_DEVICE uint64_t* bar(int i) const { return reinterpret_cast<uint64_t*>(base + o_off() + Kt::kSmemO) + i; }
  FA2_DEVICE uint64_t* q_full(int qs) const { return bar(qs); }
  FA2_DEVICE uint64_t* k_full(int s) const { return bar(kQ + s); }
  FA2_DEVICE uint64_t* k_empty(int s) const { return bar(kQ + Kt::kStages + s); }
  FA2_DEVICE uint64_t* v_full(int s) const { return bar(kQ + 2 * Kt::kStages + s); }
  FA2_DEVICE uint64_t* v_empty(int s) const { return bar(kQ + 3 * Kt::kStages + s); }
  FA2_DEVICE uint64_t* q_empty(int qs) const { return bar(kQ + 4 * Kt::kStages + qs); }
  FA2_DEVICE uint64_t* tile_full(int s) const { return bar(2 * kQ + 4 * Kt::kStages + s); }
  FA2_DEVICE uint64_t* tile_empty(int s) const { return bar(2 * kQ + 4 * Kt::kStages + 2 + s); }
  FA2_DEVICE volatile int* tile_slot(int s) const { return reinterpret_cast<volatile int*>(bar(Kt::kBarriers)) + s; }
  // SeqOrder's table: kSeqOrderCap + 1 cumulative tile counts, then kSeqOrderCap sequence indices.
  FA2_DEVICE int* seq_cum() const { return reinterpret_cast<int*>(bar(Kt::kBarriers)) + 2; }
  FA2_DEVICE int16_t* seq_index() const { return reinterpret_cast<int16_t*>(seq_cum() + Kt::kSeqOrderCap + 1); }
};

// Packed batches on the dynamic walk (FwdTmaMaps::seq_order): the walk hands out the tiles of the longest sequence
// first and only tiles that hold rows, instead of the grid's (batch, head, tile) order over the longest
// sequence's tile count, where every shorter sequence leaves tiles to claim and skip and the last tiles handed
// out are the last sequence's, however long (its tiles then end the kernel on a few SMs). Each block builds the
// table in shared memory at its start from cu_seqlens_q (no host sync, nothing precomputed): sequence indices by
// decreasing length (ties by index; empty sequences last, with no tiles) and the cumulative counts of their tiles
// times heads. The producer turns the counter's values into the grid order's tile indices (grid_tile) and
// publishes every tile, the first included, through TileWalk's ring, so the consumers' side is the grid order's.
// n = 0: the grid's own order.
template <class Kt>
struct SeqOrder {
  static constexpr int kBlockM = Kt::kBlockM;
  int* cum;
  int16_t* seq;
  int n;
  FA2_DEVICE SeqOrder(const WsSmem<Kt>& sm, int n_) : cum(sm.seq_cum()), seq(sm.seq_index()), n(n_) {}
  // A sequence's tiles: as many as its rows need, up to the grid's count (max_seqlen_q bounds the rows computed).
  static FA2_DEVICE int tiles(const FwdParams& p, int len) {
    return min(ceil_div(len, kBlockM), ceil_div(p.seqlen_q, kBlockM));
  }
  // By every thread of the block, before its first barrier after the call (the caller's __syncthreads).
  FA2_DEVICE void build(const FwdParams& p, int tid) const {
    if (n == 0) return;
    for (int i = tid; i < n; i += Kt::kNThreads) cum[1 + i] = SeqInfo(p, i).seqlen_q;  // lengths, for a moment
    __syncthreads();
    for (int i = tid; i < n; i += Kt::kNThreads) {
      const int len = cum[1 + i];
      int rank = 0;
      for (int j = 0; j < n; ++j) rank += cum[1 + j] > len || (cum[1 + j] == len && j < i);
      seq[rank] = static_cast<int16_t>(i);
    }
    __syncthreads();
    if (tid < 32) {  // the cumulative counts, 8 sequences a lane (kSeqOrderCap <= 256), over the lengths
      constexpr int kPer = 8;
      int count[kPer], sum = 0;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int k = tid * kPer + j;
        count[j] = k < n ? tiles(p, cum[1 + seq[k]]) * p.heads_q : 0;
        sum += count[j];
      }
      __syncwarp();
      int before = sum;  // inclusive scan of the lanes' sums, then exclusive
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const int up = __shfl_up_sync(0xffffffffu, before, d);
        if (tid >= d) before += up;
      }
      before -= sum;
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        const int k = tid * kPer + j;
        before += count[j];
        if (k < n) cum[1 + k] = before;
      }
      if (tid == 0) cum[0] = 0;
    }
  }
  // Value v of the walk (the counter's, or the block's first) as the grid order's tile index; past the table's
  // tiles, `end` (which ends both roles' walks). Tile t is sequence seq[k] for the last k with cum[k] <= t, its
  // tiles head by head, each head's last (for causal, longest) first, as in the grid's order.
  FA2_DEVICE int grid_tile(const FwdParams& p, int v, int end) const {
    if (v >= cum[n]) return end;
    int lo = 0, hi = n - 1;  // never an empty sequence's k: those sort last, at cum[k] = cum[n] > v
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (cum[mid] <= v) lo = mid;
      else hi = mid - 1;
    }
    const int b = seq[lo], local = v - cum[lo], nt = tiles(p, SeqInfo(p, b).seqlen_q);
    const int num_m = ceil_div(p.seqlen_q, kBlockM), head = b * p.heads_q + local / nt;
    return GridOrder<int>::index(num_m - nt + local % nt, head, num_m, p.batch * p.heads_q, p.grid_head_group);
  }
};

// The order in which a persistent block walks tiles; both roles see the same sequence, skipped tiles included.
// Static (p.tile_counter == nullptr): tiles b, b + gridDim.x, ... — balanced where every tile costs the same.
// Dynamic: after its first tile (blockIdx.x) a block takes gridDim.x + atomicAdd(counter, 1), the next tile of
// FwdBlockInfo's order not yet taken (longest first within a head), once the producer thread has issued the last
// copy of its current tile (a couple of key tiles before the consumers finish it: a claim made when a tile starts
// held the next tile a whole tile long, and long masked rows then ended on blocks still busy with their previous
// tile, perf.md v34); it publishes each through a 2-slot ring in shared memory (slot k % 2: "full" takes the
// producer's arrival, "empty" one from every consumer thread once read), which the consumers read after their
// tile. A value past num_tiles ends both walks. With SeqOrder the producer maps each value, the block's first
// included, to the grid order's tile index before publishing it, and the consumers take every tile from the ring.
template <class Kt>
struct TileWalk {
  int k = 0;  // tiles published / read so far
  FA2_DEVICE int producer_next(const FwdParams& p, const WsSmem<Kt>& sm, const SeqOrder<Kt>& order, int tile,
                               int end) {
    if (p.tile_counter == nullptr) return tile + static_cast<int>(gridDim.x);
    int next = static_cast<int>(gridDim.x) + atomicAdd(p.tile_counter, 1);
    if (order.n > 0) next = order.grid_tile(p, next, end);
    publish(sm, next);
    return next;
  }
  // SeqOrder: the block's first tile goes through the ring too (the consumers cannot map it themselves).
  FA2_DEVICE int producer_first(const FwdParams& p, const WsSmem<Kt>& sm, const SeqOrder<Kt>& order, int end) {
    const int first = static_cast<int>(blockIdx.x);
    if (order.n == 0) return first;
    const int tile = order.grid_tile(p, first, end);
    publish(sm, tile);
    return tile;
  }
  FA2_DEVICE void publish(const WsSmem<Kt>& sm, int next) {
    const int s = k & 1;
    if (k >= 2) tma::wait(sm.tile_empty(s), ((k >> 1) - 1) & 1);
    *sm.tile_slot(s) = next;
    tma::arrive(sm.tile_full(s));  // release: the slot's store is visible to the consumers that wait
    ++k;
  }
  FA2_DEVICE int consumer_next(const FwdParams& p, const WsSmem<Kt>& sm, int tile) {
    if (p.tile_counter == nullptr) return tile + static_cast<int>(gridDim.x);
    const int s = k & 1;
    tma::wait(sm.tile_full(s), (k >> 1) & 1);  // claimed by now (a couple of key tiles ago)
    const int next = *sm.tile_slot(s);
    tma::arrive(sm.tile_empty(s));
    ++k;
    return next;
  }
};

// The stream-K tail of the static stride (FwdParams::sk_units > 0; the d128 kernel without score modifiers on
// uniform rows, where the launcher sets it). With T tiles over G blocks, the stride's last round holds T mod G
// tiles, and the other blocks idle through it: 2048 tiles on 132 SMs take 16 rounds for 15.5 rounds of work, 3%
// of every such call's time at free clocks (measured at the power cap: B = 17 against B = 16 at N = 2k, +1.6%;
// the tail against none, d128 non-causal: 2k / 4k +0.3 / +0.4%, 8k / 16k +1.8 / +2.0%, perf.md v46).
// Here the walkers (blocks, or a cluster's two blocks together: W = grid / cs walkers, cs = 1 or 2) take
// sk_dp_rounds rounds of the stride over tile groups (cs consecutive tiles), then share the remaining groups'
// key tiles: units u = group * nkt + key tile, walker w taking [w U / W, (w + 1) U / W), at least nkt each, so a
// group is split between at most two walkers, w - 1 (its key tiles [0, k)) and w ([k, nkt)). The pieces stay
// near each other in the grid's order (the tail's tiles are consecutive), so their K / V stay in L2.
// A split tile is finished by whichever of its two pieces ends second (a counter per split and consumer, no wait
// on a walker that may not have started): the first stores its O, max and sum (thread by thread, float32) in
// sk_partial and raises `ready`; the second merges them into its own by the log-sum-exp rule, then stores O. The
// merge's arithmetic is fixed by the pieces' key ranges, not by which ended second: the forward stays
// deterministic.
struct StreamKTail {
  int lo, hi, g0, split_lo, split_hi;  // this walker's units [lo, hi), its first group, its splits' indices
  int first_tile, stride, base, cs;    // the stride's tiles; the tail's first tile (the block's rank added)
  FA2_DEVICE StreamKTail(const FwdParams& p, bool cluster) {
    cs = cluster ? 2 : 1;
    const int walkers = static_cast<int>(gridDim.x) / cs;
    const int w = static_cast<int>(blockIdx.x) / cs, rank = static_cast<int>(blockIdx.x) % cs;
    const int64_t units = p.sk_units;
    lo = static_cast<int>(w * units / walkers);
    hi = static_cast<int>((w + 1) * units / walkers);
    g0 = p.sk_key_tiles > 0 ? lo / p.sk_key_tiles : 0;
    split_lo = w * cs + rank;  // the split shared with walker w - 1; with walker w + 1: split_hi
    split_hi = (w + 1) * cs + rank;
    first_tile = static_cast<int>(blockIdx.x);
    stride = static_cast<int>(gridDim.x);
    base = p.sk_dp_rounds * walkers * cs + rank;
  }
  // Step `step` of this block's walk: its tile (num_tiles past the end) and, for a tail piece, its key tiles
  // [k0, k1) and split slot (-1: the whole tile); k0 = -1 for the stride's tiles.
  FA2_DEVICE int item(const FwdParams& p, int step, int num_tiles, int& k0, int& k1, int& split) const {
    k0 = k1 = split = -1;
    if (step < p.sk_dp_rounds) return first_tile + step * stride;
    const int nkt = p.sk_key_tiles, j = step - p.sk_dp_rounds, group = g0 + j;
    const int start = j == 0 ? lo : group * nkt;
    if (start >= hi) return num_tiles;
    k0 = start - group * nkt;
    k1 = min(hi - group * nkt, nkt);
    split = k0 > 0 ? split_lo : (k1 < nkt ? split_hi : -1);
    return base + group * cs;
  }
};

}  // namespace sm90


namespace sm90 {

// The WS forward's cycle probe (cycle_probe.cuh; -DFLASH_ATTN2_FWD_TIMELINE builds, scripts/fwd_probe.py): where a
// consumer warpgroup's cycles go. kTiles / kIters count tiles and key tiles, kTotal spans the consumer's whole walk.
#ifdef FLASH_ATTN2_FWD_TIMELINE
using FwdProbeBase = CycleProbe<true, kFwdProbeConsumers, kFwdProbeSlots>;
#else
using FwdProbeBase = CycleProbe<false, 1, 1>;
#endif
struct FwdProbe : FwdProbeBase {
  // kEpilogue: from the O rows' global stores (or the block's end) on; kEpiFinalize, kEpiStage, kEpiSync: the
  // epilogue's steps before them (finalize, O staged in shared memory with the LSE stores, the consumer's barrier).
  // The consumer's tile loop between two calls of consume: kAdvance, the walk's step to the next tile (and the
  // loop's test); kSetup, the tile's set-up (FwdBlockInfo, its visibility and pointers); kConsume: each call of
  // consume whole (its own slots, plus what lies before its first mark and after its last).
  enum Slot { kQWait, kKvWait, kTurnWait, kIssue, kSWait, kSoftmax, kPvWait, kRescale, kEpilogue, kTiles, kIters,
              kTotal, kIssuePv, kEpiFinalize, kEpiStage, kEpiSync, kSetup, kConsume, kAdvance };
  FA2_DEVICE FwdProbe(const FwdParams& p, int c, bool lane) : FwdProbeBase(probe_timeline(p), c, lane) {}
};

// Ping-pong (FlashAttention-3): the consumers take turns issuing their MMAs, in a ring 0, 1, .., 0, so one's
// softmax runs while another's MMAs do. Named barrier bar(c) is "consumer c may issue": consumer c waits on it
// (bar.sync, 128 threads) and its predecessor in the ring arrives on it (bar.arrive, 128 threads) after issuing
// its own. The last consumer pre-arrives so that consumer 0 goes first; the ring runs on across the block's
// tiles, and consumer 0 takes the last arrival at the end (finish), so that every arrival is waited for.
// Barriers 1 .. kConsumers are the consumers' own (epilogue).
template <int kConsumers>
struct ConsumerTurns {
  int c;
  static FA2_DEVICE int bar(int k) { return 1 + kConsumers + k; }
  FA2_DEVICE explicit ConsumerTurns(int c_) : c(c_) {
    if (c == kConsumers - 1) tma::named_arrive(bar(0), 256);
  }
  FA2_DEVICE void wait() const { tma::named_sync(bar(c), 256); }
  FA2_DEVICE void pass() const { tma::named_arrive(bar((c + 1) % kConsumers), 256); }
  FA2_DEVICE void finish() const {
    if (c == 0) tma::named_sync(bar(0), 256);
  }
};

// Consumer c's staged O rows (src: its block's tile, staged as Kt::TileQ) stored by its 128 threads into o (row 0
// of the tile), rows [row_lo, rows) and d columns only: 16-byte chunks read out of shared memory Kt::kStoreGroup
// at a time, then stored (see the traits). The O-by-TMA path's boxes that the TMA cannot store; consume's own
// epilogue keeps this loop written out: called from there too, it moved the SASS of kernels that never take the
// TMA path (d256, the score-modifier kernels; spills unchanged), and ptxas's allocation there moves with anything.
template <class Kt, class T>
FA2_DEVICE void store_staged_rows(const T* src, T* o, index_t row_stride, int row_lo, int rows, int d, int c,
                                  int tid) {
  using TileQ = typename Kt::TileQ;
  constexpr int kCPR = Kt::kHeadDim / 8, kChunks = 64 * kCPR / 128;  // 16-byte chunks per thread
  constexpr int kGroup = Kt::kStoreGroup;
  static_assert(kChunks % kGroup == 0, "the O chunks in whole groups");
#pragma unroll 1
  for (int j0 = 0; j0 < kChunks; j0 += kGroup) {
    uint4 chunk[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int idx = tid % 128 + 128 * (j0 + j), r = 64 * c + idx / kCPR, ch = idx % kCPR;
      chunk[j] = *reinterpret_cast<const uint4*>(src + TileQ::chunk_offset(r, ch));
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int idx = tid % 128 + 128 * (j0 + j), r = 64 * c + idx / kCPR, ch = idx % kCPR;
      if (r >= row_lo && r < rows && ch * 8 < d)
        *reinterpret_cast<uint4*>(o + static_cast<index_t>(r) * row_stride + ch * 8) = chunk[j];
    }
  }
}

// One query tile of a consumer warpgroup (c < kConsumers: query rows [64 c, 64 c + 64) of the tile): see the
// file comment. kv_base: the block's K/V ring uses before this tile; qs, q_phase: this tile's Q buffer and the
// parity of its copy there; more_tiles: whether the block walks another tile after this one (which may need
// this Q buffer back).
template <class Kt, bool kScoreMod, bool kSoftcapOnly, class T>
FA2_DEVICE void consume(const FwdParams& p, const FwdBlockInfo<Kt::kBlockM>& blk, const Visibility<int>& vis,
                        const FwdBlockIO<T>& io, const WsSmem<Kt>& sm, int n_last, int n_tiles, int c, int tid,
                        const ConsumerTurns<Kt::kConsumers>& turns, int kv_base, int qs, uint32_t q_phase,
                        bool more_tiles, const FwdTmaMaps& maps, int peer, float* sk_part, int* sk_sync) {
  using TileQ = typename Kt::TileQ;
  using TileKV = typename Kt::TileKV;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kStages = Kt::kStages;
  T* sQ = reinterpret_cast<T*>(sm.base + sm.q_off(qs));
  const uint32_t sQ_u = sm.base_u + sm.q_off(qs);
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int d = p.head_dim;
  T* o = io.o;
  float* lse = io.lse;

  const int warp_row0 = 64 * c + 16 * (warp % 4);  // first tile row of this warp's accumulators
  const bool release_lane = tid % 128 == 0;         // one arrival per consumer on the empty barriers
  // A K / V stage is released in this block and, in a cluster (peer >= 0), in the peer block, whose copies of the
  // next use of the stage write into this block's buffer too.
  // (A block's shared memory is one range of the cluster's shared window: the peer's barrier lies as far from the
  // peer's base as this block's from its own.)
  const uint32_t peer_base = peer >= 0 ? tma::map_to_rank(sm.base_u, static_cast<uint32_t>(peer)) : 0u;
  auto release = [&](uint64_t* bar) {
    if (release_lane) tma::arrive(bar);
    if constexpr (Kt::may_cluster(kScoreMod)) {
      tma::arrive_remote(peer_base + static_cast<uint32_t>(reinterpret_cast<unsigned char*>(bar) - sm.base),
                         release_lane && peer >= 0);
    }
  };
  const ScoreRule<float> rule = kScoreMod ? score_rule(p, blk.batch, blk.head) : ScoreRule<float>{};
  const uint32_t rng_head = static_cast<uint32_t>(blk.batch * p.heads_q + blk.head);

  // Kt::q_in_registers: this warp's 16 Q rows as A fragments, loaded once the tile's Q has landed.
  constexpr bool kQRegs = Kt::q_in_registers(kScoreMod);
  uint32_t frag_q[1][kQRegs ? kHeadDim / 16 : 1][4];
  auto load_q = [&] {
    if constexpr (kQRegs) {
#pragma unroll
      for (int ks = 0; ks < kHeadDim / 16; ++ks) load_a<TileQ>(frag_q[0][ks], sQ_u, warp_row0, 0, ks * 16, lane);
    }
  };
  auto issue_s = [&](float (&acc_s)[1][kBlockN / 8][4], int s) {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      if constexpr (kQRegs)
        WgmmaOp<T, kBlockN>::template rs<0>(flat(acc_s), frag_q[0][ks],
                                            desc_k_major<TileKV>(sm.base_u + sm.k_off(s), 0, ks), ks > 0);
      else
        WgmmaOp<T, kBlockN>::template ss<0, 0>(flat(acc_s), desc_k_major<TileQ>(sQ_u, 64 * c, ks),
                                               desc_k_major<TileKV>(sm.base_u + sm.k_off(s), 0, ks), ks > 0);
    }
    wgmma_commit();
  };
  // The S product's register operands stay untouched until the product is done (as frag_p's).
  auto fence_q = [&] {
    if constexpr (kQRegs) fence_regs(frag_q);
  };
  float acc_o[1][kHeadDim / 8][4];
  zero_acc(acc_o);
  auto issue_o = [&](const uint32_t (&frag_p)[1][kBlockN / 16][4], int s) {
#pragma unroll
    for (int n0 = 0; n0 < kHeadDim; n0 += Kt::kPvN)
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk)
        WgmmaOp<T, Kt::kPvN>::template rs<1>(acc_cols<Kt::kPvN>(acc_o, n0), frag_p[0][kk],
                                             desc_mn_major<TileKV>(sm.base_u + sm.v_off(s), n0 / 64, kk), 1);
    wgmma_commit();
  };
  OnlineSoftmax<1> softmax;
  constexpr bool kLazy = Kt::lazy_rescale(kScoreMod);
  // A softcap without ALiBi (bfloat16; p.softcap_scale_log2 > 0, set by the launcher): every score lies in
  // [-softcap, softcap], so P is taken against a fixed offset (update_scores_fixed) with the cap folded into its
  // scale: per score no max and no multiply by the cap, per tile no quad shuffles and nothing to rescale.
  // The softcap kernel (kSoftcapOnly, flash_fwd_launch.cuh) takes only such calls, without dropout.
  const bool softcap_fixed = kSoftcapOnly || (kScoreMod && Kt::kSoftcapFixed && p.softcap_scale_log2 > 0.f);
  // The same step as flash_fwd_sm90_kernel's: score rule, mask where the tile crosses a visibility edge, online
  // softmax (alpha: the factor O still owes), dropout keep.
  auto softmax_step = [&](float (&acc_s)[1][kBlockN / 8][4], int n_block, float (&alpha)[1][2]) {
    const int r0 = blk.row0 + warp_row0 + g, c0 = n_block * kBlockN + 2 * t;
    const bool masked = vis.tile_needs_mask(blk.row0, kBlockM, n_block * kBlockN, kBlockN);
    if (softcap_fixed) {
      apply_softcap_unit(acc_s, rule);
      if (masked) apply_mask(acc_s, r0, c0, vis);
      softmax.update_scores_fixed(acc_s, p.softcap_scale_log2, p.softcap_offset_log2);
      alpha[0][0] = alpha[0][1] = 1.f;
    } else {
      if constexpr (kScoreMod) apply_score_rule(acc_s, r0, c0, vis.diag(), rule);
      if (masked) apply_mask(acc_s, r0, c0, vis);
      softmax.template update_scores<kLazy ? Kt::kRescaleSlackLog2 : 0, Kt::kTreeMax, Kt::kRowsTogether>(
          acc_s, p.scale_log2, alpha);
    }
    if constexpr (kScoreMod && !kSoftcapOnly) {
      if (p.dropout.enabled()) apply_keep(acc_s, dropout_bits<1, kBlockN / 8>(p.dropout, rng_head, r0, c0), 1.f);
    }
  };

  float acc_s[1][kBlockN / 8][4];
  uint32_t frag_p[1][kBlockN / 16][4];
  float alpha[1][2];
  auto stage = [&](int i) { return (kv_base + i) % kStages; };  // ring use kv_base + i
  auto phase = [&](int i) { return static_cast<uint32_t>((kv_base + i) / kStages) & 1u; };
  FwdProbe probe(p, c, release_lane);
  probe.add(FwdProbe::kTiles, 1);
  probe.add(FwdProbe::kIters, n_tiles);
  // Both barriers asked at once, here and at each key tile (tma::wait_both): one round trip where the copies have
  // landed, not two in a row on the consumer's path (d256 1.01-1.03x, d64 / d128 level, perf.md v32).
  tma::wait_both(sm.q_full(qs), q_phase, sm.k_full(stage(0)), phase(0));
  probe.mark(FwdProbe::kQWait);  // (Q and the first K)
  load_q();
  turns.wait();
  probe.mark(FwdProbe::kTurnWait);
  wgmma_fence();
  issue_s(acc_s, stage(0));
  turns.pass();
  probe.mark(FwdProbe::kIssue);
  wgmma_wait<0>();
  fence_regs(acc_s);
  fence_q();
  probe.mark(FwdProbe::kSWait);
  release(sm.k_empty(stage(0)));
  softmax_step(acc_s, n_last, alpha);  // O is still zero: nothing to rescale
  acc_to_a_frags<T>(frag_p, acc_s);
  probe.mark(FwdProbe::kSoftmax);
  for (int i = 1; i < n_tiles; ++i) {
    const int s = stage(i), ps = stage(i - 1);  // stages of tile i (K) and of tile i - 1 (V)
    tma::wait_both(sm.k_full(s), phase(i), sm.v_full(ps), phase(i - 1));
    probe.mark(FwdProbe::kKvWait);
    turns.wait();
    probe.mark(FwdProbe::kTurnWait);
    wgmma_fence();
    issue_s(acc_s, s);
    probe.mark(FwdProbe::kIssue);
    issue_o(frag_p, ps);
    turns.pass();
    probe.mark(FwdProbe::kIssuePv);
    wgmma_wait<1>();  // S_i done: K_i may be overwritten; O += P_{i-1} V_{i-1} may still run
    fence_regs(acc_s);
    fence_q();
    probe.mark(FwdProbe::kSWait);
    release(sm.k_empty(s));
    softmax_step(acc_s, n_last - i, alpha);
    // d128 / d256: the softmax runs under O += P_{i-1} V_{i-1}, not after the wait below (issue_boundary; with the
    // broadcast warpgroup index below, d128 0.99-1.03x, d256 1.01-1.08x; d64's three consumers 0.97-1.01x: v27).
    if constexpr (kHeadDim >= 128) softmax.issue_boundary();
    probe.mark(FwdProbe::kSoftmax);
    wgmma_wait<0>();
    fence_regs(acc_o);
    fence_regs(frag_p);  // the A fragments stay untouched until the MMA reading them is done
    probe.mark(FwdProbe::kPvWait);
    release(sm.v_empty(ps));
    if constexpr (kLazy) softmax.rescale_if_needed(acc_o, alpha);
    else softmax.rescale(acc_o, alpha);
    acc_to_a_frags<T>(frag_p, acc_s);
    probe.mark(FwdProbe::kRescale);
  }
  // O by the TMA (Kt::kTmaStoreO): this thread's store of the previous tile's O has read the O buffer before the
  // turn's barrier, after which this consumer's threads stage this tile's O there.
  constexpr bool kTmaO = Kt::kTmaStoreO && (!kScoreMod || kSoftcapOnly);
  const bool tma_o = kTmaO && maps.store_o;
  {
    const int s = stage(n_tiles - 1);
    tma::wait(sm.v_full(s), phase(n_tiles - 1));
    probe.mark(FwdProbe::kKvWait);
    if (tma_o && release_lane) tma::bulk_wait_read<0>();
    turns.wait();
    probe.mark(FwdProbe::kTurnWait);
    wgmma_fence();
    issue_o(frag_p, s);
    turns.pass();
    probe.mark(FwdProbe::kIssue);
    wgmma_wait<0>();
    fence_regs(acc_o);
    fence_regs(frag_p);
    probe.mark(FwdProbe::kPvWait);
    release(sm.v_empty(s));  // the producer's next tile refills this stage
    // O staged in its own buffer: Q is free once the last S product is done.
    if (tma_o && more_tiles && release_lane) tma::arrive(sm.q_empty(qs));
  }

  // A tile split by the stream-K tail (sk_part: this consumer's partial of the split, sk_sync its [count, ready];
  // StreamKTail): the piece that ends first leaves its state there and ends; the second merges it into its own.
  if constexpr (Kt::may_cluster(kScoreMod)) {
    if (sk_part != nullptr) {
      constexpr int kO = kHeadDim / 8;  // float4s of acc_o a thread, then one of (max, max, sum, sum)
      float4* part = reinterpret_cast<float4*>(sk_part) + tid % 128;
      volatile int* order = sm.tile_slot(c);  // the static walk leaves TileWalk's ring unused
      if (release_lane) *order = atomicAdd(sk_sync, 1);
      tma::named_sync(1 + c, 128);
      if (*order == 0) {
#pragma unroll
        for (int ni = 0; ni < kO; ++ni)
          __stcg(part + 128 * ni, make_float4(acc_o[0][ni][0], acc_o[0][ni][1], acc_o[0][ni][2], acc_o[0][ni][3]));
        __stcg(part + 128 * kO, make_float4(softmax.row_max[0][0], softmax.row_max[0][1], softmax.row_sum[0][0],
                                            softmax.row_sum[0][1]));
        __threadfence();
        tma::named_sync(1 + c, 128);
        if (release_lane)
          ::cuda::atomic_ref<int, ::cuda::thread_scope_device>(sk_sync[1]).store(1, ::cuda::memory_order_release);
        return;
      }
      if (release_lane) {
        ::cuda::atomic_ref<int, ::cuda::thread_scope_device> ready(sk_sync[1]);
        while (ready.load(::cuda::memory_order_acquire) == 0) __nanosleep(64);
      }
      tma::named_sync(1 + c, 128);
      // The same arithmetic whichever piece merges (A: the tile's key tiles [0, k), B: [k, nkt); explicit
      // roundings, no contraction left to the compiler), so the output does not depend on which ended second.
      const bool mine_a = n_last + 1 == n_tiles;
      const float4 st = __ldcg(part + 128 * kO);
      float fa[2], fb[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_other = h == 0 ? st.x : st.y, l_other = h == 0 ? st.z : st.w;
        const float ma = mine_a ? softmax.row_max[0][h] : m_other, mb = mine_a ? m_other : softmax.row_max[0][h];
        const float la = mine_a ? softmax.row_sum[0][h] : l_other, lb = mine_a ? l_other : softmax.row_sum[0][h];
        const float m = fmaxf(ma, mb);
        fa[h] = ma == -INFINITY ? 0.f : fast_exp2((ma - m) * p.scale_log2);
        fb[h] = mb == -INFINITY ? 0.f : fast_exp2((mb - m) * p.scale_log2);
        softmax.row_max[0][h] = m;
        softmax.row_sum[0][h] = __fmaf_rn(lb, fb[h], __fmul_rn(la, fa[h]));
      }
      auto merge = [&](float& self, float other, int h) {
        const float a = mine_a ? self : other, b = mine_a ? other : self;
        self = __fmaf_rn(b, fb[h], __fmul_rn(a, fa[h]));
      };
#pragma unroll
      for (int ni = 0; ni < kO; ++ni) {
        const float4 x = __ldcg(part + 128 * ni);
        merge(acc_o[0][ni][0], x.x, 0);
        merge(acc_o[0][ni][1], x.y, 0);
        merge(acc_o[0][ni][2], x.z, 1);
        merge(acc_o[0][ni][3], x.w, 1);
      }
    }
  }

  float row_lse[1][2];
  if (softcap_fixed) {
    const float offset[1][2] = {{p.softcap_offset_log2, p.softcap_offset_log2}};
    softmax.finalize_at(acc_o, offset, row_lse);
  } else {
    softmax.finalize(acc_o, p.scale_log2, row_lse);
  }
  probe.mark(FwdProbe::kEpiFinalize);

  // Epilogue: each consumer stages its O rows (as T) over its own Q rows — only its own S products read those,
  // and they are done — then stores them with 16-byte writes after a barrier among its 128 threads; or (tma_o)
  // stages them in the O buffer and one thread stores them by the TMA, a 64-row box per 64 columns.
  T* const staged = tma_o ? reinterpret_cast<T*>(sm.base + sm.o_off()) : sQ;
  store_acc<T, TileQ>(staged, acc_o, warp_row0, 0, lane, dropout_scale(p, kScoreMod && !kSoftcapOnly));
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_row0 + h * 8 + g;
      if (r >= blk.row_lo && r < blk.rows) lse[r] = row_lse[0][h];
    }
  }
  probe.mark(FwdProbe::kEpiStage);
  if constexpr (kTmaO) {
    if (tma_o) {
      fence_proxy_async_smem();  // the generic proxy's writes, before the async proxy reads them
      tma::named_sync(1 + c, 128);
      probe.mark(FwdProbe::kEpiSync);
      // The box (this consumer's 64 rows) goes by the TMA where all its rows are the caller's: not above the
      // sequence's row 0 (the first tile of a row-shifted sequence: FwdParams::row_shift_unit is a multiple of 64
      // where this runs, so such a box lies wholly above it; a bulk store starting at a negative row traps, an
      // illegal instruction at d64, unlike a copy from one) and, in a packed batch, not past the sequence's end
      // (the next sequence's rows; past a dense tensor's end the TMA writes nothing). Elsewhere the threads store
      // the box's valid rows from the O buffer.
      const bool packed = p.cu_seqlens_q != nullptr;
      if (64 * c >= blk.row_lo && (!packed || 64 * c + 64 <= blk.rows)) {
        if (release_lane) {
#pragma unroll
          for (int cb = 0; cb < kHeadDim / 64; ++cb)
            tma::store_box(&maps.o, sm.base + sm.o_off() + cb * kBlockM * 128 + 64 * c * 128, 64 * cb,
                           blk.seq.q_start + blk.row0 + 64 * c, blk.head, packed ? 0 : blk.batch);
        }
      } else {
        store_staged_rows<Kt>(reinterpret_cast<const T*>(sm.base + sm.o_off()), o, p.o_row_stride, blk.row_lo,
                              blk.rows, d, c, tid);
      }
      if (release_lane) tma::bulk_commit();
      probe.mark(FwdProbe::kEpilogue);
      return;
    }
  }
  tma::named_sync(1 + c, 128);
  probe.mark(FwdProbe::kEpiSync);
  // The chunks read out of shared memory Kt::kStoreGroup at a time, then stored (see the traits).
  constexpr int kCPR = kHeadDim / 8, kChunks = 64 * kCPR / 128;  // 16-byte chunks per thread
  constexpr int kGroup = Kt::kStoreGroup;
  static_assert(kChunks % kGroup == 0, "the O chunks in whole groups");
#pragma unroll 1
  for (int j0 = 0; j0 < kChunks; j0 += kGroup) {
    uint4 chunk[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int idx = tid % 128 + 128 * (j0 + j), r = 64 * c + idx / kCPR, ch = idx % kCPR;
      chunk[j] = *reinterpret_cast<const uint4*>(sQ + TileQ::chunk_offset(r, ch));
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int idx = tid % 128 + 128 * (j0 + j), r = 64 * c + idx / kCPR, ch = idx % kCPR;
      if (r >= blk.row_lo && r < blk.rows && ch * 8 < d)
        *reinterpret_cast<uint4*>(o + static_cast<index_t>(r) * p.o_row_stride + ch * 8) = chunk[j];
    }
  }
  // The Q buffer is free for a later tile's copy once all 128 threads have read their O rows out of it; the
  // copy writes through the async proxy what these threads touched through the generic one. A block's last tile
  // (every tile where each has its own block) has no later copy to wait for.
  if (!more_tiles) {
    probe.mark(FwdProbe::kEpilogue);
    return;
  }
  fence_proxy_async_smem();
  tma::named_sync(1 + c, 128);
  if (release_lane) tma::arrive(sm.q_empty(qs));
  probe.mark(FwdProbe::kEpilogue);
}

}  // namespace sm90

template <class Kt, bool kScoreMod, bool kSoftcapOnly = false>
__global__ void __launch_bounds__(Kt::kNThreads, 1)
    flash_fwd_sm90_ws_kernel(const __grid_constant__ FwdParams p, const __grid_constant__ FwdTmaMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Kt::Elem;
  using namespace sm90;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kStages = Kt::kStages;

  extern __shared__ unsigned char smem_raw[];
  const AlignedSmem aligned = aligned_smem<Kt::kAlign>(smem_raw);
  const WsSmem<Kt> sm{aligned.ptr, aligned.addr};
  const int tid = static_cast<int>(threadIdx.x);
  // The warpgroup index, broadcast from lane 0 so that ptxas knows it is warp-uniform (as in the backwards): a
  // consumer's Q descriptors (64 c rows on) then live in uniform registers, one add per wgmma, instead of 16
  // vector registers moved over by two R2UR per wgmma.
  const int wg = __shfl_sync(0xffffffffu, tid / 128, 0);
  const int q_stages = p.ws_q_stages == 1 ? 1 : Kt::kQStages;
  // A cluster of two (Kt::may_cluster; the launcher sets maps.cluster only for grids of pairs of blocks whose
  // tiles share their K / V tiles, tile by tile: the static stride over consecutive query tiles of a head).
  constexpr bool kMayCluster = Kt::may_cluster(kScoreMod);
  const bool cluster = kMayCluster && maps.cluster == 2;

  // Persistent: block b walks tiles of FwdBlockInfo's order (a head's query tiles together, its last, for causal
  // the longest, first) as TileWalk hands them out. Tiles past a sequence's end are skipped and tiles that see no
  // key written as empty rows, by both roles alike, so that they agree on the ring's uses.
  const int num_tiles = ceil_div(p.seqlen_q, kBlockM) * p.heads_q * p.batch;
  // One block per tile (the grid covers every tile): a packed batch's tiles past their sequence's end (the grid
  // spans the longest sequence) leave before any setup, like the other forward kernels' blocks.
  if (static_cast<int>(gridDim.x) >= num_tiles && FwdBlockInfo<kBlockM>(p, static_cast<int>(blockIdx.x)).rows <= 0)
    return;

  if (tid == 0) {
    if (p.ws_prefetch_maps) {  // the first copies' descriptors load under the barrier set-up
      tma::prefetch_map(&maps.q);
      tma::prefetch_map(&maps.k);
      tma::prefetch_map(&maps.v);
    }
    for (int qs = 0; qs < Kt::kQStages; ++qs) {
      tma::init_barrier(sm.q_full(qs), 1);
      tma::init_barrier(sm.q_empty(qs), Kt::kConsumers);
    }
    for (int s = 0; s < kStages; ++s) {
      tma::init_barrier(sm.k_full(s), 1);
      tma::init_barrier(sm.v_full(s), 1);
      tma::init_barrier(sm.k_empty(s), Kt::kConsumers * (cluster ? 2 : 1));  // a cluster: both blocks' consumers
      tma::init_barrier(sm.v_empty(s), Kt::kConsumers * (cluster ? 2 : 1));
    }
    for (int s = 0; s < 2; ++s) {  // the tile ring's two slots, whatever kStages is
      tma::init_barrier(sm.tile_full(s), 1);
      tma::init_barrier(sm.tile_empty(s), Kt::kConsumers * 128);
    }
    tma::fence_barrier_init();
  }
  // Packed batches on the dynamic walk: the sequences' tiles longest first (SeqOrder), where the table fits; in
  // the kernel without score modifiers (the other one's register allocation moved with it: its loop reloaded a
  // spilled value every key tile).
  const bool seq_order = !kScoreMod && maps.seq_order && p.tile_counter != nullptr && p.cu_seqlens_q != nullptr &&
                         p.batch <= Kt::kSeqOrderCap;
  const SeqOrder<Kt> order(sm, seq_order ? p.batch : 0);
  order.build(p, tid);
  // The last block-wide barrier: the producer's idle threads leave early. In a cluster, across both blocks: each
  // block's barriers are initialised before the other's copies and arrivals reach them.
  if (cluster) tma::cluster_sync();
  else __syncthreads();

  // setmaxnreg needs the two roles as the two branches of one if / else (HOPPER.md).
  if (wg == 0) {
    // Producer. Ring use j (stage j % kStages) reuses the buffer of use j - kStages: wait for its release first.
    // The next tile's first K copy is issued before waiting for the Q buffer, so it lands under the previous
    // tile's last products and epilogue.
    tma::shrink_registers<Kt::kProducerRegs>();
    if (tid == 0) {
      int kv_use = 0, q_use = 0;
      const uint32_t rank = cluster ? tma::cluster_rank() : 0u;
      TileWalk<Kt> walk;
      // The stream-K tail's pieces (StreamKTail) take key tiles [k0, k1) of their tile.
      const StreamKTail tail(p, cluster);
      const bool sk = kMayCluster && p.sk_units > 0;
      int step = 0, k0 = -1, k1 = -1, split = -1;
      // Q a tile ahead (p.ws_q_ahead: uniform rows on the static stride or its stream-K tail, two Q buffers): the
      // next tile's Q is copied during this tile, after this tile's third K copy (by then the consumers are done
      // with the tile before, whose buffer it takes), instead of when the producer reaches that tile, a stage
      // ahead of the consumers: Q is read once, from DRAM, and landed late at the 2k rows' tile starts.
      // Measured with the kept set-up below (perf.md v52, settled, in one process and by process): d128
      // non-causal 2k +0.8% on average over five readings (-1.9 to +2.6%), 4k-16k and GQA level; the probe
      // then finds the tile start waiting as long as before, on the first K copy instead.
      const bool q_ahead = p.ws_q_ahead != 0 && q_stages == 2 && p.tile_counter == nullptr && !seq_order;
      bool q_copied = false;  // this tile's Q was copied during the previous tile
      // With it, the next tile's FwdBlockInfo, worked out there, is kept for that tile's start, so that the tile's
      // first K copy (after the last V copy of the tile before) does not wait for its divisions (a tile's set-up
      // costs the consumers ~1100 cycles by the probe, perf.md v52).
      FwdBlockInfo<kBlockM> next_blk;
      auto load_q = [&](int use, const FwdBlockInfo<kBlockM>& b, int mb) {
        const int qs = use % q_stages;  // Q use `use` goes to buffer use % q_stages, after use - q_stages released it
        if (use >= q_stages) tma::wait(sm.q_empty(qs), ((use / q_stages) - 1) & 1);
        tma::arrive_expect_bytes(sm.q_full(qs), Kt::kSmemQ);
        tma::load_tile<kBlockM, kHeadDim>(sm.base + sm.q_off(qs), &maps.q, b.seq.q_start + b.row0, b.head, mb,
                                          sm.q_full(qs));
      };
      // The next tile is claimed after this one's last copy (the loop's step), not when it starts (TileWalk).
      for (int tile = sk ? tail.item(p, 0, num_tiles, k0, k1, split) : walk.producer_first(p, sm, order, num_tiles);
           tile < num_tiles;
           tile = sk ? tail.item(p, ++step, num_tiles, k0, k1, split)
                     : walk.producer_next(p, sm, order, tile, num_tiles)) {
        const FwdBlockInfo<kBlockM> blk = q_copied ? next_blk : FwdBlockInfo<kBlockM>(p, tile);
        if (blk.rows <= 0) continue;  // varlen: past the end of this sequence
        const Visibility<int> vis = blk.seq.visibility(p);
        const FwdBlockIO<T> io(p, blk, vis, kBlockN);
        const int n_end = k0 >= 0 ? k1 : io.n_end, n_begin = k0 >= 0 ? k0 : io.n_begin;
        const int n_last = n_end - 1, n_tiles = n_end - n_begin;  // tiles are walked from the last down
        // Packed batches: one map over all sequences (batch coordinate 0), rows offset by the sequence's start.
        // Tiles that run past a sequence's end read the next sequence's rows: masked keys (P = 0) and query rows
        // that are never stored, as with the zero rows past a dense tensor's end.
        const int map_b = p.cu_seqlens_q != nullptr ? 0 : blk.batch;
        // Ring use j of a K or V stage: wait for use j - kStages's release, announce the bytes, copy.
        // In a cluster the stage's empty barrier counts both blocks' consumers, and this block copies its half
        // of the tile (by its rank) into both blocks; its full barrier still expects the whole tile.
        auto fill = [&](uint64_t* empty, uint64_t* full, int off, const CUtensorMap* map, int j, int key0) {
          if (j >= kStages) tma::wait(empty, ((j / kStages) - 1) & 1);
          tma::arrive_expect_bytes(full, Kt::kSmemKV);
          if (kMayCluster && cluster)
            tma::load_tile_part_multicast<kBlockN, kHeadDim, 2>(sm.base + off, map, key0, static_cast<int>(rank),
                                                                 blk.head_kv, map_b, full, uint16_t{0b11});
          else
            tma::load_tile<kBlockN, kHeadDim>(sm.base + off, map, key0, blk.head_kv, map_b, full);
        };
        bool next_q_copied = false;
        for (int i = 0; i < n_tiles; ++i) {
          const int j = kv_use + i, s = j % kStages, key0 = blk.seq.k_start + (n_last - i) * kBlockN;
          fill(sm.k_empty(s), sm.k_full(s), sm.k_off(s), &maps.k, j, key0);
          if (i == 0 && !q_copied) load_q(q_use, blk, map_b);
          if (q_ahead && i == min(2, n_tiles - 1)) {  // uniform rows: every tile the walk reaches has a Q use
            int nk0, nk1, nsplit;
            const int next = sk ? tail.item(p, step + 1, num_tiles, nk0, nk1, nsplit)
                                : tile + static_cast<int>(gridDim.x);
            if (next < num_tiles) {
              next_blk = FwdBlockInfo<kBlockM>(p, next);
              // The map's batch coordinate by map_b's rule (the launcher keeps Q ahead off packed batches).
              load_q(q_use + 1, next_blk, p.cu_seqlens_q != nullptr ? 0 : next_blk.batch);
              next_q_copied = true;
            }
          }
          fill(sm.v_empty(s), sm.v_full(s), sm.v_off(s), &maps.v, j, key0);
        }
        q_copied = next_q_copied;
        kv_use += n_tiles;
        q_use += n_tiles > 0;
      }
      // In a cluster the peer's consumers arrive on this block's empty barriers: the block stays (this thread)
      // until they have released the last use of every stage. (The peer's copies into this block's buffers are
      // all awaited by this block's own consumers.)
      if (kMayCluster && cluster) {
        for (int j = kv_use > kStages ? kv_use - kStages : 0; j < kv_use; ++j) {
          tma::wait(sm.k_empty(j % kStages), (j / kStages) & 1);
          tma::wait(sm.v_empty(j % kStages), (j / kStages) & 1);
        }
      }
    }
  } else {
    tma::grow_registers<Kt::kConsumerRegs>();
    const int c = wg - 1;
    const ConsumerTurns<Kt::kConsumers> turns(c);
    FwdProbe whole(p, c, tid % 128 == 0), steps(p, c, tid % 128 == 0);
    const int peer = cluster ? static_cast<int>(tma::cluster_rank() ^ 1u) : -1;  // the other block of the cluster
    int kv_use = 0, q_use = 0;
    TileWalk<Kt> walk;
    const StreamKTail tail(p, cluster);
    const bool sk = kMayCluster && p.sk_units > 0;
    int step = 0, k0 = -1, k1 = -1, split = -1;
    for (int tile = sk ? tail.item(p, 0, num_tiles, k0, k1, split)
                       : seq_order ? walk.consumer_next(p, sm, 0) : static_cast<int>(blockIdx.x);
         tile < num_tiles;
         tile = sk ? tail.item(p, ++step, num_tiles, k0, k1, split) : walk.consumer_next(p, sm, tile)) {
      steps.mark(FwdProbe::kAdvance);
      const FwdBlockInfo<kBlockM> blk(p, tile);
      if (blk.rows <= 0) continue;
      const Visibility<int> vis = blk.seq.visibility(p);
      const FwdBlockIO<T> io(p, blk, vis, kBlockN);
      const int n_end = k0 >= 0 ? k1 : io.n_end, n_tiles = n_end - (k0 >= 0 ? k0 : io.n_begin);
      // A split tile's partial and flags: per split (walker boundary), tile of the group and consumer.
      float* sk_part = nullptr;
      int* sk_sync = nullptr;
      if (split >= 0) {
        const int slot = split * Kt::kConsumers + c;
        sk_part = p.sk_partial + static_cast<index_t>(slot) * 128 * (kHeadDim / 2 + 4);
        sk_sync = p.sk_sync + 2 * slot;
      }
      if (n_tiles == 0) {
        store_empty_rows<T, kHeadDim, Kt::kConsumers * 128>(io.o + static_cast<index_t>(blk.row_lo) * p.o_row_stride,
                                                            p.o_row_stride, io.lse + blk.row_lo,
                                                            blk.rows - blk.row_lo, p.head_dim, tid - 128);
        continue;
      }
      // Another tile may follow: the dynamic walk learns its next tile only after this one (as the tail does).
      const bool more_tiles = sk || p.tile_counter != nullptr || tile + static_cast<int>(gridDim.x) < num_tiles;
      steps.mark(FwdProbe::kSetup);
      consume<Kt, kScoreMod, kSoftcapOnly>(p, blk, vis, io, sm, n_end - 1, n_tiles, c, tid, turns, kv_use,
                                           q_use % q_stages, static_cast<uint32_t>(q_use / q_stages) & 1u,
                                           more_tiles, maps, peer, sk_part, sk_sync);
      steps.mark(FwdProbe::kConsume);
      kv_use += n_tiles;
      ++q_use;
    }
    turns.finish();
    // The last O stores by the TMA have read this block's shared memory and written O before the block ends.
    if (Kt::kTmaStoreO && (!kScoreMod || kSoftcapOnly) && maps.store_o && tid % 128 == 0) tma::bulk_wait<0>();
    whole.mark(FwdProbe::kTotal);
  }
#else
  __trap();  // only launched on sm_90 devices, from the sm_90a build (see detail::use_sm90_kernels)
#endif
}

}  // namespace flash_attn2::cuda
