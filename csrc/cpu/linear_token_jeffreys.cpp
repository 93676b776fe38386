// The tiled student-teacher divergence's fold of one vocabulary tile into the running row statistics
// (contract and math: bond/linear_token_jeffreys.h; the engine: bond_kernels/ops/linear_token_jeffreys.py).
//
// What it replaces on the cpu backend: about ten torch elementwise passes over each fp32 (N, C) tile (the
// cap, the division, two exps, the cross products, the masks, the sums), each a tile-sized read and most a
// tile-sized write (a 16 MiB tile at the default size, so every pass goes to memory).  Here each row of the
// two tiles is read twice (16 KiB a row at N = 1024, C = 4096: the second read hits L1/L2).
//
// Per row: pass 1 takes the raw maxima.  The cap c tanh(u / c) and the division by T > 0 are increasing, so
// the tile's max of z is cap_s(max x) / T, computed with the same tanh as the entries: no tanh in pass 1.
// Pass 2 computes z and a once each and sums the exps and the products relative to the new running max
// (m_safe: 0 while the max is still -inf, as the torch fold), in blocked fp32 partial sums added up in fp64
// (as token_jeffreys.cpp).  Then the incoming state is rescaled by exp(m_old - m_safe) and added.
//
// The backward's tile gradient and the generalised JSD's second pass (math: bond/linear_token_jeffreys.h)
// replace the torch ops of the same engine: per tile about twelve (gjsd) elementwise passes over fp32 (N, C)
// tiles (the caps, two log-softmax shifts, the mixture's logaddexp, the exps, the products, the masks, the
// sums).  Here each is one sweep per row: read x and y once, write dx once (the gradient) or two sums (the
// pass).  The caps, the division by T (as a product with 1 / T) and the exps are those of the fold.  A point
// mass (V = 1) gets p = 1 and a zero gradient exactly at T = 1 without softcaps; otherwise the AVX2/AVX-512
// builds may fuse the product by 1 / T into the following subtraction (-ffp-contract=fast) differently in
// the fold and in the gradient, which leaves residuals ~1e-7 of the logits (as the torch path on these
// ISAs, through token_jeffreys' backward kernel, measured before this change).
// log m needs a log per entry: log_add_exp below (one exp and a polynomial log1p, vectorised like fast_exp).
#include <cmath>

#include "bond/cpu.h"
#include "bond/isa.h"
#include "bond/parallel.h"
#include "bond/vmath.h"

