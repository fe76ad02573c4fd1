// Hopper (sm_90a) warpgroup MMA: shared-memory matrix descriptors for the 128-byte-swizzled tiles of
// smem_tile.cuh, and thin wrappers over wgmma.mma_async / fence / commit / wait. CCCL's cuda::ptx has no
// wgmma.mma_async, so the MMA itself is inline PTX; only code compiled for sm_90a may call these.
//
// Layouts (PTX ISA, "Shared Memory Matrix Layout"): a SwizzledTile<R, C> with C % 64 == 0 at a 1024-byte
// aligned address is exactly the hardware's 128-byte swizzle (16-byte chunk index XOR row % 8, rows of 128 B,
// column blocks of R x 64 elements), so one tile serves as either operand in either major-ness:
//   K-major  (the tile's columns are the K dim):  8-row groups 1024 B apart (SBO); a K step of 16 elements
//            moves the start 32 B inside the 128-byte row, or to the next column block.
//   MN-major (the tile's rows are the K dim):     8-row K groups 1024 B apart (SBO); 64-element MN blocks are
//            the tile's column blocks, R * 128 B apart (LBO); a K step of 16 rows moves the start 16 * 128 B.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda::sm90 {

// Descriptor of a 128-byte-swizzled operand starting at shared-space byte address `addr`.
FA2_DEVICE uint64_t smem_desc_sw128(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>(lbo_bytes >> 4) << 16) |
         (static_cast<uint64_t>(sbo_bytes >> 4) << 32) | (1ull << 62);
}

// The descriptor of the operand `bytes` (a multiple of 16) past the one `desc` describes. Shared-space addresses
// of a block stay below 2^18 (228 KB), so the start field (bits 0-13, the address >> 4) never carries into the
// next: adding to the low word is enough (as CUTLASS's descriptor iterator does). A tile's k-steps then cost one
// add each on top of the tile's descriptor, which the compiler computes once, instead of four operations each.
FA2_DEVICE uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xFFFFFFFF00000000ull) | lo;
}

// Operand of K-major use: rows [row0, row0 + 64 or N) of Tile, K columns [16 ks, 16 ks + 16).
template <class Tile>
FA2_DEVICE uint64_t desc_k_major(uint32_t tile, int row0, int ks) {
  static_assert(Tile::kBK == 64, "wgmma operands need 64-element (128-byte) column blocks");
  return desc_advance(smem_desc_sw128(tile, 16, 1024),
                      static_cast<uint32_t>((ks / 4) * Tile::kRows * 128 + row0 * 128 + (ks % 4) * 32));
}

// Operand of MN-major use: K rows [16 ks, 16 ks + 16) of Tile, MN columns from column block `col_block`.
template <class Tile>
FA2_DEVICE uint64_t desc_mn_major(uint32_t tile, int col_block, int ks) {
  static_assert(Tile::kBK == 64, "wgmma operands need 64-element (128-byte) column blocks");
  return desc_advance(smem_desc_sw128(tile, Tile::kRows * 128, 1024),
                      static_cast<uint32_t>(col_block * Tile::kRows * 128 + ks * 16 * 128));
}

// Orders register accesses of the warpgroup before the following wgmma.mma_async (accumulators written by
// ordinary instructions, A fragments just computed).
FA2_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
FA2_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most N committed groups are pending.
template <int N>
FA2_DEVICE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers in program order at a wgmma_wait: accumulators (outputs of the asm that issued the MMA, so
// the compiler could otherwise read them before the wait) and register A fragments (inputs the MMA may still
// be reading, so the compiler must not reuse their registers before the wait).
template <int NT>
FA2_DEVICE void fence_regs(float (&d)[1][NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[0][i][j])::"memory");
}
template <int KS>
FA2_DEVICE void fence_regs(uint32_t (&a)[1][KS][4]) {
#pragma unroll
  for (int i = 0; i < KS; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[0][i][j])::"memory");
}

// The m64nNk16 accumulator of a warp is the mma.sync C layout of one 16-row tile by N/8 n8 tiles, so the
// warp_mma.cuh helpers (masking, softmax, acc_to_a_frags, store_acc) work on it viewed as acc[1][N/8][4].
template <int NT>
FA2_DEVICE float (&flat(float (&acc)[1][NT][4]))[NT * 4] {
  return reinterpret_cast<float(&)[NT * 4]>(acc);
}

// Columns [n0, n0 + N) of such an accumulator as the operand of a WgmmaOp<T, N> (n0 a multiple of N known at
// compile time after unrolling), for products wider than one instruction.
template <int N, int NT>
FA2_DEVICE float (&acc_cols(float (&acc)[1][NT][4], int n0))[N / 2] {
  return reinterpret_cast<float(&)[N / 2]>(acc[0][n0 / 8][0]);
}

