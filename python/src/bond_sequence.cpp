// CPU launchers of the sequence-level BOND / J-BOND math (contract: bond_kernels/ops/bond_sequence.py):
// check the tensors, allocate the fp32 outputs, call csrc/cpu/bond_sequence.cpp, map its status to an error.
#include "bond_sequence.h"

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& policy_ref_logp, const at::Tensor& policy_rewards,
    const at::Tensor& ref_rewards, const at::Tensor& ref_mask, const at::Tensor& bon_logp, double n, double beta,
    int64_t mode, double eps, bool correction, int64_t baseline) {
  check_cpu(policy_logp, "policy_logp");
  seq::BondCall call;
  seq::prepare_bond(call, policy_logp, policy_ref_logp, policy_rewards, ref_rewards, ref_mask, bon_logp, n, beta, mode,
                    eps, correction, baseline);
  call.args.num_threads = kernel_threads();
  raise_status(bond::cpu::bond_sequence(call.args), "bond_sequence", "cpu");
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jbond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& anchor_logp, const at::Tensor& policy_rewards,
    const at::Tensor& anchor_rewards, const at::Tensor& best_anchor_logp, double beta, double gamma, double penalty,
    bool strict) {
  check_cpu(policy_logp, "policy_logp");
  seq::JBondCall call;
  seq::prepare_jbond(call, policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp, beta, gamma,
                     penalty, strict);
  call.args.num_threads = kernel_threads();
  raise_status(bond::cpu::jbond_sequence(call.args), "jbond_sequence", "cpu");
  return call.outputs();
}

}  // namespace bond_py