namespace bond {
namespace cpu {
namespace {

constexpr index_t kSumBlock = 512;  // fp32 partial sums of 512 entries, added up in fp64

// cap(u) / T with cap(u) = c tanh(u / c) (kCap) or u.
template <bool kCap>
BOND_INLINE float transform(float u, float cap, float inv_cap, float inv_t) {
  if constexpr (kCap) u = cap * tanh_f32(u * inv_cap);
  return u * inv_t;
}

BOND_INLINE float finite_or_zero(float m) { return std::isfinite(m) ? m : 0.0f; }

template <bool kCapS, bool kCapT, bool kCross>
BOND_INLINE int fold_row(const JeffreysTileFoldParams& p, index_t r) {
  const float* BOND_RESTRICT xs = p.student + r * p.student_stride;
  const float* BOND_RESTRICT xt = p.teacher + r * p.teacher_stride;
  const index_t cols = p.cols;
  const float inv_t = 1.0f / p.temperature;
  const float cap_s = p.cap_s, inv_cap_s = kCapS ? 1.0f / p.cap_s : 0.0f;
  const float cap_t = p.cap_t, inv_cap_t = kCapT ? 1.0f / p.cap_t : 0.0f;

  float max_x = kNegInf, max_y = kNegInf;
#pragma omp simd reduction(max : max_x, max_y)
  for (index_t v = 0; v < cols; ++v) {
    max_x = xs[v] > max_x ? xs[v] : max_x;
    max_y = xt[v] > max_y ? xt[v] : max_y;
  }
  float* BOND_RESTRICT st = p.state;
  const index_t ld = p.state_stride;
  const float ms_old = st[r], mt_old = st[4 * ld + r];
  const float ms_tile = transform<kCapS>(max_x, cap_s, inv_cap_s, inv_t);
  const float mt_tile = transform<kCapT>(max_y, cap_t, inv_cap_t, inv_t);
  const float ms_new = ms_tile > ms_old ? ms_tile : ms_old;
  const float mt_new = mt_tile > mt_old ? mt_tile : mt_old;
  const float ms = finite_or_zero(ms_new), mt = finite_or_zero(mt_new);

  double ss_total = 0.0, as_total = 0.0, cs_total = 0.0, st_total = 0.0, ct_total = 0.0;
  for (index_t b0 = 0; b0 < cols; b0 += kSumBlock) {
    const index_t b1 = cols - b0 < kSumBlock ? cols : b0 + kSumBlock;
    float ss = 0.0f, as = 0.0f, cs = 0.0f, s_t = 0.0f, ct = 0.0f;
#pragma omp simd reduction(+ : ss, as, cs, s_t, ct)
    for (index_t v = b0; v < b1; ++v) {
      const float z = transform<kCapS>(xs[v], cap_s, inv_cap_s, inv_t);
      const float a = transform<kCapT>(xt[v], cap_t, inv_cap_t, inv_t);
      const float d = z - ms;
      const float es = fast_exp(d), et = fast_exp(a - mt);
      ss += es;
      s_t += et;
      // e = 0 (a -inf logit, or one that underflows) adds nothing: 0 log 0 = 0, and -inf - -inf is NaN
      as += es > 0.0f ? es * d : 0.0f;
      if constexpr (kCross) {
        cs += es > 0.0f ? es * (z - a) : 0.0f;
        ct += et > 0.0f ? et * (a - z) : 0.0f;
      }
    }
    ss_total += ss;
    as_total += as;
    cs_total += cs;
    st_total += s_t;
    ct_total += ct;
  }

  // The incoming state, relative to its max m_old, moved to the new one: the sums scale by exp(m_old - m),
  // the entropy sum also shifts by (m_old - m) s_old (its terms are e (z - m)).  An empty state (s = 0,
  // m = -inf) scales by exp(-inf) = 0 and is skipped in the shift (-inf * 0 is NaN).
  const float ss_old = st[ld + r], st_old = st[5 * ld + r];
  const float alpha_s = std::exp(ms_old - ms), alpha_t = std::exp(mt_old - mt);
  const float shift = ss_old > 0.0f ? (ms_old - ms) * ss_old : 0.0f;
  st[r] = ms_new;
  st[ld + r] = ss_old * alpha_s + static_cast<float>(ss_total);
  st[2 * ld + r] = alpha_s * (st[2 * ld + r] + shift) + static_cast<float>(as_total);
  st[4 * ld + r] = mt_new;
  st[5 * ld + r] = st_old * alpha_t + static_cast<float>(st_total);
  if constexpr (kCross) {
    st[3 * ld + r] = st[3 * ld + r] * alpha_s + static_cast<float>(cs_total);
    st[6 * ld + r] = st[6 * ld + r] * alpha_t + static_cast<float>(ct_total);
  }
  return kOk;
}

// ln(x) for x in [1, 2]: x = 2^k m with m in [sqrt(1/2), sqrt(2)), k in {0, 1}, and ln m = f - f^2 / 2 +
// f^3 P(f) for f = m - 1 (Cephes' logf polynomial, ~1 ulp), ln 2 split in two for the k ln 2 term.
BOND_INLINE float log_1_to_2(float x) {
  const bool big = x > 1.41421356f;
  const float k = big ? 1.0f : 0.0f;
  const float f = (big ? 0.5f * x : x) - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * k;
  y += -0.5f * z;
  return f + y + 0.693359375f * k;
}

// ln(1 + e) for e in [0, 1], to full relative precision for small e: ln(u) e / (u - 1) with u = 1 + e rounded
// (the factor corrects the rounding of u), e itself when u rounds to 1.
BOND_INLINE float log1p_unit(float e) {
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  return d == 0.0f ? e : log_1_to_2(u) * (e / (d == 0.0f ? 1.0f : d));
}

// logaddexp(u, w) = max + ln(1 + e^{min - max}); -inf when both are -inf (callers skip that entry).
BOND_INLINE float log_add_exp(float u, float w) {
  const float hi = u > w ? u : w, lo = u > w ? w : u;
  return hi == kNegInf ? kNegInf : hi + log1p_unit(fast_exp(lo - hi));
}

// One row of the tile gradient (header: the math).  kGjsd: the generalised JSD, else the Jeffreys convention.
template <bool kCapS, bool kCapT, bool kGjsd>
BOND_INLINE int grad_row(const JeffreysTileGradParams& p, index_t r) {
  float* BOND_RESTRICT out = p.grad + r * p.grad_stride;
  const index_t cols = p.cols;
  const float g = p.coef[r];
  if (g == 0.0f) {  // an ignored row (or a zero upstream gradient): nothing read, a NaN in it stays out
#pragma omp simd
    for (index_t v = 0; v < cols; ++v) out[v] = 0.0f;
    return kOk;
  }
  const float* BOND_RESTRICT xs = p.student + r * p.student_stride;
  const float* BOND_RESTRICT xt = p.teacher + r * p.teacher_stride;
  const float inv_t = 1.0f / p.temperature;
  const float cap_s = p.cap_s, inv_cap_s = kCapS ? 1.0f / p.cap_s : 0.0f;
  const float cap_t = p.cap_t, inv_cap_t = kCapT ? 1.0f / p.cap_t : 0.0f;
  const float lse_s = p.lse_s[r], lse_t = p.lse_t[r], aux = p.aux[r];
  const float beta = p.beta, gt = g * inv_t;
  if constexpr (kGjsd) {
    const float w_s = std::log1p(-beta), w_t = std::log(beta), gw = gt * (1.0f - beta);
#pragma omp simd
    for (index_t v = 0; v < cols; ++v) {
      float x = xs[v], th = 0.0f;
      if constexpr (kCapS) {
        th = tanh_f32(x * inv_cap_s);
        x = cap_s * th;
      }
      const float ls = x * inv_t - lse_s;
      const float lt = transform<kCapT>(xt[v], cap_t, inv_cap_t, inv_t) - lse_t;
      const float sv = fast_exp(ls);
      const float lm = log_add_exp(ls + w_s, lt + w_t);
      float d = sv > 0.0f ? gw * (sv * (ls - lm - aux)) : 0.0f;
      if constexpr (kCapS) d *= 1.0f - th * th;
      out[v] = d;
    }
  } else {
    const float gb = gt * beta, gc = gt * (1.0f - beta);
    const bool use_b = beta > 0.0f;  // beta = 0: the term is dropped (log t may be -inf where t underflows)
#pragma omp simd
    for (index_t v = 0; v < cols; ++v) {
      float x = xs[v], th = 0.0f;
      if constexpr (kCapS) {
        th = tanh_f32(x * inv_cap_s);
        x = cap_s * th;
      }
      const float ls = x * inv_t - lse_s;
      const float lt = transform<kCapT>(xt[v], cap_t, inv_cap_t, inv_t) - lse_t;
      const float sv = fast_exp(ls), tv = fast_exp(lt);
      float d = (use_b && sv > 0.0f ? gb * (sv * (ls - lt - aux)) : 0.0f) + gc * (sv - tv);
      if constexpr (kCapS) d *= 1.0f - th * th;
      out[v] = d;
    }
  }
  return kOk;
}

// One row of the generalised JSD's second pass: adds this tile's sum t (log t - log m) and s (log s - log m).
// The products are p * (p > 0 ? diff : 0), as the torch pass: a NaN row stays NaN.
template <bool kCapS, bool kCapT>
BOND_INLINE int gjsd_row(const JeffreysTileGjsdParams& p, index_t r) {
  const float* BOND_RESTRICT xs = p.student + r * p.student_stride;
  const float* BOND_RESTRICT xt = p.teacher + r * p.teacher_stride;
  const index_t cols = p.cols;
  const float inv_t = 1.0f / p.temperature;
  const float cap_s = p.cap_s, inv_cap_s = kCapS ? 1.0f / p.cap_s : 0.0f;
  const float cap_t = p.cap_t, inv_cap_t = kCapT ? 1.0f / p.cap_t : 0.0f;
  const float lse_s = p.lse_s[r], lse_t = p.lse_t[r];
  const float w_s = std::log1p(-p.beta), w_t = std::log(p.beta);
  double kt_total = 0.0, ks_total = 0.0;
  for (index_t b0 = 0; b0 < cols; b0 += kSumBlock) {
    const index_t b1 = cols - b0 < kSumBlock ? cols : b0 + kSumBlock;
    float kt = 0.0f, ks = 0.0f;
#pragma omp simd reduction(+ : kt, ks)
    for (index_t v = b0; v < b1; ++v) {
      const float ls = transform<kCapS>(xs[v], cap_s, inv_cap_s, inv_t) - lse_s;
      const float lt = transform<kCapT>(xt[v], cap_t, inv_cap_t, inv_t) - lse_t;
      const float sv = fast_exp(ls), tv = fast_exp(lt);
      const float lm = log_add_exp(ls + w_s, lt + w_t);
      kt += tv * (tv > 0.0f ? lt - lm : 0.0f);
      ks += sv * (sv > 0.0f ? ls - lm : 0.0f);
    }
    kt_total += kt;
    ks_total += ks;
  }
  p.kl[r] += static_cast<float>(kt_total);
  p.kl[p.kl_stride + r] += static_cast<float>(ks_total);
  return kOk;
}

#define BOND_DEFINE_ROW_KERNELS(SUFFIX, ATTR)                              \
  template <bool kCapS, bool kCapT, bool kCross>                           \
  ATTR int fold_row_##SUFFIX(const JeffreysTileFoldParams& p, index_t r) { \
    return fold_row<kCapS, kCapT, kCross>(p, r);                           \
  }                                                                        \
  template <bool kCapS, bool kCapT, bool kGjsd>                            \
  ATTR int grad_row_##SUFFIX(const JeffreysTileGradParams& p, index_t r) { \
    return grad_row<kCapS, kCapT, kGjsd>(p, r);                            \
  }                                                                        \
  template <bool kCapS, bool kCapT>                                        \
  ATTR int gjsd_row_##SUFFIX(const JeffreysTileGjsdParams& p, index_t r) { \
    return gjsd_row<kCapS, kCapT>(p, r);                                   \
  }
