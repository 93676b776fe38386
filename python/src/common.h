// Tensor checks and conversions shared by the launchers of python/src/ (the only place torch meets the
// kernels): describe() and raise_status() serve the CPU and the CUDA launchers, the rest the CPU ones.
//
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE raise Python ValueError / TypeError; every message names the
// argument, what it got and what it expects.
#pragma once

#include <cmath>
#include <sstream>
#include <string>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "bond/common.h"
#include "bond/cpu.h"

namespace bond_py {

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << "shape " << t.sizes() << ", strides " << t.strides() << ", dtype " << t.scalar_type() << ", device "
     << t.device();
  return os.str();
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got an undefined tensor");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor for the cpu backend, got ", describe(t));
}

// fp32 / bf16 / fp16 -> the kernels' dtype code; anything else is a TypeError.
inline bond::DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return bond::DType::kFloat32;
    case at::kBFloat16: return bond::DType::kBFloat16;
    case at::kHalf: return bond::DType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16 for the cpu backend, got ", describe(t));
  }
  return bond::DType::kFloat32;  // unreachable
}

// A (N, V) or (B, T, V) float tensor with unit vocabulary stride, as the kernels' row layout.
inline bond::Rows logits_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, name, " must be (N, V) or (B, T, V), got ", describe(t));
  TORCH_CHECK_VALUE(t.size(-1) >= 1, name, " must have a non-empty vocabulary (last) dimension, got ", describe(t));
  TORCH_CHECK_VALUE(t.stride(-1) == 1 || t.size(-1) == 1, name,
                    " must be contiguous along the vocabulary (last stride 1), got ", describe(t));
  if (t.dim() == 2) return bond::Rows::matrix(t.size(0), t.stride(0));
  return bond::Rows::batched(t.size(0), t.size(1), t.stride(0), t.stride(1));
}

// The layout of a freshly allocated contiguous tensor of the same shape.
inline bond::Rows contiguous_rows(const at::Tensor& t) {
  const int64_t v = t.size(-1);
  if (t.dim() == 2) return bond::Rows::matrix(t.size(0), v);
  return bond::Rows::batched(t.size(0), t.size(1), t.size(1) * v, v);
}

inline int64_t num_rows(const at::Tensor& logits) { return logits.numel() / logits.size(-1); }

// A contiguous tensor shaped like `like` that a kernel is about to write in full (an (N, V) gradient).  Large
// ones get transparent-huge-page advice first (bond/cpu.h): the first-touch page faults of a fresh buffer
// otherwise cost more than the kernel that fills it.
inline at::Tensor new_written_like(const at::Tensor& like) {
  at::Tensor out = like.new_empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  bond::cpu::advise_huge_pages(out.data_ptr(), static_cast<std::size_t>(out.nbytes()));
  return out;
}

// A 1-D fp32 per-row tensor of length n (contiguous copy if needed).
inline at::Tensor f32_rows(const at::Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", describe(t));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",), got ", describe(t));
  return t.contiguous();
}

// An (N,) int64 label tensor, contiguous.
inline at::Tensor label_rows(const at::Tensor& labels, int64_t n) {
  check_cpu(labels, "labels");
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", describe(labels));
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n, "labels must have shape (", n,
                    ",), one label per row of logits, got ", describe(labels));
  return labels.contiguous();
}

// A (N,) bool mask or an empty tensor (no mask) -> pointer or nullptr.
inline const bool* optional_bool_rows(at::Tensor& mask, const char* name, int64_t n) {
  if (mask.numel() == 0 && mask.dim() == 1) return nullptr;
  check_cpu(mask, name);
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, name, " must be a bool tensor, got ", describe(mask));
  TORCH_CHECK_VALUE(mask.dim() == 1 && mask.size(0) == n, name, " must have shape (", n, ",) or (0,), got ",
                    describe(mask));
  mask = mask.contiguous();
  return mask.data_ptr<bool>();
}

inline int kernel_threads() { return at::get_num_threads(); }

// A temperature or softcap the fp32 kernels can use: it and its reciprocal normal fp32 numbers, [2^-126, 2^126]
// (the functional API checks the same range, bond_kernels/_validate.py; this names it for direct callers).
inline void check_fp32_scalar(double value, const char* name) {
  const float f = static_cast<float>(value);
  TORCH_CHECK_VALUE(value > 0.0 && std::isnormal(f) && std::isnormal(1.0f / f), name,
                    " must lie in [2^-126, 2^126] (it and its reciprocal must be normal fp32 numbers), got ", value);
}

// Per-row saved log-sum-exps: the forward's split form (2, N) = [row max of the logits, log-sum-exp
// relative to it] (bond/token_logprobs.h), or a full (N,) log-sum-exp (callers that combine partial rows).
struct RowLse {
  at::Tensor lse, shift;  // shift undefined for the full form
  const float* lse_ptr() const { return lse.data_ptr<float>(); }
  const float* shift_ptr() const { return shift.defined() ? shift.data_ptr<float>() : nullptr; }
};

inline RowLse row_lse(const at::Tensor& t, const char* name, int64_t n) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", describe(t));
  if (t.dim() == 2) {
    TORCH_CHECK_VALUE(t.size(0) == 2 && t.size(1) == n, name, " must have shape (", n, ",) or (2, ", n,
                      ") (split form), got ", describe(t));
    const at::Tensor c = t.contiguous();
    return {c[1], c[0]};
  }
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",) or (2, ", n, "), got ",
                    describe(t));
  return {t.contiguous(), at::Tensor()};
}

// The first label outside [0, vocab) that is not ignore_index, for the error message (host scan; this runs
// only after the kernel reported a bad label, so the fast path never pays for it).
inline void raise_bad_label(const at::Tensor& labels, int64_t vocab, int64_t ignore_index) {
  const int64_t* y = labels.data_ptr<int64_t>();
  const int64_t n = labels.numel();
  int64_t count = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] != ignore_index && (y[i] < 0 || y[i] >= vocab)) {
      if (first < 0) first = i;
      ++count;
    }
  }
  TORCH_CHECK_VALUE(false, "labels must lie in [0, ", vocab, ") or equal ignore_index=", ignore_index, ", got ",
                    first >= 0 ? y[first] : 0, " at position ", first, " (", count, " position(s) out of range)");
}

// A kernel's status (bond/common.h) as a Python error naming the op and the backend.  kBadLabel is turned
// into its message by the caller first (raise_bad_label), which knows the labels.
inline void raise_status(int status, const char* op, const char* backend = "cpu") {
  TORCH_CHECK_VALUE(status != bond::kAllNegInfRow, op,
                    ": logits has a row whose entries are all -inf at a position whose label is not ignored");
  TORCH_CHECK_VALUE(status != bond::kBadArgument, op, ": the ", backend,
                    " kernel rejected its arguments (a size, stride, pointer or scalar outside its contract)");
  TORCH_CHECK(status == bond::kOk, op, ": ", backend, " kernel failed with status ", status, " (",
              bond::status_name(status), ")");
}

}  // namespace bond_py
