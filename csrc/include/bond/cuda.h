// Public interface of the torch-free CUDA kernels (csrc/cuda/): the sequence-level BOND launchers.  Raw
// pointers, sizes and a stream in; each returns kOk, kBadArgument, or kCudaErrorBase + the cudaError_t of the
// launch (common.h).  Defined in csrc/cuda/*.cu; python/src/cuda_ops.cpp wraps them for torch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "bond/bond_sequence.h"

namespace bond {
namespace cuda {

// Reward-rank quantiles (docs/math.md §5), one launch for all B·n candidates:
//   rewards (B, n), ref_rewards (B, k) fp32; ref_mask (B, k) or nullptr; p_le, p_lt (B, n) fp32 outputs.
//   smoothing: QuantileSmoothing; eps: the p_le clamp of kSmoothEps.  k < 2^31.
int reward_quantiles(const float* rewards, const float* ref_rewards, const bool* ref_mask, float* p_le, float* p_lt,
                     int64_t B, int64_t n, int64_t k, int smoothing, double eps, cudaStream_t stream);

// Bytes of device workspace bond_sequence needs for these sizes (per-block partial sums and a counter).
int64_t bond_sequence_workspace_bytes(int64_t B, int64_t m, int64_t k);

// The whole sequence-level BOND math (bond/bond_sequence.h) in one kernel launch (plus a 4-byte memset of the
// block counter when it needs more than one block).  `workspace`: bond_sequence_workspace_bytes(...) bytes,
// 8-byte aligned, contents irrelevant.
int bond_sequence(const BondSequenceArgs& args, void* workspace, cudaStream_t stream);

// The J-BOND per-prompt math in one single-block launch.
int jbond_sequence(const JBondSequenceArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace bond
