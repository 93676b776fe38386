// CPU backend of the sequence-level BOND / J-BOND math (contract: bond/bond_sequence.h).
//
// Three phases: (1) per prompt, in parallel: quantiles, log π_BoN, returns, per-prompt baselines and row
// partial sums; (2) the batch sums, serially over prompts in index order (fp64), so results do not depend
// on the thread count; (3) for batch-wide baselines, the coefficients, in parallel again.
#include <cmath>
#include <limits>
#include <vector>

#include "bond/cpu.h"
#include "bond/parallel.h"
#include "bond/sequence_math.h"

namespace bond {
namespace cpu {
namespace {

template <typename R>
void quantile_counts(const R* refs, const bool* mask, int64_t k, R r, int64_t& c_le, int64_t& c_lt, int64_t& kc) {
  int64_t le = 0, lt = 0, valid = 0;
  if (mask == nullptr) {
    for (int64_t j = 0; j < k; ++j) {
      le += refs[j] <= r;
      lt += refs[j] < r;
    }
    valid = k;
  } else {
    for (int64_t j = 0; j < k; ++j) {
      const bool v = mask[j];
      le += v && refs[j] <= r;
      lt += v && refs[j] < r;
      valid += v;
    }
  }
  c_le = le;
  c_lt = lt;
  kc = valid;
}

// Row partial sums, one slot per prompt, summed in prompt order afterwards.
struct RowSums {
  double returns = 0, p_le = 0, kl_ref = 0, neg_bon = 0;
};

template <typename R>
int bond_sequence_impl(const BondSequenceArgs& a) {
  const int64_t B = a.B, m = a.m, k = a.k, j = a.j, M = B * m;
  const R* rewards = static_cast<const R*>(a.policy_rewards);
  const R* refs = static_cast<const R*>(a.ref_rewards);
  const bool per_prompt = m > 1;  // the reference's rule: per-prompt baselines need >= 2 samples per prompt
  const float beta = static_cast<float>(a.beta);
  // -(1−β)/max(B·j, 1), rounded once from fp64 like torch.full_like(..., python_float).
  const float bon_c = static_cast<float>(-(1.0 - a.beta) / static_cast<double>(j * B > 0 ? j * B : 1));
  std::vector<RowSums> rows(static_cast<size_t>(B));

  parallel_rows(B, m * (k + 8) + j, a.num_threads, [&](int64_t b) {
    const R* ref_row = refs + b * k;
    const bool* mask_row = a.ref_mask ? a.ref_mask + b * k : nullptr;
    RowSums s;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t e = b * m + i;
      int64_t c_le, c_lt, kc;
      quantile_counts<R>(ref_row, mask_row, k, rewards[e], c_le, c_lt, kc);
      float p_le, p_lt;
      quantiles_from_counts<R>(c_le, c_lt, kc, a.smoothing, a.eps, p_le, p_lt);
      const float lb = bon_log_prob(a.policy_ref_logp[e], p_le, p_lt, a.n, a.correction);
      a.p_le[e] = p_le;
      a.log_bon[e] = lb;
      const float ret = lb - a.policy_logp[e];
      s.returns += ret;
      s.p_le += p_le;
      s.kl_ref += static_cast<double>(a.policy_logp[e] - a.policy_ref_logp[e]);
    }
    for (int64_t t = 0; t < j; ++t) {
      s.neg_bon -= a.bon_logp[b * j + t];
      a.bon_coef[b * j + t] = bon_c;
    }
    if (per_prompt || a.baseline == kBaselineNone) {
      for (int64_t i = 0; i < m; ++i) {
        const int64_t e = b * m + i;
        const double ret = static_cast<double>(a.log_bon[e] - a.policy_logp[e]);
        double base = 0.0;
        if (a.baseline == kBaselineLoo) base = (s.returns - ret) / static_cast<double>(m - 1);
        if (a.baseline == kBaselineMean) base = s.returns / static_cast<double>(m);
        const float adv = static_cast<float>(ret - base);
        a.policy_coef[e] = bond_coef(beta, adv, M);
      }
    }
    rows[static_cast<size_t>(b)] = s;
    return static_cast<int>(kOk);
  });

