// The softcap's tanh on the FMA pipe: where every score of a warp's tile is small enough, tanh(cap_in x) is an odd
// polynomial of x instead of a `tanh.approx` on the MUFU pipe, which the softcap forward otherwise keeps as busy as
// the tensor cores (a tanh and an exp2 per score at d128, perf.md v11 / v17). The kernels pick it per warp and
// tile (mask.cuh: softcap_poly_fits), so large scores still go through tanh.approx and the result holds anywhere.
//
//   tanh(y) = y (c0 + c1 y^2 + c2 y^4 + c3 y^6) for |y| <= 1,
//
// coefficients fitted for the least maximum relative error on [0, 1] (reweighted least squares): 8.2e-5 relative,
// float32 Horner included, against tanh.approx.f32's 2^-11 = 4.9e-4. With y = cap_in x folded into them,
// tanh(cap_in x) = x Q(x^2), Q(z) = sum_i c_i cap_in^(2i+1) z^i: a multiply, three FMAs and a multiply per score.
#pragma once

#include <cfloat>
#include <cmath>

#include "attention_rule.h"

namespace flash_attn2::cuda {

struct SoftcapPoly {
  float unit[4];  // Q's coefficients: x Q(x^2) = tanh(cap_in x)
  float out[4];   // the same times cap_out: x Q(x^2) = cap_out tanh(cap_in x)
  float x_max;    // the polynomial holds for |x| <= x_max; -1: never (no softcap, or turned off)
};

inline constexpr double kTanhPoly[4] = {0.99991858005523682, -0.33065429329872131, 0.11889753490686417,
                                        -0.026629667729139328};

// The coefficients for a softcap (cap_in, cap_out as in ScoreRule; cap_in = 0: none). Off where a folded
// coefficient would not be a normal float (a float32 flush would drop a term) or x_max^2 would overflow: such
// softcaps keep tanh.approx. enabled = false (FLASH_ATTN2_SOFTCAP_POLY=0, A/B runs and tests) keeps it too.
inline SoftcapPoly make_softcap_poly(float cap_in, float cap_out, bool enabled) {
  SoftcapPoly p{};
  p.x_max = -1.f;
  if (!enabled || !(cap_in > 0.f)) return p;
  const double a = cap_in, x_max = 1.0 / a;
  if (!(x_max * x_max < 1e30)) return p;
  double power = a;  // a^(2i+1)
  for (int i = 0; i < 4; ++i, power *= a * a) {
    const double u = kTanhPoly[i] * power, o = u * cap_out;
    if (!(std::fabs(u) >= FLT_MIN && std::fabs(u) <= FLT_MAX && std::fabs(o) >= FLT_MIN && std::fabs(o) <= FLT_MAX))
      return SoftcapPoly{{}, {}, -1.f};
    p.unit[i] = static_cast<float>(u);
    p.out[i] = static_cast<float>(o);
  }
  p.x_max = static_cast<float>(x_max);
  return p;
}

// x Q(x^2) with Q's coefficients k (unit or out): the kernels' softcap where softcap_poly_fits (mask.cuh).
FA2_HD float softcap_poly(float x, const float (&k)[4]) {
  const float z = x * x;
  return x * fmaf(fmaf(fmaf(k[3], z, k[2]), z, k[1]), z, k[0]);
}

}  // namespace flash_attn2::cuda
