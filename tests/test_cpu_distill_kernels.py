"""The C++ kernels of ``linear_token_jeffreys``'s cpu backend, each against the torch tile path it replaces.

The forward's per-tile fold, the backward's tile gradient (Jeffreys convention and generalised JSD) and the
generalised JSD's second pass (``csrc/cpu/linear_token_jeffreys.cpp``), called as the engine calls them
(``ops/linear_token_jeffreys.py``: ``cpu_tile_*`` against ``torch_tile_*``), with every instruction set
this CPU has, ragged tiles wider than the kernels' 512-entry partial sums, softcaps, temperatures, ignored
rows, -inf logits, strided tiles and the binding's argument checks.  Small enough for the sanitizer job
(Makefile ASAN_TESTS).
"""

import math

import pytest
import torch

from bond_kernels import _ext
from bond_kernels.ops import linear_token_jeffreys as engine

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
CPU = torch.device("cpu")


def _every_isa():
    """Yields each instruction set this CPU supports, active in turn (restored afterwards)."""
    cpu = _ext.require().cpu
    active = cpu._isa()
    try:
        for isa in cpu._supported_isas():
            cpu._set_isa(isa)
            yield isa
    finally:
        cpu._set_isa(active)


def _fold_case(n, widths, temperature, cap_s, cap_t):
    # the Triton fold test's inputs: ramps so that the maxes grow from tile to tile (the running sums are
    # rescaled), words masked in both heads (-inf without a softcap, -cap with one), a row of bias alone
    v = sum(widths)
    hs, ws = torch.randn(n, 5), torch.randn(v, 5) * 2
    ht, wt = torch.randn(n, 8), torch.randn(v, 8) * 2
    bs, bt = torch.randn(v) + torch.linspace(0, 2, v), torch.randn(v) * 0.5 + torch.linspace(0, 3, v)
    bs[[3, 170, 200]] = bt[[3, 170, 200]] = float("-inf")
    student = engine.Head(hs, ws, bs, cap_s, temperature)
    teacher = engine.Head(ht, wt, bt, cap_t, temperature)
    student.hidden[2] = 0.0
    return student, teacher


@pytest.mark.parametrize("with_cross", [True, False], ids=["cross", "lse-only"])
@pytest.mark.parametrize(
    "temperature,cap_s,cap_t",
    [(1.0, 0.0, 0.0), (0.7, 5.0, 30.0), (1.3, 0.0, 8.0)],
    ids=["plain", "caps", "t-cap"],
)
def test_cpu_tile_fold_matches_the_torch_fold(with_cross, temperature, cap_s, cap_t):
    # The C++ per-tile fold (as the engine calls it, and with softcaps applied by torch first) against the
    # torch fold it replaces, with every instruction set this CPU has: four tiles of different widths (1100 crosses
    # the kernel's 512-entry partial sums; 37 rows × 1100 columns run the OpenMP path), -inf entries, growing
    # maxes, a tile's rows folded into a state that is already set.
    n, widths = 37, (150, 64, 1100, 91)
    student, teacher = _fold_case(n, widths, temperature, cap_s, cap_t)
    cpu = _ext.require().cpu
    active = cpu._isa()
    try:
        for isa in cpu._supported_isas():
            cpu._set_isa(isa)
            want, got, capped = (engine._new_state(n, torch.device("cpu")) for _ in range(3))
            c0 = 0
            for w in widths:
                engine.torch_tile_fold(want, student, teacher, c0, c0 + w, with_cross)
                engine.cpu_tile_fold(got, student, teacher, c0, c0 + w, with_cross)
                # the same logits capped by torch's tanh, handed to the kernel without its softcap
                xs, _ = student.capped(student.matmul(c0, c0 + w))
                xt, _ = teacher.capped(teacher.matmul(c0, c0 + w))
                cpu.linear_jeffreys_tile_fold(capped, xs, xt, temperature, 0.0, 0.0, with_cross)
                c0 += w
            rows = [0, 1, 2, 4, 5] + ([3, 6] if with_cross else [])
            torch.testing.assert_close(
                capped[rows],
                want[rows],
                rtol=2e-5,
                atol=2e-5,
                msg=lambda m, isa=isa: f"{isa}, torch caps: {m}",
            )
            torch.testing.assert_close(
                got[rows], want[rows], rtol=2e-5, atol=2e-5, msg=lambda m, isa=isa: f"{isa}: {m}"
            )
            assert torch.isfinite(got[1]).all() and (got[1] > 0).all()
            if not with_cross:  # the cross terms are left as they were
                assert torch.equal(got[[3, 6]], torch.zeros(2, n))
    finally:
        cpu._set_isa(active)


