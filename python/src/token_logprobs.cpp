// CPU launchers for token_logprobs (contract: bond_kernels/ops/token_logprobs.py): check tensors, allocate the
// fp32 outputs, hand raw pointers and strides to csrc/cpu/token_logprobs.cpp, map its status to an error.
#include <cmath>

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {
namespace {

void check_scalars(double temperature, double softcap) {
  check_fp32_scalar(temperature, "temperature");
  if (softcap != 0.0) check_fp32_scalar(softcap, "softcap");  // 0 disables it
  TORCH_CHECK_VALUE(softcap / temperature <= std::ldexp(1.0, 126), "softcap / temperature must be at most 2^126, got ",
                    softcap, " / ", temperature);
}

at::Tensor f32_out(const at::Tensor& like, int64_t n) { return like.new_empty({n}, like.options().dtype(at::kFloat)); }

// The checks and fields the three launchers share (bond::cpu::LogitsRowParams), in the order the errors are
// raised.  Returns the contiguous labels the kernel reads, which the caller keeps alive.
at::Tensor fill_logits_rows(bond::cpu::LogitsRowParams& p, const at::Tensor& logits, const at::Tensor& labels_in,
                            double temperature, double softcap, int64_t ignore_index) {
  check_cpu(logits, "logits");
  p.dtype = float_dtype(logits, "logits");
  p.rows = logits_rows(logits, "logits");
  check_scalars(temperature, softcap);
  p.vocab = logits.size(-1);
  at::Tensor labels = label_rows(labels_in, p.rows.n_rows);
  p.logits = logits.data_ptr();
  p.labels = labels.data_ptr<int64_t>();
  p.temperature = static_cast<float>(temperature);
  p.softcap = static_cast<float>(softcap);
  p.ignore_index = ignore_index;
  p.num_threads = kernel_threads();
  return labels;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_fwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                                  double temperature, double softcap,
                                                                  int64_t ignore_index, bool return_entropy) {
  bond::cpu::TokenLogprobsFwdParams p;
  const at::Tensor labels = fill_logits_rows(p, logits, labels_in, temperature, softcap, ignore_index);
  const int64_t n = p.rows.n_rows;
  at::Tensor logp = f32_out(logits, n), ent = f32_out(logits, return_entropy ? n : 0);
  // The split log-sum-exp (bond/token_logprobs.h): row 0 the row max of the logits, row 1 log S relative to it.
  at::Tensor lse = logits.new_empty({2, n}, logits.options().dtype(at::kFloat));
  p.logp = logp.data_ptr<float>();
  p.shift = lse.data_ptr<float>();
  p.lse = p.shift + n;
  p.entropy = return_entropy ? ent.data_ptr<float>() : nullptr;
  const int status = bond::cpu::token_logprobs_fwd(p);
  if (status == bond::kBadLabel) raise_bad_label(labels, p.vocab, ignore_index);
  raise_status(status, "token_logprobs");
  return {logp, lse, ent};
}

at::Tensor token_logprobs_bwd(const at::Tensor& logits, const at::Tensor& labels_in, const at::Tensor& lse_in,
                              const at::Tensor& entropy_in, const at::Tensor& grad_logp_in,
                              const at::Tensor& grad_entropy_in, double temperature, double softcap,
                              int64_t ignore_index, bool inplace) {
  bond::cpu::TokenLogprobsBwdParams p;
  const at::Tensor labels = fill_logits_rows(p, logits, labels_in, temperature, softcap, ignore_index);
  const int64_t n = p.rows.n_rows;
  const RowLse lse = row_lse(lse_in, "lse", n);
  const at::Tensor grad_logp = f32_rows(grad_logp_in, "grad_logp", n);
  const bool ent_grad = grad_entropy_in.numel() > 0;
  at::Tensor grad_entropy, entropy;
  if (ent_grad) {
    grad_entropy = f32_rows(grad_entropy_in, "grad_entropy", n);
    entropy = f32_rows(entropy_in, "entropy", n);
  }
  at::Tensor grad = inplace ? logits : new_written_like(logits);
  p.lse = lse.lse_ptr();
  p.shift = lse.shift_ptr();
  p.entropy = ent_grad ? entropy.data_ptr<float>() : nullptr;
  p.grad_logp = grad_logp.data_ptr<float>();
  p.grad_entropy = ent_grad ? grad_entropy.data_ptr<float>() : nullptr;
  p.grad = grad.data_ptr();
  p.grad_rows = inplace ? p.rows : contiguous_rows(logits);
  const int status = bond::cpu::token_logprobs_bwd(p);
  if (status == bond::kBadLabel) raise_bad_label(labels, p.vocab, ignore_index);
  raise_status(status, "token_logprobs backward");
  return grad;
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_fwd_bwd(const at::Tensor& logits, const at::Tensor& labels_in,
                                                          const at::Tensor& grad_logp_in, double temperature,
                                                          double softcap, int64_t ignore_index, bool inplace) {
  bond::cpu::TokenLogprobsFwdBwdParams p;
  const at::Tensor labels = fill_logits_rows(p, logits, labels_in, temperature, softcap, ignore_index);
  const int64_t n = p.rows.n_rows;
  const at::Tensor grad_logp = f32_rows(grad_logp_in, "grad_logp", n);
  at::Tensor logp = f32_out(logits, n);
  at::Tensor grad = inplace ? logits : new_written_like(logits);
  p.grad_logp = grad_logp.data_ptr<float>();
  p.logp = logp.data_ptr<float>();
  p.grad = grad.data_ptr();
  p.grad_rows = inplace ? p.rows : contiguous_rows(logits);
  const int status = bond::cpu::token_logprobs_fwd_bwd(p);
  if (status == bond::kBadLabel) raise_bad_label(labels, p.vocab, ignore_index);
  raise_status(status, "token_logprobs_and_grad");
  return {logp, grad};
}

}  // namespace bond_py
