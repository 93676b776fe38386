// Per-token log-probabilities of sampled labels: forward, backward, and forward+backward in one sweep.
//
// One row at a time (a thread owns whole rows): pass 1 finds the row max of the raw logits, pass 2 sums
// exp(z - max) (and e * (z - max) for the entropy).  Every exponent is a difference first, then a scaling:
// (x - x_max) / T, or with a softcap (tanh(x / c) - tanh(x_max / c)) * c / T, so log p carries a rounding of
// log p, not of |z| = |x| / T (which at T = 1e-3 is 4000), and the row max gives exactly 0.  (Written as
// c * tanh - shift, -ffp-contract fused the product into the subtraction, unrounded on one side only: at
// c / T = 4e31 a V = 1 row's log-prob became +inf.)  At V = 32000 a row is 128 KB of fp32, so pass 2 reads
// it from L2 (1-2 MB per core on current x86), and main memory sees the row once.  The transform
// z = c * tanh(x / c) / T is monotonic, so the max of z is the transform of the max of x: pass 1 needs no
// tanh.  Math and argument contract: bond/token_logprobs.h and bond_kernels/ops/token_logprobs.py.
#include <cmath>
#include <limits>
#include <type_traits>

#include "bond/cpu.h"
#include "bond/dtype.h"
#include "bond/isa.h"
#include "bond/parallel.h"
#include "bond/vmath.h"

namespace bond {
namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Partial sums over blocks of 512 elements, added up in fp64: the fp32 rounding error grows with 512 / lanes
// terms instead of V / lanes, and stays small where the loop is not vectorised at all (a compiler that ignores
// `omp simd`, or a sanitizer build: with blocks of 2048 summed in fp32, scalar order cost 4x the error and
// failed the Jeffreys parity tests' 3e-5).  One fp64 add per 512 elements costs nothing measurable.
constexpr index_t kSumBlock = 512;

struct Transform {
  float inv_t;       // 1 / T
  float inv_cap;     // 1 / c
  float cap_over_t;  // c / T
};

Transform make_transform(float temperature, float softcap) {
  Transform tf;
  tf.inv_t = 1.0f / temperature;
  tf.inv_cap = softcap > 0.0f ? 1.0f / softcap : 0.0f;
  tf.cap_over_t = softcap / temperature;
  return tf;
}

// The row constant the exponents are taken relative to, from the raw row max (or saved shift) x_m: x_m
// itself, or with a softcap tanh(x_m / c).
template <bool kSoftcap>
BOND_INLINE float row_anchor(const Transform& tf, float x_m) {
  return kSoftcap ? tanh_f32(x_m * tf.inv_cap) : x_m;
}

// t = z - z(x_m) from that anchor: the subtraction is exact for nearby values (the ones that matter) and the
// scaling then rounds t, not |z|.
template <bool kSoftcap>
BOND_INLINE float shifted(const Transform& tf, float x, float anchor) {
  return kSoftcap ? (tanh_f32(x * tf.inv_cap) - anchor) * tf.cap_over_t : (x - anchor) * tf.inv_t;
}

// z(x_m) = c * tanh(x_m / c) / T (or x_m / T) from the anchor, for a whole log-sum-exp.
template <bool kSoftcap>
BOND_INLINE float anchor_z(const Transform& tf, float anchor) {
  return anchor * (kSoftcap ? tf.cap_over_t : tf.inv_t);
}

// True if a row holds a NaN (only asked about rows with no finite maximum).
template <class T>
bool row_has_nan(const typename Io<T>::storage* x, index_t vocab) {
  for (index_t v = 0; v < vocab; ++v) {
    const float xv = Io<T>::load(x, v);
    if (xv != xv) return true;
  }
  return false;
}

// The row after r if this thread will sweep it (not ignored), else nullptr.  Rows are handed out in static
// blocks, so r + 1 is usually this thread's next row; at a block's end it is another thread's (a wasted hint).
template <class S, class P>
BOND_INLINE const S* next_row(const P& p, index_t r) {
  if (r + 1 >= p.rows.n_rows || p.labels[r + 1] == p.ignore_index) return nullptr;
  return static_cast<const S*>(p.logits) + p.rows.offset(r + 1);
}

// A pointer to elements [b0, b0 + n) of a row as fp32: the row itself for fp32, else `buf` filled by
// widen_to_f32 (see there for why the exp sweep reads 16-bit rows this way).
template <class T>
BOND_INLINE const float* f32_block(const typename Io<T>::storage* x, index_t b0, index_t n, float* buf) {
  if constexpr (std::is_same<T, float>::value) {
    (void)n;
    (void)buf;
    return x + b0;
  } else {
    widen_to_f32<T>(x + b0, n, buf);
    return buf;
  }
}

template <class T>
BOND_INLINE float row_max(const typename Io<T>::storage* BOND_RESTRICT x, index_t vocab) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (index_t v = 0; v < vocab; ++v) {
    const float xv = Io<T>::load(x, v);
    m = xv > m ? xv : m;
  }
  return m;
}

