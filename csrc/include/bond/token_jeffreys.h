// Parameter structs of token_jeffreys (kernels: csrc/cpu/token_jeffreys.cpp, declared in bond/cpu.h;
// contract of the launchers: bond_kernels/ops/token_jeffreys.py).
//
// token_jeffreys: p = softmax(policy / T), q = softmax(anchor / T) per row;
//   div = beta KL(p||q) + (1 - beta) KL(q||p),  with 0 * log 0 = 0 for masked (-inf) entries.
#pragma once

#include "bond/common.h"

namespace bond {
namespace cpu {

// What the forward and the backward both read: the two (N, V) row sets, the row mask and the scalars.
struct JeffreysRowParams {
  const void* policy = nullptr;       // (N, V), row stride policy_stride, vocabulary stride 1
  const void* anchor = nullptr;       // (N, V), row stride anchor_stride, same dtype as policy
  const bool* ignore_mask = nullptr;  // (N,) or nullptr; true rows give 0
  DType dtype = DType::kFloat32;
  index_t n_rows = 0;
  index_t vocab = 0;
  index_t policy_stride = 0;
  index_t anchor_stride = 0;
  float beta = 0.5f;
  float temperature = 1.0f;
  int num_threads = 0;  // <= 0: the OpenMP default
};

struct TokenJeffreysFwdParams : JeffreysRowParams {
  float* div = nullptr;      // (N,) out
  float* lse_p = nullptr;    // (N,) out, split: log sum_v exp((x_v - shift_p) / T) (as token_logprobs)
  float* lse_q = nullptr;    // (N,) out, split likewise
  float* shift_p = nullptr;  // (N,) out, the row max of policy
  float* shift_q = nullptr;  // (N,) out, the row max of anchor
  float* kl_pq = nullptr;    // (N,) out
};

// d/dpolicy_v = g [beta p_v (log p_v - log q_v - KL(p||q)) + (1 - beta)(p_v - q_v)] / T
struct TokenJeffreysBwdParams : JeffreysRowParams {
  const float* lse_p = nullptr;  // split log-sum-exps and row maxima, from the forward
  const float* lse_q = nullptr;
  const float* shift_p = nullptr;
  const float* shift_q = nullptr;
  const float* kl_pq = nullptr;
  const float* grad_div = nullptr;  // (N,)
  void* grad = nullptr;             // (N, V) of dtype, row stride grad_stride
  index_t grad_stride = 0;
};

}  // namespace cpu
}  // namespace bond
