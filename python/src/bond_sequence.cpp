// CPU launchers of the sequence-level BOND / J-BOND math (contract: bond_kernels/ops/bond_sequence.py):
// check the tensors, allocate the fp32 outputs, call csrc/cpu/bond_sequence.cpp, map its status to an error.
#include "bond_sequence.h"

#include <ATen/Parallel.h>

#include "bindings.h"

namespace py = pybind11;

namespace bond_py {
namespace {

void check_cpu_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ",
                    t.defined() ? seq::describe(t) : std::string("an undefined tensor"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& policy_ref_logp, const at::Tensor& policy_rewards,
    const at::Tensor& ref_rewards, const at::Tensor& ref_mask, const at::Tensor& bon_logp, double n, double beta,
    int64_t mode, double eps, bool correction, int64_t baseline) {
  check_cpu_device(policy_logp, "policy_logp");
  seq::BondCall call;
  seq::prepare_bond(call, policy_logp, policy_ref_logp, policy_rewards, ref_rewards, ref_mask, bon_logp, n, beta,
                    mode, eps, correction, baseline);
  call.args.num_threads = at::get_num_threads();
  seq::raise_status(bond::cpu::bond_sequence(call.args), "bond_sequence", "cpu");
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jbond_sequence_cpu(
    const at::Tensor& policy_logp, const at::Tensor& anchor_logp, const at::Tensor& policy_rewards,
    const at::Tensor& anchor_rewards, const at::Tensor& best_anchor_logp, double beta, double gamma, double penalty,
    bool strict) {
  check_cpu_device(policy_logp, "policy_logp");
  seq::JBondCall call;
  seq::prepare_jbond(call, policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp, beta, gamma,
                     penalty, strict);
  call.args.num_threads = at::get_num_threads();
  seq::raise_status(bond::cpu::jbond_sequence(call.args), "jbond_sequence", "cpu");
  return call.outputs();
}

}  // namespace
}  // namespace bond_py

void register_bond_sequence_cpu(py::module_& cpu) {
  auto nogil = py::call_guard<py::gil_scoped_release>();
  cpu.def("bond_sequence", &bond_py::bond_sequence_cpu, py::arg("policy_logp"), py::arg("policy_ref_logp"),
          py::arg("policy_rewards"), py::arg("ref_rewards"), py::arg("ref_mask"), py::arg("bon_logp"), py::arg("n"),
          py::arg("beta"), py::arg("mode"), py::arg("eps"), py::arg("correction"), py::arg("baseline"), nogil,
          "-> (p_le, log_bon, policy_coef (B, m), bon_coef (B, j), stats (4,)) fp32");
  cpu.def("jbond_sequence", &bond_py::jbond_sequence_cpu, py::arg("policy_logp"), py::arg("anchor_logp"),
          py::arg("policy_rewards"), py::arg("anchor_rewards"), py::arg("best_anchor_logp"), py::arg("beta"),
          py::arg("gamma"), py::arg("penalty"), py::arg("strict"), nogil,
          "-> (jbond_reward, policy_coef, best_coef (B,), stats (4,)) fp32");
}