// `next` (or nullptr): the row this thread sweeps next, prefetched into L2 block by block while this row's sums
// run from cache (see prefetch_block).
template <class T, bool kSoftcap, bool kEntropy>
BOND_INLINE void row_sums(const typename Io<T>::storage* BOND_RESTRICT x, index_t vocab, const Transform& tf,
                          float anchor, const typename Io<T>::storage* next, float* s_out, float* a_out) {
  double s_total = 0.0, a_total = 0.0;
  alignas(64) float buf[kSumBlock];
  for (index_t b0 = 0; b0 < vocab; b0 += kSumBlock) {
    const index_t b1 = vocab - b0 < kSumBlock ? vocab : b0 + kSumBlock;
    prefetch_block(next, b0, b1);
    const float* BOND_RESTRICT xf = f32_block<T>(x, b0, b1 - b0, buf);
    float s = 0.0f, a = 0.0f;
#pragma omp simd reduction(+ : s, a)
    for (index_t i = 0; i < b1 - b0; ++i) {
      const float t = shifted<kSoftcap>(tf, xf[i], anchor);
      const float e = kSoftcap ? fast_exp(t) : exp_nonpos(t);  // t <= 0 without a softcap (x <= the row max)
      s += e;
      if (kEntropy) a += e > 0.0f ? e * t : 0.0f;
    }
    s_total += s;
    a_total += a;
  }
  *s_out = static_cast<float>(s_total);
  *a_out = static_cast<float>(a_total);
}

template <class T>
BOND_INLINE void fill_row(typename Io<T>::storage* BOND_RESTRICT g, index_t vocab, float value) {
#pragma omp simd
  for (index_t v = 0; v < vocab; ++v) Io<T>::store(g, v, value);
}

// ------------------------------------------------------------------------------------------------ forward
template <class T, bool kSoftcap, bool kEntropy>
BOND_INLINE int fwd_row(const TokenLogprobsFwdParams& p, const Transform& tf, index_t r) {
  using S = typename Io<T>::storage;
  const int64_t y = p.labels[r];
  if (y == p.ignore_index) {  // ignored: 0 outputs, the row is never read
    p.logp[r] = 0.0f;
    p.lse[r] = 0.0f;
    if (p.shift) p.shift[r] = 0.0f;
    if (kEntropy) p.entropy[r] = 0.0f;
    return kOk;
  }
  const S* BOND_RESTRICT x = static_cast<const S*>(p.logits) + p.rows.offset(r);
  const bool bad_label = y < 0 || y >= p.vocab;
  // The max skips NaN entries (comparisons with NaN are false); they reach the sums and make them NaN.
  const float mx = bad_label ? kNaN : row_max<T>(x, p.vocab);
  if (bad_label || (!kSoftcap && !(mx > kNegInf))) {  // bad label, or no finite entry and no softcap
    p.logp[r] = kNaN;
    p.lse[r] = kNaN;
    if (p.shift) p.shift[r] = kNaN;
    if (kEntropy) p.entropy[r] = kNaN;
    if (bad_label) return kBadLabel;
    return row_has_nan<T>(x, p.vocab) ? kOk : kAllNegInfRow;  // NaN: the caller names it
  }
  const float anchor = row_anchor<kSoftcap>(tf, mx);  // z(mx) is the row max of z: tanh is monotonic
  float s, a;
  row_sums<T, kSoftcap, kEntropy>(x, p.vocab, tf, anchor, next_row<S>(p, r), &s, &a);
  const float log_s = std::log(s);
  p.logp[r] = shifted<kSoftcap>(tf, Io<T>::load(x, y), anchor) - log_s;
  if (p.shift) {
    p.shift[r] = mx;
    p.lse[r] = log_s;
  } else {
    p.lse[r] = anchor_z<kSoftcap>(tf, anchor) + log_s;
  }
  if (kEntropy) p.entropy[r] = log_s - a / s;  // H = log S - sum_v (e_v / S) t_v
  return kOk;
}

