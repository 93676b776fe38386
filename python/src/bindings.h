// Declarations shared by the files of python/src/ (the torch-facing glue that becomes bond_kernels._C).
//
// module.cpp holds the one PYBIND11_MODULE(_C, m).  It binds the CPU launchers declared below into the
// submodule `_C.cpu` with the names and argument order of the launcher contracts in
// bond_kernels/ops/{token_logprobs,token_jeffreys,reward_quantiles}.py, then calls
//   register_bond_sequence_cpu(cpu)   (defined in bond_sequence.cpp), and, when built with nvcc,
//   register_cuda_ops(cuda)           (defined in cuda_ops.cpp; only under BOND_WITH_CUDA).
// Both take the submodule by reference and add their functions with cpu.def(...) / cuda.def(...).
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

// Defined in python/src/bond_sequence.cpp: adds `bond_sequence` (and helpers) to _C.cpu.
void register_bond_sequence_cpu(pybind11::module_& cpu);

#ifdef BOND_WITH_CUDA
// Defined in python/src/cuda_ops.cpp: adds the CUDA launchers to _C.cuda.
void register_cuda_ops(pybind11::module_& cuda);
#endif

namespace bond_py {

// ---- CPU launchers (python/src/token_logprobs.cpp, token_jeffreys.cpp, reward_quantiles.cpp) ----
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
