// Run-time choice of the instruction set the CPU kernels use (see bond/isa.h).
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "bond/isa.h"

namespace bond {
namespace cpu {
namespace {

Isa detect() {
#if BOND_X86_DISPATCH
  __builtin_cpu_init();
  // AVX-512BW is needed for the 16-bit (bf16/fp16) lanes; FMA for the polynomial.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2"))
    return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

// -1 until first use; then the chosen Isa as an int.  Atomic so concurrent first calls are harmless.
std::atomic<int> g_active{-1};

int initial() {
  Isa isa = best_isa();
  if (const char* env = std::getenv("BOND_KERNELS_CPU_ISA")) {
    Isa wanted;
    if (env[0] != '\0' && isa_from_name(env, &wanted) == kOk && static_cast<int>(wanted) < static_cast<int>(isa))
      isa = wanted;  // the variable caps the ISA; it never enables one the CPU lacks
  }
  return static_cast<int>(isa);
}

}  // namespace

Isa best_isa() {
  static const Isa best = detect();
  return best;
}

Isa active_isa() {
  int v = g_active.load(std::memory_order_relaxed);
  if (v < 0) {
    v = initial();
    g_active.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

int set_isa(Isa isa) {
  if (static_cast<int>(isa) < 0 || static_cast<int>(isa) > static_cast<int>(best_isa())) return kUnsupported;
  g_active.store(static_cast<int>(isa), std::memory_order_relaxed);
  return kOk;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

int isa_from_name(const char* name, Isa* out) {
  if (name == nullptr) return kBadArgument;
  if (std::strcmp(name, "generic") == 0) *out = Isa::kGeneric;
  else if (std::strcmp(name, "avx2") == 0) *out = Isa::kAvx2;
  else if (std::strcmp(name, "avx512") == 0) *out = Isa::kAvx512;
  else return kBadArgument;
  return kOk;
}

}  // namespace cpu
}  // namespace bond
