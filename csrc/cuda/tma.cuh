// The Tensor Memory Accelerator (sm_90) for the warp-specialised kernels: host-side tensor maps over our
// (B, N, H, d) 16-bit tensors, and device-side mbarrier pipelines with bulk tensor copies (CCCL's cuda::ptx where
// it covers the instruction; setmaxnreg and named barriers are inline PTX).
//
// A tensor map describes one 4-D tensor (d, N, H, B) in global memory (element strides of the row, head and batch
// dims); a copy moves a box of 64 columns x kRows rows of one (head, batch) into shared memory with the 128-byte
// swizzle, which is exactly one column block of a SwizzledTile<kRows, C> (smem_tile.cuh, wgmma.cuh). Rows and
// columns outside the tensor are filled with zeros.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include <cuda/ptx>

#include "cuda/cuda_check.cuh"
#include "cuda/flash_params.h"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// ---- host --------------------------------------------------------------------------------------------------

namespace detail {
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// Whether the warp-specialised kernels prefetch their tensor maps (FLASH_ATTN2_WS_PREFETCH=0: not; A/B runs).
inline int ws_prefetch_maps() {
  const char* env = std::getenv("FLASH_ATTN2_WS_PREFETCH");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// cuTensorMapEncodeTiled from the driver the runtime loaded (no link against libcuda).
inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    FA2_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || f == nullptr)
      throw std::runtime_error("flash_attn2: the CUDA driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A map over the 16-bit tensor at `base` with dims (d, n, h, b) and element strides (row, head, batch), copied in
// boxes of 64 x box_rows with the 128-byte swizzle. Returns false (and leaves the map unusable) where the tensor
// breaks the TMA's rules: base not 16-byte aligned, a stride not a multiple of 16 bytes (or zero), d * 2 bytes not
// a multiple of 16; the caller then takes a kernel that does not use TMA.
inline bool make_tensor_map(CUtensorMap* map, const void* base, bool bf16, int d, int n, int h, int b,
                            index_t row_stride, index_t head_stride, index_t batch_stride, int box_rows) {
  const index_t strides[3] = {row_stride, head_stride, batch_stride};
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || (d * 2) % 16 != 0 || d <= 0 || n <= 0 || h <= 0 || b <= 0)
    return false;
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(n), static_cast<cuuint64_t>(h),
                        static_cast<cuuint64_t>(b)};
  cuuint64_t byte_strides[3];
  for (int i = 0; i < 3; ++i) {
    const index_t bytes = strides[i] * 2;
    // A dim of size 1 is never stepped over: any aligned stride will do for it.
    const bool unused = dims[i + 1] == 1;
    if (!unused && (bytes <= 0 || bytes % 16 != 0 || bytes >= (index_t(1) << 40))) return false;
    byte_strides[i] = unused ? 16 : static_cast<cuuint64_t>(bytes);
  }
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult r = encode_tiled_fn()(
      map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void*>(base), dims,
      byte_strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// A 2-D map over the float32 (rows, cols) row-major array at `base` (dQ accumulators: stat rows x d), written
// back from shared memory by reduce-adds in boxes of 32 columns (128 bytes, the 128-byte swizzle's span) x
// box_rows rows. Elements outside the array are not written. False where the TMA cannot address it.
inline bool make_f32_rows_map(CUtensorMap* map, float* base, int cols, int64_t rows, int box_rows) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || cols <= 0 || (cols * 4) % 16 != 0 || rows <= 0 ||
      rows >= (int64_t(1) << 31))  // coordinates are int32
    return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t byte_strides[1] = {static_cast<cuuint64_t>(cols) * 4};
  const cuuint32_t box[2] = {32, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = encode_tiled_fn()(map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 2, base, dims, byte_strides, box,
                                       element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                       CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}
}  // namespace detail

// The Q, K and V (and O) maps of a forward call (kernel parameter: __grid_constant__, so copies take its address).
struct FwdTmaMaps {  // CUtensorMap is 64-byte aligned itself
  CUtensorMap q, k, v;
  CUtensorMap o;  // written (64-row boxes) where store_o is set; unused otherwise
  // The warp-specialised forward stores O by the TMA from its own shared-memory buffer (set by its launcher where
  // the kernel has the buffer and the map could be made; 0: the consumers' threads store O). Here rather than in
  // FwdParams, whose layout every other kernel shares.
  int store_o;
  // Packed batches on the dynamic walk: tiles in SeqOrder's order (longest sequence first, no empty tiles).
  int seq_order;
  // 2: the grid runs in clusters of two blocks whose tiles share every K / V tile (consecutive query tiles of one
  // head, uniform rows), each block copying half of each into both (k and v then have boxes of half a key tile);
  // 0: every block copies its own.
  int cluster;
};

// ---- device ------------------------------------------------------------------------------------------------

namespace tma {

FA2_DEVICE void init_barrier(uint64_t* bar, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::mbarrier_init(bar, arrivals);
#endif
}
// Makes initialised barriers visible to the async proxy (the copies' complete_tx).
FA2_DEVICE void fence_barrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::fence_mbarrier_init(::cuda::ptx::sem_release, ::cuda::ptx::scope_cluster);
#endif
}
// Spins until the barrier's phase with the given parity has completed.
FA2_DEVICE void wait(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  while (!::cuda::ptx::mbarrier_try_wait_parity(bar, parity)) {
  }
#endif
}
// wait(a, pa) and wait(b, pb) with both barriers asked before either answer is read: where both phases have
// completed (a consumer's K and V, issued tiles earlier) that costs one round trip to the barriers, not two in a
// row (the WS forward's loop top, perf.md v32).
FA2_DEVICE void wait_both(uint64_t* a, uint32_t pa, uint64_t* b, uint32_t pb) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const bool ready_a = ::cuda::ptx::mbarrier_try_wait_parity(a, pa);
  const bool ready_b = ::cuda::ptx::mbarrier_try_wait_parity(b, pb);
  if (!(ready_a && ready_b)) {
    wait(a, pa);
    wait(b, pb);
  }
#endif
}
FA2_DEVICE void arrive(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)::cuda::ptx::mbarrier_arrive(bar);
#endif
}
// One arrival that also announces `bytes` of copies completing on this barrier's current phase.
FA2_DEVICE void arrive_expect_bytes(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  (void)::cuda::ptx::mbarrier_arrive_expect_tx(::cuda::ptx::sem_release, ::cuda::ptx::scope_cta,
                                               ::cuda::ptx::space_shared, bar, bytes);
#endif
}
// Fetches a tensor map (a __grid_constant__ kernel parameter) into the TMA unit's descriptor cache ahead of its
// first copy, so that copy does not wait for it (CUTLASS's prefetch_tma_descriptor). CCCL's cuda::ptx has no
// wrapper for prefetch.tensormap: inline PTX.
FA2_DEVICE void prefetch_map(const CUtensorMap* map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
#endif
}
// Box (col0, row0, head, batch) of the map into shared memory at dst (1024-byte aligned), completing on bar.
FA2_DEVICE void load_box(void* dst, const CUtensorMap* map, int col0, int row0, int head, int batch, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int32_t coords[4] = {col0, row0, head, batch};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_cluster, ::cuda::ptx::space_global, dst, map, coords, bar);
#endif
}

