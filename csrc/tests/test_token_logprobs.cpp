// token_logprobs forward, backward and fused forward+backward against double-precision loops written here,
// for fp32, bf16 and fp16 logits, on every instruction set the CPU supports.
#include <cmath>
#include <cstring>
#include <limits>

#include "check.h"

using namespace bond;
using bond_test::Buffer;
using bond_test::MaxErr;

namespace {

constexpr int64_t kIgnore = -100;
const double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Case {
  int64_t b, t, vocab;         // logical (B, T, V); B = 1 with t = N gives a 2-D (N, V) tensor
  int64_t stride_b, stride_t;  // element strides of the logits buffer (>= the packed ones: padded rows)
  double temperature, softcap;
  bool three_d;
};

struct Expected {
  std::vector<double> logp, lse, entropy, grad;  // grad: (N, V) packed
};

double transform(double x, double temperature, double softcap) {
  if (softcap > 0) x = softcap * std::tanh(x / softcap);
  return x / temperature;
}

// The double-precision reference: logp, lse, entropy and d/dx of sum_r g[r] logp[r] + gh[r] entropy[r].
Expected reference(const Case& c, const Buffer& x, const std::vector<int64_t>& labels, const std::vector<float>& g,
                   const std::vector<float>& gh) {
  const int64_t n = c.b * c.t, V = c.vocab;
  Expected e;
  e.logp.assign(n, 0.0);
  e.lse.assign(n, 0.0);
  e.entropy.assign(n, 0.0);
  e.grad.assign(n * V, 0.0);
  std::vector<double> z(V), p(V);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t y = labels[r];
    if (y == kIgnore) continue;
    const int64_t off = (r / c.t) * c.stride_b + (r % c.t) * c.stride_t;
    double m = -INFINITY;
    for (int64_t v = 0; v < V; ++v) {
      z[v] = transform(x.get(off + v), c.temperature, c.softcap);
      m = std::fmax(m, z[v]);
    }
    double s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(z[v] - m);
    const double lse = m + std::log(s);
    double h = 0;
    for (int64_t v = 0; v < V; ++v) {
      p[v] = std::exp(z[v] - lse);
      if (p[v] > 0) h -= p[v] * (z[v] - lse);
    }
    e.lse[r] = lse;
    e.logp[r] = z[y] - lse;
    e.entropy[r] = h;
    for (int64_t v = 0; v < V; ++v) {
      double dz = g[r] * ((v == y ? 1.0 : 0.0) - p[v]);
      if (p[v] > 0) dz -= gh[r] * p[v] * ((z[v] - lse) + h);
      double dx = dz / c.temperature;
      if (c.softcap > 0) {
        const double th = std::tanh(x.get(off + v) / c.softcap);
        dx *= 1.0 - th * th;
      }
      e.grad[r * V + v] = dx;
    }
  }
  return e;
}

Rows rows_of(const Case& c) {
  return c.three_d ? Rows::batched(c.b, c.t, c.stride_b, c.stride_t) : Rows::matrix(c.b * c.t, c.stride_t);
}

// Gradient tolerance for a dtype: the kernel computes in fp32, then rounds to the output dtype.
double grad_rtol(DType d) { return d == DType::kFloat32 ? 1e-4 : d == DType::kBFloat16 ? 8e-3 : 1e-3; }

