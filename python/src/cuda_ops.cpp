// CUDA launchers (compiled only when setup.py finds a CUDA torch and nvcc; declared in launchers.h, bound as
// bond_kernels._C.cuda by module.cpp): reward_quantiles, bond_sequence and jbond_sequence.  Contracts:
// bond_kernels/ops/reward_quantiles.py and bond_kernels/ops/bond_sequence.py.  Each checks its tensors
// (naming the argument), sets the device guard, allocates the fp32 outputs on that device and launches on the
// current stream; nothing synchronises.
#include <string>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "bond/cuda.h"
#include "bond_sequence.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {
namespace {

void check_cuda_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.device().is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ",
                    t.defined() ? describe(t) : std::string("an undefined tensor"));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reward_quantiles_cuda(const at::Tensor& rewards_in, const at::Tensor& ref_in,
                                                         const at::Tensor& ref_mask_in, int64_t mode, double eps) {
  check_cuda_device(rewards_in, "rewards");
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const c10::Device device = rewards_in.device();
  at::Tensor rewards = seq::checked_f32(rewards_in, "rewards", device, {-1, -1});
  const int64_t B = rewards.size(0), n = rewards.size(1);
  at::Tensor refs = seq::checked_f32(ref_in, "ref_rewards", device, {B, -1});
  const int64_t k = refs.size(1);
  TORCH_CHECK_VALUE(k < (int64_t{1} << 31), "ref_rewards must hold fewer than 2^31 samples per prompt, got ",
                    describe(refs));
  at::Tensor mask;
  const bool* mask_ptr = nullptr;
  if (!(ref_mask_in.defined() && ref_mask_in.dim() == 1 && ref_mask_in.numel() == 0)) {
    mask = seq::checked(ref_mask_in, "ref_mask", device, 2);
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "ref_mask must be a bool tensor, got ", describe(mask));
    TORCH_CHECK_VALUE(mask.size(0) == B && mask.size(1) == k, "ref_mask must have ref_rewards' shape (", B, ", ", k,
                      ") or be empty (0,), got ", describe(mask));
    mask_ptr = mask.data_ptr<bool>();
  }
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (none), 1 (self) or 2 (eps clamp), got ", mode);
  TORCH_CHECK_VALUE(mode != 2 || (eps > 0.0 && eps <= 1.0), "eps must be in (0, 1] with mode 2, got ", eps);
  const auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor p_le = at::empty({B, n}, f32), p_lt = at::empty({B, n}, f32);
  const int status = bond::cuda::reward_quantiles(rewards.data_ptr<float>(), refs.data_ptr<float>(), mask_ptr,
                                                  p_le.data_ptr<float>(), p_lt.data_ptr<float>(), B, n, k,
                                                  static_cast<int>(mode), eps, c10::cuda::getCurrentCUDAStream());
  raise_status(status, "reward_quantiles", "cuda");
  return {p_le, p_lt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bond_sequence_cuda(
    const at::Tensor& policy_logp, const at::Tensor& policy_ref_logp, const at::Tensor& policy_rewards,
    const at::Tensor& ref_rewards, const at::Tensor& ref_mask, const at::Tensor& bon_logp, double n, double beta,
    int64_t mode, double eps, bool correction, int64_t baseline) {
  check_cuda_device(policy_logp, "policy_logp");
  const c10::cuda::CUDAGuard guard(policy_logp.device());
  seq::BondCall call;
  seq::prepare_bond(call, policy_logp, policy_ref_logp, policy_rewards, ref_rewards, ref_mask, bon_logp, n, beta, mode,
                    eps, correction, baseline);
  const int64_t bytes = bond::cuda::bond_sequence_workspace_bytes(call.args.B, call.args.m, call.args.k);
  // From the caching allocator: no cudaMalloc on the hot path, and safe under CUDA-graph capture.
  at::Tensor workspace = at::empty({bytes}, policy_logp.options().dtype(at::kByte));
  const int status = bond::cuda::bond_sequence(call.args, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  raise_status(status, "bond_sequence", "cuda");
  return call.outputs();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> jbond_sequence_cuda(
    const at::Tensor& policy_logp, const at::Tensor& anchor_logp, const at::Tensor& policy_rewards,
    const at::Tensor& anchor_rewards, const at::Tensor& best_anchor_logp, double beta, double gamma, double penalty,
    bool strict) {
  check_cuda_device(policy_logp, "policy_logp");
  const c10::cuda::CUDAGuard guard(policy_logp.device());
  seq::JBondCall call;
  seq::prepare_jbond(call, policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp, beta, gamma,
                     penalty, strict);
  raise_status(bond::cuda::jbond_sequence(call.args, c10::cuda::getCurrentCUDAStream()), "jbond_sequence", "cuda");
  return call.outputs();
}

}  // namespace bond_py
