// The load/store conversions and the vectorisable exp/tanh against exact or libm references.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>

#include "bond/vmath.h"
#include "check.h"

using namespace bond;

namespace {

// fp16 bits -> double by the definition (sign, 5-bit exponent with bias 15, 10-bit mantissa).
double fp16_exact(uint16_t h) {
  const int sign = (h >> 15) & 1, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  double v;
  if (e == 0) v = std::ldexp(static_cast<double>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(1.0 + m / 1024.0, e - 15);
  return sign ? -v : v;
}

void test_fp16_all_patterns() {
  int64_t bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const double want = fp16_exact(static_cast<uint16_t>(h));
    const float got = fp16_to_f32(static_cast<uint16_t>(h));
    const bool ok = std::isnan(want) ? std::isnan(got)
                                     : (static_cast<double>(got) == want && std::signbit(got) == std::signbit(want));
    bad += ok ? 0 : 1;
    // Every fp16 value survives fp16 -> fp32 -> fp16 unchanged (NaNs stay NaN).
    const uint16_t back = f32_to_fp16(got);
    const bool round_trip = std::isnan(want) ? ((back & 0x7C00) == 0x7C00 && (back & 0x3FF) != 0) : back == h;
    bad += round_trip ? 0 : 1;
  }
  BOND_CHECK(bad == 0, "fp16 conversions: %lld of 65536 patterns wrong", (long long)bad);
}

// fp32 -> fp16 rounds to the nearest fp16 (ties to the even bit pattern) and overflows to inf from 65520
// (halfway between the largest fp16, 65504, and 2^16): compare with a search in the table of all positive
// finite fp16 values, for random floats of every magnitude from below the subnormals to past the overflow.
void test_fp16_rounding() {
  std::vector<double> table(0x7C00);  // bit pattern m -> value, increasing in m
  for (uint32_t m = 0; m < 0x7C00; ++m) table[m] = fp16_exact(static_cast<uint16_t>(m));
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> mant(1.0f, 2.0f);
  std::uniform_int_distribution<int> expo(-27, 17);
  int64_t bad = 0;
  for (int i = 0; i < 400000; ++i) {
    const float mag = std::ldexp(mant(rng), expo(rng));
    const float f = (i & 1) ? -mag : mag;
    const double want_mag = [&] {
      if (mag >= 65520.0f) return static_cast<double>(INFINITY);
      const auto it = std::lower_bound(table.begin(), table.end(), static_cast<double>(mag));
      const size_t hi = static_cast<size_t>(it - table.begin());
      if (hi == 0) return table[0];
      if (hi >= table.size()) return table.back();
      const size_t lo = hi - 1;
      const double dlo = mag - table[lo], dhi = table[hi] - mag;
      if (dlo < dhi) return table[lo];
      if (dhi < dlo) return table[hi];
      return (lo % 2 == 0) ? table[lo] : table[hi];  // tie: the even bit pattern
    }();
    const double got = fp16_exact(f32_to_fp16(f));
    bad += (got == ((i & 1) ? -want_mag : want_mag)) ? 0 : 1;
  }
  BOND_CHECK(bad == 0, "fp32 -> fp16 rounding: %lld of 400000 samples not rounded to nearest-even", (long long)bad);
  BOND_CHECK(f32_to_fp16(NAN) == 0x7E00 || (f32_to_fp16(NAN) & 0x7C00) == 0x7C00, "NaN must map to an fp16 NaN");
}

void test_bf16() {
  // Exact round trip of every bf16 pattern; rounding to nearest even; NaN stays NaN.
  int64_t bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    const uint16_t back = f32_to_bf16(f);
    bad += std::isnan(f) ? !std::isnan(bf16_to_f32(back)) : back != h;
  }
  BOND_CHECK(bad == 0, "bf16 round trip: %lld patterns wrong", (long long)bad);
  BOND_CHECK(f32_to_bf16(f32_from_bits(0x3F808000u)) == 0x3F80, "tie 1.00390625 should round to even 1.0");
  BOND_CHECK(f32_to_bf16(f32_from_bits(0x3F818000u)) == 0x3F82, "tie should round to even (up)");
  BOND_CHECK(f32_to_bf16(f32_from_bits(0x3F808001u)) == 0x3F81, "above the tie rounds up");
  BOND_CHECK(std::isnan(bf16_to_f32(f32_to_bf16(NAN))), "NaN must stay NaN");
  BOND_CHECK(f32_to_bf16(INFINITY) == 0x7F80, "inf must stay inf");
}

void test_exp_tanh() {
  // exp: relative error <= 4 ulp (2^-21) on [-87, 0] where the softmax sweeps evaluate it, and also up to 88.
  double worst_exp = 0, worst_tanh = 0;
  for (int i = 0; i <= 2000000; ++i) {
    const float x = -87.0f + 175.0f * static_cast<float>(i) / 2000000.0f;
    const double want = std::exp(static_cast<double>(x));
    worst_exp = std::fmax(worst_exp, std::fabs(fast_exp(x) - want) / want);
    const float y = -12.0f + 24.0f * static_cast<float>(i) / 2000000.0f;
    const double tw = std::tanh(static_cast<double>(y));
    // tanh: absolute error <= 2^-23 and relative error <= 8 ulp away from 0 (accurate near 0 as well).
    const double err = std::fabs(tanh_f32(y) - tw);
    worst_tanh = std::fmax(worst_tanh, std::fabs(tw) > 0 ? err / std::fabs(tw) : err);
  }
  BOND_CHECK(worst_exp < 4.8e-7, "fast_exp relative error %.3g exceeds 4 ulp", worst_exp);
  BOND_CHECK(worst_tanh < 9.6e-7, "tanh_f32 relative error %.3g exceeds 8 ulp", worst_tanh);
  BOND_CHECK(fast_exp(-INFINITY) == 0.0f, "exp(-inf) must be exactly 0");
  BOND_CHECK(fast_exp(-100.0f) == 0.0f, "exp(-100) must flush to exactly 0");
  BOND_CHECK(fast_exp(0.0f) == 1.0f, "exp(0) must be exactly 1");
  BOND_CHECK(std::isnan(fast_exp(NAN)), "exp(NaN) must be NaN");
  BOND_CHECK(tanh_f32(-INFINITY) == -1.0f && tanh_f32(INFINITY) == 1.0f, "tanh(+-inf) must be +-1");
  BOND_CHECK(tanh_f32(1e-30f) == 1e-30f, "tanh of a tiny value must be that value");
  std::printf("fast_exp worst relative error %.3g, tanh_f32 %.3g\n", worst_exp, worst_tanh);
}

}  // namespace

int main() {
  test_fp16_all_patterns();
  test_fp16_rounding();
  test_bf16();
  test_exp_tanh();
  return bond_test::finish("test_dtype_vmath");
}
