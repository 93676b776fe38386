// The one PYBIND11_MODULE of the package and the only file that binds: bond_kernels._C with submodules `cpu`
// (always) and `cuda` (when built with nvcc, -DBOND_WITH_CUDA).  bond_kernels/_ext.py reads
// hasattr(_C, "cpu") / hasattr(_C, "cuda") as availability.  Names, argument names and order follow the
// launcher contracts in bond_kernels/ops/*.py; the launchers themselves are declared in launchers.h.
//
// pybind11 + the at::Tensor <-> torch.Tensor casters (lighter than torch/extension.h: 6 s vs 25 s to compile).
#include <torch/csrc/utils/pybind.h>

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace py = pybind11;

namespace {

std::string active_isa_name() { return bond::cpu::isa_name(bond::cpu::active_isa()); }

// Test/benchmark hook: run the kernels with a narrower instruction set ("generic", "avx2", "avx512").
void set_isa_by_name(const std::string& name) {
  bond::cpu::Isa isa;
  TORCH_CHECK_VALUE(bond::cpu::isa_from_name(name.c_str(), &isa) == bond::kOk,
                    "isa must be 'generic', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK_VALUE(bond::cpu::set_isa(isa) == bond::kOk, "isa '", name,
                    "' is not supported by this CPU (best: ", bond::cpu::isa_name(bond::cpu::best_isa()), ")");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(bond::cpu::best_isa()); ++i)
    out.emplace_back(bond::cpu::isa_name(static_cast<bond::cpu::Isa>(i)));
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "bond_kernels compiled kernels: _C.cpu (C++/OpenMP) and, when built with nvcc, _C.cuda";

