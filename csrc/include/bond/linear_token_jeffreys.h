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

}  // namespace cpu
}  // namespace bond
