// The CPU launchers (python/src/token_logprobs.cpp, token_jeffreys.cpp, reward_quantiles.cpp), declared
// with ATen types only: the launcher files skip the pybind11 and torch/extension.h headers (~15 s of
// compile time each); module.cpp binds them.
#pragma once

#include <cstdint>
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
                              const at::Tensor& lse_q, const at::Tensor& kl_pq, const at::Tensor& grad_div,
                              double beta, double temperature, const at::Tensor& ignore_mask);

std::tuple<at::Tensor, at::Tensor> reward_quantiles(const at::Tensor& rewards, const at::Tensor& ref_rewards,
                                                    const at::Tensor& ref_mask, int64_t mode, double eps);

}  // namespace bond_py
