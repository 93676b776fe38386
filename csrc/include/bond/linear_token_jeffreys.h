// Parameter struct of the tiled student-teacher divergence's per-tile fold (kernel:
// csrc/cpu/linear_token_jeffreys.cpp, declared in bond/cpu.h; the engine that calls it and the math:
// bond_kernels/ops/linear_token_jeffreys.py; the same fold on a GPU: ops/triton/linear_token_jeffreys.py).
//
// Per row r and tile, with z = cap_s(x) / T (student) and a = cap_t(y) / T (teacher) computed from the raw
// matmul outputs x, y (cap(u) = c tanh(u / c), or u when c = 0), the running state is updated in place:
//   m_s, s_s = max z, sum e^{z - m_s}        a_s = sum e^{z - m_s} (z - m_s)    (the student's entropy)
//   m_t, s_t = max a, sum e^{a - m_t}
//   c_s = sum e^{z - m_s} (z - a)            c_t = sum e^{a - m_t} (a - z)      (with_cross only)
// Entries with e = 0 (-inf logits) add nothing to the products (0 log 0 = 0).  Maxes start at -inf, the rest
// at 0; a row whose maxes are still -inf keeps sums of 0.
//
// The backward's tile gradient and the generalised JSD's second forward pass read the same two raw tiles and
// the full rows' log-sum-exps lse_s, lse_t (of z and a over the whole vocabulary), with log s = z - lse_s,
// log t = a - lse_t and, for the generalised JSD at 0 < beta < 1, log m = logaddexp(log s + log(1 - beta),
// log t + log beta):
//   grad (Jeffreys):  dx = g / T [beta s (log s - log t - aux) + (1 - beta)(s - t)] cap_s'(x)    aux = KL(s||t)
//   grad (gjsd):      dx = g / T (1 - beta) s (log s - log m - aux) cap_s'(x)                 aux = KL(s||m)
//   second pass:      kl[0] += sum t (log t - log m),  kl[1] += sum s (log s - log m)
// with g the row's upstream coefficient and cap'(x) = 1 - tanh^2(x / c) (1 without a softcap).  A zero
// weight drops its term (beta = 0 or 1 in the Jeffreys convention); entries with s = 0 (t = 0) add nothing
// to the products.  A row with g = 0 (ignored rows get 0) reads nothing and writes zeros.
#pragma once

#include "bond/common.h"

namespace bond {
namespace cpu {

struct JeffreysTileFoldParams {
  const float* student = nullptr;  // (N, C) raw logits x, row stride student_stride, column stride 1
  const float* teacher = nullptr;  // (N, C) raw logits y, row stride teacher_stride, column stride 1
  float* state = nullptr;          // (7, N) in/out, rows (m_s, s_s, a_s, c_s, m_t, s_t, c_t), row stride state_stride
  index_t n_rows = 0;
  index_t cols = 0;
  index_t student_stride = 0;
  index_t teacher_stride = 0;
  index_t state_stride = 0;  // elements between the state's rows (N for a contiguous (7, N))
  float temperature = 1.0f;
  float cap_s = 0.0f;  // the student's softcap, 0 = off
  float cap_t = 0.0f;  // the teacher's softcap, 0 = off
  bool with_cross = true;
  int num_threads = 0;  // <= 0: the OpenMP default
};

// What the tile gradient and the second pass both read.
struct JeffreysTileRowParams {
  const float* student = nullptr;  // (N, C) raw logits x, row stride student_stride, column stride 1
  const float* teacher = nullptr;  // (N, C) raw logits y, row stride teacher_stride, column stride 1
  const float* lse_s = nullptr;    // (N,) log-sum-exp of z = cap_s(x) / T over the full row
  const float* lse_t = nullptr;    // (N,) log-sum-exp of a = cap_t(y) / T over the full row
  index_t n_rows = 0;
  index_t cols = 0;
  index_t student_stride = 0;
  index_t teacher_stride = 0;
  float temperature = 1.0f;
  float cap_s = 0.0f;   // 0 = off
  float cap_t = 0.0f;   // 0 = off
  float beta = 0.5f;    // the Jeffreys weight in [0, 1], or the generalised JSD's beta in (0, 1)
  int num_threads = 0;  // <= 0: the OpenMP default
};

struct JeffreysTileGradParams : JeffreysTileRowParams {
  const float* aux = nullptr;   // (N,) KL(s||t) (Jeffreys) or KL(s||m) (gjsd), of the full rows
  const float* coef = nullptr;  // (N,) upstream gradient g, 0 on ignored rows
  float* grad = nullptr;        // (N, C) out, fp32, row stride grad_stride, column stride 1
  index_t grad_stride = 0;
  bool gjsd = false;  // the generalised JSD (0 < beta < 1) instead of the Jeffreys convention
};

struct JeffreysTileGjsdParams : JeffreysTileRowParams {
  float* kl = nullptr;  // (2, N) in/out, rows (KL(t||m), KL(s||m)) partial sums, row stride kl_stride
  index_t kl_stride = 0;
};

}  // namespace cpu
}  // namespace bond