void run_case(const char* isa, const Case& c, DType dtype, uint32_t seed) {
  const int64_t n = c.b * c.t, V = c.vocab;
  const size_t buf_size = static_cast<size_t>((c.b - 1) * c.stride_b + (c.t - 1) * c.stride_t + V);
  Buffer x(dtype, buf_size);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  for (size_t i = 0; i < buf_size; ++i) x.set(i, nd(rng));
  std::vector<int64_t> labels(n);
  std::uniform_int_distribution<int64_t> pick(0, V - 1);
  for (int64_t r = 0; r < n; ++r) labels[r] = pick(rng);
  // Ignored rows, and a row with masked (-inf) vocabulary entries (not at its label).
  labels[1 % n] = kIgnore;
  if (n > 3) labels[n - 1] = kIgnore;
  {
    const int64_t r = n > 2 ? 2 : 0;
    const int64_t off = (r / c.t) * c.stride_b + (r % c.t) * c.stride_t;
    for (int64_t v = 0; v < V; v += 3)
      if (v != labels[r]) x.set(off + v, -INFINITY);
  }
  std::vector<float> g(n), gh(n);
  for (int64_t r = 0; r < n; ++r) {
    g[r] = nd(rng) / 3.0f;
    gh[r] = nd(rng) / 3.0f;
  }
  const Expected e = reference(c, x, labels, g, gh);
  const Rows rows = rows_of(c);
  char tag[160];
  std::snprintf(tag, sizeof(tag), "[%s %s %s N=%lld V=%lld T=%.2f cap=%.1f]", isa, bond_test::dtype_name(dtype),
                c.three_d ? "3-D" : "2-D", (long long)n, (long long)V, c.temperature, c.softcap);

  // ---- forward with entropy
  std::vector<float> logp(n, -1.0f), lse(n, -1.0f), ent(n, -1.0f);
  cpu::TokenLogprobsFwdParams fp;
  fp.logits = x.data();
  fp.labels = labels.data();
  fp.logp = logp.data();
  fp.lse = lse.data();
  fp.entropy = ent.data();
  fp.dtype = dtype;
  fp.rows = rows;
  fp.vocab = V;
  fp.temperature = static_cast<float>(c.temperature);
  fp.softcap = static_cast<float>(c.softcap);
  fp.ignore_index = kIgnore;
  BOND_CHECK(cpu::token_logprobs_fwd(fp) == kOk, "%s forward status", tag);
  MaxErr el(std::string(tag) + " logp", 2e-5, 2e-6), es(std::string(tag) + " lse", 2e-5, 2e-6),
      eh(std::string(tag) + " entropy", 2e-5, 2e-6);
  for (int64_t r = 0; r < n; ++r) {
    el.add(r, logp[r], e.logp[r]);
    eh.add(r, ent[r], e.entropy[r]);
    if (labels[r] != kIgnore) es.add(r, lse[r], e.lse[r]);
  }
  el.report();
  es.report();
  eh.report();

  // ---- backward with the entropy gradient, into a packed gradient buffer
  const Rows packed = c.three_d ? Rows::batched(c.b, c.t, c.t * V, V) : Rows::matrix(n, V);
  Buffer grad(dtype, static_cast<size_t>(n * V));
  cpu::TokenLogprobsBwdParams bp;
  bp.logits = x.data();
  bp.labels = labels.data();
  bp.lse = lse.data();
  bp.entropy = ent.data();
  bp.grad_logp = g.data();
  bp.grad_entropy = gh.data();
  bp.grad = grad.data();
  bp.dtype = dtype;
  bp.rows = rows;
  bp.grad_rows = packed;
  bp.vocab = V;
  bp.temperature = fp.temperature;
  bp.softcap = fp.softcap;
  bp.ignore_index = kIgnore;
  BOND_CHECK(cpu::token_logprobs_bwd(bp) == kOk, "%s backward status", tag);
  MaxErr eg(std::string(tag) + " grad (logp + entropy)", 2e-6, grad_rtol(dtype));
  for (int64_t i = 0; i < n * V; ++i) eg.add(i, grad.get(i), e.grad[i]);
  eg.report();

  // ---- fused forward+backward (no entropy term), in place into a copy of the logits
  const Expected e0 = reference(c, x, labels, g, std::vector<float>(n, 0.0f));
  Buffer inplace = x;
  std::vector<float> logp2(n, -1.0f);
  cpu::TokenLogprobsFwdBwdParams fb;
  fb.logits = inplace.data();
  fb.labels = labels.data();
  fb.grad_logp = g.data();
  fb.logp = logp2.data();
  fb.grad = inplace.data();
  fb.dtype = dtype;
  fb.rows = rows;
  fb.grad_rows = rows;
  fb.vocab = V;
  fb.temperature = fp.temperature;
  fb.softcap = fp.softcap;
  fb.ignore_index = kIgnore;
  BOND_CHECK(cpu::token_logprobs_fwd_bwd(fb) == kOk, "%s fwd_bwd status", tag);
  MaxErr fl(std::string(tag) + " fwd_bwd logp", 2e-5, 2e-6),
      fg(std::string(tag) + " fwd_bwd grad (in place)", 2e-6, grad_rtol(dtype));
  for (int64_t r = 0; r < n; ++r) {
    fl.add(r, logp2[r], e0.logp[r]);
    const int64_t off = (r / c.t) * c.stride_b + (r % c.t) * c.stride_t;
    for (int64_t v = 0; v < V; ++v) fg.add(r * V + v, inplace.get(off + v), e0.grad[r * V + v]);
  }
  fl.report();
  fg.report();

  // ---- in-place backward without the entropy term equals the out-of-place fused result
  Buffer inplace2 = x;
  bp.logits = inplace2.data();
  bp.grad = inplace2.data();
  bp.grad_rows = rows;
  bp.grad_entropy = nullptr;
  BOND_CHECK(cpu::token_logprobs_bwd(bp) == kOk, "%s in-place backward status", tag);
  MaxErr ig(std::string(tag) + " grad (in place backward)", 2e-6, grad_rtol(dtype));
  for (int64_t r = 0; r < n; ++r) {
    const int64_t off = (r / c.t) * c.stride_b + (r % c.t) * c.stride_t;
    for (int64_t v = 0; v < V; ++v) ig.add(r * V + v, inplace2.get(off + v), e0.grad[r * V + v]);
  }
  ig.report();
}