def test_cpu_tile_fold_strides_and_bad_input():
    # A column slice of wider rows (row stride > C) folds as its contiguous copy, bit for bit; an all -inf
    # row (no softcap) keeps the empty state; the binding names the argument it rejects.
    fold = _ext.require().cpu.linear_jeffreys_tile_fold
    x, y = torch.randn(5, 300) * 3, torch.randn(5, 310) * 3
    x[4] = y[4] = float("-inf")
    a, b = engine._new_state(5, torch.device("cpu")), engine._new_state(5, torch.device("cpu"))
    fold(a, x[:, 7:207], y[:, 20:220], 0.8, 0.0, 0.0, True)
    fold(b, x[:, 7:207].contiguous(), y[:, 20:220].contiguous(), 0.8, 0.0, 0.0, True)
    assert torch.equal(a, b)
    assert torch.equal(a[:, 4], engine._new_state(1, torch.device("cpu"))[:, 0])
    good = (engine._new_state(5, torch.device("cpu")), torch.zeros(5, 8), torch.zeros(5, 8))
    for args, exc, words in [
        ((torch.zeros(6, 5), *good[1:]), ValueError, "state must have shape"),
        ((good[0], good[1].double(), good[2]), TypeError, "student must be float32"),
        ((good[0], good[1], torch.zeros(5, 9)), ValueError, "teacher must have student's shape"),
        ((good[0], good[1], torch.zeros(8, 5).T), ValueError, "teacher must have last stride 1"),
    ]:
        with pytest.raises(exc, match=words):
            fold(*args, 1.0, 0.0, 0.0, True)
    with pytest.raises(ValueError, match="cap_t"):
        fold(*good, 1.0, 0.0, -1.0, True)


def _grad_case(mode, beta, temperature, cap_s, cap_t, n=37, v=1400):
    """Heads over v words with the full rows' statistics from the torch passes: words masked in both heads,
    an ignored row holding NaN (coef 0), random upstream coefficients."""
    student, teacher = _fold_case(n, (v,), temperature, cap_s, cap_t)
    if cap_s and not cap_t:  # the student's masked words are -cap_s: the teacher must give them mass too
        teacher.bias[[3, 170, 200]] = 0.0
    state = engine._new_state(n, CPU)
    engine.torch_tile_fold(state, student, teacher, 0, v, True)
    lse_s = state[0] + torch.log(state[1])
    lse_t = state[4] + torch.log(state[5])
    if mode == "gjsd":
        _, aux = engine.gjsd_pass(student, teacher, lse_s, lse_t, beta, n, v, 512)
    else:
        aux = engine.jeffreys_stats(student, teacher, n, v, 512, engine.TORCH)[2]
    keep = torch.rand(n) > 0.2
    keep[5], keep[6] = False, True
    coef = torch.where(keep, torch.randn(n), torch.zeros(()))
    student.hidden[5] = float("nan")  # an ignored row: exact zeros, its NaN stays out
    none = torch.empty(0, dtype=torch.bool)
    return student, teacher, engine._TileGrad(mode, beta, lse_s, lse_t, aux, coef, keep, none)


