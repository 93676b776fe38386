// Parameter structs of token_logprobs (kernels: csrc/cpu/token_logprobs.cpp, declared in bond/cpu.h;
// contract of the launchers: bond_kernels/ops/token_logprobs.py).
//
// token_logprobs:  z = c * tanh(x / c) / T (softcap c > 0, or z = x / T with softcap = 0),
//   logp[r] = z[r, y_r] - lse[r],  lse[r] = log sum_v exp(z[r, v]),  entropy[r] = -sum_v p log p.
// Rows whose label equals ignore_index give 0 (and a zero gradient) without reading the row.
//
// Split log-sum-exp.  With `shift` given, the forward writes the row max x_m of the logits to shift[r] and
// log sum_v exp(z_v - z(x_m)) to lse[r] (z(x_m) = c * tanh(x_m / c) / T is the row max of z), so the whole
// lse is z(shift) + lse; the backward given both recomputes log p_v = z_v - z(x_m) - lse as a difference
// first (x_v - x_m, or tanh(x_v / c) - tanh(x_m / c)), whose error is a rounding of log p_v.  The full fp32
// lse has one rounding of |z| (2.4e-4 at |z| = 4000), which log p_v = z_v - lse inherits: the backward
// without `shift` (callers that combine partial rows into a global lse) has that error.
// NaN or +inf entries (without a softcap) make the row's outputs NaN and return kOk: the caller names the
// cause.  A row of all -inf without a softcap has no distribution: kAllNegInfRow (with a softcap, -inf maps
// to -c and the row is uniform).
//
// Fields are grouped pointers, then sizes and strides, then scalars.  `num_threads <= 0` means the OpenMP
// default; the torch binding passes at::get_num_threads() so torch.set_num_threads() applies.
#pragma once

#include <cstdint>

#include "bond/common.h"

namespace bond {
namespace cpu {

// What the forward, the backward and the fused forward+backward all read: the logits rows, their labels
// and the scalars of the transform z = c * tanh(x / c) / T.
struct LogitsRowParams {
  const void* logits = nullptr;     // (N, V) or (B, T, V) of `dtype`, vocabulary stride 1, rows as `rows`
  const int64_t* labels = nullptr;  // (N,) contiguous
  DType dtype = DType::kFloat32;
  Rows rows;
  index_t vocab = 0;
  float temperature = 1.0f;
  float softcap = 0.0f;  // 0 disables the softcap
  int64_t ignore_index = -100;
  int num_threads = 0;
};

struct TokenLogprobsFwdParams : LogitsRowParams {
  float* logp = nullptr;     // (N,) out
  float* lse = nullptr;      // (N,) out, log-sum-exp of z (saved for the backward), or with shift
                             // the log-sum-exp of z - shift / T
  float* shift = nullptr;    // (N,) out or nullptr: the row max of the logits (split lse)
  float* entropy = nullptr;  // (N,) out, or nullptr to skip the entropy
};

// grad = d/dlogits of sum_r (grad_logp[r] * logp[r] + grad_entropy[r] * entropy[r]), from the forward's lse
// (and entropy):   dz_v = g (1[v = y] - p_v) - g_H p_v (log p_v + H);   dx_v = dz_v / T * (1 - tanh^2(x_v/c)).
struct TokenLogprobsBwdParams : LogitsRowParams {
  const float* lse = nullptr;           // (N,) from the forward (split with shift, or the full lse)
  const float* shift = nullptr;         // (N,) from the forward, or nullptr when lse is the full lse
  const float* entropy = nullptr;       // (N,) from the forward; needed only with grad_entropy
  const float* grad_logp = nullptr;     // (N,)
  const float* grad_entropy = nullptr;  // (N,) or nullptr
  void* grad = nullptr;                 // same dtype as logits, rows as grad_rows; may alias logits (in place)
  Rows grad_rows;
};

// The gradient computed in the forward sweep for an upstream grad_logp known in advance: one read of the
// logits (each row is swept from cache for its max, sum and gradient) and one write of the gradient.
struct TokenLogprobsFwdBwdParams : LogitsRowParams {
  const float* grad_logp = nullptr;  // (N,)
  float* logp = nullptr;             // (N,) out
  float* lse = nullptr;              // (N,) out, or nullptr
  void* grad = nullptr;              // may alias logits (in place)
  Rows grad_rows;
};

}  // namespace cpu
}  // namespace bond