BOND_FOR_EACH_ISA(BOND_DEFINE_ROW_KERNELS)
#undef BOND_DEFINE_ROW_KERNELS

using FoldRow = int (*)(const JeffreysTileFoldParams&, index_t);

template <bool kCapS, bool kCapT>
FoldRow select_cross(Isa isa, bool with_cross) {
  return with_cross ? BOND_ISA_SELECT(isa, fold_row, kCapS, kCapT, true)
                    : BOND_ISA_SELECT(isa, fold_row, kCapS, kCapT, false);
}

FoldRow select_row(Isa isa, bool cap_s, bool cap_t, bool with_cross) {
  if (cap_s) return cap_t ? select_cross<true, true>(isa, with_cross) : select_cross<true, false>(isa, with_cross);
  return cap_t ? select_cross<false, true>(isa, with_cross) : select_cross<false, false>(isa, with_cross);
}

bool cap_ok(float cap) { return cap == 0.0f || (cap > 0.0f && std::isfinite(cap)); }

using GradRow = int (*)(const JeffreysTileGradParams&, index_t);
using GjsdRow = int (*)(const JeffreysTileGjsdParams&, index_t);

template <bool kCapS, bool kCapT>
GradRow select_grad_mode(Isa isa, bool gjsd) {
  return gjsd ? BOND_ISA_SELECT(isa, grad_row, kCapS, kCapT, true)
              : BOND_ISA_SELECT(isa, grad_row, kCapS, kCapT, false);
}

