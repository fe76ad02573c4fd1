// Causal and sequence-length masking of score fragments (set to -inf).
#pragma once

#include <cmath>

#include "cuda/tile_primitives.cuh"

namespace flash_attn2::cuda {

// Key j is visible to query i iff j < seqlen_k and (!causal or j <= i + diag), diag = seqlen_k - seqlen_q
// (bottom-right aligned causal mask).
//
// Does a key tile [key0, key0 + block_n) need any masking for the query tile starting at query row0?
// Tiles entirely below the diagonal and inside seqlen_k do not; only the ones crossing it do.
FA2_DEVICE bool tile_needs_mask(int row0, int key0, int block_n, int seqlen_k, bool causal, int diag) {
  const int last_key = key0 + block_n - 1;
  const int lim = causal ? min(row0 + diag, seqlen_k - 1) : seqlen_k - 1;
  return last_key > lim;
}

// s[MT][NT] is an mma C accumulator: element (mi, ni, e) is at row row0 + 16mi + 8(e/2), column
// col0 + 8ni + (e%2), where row0 / col0 are the thread's global query / key index for (0, 0, 0).
template <int MT, int NT>
FA2_DEVICE void apply_mask(float (&s)[MT][NT][4], int row0, int col0, int seqlen_k, bool causal, int diag) {
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + mi * 16 + h * 8;
      const int limit = causal ? min(seqlen_k, row + diag + 1) : seqlen_k;  // first invisible key
#pragma unroll
      for (int ni = 0; ni < NT; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + ni * 8 + e;
          if (col >= limit) s[mi][ni][2 * h + e] = -INFINITY;
        }
    }
}

}  // namespace flash_attn2::cuda