// ----------------------------------------------------------------------------------------------- backward
// dz_v = g (1[v = y] - p_v) - g_H p_v (log p_v + H);  dx_v = dz_v / T * (1 - tanh^2(x_v / c)), with
// log p_v = z_v - z(x_m) - lse from the row's anchor (row_anchor; anchor 0 and the full lse when the forward
// did not split it).
template <bool kSoftcap, bool kEntGrad>
BOND_INLINE float bwd_element(const Transform& tf, float xv, float anchor, float lse, float g, float gh, float h,
                              float onehot) {
  float lp, dfac;
  if (kSoftcap) {
    const float th = tanh_f32(xv * tf.inv_cap);
    const float ath = abs_f32(th);
    lp = (th - anchor) * tf.cap_over_t - lse;
    dfac = tf.inv_t * ((1.0f - ath) * (1.0f + ath));  // 1 - tanh^2 without cancelling 1 - th*th
  } else {
    lp = (xv - anchor) * tf.inv_t - lse;
    dfac = tf.inv_t;
  }
  const float pv = fast_exp(lp);
  float dz = g * (onehot - pv);
  if (kEntGrad) dz -= gh * (pv > 0.0f ? pv * (lp + h) : 0.0f);  // p log p -> 0 for masked entries
  return dz * dfac;
}

template <class T, bool kSoftcap, bool kEntGrad>
BOND_INLINE int bwd_row(const TokenLogprobsBwdParams& p, const Transform& tf, index_t r) {
  using S = typename Io<T>::storage;
  const S* x = static_cast<const S*>(p.logits) + p.rows.offset(r);
  S* out = static_cast<S*>(p.grad) + p.grad_rows.offset(r);  // may be x itself (in place)
  const index_t vocab = p.vocab;
  const int64_t y = p.labels[r];
  if (y == p.ignore_index) {
    fill_row<T>(out, vocab, 0.0f);
    return kOk;
  }
  if (y < 0 || y >= vocab) {
    fill_row<T>(out, vocab, kNaN);
    return kBadLabel;
  }
  const float lse = p.lse[r];
  const float anchor = p.shift ? row_anchor<kSoftcap>(tf, p.shift[r]) : 0.0f;
  const float g = p.grad_logp[r];
  const float gh = kEntGrad ? p.grad_entropy[r] : 0.0f;
  const float h = kEntGrad ? p.entropy[r] : 0.0f;
  const float xy = Io<T>::load(x, y);  // read before the sweep: in place, the sweep overwrites it
  // No restrict here: out may alias x.  Each element is read before it is written, so the aliasing is
  // harmless and the loop still vectorises (the simd pragma asserts independence across iterations).
#pragma omp simd
  for (index_t v = 0; v < vocab; ++v) {
    Io<T>::store(out, v, bwd_element<kSoftcap, kEntGrad>(tf, Io<T>::load(x, v), anchor, lse, g, gh, h, 0.0f));
  }
  Io<T>::store(out, y, bwd_element<kSoftcap, kEntGrad>(tf, xy, anchor, lse, g, gh, h, 1.0f));
  return kOk;
}

