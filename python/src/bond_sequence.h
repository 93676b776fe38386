// Argument checks and output allocation for the sequence-level BOND launchers, shared by the CPU binding
// (bond_sequence.cpp) and the CUDA binding (cuda_ops.cpp).  Contract: bond_kernels/ops/bond_sequence.py.
//
// Every check names the argument, what it got and what it expects (TORCH_CHECK_VALUE -> ValueError,
// TORCH_CHECK_TYPE -> TypeError).  Inputs that are not contiguous are copied (they are O(B) sized).
#pragma once

#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "bond/bond_sequence.h"
#include "common.h"  // describe, raise_status

namespace bond_py {
namespace seq {

// Same device as `device`, `dims` dimensions; returns a contiguous tensor (a copy only when needed).
inline at::Tensor checked(const at::Tensor& t, const char* name, const c10::Device& device, int64_t dims) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " like the other inputs, got ", describe(t));
  TORCH_CHECK_VALUE(t.dim() == dims, name, " must have ", dims, " dimension(s), got ", describe(t));
  return t.contiguous();
}

inline at::Tensor checked_f32(const at::Tensor& t, const char* name, const c10::Device& device,
                              std::vector<int64_t> shape) {
  at::Tensor c = checked(t, name, device, static_cast<int64_t>(shape.size()));
  TORCH_CHECK_TYPE(c.scalar_type() == at::kFloat, name, " must be float32, got ", describe(c));
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] < 0) continue;  // free size
    TORCH_CHECK_VALUE(c.size(static_cast<int64_t>(d)) == shape[d], name, " must have size ", shape[d], " in dimension ",
                      d, ", got ", describe(c));
  }
  return c;
}

inline void check_options(double n, double beta, int64_t mode, double eps) {
  TORCH_CHECK_VALUE(std::isfinite(n) && n >= 1.0, "n must be a number >= 1 (Best-of-N), got ", n);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be a number in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "mode must be 0 (none), 1 (self) or 2 (eps clamp), got ", mode);
  TORCH_CHECK_VALUE(mode != 2 || (eps > 0.0 && eps <= 1.0), "eps must be in (0, 1] with mode 2, got ", eps);
}

// Tensors kept alive for the kernel (contiguous copies) and the outputs.
struct BondCall {
  bond::BondSequenceArgs args{};
  std::vector<at::Tensor> keep;
  at::Tensor p_le, log_bon, policy_coef, bon_coef, stats;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {p_le, log_bon, policy_coef, bon_coef, stats};
  }
};

inline void prepare_bond(BondCall& call, const at::Tensor& policy_logp_in, const at::Tensor& policy_ref_logp_in,
                         const at::Tensor& policy_rewards_in, const at::Tensor& ref_rewards_in,
                         const at::Tensor& ref_mask_in, const at::Tensor& bon_logp_in, double n, double beta,
                         int64_t mode, double eps, bool correction, int64_t baseline) {
  TORCH_CHECK_VALUE(policy_logp_in.defined(), "policy_logp must be a tensor, got an undefined tensor");
  const c10::Device device = policy_logp_in.device();
  at::Tensor logp = checked_f32(policy_logp_in, "policy_logp", device, {-1, -1});
  const int64_t B = logp.size(0), m = logp.size(1);
  at::Tensor ref_logp = checked_f32(policy_ref_logp_in, "policy_ref_logp", device, {B, m});
  at::Tensor rewards = checked(policy_rewards_in, "policy_rewards", device, 2);
  TORCH_CHECK_TYPE(rewards.scalar_type() == at::kFloat || rewards.scalar_type() == at::kDouble,
                   "policy_rewards must be float32 or float64, got ", describe(rewards));
  TORCH_CHECK_VALUE(rewards.size(0) == B && rewards.size(1) == m, "policy_rewards must have shape (", B, ", ", m,
                    ") like policy_logp, got ", describe(rewards));
  at::Tensor refs = checked(ref_rewards_in, "ref_rewards", device, 2);
  TORCH_CHECK_TYPE(refs.scalar_type() == rewards.scalar_type(), "ref_rewards must have policy_rewards' dtype ",
                   rewards.scalar_type(), ", got ", describe(refs));
  TORCH_CHECK_VALUE(refs.size(0) == B, "ref_rewards must have B = ", B, " rows, got ", describe(refs));
  const int64_t k = refs.size(1);
  TORCH_CHECK_VALUE(k < (int64_t{1} << 31), "ref_rewards must hold fewer than 2^31 samples per prompt, got ",
                    describe(refs));
  const bool* mask_ptr = nullptr;
  at::Tensor mask;
  if (!(ref_mask_in.defined() && ref_mask_in.dim() == 1 && ref_mask_in.numel() == 0)) {
    mask = checked(ref_mask_in, "ref_mask", device, 2);
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "ref_mask must be a bool tensor, got ", describe(mask));
    TORCH_CHECK_VALUE(mask.size(0) == B && mask.size(1) == k, "ref_mask must have ref_rewards' shape (", B, ", ", k,
                      ") or be empty (0,), got ", describe(mask));
    mask_ptr = mask.data_ptr<bool>();
  }
  at::Tensor bon = checked_f32(bon_logp_in, "bon_logp", device, {B, -1});
  const int64_t j = bon.size(1);
  check_options(n, beta, mode, eps);
  TORCH_CHECK_VALUE(baseline >= 0 && baseline <= 2, "baseline must be 0 (loo), 1 (mean) or 2 (none), got ", baseline);

  const auto f32 = logp.options().dtype(at::kFloat);
  call.p_le = at::empty({B, m}, f32);
  call.log_bon = at::empty({B, m}, f32);
  call.policy_coef = at::empty({B, m}, f32);
  call.bon_coef = at::empty({B, j}, f32);
  call.stats = at::empty({bond::kBondStats}, f32);
  call.keep = {logp, ref_logp, rewards, refs, mask, bon};

  bond::BondSequenceArgs& a = call.args;
  a.policy_logp = logp.data_ptr<float>();
  a.policy_ref_logp = ref_logp.data_ptr<float>();
  a.policy_rewards = rewards.data_ptr();
  a.ref_rewards = refs.data_ptr();
  a.ref_mask = mask_ptr;
  a.bon_logp = bon.data_ptr<float>();
  a.p_le = call.p_le.data_ptr<float>();
  a.log_bon = call.log_bon.data_ptr<float>();
  a.policy_coef = call.policy_coef.data_ptr<float>();
  a.bon_coef = call.bon_coef.data_ptr<float>();
  a.stats = call.stats.data_ptr<float>();
  a.B = B;
  a.m = m;
  a.k = k;
  a.j = j;
  a.rewards_fp64 = rewards.scalar_type() == at::kDouble;
  a.n = n;
  a.beta = beta;
  a.smoothing = static_cast<int>(mode);
  a.eps = eps;
  a.correction = correction;
  a.baseline = static_cast<int>(baseline);
}

