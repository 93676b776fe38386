// Parameter struct of the CPU reward_quantiles (kernel: csrc/cpu/reward_quantiles.cpp, declared in
// bond/cpu.h; contract of the launchers: bond_kernels/ops/reward_quantiles.py).  The CUDA launcher takes
// plain arguments (bond/cuda.h).
//
// reward_quantiles (docs/math.md §5): per prompt b and candidate i,
//   c_le = sum_j mask_j 1[ref_j <= r_i],  c_lt = sum_j mask_j 1[ref_j < r_i],  k = sum_j mask_j
//   mode 0 "none": p_le = c_le / k, p_lt = c_lt / k;  mode 1 "self": (c_le + 1)/(k + 1), c_lt/(k + 1);
//   mode 2 "eps":  p_le = max(c_le / k, eps), p_lt = c_lt / k.
#pragma once

#include "bond/common.h"

namespace bond {
namespace cpu {

enum QuantileMode : int { kQuantileNone = 0, kQuantileSelf = 1, kQuantileEps = 2 };

struct RewardQuantilesParams {
  const void* rewards = nullptr;      // (B, n) of dtype, row stride rewards_stride, element stride 1
  const void* ref_rewards = nullptr;  // (B, k) of dtype, row stride ref_stride
  const bool* ref_mask = nullptr;     // (B, k) row stride mask_stride, or nullptr (all valid)
  float* p_le = nullptr;              // (B, n) contiguous out
  float* p_lt = nullptr;              // (B, n) contiguous out
  float* c_le = nullptr;              // (B, n) optional raw counts out (nullptr to skip)
  float* c_lt = nullptr;
  DType dtype = DType::kFloat32;
  index_t batch = 0;
  index_t n = 0;
  index_t k = 0;
  index_t rewards_stride = 0;
  index_t ref_stride = 0;
  index_t mask_stride = 0;
  int mode = kQuantileNone;
  float eps = 0.0f;
  int num_threads = 0;  // <= 0: the OpenMP default
};

}  // namespace cpu
}  // namespace bond
