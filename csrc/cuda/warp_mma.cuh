// Warp-level tile GEMMs on mma.sync m16n8k16: fragment loads from swizzled shared memory via ldmatrix and
// the unrolled fragment loops. Accumulators are acc[MT][NT][4]: MT 16-row tiles x NT 8-column tiles.
#pragma once

#include <cstdint>

#include "cuda/smem_tile.cuh"
#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// Fragment loads. Every position is split into a runtime part (lane / warp dependent, loop invariant) and a
// compile-time part (unrolled loop indices), see SwizzledTile::frag_addr.

// A operand (16x16 at rows m_var + m_const, cols k_const) of a matrix stored row-major [m][k] in Tile.
template <class Tile>
FA2_DEVICE void load_a(uint32_t (&a)[4], uint32_t s_base, int m_var, int m_const, int k_const, int lane) {
  ldmatrix_x4(a, Tile::template frag_addr<false>(s_base, m_var + (lane & 15), m_const, lane >> 4, k_const >> 3));
}
// A operand of a matrix whose transpose is stored row-major [k][m] in Tile (e.g. P^T read from sP[m][n]).
template <class Tile, bool kVar>
FA2_DEVICE void load_a_trans(uint32_t (&a)[4], uint32_t s_base, int m_var, int m_const, int k_const, int lane) {
  ldmatrix_x4_trans(a, Tile::template frag_addr<kVar>(s_base, (lane & 7) + ((lane >> 4) << 3), k_const,
                                                      (m_var >> 3) + ((lane >> 3) & 1), m_const >> 3));
}
// B operand for two n8 tiles (cols n..n+15) x 16 k of a matrix B[k][n] stored as [n][k] (e.g. K for Q K^T).
// b[0], b[1]: first n8 tile; b[2], b[3]: second.
template <class Tile>
FA2_DEVICE void load_b(uint32_t (&b)[4], uint32_t s_base, int n_var, int n_const, int k_const, int lane) {
  ldmatrix_x4(b, Tile::template frag_addr<false>(s_base, n_var + (lane & 7) + ((lane >> 4) << 3), n_const,
                                                 (lane >> 3) & 1, k_const >> 3));
}
// Same, for B stored row-major as [k][n] (e.g. V for P V).
template <class Tile, bool kVar>
FA2_DEVICE void load_b_trans(uint32_t (&b)[4], uint32_t s_base, int n_var, int n_const, int k_const, int lane) {
  ldmatrix_x4_trans(b, Tile::template frag_addr<kVar>(s_base, (lane & 7) + (((lane >> 3) & 1) << 3), k_const,
                                                      (n_var >> 3) + (lane >> 4), n_const >> 3));
}

template <class Tile, bool kTrans, bool kVar>
FA2_DEVICE void load_a_op(uint32_t (&a)[4], uint32_t s_base, int m_var, int m_const, int k_const, int lane) {
  if constexpr (kTrans) load_a_trans<Tile, kVar>(a, s_base, m_var, m_const, k_const, lane);
  else load_a<Tile>(a, s_base, m_var, m_const, k_const, lane);
}
template <class Tile, bool kTrans, bool kVar>
FA2_DEVICE void load_b_op(uint32_t (&b)[4], uint32_t s_base, int n_var, int n_const, int k_const, int lane) {
  if constexpr (kTrans) load_b_trans<Tile, kVar>(b, s_base, n_var, n_const, k_const, lane);
  else load_b<Tile>(b, s_base, n_var, n_const, k_const, lane);
}

// Operand descriptor for gemm_ss: tile layout, whether it is stored transposed relative to the mma operand
// (A as [k][m], B as [k][n]), and whether its column position has a runtime (per-warp) part.
template <class Tile_, bool kTrans_, bool kVar_ = false>
struct Operand {
  using Tile = Tile_;
  static constexpr bool kTrans = kTrans_;
  static constexpr bool kVar = kVar_;
};

template <int MT, int NT>
FA2_DEVICE void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
}

