// Monte-Carlo reward-rank quantiles (docs/math.md §5), exactly as bond_kernels/reference/quantiles.py:
// counts are exact integers held in fp32 (k < 2^24) and the divisions are the reference's fp32 divisions, so
// results match the reference bit for bit.
#include "bond/cpu.h"
#include "bond/dtype.h"
#include "bond/parallel.h"

namespace bond {
namespace cpu {
namespace {

template <class T>
int quantile_row(const RewardQuantilesParams& p, index_t b) {
  using S = typename Io<T>::storage;
  const S* r = static_cast<const S*>(p.rewards) + b * p.rewards_stride;
  const S* ref = static_cast<const S*>(p.ref_rewards) + b * p.ref_stride;
  const bool* mask = p.ref_mask ? p.ref_mask + b * p.mask_stride : nullptr;
  const index_t k = p.k;
  index_t valid = k;
  if (mask) {
    valid = 0;
    for (index_t j = 0; j < k; ++j) valid += mask[j] ? 1 : 0;
  }
  const float kf = static_cast<float>(valid);
  for (index_t i = 0; i < p.n; ++i) {
    const float ri = Io<T>::load(r, i);
    index_t le = 0, lt = 0;
    if (mask) {
#pragma omp simd reduction(+ : le, lt)
      for (index_t j = 0; j < k; ++j) {
        const float rj = Io<T>::load(ref, j);
        le += (mask[j] && rj <= ri) ? 1 : 0;
        lt += (mask[j] && rj < ri) ? 1 : 0;
      }
    } else {
#pragma omp simd reduction(+ : le, lt)
      for (index_t j = 0; j < k; ++j) {
        const float rj = Io<T>::load(ref, j);
        le += rj <= ri ? 1 : 0;
        lt += rj < ri ? 1 : 0;
      }
    }
    const float c_le = static_cast<float>(le), c_lt = static_cast<float>(lt);
    float p_le, p_lt;
    if (p.mode == kQuantileSelf) {
      p_le = (c_le + 1.0f) / (kf + 1.0f);
      p_lt = c_lt / (kf + 1.0f);
    } else {
      p_le = c_le / kf;  // k = 0 (no valid sample) gives NaN, as in the reference; the caller validates
      p_lt = c_lt / kf;
      if (p.mode == kQuantileEps) p_le = p_le < p.eps ? p.eps : p_le;
    }
    const index_t o = b * p.n + i;
    p.p_le[o] = p_le;
    p.p_lt[o] = p_lt;
    if (p.c_le) p.c_le[o] = c_le;
    if (p.c_lt) p.c_lt[o] = c_lt;
  }
  return kOk;
}

}  // namespace

int reward_quantiles(const RewardQuantilesParams& p) {
  if (p.batch < 0 || p.n < 0 || p.k < 0 || p.mode < kQuantileNone || p.mode > kQuantileEps) return kBadArgument;
  if (p.batch == 0 || p.n == 0) return kOk;
  if (!p.rewards || !p.p_le || !p.p_lt || (p.k > 0 && !p.ref_rewards)) return kBadArgument;
  int (*fn)(const RewardQuantilesParams&, index_t) = nullptr;
  switch (p.dtype) {
    case DType::kFloat32: fn = &quantile_row<float>; break;
    case DType::kBFloat16: fn = &quantile_row<bf16_t>; break;
    case DType::kFloat16: fn = &quantile_row<fp16_t>; break;
    default: return kUnsupported;
  }
  return parallel_rows(p.batch, p.n * (p.k + 1), p.num_threads, [&](index_t b) { return fn(p, b); });
}

}  // namespace cpu
}  // namespace bond
