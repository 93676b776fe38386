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

#define BOND_DEFINE_ROW_KERNELS(SUFFIX, ATTR)                              \
  template <bool kCapS, bool kCapT, bool kCross>                           \
  ATTR int fold_row_##SUFFIX(const JeffreysTileFoldParams& p, index_t r) { \
    return fold_row<kCapS, kCapT, kCross>(p, r);                           \
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

}  // namespace cpu
}  // namespace bond