// ------------------------------------------------------------------------------------- forward + backward
template <class T, bool kSoftcap>
BOND_INLINE int fwd_bwd_row(const TokenLogprobsFwdBwdParams& p, const Transform& tf, index_t r) {
  using S = typename Io<T>::storage;
  const S* x = static_cast<const S*>(p.logits) + p.rows.offset(r);
  S* out = static_cast<S*>(p.grad) + p.grad_rows.offset(r);
  const index_t vocab = p.vocab;
  const int64_t y = p.labels[r];
  if (y == p.ignore_index) {
    p.logp[r] = 0.0f;
    if (p.lse) p.lse[r] = 0.0f;
    fill_row<T>(out, vocab, 0.0f);
    return kOk;
  }
  const bool bad_label = y < 0 || y >= vocab;
  const float mx = bad_label ? kNaN : row_max<T>(x, vocab);
  // As in fwd_row.
  if (bad_label || (!kSoftcap && !(mx > kNegInf))) {
    const bool nan_row = !bad_label && row_has_nan<T>(x, vocab);  // asked before an in-place fill
    p.logp[r] = kNaN;
    if (p.lse) p.lse[r] = kNaN;
    fill_row<T>(out, vocab, kNaN);
    if (bad_label) return kBadLabel;
    return nan_row ? kOk : kAllNegInfRow;
  }
  const float anchor = row_anchor<kSoftcap>(tf, mx);
  float s, a;
  row_sums<T, kSoftcap, false>(x, vocab, tf, anchor, next_row<S>(p, r), &s, &a);
  const float log_s = std::log(s);
  const float inv_s = 1.0f / s;
  const float g = p.grad_logp[r];
  const float xy = Io<T>::load(x, y);
  const float ty = shifted<kSoftcap>(tf, xy, anchor);
  p.logp[r] = ty - log_s;
  if (p.lse) p.lse[r] = anchor_z<kSoftcap>(tf, anchor) + log_s;
  // Third sweep, from cache: p_v = exp(t_v) / S, grad = -g p_v * dz/dx (the label is fixed up below).
#pragma omp simd
  for (index_t v = 0; v < vocab; ++v) {
    const float xv = Io<T>::load(x, v);
    float t, dfac;
    if (kSoftcap) {
      const float th = tanh_f32(xv * tf.inv_cap);
      const float ath = abs_f32(th);
      t = (th - anchor) * tf.cap_over_t;
      dfac = tf.inv_t * ((1.0f - ath) * (1.0f + ath));
    } else {
      t = (xv - anchor) * tf.inv_t;
      dfac = tf.inv_t;
    }
    Io<T>::store(out, v, -g * ((kSoftcap ? fast_exp(t) : exp_nonpos(t)) * inv_s) * dfac);
  }
  float dfac_y = tf.inv_t;
  if (kSoftcap) {
    const float ath = abs_f32(tanh_f32(xy * tf.inv_cap));
    dfac_y *= (1.0f - ath) * (1.0f + ath);
  }
  Io<T>::store(out, y, g * (1.0f - fast_exp(ty) * inv_s) * dfac_y);
  return kOk;
}

// ------------------------------------------------------------------------- per-ISA wrappers and selection
#define BOND_DEFINE_ROW_KERNELS(SUFFIX, ATTR)                                                         \
  template <class T, bool kSoftcap, bool kEntropy>                                                    \
  ATTR int fwd_row_##SUFFIX(const TokenLogprobsFwdParams& p, const Transform& tf, index_t r) {        \
    return fwd_row<T, kSoftcap, kEntropy>(p, tf, r);                                                  \
  }                                                                                                   \
  template <class T, bool kSoftcap, bool kEntGrad>                                                    \
  ATTR int bwd_row_##SUFFIX(const TokenLogprobsBwdParams& p, const Transform& tf, index_t r) {        \
    return bwd_row<T, kSoftcap, kEntGrad>(p, tf, r);                                                  \
  }                                                                                                   \
  template <class T, bool kSoftcap>                                                                   \
  ATTR int fwd_bwd_row_##SUFFIX(const TokenLogprobsFwdBwdParams& p, const Transform& tf, index_t r) { \
    return fwd_bwd_row<T, kSoftcap>(p, tf, r);                                                        \
  }
BOND_FOR_EACH_ISA(BOND_DEFINE_ROW_KERNELS)
#undef BOND_DEFINE_ROW_KERNELS

using FwdFn = int (*)(const TokenLogprobsFwdParams&, const Transform&, index_t);
using BwdFn = int (*)(const TokenLogprobsBwdParams&, const Transform&, index_t);
using FwdBwdFn = int (*)(const TokenLogprobsFwdBwdParams&, const Transform&, index_t);

template <class T>
FwdFn pick_fwd(Isa isa, bool softcap, bool entropy) {
  if (softcap)
    return entropy ? BOND_ISA_SELECT(isa, fwd_row, T, true, true) : BOND_ISA_SELECT(isa, fwd_row, T, true, false);
  return entropy ? BOND_ISA_SELECT(isa, fwd_row, T, false, true) : BOND_ISA_SELECT(isa, fwd_row, T, false, false);
}

