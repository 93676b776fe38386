// OpenMP helpers shared by the CPU kernels.
#pragma once

#include "bond/common.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace bond {
namespace cpu {

// Below this many elements of work a parallel region costs more than it saves (a fork/join is ~2-5 us on
// 2-16 cores; 32768 fp32 exps take ~5 us on one AVX2 core).
constexpr index_t kParallelMinWork = 32768;

inline int resolve_threads(int num_threads) {
#ifdef _OPENMP
  return num_threads > 0 ? num_threads : omp_get_max_threads();
#else
  (void)num_threads;
  return 1;
#endif
}

// Prefetch elements [b0, b1) of a row (nullptr: none) into L2, one hint per 64-byte line.  The row kernels
// sweep a row twice: a max from memory, then the exp sums from L2 (a 32000-word fp32 row is 128 KB).  Without
// a hint the two alternate, the memory idle during the sums and the vector units idle during the max; a
// kernel that prefetches its next row block by block during this row's sums finds that row in L2 for its max
// (measured: one thread, 2048 x 32000 fp32, AVX-512, see BENCHMARKS.md).
template <class S>
inline void prefetch_block(const S* row, index_t b0, index_t b1) {
  if (row == nullptr) return;
  const char* p = reinterpret_cast<const char*>(row + b0);
  const char* end = reinterpret_cast<const char*>(row + b1);
  for (; p < end; p += 64) __builtin_prefetch(p, 0, 2);
}

// Run fn(r) for r in [0, n) over OpenMP threads; returns the largest status any row reported, so the
// result does not depend on which thread saw an error first.  Rows are independent (no cross-row sums),
// which keeps every output bitwise identical for any thread count.
template <class Fn>
int parallel_rows(index_t n, index_t work_per_row, int num_threads, Fn&& fn) {
  int status = kOk;
  const int nt = resolve_threads(num_threads);
  const bool go_parallel = nt > 1 && n > 1 && n * work_per_row >= kParallelMinWork;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(max : status) if (go_parallel)
  for (index_t r = 0; r < n; ++r) {
    const int s = fn(r);
    status = s > status ? s : status;
  }
  return status;
}

}  // namespace cpu
}  // namespace bond