  py::module_ cpu = m.def_submodule("cpu", "C++/OpenMP CPU kernels (launcher contracts in bond_kernels/ops/*.py)");
  // Kernels release the GIL: they touch no Python objects, and other Python threads may run meanwhile.
  auto nogil = py::call_guard<py::gil_scoped_release>();
  cpu.def("token_logprobs_fwd", &bond_py::token_logprobs_fwd, py::arg("logits"), py::arg("labels"),
          py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"), py::arg("return_entropy"), nogil,
          "(logits (N, V) | (B, T, V), labels (N,) int64, ...) -> (logp, lse, entropy) fp32 (N,) each");
  cpu.def("token_logprobs_bwd", &bond_py::token_logprobs_bwd, py::arg("logits"), py::arg("labels"), py::arg("lse"),
          py::arg("entropy"), py::arg("grad_logp"), py::arg("grad_entropy"), py::arg("temperature"), py::arg("softcap"),
          py::arg("ignore_index"), py::arg("inplace"), nogil,
          "-> d/dlogits in the logits' dtype and shape (the logits tensor itself when inplace)");
  cpu.def("token_logprobs_fwd_bwd", &bond_py::token_logprobs_fwd_bwd, py::arg("logits"), py::arg("labels"),
          py::arg("grad_logp"), py::arg("temperature"), py::arg("softcap"), py::arg("ignore_index"), py::arg("inplace"),
          nogil, "-> (logp fp32 (N,), grad in the logits' dtype)");
  cpu.def("token_jeffreys_fwd", &bond_py::token_jeffreys_fwd, py::arg("policy"), py::arg("anchor"), py::arg("beta"),
          py::arg("temperature"), py::arg("ignore_mask"), nogil, "-> (div, lse_p, lse_q, kl_pq) fp32 (N,) each");
  cpu.def("token_jeffreys_bwd", &bond_py::token_jeffreys_bwd, py::arg("policy"), py::arg("anchor"), py::arg("lse_p"),
          py::arg("lse_q"), py::arg("kl_pq"), py::arg("grad_div"), py::arg("beta"), py::arg("temperature"),
          py::arg("ignore_mask"), nogil, "-> d/dpolicy in the policy's dtype");
  cpu.def("linear_jeffreys_tile_fold", &bond_py::linear_jeffreys_tile_fold, py::arg("state"), py::arg("student"),
          py::arg("teacher"), py::arg("temperature"), py::arg("cap_s"), py::arg("cap_t"), py::arg("with_cross"), nogil,
          "(state (7, N) fp32, student, teacher (N, C) fp32 raw tile logits, ...) -> None; state updated in place");
  cpu.def("linear_jeffreys_tile_grad", &bond_py::linear_jeffreys_tile_grad, py::arg("student"), py::arg("teacher"),
          py::arg("lse_s"), py::arg("lse_t"), py::arg("aux"), py::arg("coef"), py::arg("temperature"), py::arg("cap_s"),
          py::arg("cap_t"), py::arg("beta"), py::arg("gjsd"), py::arg("out") = py::none(), nogil,
          "(student, teacher (N, C) fp32 raw tile logits, lse_s, lse_t, aux, coef (N,) fp32, ...) -> dx (N, C) fp32");
  cpu.def("linear_jeffreys_tile_gjsd", &bond_py::linear_jeffreys_tile_gjsd, py::arg("kl"), py::arg("student"),
          py::arg("teacher"), py::arg("lse_s"), py::arg("lse_t"), py::arg("temperature"), py::arg("cap_s"),
          py::arg("cap_t"), py::arg("beta"), nogil,
          "(kl (2, N) fp32, student, teacher (N, C) fp32 raw tile logits, lse_s, lse_t (N,), ...) -> None; kl += sums");
  cpu.def("reward_quantiles", &bond_py::reward_quantiles, py::arg("rewards"), py::arg("ref_rewards"),
          py::arg("ref_mask"), py::arg("mode"), py::arg("eps"), nogil, "-> (p_le, p_lt) fp32 (B, n)");
  cpu.def("_isa", &active_isa_name, "instruction set the CPU kernels use now");
  cpu.def("_set_isa", &set_isa_by_name, py::arg("isa"), "cap the instruction set (tests, benchmarks)");
  cpu.def("_supported_isas", &supported_isas, "instruction sets this CPU supports, narrowest first");
  cpu.def(
      "_advise_huge_pages",
      [](const at::Tensor& t) {
        bond_py::check_cpu(t, "t");
        return static_cast<int64_t>(bond::cpu::advise_huge_pages(t.data_ptr(), static_cast<std::size_t>(t.nbytes())));
      },
      py::arg("t"), "bytes of t advised to use transparent huge pages (0 when skipped; tests)");
  cpu.def("bond_sequence", &bond_py::bond_sequence_cpu, py::arg("policy_logp"), py::arg("policy_ref_logp"),
          py::arg("policy_rewards"), py::arg("ref_rewards"), py::arg("ref_mask"), py::arg("bon_logp"), py::arg("n"),
          py::arg("beta"), py::arg("mode"), py::arg("eps"), py::arg("correction"), py::arg("baseline"), nogil,
          "-> (p_le, log_bon, policy_coef (B, m), bon_coef (B, j), stats (4,)) fp32");
  cpu.def("jbond_sequence", &bond_py::jbond_sequence_cpu, py::arg("policy_logp"), py::arg("anchor_logp"),
          py::arg("policy_rewards"), py::arg("anchor_rewards"), py::arg("best_anchor_logp"), py::arg("beta"),
          py::arg("gamma"), py::arg("penalty"), py::arg("strict"), nogil,
          "-> (jbond_reward, policy_coef, best_coef (B,), stats (4,)) fp32");

#ifdef BOND_WITH_CUDA
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels");
  cuda.def("reward_quantiles", &bond_py::reward_quantiles_cuda, py::arg("rewards"), py::arg("ref_rewards"),
           py::arg("ref_mask"), py::arg("mode"), py::arg("eps"), nogil, "-> (p_le, p_lt) fp32 (B, n)");
  cuda.def("bond_sequence", &bond_py::bond_sequence_cuda, py::arg("policy_logp"), py::arg("policy_ref_logp"),
           py::arg("policy_rewards"), py::arg("ref_rewards"), py::arg("ref_mask"), py::arg("bon_logp"), py::arg("n"),
           py::arg("beta"), py::arg("mode"), py::arg("eps"), py::arg("correction"), py::arg("baseline"), nogil,
           "-> (p_le, log_bon, policy_coef (B, m), bon_coef (B, j), stats (4,)) fp32");
  cuda.def("jbond_sequence", &bond_py::jbond_sequence_cuda, py::arg("policy_logp"), py::arg("anchor_logp"),
           py::arg("policy_rewards"), py::arg("anchor_rewards"), py::arg("best_anchor_logp"), py::arg("beta"),
           py::arg("gamma"), py::arg("penalty"), py::arg("strict"), nogil,
           "-> (jbond_reward, policy_coef, best_coef (B,), stats (4,)) fp32");
#endif
}
