// Token-level Jeffreys divergence between two full-vocabulary distributions, forward and backward.
//
// Per row: pass 1 takes both row maxima, pass 2 sums exp for both rows and the two cross terms
//   a_p = sum_v e_p,v (t_p,v - t_q,v),  a_q = sum_v e_q,v (t_q,v - t_p,v)     (t = (x - max) / T, e = exp t)
// from which KL(p||q) = a_p / S_p - log S_p + log S_q (and symmetrically), so no third pass is needed.
// Entries with e = 0 (masked, -inf) are skipped in the cross terms: 0 * log 0 = 0.  The log-sum-exps are
// saved split (row max, log S) so that the backward's log p_v = (x_v - max) / T - log S rounds log p_v, not
// |x_v| / T (see the split log-sum-exp in bond/token_logprobs.h).  Contract: bond/token_jeffreys.h and
// bond_kernels/ops/token_jeffreys.py.
#include <cmath>
#include <limits>

#include "bond/cpu.h"
#include "bond/dtype.h"
#include "bond/isa.h"
#include "bond/parallel.h"
#include "bond/vmath.h"

namespace bond {
namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr index_t kSumBlock = 512;  // blocked partial sums added up in fp64, as in token_logprobs.cpp

template <class T>
BOND_INLINE int jeffreys_fwd_row(const TokenJeffreysFwdParams& p, index_t r) {
  using S = typename Io<T>::storage;
  if (p.ignore_mask && p.ignore_mask[r]) {
    p.div[r] = p.lse_p[r] = p.lse_q[r] = p.kl_pq[r] = 0.0f;
    if (p.shift_p) p.shift_p[r] = p.shift_q[r] = 0.0f;
    return kOk;
  }
  const S* BOND_RESTRICT xp = static_cast<const S*>(p.policy) + r * p.policy_stride;
  const S* BOND_RESTRICT xq = static_cast<const S*>(p.anchor) + r * p.anchor_stride;
  const index_t vocab = p.vocab;
  const float inv_t = 1.0f / p.temperature;
  float mp = kNegInf, mq = kNegInf;
#pragma omp simd reduction(max : mp, mq)
  for (index_t v = 0; v < vocab; ++v) {
    const float a = Io<T>::load(xp, v), b = Io<T>::load(xq, v);
    mp = a > mp ? a : mp;
    mq = b > mq ? b : mq;
  }
  if (!(mp > kNegInf) || !(mq > kNegInf)) {  // an all -inf row has no distribution: NaN, like the reference
    p.div[r] = p.lse_p[r] = p.lse_q[r] = p.kl_pq[r] = kNaN;
    if (p.shift_p) p.shift_p[r] = p.shift_q[r] = kNaN;
    return kOk;
  }
  // The next row of both inputs, fetched into L2 during this row's sums (prefetch_block in bond/parallel.h).
  const bool prefetch = r + 1 < p.n_rows && !(p.ignore_mask && p.ignore_mask[r + 1]);
  const S* next_p = prefetch ? xp + p.policy_stride : nullptr;
  const S* next_q = prefetch ? xq + p.anchor_stride : nullptr;
  double sp_total = 0.0, sq_total = 0.0, ap_total = 0.0, aq_total = 0.0;
  for (index_t b0 = 0; b0 < vocab; b0 += kSumBlock) {
    const index_t b1 = vocab - b0 < kSumBlock ? vocab : b0 + kSumBlock;
    prefetch_block(next_p, b0, b1);
    prefetch_block(next_q, b0, b1);
    float sp = 0.0f, sq = 0.0f, ap = 0.0f, aq = 0.0f;
#pragma omp simd reduction(+ : sp, sq, ap, aq)
    for (index_t v = b0; v < b1; ++v) {
      const float tp = (Io<T>::load(xp, v) - mp) * inv_t;
      const float tq = (Io<T>::load(xq, v) - mq) * inv_t;
      const float ep = exp_nonpos(tp), eq = exp_nonpos(tq);  // tp, tq <= 0: x <= the row max
      sp += ep;
      sq += eq;
      ap += tp < kExpMinArg ? 0.0f : ep * (tp - tq);  // fast_exp's own test: ep = 0 exactly there
      aq += tq < kExpMinArg ? 0.0f : eq * (tq - tp);
    }
    sp_total += sp;
    sq_total += sq;
    ap_total += ap;
    aq_total += aq;
  }
  const float log_sp = static_cast<float>(std::log(sp_total)), log_sq = static_cast<float>(std::log(sq_total));
  const float kl_pq = static_cast<float>(ap_total / sp_total) - log_sp + log_sq;
  const float kl_qp = static_cast<float>(aq_total / sq_total) - log_sq + log_sp;
  p.kl_pq[r] = kl_pq;
  // a weight of 0 drops its term: 0 * KL is 0 even where that KL is infinite (as the reference)
  p.div[r] = (p.beta > 0.0f ? p.beta * kl_pq : 0.0f) + (p.beta < 1.0f ? (1.0f - p.beta) * kl_qp : 0.0f);
  if (p.shift_p) {
    p.shift_p[r] = mp;
    p.shift_q[r] = mq;
    p.lse_p[r] = log_sp;
    p.lse_q[r] = log_sq;
  } else {
    p.lse_p[r] = mp * inv_t + log_sp;
    p.lse_q[r] = mq * inv_t + log_sq;
  }
  return kOk;
}

// d/dx_v = g [beta p_v (log p_v - log q_v - KL(p||q)) + (1 - beta)(p_v - q_v)] / T.  kUseBeta: beta > 0; at
// beta = 0 the beta term is dropped (its factor may be inf: log q = -inf where q underflows).  A template
// argument, not a run-time `beta > 0 && ...` in the loop: that short circuit kept GCC from if-converting the
// loop, so it ran scalar (callgrind, AVX2 path, 16 x 32000 fp32: 88 instructions per element).
template <class T, bool kUseBeta>
BOND_INLINE void jeffreys_bwd_sweep(const typename Io<T>::storage* BOND_RESTRICT xp,
                                    const typename Io<T>::storage* BOND_RESTRICT xq,
                                    typename Io<T>::storage* BOND_RESTRICT out, index_t vocab, float inv_t, float sp,
                                    float sq, float lse_p, float lse_q, float kl, float gb, float gc) {
#pragma omp simd
  for (index_t v = 0; v < vocab; ++v) {
    const float lp = (Io<T>::load(xp, v) - sp) * inv_t - lse_p;
    const float lq = (Io<T>::load(xq, v) - sq) * inv_t - lse_q;
    const float pv = fast_exp(lp), qv = fast_exp(lq);
    const float bterm = kUseBeta ? (pv > 0.0f ? gb * (pv * (lp - lq - kl)) : 0.0f) : 0.0f;
    Io<T>::store(out, v, bterm + gc * (pv - qv));
  }
}

template <class T>
BOND_INLINE int jeffreys_bwd_row(const TokenJeffreysBwdParams& p, index_t r) {
  using S = typename Io<T>::storage;
  S* BOND_RESTRICT out = static_cast<S*>(p.grad) + r * p.grad_stride;
  const index_t vocab = p.vocab;
  if (p.ignore_mask && p.ignore_mask[r]) {
#pragma omp simd
    for (index_t v = 0; v < vocab; ++v) Io<T>::store(out, v, 0.0f);
    return kOk;
  }
  const S* BOND_RESTRICT xp = static_cast<const S*>(p.policy) + r * p.policy_stride;
  const S* BOND_RESTRICT xq = static_cast<const S*>(p.anchor) + r * p.anchor_stride;
  const float inv_t = 1.0f / p.temperature;
  const float lse_p = p.lse_p[r], lse_q = p.lse_q[r], kl = p.kl_pq[r];
  const float sp = p.shift_p ? p.shift_p[r] : 0.0f, sq = p.shift_q ? p.shift_q[r] : 0.0f;
  const float gb = p.grad_div[r] * p.beta * inv_t;  // folds g / T into both coefficients
  const float gc = p.grad_div[r] * (1.0f - p.beta) * inv_t;
  if (p.beta > 0.0f) jeffreys_bwd_sweep<T, true>(xp, xq, out, vocab, inv_t, sp, sq, lse_p, lse_q, kl, gb, gc);
  else jeffreys_bwd_sweep<T, false>(xp, xq, out, vocab, inv_t, sp, sq, lse_p, lse_q, kl, gb, gc);
  return kOk;
}

#define BOND_DEFINE_ROW_KERNELS(SUFFIX, ATTR)                                      \
  template <class T>                                                               \
  ATTR int jeffreys_fwd_row_##SUFFIX(const TokenJeffreysFwdParams& p, index_t r) { \
    return jeffreys_fwd_row<T>(p, r);                                              \
  }                                                                                \
  template <class T>                                                               \
  ATTR int jeffreys_bwd_row_##SUFFIX(const TokenJeffreysBwdParams& p, index_t r) { \
    return jeffreys_bwd_row<T>(p, r);                                              \
  }