@pytest.mark.parametrize(
    "mode,beta", [("jeffreys", 0.3), ("jeffreys", 0.0), ("kl", 1.0), ("gjsd", 0.4), ("gjsd", 0.9)]
)
@pytest.mark.parametrize(
    "temperature,cap_s,cap_t",
    [(1.0, 0.0, 0.0), (0.7, 5.0, 30.0), (1.3, 0.0, 8.0), (0.8, 6.0, 0.0)],
    ids=["plain", "caps", "t-cap", "s-cap"],
)
def test_cpu_tile_grad_matches_the_torch_gradient(mode, beta, temperature, cap_s, cap_t):
    # The C++ tile gradient (one sweep over the two raw tiles, in the engine's scratch buffer) against the
    # torch path it replaces, on ragged column slices (the statistics are the whole rows'), with every ISA.
    student, teacher, grad = _grad_case(mode, beta, temperature, cap_s, cap_t)
    for isa in _every_isa():
        for c0, c1 in [(0, 1400), (37, 1251), (1300, 1397)]:
            want = engine.torch_tile_grad(engine.TORCH, student, teacher, c0, c1, grad)
            got = engine.cpu_tile_grad(engine.CPU, student, teacher, c0, c1, grad).clone()
            assert got.shape == want.shape and got.dtype == torch.float32
            assert torch.equal(got[5], torch.zeros_like(got[5])), isa
            assert torch.equal(got[~grad.keep], torch.zeros_like(got[~grad.keep])), isa
            assert want.abs().max() > 1e-5  # the comparison is not of zeros
            # atol 1e-5 of the largest entry: each entry is a difference of terms of size s·|log s − log m|
            # (up to ~20x the entry), each side rounding its own log m (a wrong formula is off by O(1))
            torch.testing.assert_close(
                got,
                want,
                rtol=1e-4,
                atol=1e-5 * want.abs().max().item(),
                msg=lambda m, isa=isa, c=(c0, c1): f"{isa} {c}: {m}",
            )


