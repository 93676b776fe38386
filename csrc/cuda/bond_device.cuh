// Device helpers shared by the sequence-level kernels: group-wise quantile counting and fixed-order block sums.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "bond/common.h"
#include "bond/sequence_math.h"

namespace bond {
namespace cuda {
namespace detail {

// kOk, or the last launch error offset by kCudaErrorBase (bond/common.h).
inline int launch_status() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? kOk : kCudaErrorBase + static_cast<int>(err);
}

constexpr unsigned kFullMask = 0xffffffffu;

// Lanes that share one candidate's count over its k reference rewards: a power of two in [1, 32] giving
// each lane about 8 references.  At k = 64 that is 8 lanes, whose loads of one reference row are one 32-byte
// sector, and 3 shuffle steps to combine the counts; k = 2048 uses a full warp with 64 references per lane.
inline int lanes_per_candidate(int64_t k) {
  int lanes = 1;
  while (lanes < 32 && static_cast<int64_t>(lanes) * 8 * 2 <= k) lanes *= 2;
  return lanes;
}

// Counts over one reference row, split across the `lanes` lanes of an aligned group of a warp (lane = this
// lane's index in its group).  Every lane of the warp must call this (the shuffles take the full mask);
// inactive lanes pass active = false and contribute zeros.  Ties use the exact comparisons of the reference:
// c_le counts r' <= r, c_lt counts r' < r; ±inf are ordered, a NaN never counts.
template <typename R>
__device__ __forceinline__ void group_counts(const R* __restrict__ ref_row, const bool* __restrict__ mask_row,
                                             int64_t k, R r, int lane, int lanes, bool active, int& c_le, int& c_lt,
                                             int& kc) {
  int le = 0, lt = 0, valid = 0;
  if (active) {
    if (mask_row == nullptr) {
      for (int64_t j = lane; j < k; j += lanes) {
        const R x = __ldg(ref_row + j);
        le += x <= r;
        lt += x < r;
      }
      valid = 0;  // filled in below: no mask means every sample is valid
    } else {
      for (int64_t j = lane; j < k; j += lanes) {
        const R x = __ldg(ref_row + j);
        const bool v = __ldg(reinterpret_cast<const unsigned char*>(mask_row) + j) != 0;
        le += v && x <= r;
        lt += v && x < r;
        valid += v;
      }
    }
  }
  for (int off = lanes >> 1; off > 0; off >>= 1) {
    le += __shfl_xor_sync(kFullMask, le, off);
    lt += __shfl_xor_sync(kFullMask, lt, off);
    valid += __shfl_xor_sync(kFullMask, valid, off);
  }
  c_le = le;
  c_lt = lt;
  kc = mask_row == nullptr ? static_cast<int>(k) : valid;
}

// Sums of NV doubles per thread over the block, all NV in one round (two barriers in all), in a fixed order
// (shuffle tree within each warp, then the warps in index order), so results are bitwise reproducible.
// Every thread must call it; the totals are returned to every thread in `v`.  `scratch` is shared memory of
// at least 33·NV doubles; the call ends with a barrier, so it can be reused at once.
template <int THREADS, int NV>
__device__ __forceinline__ void block_sums(double (&v)[NV], double* scratch) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = THREADS / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int q = 0; q < NV; ++q) {
    for (int off = 16; off > 0; off >>= 1) v[q] += __shfl_down_sync(kFullMask, v[q], off);
    if (lane == 0) scratch[q * 32 + warp] = v[q];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int q = 0; q < NV; ++q) {
      double w = lane < kWarps ? scratch[q * 32 + lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) w += __shfl_down_sync(kFullMask, w, off);
      if (lane == 0) scratch[32 * NV + q] = w;
    }
  }
  __syncthreads();
#pragma unroll
  for (int q = 0; q < NV; ++q) v[q] = scratch[32 * NV + q];
  __syncthreads();
}

}  // namespace detail
}  // namespace cuda
}  // namespace bond