  RowSums tot;
  for (int64_t b = 0; b < B; ++b) {
    const RowSums& s = rows[static_cast<size_t>(b)];
    tot.returns += s.returns;
    tot.p_le += s.p_le;
    tot.kl_ref += s.kl_ref;
    tot.neg_bon += s.neg_bon;
  }
  const double dm = static_cast<double>(M), dbj = static_cast<double>(B * j);
  // Empty batches give NaN means, as torch's mean of an empty tensor does.
  a.stats[0] = static_cast<float>(-tot.returns / dm);
  a.stats[1] = static_cast<float>(tot.neg_bon / dbj);
  a.stats[2] = static_cast<float>(tot.p_le / dm);
  a.stats[3] = static_cast<float>(tot.kl_ref / dm);

  if (!per_prompt && a.baseline != kBaselineNone) {
    // Batch-wide baseline (one sample per prompt): the leave-one-out mean of the other B − 1 returns.
    parallel_rows(M, 8, a.num_threads, [&](int64_t e) {
      const double ret = static_cast<double>(a.log_bon[e] - a.policy_logp[e]);
      double base;
      if (a.baseline == kBaselineLoo) {
        base = M < 2 ? 0.0 : (tot.returns - ret) / static_cast<double>(M - 1);
      } else {
        base = tot.returns / dm;
      }
      const float adv = static_cast<float>(ret - base);
      a.policy_coef[e] = bond_coef(beta, adv, M);
      return static_cast<int>(kOk);
    });
  }
  return kOk;
}

}  // namespace

int bond_sequence(const BondSequenceArgs& a) {
  if (a.B < 0 || a.m < 0 || a.k < 0 || a.j < 0) return kBadArgument;
  return a.rewards_fp64 ? bond_sequence_impl<double>(a) : bond_sequence_impl<float>(a);
}

int jbond_sequence(const JBondSequenceArgs& a) {
  const int64_t B = a.B;
  if (B < 0) return kBadArgument;
  const float beta = static_cast<float>(a.beta), gamma = static_cast<float>(a.gamma);
  const float pen = static_cast<float>(-a.penalty);
  const float best_c = static_cast<float>(-(1.0 - a.beta) / static_cast<double>(B > 0 ? B : 1));
  // Phase 1: rewards and returns (cheap, O(1) per prompt), batch sums in index order.
  double s_ret = 0, s_rj = 0, s_bad = 0, s_ratio = 0, s_best = 0;
  for (int64_t b = 0; b < B; ++b) {
    const float r = a.policy_rewards[b];
    const float a0 = a.anchor_rewards[2 * b], a1 = a.anchor_rewards[2 * b + 1];
    // torch.min propagates NaN; NaN rewards are rejected upstream, this keeps the two paths identical.
    const float worst = (a0 != a0 || a1 != a1) ? std::numeric_limits<float>::quiet_NaN() : (a1 < a0 ? a1 : a0);
    const bool bad = a.strict ? r < worst : r <= worst;
    const float rj = bad ? pen : 0.0f;
    const float ratio = a.policy_logp[b] - a.anchor_logp[b];
    a.jbond_reward[b] = rj;
    a.best_coef[b] = best_c;
    s_ret += static_cast<double>(rj - ratio);
    s_rj += rj;
    s_bad += bad ? 1.0 : 0.0;
    s_ratio += ratio;
    s_best -= a.best_anchor_logp[b];
  }
  const double db = static_cast<double>(B);
  a.stats[0] = static_cast<float>(s_rj / db);
  a.stats[1] = static_cast<float>(s_bad / db);
  a.stats[2] = static_cast<float>(s_ratio / db);
  a.stats[3] = static_cast<float>(s_best / db);
  // Phase 2: coefficients with the leave-one-out batch baseline.
  for (int64_t b = 0; b < B; ++b) {
    const float ratio = a.policy_logp[b] - a.anchor_logp[b];
    const double ret = static_cast<double>(a.jbond_reward[b] - ratio);
    const double base = B < 2 ? 0.0 : (s_ret - ret) / (db - 1.0);
    const float adv = static_cast<float>(ret - base);
    a.policy_coef[b] = jbond_coef(beta, adv, gamma, ratio, B);
  }
  return kOk;
}

}  // namespace cpu
}  // namespace bond
