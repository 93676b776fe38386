// token_jeffreys forward/backward and reward_quantiles against double-precision loops written here.
#include <cmath>
#include <limits>

#include "check.h"

using namespace bond;
using bond_test::Buffer;
using bond_test::MaxErr;

namespace {

void log_softmax(const std::vector<double>& z, std::vector<double>& out) {
  double m = -INFINITY;
  for (double v : z) m = std::fmax(m, v);
  double s = 0;
  for (double v : z) s += std::exp(v - m);
  const double lse = m + std::log(s);
  out.resize(z.size());
  for (size_t i = 0; i < z.size(); ++i) out[i] = z[i] - lse;
}

void run_jeffreys(const char* isa, DType dtype, int64_t n, int64_t V, int64_t pad, double beta, double temperature,
                  uint32_t seed) {
  const int64_t sp = V + pad, sq = V + 2 * pad;  // different row strides for policy and anchor
  Buffer pol(dtype, n * sp), anc(dtype, n * sq);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (int64_t i = 0; i < n * sp; ++i) pol.set(i, nd(rng));
  for (int64_t i = 0; i < n * sq; ++i) anc.set(i, nd(rng));
  // Row 0: entries masked (-inf) in both models; row 1 is ignored.
  for (int64_t v = 0; v < V; v += 4) {
    pol.set(v, -INFINITY);
    anc.set(v, -INFINITY);
  }
  std::vector<unsigned char> mask_bytes(n, 0);
  mask_bytes[1 % n] = 1;
  bool* mask = reinterpret_cast<bool*>(mask_bytes.data());
  std::vector<float> div(n), lse_p(n), lse_q(n), kl(n), g(n);
  for (auto& v : g) v = nd(rng);

  cpu::TokenJeffreysFwdParams f;
  f.policy = pol.data();
  f.anchor = anc.data();
  f.ignore_mask = mask;
  f.div = div.data();
  f.lse_p = lse_p.data();
  f.lse_q = lse_q.data();
  f.kl_pq = kl.data();
  f.dtype = dtype;
  f.n_rows = n;
  f.vocab = V;
  f.policy_stride = sp;
  f.anchor_stride = sq;
  f.beta = static_cast<float>(beta);
  f.temperature = static_cast<float>(temperature);
  BOND_CHECK(cpu::token_jeffreys_fwd(f) == kOk, "jeffreys forward status");
  Buffer grad(dtype, n * V);
  cpu::TokenJeffreysBwdParams b;
  b.policy = pol.data();
  b.anchor = anc.data();
  b.ignore_mask = mask;
  b.lse_p = lse_p.data();
  b.lse_q = lse_q.data();
  b.kl_pq = kl.data();
  b.grad_div = g.data();
  b.grad = grad.data();
  b.dtype = dtype;
  b.n_rows = n;
  b.vocab = V;
  b.policy_stride = sp;
  b.anchor_stride = sq;
  b.grad_stride = V;
  b.beta = f.beta;
  b.temperature = f.temperature;
  BOND_CHECK(cpu::token_jeffreys_bwd(b) == kOk, "jeffreys backward status");

  char tag[128];
  std::snprintf(tag, sizeof(tag), "[%s %s jeffreys N=%lld V=%lld beta=%.2f T=%.2f]", isa, bond_test::dtype_name(dtype),
                (long long)n, (long long)V, beta, temperature);
  MaxErr ed(std::string(tag) + " div", 2e-5, 1e-4), ek(std::string(tag) + " kl_pq", 2e-5, 1e-4),
      eg(std::string(tag) + " grad", 2e-6,
         dtype == DType::kFloat32    ? 1e-4
         : dtype == DType::kBFloat16 ? 8e-3
                                     : 1e-3);
  std::vector<double> zp(V), zq(V), lp, lq;
  for (int64_t r = 0; r < n; ++r) {
    if (mask[r]) {
      ed.add(r, div[r], 0.0);
      for (int64_t v = 0; v < V; ++v) eg.add(r * V + v, grad.get(r * V + v), 0.0);
      continue;
    }
    for (int64_t v = 0; v < V; ++v) {
      zp[v] = pol.get(r * sp + v) / temperature;
      zq[v] = anc.get(r * sq + v) / temperature;
    }
    log_softmax(zp, lp);
    log_softmax(zq, lq);
    double kl_pq = 0, kl_qp = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(lp[v]), q = std::exp(lq[v]);
      if (p > 0) kl_pq += p * (lp[v] - lq[v]);
      if (q > 0) kl_qp += q * (lq[v] - lp[v]);
    }
    ed.add(r, div[r], beta * kl_pq + (1 - beta) * kl_qp);
    ek.add(r, kl[r], kl_pq);
    for (int64_t v = 0; v < V; ++v) {
      const double p = std::exp(lp[v]), q = std::exp(lq[v]);
      const double d = beta * (p > 0 ? p * (lp[v] - lq[v] - kl_pq) : 0.0) + (1 - beta) * (p - q);
      eg.add(r * V + v, grad.get(r * V + v), g[r] * d / temperature);
    }
  }
  ed.report();
  ek.report();
  eg.report();
}