@pytest.mark.parametrize("beta", [0.5, 0.1, 0.95])
@pytest.mark.parametrize(
    "temperature,cap_s,cap_t",
    [(1.0, 0.0, 0.0), (0.7, 5.0, 30.0), (1.3, 0.0, 8.0)],
    ids=["plain", "caps", "t-cap"],
)
def test_cpu_tile_gjsd_matches_the_torch_pass(beta, temperature, cap_s, cap_t):
    # The generalised JSD's second pass (one C++ sweep per tile) against the torch pass, summed over four
    # tiles of different widths, with every ISA; words masked in one head only (-inf without a softcap:
    # one distribution gives the word 0, the mixture does not) and a row whose hidden state is NaN (NaN out,
    # as torch, not a silent 0).
    n, widths = 37, (150, 64, 1100, 91)
    student, teacher = _fold_case(n, widths, temperature, cap_s, cap_t)
    student.bias[[9, 400]] = float("-inf")
    teacher.bias[[11, 1200]] = float("-inf")
    student.hidden[7] = float("nan")
    v = sum(widths)
    state = engine._new_state(n, CPU)
    engine.torch_tile_fold(state, student, teacher, 0, v, True)
    lse_s, lse_t = state[0] + torch.log(state[1]), state[4] + torch.log(state[5])
    for isa in _every_isa():
        want, got = torch.zeros(2, n), torch.zeros(2, n)
        c0 = 0
        for w in widths:
            engine.torch_tile_gjsd(want, student, teacher, c0, c0 + w, lse_s, lse_t, beta)
            engine.cpu_tile_gjsd(got, student, teacher, c0, c0 + w, lse_s, lse_t, beta)
            c0 += w
        assert torch.isnan(got[:, 7]).all() and torch.isnan(want[:, 7]).all(), isa
        rows = [r for r in range(n) if r != 7]
        assert (want[:, rows] > 1e-4).all()  # both KLs of the mixture are positive: not a comparison of zeros
        torch.testing.assert_close(
            got[:, rows], want[:, rows], rtol=2e-5, atol=1e-6, msg=lambda m, isa=isa: f"{isa}: {m}"
        )
    # the whole second pass through TileOps: (D, KL(s‖m)) as the torch pass gives them
    d_cpu, kl_cpu = engine.gjsd_pass(student, teacher, lse_s, lse_t, beta, n, v, 256, tiles=engine.CPU)
    d_torch, kl_torch = engine.gjsd_pass(student, teacher, lse_s, lse_t, beta, n, v, 256)
    torch.testing.assert_close(d_cpu[rows], d_torch[rows], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(kl_cpu[rows], kl_torch[rows], rtol=2e-5, atol=1e-6)


def test_cpu_tile_gjsd_small_beta_against_fp64():
    # β = 1e-3 and a peaked student (log s ≈ 0 at one word): log m = log s + log(1 − β) + log1p(e) with
    # e ≈ 1e-3, and KL(s‖m) is a sum of such differences, so log1p must keep its relative precision for
    # small e (a plain log of the rounded 1 + e is off by ~6e-8 absolute, 6e-5 of the result here).
    cpu = _ext.require().cpu
    n, v, beta = 8, 64, 1e-3
    zs = torch.randn(n, v) - 12.0
    zs[:, 3] = 0.0
    zt = torch.randn(n, v)
    lse_s, lse_t = torch.logsumexp(zs.double(), 1), torch.logsumexp(zt.double(), 1)
    ls, lt = zs.double() - lse_s[:, None], zt.double() - lse_t[:, None]
    lm = torch.logaddexp(ls + math.log1p(-beta), lt + math.log(beta))
    want = torch.stack([(lt.exp() * (lt - lm)).sum(1), (ls.exp() * (ls - lm)).sum(1)])
    for isa in _every_isa():
        got = torch.zeros(2, n)
        cpu.linear_jeffreys_tile_gjsd(got, zs, zt, lse_s.float(), lse_t.float(), 1.0, 0.0, 0.0, beta)
        torch.testing.assert_close(
            got.double(), want, rtol=5e-6, atol=0.0, msg=lambda m, isa=isa: f"{isa}: {m}"
        )


def _rows_args(n=5, width=200):
    x, y = torch.randn(n, 300) * 3, torch.randn(n, 310) * 3
    lse_s = torch.logsumexp(x[:, 7 : 7 + width] / 0.8, 1) + 1.0  # a tile of wider rows: lse above the tile's
    lse_t = torch.logsumexp(y[:, 20 : 20 + width] / 0.8, 1) + 1.0
    return x[:, 7 : 7 + width], y[:, 20 : 20 + width], lse_s, lse_t


@pytest.mark.parametrize("gjsd,beta", [(True, 0.5), (False, 0.3)], ids=["gjsd", "jeffreys"])
def test_cpu_tile_grad_and_gjsd_strides(gjsd, beta):
    # Column slices of wider rows (row strides > C) give what their contiguous copies give, bit for bit, and
    # the gradient written into a column slice of a wider buffer leaves the other columns alone.
    cpu = _ext.require().cpu
    xs, xt, lse_s, lse_t = _rows_args()
    aux, coef = torch.rand(5), torch.randn(5)
    args = (lse_s, lse_t, aux, coef, 0.8, 0.0, 0.0, beta, gjsd)
    a = cpu.linear_jeffreys_tile_grad(xs, xt, *args)
    b = cpu.linear_jeffreys_tile_grad(xs.contiguous(), xt.contiguous(), *args)
    assert torch.equal(a, b) and a.abs().max() > 0
    wide = torch.full((5, 230), 7.0)
    out = cpu.linear_jeffreys_tile_grad(xs, xt, *args, out=wide[:, 10:210])
    assert out.data_ptr() == wide[:, 10:210].data_ptr()
    assert torch.equal(wide[:, 10:210], a)
    assert (wide[:, :10] == 7.0).all() and (wide[:, 210:] == 7.0).all()
    if gjsd:
        k1, k2 = torch.zeros(2, 5), torch.zeros(2, 5)
        cpu.linear_jeffreys_tile_gjsd(k1, xs, xt, lse_s, lse_t, 0.8, 0.0, 0.0, beta)
        cpu.linear_jeffreys_tile_gjsd(k2, xs.contiguous(), xt.contiguous(), lse_s, lse_t, 0.8, 0.0, 0.0, beta)
        assert torch.equal(k1, k2) and (k1 > 0).all()
        # it adds to what kl holds
        cpu.linear_jeffreys_tile_gjsd(k1, xs, xt, lse_s, lse_t, 0.8, 0.0, 0.0, beta)
        assert torch.equal(k1, 2 * k2)


def test_cpu_tile_grad_and_gjsd_bad_input():
    # The bindings name the argument they reject (ValueError for values and shapes, TypeError for dtypes).
    cpu = _ext.require().cpu
    xs, xt, lse_s, lse_t = (t.contiguous() for t in _rows_args())
    aux, coef = torch.rand(5), torch.randn(5)

    def grad(**over):
        a = dict(student=xs, teacher=xt, lse_s=lse_s, lse_t=lse_t, aux=aux, coef=coef, temperature=1.0)
        a.update(cap_s=0.0, cap_t=0.0, beta=0.5, gjsd=True)
        a.update(over)
        return cpu.linear_jeffreys_tile_grad(**a)

    def second(**over):
        a = dict(kl=torch.zeros(2, 5), student=xs, teacher=xt, lse_s=lse_s, lse_t=lse_t, temperature=1.0)
        a.update(cap_s=0.0, cap_t=0.0, beta=0.5)
        a.update(over)
        return cpu.linear_jeffreys_tile_gjsd(**a)

    for call, over, exc, words in [
        (grad, dict(beta=0.0), ValueError, r"beta must lie in \(0, 1\)"),
        (grad, dict(beta=1.0), ValueError, r"beta must lie in \(0, 1\)"),
        (grad, dict(beta=1.5, gjsd=False), ValueError, r"beta must lie in \[0, 1\]"),
        (grad, dict(beta=math.nan, gjsd=False), ValueError, "beta must lie in"),
        (grad, dict(teacher=xt[:, :100]), ValueError, "teacher must have student's shape"),
        (grad, dict(student=xs.double()), TypeError, "student must be float32"),
        (grad, dict(student=xs.T.contiguous().T), ValueError, "student must have last stride 1"),
        (grad, dict(lse_s=lse_s[:4]), ValueError, "lse_s must have shape"),
        (grad, dict(lse_t=lse_t.double()), TypeError, "lse_t must be float32"),
        (grad, dict(aux=aux[:3]), ValueError, "aux must have shape"),
        (grad, dict(coef=coef.double()), TypeError, "coef must be float32"),
        (grad, dict(out=torch.zeros(5, 199)), ValueError, "out must have student's shape"),
        (grad, dict(out=torch.zeros(5, 200, dtype=torch.bfloat16)), TypeError, "out must be float32"),
        (grad, dict(temperature=0.0), ValueError, "temperature"),
        (grad, dict(cap_s=-1.0), ValueError, "cap_s"),
        (second, dict(kl=torch.zeros(5, 2)), ValueError, "kl must have shape"),
        (second, dict(kl=torch.zeros(2, 5, dtype=torch.float64)), TypeError, "kl must be float32"),
        (second, dict(beta=1.0), ValueError, r"beta must lie in \(0, 1\)"),
        (second, dict(cap_t=math.inf), ValueError, "cap_t"),
        (second, dict(lse_s=lse_s[None]), ValueError, "lse_s must have shape"),
    ]:
        with pytest.raises(exc, match=words):
            call(**over)
    # empty tiles are fine and touch nothing
    empty = torch.zeros(5, 0)
    assert cpu.linear_jeffreys_tile_grad(
        empty, empty, lse_s, lse_t, aux, coef, 1.0, 0.0, 0.0, 0.5, True
    ).shape == (
        5,
        0,
    )
    kl = torch.ones(2, 5)
    cpu.linear_jeffreys_tile_gjsd(kl, empty, empty, lse_s, lse_t, 1.0, 0.0, 0.0, 0.5)
    assert torch.equal(kl, torch.ones(2, 5))
