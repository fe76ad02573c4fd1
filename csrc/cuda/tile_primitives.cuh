// Thin device wrappers around the sm80+ instructions the FlashAttention-2 kernels are built from.
// CCCL's cuda::ptx covers the bulk/TMA/mbarrier family but not the Ampere-style cp.async (with zero-fill),
// ldmatrix or mma.sync, so those are inline PTX here.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace flash_attn2::cuda {

#define FA2_DEVICE __device__ __forceinline__

// ---------------------------------------------------------------------------------------------------------
// Shared-memory addressing.
FA2_DEVICE uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// The block's dynamic shared memory from its first kAlign-aligned byte (the Hopper kernels ask for kAlign bytes of
// slack for it: wgmma / TMA tiles with the 128-byte swizzle need 1024-byte alignment), as a pointer and as a
// shared-space address.
struct AlignedSmem {
  unsigned char* ptr;
  uint32_t addr;
};
template <int kAlign>
FA2_DEVICE AlignedSmem aligned_smem(unsigned char* raw) {
  const uint32_t raw_u = smem_u32(raw);
  const uint32_t addr = (raw_u + kAlign - 1) & ~static_cast<uint32_t>(kAlign - 1);
  return {raw + (addr - raw_u), addr};
}

// ---------------------------------------------------------------------------------------------------------
// Instruction order.
// Ends ptxas's instruction block here, after every instruction that computes v: a branch on v whose body (a
// zero-length sleep) is all but never taken and harmless when it is. Within a block ptxas's scheduler may move
// register-only work past a wgmma_wait, and the empty asm of fence_regs does not stop it (it emits no PTX). So a
// softmax written between an MMA's issue and its wait, to run under that MMA, was issued after the wait,
// interleaved with the rescale and conversion that need the MMA done (perf.md v27). Called between such work and
// the wait, with a v that depends on all of that work, it keeps the work before the wait. Measured per kernel: the
// forward's softmax at d128 / d256 gains, at d64 not; the Hopper backward's P^T before dP^T's wait lost 3-8%.
FA2_DEVICE void issue_boundary(uint32_t v) {
  if (__any_sync(0xffffffffu, v == 0xffffffffu)) asm volatile("nanosleep.u32 0;\n" ::: "memory");
}
FA2_DEVICE void issue_boundary(float v) { issue_boundary(__float_as_uint(v)); }

// ---------------------------------------------------------------------------------------------------------
// cp.async: 16-byte global->shared copy bypassing L1. When `pred` is false the source size is 0: nothing is
// read and the 16 destination bytes are zero-filled (so `src` only has to be some valid pointer).
FA2_DEVICE void cp_async_16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
// The same under an L2 cache policy (l2_policy): evict-first for streams read once, so that they leave what else
// sits in L2 (code, partials, the next kernel's inputs) in place; evict-unchanged (as a load without a hint) for
// data other blocks read again. Not evict-normal: given explicitly, it read the long decode rows' single-reader
// streams at 0.84-0.94 of evict-first on an H200 (perf.md v20), where loads without a hint read them level.
FA2_DEVICE uint64_t l2_policy(bool read_once) {
  uint64_t first, unchanged;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(first));
  asm volatile("createpolicy.fractional.L2::evict_unchanged.b64 %0, 1.0;\n" : "=l"(unchanged));
  return read_once ? first : unchanged;
}
FA2_DEVICE void cp_async_16_policy(uint32_t dst, const void* src, bool pred, uint64_t policy) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src), "r"(src_size),
               "l"(policy) : "memory");
}
// 4-byte variant (row statistics such as the LSE; .cg takes only 16 bytes, so this one goes through L1).
FA2_DEVICE void cp_async_4(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_size) : "memory");
}
FA2_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups are still in flight.
template <int N>
FA2_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---------------------------------------------------------------------------------------------------------
// ldmatrix: four 8x8 b16 matrices; lane l supplies the row address of matrix l/8, row l%8.
// Result register i holds matrix i's elements (row lane/4, cols 2*(lane%4), +1) -- or, with .trans, the
// transposed matrix's: (rows 2*(lane%4), +1 ; col lane/4).
FA2_DEVICE void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
FA2_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// ---------------------------------------------------------------------------------------------------------
// mma.sync m16n8k16, fp32 accumulate. A: 4 regs (row-major 16x16), B: 2 regs (16x8 "col"), C/D: 4 floats.
// Fragment ownership (g = lane/4, t = lane%4):
//   A: a0=(g, 2t..2t+1) a1=(g+8, 2t..) a2=(g, 2t+8..) a3=(g+8, 2t+8..)
//   B: b0=(k=2t..2t+1, n=g) b1=(k=2t+8.., n=g)
//   C: c0,c1=(g, 2t..2t+1) c2,c3=(g+8, 2t..2t+1)
template <typename T>
struct MmaOp;

