// Every launcher module.cpp binds, declared with ATen types only: the launcher files skip the pybind11 and
// torch/extension.h headers (~15 s of compile time each).  The CPU ones are defined in token_logprobs.cpp,
// token_jeffreys.cpp, linear_token_jeffreys.cpp, reward_quantiles.cpp and bond_sequence.cpp; the CUDA ones
// (BOND_WITH_CUDA builds only) in cuda_ops.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace bond_py {

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels,
                                                                  double temperature, double softcap,
                                                                  int64_t ignore_index, bool return_entropy);

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& lse,
                              const at::Tensor& entropy, const at::Tensor& grad_logp, const at::Tensor& grad_entropy,
                              double temperature, double softcap, int64_t ignore_index, bool inplace);

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_bwd(const at::Tensor& logits, const at::Tensor& labels,
                                                          const at::Tensor& grad_logp, double temperature,
                                                          double softcap, int64_t ignore_index, bool inplace);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_jeffreys_fwd(const at::Tensor& policy,
                                                                              const at::Tensor& anchor, double beta,
                                                                              double temperature,
                                                                              const at::Tensor& ignore_mask);

at::Tensor token_jeffreys_bwd(const at::Tensor& policy, const at::Tensor& anchor, const at::Tensor& lse_p,
                              const at::Tensor& lse_q, const at::Tensor& kl_pq, const at::Tensor& grad_div, double beta,
                              double temperature, const at::Tensor& ignore_mask);

// Folds one vocabulary tile of both heads' raw fp32 logits (N, C) into the (7, N) fp32 state, in place.
void linear_jeffreys_tile_fold(at::Tensor& state, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, double cap_s, double cap_t, bool with_cross);

// The student's gradient of one tile (N, C) fp32 from the two raw tiles (into `out` when given).
at::Tensor linear_jeffreys_tile_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& lse_s,
                                     const at::Tensor& lse_t, const at::Tensor& aux, const at::Tensor& coef,
                                     double temperature, double cap_s, double cap_t, double beta, bool gjsd,
                                     const std::optional<at::Tensor>& out);

// Adds one tile's (KL(t||m), KL(s||m)) partial sums of the generalised JSD into the (2, N) fp32 kl, in place.
void linear_jeffreys_tile_gjsd(at::Tensor& kl, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature, double cap_s,
                               double cap_t, double beta);

std::tuple<at::Tensor, at::Tensor> reward_quantiles(const at::Tensor& rewards, const at::Tensor& ref_rewards,
                                                    const at::Tensor& ref_mask, int64_t mode, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& policy_ref_logp, const at::Tensor& policy_rewards,
    const at::Tensor& ref_rewards, const at::Tensor& ref_mask, const at::Tensor& bon_logp, double n, double beta,
    int64_t mode, double eps, bool correction, int64_t baseline);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jbond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& anchor_logp, const at::Tensor& policy_rewards,
    const at::Tensor& anchor_rewards, const at::Tensor& best_anchor_logp, double beta, double gamma, double penalty,
    bool strict);

#ifdef BOND_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> reward_quantiles_cuda(const at::Tensor& rewards, const at::Tensor& ref_rewards,
                                                         const at::Tensor& ref_mask, int64_t mode, double eps);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bond_sequence_cuda(
    const at::Tensor& policy_logp, const at::Tensor& policy_ref_logp, const at::Tensor& policy_rewards,
    const at::Tensor& ref_rewards, const at::Tensor& ref_mask, const at::Tensor& bon_logp, double n, double beta,
    int64_t mode, double eps, bool correction, int64_t baseline);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jbond_sequence_cuda(
    const at::Tensor& policy_logp, const at::Tensor& anchor_logp, const at::Tensor& policy_rewards,
    const at::Tensor& anchor_rewards, const at::Tensor& best_anchor_logp, double beta, double gamma, double penalty,
    bool strict);
#endif

}  // namespace bond_py