// part[ks % kChains][MT][NT] += the k step ks of A[m_var .. +16MT, 0 .. 16KS] * B[0 .. 16KS, n_var .. +8NT], both
// operands in shared memory: the k steps dealt round-robin to kChains accumulators. m_var / n_var are the warp's
// (runtime) offsets, multiples of 16.
template <typename T, int MT, int NT, int KS, int kChains, class OpA, class OpB>
FA2_DEVICE void gemm_ss_steps(float (&part)[kChains][MT][NT][4], uint32_t sA, int m_var, uint32_t sB, int n_var,
                              int lane) {
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
      load_a_op<typename OpA::Tile, OpA::kTrans, OpA::kVar>(a[mi], sA, m_var, mi * 16, ks * 16, lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_op<typename OpB::Tile, OpB::kTrans, OpB::kVar>(b, sB, n_var, np * 16, ks * 16, lane);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(part[ks % kChains][mi][2 * np], a[mi], b[0], b[1]);
        mma_16816<T>(part[ks % kChains][mi][2 * np + 1], a[mi], b[2], b[3]);
      }
    }
  }
}

// acc[MT][NT] += A[m_var .. +16MT, 0 .. 16KS] * B[0 .. 16KS, n_var .. +8NT], both operands in shared memory.
template <typename T, int MT, int NT, int KS, class OpA, class OpB>
FA2_DEVICE void gemm_ss(float (&acc)[MT][NT][4], uint32_t sA, int m_var, uint32_t sB, int n_var, int lane) {
  gemm_ss_steps<T, MT, NT, KS, 1, OpA, OpB>(reinterpret_cast<float (&)[1][MT][NT][4]>(acc), sA, m_var, sB, n_var,
                                            lane);
}

// gemm_ss with the k steps over kChains accumulators, summed into acc at the end: kChains independent mma
// dependency chains per n8 tile instead of one, for GEMMs too small to hide an mma's latency otherwise (the
// split-KV kernel's 16 x 16 score tile per warp: 2 n8 tiles, d / 16 steps deep).
template <typename T, int MT, int NT, int KS, int kChains, class OpA, class OpB>
FA2_DEVICE void gemm_ss_chains(float (&acc)[MT][NT][4], uint32_t sA, int m_var, uint32_t sB, int n_var, int lane) {
  float part[kChains][MT][NT][4];
#pragma unroll
  for (int c = 0; c < kChains; ++c) zero_acc(part[c]);
  gemm_ss_steps<T, MT, NT, KS, kChains, OpA, OpB>(part, sA, m_var, sB, n_var, lane);
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = part[0][mi][ni][e];
#pragma unroll
        for (int c = 1; c < kChains; ++c) x += part[c][mi][ni][e];
        acc[mi][ni][e] += x;
      }
}

// acc[MT][NT] += A * B with A already in registers as mma A fragments a[MT][KS][4].
template <typename T, int MT, int NT, int KS, class OpB>
FA2_DEVICE void gemm_rs(float (&acc)[MT][NT][4], const uint32_t (&a)[MT][KS][4], uint32_t sB, int n_var, int lane) {
  static_assert(NT % 2 == 0, "B fragments are loaded two n8 tiles at a time");
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t b[4];
      load_b_op<typename OpB::Tile, OpB::kTrans, OpB::kVar>(b, sB, n_var, np * 16, ks * 16, lane);
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        mma_16816<T>(acc[mi][2 * np], a[mi][ks], b[0], b[1]);
        mma_16816<T>(acc[mi][2 * np + 1], a[mi][ks], b[2], b[3]);
      }
    }
  }
}