GradRow select_grad(Isa isa, bool cap_s, bool cap_t, bool gjsd) {
  if (cap_s) return cap_t ? select_grad_mode<true, true>(isa, gjsd) : select_grad_mode<true, false>(isa, gjsd);
  return cap_t ? select_grad_mode<false, true>(isa, gjsd) : select_grad_mode<false, false>(isa, gjsd);
}

GjsdRow select_gjsd(Isa isa, bool cap_s, bool cap_t) {
  if (cap_s) return cap_t ? BOND_ISA_SELECT(isa, gjsd_row, true, true) : BOND_ISA_SELECT(isa, gjsd_row, true, false);
  return cap_t ? BOND_ISA_SELECT(isa, gjsd_row, false, true) : BOND_ISA_SELECT(isa, gjsd_row, false, false);
}

// The checks both tile-row kernels share; beta in [0, 1] (Jeffreys) or (0, 1) (the generalised JSD).
bool tile_rows_ok(const JeffreysTileRowParams& p, bool gjsd) {
  if (p.n_rows < 0 || p.cols < 0) return false;
  if (!(p.temperature > 0.0f && std::isfinite(p.temperature)) || !cap_ok(p.cap_s) || !cap_ok(p.cap_t)) return false;
  if (gjsd ? !(p.beta > 0.0f && p.beta < 1.0f) : !(p.beta >= 0.0f && p.beta <= 1.0f)) return false;
  if (p.n_rows == 0 || p.cols == 0) return true;
  return p.student && p.teacher && p.lse_s && p.lse_t && p.student_stride >= p.cols && p.teacher_stride >= p.cols;
}

}  // namespace