void test_status_codes() {
  const int64_t n = 4, V = 50;
  std::vector<float> x(n * V, 0.5f), logp(n), lse(n);
  std::vector<int64_t> labels = {3, V, kIgnore, 7};          // row 1 out of range
  for (int64_t v = 0; v < V; ++v) x[2 * V + v] = -INFINITY;  // all -inf, but ignored: fine
  cpu::TokenLogprobsFwdParams p;
  p.logits = x.data();
  p.labels = labels.data();
  p.logp = logp.data();
  p.lse = lse.data();
  p.rows = Rows::matrix(n, V);
  p.vocab = V;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kBadLabel, "label == V must give kBadLabel");
  BOND_CHECK(std::isnan(logp[1]), "the bad row's logp must be NaN, got %g", logp[1]);
  BOND_CHECK(logp[2] == 0.0f, "an ignored all -inf row gives 0, got %g", logp[2]);
  BOND_CHECK(std::fabs(logp[0] + std::log(50.0)) < 1e-5 && std::fabs(logp[3] + std::log(50.0)) < 1e-5,
             "good rows are still computed: %g %g", logp[0], logp[3]);
  labels[1] = -5;  // negative, not ignore_index
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kBadLabel, "label -5 must give kBadLabel");
  labels[1] = 1;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kOk, "all labels valid: kOk");
  labels[2] = 0;  // the all -inf row is no longer ignored
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kAllNegInfRow, "all -inf row with a label: kAllNegInfRow");
  BOND_CHECK(std::isnan(logp[2]), "all -inf row: NaN");

  // The backward and the fused path report a bad label too.
  labels = {3, V + 10, kIgnore, 7};
  std::vector<float> g(n, 1.0f), grad(n * V), lse_ok(n, 0.0f);
  cpu::TokenLogprobsBwdParams b;
  b.logits = x.data();
  b.labels = labels.data();
  b.lse = lse_ok.data();
  b.grad_logp = g.data();
  b.grad = grad.data();
  b.rows = b.grad_rows = Rows::matrix(n, V);
  b.vocab = V;
  BOND_CHECK(cpu::token_logprobs_bwd(b) == kBadLabel, "backward: kBadLabel");
  cpu::TokenLogprobsFwdBwdParams f;
  f.logits = x.data();
  f.labels = labels.data();
  f.grad_logp = g.data();
  f.logp = logp.data();
  f.grad = grad.data();
  f.rows = f.grad_rows = Rows::matrix(n, V);
  f.vocab = V;
  BOND_CHECK(cpu::token_logprobs_fwd_bwd(f) == kBadLabel, "fwd_bwd: kBadLabel");
  // Bad arguments.
  p.temperature = 0.0f;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kBadArgument, "temperature 0 must be rejected");
  p.temperature = 1.0f;
  p.vocab = 0;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kBadArgument, "V = 0 must be rejected");
}