// ---- clusters of two blocks sharing K / V tiles (the WS forward's multicast copies) ----------------------------

// This block's rank in its cluster.
FA2_DEVICE uint32_t cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return ::cuda::ptx::get_sreg_cluster_ctarank();
#else
  return 0;
#endif
}
// Every thread of every block of the cluster, once all have arrived; what each wrote before (barrier
// initialisations included) is visible to the others after.
FA2_DEVICE void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::barrier_cluster_arrive(::cuda::ptx::sem_release);
  ::cuda::ptx::barrier_cluster_wait(::cuda::ptx::sem_acquire);
#endif
}
// The shared::cluster address of the variable at shared-memory address `addr` (this block's) in block `rank` of
// the cluster. (CCCL's cuda::ptx has no mapa; __cluster_map_shared_rank works on generic addresses and costs a
// dozen uniform instructions more.)
FA2_DEVICE uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t mapped = addr;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(mapped) : "r"(addr), "r"(rank));
#endif
  return mapped;
}
// One arrival on the barrier at shared::cluster address `bar` (map_to_rank), where `pred`: release semantics at
// CTA scope, as CUTLASS's ClusterBarrier::arrive(cta_id) (this thread's reads of the stage the barrier guards, by
// wgmma, are complete before the arrival). CCCL's wrapper of the shared::cluster form is release at cluster scope,
// which ptxas compiles to a MEMBAR.GPU before the arrival. Predicated, not branched: the release lanes' other
// arrival stays one instruction.
FA2_DEVICE void arrive_remote(uint32_t bar, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %1, 0;\n @p mbarrier.arrive.shared::cluster.b64 _, [%0];\n}\n" ::"r"(bar),
      "r"(static_cast<uint32_t>(pred))
      : "memory");
#endif
}
// Box (col0, row0, head, batch) of the map into shared memory at dst's offset in every block of cta_mask,
// completing on the barrier at bar's offset in each of them.
FA2_DEVICE void load_box_multicast(void* dst, const CUtensorMap* map, int col0, int row0, int head, int batch,
                                   uint64_t* bar, uint16_t cta_mask) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  const int32_t coords[4] = {col0, row0, head, batch};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_cluster, ::cuda::ptx::space_global, dst, map, coords, bar,
                                    cta_mask);