BOND_FOR_EACH_ISA(BOND_DEFINE_ROW_KERNELS)
#undef BOND_DEFINE_ROW_KERNELS

bool scalars_ok(float beta, float temperature) {
  return beta >= 0.0f && beta <= 1.0f && temperature > 0.0f && std::isfinite(temperature);
}

}  // namespace

int token_jeffreys_fwd(const TokenJeffreysFwdParams& p) {
  if (p.n_rows < 0 || p.vocab < 1 || !scalars_ok(p.beta, p.temperature)) return kBadArgument;
  if (p.n_rows == 0) return kOk;
  if (!p.policy || !p.anchor || !p.div || !p.lse_p || !p.lse_q || !p.kl_pq) return kBadArgument;
  if ((p.shift_p == nullptr) != (p.shift_q == nullptr)) return kBadArgument;
  const Isa isa = active_isa();
  int (*fn)(const TokenJeffreysFwdParams&, index_t) = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = BOND_ISA_SELECT(isa, jeffreys_fwd_row, float); break;
    case DType::kBFloat16: fn = BOND_ISA_SELECT(isa, jeffreys_fwd_row, bf16_t); break;
    case DType::kFloat16: fn = BOND_ISA_SELECT(isa, jeffreys_fwd_row, fp16_t); break;
    default: return kUnsupported;
  }
  return parallel_rows(p.n_rows, 2 * p.vocab, p.num_threads, [&](index_t r) { return fn(p, r); });
}

int token_jeffreys_bwd(const TokenJeffreysBwdParams& p) {
  if (p.n_rows < 0 || p.vocab < 1 || !scalars_ok(p.beta, p.temperature)) return kBadArgument;
  if (p.n_rows == 0) return kOk;
  if (!p.policy || !p.anchor || !p.lse_p || !p.lse_q || !p.kl_pq || !p.grad_div || !p.grad) return kBadArgument;
  if ((p.shift_p == nullptr) != (p.shift_q == nullptr)) return kBadArgument;
  const Isa isa = active_isa();
  int (*fn)(const TokenJeffreysBwdParams&, index_t) = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = BOND_ISA_SELECT(isa, jeffreys_bwd_row, float); break;
    case DType::kBFloat16: fn = BOND_ISA_SELECT(isa, jeffreys_bwd_row, bf16_t); break;
    case DType::kFloat16: fn = BOND_ISA_SELECT(isa, jeffreys_bwd_row, fp16_t); break;
    default: return kUnsupported;
  }
  return parallel_rows(p.n_rows, 2 * p.vocab, p.num_threads, [&](index_t r) { return fn(p, r); });
}

}  // namespace cpu
}  // namespace bond
