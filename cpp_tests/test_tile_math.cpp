// The CPU kernel's vectorisable exponentials (csrc/cpu/tile_math.h) against double precision: relative error,
// the underflow to +0 that masked scores (-inf) rely on, and exp(s - m) keeping its precision for the scores
// that dominate a row however large the row's maximum m is.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "cpu/tile_math.h"

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