void run_quantiles(DType dtype, int mode, bool with_mask, uint32_t seed) {
  const int64_t B = 13, n = 7, k = 33;
  Buffer rewards(dtype, B * n), ref(dtype, B * k);
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> level(0, 9);  // few distinct values: many ties
  for (int64_t i = 0; i < B * n; ++i) rewards.set(i, 0.25f * level(rng));
  for (int64_t i = 0; i < B * k; ++i) ref.set(i, 0.25f * level(rng));
  ref.set(5, INFINITY);
  ref.set(6, -INFINITY);
  std::vector<unsigned char> mask_bytes(B * k, 1);
  std::bernoulli_distribution keep(0.7);
  if (with_mask)
    for (auto& m : mask_bytes) m = keep(rng) ? 1 : 0;
  for (int64_t b = 0; b < B; ++b) mask_bytes[b * k] = 1;  // at least one valid sample per prompt
  const bool* mask = with_mask ? reinterpret_cast<const bool*>(mask_bytes.data()) : nullptr;
  std::vector<float> p_le(B * n), p_lt(B * n), c_le(B * n), c_lt(B * n);
  const float eps = 0.05f;
  cpu::RewardQuantilesParams p;
  p.rewards = rewards.data();
  p.ref_rewards = ref.data();
  p.ref_mask = mask;
  p.p_le = p_le.data();
  p.p_lt = p_lt.data();
  p.c_le = c_le.data();
  p.c_lt = c_lt.data();
  p.dtype = dtype;
  p.batch = B;
  p.n = n;
  p.k = k;
  p.rewards_stride = n;
  p.ref_stride = k;
  p.mask_stride = k;
  p.mode = mode;
  p.eps = eps;
  BOND_CHECK(cpu::reward_quantiles(p) == kOk, "quantiles status");
  int64_t bad = 0;
  for (int64_t b = 0; b < B; ++b) {
    int64_t valid = 0;
    for (int64_t j = 0; j < k; ++j) valid += mask_bytes[b * k + j] || !with_mask;
    for (int64_t i = 0; i < n; ++i) {
      const double r = rewards.get(b * n + i);
      int64_t le = 0, lt = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (with_mask && !mask_bytes[b * k + j]) continue;
        le += ref.get(b * k + j) <= r;
        lt += ref.get(b * k + j) < r;
      }
      double want_le, want_lt;
      if (mode == cpu::kQuantileSelf) {
        want_le = (le + 1.0) / (valid + 1.0);
        want_lt = lt / (valid + 1.0);
      } else {
        want_le = static_cast<double>(le) / valid;
        want_lt = static_cast<double>(lt) / valid;
        if (mode == cpu::kQuantileEps) want_le = std::fmax(want_le, eps);
      }
      const int64_t o = b * n + i;
      bad += c_le[o] != le || c_lt[o] != lt;
      bad += !bond_test::close(p_le[o], want_le, 0, 1e-7) || !bond_test::close(p_lt[o], want_lt, 0, 1e-7);
    }
  }
  BOND_CHECK(bad == 0, "quantiles %s mode %d mask %d: %lld mismatches", bond_test::dtype_name(dtype), mode, with_mask,
             (long long)bad);
}

}  // namespace

int main() {
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  bond_test::for_each_isa([&](const char* isa) {
    uint32_t seed = 3;
    for (DType d : dtypes) {
      run_jeffreys(isa, d, 6, 1277, 5, 0.5, 1.0, seed++);
      run_jeffreys(isa, d, 3, 4099, 0, 0.2, 0.7, seed++);  // two summation blocks
      run_jeffreys(isa, d, 4, 311, 3, 1.0, 1.5, seed++);   // beta = 1: backward KL only
    }
  });
  uint32_t seed = 100;
  for (DType d : dtypes)
    for (int mode = 0; mode <= 2; ++mode)
      for (int m = 0; m <= 1; ++m) run_quantiles(d, mode, m == 1, seed++);
  return bond_test::finish("test_jeffreys_quantiles");
}
