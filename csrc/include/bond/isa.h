// Helpers for compiling one row kernel several times, once per instruction set, inside one translation unit.
//
// A row kernel is written once as an always-inline template.  BOND_FOR_EACH_ISA(X) expands X(suffix, attr)
// for each ISA; X defines a thin wrapper carrying the target attribute, into which the template is inlined
// and then auto-vectorised for that ISA.  No -march flag is needed, so the built library runs on any x86-64
// and still uses AVX2 / AVX-512 where the CPU has them (cpu::active_isa() picks at run time).
#pragma once

#include "bond/cpu.h"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BOND_X86_DISPATCH 1
#define BOND_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#if defined(__clang__)
#define BOND_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#else
// GCC vectorises with 256-bit registers even for AVX-512 targets unless told otherwise; 512-bit vectors halve
// the instruction count of the exp polynomial (measured: see BENCHMARKS.md).
#define BOND_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512")))
#endif
#define BOND_FOR_EACH_ISA(X) X(generic, ) X(avx2, BOND_TARGET_AVX2) X(avx512, BOND_TARGET_AVX512)
#else
#define BOND_X86_DISPATCH 0
#define BOND_FOR_EACH_ISA(X) X(generic, )
#endif

// Pick the wrapper instantiation for the active ISA:  BOND_ISA_SELECT(isa, fwd_row, T, true, false) is
// &fwd_row_avx512<T, true, false> (or _avx2 / _generic).  Variadic so template argument commas pass through.
#if BOND_X86_DISPATCH
#define BOND_ISA_SELECT(isa, name, ...)                             \
  ((isa) == ::bond::cpu::Isa::kAvx512 ? &name##_avx512<__VA_ARGS__> \
   : (isa) == ::bond::cpu::Isa::kAvx2 ? &name##_avx2<__VA_ARGS__>   \
                                      : &name##_generic<__VA_ARGS__>)
#else
#define BOND_ISA_SELECT(isa, name, ...) (&name##_generic<__VA_ARGS__>)
#endif
