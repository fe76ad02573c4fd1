// exp2_fma (csrc/fast_exp2.h), the kernels' 2^x on FMA instructions, against std::exp2 on the CPU: the same
// float arithmetic the GPU does (every step is a correctly rounded IEEE operation; the device may fuse the
// polynomial's multiply-adds, which only shrinks the error).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "fast_exp2.h"

namespace {

TEST(FastMath, Exp2FmaIsWithinItsBoundOverTheSoftmaxRange) {
  double worst = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -126.f + 134.f * static_cast<float>(i) / 2000000.f;  // [-126, 8]: P <= 2^8 (lazy rescaling)
    const double ref = std::exp2(static_cast<double>(x));
    const double rel = std::fabs(flash_attn2::exp2_fma(x) - ref) / ref;
    if (rel > worst) worst = rel;
  }
  EXPECT_LT(worst, 3e-6);
  EXPECT_GT(worst, 0.0);  // the polynomial is an approximation: an exact match would mean the test saw nothing
}

TEST(FastMath, Exp2FmaGivesZeroBelowTheRangeAndExactPowersOfTwoNearby) {
  EXPECT_EQ(flash_attn2::exp2_fma(-std::numeric_limits<float>::infinity()), 0.f);
  EXPECT_EQ(flash_attn2::exp2_fma(-200.f), 0.f);
  EXPECT_EQ(flash_attn2::exp2_fma(-126.5f), 0.f);
  for (int j = -125; j <= 8; ++j) {
    const float y = flash_attn2::exp2_fma(static_cast<float>(j));
    EXPECT_NEAR(y / std::ldexp(1.0, j), 1.0, 3e-6) << "x = " << j;
  }
}

}  // namespace
