// CPU launcher of the tiled divergence's per-tile fold (bond/linear_token_jeffreys.h; the engine that calls it:
// bond_kernels/ops/linear_token_jeffreys.py, cpu_tile_fold).
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