template <>
struct MmaOp<__nv_bfloat16> {
  static FA2_DEVICE void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct MmaOp<__half> {
  static FA2_DEVICE void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T>
FA2_DEVICE void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  MmaOp<T>::run(c, a, b0, b1);
}

// ---------------------------------------------------------------------------------------------------------
// fp32 pair -> packed 16-bit pair (lo in the low half).
template <typename T>
FA2_DEVICE uint32_t pack2(float lo, float hi);

template <>
FA2_DEVICE uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
FA2_DEVICE uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Packed 16-bit pair -> fp32 pair.
template <typename T>
FA2_DEVICE float2 unpack2(uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&v));
  }
}

// 8 consecutive 16-bit values (one 16-byte chunk) <-> fp32.
template <typename T>
FA2_DEVICE void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      __nv_bfloat162 h = *reinterpret_cast<const __nv_bfloat162*>(&w[i]);
      float2 p = __bfloat1622float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    } else {
      __half2 h = *reinterpret_cast<const __half2*>(&w[i]);
      float2 p = __half22float2(h);
      f[2 * i] = p.x;
      f[2 * i + 1] = p.y;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Returns x, hidden from the optimiser: values derived from it inside a loop body are recomputed there instead
// of being hoisted out and kept live across the whole loop (trades a few ALU ops for registers).
FA2_DEVICE int opaque(int x) {
  int y;
  asm volatile("mov.b32 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

#ifdef FLASH_ATTN2_SPLITKV_TIMELINE
// Debug builds only: a block's timeline stamps (scripts/splitkv_timeline.py). Slots: 0 %globaltimer (ns) at
// entry, 1 clock64 at entry, 2 after the wait for the previous grid, 3 when the first key tile landed and 4 after
// the key loop (split-KV only), 5 at the end, 6 %globaltimer at the end, 7 %smid; inside the 16-row split-KV
// epilogue 8 after the stats barrier, 9 after the scaled rows' barrier, 10 after the merge's stores; inside the
// combine 8 after the weights' barrier, 9 after the sums' barrier.
FA2_DEVICE unsigned long long timeline_ns() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
FA2_DEVICE unsigned timeline_smid() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
#define FA2_TIMELINE(p, slot, value)                                                                \
  do {                                                                                              \
    if ((p).timeline != nullptr && threadIdx.x == 0)                                                \
      (p).timeline[((static_cast<long long>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +      \
                    blockIdx.x) * kTimelineSlots + (slot)] = (value);                               \
  } while (0)
#else
#define FA2_TIMELINE(p, slot, value) \
  do {                               \
  } while (0)
#endif

// Programmatic dependent launch (detail::launch_dependent): wait until the previous kernel of the stream has
// finished and its writes are visible / let the next kernel launch now. No-ops below sm_90 and for kernels
// launched without the attribute.
FA2_DEVICE void wait_for_previous_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();
#endif
}
FA2_DEVICE void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaTriggerProgrammaticLaunchCompletion();
#endif
}

// A hint: the 128-byte line holding `ptr` into L2 (prefetch.global.L2; no register written, nothing waited on).
FA2_DEVICE void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// ---------------------------------------------------------------------------------------------------------
// Fast math: ex2.approx (exp2(-inf) = +0).
FA2_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 1 / x within an ulp for normal x (rcp.approx.ftz: no slow path for IEEE division's corner cases).
FA2_DEVICE float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Reductions over the 4 lanes of a quad (the 4 threads that share a row of an mma C fragment).
FA2_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return x;
}
FA2_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x;
}
// quad_max (kMax) or quad_sum of every row of v in place, each shuffle round for all rows side by side, so that the
// rows' shuffle latencies overlap instead of running one row after the other.
template <bool kMax, int MT>
FA2_DEVICE void quad_reduce_rows(float (&v)[MT][2]) {
#pragma unroll
  for (int x = 2; x >= 1; x /= 2)
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float other = __shfl_xor_sync(0xffffffffu, v[mi][h], x);
        v[mi][h] = kMax ? fmaxf(v[mi][h], other) : v[mi][h] + other;
      }
}

// ---------------------------------------------------------------------------------------------------------
// Fire-and-forget fp32 atomics into global memory (dQ accumulation).
FA2_DEVICE void red_add_f32(float* addr, float v) {
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(addr), "f"(v) : "memory");
}
// Two consecutive floats; addr must be 8-byte aligned. Vector red needs sm_90.
FA2_DEVICE void red_add_f32x2(float* addr, float v0, float v1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(v0), "f"(v1) : "memory");
#else
  red_add_f32(addr, v0);
  red_add_f32(addr + 1, v1);
#endif
}

}  // namespace flash_attn2::cuda
