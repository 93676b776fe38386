// Standalone driver of the CPU row kernels (no torch), for instruction counts and one-thread timings:
//   g++ -O3 -fopenmp -ffp-contract=fast -fno-math-errno -fno-trapping-math -std=c++17 -Icsrc/include \
//       benchmarks/cpu_row_kernels.cpp csrc/cpu/token_logprobs.cpp csrc/cpu/token_jeffreys.cpp csrc/cpu/isa.cpp \
//       -o /tmp/row_kernels
//   /tmp/row_kernels <op> <f32|bf16> <rows> <vocab> <avx512|avx2|generic> <reps>
//   valgrind --tool=callgrind --toggle-collect='bond::cpu::token_*' /tmp/row_kernels tlp f32 16 32000 avx2 1
// op: read (a plain vectorised sum of the same bytes: the read rate), tlp / tlpent (token_logprobs forward,
// without / with entropy), tlpbwd (its backward), tj / tjbwd (token_jeffreys forward / backward).  One
// thread; prints the best of <reps> calls.  valgrind has no AVX-512, so callgrind counts the avx2 and generic
// clones.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
#include "bond/cpu.h"
#include "bond/dtype.h"
#include "bond/isa.h"
#include "bond/token_jeffreys.h"
#include "bond/token_logprobs.h"
using namespace bond;
__attribute__((target("avx512f,avx512bw,prefer-vector-width=512"))) __attribute__((noinline)) float read_sum(
    const float* x, long n) {
  float a0 = 0;
#pragma omp simd reduction(+ : a0)
  for (long i = 0; i < n; ++i) a0 += x[i];
  return a0;
}
int main(int argc, char** argv) {
  const char* op = argv[1];
  bool bf = !strcmp(argv[2], "bf16");
  long n = atol(argv[3]), v = atol(argv[4]);
  int reps = atoi(argv[6]);
  cpu::Isa isa;
  cpu::isa_from_name(argv[5], &isa);
  if (cpu::set_isa(isa)) {
    puts("isa unsupported");
    return 1;
  }
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0, 4);
  std::vector<float> xf(n * v), qf(n * v);
  for (auto& a : xf) a = nd(rng);
  for (auto& a : qf) a = nd(rng);
  std::vector<uint16_t> xb(n * v), qb(n * v);
  for (long i = 0; i < n * v; ++i) {
    xb[i] = f32_to_bf16(xf[i]);
    qb[i] = f32_to_bf16(qf[i]);
  }
  const void* X = bf ? (const void*)xb.data() : (const void*)xf.data();
  const void* Q = bf ? (const void*)qb.data() : (const void*)qf.data();
  std::vector<int64_t> y(n);
  for (long i = 0; i < n; ++i) y[i] = (i * 7919) % v;
  std::vector<float> o1(n), o2(2 * n), o3(n), o4(2 * n), o5(n), g(n, 0.7f);
  std::vector<float> grad(n * v);
  DType dt = bf ? DType::kBFloat16 : DType::kFloat32;
  double best = 1e30, chk = 0;
  for (int k = 0; k < reps; ++k) {
    auto t0 = std::chrono::steady_clock::now();
    if (!strcmp(op, "read")) {
      chk = read_sum(bf ? (const float*)xb.data() : xf.data(), bf ? n * v / 2 : n * v);
    } else if (!strcmp(op, "tlp") || !strcmp(op, "tlpent")) {
      cpu::TokenLogprobsFwdParams p;
      p.logits = X;
      p.labels = y.data();
      p.dtype = dt;
      p.rows = Rows::matrix(n, v);
      p.vocab = v;
      p.logp = o1.data();
      p.shift = o2.data();
      p.lse = o2.data() + n;
      p.num_threads = 1;
      if (!strcmp(op, "tlpent")) p.entropy = o3.data();
      cpu::token_logprobs_fwd(p);
      chk = o1[0] + o1[n - 1];
    } else if (!strcmp(op, "tj")) {
      cpu::TokenJeffreysFwdParams p;
      p.policy = X;
      p.anchor = Q;
      p.dtype = dt;
      p.n_rows = n;
      p.vocab = v;
      p.policy_stride = v;
      p.anchor_stride = v;
      p.num_threads = 1;
      p.div = o1.data();
      p.lse_p = o2.data();
      p.lse_q = o4.data();
      p.shift_p = o2.data() + n;
      p.shift_q = o4.data() + n;
      p.kl_pq = o3.data();
      cpu::token_jeffreys_fwd(p);
      chk = o1[0] + o1[n - 1];
    } else if (!strcmp(op, "tlpbwd")) {
      cpu::TokenLogprobsBwdParams p;
      p.logits = X;
      p.labels = y.data();
      p.dtype = dt;
      p.rows = Rows::matrix(n, v);
      p.vocab = v;
      std::vector<float> lse(n, 10.4f), sh(n, 16.f);
      p.lse = lse.data();
      p.shift = sh.data();
      p.grad_logp = g.data();
      p.grad = grad.data();
      p.grad_rows = Rows::matrix(n, v);
      p.num_threads = 1;
      cpu::token_logprobs_bwd(p);
      chk = grad[3];
    } else if (!strcmp(op, "tjbwd")) {
      cpu::TokenJeffreysBwdParams p;
      p.policy = X;
      p.anchor = Q;
      p.dtype = dt;
      p.n_rows = n;
      p.vocab = v;
      p.policy_stride = v;
      p.anchor_stride = v;
      p.num_threads = 1;
      std::vector<float> lse(n, 10.4f), sh(n, 16.f);
      p.lse_p = lse.data();
      p.lse_q = lse.data();
      p.shift_p = sh.data();
      p.shift_q = sh.data();
      p.kl_pq = g.data();
      p.grad_div = g.data();
      p.grad = grad.data();
      p.grad_stride = v;
      cpu::token_jeffreys_bwd(p);
      chk = grad[3];
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (ms < best) best = ms;
  }
  printf("%s %s %ldx%ld %s best %.3f ms  %.3f ns/elt chk %.6f\n", op, argv[2], n, v, argv[5], best,
         best * 1e6 / (n * v), chk);
}
