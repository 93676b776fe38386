// CPU launcher for reward_quantiles (contract: bond_kernels/ops/reward_quantiles.py).
#include <cmath>

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {
namespace {

void check_matrix(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  float_dtype(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D (B, n) / (B, k), got ", describe(t));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> reward_quantiles(const at::Tensor& rewards_in, const at::Tensor& ref_in,
                                                    const at::Tensor& ref_mask_in, int64_t mode, double eps) {
  check_matrix(rewards_in, "rewards");
  check_matrix(ref_in, "ref_rewards");
  TORCH_CHECK_VALUE(ref_in.size(0) == rewards_in.size(0),
                    "ref_rewards must have one row per prompt like rewards (B = ", rewards_in.size(0), "), got ",
                    describe(ref_in));
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (none), 1 (self) or 2 (eps), got ", mode);
  TORCH_CHECK_VALUE(mode != 2 || (eps > 0.0 && eps <= 1.0), "eps must be in (0, 1] for mode 2, got ", eps);
  at::Tensor rewards = rewards_in, ref = ref_in;
  if (rewards.scalar_type() != ref.scalar_type()) {  // one dtype inside the kernel; fp32 holds all three exactly
    rewards = rewards.to(at::kFloat);
    ref = ref.to(at::kFloat);
  }
  rewards = rewards.contiguous();
  ref = ref.contiguous();
  const int64_t b = rewards.size(0), n = rewards.size(1), k = ref.size(1);
  at::Tensor mask;
  const bool has_mask = ref_mask_in.numel() > 0 || ref_mask_in.dim() != 1;
  if (has_mask) {
    check_cpu(ref_mask_in, "ref_mask");
    TORCH_CHECK_TYPE(ref_mask_in.scalar_type() == at::kBool, "ref_mask must be a bool tensor, got ",
                     describe(ref_mask_in));
    TORCH_CHECK_VALUE(ref_mask_in.sizes() == ref.sizes(), "ref_mask must have ref_rewards' shape ", ref.sizes(),
                      ", got ", describe(ref_mask_in));
    mask = ref_mask_in.contiguous();
  }
  auto f32 = rewards.options().dtype(at::kFloat);
  at::Tensor p_le = rewards.new_empty({b, n}, f32), p_lt = rewards.new_empty({b, n}, f32);

  bond::cpu::RewardQuantilesParams p;
  p.rewards = rewards.data_ptr();
  p.ref_rewards = ref.data_ptr();
  p.ref_mask = has_mask ? mask.data_ptr<bool>() : nullptr;
  p.p_le = p_le.data_ptr<float>();
  p.p_lt = p_lt.data_ptr<float>();
  p.dtype = float_dtype(rewards, "rewards");
  p.batch = b;
  p.n = n;
  p.k = k;
  p.rewards_stride = n;
  p.ref_stride = k;
  p.mask_stride = k;
  p.mode = static_cast<int>(mode);
  p.eps = static_cast<float>(eps);
  p.num_threads = kernel_threads();
  raise_status(bond::cpu::reward_quantiles(p), "reward_quantiles");
  return {p_le, p_lt};
}

}  // namespace bond_py
