// Argument structs of the sequence-level BOND / J-BOND math (docs/math.md §5-§8), one torch-free call
// per backend: bond::cpu::bond_sequence (bond/cpu.h, csrc/cpu/bond_sequence.cpp) and bond::cuda::bond_sequence
// (bond/cuda.h, csrc/cuda/bond_sequence.cu) take the same structs.  The per-element math both share is
// bond/sequence_math.h.
//
// Everything here is O(B·m·k): reward-rank quantiles, the Best-of-N log-likelihood, the returns, their
// baselines, the per-sequence loss coefficients and the batch diagnostics.  The coefficients are what the
// caller multiplies the differentiable sequence log-probs by (loss = Σ policy_coef·log π(y) +
// Σ bon_coef·log π(y_BoN)), so the gradient reaches the token gradients as one number per sequence.
//
// The math is bond_kernels/reference/losses.py, computed in fp32 per element (as the reference does) with
// fp64 batch sums.  Pointers are row-major contiguous, sizes int64.
#pragma once

#include <cstdint>

#include "bond/common.h"

namespace bond {

// Smoothing of the quantile estimate (docs/math.md §5); values match ops/reward_quantiles.py.
enum QuantileSmoothing : int { kSmoothNone = 0, kSmoothSelf = 1, kSmoothEps = 2 };

// Baseline of the backward-KL return: per prompt when m > 1, else over the batch.
enum BondBaseline : int { kBaselineLoo = 0, kBaselineMean = 1, kBaselineNone = 2 };

// Launchers return bond::Status (common.h): kOk, or kBadArgument for negative or oversized sizes; the CUDA
// launchers return kOk or the cudaError_t of the launch offset by kCudaErrorBase (common.h).

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
  double n;             // Best-of-N, any real >= 1
  double beta;          // Jeffreys mixing weight in [0, 1]
  int smoothing;        // QuantileSmoothing
  double eps;           // clamp of p_le for kSmoothEps
  bool correction;      // add the tie correction C_N (Theorem 1) to log π_BoN
  int baseline;         // BondBaseline
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
  bool strict;          // r_J = −penalty when r(y) < min(anchor rewards) (strict) or <= (not strict)
  int num_threads = 0;  // cpu only: OpenMP threads (<= 0: the OpenMP default)
};

}  // namespace bond