struct JBondCall {
  bond::JBondSequenceArgs args{};
  std::vector<at::Tensor> keep;
  at::Tensor jbond_reward, policy_coef, best_coef, stats;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {jbond_reward, policy_coef, best_coef, stats};
  }
};

inline void prepare_jbond(JBondCall& call, const at::Tensor& policy_logp_in, const at::Tensor& anchor_logp_in,
                          const at::Tensor& policy_rewards_in, const at::Tensor& anchor_rewards_in,
                          const at::Tensor& best_anchor_logp_in, double beta, double gamma, double penalty,
                          bool strict) {
  TORCH_CHECK_VALUE(policy_logp_in.defined(), "policy_logp must be a tensor, got an undefined tensor");
  const c10::Device device = policy_logp_in.device();
  at::Tensor logp = checked_f32(policy_logp_in, "policy_logp", device, {-1});
  const int64_t B = logp.size(0);
  at::Tensor anchor = checked_f32(anchor_logp_in, "anchor_logp", device, {B});
  at::Tensor rewards = checked_f32(policy_rewards_in, "policy_rewards", device, {B});
  at::Tensor anchor_rewards = checked_f32(anchor_rewards_in, "anchor_rewards", device, {B, 2});
  at::Tensor best = checked_f32(best_anchor_logp_in, "best_anchor_logp", device, {B});
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be a number in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0, "gamma must be a finite number >= 0, got ", gamma);
  TORCH_CHECK_VALUE(std::isfinite(penalty) && penalty >= 0.0, "penalty must be a finite number >= 0, got ", penalty);

  const auto f32 = logp.options().dtype(at::kFloat);
  call.jbond_reward = at::empty({B}, f32);
  call.policy_coef = at::empty({B}, f32);
  call.best_coef = at::empty({B}, f32);
  call.stats = at::empty({bond::kBondStats}, f32);
  call.keep = {logp, anchor, rewards, anchor_rewards, best};

  bond::JBondSequenceArgs& a = call.args;
  a.policy_logp = logp.data_ptr<float>();
  a.anchor_logp = anchor.data_ptr<float>();
  a.policy_rewards = rewards.data_ptr<float>();
  a.anchor_rewards = anchor_rewards.data_ptr<float>();
  a.best_anchor_logp = best.data_ptr<float>();
  a.jbond_reward = call.jbond_reward.data_ptr<float>();
  a.policy_coef = call.policy_coef.data_ptr<float>();
  a.best_coef = call.best_coef.data_ptr<float>();
  a.stats = call.stats.data_ptr<float>();
  a.B = B;
  a.beta = beta;
  a.gamma = gamma;
  a.penalty = penalty;
  a.strict = strict;
}

}  // namespace seq
}  // namespace bond_py
