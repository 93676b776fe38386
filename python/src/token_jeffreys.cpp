// CPU launchers for token_jeffreys (contract: bond_kernels/ops/token_jeffreys.py).
#include <cmath>

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {
namespace {

// (N, V) with unit vocabulary stride; any row stride.
void check_rows_2d(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  float_dtype(t, name);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(1) >= 1, name, " must be (N, V) with V >= 1, got ", describe(t));
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) == 1, name, " must have last stride 1, got ", describe(t));
}

void check_scalars(double beta, double temperature) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "beta must be a number in [0, 1], got ", beta);
  check_fp32_scalar(temperature, "temperature");
}

// The kernels read both rows in one dtype; a mixed pair (rare) is computed in fp32.
void common_dtype(at::Tensor& policy, at::Tensor& anchor) {
  if (policy.scalar_type() != anchor.scalar_type()) {
    policy = policy.to(at::kFloat);
    anchor = anchor.to(at::kFloat);
  }
}

int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

// The checks and fields the forward and the backward share (bond::cpu::JeffreysRowParams), in the order the
// errors are raised.  policy and anchor come back in one dtype; the caller keeps them alive for the kernel.
void fill_jeffreys_rows(bond::cpu::JeffreysRowParams& p, at::Tensor& policy, at::Tensor& anchor, double beta,
                        double temperature) {
  check_rows_2d(policy, "policy");
  check_rows_2d(anchor, "anchor");
  TORCH_CHECK_VALUE(anchor.sizes() == policy.sizes(), "anchor must have policy's shape ", policy.sizes(), ", got ",
                    describe(anchor));
  check_scalars(beta, temperature);
  common_dtype(policy, anchor);
  p.policy = policy.data_ptr();
  p.anchor = anchor.data_ptr();
  p.dtype = float_dtype(policy, "policy");
  p.n_rows = policy.size(0);
  p.vocab = policy.size(1);
  p.policy_stride = row_stride(policy);
  p.anchor_stride = row_stride(anchor);
  p.beta = static_cast<float>(beta);
  p.temperature = static_cast<float>(temperature);
  p.num_threads = kernel_threads();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_jeffreys_fwd(const at::Tensor& policy_in,
                                                                              const at::Tensor& anchor_in, double beta,
                                                                              double temperature,
                                                                              const at::Tensor& ignore_mask_in) {
  bond::cpu::TokenJeffreysFwdParams p;
  at::Tensor policy = policy_in, anchor = anchor_in, mask = ignore_mask_in;
  fill_jeffreys_rows(p, policy, anchor, beta, temperature);
  const int64_t n = p.n_rows;
  auto f32 = policy.options().dtype(at::kFloat);
  // lse_p, lse_q in the split form (2, N) = [row max, log-sum-exp relative to it] (bond/token_jeffreys.h)
  at::Tensor div = policy.new_empty({n}, f32), lse_p = policy.new_empty({2, n}, f32),
             lse_q = policy.new_empty({2, n}, f32), kl = policy.new_empty({n}, f32);
  p.ignore_mask = optional_bool_rows(mask, "ignore_mask", n);
  p.div = div.data_ptr<float>();
  p.shift_p = lse_p.data_ptr<float>();
  p.lse_p = p.shift_p + n;
  p.shift_q = lse_q.data_ptr<float>();
  p.lse_q = p.shift_q + n;
  p.kl_pq = kl.data_ptr<float>();
  raise_status(bond::cpu::token_jeffreys_fwd(p), "token_jeffreys");
  return {div, lse_p, lse_q, kl};
}

at::Tensor token_jeffreys_bwd(const at::Tensor& policy_in, const at::Tensor& anchor_in, const at::Tensor& lse_p_in,
                              const at::Tensor& lse_q_in, const at::Tensor& kl_pq_in, const at::Tensor& grad_div_in,
                              double beta, double temperature, const at::Tensor& ignore_mask_in) {
  bond::cpu::TokenJeffreysBwdParams p;
  at::Tensor policy = policy_in, anchor = anchor_in, mask = ignore_mask_in;
  fill_jeffreys_rows(p, policy, anchor, beta, temperature);
  const int64_t n = p.n_rows;
  const RowLse lse_p = row_lse(lse_p_in, "lse_p", n), lse_q = row_lse(lse_q_in, "lse_q", n);
  TORCH_CHECK_VALUE(lse_p.shift.defined() == lse_q.shift.defined(), "lse_p and lse_q must both be split (2, ", n,
                    ") or both full (", n, ",)");
  const at::Tensor kl = f32_rows(kl_pq_in, "kl_pq", n), grad_div = f32_rows(grad_div_in, "grad_div", n);
  at::Tensor grad = new_written_like(policy);  // contiguous (N, V)
  p.ignore_mask = optional_bool_rows(mask, "ignore_mask", n);
  p.lse_p = lse_p.lse_ptr();
  p.lse_q = lse_q.lse_ptr();
  p.shift_p = lse_p.shift_ptr();
  p.shift_q = lse_q.shift_ptr();
  p.kl_pq = kl.data_ptr<float>();
  p.grad_div = grad_div.data_ptr<float>();
  p.grad = grad.data_ptr();
  p.grad_stride = p.vocab;
  raise_status(bond::cpu::token_jeffreys_bwd(p), "token_jeffreys backward");
  return policy_in.scalar_type() == grad.scalar_type() ? grad : grad.to(policy_in.scalar_type());
}

}  // namespace bond_py
