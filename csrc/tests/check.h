// A minimal test harness for the torch-free kernels (no external test framework to install).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bond/cpu.h"
#include "bond/dtype.h"

namespace bond_test {

inline int& failures() {
  static int n = 0;
  return n;
}

#define BOND_CHECK(cond, ...)                                                       \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      ++::bond_test::failures();                                                    \
      std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                   \
    }                                                                               \
  } while (0)

// |got - want| <= atol + rtol * |want|, with matching infinities and NaNs.
inline bool close(double got, double want, double atol, double rtol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= atol + rtol * std::fabs(want);
}

// Track the worst error of a comparison series and report once.
struct MaxErr {
  std::string what;
  double atol, rtol;
  double worst = 0.0;
  int64_t bad = 0, count = 0;
  double first_got = 0, first_want = 0;
  int64_t first_index = -1;
  MaxErr(std::string w, double a, double r) : what(std::move(w)), atol(a), rtol(r) {}
  void add(int64_t i, double got, double want) {
    ++count;
    if (!close(got, want, atol, rtol)) {
      if (first_index < 0) {
        first_index = i;
        first_got = got;
        first_want = want;
      }
      ++bad;
    }
    if (std::isfinite(want) && std::isfinite(got)) worst = std::fmax(worst, std::fabs(got - want));
  }
  void report() const {
    BOND_CHECK(
        bad == 0, "%s: %lld of %lld values out of tolerance (atol %g, rtol %g); first at %lld: got %.9g want %.9g",
        what.c_str(), (long long)bad, (long long)count, atol, rtol, (long long)first_index, first_got, first_want);
    BOND_CHECK(count > 0, "%s: nothing compared", what.c_str());
  }
};

// Inputs of a given dtype stored as the kernels read them, with the fp32 values they represent.
struct Buffer {
  bond::DType dtype;
  std::vector<float> f32;     // used when dtype is fp32
  std::vector<uint16_t> u16;  // bf16 / fp16 bits
  explicit Buffer(bond::DType d, size_t n) : dtype(d) {
    if (d == bond::DType::kFloat32) f32.assign(n, 0.0f);
    else u16.assign(n, 0);
  }
  void set(size_t i, float v) {
    if (dtype == bond::DType::kFloat32) f32[i] = v;
    else if (dtype == bond::DType::kBFloat16) u16[i] = bond::f32_to_bf16(v);
    else u16[i] = bond::f32_to_fp16(v);
  }
  float get(size_t i) const {
    if (dtype == bond::DType::kFloat32) return f32[i];
    if (dtype == bond::DType::kBFloat16) return bond::bf16_to_f32(u16[i]);
    return bond::fp16_to_f32(u16[i]);
  }
  void* data() { return dtype == bond::DType::kFloat32 ? static_cast<void*>(f32.data()) : u16.data(); }
  const void* data() const {
    return dtype == bond::DType::kFloat32 ? static_cast<const void*>(f32.data()) : u16.data();
  }
};

inline const char* dtype_name(bond::DType d) {
  return d == bond::DType::kFloat32 ? "fp32" : d == bond::DType::kBFloat16 ? "bf16" : "fp16";
}

// Run fn once per instruction set the CPU supports, restoring the best one afterwards.
template <class Fn>
void for_each_isa(Fn&& fn) {
  const int best = static_cast<int>(bond::cpu::best_isa());
  for (int i = 0; i <= best; ++i) {
    bond::cpu::set_isa(static_cast<bond::cpu::Isa>(i));
    fn(bond::cpu::isa_name(static_cast<bond::cpu::Isa>(i)));
  }
  bond::cpu::set_isa(static_cast<bond::cpu::Isa>(best));
}

inline int finish(const char* name) {
  if (failures() == 0) {
    std::printf("%s: all checks passed\n", name);
    return 0;
  }
  std::printf("%s: %d check(s) failed\n", name, failures());
  return 1;
}

}  // namespace bond_test
