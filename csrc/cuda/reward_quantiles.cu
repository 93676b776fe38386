// Reward-rank quantiles (docs/math.md §5) for all B·n candidates in one launch.
//
// Work is B·n·k comparisons (1M at B = 1024, n = 16, k = 64) on 4·B·(n + k) bytes of input: small and
// latency-bound, so the kernel spreads it over the whole card.  Each candidate is counted by an aligned group
// of `lanes` lanes (bond_device.cuh) that stride over the prompt's reference row together, so a warp's loads
// of one row are coalesced, and candidates of one prompt sit in neighbouring groups, so the row is read from
// L1 once per warp.  The group combines its counts with shuffles (no atomics: deterministic).
#include <cuda_runtime.h>

#include "bond/cuda.h"
#include "bond/sequence_math.h"
#include "bond_device.cuh"

namespace bond {
namespace cuda {
namespace {

// 256 threads: a multiple of every group size (1-32 lanes), small enough that ~8 blocks share an SM.
constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    reward_quantiles_kernel(const float* __restrict__ rewards, const float* __restrict__ ref_rewards,
                            const bool* __restrict__ ref_mask, float* __restrict__ p_le, float* __restrict__ p_lt,
                            int64_t n, int64_t k, int64_t total, int lanes, int smoothing, double eps) {
  const int per_block = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  // int64: B·n candidates may exceed 2^31 (and row·k certainly can).
  const int64_t e = static_cast<int64_t>(blockIdx.x) * per_block + group;
  const bool active = e < total;
  const int64_t row = active ? e / n : 0;
  const float r = active ? __ldg(rewards + e) : 0.0f;
  int c_le, c_lt, kc;
  detail::group_counts<float>(ref_rewards + row * k, ref_mask ? ref_mask + row * k : nullptr, k, r, lane, lanes, active,
                              c_le, c_lt, kc);
  if (active && lane == 0) {
    float le, lt;
    quantiles_from_counts<float>(c_le, c_lt, kc, smoothing, eps, le, lt);
    p_le[e] = le;
    p_lt[e] = lt;
  }
}

}  // namespace

int reward_quantiles(const float* rewards, const float* ref_rewards, const bool* ref_mask, float* p_le, float* p_lt,
                     int64_t B, int64_t n, int64_t k, int smoothing, double eps, cudaStream_t stream) {
  if (B < 0 || n < 0 || k < 0 || k > INT32_MAX) return kBadArgument;
  const int64_t total = B * n;
  if (total == 0) return kOk;
  const int lanes = detail::lanes_per_candidate(k);
  const int64_t per_block = kThreads / lanes;
  const int64_t blocks = (total + per_block - 1) / per_block;
  if (blocks > INT32_MAX) return kBadArgument;
  reward_quantiles_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      rewards, ref_rewards, ref_mask, p_le, p_lt, n, k, total, lanes, smoothing, eps);
  return detail::launch_status();
}

}  // namespace cuda
}  // namespace bond