int linear_jeffreys_tile_fold(const JeffreysTileFoldParams& p) {
  if (p.n_rows < 0 || p.cols < 0) return kBadArgument;
  if (!(p.temperature > 0.0f && std::isfinite(p.temperature)) || !cap_ok(p.cap_s) || !cap_ok(p.cap_t))
    return kBadArgument;
  if (p.n_rows == 0 || p.cols == 0) return kOk;
  if (!p.student || !p.teacher || !p.state) return kBadArgument;
  if (p.student_stride < p.cols || p.teacher_stride < p.cols || p.state_stride < p.n_rows) return kBadArgument;
  const FoldRow fn = select_row(active_isa(), p.cap_s > 0.0f, p.cap_t > 0.0f, p.with_cross);
  return parallel_rows(p.n_rows, 2 * p.cols, p.num_threads, [&](index_t r) { return fn(p, r); });
}

int linear_jeffreys_tile_grad(const JeffreysTileGradParams& p) {
  if (!tile_rows_ok(p, p.gjsd)) return kBadArgument;
  if (p.n_rows == 0 || p.cols == 0) return kOk;
  if (!p.aux || !p.coef || !p.grad || p.grad_stride < p.cols) return kBadArgument;
  const GradRow fn = select_grad(active_isa(), p.cap_s > 0.0f, p.cap_t > 0.0f, p.gjsd);
  return parallel_rows(p.n_rows, 3 * p.cols, p.num_threads, [&](index_t r) { return fn(p, r); });
}

int linear_jeffreys_tile_gjsd(const JeffreysTileGjsdParams& p) {
  if (!tile_rows_ok(p, true)) return kBadArgument;
  if (p.n_rows == 0 || p.cols == 0) return kOk;
  if (!p.kl || p.kl_stride < p.n_rows) return kBadArgument;
  const GjsdRow fn = select_gjsd(active_isa(), p.cap_s > 0.0f, p.cap_t > 0.0f);
  return parallel_rows(p.n_rows, 2 * p.cols, p.num_threads, [&](index_t r) { return fn(p, r); });
}

}  // namespace cpu
}  // namespace bond
