// The sequence-level BOND and J-BOND math in one launch each (contract: bond/bond_sequence.h).
//
// BOND: the quantiles are B·m·k comparisons (1M at B = 1024, m = 16, k = 64), too many for one SM inside the
// 10 µs target (~4 instructions per comparison: ~18 µs on one H100 SM), so the kernel runs one block per
// `rows` prompts, whole prompts per block so that per-prompt baselines stay inside a block.  The batch
// reductions (diagnostics, and the baseline when m = 1) are finished by the last block to arrive: every block
// writes its partial sums, fences, and takes a ticket from a counter; the block that draws the last ticket
// adds the partials in block order (deterministic, no float atomics) and writes the batch results.
//
// J-BOND: O(1) work per prompt, so one block of 1024 threads does all of it (two passes over B).
#include <cuda_runtime.h>

#include "bond/cuda.h"
#include "bond/sequence_math.h"
#include "bond_device.cuh"

namespace bond {
namespace cuda {
namespace {

// 256 threads per BOND block: a multiple of every lane-group size, and ~8 resident blocks per SM.
constexpr int kThreads = 256;
// J-BOND runs in one block; 1024 threads keep B = 1024 at one prompt per thread.
constexpr int kJBondThreads = 1024;
// Partial sums per BOND block: returns, p_le, log π − log π_ref, −log π(y_BoN).
constexpr int kPartials = 4;

struct BondLaunch {
  int lanes;     // lanes per candidate (bond_device.cuh)
  int64_t rows;  // prompts per block
  int64_t blocks;
};

BondLaunch bond_launch(int64_t B, int64_t m, int64_t k) {
  BondLaunch l;
  l.lanes = detail::lanes_per_candidate(k);
  const int64_t per_pass = kThreads / l.lanes;  // candidates a block counts at once
  // Enough prompts to fill one pass of the block; prompts with more than per_pass samples take several.
  l.rows = m > 0 ? (per_pass / m > 0 ? per_pass / m : 1) : per_pass;
  l.blocks = B > 0 ? (B + l.rows - 1) / l.rows : 1;
  return l;
}

template <typename R>
__global__ void __launch_bounds__(kThreads)
    bond_sequence_kernel(BondSequenceArgs a, int lanes, int64_t rows, double* __restrict__ partials,
                         unsigned* __restrict__ counter) {
  __shared__ double scratch[33 * kPartials];
  // Row sums of the returns for per-prompt baselines: rows <= kThreads / 2 whenever m >= 2.
  __shared__ double row_sum[kThreads / 2];
  __shared__ bool is_last;

  const int64_t m = a.m, k = a.k, j = a.j, M = a.B * m;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows;
  const int64_t row1 = row0 + rows < a.B ? row0 + rows : a.B;
  const int64_t nrows = row1 > row0 ? row1 - row0 : 0;
  const int64_t first = row0 * m, count = nrows * m;  // this block's candidates: [first, first + count)
  const bool per_prompt = m > 1;
  const float beta = static_cast<float>(a.beta);
  const R* rewards = static_cast<const R*>(a.policy_rewards);
  const R* refs = static_cast<const R*>(a.ref_rewards);

  // Phase 1: quantiles, log π_BoN and the partial sums.  The loop bound is the same for every thread, so
  // every lane reaches the shuffles in group_counts.
  const int per_pass = kThreads / lanes;
  const int group = threadIdx.x / lanes, lane = threadIdx.x % lanes;
  double s_ret = 0.0, s_ple = 0.0, s_kl = 0.0, s_bon = 0.0;
  for (int64_t base = 0; base < count; base += per_pass) {
    const int64_t local = base + group;
    const bool active = local < count;
    const int64_t e = first + (active ? local : 0);
    const int64_t row = e / (m > 0 ? m : 1);
    const R r = active ? rewards[e] : R(0);
    int c_le, c_lt, kc;
    detail::group_counts<R>(refs + row * k, a.ref_mask ? a.ref_mask + row * k : nullptr, k, r, lane, lanes, active,
                            c_le, c_lt, kc);
    if (active && lane == 0) {
      float ple, plt;
      quantiles_from_counts<R>(c_le, c_lt, kc, a.smoothing, a.eps, ple, plt);
      const float logp = a.policy_logp[e], ref = a.policy_ref_logp[e];
      const float lb = bon_log_prob(ref, ple, plt, a.n, a.correction);
      a.p_le[e] = ple;
      a.log_bon[e] = lb;
      s_ret += static_cast<double>(lb - logp);
      s_ple += ple;
      s_kl += static_cast<double>(logp - ref);
    }
  }
  // Best-of-N samples of this block's prompts: their constant coefficient and −log π sum.
  const float bon_c = static_cast<float>(-(1.0 - a.beta) / static_cast<double>(j * a.B > 0 ? j * a.B : 1));
  for (int64_t t = threadIdx.x; t < nrows * j; t += kThreads) {
    const int64_t idx = row0 * j + t;
    s_bon -= a.bon_logp[idx];
    a.bon_coef[idx] = bon_c;
  }
  __syncthreads();  // this block's log_bon writes are visible to the whole block from here

  // Phase 2: coefficients whose baseline stays inside the prompt (m > 1) or that have none.
  if (per_prompt && a.baseline != kBaselineNone) {
    for (int64_t r = threadIdx.x; r < nrows; r += kThreads) {
      double s = 0.0;
      for (int64_t i = 0; i < m; ++i) {
        const int64_t e = (row0 + r) * m + i;
        s += static_cast<double>(a.log_bon[e] - a.policy_logp[e]);
      }
      row_sum[r] = s;
    }
    __syncthreads();
  }
  if (per_prompt || a.baseline == kBaselineNone) {
    for (int64_t local = threadIdx.x; local < count; local += kThreads) {
      const int64_t e = first + local;
      const double ret = static_cast<double>(a.log_bon[e] - a.policy_logp[e]);
      double b = 0.0;
      if (a.baseline == kBaselineLoo) b = (row_sum[local / m] - ret) / static_cast<double>(m - 1);
      if (a.baseline == kBaselineMean) b = row_sum[local / m] / static_cast<double>(m);
      const float adv = static_cast<float>(ret - b);
      a.policy_coef[e] = bond_coef(beta, adv, M);
    }
  }

  // Phase 3: block sums in a fixed order, then the last block finishes the batch.
  double sums[kPartials] = {s_ret, s_ple, s_kl, s_bon};
  detail::block_sums<kThreads, kPartials>(sums, scratch);
  if (counter != nullptr) {
    if (threadIdx.x == 0) {
      // int64 offset, like the reader below: blockIdx.x · kPartials is a 32-bit product otherwise.
      for (int q = 0; q < kPartials; ++q) partials[static_cast<int64_t>(blockIdx.x) * kPartials + q] = sums[q];
    }
    // Make this block's partials and log_bon visible device-wide before its ticket is counted.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
  }

  double tot[kPartials] = {sums[0], sums[1], sums[2], sums[3]};
  if (counter != nullptr) {
    // Each thread adds a strided slice of the blocks, then one fixed-order block sum: the same order every
    // run.  __ldcg reads through L2: other blocks wrote these, this SM's L1 is not coherent with them.
    for (int q = 0; q < kPartials; ++q) {
      tot[q] = 0.0;
      for (int64_t g = threadIdx.x; g < gridDim.x; g += kThreads) tot[q] += __ldcg(partials + g * kPartials + q);
    }
    detail::block_sums<kThreads, kPartials>(tot, scratch);
  }
  if (threadIdx.x == 0) {
    const double dm = static_cast<double>(M), dbj = static_cast<double>(a.B * j);
    // An empty batch gives NaN means, as torch's mean of an empty tensor does.
    a.stats[0] = static_cast<float>(-tot[0] / dm);
    a.stats[1] = static_cast<float>(tot[3] / dbj);
    a.stats[2] = static_cast<float>(tot[1] / dm);
    a.stats[3] = static_cast<float>(tot[2] / dm);
  }
  if (!per_prompt && a.baseline != kBaselineNone) {
    // One sample per prompt: the baseline is the leave-one-out (or plain) mean over the whole batch.
    for (int64_t e = threadIdx.x; e < M; e += kThreads) {
      const double ret = static_cast<double>(__ldcg(a.log_bon + e) - a.policy_logp[e]);
      double b;
      if (a.baseline == kBaselineLoo) {
        b = M < 2 ? 0.0 : (tot[0] - ret) / static_cast<double>(M - 1);
      } else {
        b = tot[0] / static_cast<double>(M);
      }
      const float adv = static_cast<float>(ret - b);
      a.policy_coef[e] = bond_coef(beta, adv, M);
    }
  }
}

__global__ void __launch_bounds__(kJBondThreads) jbond_sequence_kernel(JBondSequenceArgs a) {
  __shared__ double scratch[33 * 5];
  const int64_t B = a.B;
  const float beta = static_cast<float>(a.beta), gamma = static_cast<float>(a.gamma);
  const float pen = static_cast<float>(-a.penalty);
  const float best_c = static_cast<float>(-(1.0 - a.beta) / static_cast<double>(B > 0 ? B : 1));
  double s_ret = 0.0, s_rj = 0.0, s_bad = 0.0, s_ratio = 0.0, s_best = 0.0;
  for (int64_t b = threadIdx.x; b < B; b += kJBondThreads) {
    const float r = a.policy_rewards[b];
    const float a0 = a.anchor_rewards[2 * b], a1 = a.anchor_rewards[2 * b + 1];
    // fminf would drop a NaN; torch.min propagates it (NaN rewards are rejected upstream anyway).
    const float worst = (a0 != a0 || a1 != a1) ? __int_as_float(0x7fc00000) : (a1 < a0 ? a1 : a0);
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
  double t[5] = {s_ret, s_rj, s_bad, s_ratio, s_best};
  detail::block_sums<kJBondThreads, 5>(t, scratch);
  const double t_ret = t[0], t_rj = t[1], t_bad = t[2], t_ratio = t[3], t_best = t[4];
  if (threadIdx.x == 0) {
    const double db = static_cast<double>(B);
    a.stats[0] = static_cast<float>(t_rj / db);
    a.stats[1] = static_cast<float>(t_bad / db);
    a.stats[2] = static_cast<float>(t_ratio / db);
    a.stats[3] = static_cast<float>(t_best / db);
  }
  // The same thread reads back the jbond_reward it wrote: no barrier needed beyond block_sums'.
  for (int64_t b = threadIdx.x; b < B; b += kJBondThreads) {
    const float ratio = a.policy_logp[b] - a.anchor_logp[b];
    const double ret = static_cast<double>(a.jbond_reward[b] - ratio);
    const double base = B < 2 ? 0.0 : (t_ret - ret) / static_cast<double>(B - 1);
    const float adv = static_cast<float>(ret - base);
    a.policy_coef[b] = jbond_coef(beta, adv, gamma, ratio, B);
  }
}

}  // namespace

int64_t bond_sequence_workspace_bytes(int64_t B, int64_t m, int64_t k) {
  const BondLaunch l = bond_launch(B, m, k);
  // Partials (fp64) first, then the 4-byte counter padded to 8.
  return l.blocks * kPartials * static_cast<int64_t>(sizeof(double)) + 8;
}

int bond_sequence(const BondSequenceArgs& a, void* workspace, cudaStream_t stream) {
  if (a.B < 0 || a.m < 0 || a.k < 0 || a.j < 0 || a.k > INT32_MAX) return kBadArgument;
  const BondLaunch l = bond_launch(a.B, a.m, a.k);
  if (l.blocks > INT32_MAX) return kBadArgument;
  double* partials = static_cast<double*>(workspace);
  unsigned* counter = nullptr;
  if (l.blocks > 1) {
    counter = reinterpret_cast<unsigned*>(partials + l.blocks * kPartials);
    const cudaError_t err = cudaMemsetAsync(counter, 0, sizeof(unsigned), stream);
    if (err != cudaSuccess) return kCudaErrorBase + static_cast<int>(err);
  }
  if (a.rewards_fp64) {
    bond_sequence_kernel<double>
        <<<static_cast<unsigned>(l.blocks), kThreads, 0, stream>>>(a, l.lanes, l.rows, partials, counter);
  } else {
    bond_sequence_kernel<float>
        <<<static_cast<unsigned>(l.blocks), kThreads, 0, stream>>>(a, l.lanes, l.rows, partials, counter);
  }
  return detail::launch_status();
}

int jbond_sequence(const JBondSequenceArgs& a, cudaStream_t stream) {
  if (a.B < 0) return kBadArgument;
  jbond_sequence_kernel<<<1, kJBondThreads, 0, stream>>>(a);
  return detail::launch_status();
}

}  // namespace cuda
}  // namespace bond
