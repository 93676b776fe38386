"""The math of bond_kernels against closed forms (docs/math.md §5-§8), never against itself.

Oracles used here, each independent of the code under test:
- brute-force enumeration of Best-of-N draws with exact ``fractions.Fraction`` arithmetic;
- a 60-digit ``decimal`` evaluation of ``C_N``;
- distribution facts (quantile of a Best-of-N sample ~ Beta(N, 1), J-BOND reward probabilities) checked by
  sampling, with tolerances of ``Z_TOL`` standard errors computed from the exact variance;
- hand-written gradient formulas (plain Python loops) for the BOND / J-BOND estimators;
- ``torch.distributions.Categorical`` for per-token log-probs, entropies and KL divergences.
Everything runs on CPU in fp64 (fp32 where the fp32 path is the point) through the ``torch`` backend.
"""

import itertools
import math
from decimal import Decimal, getcontext
from fractions import Fraction

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import bond_kernels as bk
from bond_kernels import reference as ref

# Sampling tests: 5 standard errors gives a false-failure rate of 6e-7 per assertion (seeds are fixed, so
# a failure is reproducible; the tolerance still bounds how far a wrong formula may hide).
Z_TOL = 5.0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Section 1: the Best-of-N distribution by brute force, with ties
# ----------------------------------------------------------------------------------------------------
# (integer weights of pi_ref, rewards): pi_ref(y) = w_y / sum(w); many ties on purpose.
TIE_SPACES = [
    ([3, 1, 4, 1, 5], [1, 0, 1, 2, 0]),  # 3 reward levels; ties at the top, the middle and the bottom
    ([2, 7, 1, 8], [3, 3, 3, 3]),  # everything ties: Best-of-N is pi_ref (the first draw always wins)
    ([1, 2, 3, 4, 5, 6], [0, 2, 1, 2, 0, 1]),  # every level tied, interleaved so tie order matters
    ([5, 3, 2, 4, 1], [5, 1, 4, 2, 3]),  # distinct rewards (control: C_N is not log N here either)
    ([1, 1, 1, 9], [0, 1, 1, 1]),  # a heavy tied top: the tie correction is far from both 1 and N
]


def _brute_force_bon(weights, rewards, n):
    """Exact P[Best-of-n returns y] by enumerating all K^n ordered draws (ties to the earliest draw)."""
    total = sum(weights)
    probs = [Fraction(w, total) for w in weights]
    out = [Fraction(0)] * len(weights)
    for draws in itertools.product(range(len(weights)), repeat=n):
        winner = draws[0]
        for d in draws[1:]:
            if rewards[d] > rewards[winner]:  # strictly better replaces; a tie stays with the earlier draw
                winner = d
        p = Fraction(1)
        for d in draws:
            p *= probs[d]
        out[winner] += p
    return out


def _exact_quantiles(weights, rewards):
    total = sum(weights)
    p_le = [Fraction(sum(w for w, r2 in zip(weights, rewards) if r2 <= r), total) for r in rewards]
    p_lt = [Fraction(sum(w for w, r2 in zip(weights, rewards) if r2 < r), total) for r in rewards]
    return p_le, p_lt


@pytest.mark.parametrize("space", TIE_SPACES, ids=[f"space{i}" for i in range(len(TIE_SPACES))])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_bon_log_prob_equals_brute_force_enumeration(space, n):
    weights, rewards = space
    exact = _brute_force_bon(weights, rewards, n)
    assert sum(exact) == 1
    total = sum(weights)
    ref_logp = torch.tensor([math.log(w / total) for w in weights], dtype=torch.float64)
    p_le, p_lt = _exact_quantiles(weights, rewards)
    p_le_t = torch.tensor([float(p) for p in p_le], dtype=torch.float64)
    p_lt_t = torch.tensor([float(p) for p in p_lt], dtype=torch.float64)
    got = bk.bon_log_prob(ref_logp, p_le_t, p_lt_t, n)
    assert got.dtype == torch.float64
    want = torch.tensor([math.log(float(p)) for p in exact], dtype=torch.float64)
    # "to rounding": a few ulp of the log-probabilities (|log p| <= 3 here).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)

    # The same through reward_quantiles: the multiset holding reward r_y w_y times IS pi_ref, so the Monte
    # Carlo estimate with smoothing="none" is exact.
    multiset = torch.tensor(
        [float(r) for r, w in zip(rewards, weights) for _ in range(w)], dtype=torch.float64
    )
    q_le, q_lt = bk.reward_quantiles(
        torch.tensor([rewards], dtype=torch.float64), multiset.unsqueeze(0), smoothing="none", backend="torch"
    )
    torch.testing.assert_close(bk.bon_log_prob(ref_logp, q_le[0], q_lt[0], n), want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("n", [1.5, 2.5, 3.7])
def test_bon_log_prob_non_integer_n_matches_closed_form(n):
    """Real N >= 1: pi_BoN = pi_ref * (p_le^N - p_lt^N) / (p_le - p_lt), evaluated in 60-digit decimal."""
    getcontext().prec = 60
    weights, rewards = TIE_SPACES[0]
    total = sum(weights)
    p_le, p_lt = _exact_quantiles(weights, rewards)
    want = []
    for w, le, lt in zip(weights, p_le, p_lt):
        le_d, lt_d = Decimal(le.numerator) / le.denominator, Decimal(lt.numerator) / lt.denominator
        lt_pow = (Decimal(n) * lt_d.ln()).exp() if lt_d > 0 else Decimal(0)
        tie = ((Decimal(n) * le_d.ln()).exp() - lt_pow) / (le_d - lt_d)
        want.append(float((Decimal(w) / total * tie).ln()))
    got = bk.bon_log_prob(
        torch.tensor([math.log(w / total) for w in weights], dtype=torch.float64),
        torch.tensor([float(p) for p in p_le], dtype=torch.float64),
        torch.tensor([float(p) for p in p_lt], dtype=torch.float64),
        n,
    )
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-14)


