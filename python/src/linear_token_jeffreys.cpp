// CPU launcher of the tiled divergence's per-tile fold (bond/linear_token_jeffreys.h; the engine that calls it:
// bond_kernels/ops/linear_token_jeffreys.py, cpu_tile_fold).
#include <optional>

#include "bond/cpu.h"
#include "common.h"
#include "launchers.h"

namespace bond_py {
namespace {

// A 2-D fp32 CPU tensor with unit last stride (the raw logits of a tile, or the state).
void check_f32_matrix(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", describe(t));
  TORCH_CHECK_VALUE(t.dim() == 2, name, " must be 2-D, got ", describe(t));
  TORCH_CHECK_VALUE(t.stride(1) == 1 || t.size(1) <= 1, name, " must have last stride 1, got ", describe(t));
}

// The row stride the kernel walks by: a single row's stride is arbitrary in torch, its width is the safe one.
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

void check_cap(double cap, const char* name) {
  if (cap != 0.0) check_fp32_scalar(cap, name);
}

// The two raw tiles, the rows' log-sum-exps and the scalars both tile-row kernels read; beta in [0, 1]
// (Jeffreys) or (0, 1) (the generalised JSD).  Returns the log-sum-exps' contiguous copies, which the
// caller keeps alive while the kernel runs.
struct TileRows {
  at::Tensor lse_s, lse_t;
};

TileRows fill_tile_rows(bond::cpu::JeffreysTileRowParams& p, const at::Tensor& student, const at::Tensor& teacher,
                        const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature, double cap_s,
                        double cap_t, double beta, bool gjsd) {
  check_f32_matrix(student, "student");
  check_f32_matrix(teacher, "teacher");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have student's shape ", student.sizes(), ", got ",
                    describe(teacher));
  const int64_t n = student.size(0);
  TileRows rows{f32_rows(lse_s, "lse_s", n), f32_rows(lse_t, "lse_t", n)};
  check_fp32_scalar(temperature, "temperature");
  check_cap(cap_s, "cap_s");
  check_cap(cap_t, "cap_t");
  const bool beta_ok = gjsd ? (beta > 0.0 && beta < 1.0) : (beta >= 0.0 && beta <= 1.0);
  TORCH_CHECK_VALUE(beta_ok, "beta must lie in ", gjsd ? "(0, 1) for the generalised JSD" : "[0, 1]", ", got ", beta);
  p.student = student.data_ptr<float>();
  p.teacher = teacher.data_ptr<float>();
  p.lse_s = rows.lse_s.data_ptr<float>();
  p.lse_t = rows.lse_t.data_ptr<float>();
  p.n_rows = n;
  p.cols = student.size(1);
  p.student_stride = row_stride(student);
  p.teacher_stride = row_stride(teacher);
  p.temperature = static_cast<float>(temperature);
  p.cap_s = static_cast<float>(cap_s);
  p.cap_t = static_cast<float>(cap_t);
  p.beta = static_cast<float>(beta);
  p.num_threads = kernel_threads();
  return rows;
}

}  // namespace

void linear_jeffreys_tile_fold(at::Tensor& state, const at::Tensor& student, const at::Tensor& teacher,
                               double temperature, double cap_s, double cap_t, bool with_cross) {
  check_f32_matrix(student, "student");
  check_f32_matrix(teacher, "teacher");
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher must have student's shape ", student.sizes(), ", got ",
                    describe(teacher));
  check_f32_matrix(state, "state");
  const int64_t n = student.size(0);
  TORCH_CHECK_VALUE(state.size(0) == 7 && state.size(1) == n, "state must have shape (7, ", n, "), got ",
                    describe(state));
  check_fp32_scalar(temperature, "temperature");
  check_cap(cap_s, "cap_s");
  check_cap(cap_t, "cap_t");
  bond::cpu::JeffreysTileFoldParams p;
  p.student = student.data_ptr<float>();
  p.teacher = teacher.data_ptr<float>();
  p.state = state.data_ptr<float>();
  p.n_rows = n;
  p.cols = student.size(1);
  p.student_stride = row_stride(student);
  p.teacher_stride = row_stride(teacher);
  p.state_stride = n > 1 ? state.stride(0) : 1;
  p.temperature = static_cast<float>(temperature);
  p.cap_s = static_cast<float>(cap_s);
  p.cap_t = static_cast<float>(cap_t);
  p.with_cross = with_cross;
  p.num_threads = kernel_threads();
  raise_status(bond::cpu::linear_jeffreys_tile_fold(p), "linear_token_jeffreys tile fold");
}

}  // namespace bond_py

namespace bond_py {

at::Tensor linear_jeffreys_tile_grad(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& lse_s,
                                     const at::Tensor& lse_t, const at::Tensor& aux, const at::Tensor& coef,
                                     double temperature, double cap_s, double cap_t, double beta, bool gjsd,
                                     const std::optional<at::Tensor>& out) {
  bond::cpu::JeffreysTileGradParams p;
  const TileRows rows = fill_tile_rows(p, student, teacher, lse_s, lse_t, temperature, cap_s, cap_t, beta, gjsd);
  const at::Tensor aux_c = f32_rows(aux, "aux", p.n_rows), coef_c = f32_rows(coef, "coef", p.n_rows);
  at::Tensor grad;
  if (out.has_value() && out->defined()) {
    grad = *out;
    check_f32_matrix(grad, "out");
    TORCH_CHECK_VALUE(grad.sizes() == student.sizes(), "out must have student's shape ", student.sizes(), ", got ",
                      describe(grad));
  } else {
    grad = student.new_empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  }
  p.aux = aux_c.data_ptr<float>();
  p.coef = coef_c.data_ptr<float>();
  p.grad = grad.data_ptr<float>();
  p.grad_stride = row_stride(grad);
  p.gjsd = gjsd;
  raise_status(bond::cpu::linear_jeffreys_tile_grad(p), "linear_token_jeffreys tile gradient");
  return grad;
}

void linear_jeffreys_tile_gjsd(at::Tensor& kl, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& lse_s, const at::Tensor& lse_t, double temperature, double cap_s,
                               double cap_t, double beta) {
  bond::cpu::JeffreysTileGjsdParams p;
  const TileRows rows = fill_tile_rows(p, student, teacher, lse_s, lse_t, temperature, cap_s, cap_t, beta, true);
  check_f32_matrix(kl, "kl");
  TORCH_CHECK_VALUE(kl.size(0) == 2 && kl.size(1) == p.n_rows, "kl must have shape (2, ", p.n_rows, "), got ",
                    describe(kl));
  p.kl = kl.data_ptr<float>();
  p.kl_stride = p.n_rows > 1 ? kl.stride(0) : 1;
  raise_status(bond::cpu::linear_jeffreys_tile_gjsd(p), "linear_token_jeffreys gjsd pass");
}

}  // namespace bond_py
