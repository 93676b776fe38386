// Public interface of the torch-free CPU kernels (csrc/cpu/).  Raw pointers + sizes + strides in, an int
// Status out.  Every kernel is OpenMP-parallel over rows, computes in fp32 whatever the input dtype, and is
// deterministic: a row's result depends only on that row (no cross-thread reduction), so the thread count
// never changes a bit of the output.
//
// Parameter structs group pointers, then sizes and strides, then scalars.  `num_threads <= 0` means the
// OpenMP default; the torch binding passes at::get_num_threads() so torch.set_num_threads() applies.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bond/common.h"

namespace bond {
namespace cpu {

// ---------------------------------------------------------------------------------------------------------
// Instruction-set dispatch.  The row kernels are compiled three times (baseline x86-64, AVX2+FMA, AVX-512)
// and picked at run time from cpuid, so the library runs on any x86-64 and never needs -march=native.
// BOND_KERNELS_CPU_ISA=generic|avx2|avx512 caps the choice (read once); set_isa() overrides it.
// ---------------------------------------------------------------------------------------------------------
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa();                 // the widest ISA this CPU (and this build) supports
Isa active_isa();               // what the kernels use now
int set_isa(Isa isa);           // kUnsupported if the CPU lacks it; kOk otherwise
const char* isa_name(Isa isa);  // "generic", "avx2", "avx512"
int isa_from_name(const char* name, Isa* out);  // kBadArgument for an unknown name

// ---------------------------------------------------------------------------------------------------------
// Memory.  A large output that is about to be written for the first time (the (N, V) gradient) costs one
// page fault per 4 KiB page on Linux, and on a small VM those faults, not the arithmetic, dominate the
// backward.  advise_huge_pages() asks the kernel for transparent huge pages (madvise MADV_HUGEPAGE) on the
// 2 MiB-aligned interior of [ptr, ptr + nbytes): 512x fewer faults.  Advice only: it changes no byte, is
// skipped below 8 MiB, off Linux, and with BOND_KERNELS_HUGE_PAGES=0 (read once), and its errors are ignored.
// Returns the number of bytes advised (0 when skipped).
// ---------------------------------------------------------------------------------------------------------
std::size_t advise_huge_pages(void* ptr, std::size_t nbytes);

// ---------------------------------------------------------------------------------------------------------
// token_logprobs:  z = c * tanh(x / c) / T (softcap c > 0, or z = x / T with softcap = 0),
//   logp[r] = z[r, y_r] - lse[r],  lse[r] = log sum_v exp(z[r, v]),  entropy[r] = -sum_v p log p.
// Rows whose label equals ignore_index give 0 (and a zero gradient) without reading the row.
//
// Split log-sum-exp.  With `shift` given, the forward writes the row max x_m of the logits to shift[r] and
// log sum_v exp(z_v - z(x_m)) to lse[r] (z(x_m) = c * tanh(x_m / c) / T is the row max of z), so the whole
// lse is z(shift) + lse; the backward given both recomputes log p_v = z_v - z(x_m) - lse as a difference
// first (x_v - x_m, or tanh(x_v / c) - tanh(x_m / c)), whose error is a rounding of log p_v.  The full fp32 lse has one rounding of |z| (2.4e-4 at |z| = 4000), which
// log p_v = z_v - lse inherits: the backward without `shift` (callers that combine partial rows into a
// global lse) has that error.
// NaN or +inf entries (without a softcap) make the row's outputs NaN and return kOk: the caller names the
// cause.  A row of all -inf without a softcap has no distribution: kAllNegInfRow (with a softcap, -inf maps
// to -c and the row is uniform).
// ---------------------------------------------------------------------------------------------------------
struct TokenLogprobsFwdParams {
  const void* logits = nullptr;  // (N, V) or (B, T, V) of `dtype`, vocabulary stride 1, rows as `rows`
  const int64_t* labels = nullptr;  // (N,) contiguous
  float* logp = nullptr;            // (N,) out
  float* lse = nullptr;             // (N,) out, log-sum-exp of z (saved for the backward), or with shift
                                    // the log-sum-exp of z - shift / T
  float* shift = nullptr;           // (N,) out or nullptr: the row max of the logits (split lse)
  float* entropy = nullptr;         // (N,) out, or nullptr to skip the entropy
  DType dtype = DType::kFloat32;
  Rows rows;
  index_t vocab = 0;
  float temperature = 1.0f;
  float softcap = 0.0f;  // 0 disables the softcap
  int64_t ignore_index = -100;
  int num_threads = 0;
};
// kBadLabel: some label outside [0, V) (its outputs are NaN); kAllNegInfRow: some non-ignored row is all
// -inf without a softcap (NaN outputs).  Other rows are still computed.
int token_logprobs_fwd(const TokenLogprobsFwdParams& p);

// grad = d/dlogits of sum_r (grad_logp[r] * logp[r] + grad_entropy[r] * entropy[r]), from the forward's lse
// (and entropy):   dz_v = g (1[v = y] - p_v) - g_H p_v (log p_v + H);   dx_v = dz_v / T * (1 - tanh^2(x_v/c)).
struct TokenLogprobsBwdParams {
  const void* logits = nullptr;
  const int64_t* labels = nullptr;
  const float* lse = nullptr;           // (N,) from the forward (split with shift, or the full lse)
  const float* shift = nullptr;         // (N,) from the forward, or nullptr when lse is the full lse
  const float* entropy = nullptr;       // (N,) from the forward; needed only with grad_entropy
  const float* grad_logp = nullptr;     // (N,)
  const float* grad_entropy = nullptr;  // (N,) or nullptr
  void* grad = nullptr;                 // same dtype as logits, rows as grad_rows; may alias logits (in place)
  DType dtype = DType::kFloat32;
  Rows rows;
  Rows grad_rows;
  index_t vocab = 0;
  float temperature = 1.0f;
  float softcap = 0.0f;
  int64_t ignore_index = -100;
  int num_threads = 0;
};
int token_logprobs_bwd(const TokenLogprobsBwdParams& p);

// The gradient computed in the forward sweep for an upstream grad_logp known in advance: one read of the
// logits (each row is swept from cache for its max, sum and gradient) and one write of the gradient.
struct TokenLogprobsFwdBwdParams {
  const void* logits = nullptr;
  const int64_t* labels = nullptr;
  const float* grad_logp = nullptr;  // (N,)
  float* logp = nullptr;             // (N,) out
  float* lse = nullptr;              // (N,) out, or nullptr
  void* grad = nullptr;              // may alias logits (in place)
  DType dtype = DType::kFloat32;
  Rows rows;
  Rows grad_rows;
  index_t vocab = 0;
  float temperature = 1.0f;
  float softcap = 0.0f;
  int64_t ignore_index = -100;
  int num_threads = 0;
};
int token_logprobs_fwd_bwd(const TokenLogprobsFwdBwdParams& p);

// ---------------------------------------------------------------------------------------------------------
// token_jeffreys: p = softmax(policy / T), q = softmax(anchor / T) per row;
//   div = beta KL(p||q) + (1 - beta) KL(q||p),  with 0 * log 0 = 0 for masked (-inf) entries.
// ---------------------------------------------------------------------------------------------------------
struct TokenJeffreysFwdParams {
  const void* policy = nullptr;    // (N, V), row stride policy_stride, vocabulary stride 1
  const void* anchor = nullptr;    // (N, V), row stride anchor_stride, same dtype as policy
  const bool* ignore_mask = nullptr;  // (N,) or nullptr; true rows give 0
  float* div = nullptr;            // (N,) out
  float* lse_p = nullptr;          // (N,) out, split: log sum_v exp((x_v - shift_p) / T) (as token_logprobs)
  float* lse_q = nullptr;          // (N,) out, split likewise
  float* shift_p = nullptr;        // (N,) out, the row max of policy
  float* shift_q = nullptr;        // (N,) out, the row max of anchor
  float* kl_pq = nullptr;          // (N,) out
  DType dtype = DType::kFloat32;
  index_t n_rows = 0;
  index_t vocab = 0;
  index_t policy_stride = 0;
  index_t anchor_stride = 0;
  float beta = 0.5f;
  float temperature = 1.0f;
  int num_threads = 0;
};
int token_jeffreys_fwd(const TokenJeffreysFwdParams& p);

// d/dpolicy_v = g [beta p_v (log p_v - log q_v - KL(p||q)) + (1 - beta)(p_v - q_v)] / T
struct TokenJeffreysBwdParams {
  const void* policy = nullptr;
  const void* anchor = nullptr;
  const bool* ignore_mask = nullptr;
  const float* lse_p = nullptr;     // split log-sum-exps and row maxima, from the forward
  const float* lse_q = nullptr;
  const float* shift_p = nullptr;
  const float* shift_q = nullptr;
  const float* kl_pq = nullptr;
  const float* grad_div = nullptr;  // (N,)
  void* grad = nullptr;             // (N, V) of dtype, row stride grad_stride
  DType dtype = DType::kFloat32;
  index_t n_rows = 0;
  index_t vocab = 0;
  index_t policy_stride = 0;
  index_t anchor_stride = 0;
  index_t grad_stride = 0;
  float beta = 0.5f;
  float temperature = 1.0f;
  int num_threads = 0;
};
int token_jeffreys_bwd(const TokenJeffreysBwdParams& p);

// ---------------------------------------------------------------------------------------------------------
// reward_quantiles (BOND-MATH.md section 2): per prompt b and candidate i,
//   c_le = sum_j mask_j 1[ref_j <= r_i],  c_lt = sum_j mask_j 1[ref_j < r_i],  k = sum_j mask_j
//   mode 0 "none": p_le = c_le / k, p_lt = c_lt / k;  mode 1 "self": (c_le + 1)/(k + 1), c_lt/(k + 1);
//   mode 2 "eps":  p_le = max(c_le / k, eps), p_lt = c_lt / k.
// ---------------------------------------------------------------------------------------------------------
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
  int num_threads = 0;
};
int reward_quantiles(const RewardQuantilesParams& p);

}  // namespace cpu
}  // namespace bond