def test_bon_log_prob_edges():
    """p_lt = 0 gives C_N = 0; p_le = 0 gives -inf for N > 1 and log pi_ref for N = 1; no NaN anywhere."""
    ref_logp = torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64)
    p_le = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)
    p_lt = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    out = bk.bon_log_prob(ref_logp, p_le, p_lt, 3)
    assert out[0].item() == pytest.approx(-1.0 + 2 * math.log(0.5), abs=1e-15)
    assert out[1].item() == -math.inf
    assert out[2].item() == pytest.approx(-3.0 + math.log(3), abs=1e-15)  # all ties: C_N(0) = log N
    out1 = bk.bon_log_prob(ref_logp, p_le, p_lt, 1)
    torch.testing.assert_close(out1, ref_logp, rtol=0, atol=0)
    # Broadcasting with Python numbers; fp32 by default.
    out32 = bk.bon_log_prob(torch.zeros(4), 0.25, 0.125, 2)
    assert out32.dtype == torch.float32 and out32.shape == (4,)
    torch.testing.assert_close(out32, torch.full((4,), math.log(0.25 + 0.125)), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------------
# C_N: exact limits and no cancellation near 0 (60-digit decimal oracle)
# ----------------------------------------------------------------------------------------------------
def _dexpm1(x):
    """expm1 in Decimal without cancellation (Taylor series for |x| < 1)."""
    if abs(x) >= 1:
        return x.exp() - 1
    term = total = x
    j = 1
    while True:
        j += 1
        term = term * x / j
        if abs(term) <= abs(total) * Decimal(10) ** -55:
            return total
        total += term


def _dlog1p(t):
    if t == 0 or t >= Decimal("0.5"):
        return (1 + t).ln()
    term, total, j = t, t, 1
    while True:
        j += 1
        term = -term * t
        if abs(term / j) <= abs(total) * Decimal(10) ** -55:
            return total
        total += term / j


def _c_n_decimal(u, n):
    """C_N(u) to ~55 digits: log1p of (e^u - e^{Nu}) / (1 - e^u), every piece formed without cancellation."""
    getcontext().prec = 60
    u, n = Decimal(u), Decimal(n)
    if u == 0:
        return float(n.ln())
    t = u.exp() * (-_dexpm1((n - 1) * u)) / (-_dexpm1(u))
    return float(_dlog1p(t))


C_N_ORDERS = [1, 1.0001, 1.5, 2, 3, 4.7, 16, 1000]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", C_N_ORDERS)
def test_log_c_n_exact_limits(dtype, n):
    u = torch.tensor([0.0, -0.0, -math.inf], dtype=dtype)
    c = ref.log_c_n(u, n)
    assert c.dtype == dtype
    want_zero = torch.tensor(math.log(n), dtype=dtype)  # log N rounded once to the dtype
    assert c[0] == want_zero and c[1] == want_zero
    assert c[2] == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", C_N_ORDERS)
def test_log_c_n_no_cancellation(dtype, n):
    """Within 4 ulp of the decimal value for u from the subnormal range to -600 (u = -1e-300 included).

    The textbook form log(-expm1(N u)) - log(-expm1(u)) fails this by ~1000 ulp at u = -1e-300 (two logs of
    size 690 whose difference is log N) and returns 0 instead of ~e^u for u < -37 in fp64.
    """
    finfo = torch.finfo(dtype)
    lo = -320 if dtype == torch.float64 else -44
    u = (-torch.logspace(lo, 2.78, 240, dtype=torch.float64)).to(dtype)
    u = torch.cat([u, torch.tensor([-1e-6, -1e-3, -0.5, -math.log(2), -1.0, -20.0], dtype=dtype)])
    u = u[u < 0]
    got = ref.log_c_n(u, n)
    assert torch.isfinite(got).all()
    want = torch.tensor([_c_n_decimal(x, n) for x in u.tolist()], dtype=torch.float64)
    err = (got.to(torch.float64) - want).abs()
    # 4 ulp relative, or below the dtype's smallest subnormal-rounded value where C_N itself underflows.
    allowed = 4 * finfo.eps * want.abs() + finfo.smallest_normal * finfo.eps
    worst = int((err / allowed).argmax())
    assert bool((err <= allowed).all()), (
        f"C_N({u[worst].item()!r}, {n}) = {got[worst].item()!r}, decimal says {want[worst].item()!r}"
    )


# ----------------------------------------------------------------------------------------------------
# Sampling facts with continuous rewards: E[q] = N/(N+1), P[q <= t] = t^N, KL = log N - (N-1)/N
# ----------------------------------------------------------------------------------------------------
SAMPLES = 200_000


def _bon_sample_quantiles(n, seed):
    """Best-of-n of standard-normal rewards via best_of_n_indices; exact quantile = Phi(winner reward)."""
    g = _gen(seed)
    rewards = torch.randn(SAMPLES, n, generator=g, dtype=torch.float64)
    idx = bk.best_of_n_indices(rewards, n)
    assert idx.shape == (SAMPLES, 1) and idx.dtype == torch.int64
    winner = rewards.gather(1, idx).squeeze(1)
    return winner, torch.special.ndtr(winner), g


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_bon_quantile_distribution_by_sampling(n):
    winner, q, g = _bon_sample_quantiles(n, seed=100 + n)
    # q ~ Beta(N, 1): mean N/(N+1), variance N / ((N+1)^2 (N+2)).
    se = math.sqrt(n / ((n + 1) ** 2 * (n + 2)) / SAMPLES)
    assert abs(q.mean().item() - n / (n + 1)) < Z_TOL * se
    for t in (0.25, 0.5, 0.75, 0.9):
        cdf = t**n
        se_t = math.sqrt(cdf * (1 - cdf) / SAMPLES)
        assert abs((q <= t).double().mean().item() - cdf) < Z_TOL * se_t

    # The Monte-Carlo quantile from k reference samples (smoothing="none") is unbiased: E[c/k] = E[q].
    # Its variance is E[q(1-q)]/k + Var(q); the tolerance uses the sample's own standard error.
    k = 16
    refs = torch.randn(SAMPLES, k, generator=g, dtype=torch.float64)
    p_le, p_lt = bk.reward_quantiles(winner.unsqueeze(1), refs, smoothing="none", backend="torch")
    torch.testing.assert_close(p_le, p_lt)  # continuous rewards: no ties
    se_hat = p_le.std().item() / math.sqrt(SAMPLES)
    assert abs(p_le.mean().item() - n / (n + 1)) < Z_TOL * se_hat


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_bon_kl_to_reference_by_sampling(n):
    """KL(pi_BoN || pi_ref) = E_BoN[log pi_BoN - log pi_ref], averaged over Best-of-N samples.

    log pi_BoN - log pi_ref is bon_log_prob(0, q, q, N) with the EXACT quantile q = Phi(reward) (continuous
    rewards: p_lt = p_le, C_N = log N).  -log q ~ Exp(N), so the summand has sd (N-1)/N.
    """
    _, q, _ = _bon_sample_quantiles(n, seed=200 + n)
    log_ratio = bk.bon_log_prob(torch.zeros((), dtype=torch.float64), q, q, n)
    se = (n - 1) / n / math.sqrt(SAMPLES)
    want = math.log(n) - (n - 1) / n
    assert abs(log_ratio.mean().item() - want) <= Z_TOL * se + 1e-15


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_bon_kl_to_reference_by_fine_enumeration(n):
    """Exact enumeration over 2^16 outcomes with distinct rewards and a random (non-uniform) pi_ref.

    The discrete KL differs from log N - (N-1)/N by a discretisation error of second order in the cell
    sizes (measured <= 1.1e-8 here for N <= 8); 1e-6 leaves room while a wrong exponent, a dropped tie
    correction (KL off by ~log N) or an unnormalised pi_BoN fails by orders of magnitude more.
    """
    g = _gen(300 + n)
    k = 1 << 16
    ref_logp = torch.randn(k, generator=g, dtype=torch.float64).log_softmax(0)
    p = ref_logp.exp()
    rewards = torch.randperm(k, generator=g).to(torch.float64)
    order = torch.argsort(rewards)
    p_le = torch.empty_like(p)
    p_le[order] = p[order].cumsum(0)
    p_lt = (p_le - p).clamp_min(0.0)
    log_bon = bk.bon_log_prob(ref_logp, p_le, p_lt, n)
    assert abs(log_bon.exp().sum().item() - 1.0) < 1e-12  # Theorem 1 telescopes to a distribution
    kl = (log_bon.exp() * (log_bon - ref_logp)).sum().item()
    assert abs(kl - (math.log(n) - (n - 1) / n)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# Iterated Best-of-N: BoN(BoN(pi)) = Bo(N^2)(pi)  (docs/math.md §8)
# ----------------------------------------------------------------------------------------------------
def _bon_distribution(probs, rewards, n):
    """Best-of-n of an enumerable distribution through bon_log_prob (exact quantiles, ties to earliest)."""
    le = rewards.unsqueeze(0) <= rewards.unsqueeze(1)  # le[y, y'] = r(y') <= r(y)
    lt = rewards.unsqueeze(0) < rewards.unsqueeze(1)
    p_le = (le * probs).sum(1)
    p_lt = (lt * probs).sum(1)
    return bk.bon_log_prob(probs.log(), p_le, p_lt, n).exp()


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_iterated_best_of_n_equals_best_of_product(ties):
    g = _gen(7)
    k = 40
    probs = torch.randn(k, generator=g, dtype=torch.float64).softmax(0)
    if ties:
        rewards = torch.randint(0, 6, (k,), generator=g).to(torch.float64)
    else:
        rewards = torch.randperm(k, generator=g).to(torch.float64)
    three_rounds = probs
    for _ in range(3):
        three_rounds = _bon_distribution(three_rounds, rewards, 2)
    torch.testing.assert_close(three_rounds, _bon_distribution(probs, rewards, 8), rtol=1e-12, atol=1e-15)
    # Rounds of different sizes compose by multiplication in either order: Bo2(Bo3) = Bo3(Bo2) = Bo6.
    bo6 = _bon_distribution(probs, rewards, 6)
    torch.testing.assert_close(
        _bon_distribution(_bon_distribution(probs, rewards, 3), rewards, 2), bo6, rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        _bon_distribution(_bon_distribution(probs, rewards, 2), rewards, 3), bo6, rtol=1e-12, atol=1e-15
    )


# ----------------------------------------------------------------------------------------------------
# Section 2: reward_quantiles against direct counting
# ----------------------------------------------------------------------------------------------------
def _count_quantiles(rewards, ref_rewards, mask, smoothing):
    """Plain loops over Python floats (the estimator of docs/math.md §5)."""
    out_le, out_lt = [], []
    for b, row in enumerate(rewards):
        refs = [r for j, r in enumerate(ref_rewards[b]) if mask is None or mask[b][j]]
        k = len(refs)
        le_row, lt_row = [], []
        for r in row:
            c_le = sum(1 for x in refs if x <= r)
            c_lt = sum(1 for x in refs if x < r)
            if smoothing == "self":
                le, lt = (c_le + 1) / (k + 1), c_lt / (k + 1)
            else:
                le, lt = c_le / k, c_lt / k
                if smoothing not in ("none", None):
                    le = max(le, smoothing)
            le_row.append(le)
            lt_row.append(lt)
        out_le.append(le_row)
        out_lt.append(lt_row)
    return out_le, out_lt


@pytest.mark.parametrize("smoothing", ["none", "self", 0.05, None])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reward_quantiles_vs_counting(smoothing, masked, dtype):
    g = _gen(11)
    b, n, k = 5, 7, 13
    # Integer-valued rewards: many ties between candidates and references; +-inf at the ends.
    rewards = torch.randint(-3, 4, (b, n), generator=g).to(dtype)
    ref_rewards = torch.randint(-3, 4, (b, k), generator=g).to(dtype)
    rewards[0, 0], rewards[1, 1], ref_rewards[2, 3], ref_rewards[3, 0] = (
        math.inf,
        -math.inf,
        math.inf,
        -math.inf,
    )
    mask = None
    if masked:
        mask = torch.rand(b, k, generator=g) < 0.6
        mask[:, 0] = True  # every row keeps a reference
        mask[4] = False
        mask[4, 5] = True  # a row with exactly one valid reference
    want_le, want_lt = _count_quantiles(
        rewards.tolist(), ref_rewards.tolist(), None if mask is None else mask.tolist(), smoothing
    )
    want_le = torch.tensor(want_le, dtype=dtype)
    want_lt = torch.tensor(want_lt, dtype=dtype)
    for fn in (
        lambda: bk.reward_quantiles(
            rewards, ref_rewards, ref_mask=mask, smoothing=smoothing, backend="torch"
        ),
        lambda: ref.reward_quantiles(rewards, ref_rewards, ref_mask=mask, smoothing=smoothing),
    ):
        p_le, p_lt = fn()
        assert p_le.dtype == dtype and p_le.shape == (b, n)
        torch.testing.assert_close(p_le, want_le, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
        torch.testing.assert_close(p_lt, want_lt, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)
    # Masked-out references must not matter, whatever their value (NaN included: validate skips them).
    if masked:
        poisoned = torch.where(mask, ref_rewards, torch.full_like(ref_rewards, float("nan")))
        p_le2, p_lt2 = bk.reward_quantiles(
            rewards, poisoned, ref_mask=mask, smoothing=smoothing, backend="torch"
        )
        torch.testing.assert_close(p_le2, want_le, rtol=0, atol=1e-7 if dtype == torch.float32 else 1e-15)


def test_reward_quantiles_integer_rewards_are_exact():
    """Integer rewards above 2^24 are distinct in int64 but collide in fp32: the functional keeps them exact."""
    base = 1 << 25
    rewards = torch.tensor([[base + 1]], dtype=torch.int64)
    refs = torch.tensor([[base, base + 1, base + 2, base + 3]], dtype=torch.int64)
    p_le, p_lt = bk.reward_quantiles(rewards, refs, backend="torch")
    assert p_le.item() == 0.5 and p_lt.item() == 0.25


# ----------------------------------------------------------------------------------------------------
# best_of_n_indices: ties to the earliest, against a loop
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,k,n", [(6, 12, 3), (4, 13, 4), (3, 5, 5), (5, 7, 1), (2, 9, 2)])
def test_best_of_n_indices_vs_loop(b, k, n):
    g = _gen(b * 100 + k * 10 + n)
    rewards = torch.randint(0, 3, (b, k), generator=g).to(torch.float32)  # 3 levels: ties everywhere
    rewards[0, : min(n, k)] = 1.0  # one group entirely tied: the first index must win
    got = bk.best_of_n_indices(rewards, n)
    assert got.dtype == torch.int64 and got.shape == (b, k // n)
    want = []
    for row in rewards.tolist():
        groups = []
        for gi in range(k // n):
            best = gi * n
            for j in range(gi * n + 1, gi * n + n):
                if row[j] > row[best]:
                    best = j
            groups.append(best)
        want.append(groups)
    assert got.tolist() == want
    assert got[0, 0].item() == 0


# ----------------------------------------------------------------------------------------------------
# Section 3: bond_loss gradients equal the written estimator
# ----------------------------------------------------------------------------------------------------
def _hand_bond(logp, ref_logp, rewards, ref_rewards, n, beta, baseline, correction, j):
    """d loss / d policy_logp and d loss / d bon_logp from docs/math.md §7, in plain Python."""
    bsz, m = len(logp), len(logp[0])
    ret = [[0.0] * m for _ in range(bsz)]
    for b in range(bsz):
        k = len(ref_rewards[b])
        for i in range(m):
            c_le = sum(1 for x in ref_rewards[b] if x <= rewards[b][i])
            c_lt = sum(1 for x in ref_rewards[b] if x < rewards[b][i])
            p_le, p_lt = (c_le + 1) / (k + 1), c_lt / (k + 1)  # smoothing="self"
            if correction:  # Theorem 1: p_le^(N-1) times the tie sum, i.e. sum_i p_lt^(i-1) p_le^(N-i)
                log_bon = ref_logp[b][i] + math.log(sum(p_lt**a * p_le ** (n - 1 - a) for a in range(n)))
            else:  # the paper's r_BOND: (N-1) log p_le
                log_bon = ref_logp[b][i] + (n - 1) * math.log(p_le)
            ret[b][i] = log_bon - logp[b][i]
    base = [[0.0] * m for _ in range(bsz)]
    flat = [ret[b][i] for b in range(bsz) for i in range(m)]
    for b in range(bsz):
        for i in range(m):
            if isinstance(baseline, list):
                base[b][i] = baseline[b][i]
            elif baseline == "loo" and m > 1:  # mean return of the prompt's other samples
                base[b][i] = (sum(ret[b]) - ret[b][i]) / (m - 1)
            elif baseline == "loo":  # m = 1: mean return of the batch's other prompts
                base[b][i] = (sum(flat) - ret[b][i]) / (len(flat) - 1)
            elif baseline == "mean":
                base[b][i] = sum(ret[b]) / m if m > 1 else sum(flat) / len(flat)
    g_pol = [[-beta * (ret[b][i] - base[b][i]) / (bsz * m) for i in range(m)] for b in range(bsz)]
    g_bon = [[-(1 - beta) / (bsz * j)] * j for _ in range(bsz)]
    return g_pol, g_bon, ret


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("baseline", ["loo", "mean", "none", "tensor"])
@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_bond_loss_gradient_is_the_estimator(m, baseline, correction, beta):
    g = _gen(17 + m)
    bsz, k, j, n = 4, 6, 2, 3
    policy_logp = (-5 * torch.rand(bsz, m, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref_logp = -5 * torch.rand(bsz, m, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 4, (bsz, m), generator=g).to(torch.float64)  # ties with the references
    ref_rewards = torch.randint(0, 4, (bsz, k), generator=g).to(torch.float64)
    bon_logp = (-5 * torch.rand(bsz, j, generator=g, dtype=torch.float64)).requires_grad_(True)
    base_arg = baseline
    if baseline == "tensor":
        base_arg = torch.randn(bsz, m, generator=g, dtype=torch.float64).requires_grad_(True)
    out = bk.bond_loss(
        policy_logp,
        ref_logp,
        rewards,
        ref_rewards,
        bon_logp,
        n=n,
        beta=beta,
        baseline=base_arg,
        correction=correction,
    )
    upstream = torch.randn((), generator=g, dtype=torch.float64)
    out.loss.backward(upstream)

    hand_base = base_arg.tolist() if baseline == "tensor" else baseline
    g_pol, g_bon, ret = _hand_bond(
        policy_logp.tolist(),
        ref_logp.tolist(),
        rewards.tolist(),
        ref_rewards.tolist(),
        n,
        beta,
        hand_base,
        correction,
        j,
    )
    torch.testing.assert_close(
        policy_logp.grad, upstream * torch.tensor(g_pol, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        bon_logp.grad, upstream * torch.tensor(g_bon, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        out.policy_coef, torch.tensor(g_pol, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    if baseline == "tensor":  # the baseline is a constant: no gradient may reach it
        assert base_arg.grad is None
    # Diagnostics: backward-KL estimate mean(log pi - log pi_BoN), forward CE, KL to the reference.
    assert out.backward_kl.item() == pytest.approx(-sum(sum(r) for r in ret) / (bsz * m), rel=1e-12)
    assert out.forward_ce.item() == pytest.approx(-bon_logp.mean().item(), rel=1e-12)
    assert out.kl_to_ref.item() == pytest.approx((policy_logp - ref_logp).mean().item(), rel=1e-12)
    # The loss value itself is sum(coef * logp): its value matters to loggers that print it.
    value = sum(gp * lp for gr, lr in zip(g_pol, policy_logp.tolist()) for gp, lp in zip(gr, lr))
    value += sum(gb * lb for gr, lr in zip(g_bon, bon_logp.tolist()) for gb, lb in zip(gr, lr))
    assert out.loss.item() == pytest.approx(value, rel=1e-12, abs=1e-15)


def test_bond_paper_form_equals_surrogate():
    """-(N-1)(r_BOND - beta_BOND (log pi - log pi_ref)) with beta_BOND = 1/(N-1) is the return R (section 3)."""
    g = _gen(5)
    bsz, m, k, n = 3, 4, 8, 4
    logp = -3 * torch.rand(bsz, m, generator=g, dtype=torch.float64)
    ref_logp = -3 * torch.rand(bsz, m, generator=g, dtype=torch.float64)
    rewards = torch.randn(bsz, m, generator=g, dtype=torch.float64)
    ref_rewards = torch.randn(bsz, k, generator=g, dtype=torch.float64)
    out = bk.bond_loss(logp, ref_logp, rewards, ref_rewards, logp[:, :1], n=n, beta=1.0, baseline="none")
    r_bond = torch.log(out.p_le)
    paper = (n - 1) * (r_bond - (logp - ref_logp) / (n - 1))
    torch.testing.assert_close(out.policy_coef * (bsz * m), -paper, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_expected_gradient_is_the_jeffreys_gradient(beta):
    """E[grad of bond_loss] = grad J_beta(pi, pi_BoN) exactly, by enumerating a tabular policy.

    pi_ref has integer weights, so the multiset of references holding reward r_y w_y times gives EXACT
    quantiles (smoothing="none"); with correction=True the target is the exact pi_BoN of Theorem 1 and
    baseline="none" keeps each sample's estimator unbiased on its own.  The expectation over y ~ pi (backward
    term) and y ~ pi_BoN (forward term) is taken by weighting single-sample losses with those probabilities.
    """
    g = _gen(23)
    kk, n = 7, 3
    weights = [3, 1, 4, 1, 5, 9, 2]
    rewards = torch.tensor([2.0, 0.0, 3.0, 1.0, 3.0, 5.0, 4.0], dtype=torch.float64)  # one tie (2 and 4)
    ref_logp = torch.tensor(weights, dtype=torch.float64).div(sum(weights)).log()
    refs = torch.repeat_interleave(rewards, torch.tensor(weights)).unsqueeze(0)
    z = torch.randn(kk, generator=g, dtype=torch.float64).requires_grad_(True)
    logp = z.log_softmax(0)
    log_bon = _bon_distribution(ref_logp.exp(), rewards, n).log()

    total = torch.zeros((), dtype=torch.float64)
    for y in range(kk):
        args = (ref_logp[y].view(1, 1), rewards[y].view(1, 1), refs)
        back = bk.bond_loss(
            logp[y].view(1, 1),
            *args,
            logp[y].view(1, 1).detach(),
            n=n,
            beta=1.0,
            baseline="none",
            smoothing="none",
            correction=True,
        )
        fwd = bk.bond_loss(
            logp[y].view(1, 1).detach(),
            *args,
            logp[y].view(1, 1),
            n=n,
            beta=0.0,
            baseline="none",
            smoothing="none",
            correction=True,
        )
        torch.testing.assert_close(back.bon_logp_target, log_bon[y].view(1, 1), rtol=1e-13, atol=1e-13)
        total = total + beta * logp[y].exp().detach() * back.loss + (1 - beta) * log_bon[y].exp() * fwd.loss
    (grad_est,) = torch.autograd.grad(total, z, retain_graph=True)

    p = logp.exp()
    jeffreys = (1 - beta) * (log_bon.exp() * (log_bon - logp)).sum() + beta * (p * (logp - log_bon)).sum()
    (grad_exact,) = torch.autograd.grad(jeffreys, z)
    torch.testing.assert_close(grad_est, grad_exact, rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------------------------------
# Section 4: jbond_loss gradients, the sign of gamma, and the J-BOND reward facts
# ----------------------------------------------------------------------------------------------------
def _hand_jbond(logp, anchor_logp, rewards, anchor_rewards, beta, gamma, penalty, strict):
    bsz = len(logp)
    r_j = []
    for b in range(bsz):
        worst = min(anchor_rewards[b])
        bad = rewards[b] < worst if strict else rewards[b] <= worst
        r_j.append(-penalty if bad else 0.0)
    ret = [r_j[b] - (logp[b] - anchor_logp[b]) for b in range(bsz)]
    base = [(sum(ret) - ret[b]) / (bsz - 1) if bsz > 1 else 0.0 for b in range(bsz)]
    g_pol = [(-beta * (ret[b] - base[b]) + gamma * (logp[b] - anchor_logp[b])) / bsz for b in range(bsz)]
    g_best = [-(1 - beta) / bsz] * bsz
    return g_pol, g_best, r_j


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("beta,gamma", [(0.5, 0.0), (0.2, 0.7), (1.0, 2.0), (0.0, 0.5)])
@pytest.mark.parametrize("bsz", [1, 9])
def test_jbond_loss_gradient_is_the_estimator(strict, beta, gamma, bsz):
    g = _gen(31 + bsz)
    logp = (-4 * torch.rand(bsz, generator=g, dtype=torch.float64)).requires_grad_(True)
    anchor_logp = -4 * torch.rand(bsz, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 3, (bsz,), generator=g).to(
        torch.float64
    )  # ties with the anchors: strict matters
    anchor_rewards = torch.randint(0, 3, (bsz, 2), generator=g).to(torch.float64)
    best = (-4 * torch.rand(bsz, generator=g, dtype=torch.float64)).requires_grad_(True)
    penalty = math.log(16)
    out = bk.jbond_loss(
        logp, anchor_logp, rewards, anchor_rewards, best, beta=beta, gamma=gamma, strict=strict
    )
    upstream = torch.randn((), generator=g, dtype=torch.float64)
    out.loss.backward(upstream)
    g_pol, g_best, r_j = _hand_jbond(
        logp.tolist(),
        anchor_logp.tolist(),
        rewards.tolist(),
        anchor_rewards.tolist(),
        beta,
        gamma,
        penalty,
        strict,
    )
    torch.testing.assert_close(
        logp.grad, upstream * torch.tensor(g_pol, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(
        best.grad, upstream * torch.tensor(g_best, dtype=torch.float64), rtol=1e-12, atol=1e-15
    )
    assert out.jbond_reward.tolist() == r_j
    assert out.reward_mean.item() == pytest.approx(sum(r_j) / bsz, rel=1e-12, abs=1e-15)
    assert out.penalised_frac.item() == pytest.approx(sum(r < 0 for r in r_j) / bsz, rel=1e-12, abs=1e-15)
    assert out.kl_to_anchor.item() == pytest.approx((logp - anchor_logp).mean().item(), rel=1e-12, abs=1e-15)
    assert out.forward_ce.item() == pytest.approx(-best.mean().item(), rel=1e-12)


def test_jbond_gamma_term_decreases_kl_to_anchor():
    """The gamma term alone (beta = 0, best_anchor_logp constant) pulls pi towards the anchor.

    Per sample: one gradient step lowers log pi(y) - log pi_anchor(y) where it is positive and raises it where
    negative.  In expectation over y ~ pi its gradient is exactly gamma * grad KL(pi || pi_anchor), and a
    small step lowers that KL (the paper's Algorithm 2 prints the opposite sign; docs/math.md §8).
    """
    g = _gen(41)
    v, gamma, lr = 8, 0.8, 0.05
    z0 = torch.randn(v, generator=g, dtype=torch.float64)
    anchor = torch.randn(v, generator=g, dtype=torch.float64).log_softmax(0)
    zero = torch.zeros(1, dtype=torch.float64)
    log_ratio0 = z0.log_softmax(0) - anchor
    assert (log_ratio0 > 0).any() and (log_ratio0 < 0).any()

    def gamma_loss(z, y):
        logp = z.log_softmax(0)
        return bk.jbond_loss(
            logp[y].view(1),
            anchor[y].view(1),
            zero,
            torch.zeros(1, 2, dtype=torch.float64),
            zero,
            beta=0.0,
            gamma=gamma,
        ).loss

    for y in range(v):
        z = z0.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(gamma_loss(z, y), z)
        moved = (z0 - lr * grad).log_softmax(0)[y] - anchor[y]
        assert abs(moved.item()) < abs(log_ratio0[y].item()), f"sample {y}: |log pi - log pi_anchor| grew"

    z = z0.clone().requires_grad_(True)
    p = z.log_softmax(0).exp().detach()
    expected = sum(p[y] * gamma_loss(z, y) for y in range(v))
    (grad_expected,) = torch.autograd.grad(expected, z)
    z2 = z0.clone().requires_grad_(True)
    logp2 = z2.log_softmax(0)
    kl = (logp2.exp() * (logp2 - anchor)).sum()
    (grad_kl,) = torch.autograd.grad(kl, z2)
    torch.testing.assert_close(grad_expected, gamma * grad_kl, rtol=1e-12, atol=1e-14)
    stepped = (z0 - lr * grad_expected).log_softmax(0)
    assert (stepped.exp() * (stepped - anchor)).sum() < kl.detach()


JBOND_SAMPLES = 400_000


@pytest.mark.parametrize("policy", ["anchor", "best_of_2"])
def test_jbond_reward_facts_by_sampling(policy):
    """Continuous rewards: pi = pi_anchor gives P[r_J < 0] = 1/3, E[r_J] = -log16/3; Best-of-2 gives 1/6.

    The policy sample's anchor quantile U is uniform (pi = anchor) or Beta(2, 1) (Best-of-2), and
    P[r_J < 0 | U] = (1 - U)^2: integrating gives 1/3 and 1/6.  Tolerance: Z_TOL binomial standard errors.
    """
    g = _gen(51 if policy == "anchor" else 52)
    anchor_rewards = torch.rand(JBOND_SAMPLES, 2, generator=g, dtype=torch.float64)
    draws = torch.rand(JBOND_SAMPLES, 2, generator=g, dtype=torch.float64)
    if policy == "anchor":
        rewards, p_pen = draws[:, 0], 1.0 / 3.0
    else:
        rewards, p_pen = draws.gather(1, bk.best_of_n_indices(draws, 2)).squeeze(1), 1.0 / 6.0
    zeros = torch.zeros(JBOND_SAMPLES, dtype=torch.float64)
    out = bk.jbond_loss(zeros, zeros, rewards, anchor_rewards, zeros)
    se = math.sqrt(p_pen * (1 - p_pen) / JBOND_SAMPLES)
    assert abs(out.penalised_frac.item() - p_pen) < Z_TOL * se
    assert abs(out.reward_mean.item() + math.log(16) * p_pen) < Z_TOL * math.log(16) * se
    if policy == "best_of_2":
        assert out.reward_mean.item() == pytest.approx(-0.462, abs=0.005)
    else:
        assert out.reward_mean.item() == pytest.approx(-0.924, abs=0.005)


def test_jbond_backward_only_fixed_point_by_sampling():
    """docs/math.md §11: the maximiser of E_pi[r_J] - KL(pi || pi_anchor) is
    pi* ∝ pi_anchor · exp(-log16 · (1 - U)^2), U the anchor quantile of y, about 0.209 nats from the anchor
    with E[U] ≈ 0.676 (Best-of-2: 0.193, 2/3).

    Sampled: the J-BOND reward of jbond_loss, averaged per bin of U, estimates E[r_J | U]; it must match
    -log16·(1 - U)^2 within Z_TOL standard errors, and the tilted distribution built from those sampled
    averages (not from the formula) must land on the stated KL and E[U]."""
    g = _gen(53)
    samples, bins = 400_000, 40
    u = torch.rand(samples, generator=g, dtype=torch.float64)  # continuous rewards: r(y) = U under pi_anchor
    anchor_rewards = torch.rand(samples, 2, generator=g, dtype=torch.float64)
    zeros = torch.zeros(samples, dtype=torch.float64)
    r_j = bk.jbond_loss(zeros, zeros, u, anchor_rewards, zeros).jbond_reward
    idx = (u * bins).long().clamp_(max=bins - 1)
    count = torch.bincount(idx, minlength=bins).double()
    mean = torch.bincount(idx, weights=r_j, minlength=bins) / count
    centre = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    lo, hi = centre - 0.5 / bins, centre + 0.5 / bins
    # exact bin average of -log16 (1-U)^2 over [lo, hi)
    want = -math.log(16) * ((1 - lo) ** 3 - (1 - hi) ** 3) / (3 / bins)
    p_bad = -want / math.log(16)
    se = math.log(16) * torch.sqrt(p_bad * (1 - p_bad) / count)
    assert torch.all((mean - want).abs() <= Z_TOL * se + 1e-12), (mean - want).abs().max()
    # pi*(bin) ∝ exp(E[r_J | bin]) under the uniform anchor: KL(pi* || anchor) and E_pi*[U]
    w = torch.exp(mean)
    p = w / w.sum()
    kl = float((p * torch.log(p * bins)).sum())
    e_u = float((p * centre).sum())
    assert kl == pytest.approx(0.209, abs=0.006)
    assert e_u == pytest.approx(0.676, abs=0.004)
    assert kl > math.log(2) - 0.5 and e_u > 2 / 3  # a little past exact Best-of-2 (0.193 nats, 2/3)


# ----------------------------------------------------------------------------------------------------
# Per-token log-probs and Jeffreys divergence against torch.distributions
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 4.0)])
def test_token_logprobs_vs_categorical(temperature, softcap):
    g = _gen(61)
    shape, v = (3, 5), 37
    x = 3 * torch.randn(*shape, v, generator=g, dtype=torch.float64)
    x[0, 1, :5] = -math.inf  # a masked vocabulary slice
    labels = torch.randint(5, v, shape, generator=g)
    labels[1, 2] = labels[2, 0] = -100  # ignored positions
    x[2, 0] = -math.inf  # an all -inf row is fine when its label is ignored
    x = x.requires_grad_(True)
    logp, ent = bk.token_logprobs(
        x, labels, temperature=temperature, softcap=softcap, return_entropy=True, backend="torch"
    )
    assert logp.dtype == torch.float64 and logp.shape == shape

    keep = labels != -100
    with torch.no_grad():
        xs = x.detach()
        z = (softcap * torch.tanh(xs / softcap) if softcap else xs) / temperature
        z_safe = torch.where(keep.unsqueeze(-1), z, torch.zeros_like(z))
        dist = Categorical(logits=z_safe)
        want_logp = torch.where(keep, dist.log_prob(labels.clamp_min(0)), torch.zeros_like(logp))
        want_ent = torch.where(keep, dist.entropy(), torch.zeros_like(ent))
    torch.testing.assert_close(logp.detach(), want_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent.detach(), want_ent, rtol=1e-12, atol=1e-12)

    # Gradient with random upstream for both outputs: (g_l (onehot - p) - g_H p (log p + H)) / T * d softcap.
    g_l = torch.randn(shape, generator=g, dtype=torch.float64)
    g_h = torch.randn(shape, generator=g, dtype=torch.float64)
    torch.autograd.backward([logp, ent], [g_l, g_h])
    with torch.no_grad():
        p = dist.probs
        logp_all = torch.where(p > 0, dist.logits, torch.zeros_like(p))
        onehot = torch.nn.functional.one_hot(labels.clamp_min(0), v).to(torch.float64)
        dz = g_l.unsqueeze(-1) * (onehot - p) - g_h.unsqueeze(-1) * p * (logp_all + want_ent.unsqueeze(-1))
        dx = dz / temperature
        if softcap:
            dx = dx * (1 - torch.tanh(xs / softcap) ** 2)
        dx = torch.where(keep.unsqueeze(-1), dx, torch.zeros_like(dx))
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, dx, rtol=1e-10, atol=1e-12)


def test_sequence_logprobs_padded_and_packed_vs_loop():
    g = _gen(71)
    bsz, t, v = 3, 6, 11
    x = torch.randn(bsz, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (bsz, t), generator=g)
    labels[0, 4:] = -100
    labels[2] = -100  # an all-ignored sequence sums to 0
    padded = bk.sequence_logprobs(x, labels, backend="torch")
    want = []
    for b in range(bsz):
        s = 0.0
        for i in range(t):
            if labels[b, i] != -100:
                s += Categorical(logits=x[b, i]).log_prob(labels[b, i]).item()
        want.append(s)
    torch.testing.assert_close(padded, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)

    lengths = [4, 0, 7, 2]  # an empty sequence in the middle
    total = sum(lengths)
    xp = torch.randn(total, v, generator=g, dtype=torch.float64)
    lp = torch.randint(0, v, (total,), generator=g)
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32)
    packed = bk.sequence_logprobs(xp, lp, cu_seqlens=cu, backend="torch")
    want = [
        sum(Categorical(logits=xp[i]).log_prob(lp[i]).item() for i in range(cu[b], cu[b + 1]))
        for b in range(4)
    ]
    torch.testing.assert_close(packed, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.0, 1.0), (1.0, 0.8), (0.3, 1.7)])
def test_token_jeffreys_vs_categorical_kl(beta, temperature):
    g = _gen(81)
    shape, v = (4, 3), 29
    pol = (2 * torch.randn(*shape, v, generator=g, dtype=torch.float64)).requires_grad_(True)
    anc = 2 * torch.randn(*shape, v, generator=g, dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[1, 2] = True
    div = bk.token_jeffreys(pol, anc, beta=beta, temperature=temperature, ignore_mask=mask, backend="torch")
    assert div.dtype == torch.float64 and div.shape == shape

    # Independent implementation, differentiated by autograd on its own graph.
    pol2 = pol.detach().clone().requires_grad_(True)
    p = Categorical(logits=pol2 / temperature)
    q = Categorical(logits=anc / temperature)
    want = beta * kl_divergence(p, q) + (1 - beta) * kl_divergence(q, p)
    want = torch.where(mask, torch.zeros_like(want), want)
    torch.testing.assert_close(div.detach(), want.detach(), rtol=1e-12, atol=1e-13)
    assert (div.detach() >= 0).all()

    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    div.backward(upstream)
    want.backward(upstream)
    torch.testing.assert_close(pol.grad, pol2.grad, rtol=1e-10, atol=1e-12)
    assert (pol.grad[1, 2] == 0).all()
    # And the closed form of the reference's docstring.
    with torch.no_grad():
        pp, qq = p.probs, q.probs
        lp, lq = pp.log(), qq.log()
        kl_pq = (pp * (lp - lq)).sum(-1, keepdim=True)
        closed = (beta * pp * (lp - lq - kl_pq) + (1 - beta) * (pp - qq)) / temperature
        closed = torch.where(mask.unsqueeze(-1), torch.zeros_like(closed), closed) * upstream.unsqueeze(-1)
    torch.testing.assert_close(pol.grad, closed, rtol=1e-10, atol=1e-12)
