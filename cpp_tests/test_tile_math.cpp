// The CPU kernel's vectorisable exponentials (csrc/cpu/tile_math.h) against double precision: relative error,
// the underflow to +0 that masked scores (-inf) rely on, and exp(s - m) keeping its precision for the scores
// that dominate a row however large the row's maximum m is. Last, the CUDA kernels' softcap polynomial
// (csrc/cuda/softcap_poly.h), host code like the exponentials.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "cpu/tile_math.h"
#include "cuda/softcap_poly.h"

namespace {

using flash_attn2::cpu::exp2_nonpositive;
using flash_attn2::cpu::exp_nonpositive;

TEST(TileMath, Exp2NonpositiveRelativeError) {
  double worst = 0;
  for (int i = 0; i <= 1260000; ++i) {
    const float t = -static_cast<float>(i) * 1e-4f;  // 0 .. -126
    const double exact = std::exp2(static_cast<double>(t));
    worst = std::max(worst, std::abs(exp2_nonpositive(t) / exact - 1.0));
  }
  EXPECT_LT(worst, 3e-7) << "2^t for t in [-126, 0]";
}

TEST(TileMath, Exp2NonpositiveEdges) {
  EXPECT_EQ(exp2_nonpositive(0.f), 1.f);
  EXPECT_EQ(exp2_nonpositive(-1.f), 0.5f);
  EXPECT_EQ(exp2_nonpositive(-127.f), 0.f);
  EXPECT_EQ(exp2_nonpositive(-200.f), 0.f);
  EXPECT_EQ(exp2_nonpositive(-std::numeric_limits<float>::infinity()), 0.f);
  // Between -127 and -126: at most the smallest normal float, never negative or NaN.
  for (float t = -127.f; t <= -126.f; t += 1.f / 64) {
    const float y = exp2_nonpositive(t);
    EXPECT_TRUE(y >= 0.f && y <= std::numeric_limits<float>::min()) << "t = " << t << ": " << y;
  }
  // Monotone over the range the softmax feeds it.
  float last = 0.f;
  for (float t = -130.f; t <= 0.f; t += 1.f / 256) {
    const float y = exp2_nonpositive(t);
    EXPECT_GE(y, last) << "t = " << t;
    last = y;
  }
}

// exp(x) = 2^(x log2 e): the product's rounding, up to |x| 2^-24 in the exponent, adds to the polynomial's error.
TEST(TileMath, ExpNonpositiveMatchesExp) {
  double worst = 0;  // relative error over its bound 3e-7 + |x| 1e-7
  for (int i = 0; i <= 870000; ++i) {
    const float x = -static_cast<float>(i) * 1e-4f;  // 0 .. -87
    const double err = std::abs(exp_nonpositive(x) / std::exp(static_cast<double>(x)) - 1.0);
    worst = std::max(worst, err / (3e-7 - 1e-7 * x));
  }
  EXPECT_LT(worst, 1.0);
  EXPECT_EQ(exp_nonpositive(-std::numeric_limits<float>::infinity()), 0.f);
}

// exp(s - m) as the softmax takes it, for the scores near a row's maximum, at row maxima from 0 to 1e4: the
// error stays that of the exponential itself (the difference is taken first), not m log2 e's rounding.
TEST(TileMath, SoftmaxExpKeepsPrecisionForLargeMaxima) {
  for (float m : {0.f, 5.f, 30.f, 100.f, 1000.f, 10000.f}) {
    double worst = 0;
    for (int i = 0; i <= 30000; ++i) {
      const float s = m - static_cast<float>(i) * 1e-4f;  // within 3 of the maximum
      const double exact = std::exp(static_cast<double>(s) - static_cast<double>(m));
      worst = std::max(worst, std::abs(exp_nonpositive(s - m) / exact - 1.0));
    }
    EXPECT_LT(worst, 5e-7) << "m = " << m;
  }
  EXPECT_EQ(exp_nonpositive(-std::numeric_limits<float>::infinity() - 3.f), 0.f);  // a masked score
}

}  // namespace

// The CUDA kernels' softcap polynomial (csrc/cuda/softcap_poly.h), evaluated here as the kernels evaluate it
// (float32 FMAs): within 1e-4 relative of tanh wherever it is switched on, off where it cannot hold.

namespace {

using flash_attn2::cuda::make_softcap_poly;
using flash_attn2::cuda::softcap_poly;

TEST(SoftcapPoly, MatchesTanhWhereItHolds) {
  for (double softcap : {0.5, 2.5, 20.0, 50.0, 56.0, 1000.0}) {
    for (double scale : {1.0 / 8, 1.0 / std::sqrt(128.0), 1.0 / 16, 1.0}) {
      const float cap_in = static_cast<float>(scale / softcap), cap_out = static_cast<float>(softcap / scale);
      const auto p = make_softcap_poly(cap_in, cap_out, true);
      ASSERT_GT(p.x_max, 0.f) << "softcap " << softcap << ", scale " << scale;
      double worst_unit = 0, worst_out = 0;
      for (int i = -20000; i <= 20000; ++i) {
        const float x = p.x_max * static_cast<float>(i) / 20000.f;
        if (x == 0.f) continue;
        const double exact = std::tanh(static_cast<double>(cap_in) * x);
        worst_unit = std::max(worst_unit, std::abs(softcap_poly(x, p.unit) / exact - 1.0));
        worst_out = std::max(worst_out, std::abs(softcap_poly(x, p.out) / (exact * cap_out) - 1.0));
      }
      EXPECT_LT(worst_unit, 1e-4) << "tanh(cap_in x), softcap " << softcap << ", scale " << scale;
      EXPECT_LT(worst_out, 1e-4) << "cap_out tanh(cap_in x), softcap " << softcap << ", scale " << scale;
      EXPECT_EQ(softcap_poly(0.f, p.unit), 0.f);
      EXPECT_EQ(softcap_poly(-p.x_max, p.unit), -softcap_poly(p.x_max, p.unit)) << "odd";
    }
  }
}

TEST(SoftcapPoly, OffWhereItCannotHold) {
  EXPECT_EQ(make_softcap_poly(0.f, 0.f, true).x_max, -1.f) << "no softcap";
  EXPECT_EQ(make_softcap_poly(0.01f, 100.f, false).x_max, -1.f) << "turned off";
  // A folded coefficient would flush to zero (cap_in^7 below the smallest normal float) or overflow.
  EXPECT_EQ(make_softcap_poly(1e-7f, 1e7f, true).x_max, -1.f);
  EXPECT_EQ(make_softcap_poly(1e7f, 1e-7f, true).x_max, -1.f);
}

}  // namespace