// The split log-sum-exp (shift + lse relative to it) at a temperature where |z| = |x|/T ~ 4e6: the split
// backward stays at fp32 rounding, the whole one (shift nullptr) carries a rounding of |z| in every log p.
// NaN rows give NaN and kOk (the caller names the cause); with a softcap an all -inf row is uniform.
void test_split_lse_and_odd_rows() {
  const int64_t n = 3, V = 200;
  const float temperature = 1e-6f;
  std::vector<float> x(n * V);
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : x) v = 4.0f + 2e-6f * nd(rng);  // differences of O(T) on top of 4: a real distribution
  std::vector<int64_t> labels = {5, 17, 199};
  std::vector<float> logp(n), stats(2 * n), g = {1.0f, -0.5f, 2.0f}, grad(n * V), grad_whole(n * V), lse_whole(n);
  cpu::TokenLogprobsFwdParams p;
  p.logits = x.data();
  p.labels = labels.data();
  p.logp = logp.data();
  p.shift = stats.data();
  p.lse = stats.data() + n;
  p.rows = Rows::matrix(n, V);
  p.vocab = V;
  p.temperature = temperature;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kOk, "split forward status");
  cpu::TokenLogprobsBwdParams b;
  b.logits = x.data();
  b.labels = labels.data();
  b.shift = stats.data();
  b.lse = stats.data() + n;
  b.grad_logp = g.data();
  b.grad = grad.data();
  b.rows = b.grad_rows = Rows::matrix(n, V);
  b.vocab = V;
  b.temperature = temperature;
  BOND_CHECK(cpu::token_logprobs_bwd(b) == kOk, "split backward status");
  for (int64_t r = 0; r < n; ++r) lse_whole[r] = stats[r] / temperature + stats[n + r];
  b.shift = nullptr;
  b.lse = lse_whole.data();
  b.grad = grad_whole.data();
  BOND_CHECK(cpu::token_logprobs_bwd(b) == kOk, "whole backward status");
  double worst_split = 0, worst_whole = 0, scale = 0;
  for (int64_t r = 0; r < n; ++r) {
    double m = -INFINITY, s = 0;
    for (int64_t v = 0; v < V; ++v) m = std::fmax(m, static_cast<double>(x[r * V + v]));
    for (int64_t v = 0; v < V; ++v) s += std::exp((x[r * V + v] - m) / temperature);
    for (int64_t v = 0; v < V; ++v) {
      const double pv = std::exp((x[r * V + v] - m) / temperature) / s;
      const double want = g[r] * ((v == labels[r] ? 1.0 : 0.0) - pv) / temperature;
      scale = std::fmax(scale, std::fabs(want));
      worst_split = std::fmax(worst_split, std::fabs(grad[r * V + v] - want));
      worst_whole = std::fmax(worst_whole, std::fabs(grad_whole[r * V + v] - want));
    }
  }
  BOND_CHECK(worst_split <= 1e-5 * scale, "split backward: max error %g of max |grad| %g", worst_split, scale);
  BOND_CHECK(worst_whole > 1e-3 * scale, "the whole-lse backward was expected to lose |z| rounding: %g of %g",
             worst_whole, scale);

  // NaN rows: all NaN, and all -inf with one NaN, give NaN and kOk (not kAllNegInfRow).
  for (int64_t v = 0; v < V; ++v) x[v] = std::numeric_limits<float>::quiet_NaN();
  for (int64_t v = 0; v < V; ++v) x[V + v] = -INFINITY;
  x[V + 3] = std::numeric_limits<float>::quiet_NaN();
  p.temperature = 1.0f;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kOk, "NaN rows: kOk (the binding names NaN)");
  BOND_CHECK(std::isnan(logp[0]) && std::isnan(logp[1]) && !std::isnan(logp[2]), "NaN rows: NaN log-probs");
  // With a softcap, -inf maps to -c: an all -inf row is uniform.
  for (int64_t v = 0; v < V; ++v) x[v] = -INFINITY;
  x[V + 3] = -INFINITY;
  p.softcap = 3.0f;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kOk, "softcapped all -inf rows: kOk");
  BOND_CHECK(std::fabs(logp[0] + std::log(200.0)) < 1e-5 && std::fabs(logp[1] + std::log(200.0)) < 1e-5,
             "softcapped all -inf rows are uniform: %g %g", logp[0], logp[1]);
  p.softcap = 0.0f;
  BOND_CHECK(cpu::token_logprobs_fwd(p) == kAllNegInfRow, "all -inf rows without a softcap: kAllNegInfRow");
}

