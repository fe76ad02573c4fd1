// 2^x on FMA and integer instructions instead of the special-function unit (FlashAttention-4 splits a softmax's
// exponentials between the two where the MUFU is the busier pipe, as under a softcap, whose tanh takes it too).
// Host and device: the kernels use it (tile_primitives.cuh), cpp_tests/test_fast_math.cpp checks it on the CPU.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FA2_HD __host__ __device__ __forceinline__
#else
#define FA2_HD inline
#endif

namespace flash_attn2 {

FA2_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}
FA2_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// x = j + f with j = round(x) (adding 1.5 * 2^23 leaves j in the low mantissa bits), 2^f by a degree-4
// polynomial fitted on [-0.5, 0.5] (relative error <= 2.8e-6; ex2.approx: ~2.4e-7, both far below a bf16 / fp16
// probability's rounding), j added to the exponent bits (unsigned: the shift wraps). x < -126 (-inf included)
// gives 0; valid up to x < 128.
FA2_HD float exp2_fma(float x) {
  const float xc = x > -126.f ? x : -126.f;
  const float t = xc + 12582912.f;
  const float f = xc - (t - 12582912.f);
  float p = f * 0.009560515f + 0.05591708f;
  p = p * f + 0.24024981f;
  p = p * f + 0.69312197f;
  p = p * f + 0.99999917f;
  const float y = bits_float(float_bits(p) + (float_bits(t) << 23));
  return x < -126.f ? 0.f : y;
}

}  // namespace flash_attn2
