// Sequence-level BOND / J-BOND math (BOND-MATH.md sections 2-4) as one torch-free call per backend.
//
// Everything here is O(B·m·k): reward-rank quantiles, the Best-of-N log-likelihood, the returns, their
// baselines, the per-sequence loss coefficients and the batch diagnostics.  The coefficients are what the
// caller multiplies the differentiable sequence log-probs by (loss = Σ policy_coef·log π(y) +
// Σ bon_coef·log π(y_BoN)), so the gradient reaches the token gradients as one number per sequence.
//
// The math is bond_kernels/reference/losses.py, computed in fp32 per element (as the reference does) with
// fp64 batch sums.  Both backends (cpu: bond_sequence.cpp, cuda: ../cuda/bond_sequence.cu) take the same
// argument structs; pointers are row-major contiguous, sizes int64.
#pragma once

#include <cmath>
#include <cstdint>

// Relative path: the CUDA sources include this header, and CMake / setup.py / a bare nvcc compile-check all
// find it without extra include directories.
#include "../include/bond/common.h"

#if defined(__CUDACC__)
#define BOND_HD __host__ __device__ __forceinline__
#else
#define BOND_HD inline
#endif

namespace bond {

// Smoothing of the quantile estimate (BOND-MATH.md section 2); values match ops/reward_quantiles.py.
enum QuantileSmoothing : int { kSmoothNone = 0, kSmoothSelf = 1, kSmoothEps = 2 };

// Baseline of the backward-KL return: per prompt when m > 1, else over the batch.
enum BondBaseline : int { kBaselineLoo = 0, kBaselineMean = 1, kBaselineNone = 2 };

// Launchers return bond::Status (common.h): kOk, or kBadArgument for negative or oversized sizes; the CUDA
// launchers return kOk or the cudaError_t of the launch, offset by kCudaErrorBase so the two never collide.
constexpr int kCudaErrorBase = 1000;

// Number of diagnostics written to `stats`.
constexpr int kBondStats = 4;

struct BondSequenceArgs {
  // inputs
  const float* policy_logp;      // (B, m) log π(y) of the policy samples (values only)
  const float* policy_ref_logp;  // (B, m) log π_ref(y)
  const void* policy_rewards;    // (B, m) float or double (rewards_fp64)
  const void* ref_rewards;       // (B, k) same dtype as policy_rewards
  const bool* ref_mask;          // (B, k) or nullptr: true = valid reference sample
  const float* bon_logp;         // (B, j) log π of the Best-of-N samples (values only)
  // outputs (fp32)
  float* p_le;         // (B, m) estimated quantile of each policy sample
  float* log_bon;      // (B, m) log π_BoN(y)
  float* policy_coef;  // (B, m) d loss / d policy_logp
  float* bon_coef;     // (B, j) d loss / d bon_logp
  float* stats;        // (4,) backward_kl, forward_ce, mean_quantile, kl_to_ref
  // sizes
  int64_t B, m, k, j;
  // options
  bool rewards_fp64;
  double n;          // Best-of-N, any real >= 1
  double beta;       // Jeffreys mixing weight in [0, 1]
  int smoothing;     // QuantileSmoothing
  double eps;        // clamp of p_le for kSmoothEps
  bool correction;   // add the tie correction C_N (Theorem 1) to log π_BoN
  int baseline;      // BondBaseline
  int num_threads = 0;  // cpu only: OpenMP threads (<= 0: the OpenMP default)
};

struct JBondSequenceArgs {
  // inputs (fp32)
  const float* policy_logp;       // (B,) log π_t(y)
  const float* anchor_logp;       // (B,) log π_anchor(y)
  const float* policy_rewards;    // (B,) r(y)
  const float* anchor_rewards;    // (B, 2) r(y'_1), r(y'_2)
  const float* best_anchor_logp;  // (B,) log π_t(y'_best)
  // outputs (fp32)
  float* jbond_reward;  // (B,) r_J
  float* policy_coef;   // (B,) d loss / d policy_logp
  float* best_coef;     // (B,) d loss / d best_anchor_logp
  float* stats;         // (4,) reward_mean, penalised_frac, kl_to_anchor, forward_ce
  // sizes
  int64_t B;
  // options
  double beta, gamma, penalty;
  bool strict;  // r_J = −penalty when r(y) < min(anchor rewards) (strict) or <= (not strict)
  int num_threads = 0;  // cpu only: OpenMP threads (<= 0: the OpenMP default)
};

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

// log π_BoN(y) = log π_ref(y) + (N−1)·log p_le [+ C_N(log p_lt − log p_le)]   (BOND-MATH.md section 1).
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

namespace cpu {

// CPU (OpenMP over prompts; batch sums in a fixed order, so results are bitwise reproducible).
int bond_sequence(const BondSequenceArgs& args);
int jbond_sequence(const JBondSequenceArgs& args);

}  // namespace cpu
}  // namespace bond