// Shared memory written by ordinary stores or cp.async, read next by wgmma (the async proxy).
FA2_DEVICE void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// D[64 x N] (+)= A[64 x 16] * B[16 x N], fp32 accumulators in the m64nNk16 fragment layout:
// d[i] is row 16 * (warp % 4) + lane / 4 + 8 * ((i / 2) % 2), column 8 * (i / 4) + 2 * (lane % 4) + i % 2.
//   ss: A and B from shared memory (descriptors); kTransA / kTransB = 1 for MN-major operands.
//   rs: A from registers in the mma.sync m16n8k16 A layout (rows of this warp's 16), B from shared memory.
template <typename T, int N>
struct WgmmaOp;

#define FA2_ACC8(i)                                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define FA2_ACC32 FA2_ACC8(0), FA2_ACC8(8), FA2_ACC8(16), FA2_ACC8(24)
#define FA2_ACC64 FA2_ACC32, FA2_ACC8(32), FA2_ACC8(40), FA2_ACC8(48), FA2_ACC8(56)
#define FA2_ACC40 FA2_ACC32, FA2_ACC8(32)
#define FA2_REGS32                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FA2_REGS64                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "  \
  "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

#define FA2_REGS24                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23}"
#define FA2_ACC24 FA2_ACC8(0), FA2_ACC8(8), FA2_ACC8(16)

#define FA2_REGS40                                                                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
  "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}"

// N: columns; R = N / 2 accumulators; ACC / REGS: their constraint and operand lists; the operand numbers
// after them (R, R+1, ...) are spelled out as A0..A6.
#define FA2_WGMMA_OP(ELEM, PTX_TYPE, N, R, ACC, REGS, A0, A1, A2, A3, A4, A5, A6)                              \
  template <>                                                                                                  \
  struct WgmmaOp<ELEM, N> {                                                                                    \
    template <int kTransA, int kTransB>                                                                        \
    static FA2_DEVICE void ss(float (&d)[R], uint64_t desc_a, uint64_t desc_b, int accumulate) {               \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" A2 ", 0;\n"                                            \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " " REGS            \
                   ", %" A0 ", %" A1 ", p, 1, 1, %" A3 ", %" A4 ";\n}\n"                                      \
                   : ACC                                                                                       \
                   : "l"(desc_a), "l"(desc_b), "r"(accumulate), "n"(kTransA), "n"(kTransB));                   \
    }                                                                                                          \
    template <int kTransB>                                                                                     \
    static FA2_DEVICE void rs(float (&d)[R], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" A5 ", 0;\n"                                            \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE "." PTX_TYPE " " REGS            \
                   ", {%" A0 ", %" A1 ", %" A2 ", %" A3 "}, %" A4 ", p, 1, 1, %" A6 ";\n}\n"                  \
                   : ACC                                                                                       \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate), "n"(kTransB)); \
    }                                                                                                          \
  };

FA2_WGMMA_OP(__nv_bfloat16, "bf16", 64, 32, FA2_ACC32, FA2_REGS32, "32", "33", "34", "35", "36", "37", "38")
FA2_WGMMA_OP(__half, "f16", 64, 32, FA2_ACC32, FA2_REGS32, "32", "33", "34", "35", "36", "37", "38")
FA2_WGMMA_OP(__nv_bfloat16, "bf16", 128, 64, FA2_ACC64, FA2_REGS64, "64", "65", "66", "67", "68", "69", "70")
FA2_WGMMA_OP(__half, "f16", 128, 64, FA2_ACC64, FA2_REGS64, "64", "65", "66", "67", "68", "69", "70")
// N = 48: the WS backward's partial last step (kWsBwdPartialRows).
FA2_WGMMA_OP(__nv_bfloat16, "bf16", 48, 24, FA2_ACC24, FA2_REGS24, "24", "25", "26", "27", "28", "29", "30")
FA2_WGMMA_OP(__half, "f16", 48, 24, FA2_ACC24, FA2_REGS24, "24", "25", "26", "27", "28", "29", "30")
FA2_WGMMA_OP(__nv_bfloat16, "bf16", 80, 40, FA2_ACC40, FA2_REGS40, "40", "41", "42", "43", "44", "45", "46")
FA2_WGMMA_OP(__half, "f16", 80, 40, FA2_ACC40, FA2_REGS40, "40", "41", "42", "43", "44", "45", "46")

#undef FA2_WGMMA_OP
#undef FA2_REGS40
#undef FA2_REGS24
#undef FA2_ACC24
#undef FA2_REGS64
#undef FA2_REGS32
#undef FA2_ACC40
#undef FA2_ACC64
#undef FA2_ACC32
#undef FA2_ACC8

}  // namespace flash_attn2::cuda::sm90