// Same bits for any thread count: each row is computed by one thread from that row alone.
void test_determinism() {
  const int64_t n = 64, V = 3001;
  std::vector<float> x(n * V);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 4.0f);
  for (auto& v : x) v = nd(rng);
  std::vector<int64_t> labels(n);
  for (int64_t r = 0; r < n; ++r) labels[r] = (r * 37) % V;
  std::vector<float> a(n), b(n), lse(n), ea(n), eb(n);
  cpu::TokenLogprobsFwdParams p;
  p.logits = x.data();
  p.labels = labels.data();
  p.lse = lse.data();
  p.rows = Rows::matrix(n, V);
  p.vocab = V;
  p.num_threads = 1;
  p.logp = a.data();
  p.entropy = ea.data();
  cpu::token_logprobs_fwd(p);
  p.num_threads = 2;
  p.logp = b.data();
  p.entropy = eb.data();
  cpu::token_logprobs_fwd(p);
  BOND_CHECK(std::memcmp(a.data(), b.data(), n * sizeof(float)) == 0, "logp differs between 1 and 2 threads");
  BOND_CHECK(std::memcmp(ea.data(), eb.data(), n * sizeof(float)) == 0, "entropy differs between 1 and 2 threads");
}

}  // namespace

int main() {
  const DType dtypes[] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  bond_test::for_each_isa([&](const char* isa) {
    uint32_t seed = 11;
    for (DType d : dtypes) {
      // 2-D, odd sizes, padded row stride (a slice of a wider tensor), plain / tempered / softcapped.
      run_case(isa, Case{1, 37, 1031, 0, 1031 + 17, 1.0, 0.0, false}, d, seed++);
      run_case(isa, Case{1, 9, 777, 0, 777, 0.7, 0.0, false}, d, seed++);
      run_case(isa, Case{1, 9, 777, 0, 777, 1.3, 5.0, false}, d, seed++);
      // 3-D (B, T, V) with gaps between both rows and batches, as logits[:, :-1] of a wider tensor would have.
      run_case(isa, Case{3, 5, 517, 6 * (517 + 13), 517 + 13, 1.0, 0.0, true}, d, seed++);
      run_case(isa, Case{2, 4, 300, 5 * 300, 300, 0.5, 30.0, true}, d, seed++);
    }
    // V >= 65536 (more than one 2048-element summation block and past 16-bit index ranges).
    run_case(isa, Case{1, 3, 65543, 0, 65543, 1.0, 0.0, false}, DType::kFloat32, seed++);
    run_case(isa, Case{1, 2, 65543, 0, 65543, 0.9, 0.0, false}, DType::kBFloat16, seed++);
  });
  test_status_codes();
  test_determinism();
  test_split_lse_and_odd_rows();
  return bond_test::finish("test_token_logprobs");
}