template <class T>
BwdFn pick_bwd(Isa isa, bool softcap, bool ent_grad) {
  if (softcap)
    return ent_grad ? BOND_ISA_SELECT(isa, bwd_row, T, true, true) : BOND_ISA_SELECT(isa, bwd_row, T, true, false);
  return ent_grad ? BOND_ISA_SELECT(isa, bwd_row, T, false, true) : BOND_ISA_SELECT(isa, bwd_row, T, false, false);
}

template <class T>
FwdBwdFn pick_fwd_bwd(Isa isa, bool softcap) {
  return softcap ? BOND_ISA_SELECT(isa, fwd_bwd_row, T, true) : BOND_ISA_SELECT(isa, fwd_bwd_row, T, false);
}

bool scalars_ok(float temperature, float softcap) {
  return temperature > 0.0f && std::isfinite(temperature) && softcap >= 0.0f && std::isfinite(softcap);
}

}  // namespace

int token_logprobs_fwd(const TokenLogprobsFwdParams& p) {
  if (!p.rows.valid() || p.vocab < 1 || !scalars_ok(p.temperature, p.softcap)) return kBadArgument;
  if (p.rows.n_rows == 0) return kOk;
  if (!p.logits || !p.labels || !p.logp || !p.lse) return kBadArgument;
  const Isa isa = active_isa();
  const bool softcap = p.softcap > 0.0f, entropy = p.entropy != nullptr;
  FwdFn fn = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = pick_fwd<float>(isa, softcap, entropy); break;
    case DType::kBFloat16: fn = pick_fwd<bf16_t>(isa, softcap, entropy); break;
    case DType::kFloat16: fn = pick_fwd<fp16_t>(isa, softcap, entropy); break;
    default: return kUnsupported;
  }
  const Transform tf = make_transform(p.temperature, p.softcap);
  return parallel_rows(p.rows.n_rows, p.vocab, p.num_threads, [&](index_t r) { return fn(p, tf, r); });
}

int token_logprobs_bwd(const TokenLogprobsBwdParams& p) {
  if (!p.rows.valid() || !p.grad_rows.valid() || p.grad_rows.n_rows != p.rows.n_rows || p.vocab < 1 ||
      !scalars_ok(p.temperature, p.softcap))
    return kBadArgument;
  if (p.rows.n_rows == 0) return kOk;
  if (!p.logits || !p.labels || !p.lse || !p.grad_logp || !p.grad) return kBadArgument;
  const bool ent_grad = p.grad_entropy != nullptr;
  if (ent_grad && !p.entropy) return kBadArgument;
  const Isa isa = active_isa();
  const bool softcap = p.softcap > 0.0f;
  BwdFn fn = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = pick_bwd<float>(isa, softcap, ent_grad); break;
    case DType::kBFloat16: fn = pick_bwd<bf16_t>(isa, softcap, ent_grad); break;
    case DType::kFloat16: fn = pick_bwd<fp16_t>(isa, softcap, ent_grad); break;
    default: return kUnsupported;
  }
  const Transform tf = make_transform(p.temperature, p.softcap);
  return parallel_rows(p.rows.n_rows, p.vocab, p.num_threads, [&](index_t r) { return fn(p, tf, r); });
}

int token_logprobs_fwd_bwd(const TokenLogprobsFwdBwdParams& p) {
  if (!p.rows.valid() || !p.grad_rows.valid() || p.grad_rows.n_rows != p.rows.n_rows || p.vocab < 1 ||
      !scalars_ok(p.temperature, p.softcap))
    return kBadArgument;
  if (p.rows.n_rows == 0) return kOk;
  if (!p.logits || !p.labels || !p.grad_logp || !p.logp || !p.grad) return kBadArgument;
  const Isa isa = active_isa();
  const bool softcap = p.softcap > 0.0f;
  FwdBwdFn fn = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = pick_fwd_bwd<float>(isa, softcap); break;
    case DType::kBFloat16: fn = pick_fwd_bwd<bf16_t>(isa, softcap); break;
    case DType::kFloat16: fn = pick_fwd_bwd<fp16_t>(isa, softcap); break;
    default: return kUnsupported;
  }
  const Transform tf = make_transform(p.temperature, p.softcap);
  return parallel_rows(p.rows.n_rows, p.vocab, p.num_threads, [&](index_t r) { return fn(p, tf, r); });
}

}  // namespace cpu
}  // namespace bond
