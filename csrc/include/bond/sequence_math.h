// Per-element math of the sequence-level BOND kernels, shared by the CPU (csrc/cpu/bond_sequence.cpp) and
// CUDA (csrc/cuda/*.cu) backends: host and device functions (BOND_HD) that both compile.
#pragma once

#include <cmath>
#include <cstdint>

#include "bond/bond_sequence.h"

#if defined(__CUDACC__)
#define BOND_HD __host__ __device__ __forceinline__
#else
#define BOND_HD inline
#endif

namespace bond {

// ---------------------------------------------------------------------------------------------------
// Per-element math shared by both backends.  Each step rounds as the fp32 reference does (same operations
// in the same order on fp32 values), so the two agree to the last bit or two of libm.
// ---------------------------------------------------------------------------------------------------

// Arithmetic helpers that round the same way under nvcc's --use_fast_math (which turns float division and
// logf into approximations): IEEE division, products and sums on the device, and logarithms evaluated in
// fp64 and rounded once, which fast-math leaves alone and which matches a correctly rounded fp32 libm.
template <typename R>
BOND_HD R div_rn(R a, R b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(R) == 4) {
    return __fdiv_rn(a, b);
  } else {
    return __ddiv_rn(a, b);
  }
#else
  return a / b;
#endif
}

BOND_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);  // never fused into a following add
#else
  return a * b;
#endif
}

BOND_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

BOND_HD float log_f(float x) { return static_cast<float>(log(static_cast<double>(x))); }

// (p_le, p_lt) from the counts c_le = #{r' <= r}, c_lt = #{r' < r} among kc valid reference samples.
// R is the rewards' dtype: the reference divides in fp64 for fp64 rewards, then rounds to fp32.
template <typename R>
BOND_HD void quantiles_from_counts(int64_t c_le, int64_t c_lt, int64_t kc, int mode, double eps, float& p_le,
                                   float& p_lt) {
  const R le = static_cast<R>(c_le), lt = static_cast<R>(c_lt), k = static_cast<R>(kc);
  R a, b;
  if (mode == kSmoothSelf) {
    // The candidate counts as one more reference sample that ties with itself: never 0.
    a = div_rn<R>(le + R(1), k + R(1));
    b = div_rn<R>(lt, k + R(1));
  } else {
    a = div_rn<R>(le, k);
    b = div_rn<R>(lt, k);
    if (mode == kSmoothEps) {
      const R e = static_cast<R>(eps);
      a = a < e ? e : a;  // written so that a NaN (k = 0) stays NaN, like torch.clamp_min
    }
  }
  p_le = static_cast<float>(a);
  p_lt = static_cast<float>(b);
}

// Tie correction C_N(u) = log(expm1(N·u) / expm1(u)) for u <= 0 (fp32 u, result rounded once to fp32).
// As the reference: log1p(e^u · expm1((N−1)·u) / expm1(u)), the same quantity written without the
// cancellation of log(−expm1(N·u)) − log(−expm1(u)) near u = 0; its first-order series log N + (N−1)·u/2
// below sqrt(FLT_MIN) ≈ 1.08e-19 (where the quotient would meet subnormals); 0 at u = −inf (p_lt = 0).
// Evaluated in fp64, which nvcc's --use_fast_math leaves alone.
BOND_HD float log_c_n(float u, double n) {
  const double ud = static_cast<double>(u);
  if (u == -INFINITY) return 0.0f;
  if (fabs(ud) < 1.0842021724855044e-19) return static_cast<float>(log(n) + (n - 1.0) * 0.5 * ud);
  return static_cast<float>(log1p(exp(ud) * (expm1((n - 1.0) * ud) / expm1(ud))));
}

// log π_BoN(y) = log π_ref(y) + (N−1)·log p_le [+ C_N(log p_lt − log p_le)]   (docs/math.md §6).
BOND_HD float bon_log_prob(float ref_logp, float p_le, float p_lt, double n, bool correction) {
  const float log_le = log_f(p_le);
  // N = 1 is Best-of-1 = π_ref: no power term even where p_le = 0 (0·(−inf) would be NaN).
  const float power = (n == 1.0) ? 0.0f : mul_rn(static_cast<float>(n - 1.0), log_le);
  if (!correction) return ref_logp + power;
  // u = log p_lt − log p_le <= 0; p_le = 0 forces p_lt = 0, define u = −inf there (C_N = 0), not NaN.
  float u = p_le > 0.0f ? log_f(p_lt) - log_le : -INFINITY;
  u = u > 0.0f ? 0.0f : u;
  return add_rn(add_rn(ref_logp, power), log_c_n(u, n));
}

// The reference's coefficient −β·adv / M (BOND) ...
BOND_HD float bond_coef(float beta, float adv, int64_t M) {
  return div_rn<float>(mul_rn(-beta, adv), static_cast<float>(M));
}

// ... and (−β·adv + γ·log_ratio) / B (J-BOND), each operation rounded separately as in PyTorch.
BOND_HD float jbond_coef(float beta, float adv, float gamma, float ratio, int64_t B) {
  return div_rn<float>(add_rn(mul_rn(-beta, adv), mul_rn(gamma, ratio)), static_cast<float>(B));
}

}  // namespace bond