#endif
}
// Part `part` of kParts of a kRows x kCols tile (rows row0 .. row0 + kRows), that is its rows
// [part kRows / kParts, (part + 1) kRows / kParts), into the SwizzledTile<kRows, kCols> at dst in every block of
// cta_mask: one box per 64-column block, over a map whose boxes are kRows / kParts rows. Each part starts on a
// 1024-byte boundary (the 128-byte swizzle's period), so the parts land as the whole tile's copy would.
template <int kRows, int kCols, int kParts>
FA2_DEVICE void load_tile_part_multicast(unsigned char* dst, const CUtensorMap* map, int row0, int part, int head,
                                         int batch, uint64_t* bar, uint16_t cta_mask) {
  constexpr int kPartRows = kRows / kParts;
  static_assert(kRows % kParts == 0 && (kPartRows * 128) % 1024 == 0, "parts on the swizzle's 1024-byte period");
#pragma unroll
  for (int cb = 0; cb < kCols / 64; ++cb)
    load_box_multicast(dst + cb * kRows * 128 + part * kPartRows * 128, map, 64 * cb, row0 + part * kPartRows, head,
                       batch, bar, cta_mask);
}

// A kRows x kCols tile (rows row0 .. row0 + kRows of (head, batch)) into the SwizzledTile<kRows, kCols> at dst,
// one box per 64-column block, completing on bar (whose bytes the caller announced).
template <int kRows, int kCols>
FA2_DEVICE void load_tile(unsigned char* dst, const CUtensorMap* map, int row0, int head, int batch, uint64_t* bar) {
#pragma unroll
  for (int cb = 0; cb < kCols / 64; ++cb) load_box(dst + cb * kRows * 128, map, 64 * cb, row0, head, batch, bar);
}

// The 16-bit box at src (shared, 1024-byte aligned, 128-byte swizzled rows) into the map's box at (col0, row0,
// head, batch) in global memory, as one bulk operation of this thread's current bulk group; rows and columns past
// the tensor's end are not written. row0 must not be negative: unlike a copy into shared memory, such a store
// raised an illegal instruction on an H200 (perf.md v41).
FA2_DEVICE void store_box(const CUtensorMap* map, const void* src, int col0, int row0, int head, int batch) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int32_t coords[4] = {col0, row0, head, batch};
  ::cuda::ptx::cp_async_bulk_tensor(::cuda::ptx::space_global, ::cuda::ptx::space_shared, map, coords, src);
#endif
}

// Adds the float32 box at src (shared, 1024-byte aligned, 128-byte swizzled rows) into the map's box at
// (col0, row0) in global memory, as one bulk operation of this thread's current bulk group.
FA2_DEVICE void reduce_add_box(const CUtensorMap* map, const void* src, int col0, int row0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int32_t coords[2] = {col0, row0};
  ::cuda::ptx::cp_reduce_async_bulk_tensor(::cuda::ptx::space_global, ::cuda::ptx::space_shared, ::cuda::ptx::op_add,
                                           map, coords, src);
#endif
}
// Closes this thread's bulk group (the reduce-adds issued since the last commit).
FA2_DEVICE void bulk_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::cp_async_bulk_commit_group();
#endif
}
// Waits until at most kPending of this thread's bulk groups still read their shared-memory sources.
template <int kPending>
FA2_DEVICE void bulk_wait_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::cp_async_bulk_wait_group_read(::cuda::ptx::n32_t<kPending>{});
#endif
}
// Waits until at most kPending of this thread's bulk groups are incomplete (their global writes done).
template <int kPending>
FA2_DEVICE void bulk_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::cp_async_bulk_wait_group(::cuda::ptx::n32_t<kPending>{});
#endif
}

// Orders this thread's generic-proxy accesses of global memory with its async-proxy ones (bulk copies and
// reduce-adds), both ways.
FA2_DEVICE void fence_proxy_async_global() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  ::cuda::ptx::fence_proxy_async(::cuda::ptx::space_global);
#endif
}

// Register budget of this warpgroup (all its threads call it): producers give registers back, consumers take them.
template <int kRegs>
FA2_DEVICE void shrink_registers() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
FA2_DEVICE void grow_registers() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// A barrier among `threads` threads of the block (a multiple of 32), id 1..15 (0 is __syncthreads).
FA2_DEVICE void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this warp's threads toward barrier `id` without waiting (the other side calls named_sync).
FA2_DEVICE void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace tma
}  // namespace flash_attn2::cuda