// Re-packs an fp32 C accumulator (MT x NT n8 tiles) as T A-fragments (MT x NT/2 k16 steps): the C layout of
// two adjacent n8 tiles is exactly the A layout of one 16x16 tile, so no data moves between threads.
template <typename T, int MT, int NT>
FA2_DEVICE void acc_to_a_frags(uint32_t (&a)[MT][NT / 2][4], const float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ks = 0; ks < NT / 2; ++ks) {
      a[mi][ks][0] = pack2<T>(acc[mi][2 * ks][0], acc[mi][2 * ks][1]);
      a[mi][ks][1] = pack2<T>(acc[mi][2 * ks][2], acc[mi][2 * ks][3]);
      a[mi][ks][2] = pack2<T>(acc[mi][2 * ks + 1][0], acc[mi][2 * ks + 1][1]);
      a[mi][ks][3] = pack2<T>(acc[mi][2 * ks + 1][2], acc[mi][2 * ks + 1][3]);
    }
}

// Writes an accumulator (rows m0 + 16mi + {g, g+8}, cols n0 + 8ni + 2t + {0,1}) into a swizzled tile as T,
// multiplied by `scale`.
template <typename T, class Tile, int MT, int NT>
FA2_DEVICE void store_acc(T* s, const float (&acc)[MT][NT][4], int m0, int n0, int lane, float scale) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int ni = 0; ni < NT; ++ni) {
      const int r = m0 + mi * 16 + g, c = n0 + ni * 8 + 2 * t;
      st_pair<Tile, T>(s, r, c, acc[mi][ni][0] * scale, acc[mi][ni][1] * scale);
      st_pair<Tile, T>(s, r + 8, c, acc[mi][ni][2] * scale, acc[mi][ni][3] * scale);
    }
}

// One stmatrix.x4 (sm_90): the four registers are four 8 x 8 matrices of 16-bit elements, lane 8 i + j giving
// the address of row j of matrix i (kTrans: row j in memory is column j of the fragments). Inline PTX: the
// cuda::ptx of CUDA 13.0's CCCL has no stmatrix yet.
template <bool kTrans>
FA2_DEVICE void stmatrix_x4(uint32_t addr, const uint32_t (&r)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kTrans) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
  } else {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
                 "r"(r[1]), "r"(r[2]), "r"(r[3])
                 : "memory");
  }
#else
  __trap();
#endif
}

// store_acc for one 16-row tile already packed as A fragments (acc_to_a_frags: a[0][k] holds n8 tiles 2k and
// 2k + 1, rows g and g + 8), at scale 1: one stmatrix per k instead of four 4-byte stores, matrix i = (n8 tile
// 2k + nd, rows m0 + 8 h + {0..7}) with h = i & 1, nd = i >> 1, each of its rows one 16-byte chunk of Tile.
// m0 is a multiple of 8; s_u is Tile's shared-space byte address.
template <class Tile, int KS>
FA2_DEVICE void store_frags(uint32_t s_u, const uint32_t (&a)[1][KS][4], int m0, int lane) {
  const int i = lane >> 3, j = lane & 7;
  const int h = i & 1, nd = i >> 1;
#pragma unroll
  for (int k = 0; k < KS; ++k)
    stmatrix_x4<false>(s_u + 2u * static_cast<uint32_t>(Tile::chunk_offset(m0 + 8 * h + j, 2 * k + nd)), a[0][k]);
}

// The transpose of store_frags: element (m0 + r, c) goes to (c, m0 + r) of Tile, eight consecutive rows of the
// accumulator in one 16-byte chunk, by stmatrix.trans: lane 8 i + j addresses row 8 (2 k + nd) + j of Tile,
// chunk (m0 >> 3) + h.
template <class Tile, int KS>
FA2_DEVICE void store_frags_transposed(uint32_t s_u, const uint32_t (&a)[1][KS][4], int m0, int lane) {
  const int i = lane >> 3, j = lane & 7;
  const int h = i & 1, nd = i >> 1;  // matrix i: n8 tile 2k + nd, rows g + 8 h
#pragma unroll
  for (int k = 0; k < KS; ++k)
    stmatrix_x4<true>(s_u + 2u * static_cast<uint32_t>(Tile::chunk_offset(8 * (2 * k + nd) + j, (m0 >> 3) + h)),
                      a[0][k]);
}

}  // namespace flash_attn2::cuda
