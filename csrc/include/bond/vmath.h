// Branch-free fp32 exp and tanh that GCC/Clang auto-vectorise inside `#pragma omp simd` loops.
//
// libm's expf is a scalar call, so a loop over the vocabulary that calls it runs one element at a time;
// exp is the bottleneck of every softmax-like sweep (V = 32000 exps per row).  These versions are range
// reduction + polynomial + exponent-bit construction, with selects instead of branches, so each compiles to
// ~15 vector instructions per 8 (AVX2) or 16 (AVX-512) elements.
#pragma once

#include <cstdint>

#include "bond/common.h"
#include "bond/dtype.h"

namespace bond {

constexpr float kNegInf = -__builtin_inff();
constexpr float kLog2e = 1.44269504088896341f;
// ln 2 split in two: kLn2Hi has 12 significant bits, so n * kLn2Hi is exact for |n| <= 2^11 and the reduced
// argument x - n*ln2 keeps full precision (Cody-Waite reduction).
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
// Below this, exp(x) < 2^-126 (the smallest normal float): returned as exactly 0.  In a softmax the largest
// term is 1, so dropping terms below 1e-38 changes no sum, and an exact 0 lets callers skip p*log p for
// masked (-inf) entries.
constexpr float kExpMinArg = -87.33654f;
constexpr float kExpMaxArg = 88.0f;  // exp overflows fp32 above log(FLT_MAX) = 88.72; 88 keeps n <= 127

// Round to the nearest integer by adding and subtracting 1.5 * 2^23 (exact for |x| < 2^22; the callers
// pass |x| < 130).  Vectorises to two adds, unlike rintf / nearbyintf which may become libcalls.
BOND_INLINE float round_nearest(float x) {
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
}

// e^r - 1 for |r| <= ln2/2 = 0.347: r + r^2 * P(r), P the degree-5 minimax fit for expf (Cephes' coefficients,
// relative error ~1 ulp on that interval).
BOND_INLINE float expm1_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return r + (r * r) * p;
}

// e^r - 1 for |r| <= ln2/2, one degree lower than expm1_reduced: r + r^2 * P(r), P of degree 4 fitted for the
// relative error of e^r = 1 + (e^r - 1) (weighted least squares iterated to equal ripple: 3.1e-9 on that
// interval, far below fp32 rounding).  The exps of the sweeps use it (one fused multiply-add fewer per
// element, on a path bound by them); tanh keeps expm1_reduced, whose small-r relative error it needs.
BOND_INLINE float exp_reduced_minus_1(float r) {
  float p = 1.381461276e-3f;
  p = p * r + 8.368710056e-3f;
  p = p * r + 4.166838899e-2f;
  p = p * r + 1.666652113e-1f;
  p = p * r + 4.999999404e-1f;
  return r + (r * r) * p;
}

// 2^n for an integer-valued float n in [-126, 127], built from the exponent bits.
BOND_INLINE float pow2i(float n) {
  const int32_t e = static_cast<int32_t>(n) + 127;
  return f32_from_bits(static_cast<uint32_t>(e) << 23);
}

// exp(x) in fp32 with ~2 ulp error; 0 for x < -87.34 (including -inf); exp(88) for x > 88 (including +inf).
// NaN inputs give NaN.
//
// Written for the instruction count of the softmax sweeps, which are compute-bound on it (the AVX-512 row sum
// of token_logprobs went from 40 to 26 instructions per 16 elements):
// - n = round(x log2 e) comes from one fused multiply-add with the 1.5 * 2^23 shifter, and 2^n from the bits
//   of that same sum: k = x log2 e + 1.5 * 2^23 is exact with bits(k) = bits(1.5 * 2^23) + n, and the low 9
//   bits of bits(1.5 * 2^23) are clear, so (bits(k) + 127) << 23 is (n + 127) << 23.  No float -> int
//   conversion, so a NaN or a huge x never reaches one (undefined behaviour, reported by
//   -fsanitize=float-cast-overflow);
// - x is not clamped before the polynomial: outside [-87.34, 88] the bits of 2^n wrap and y is garbage (or NaN
//   for +-inf), and the two final selects replace it with the limits.  A NaN fails both tests and keeps the
//   NaN the polynomial carried through;
// - (1 + q) 2^n is one fused multiply-add, q 2^n + 2^n (one rounding instead of two).
BOND_INLINE float fast_exp(float x) {
  constexpr float kShift = 12582912.0f;        // 1.5 * 2^23
  constexpr float kExpOfMax = 1.65163625e38f;  // exp(kExpMaxArg)
  const float k = x * kLog2e + kShift;         // round(x log2 e) + kShift, exactly (for |x log2 e| < 2^22)
  const float n = k - kShift;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float s = f32_from_bits((f32_bits(k) + 127u) << 23);  // 2^n for n in [-126, 127]
  const float y = exp_reduced_minus_1(r) * s + s;
  return x < kExpMinArg ? 0.0f : (x > kExpMaxArg ? kExpOfMax : y);
}

// fast_exp for the exponents of a sweep shifted by its row max, t = (x - max) / T <= 0 by construction (x <= max
// makes x - max <= 0 exactly in IEEE arithmetic): the same result as fast_exp for x <= 88, without the upper
// select.  That select, in a loop whose sums also test the exp, let GCC thread the constant exp(88) through
// every later condition (the AVX-512 Jeffreys row sum carried ~30 mask instructions per 16 elements for it).
// For x > 88 the result is meaningless: never pass one.
BOND_INLINE float exp_nonpos(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23, as in fast_exp
  const float k = x * kLog2e + kShift;
  const float n = k - kShift;
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float s = f32_from_bits((f32_bits(k) + 127u) << 23);
  const float y = exp_reduced_minus_1(r) * s + s;
  return x < kExpMinArg ? 0.0f : y;
}

// tanh(a) for a >= 0 (callers restore the sign).  tanh(a) = (1 - e^-2a) / (1 + e^-2a), with 1 - e^-2a formed
// as (1 - 2^n) - 2^n * expm1(r) so that small a (n = 0) keeps full relative precision instead of suffering
// the cancellation of 1 - exp(-2a).  a is capped at 9: tanh(9) rounds to 1 in fp32 (1 - tanh(9) = 3e-8).
BOND_INLINE float tanh_nonneg(float a) {
  const float ac = a < 9.0f ? a : 9.0f;
  const float x = -2.0f * ac;  // in [-18, 0]
  const float n = round_nearest(x * kLog2e);
  float r = x - n * kLn2Hi;
  r = r - n * kLn2Lo;
  const float q = expm1_reduced(r);
  const float s = pow2i(n);
  const float num = (1.0f - s) - s * q;  // 1 - e^-2a
  const float den = (1.0f + s) + s * q;  // 1 + e^-2a
  // NaN in, NaN out.
  return a == a ? num / den : a;
}

// Copy the sign of `sign_of` onto the non-negative value `mag` (bit operation, vectorises).
BOND_INLINE float with_sign(float mag, float sign_of) {
  return f32_from_bits(f32_bits(mag) | (f32_bits(sign_of) & 0x80000000u));
}

BOND_INLINE float abs_f32(float x) { return f32_from_bits(f32_bits(x) & 0x7FFFFFFFu); }

BOND_INLINE float tanh_f32(float x) { return with_sign(tanh_nonneg(abs_f32(x)), x); }

}  // namespace bond
