"""The fused sequence-level BOND / J-BOND op on the cpu backend against the reference.

``bk.bond_loss`` / ``bk.jbond_loss`` route fp32 inputs through one ``bond_kernels::bond_sequence`` (or
``jbond_sequence``) launch and rebuild the loss from the returned per-sequence coefficients; every field of
the output and the gradients with respect to both differentiable log-prob inputs must equal the reference's
to fp32 rounding.
"""

import math

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _backend, _ext
from bond_kernels import reference as R
from bond_kernels._validate import BASELINES
from bond_kernels.ops.bond_sequence import bond_sequence, jbond_sequence

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C is not built")

# (B, m, k, j): prompts, policy samples per prompt, reference samples per prompt, Best-of-N samples per prompt.
SHAPES = [
    (1, 1, 1, 1),  # one prompt, one sample: the batch leave-one-out baseline has nobody to leave out (0)
    (7, 1, 9, 2),  # m = 1: batch-wide baselines; odd sizes
    (5, 4, 16, 3),  # m > 1: per-prompt baselines
    (3, 2, 1, 1),  # k = 1: quantiles are 0, 1/2 or 1
    (33, 16, 64, 1),  # the benchmark's n = 16, k = 64 at a small B
    (
        70,
        1,
        300,
        0,
    ),  # no Best-of-N samples (forward_ce is NaN, as the mean of nothing); enough work for OpenMP
]
SMOOTHING = ["self", "none", 0.25]
BASELINE_NAMES = ["loo", "mean", "none"]
# fp32 per-element math (logs rounded once) against the reference's fp32 torch ops: a few ulp.
RTOL, ATOL = 4e-6, 1e-6


def _close(actual, expected, name):
    a, e = actual.detach().double(), expected.detach().double()
    scale = e[torch.isfinite(e)].abs().max().item() if torch.isfinite(e).any() else 1.0
    try:
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL * max(scale, 1.0), equal_nan=True)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from None


def _bond_inputs(b, m, k, j, *, ties=True, logp_dtype=torch.float32, reward_dtype=torch.float32):
    # Sequence log-probs of realistic size (tens of nats); integer rewards make ties common.
    lp = (torch.randn(b, m) * 4 - 30).to(logp_dtype).requires_grad_(True)
    rl = torch.randn(b, m) * 4 - 30
    if ties:
        pr = torch.randint(0, 5, (b, m)).to(reward_dtype)
        rr = torch.randint(0, 5, (b, k)).to(reward_dtype)
    else:
        pr = torch.randn(b, m, dtype=reward_dtype)
        rr = torch.randn(b, k, dtype=reward_dtype)
    bl = (torch.randn(b, j) * 4 - 30).to(logp_dtype).requires_grad_(True)
    mask = torch.rand(b, k) < 0.6
    mask[:, torch.randint(0, k, (1,))] = True  # every prompt keeps at least one reference sample
    return lp, rl, pr, rr, bl, mask


def _check_bond(inputs, **kw):
    lp, rl, pr, rr, bl, mask = inputs
    up = torch.randn(())  # random upstream gradient of the scalar loss
    out = bk.bond_loss(lp, rl, pr, rr, bl, **kw)
    g_lp, g_bl = torch.autograd.grad(out.loss, (lp, bl), up)
    exp = R.bond_loss(lp, rl, pr, rr, bl, **kw)
    e_lp, e_bl = torch.autograd.grad(exp.loss, (lp, bl), up)
    for f in exp._fields:
        _close(getattr(out, f), getattr(exp, f), f)
        assert getattr(out, f).dtype == getattr(exp, f).dtype, f
    _close(g_lp, e_lp, "grad policy_logp")
    _close(g_bl, e_bl, "grad bon_logp")
    return out


def test_cpu_backend_serves_the_fused_op():
    assert _backend.resolve("bond_sequence", "auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("correction", [False, True])
@pytest.mark.parametrize("smoothing", SMOOTHING)
@pytest.mark.parametrize("shape", SHAPES)
def test_bond_loss_matches_reference(shape, smoothing, correction):
    b, m, k, j = shape
    for baseline in BASELINE_NAMES:
        for masked in (False, True):
            inputs = _bond_inputs(b, m, k, j)
            mask = inputs[-1] if masked else None
            _check_bond(
                inputs[:-1] + (mask,),
                n=4,
                beta=0.3,
                baseline=baseline,
                smoothing=smoothing,
                correction=correction,
                ref_mask=mask,
            )


@pytest.mark.parametrize("n", [1, 2, 2.5, 16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_bond_loss_n_and_beta(n, beta):
    # N = 1 is π_ref itself (no power term, C_1 = 0); a real N uses the closed form; β at both ends.
    inputs = _bond_inputs(6, 3, 12, 2, ties=False)
    _check_bond(inputs[:-1] + (None,), n=n, beta=beta, correction=True)
    _check_bond(inputs[:-1] + (None,), n=n, beta=beta, correction=False, baseline="loo")


def test_bond_loss_fp64_and_integer_rewards():
    # fp64 rewards compare in fp64 (values that tie in fp32 stay distinct); integer rewards become fp64.
    lp, rl, _, _, bl, _ = _bond_inputs(4, 3, 8, 1)
    base = torch.randn(4, 1, dtype=torch.float64)
    pr = base + torch.tensor([0.0, 1e-12, -1e-12], dtype=torch.float64)  # equal in fp32, distinct in fp64
    rr = base + torch.randn(4, 8, dtype=torch.float64) * 1e-12
    _check_bond((lp, rl, pr, rr, bl, None), n=3, correction=True)
    ints = (lp, rl, torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (4, 8)), bl, None)
    _check_bond(ints, n=3, smoothing="none")


def test_bond_loss_bf16_logp():
    # bf16 log-probs: the loss is built in fp32 and the gradient comes back in bf16, like the reference's.
    inputs = _bond_inputs(8, 2, 10, 2, logp_dtype=torch.bfloat16)
    out = _check_bond(inputs[:-1] + (None,), n=4)
    assert out.policy_coef.dtype == torch.float32


def test_bond_loss_infinite_rewards_and_p_le_zero():
    # ±inf rewards are ordered; smoothing="none" gives p_le = 0 for a candidate below every reference
    # sample, so log π_BoN = −inf and the coefficients are non-finite exactly where the reference's are.
    lp, rl, pr, rr, bl, _ = _bond_inputs(4, 2, 6, 1, ties=False)
    pr[0, 0] = -math.inf
    pr[1, 1] = math.inf
    rr[2, 3] = -math.inf
    rr[3, :] = math.inf
    for smoothing in ("self", "none"):
        _check_bond((lp, rl, pr, rr, bl, None), n=4, smoothing=smoothing, correction=True)


def test_launcher_outputs_and_stats_layout():
    # The launcher contract itself (ops/bond_sequence.py): shapes, dtypes and the stats order.
    lp, rl, pr, rr, bl, mask = _bond_inputs(5, 3, 7, 2)
    outs = bond_sequence(
        lp.detach(), rl, pr, rr, mask, bl.detach(), 4.0, 0.5, 1, 0.0, True, BASELINES["loo"], "cpu"
    )
    p_le, log_bon, pc, bc, stats = outs
    assert [tuple(t.shape) for t in outs] == [(5, 3), (5, 3), (5, 3), (5, 2), (4,)]
    assert all(t.dtype == torch.float32 for t in outs)
    exp = R.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, ref_mask=mask)
    _close(stats, torch.stack([exp.backward_kl, exp.forward_ce, exp.mean_quantile, exp.kl_to_ref]), "stats")


def test_deterministic_and_thread_count_independent():
    inputs = _bond_inputs(300, 4, 64, 2, ties=False)
    lp, rl, pr, rr, bl, mask = inputs
    args = (lp.detach(), rl, pr, rr, mask, bl.detach(), 8.0, 0.5, 1, 0.0, True, 0, "cpu")
    threads = torch.get_num_threads()
    try:
        first = bond_sequence(*args)
        torch.set_num_threads(1)
        single = bond_sequence(*args)
    finally:
        torch.set_num_threads(threads)
    again = bond_sequence(*args)
    for a, s, g in zip(first, single, again):
        assert torch.equal(a, s) and torch.equal(a, g)


# --------------------------------------------------------------------------------------------------------
# J-BOND
# --------------------------------------------------------------------------------------------------------
def _jbond_inputs(b, *, ties=True, logp_dtype=torch.float32):
    lp = (torch.randn(b) * 4 - 30).to(logp_dtype).requires_grad_(True)
    al = torch.randn(b) * 4 - 30
    if ties:
        pr = torch.randint(0, 4, (b,)).float()
        ar = torch.randint(0, 4, (b, 2)).float()
    else:
        pr, ar = torch.randn(b), torch.randn(b, 2)
    best = (torch.randn(b) * 4 - 30).to(logp_dtype).requires_grad_(True)
    return lp, al, pr, ar, best


def _check_jbond(inputs, **kw):
    lp, al, pr, ar, best = inputs
    up = torch.randn(())
    out = bk.jbond_loss(lp, al, pr, ar, best, **kw)
    g = torch.autograd.grad(out.loss, (lp, best), up)
    exp = R.jbond_loss(lp, al, pr, ar, best, **kw)
    e = torch.autograd.grad(exp.loss, (lp, best), up)
    for f in exp._fields:
        _close(getattr(out, f), getattr(exp, f), f)
        assert getattr(out, f).dtype == getattr(exp, f).dtype, f
    _close(g[0], e[0], "grad policy_logp")
    _close(g[1], e[1], "grad best_anchor_logp")
    return out


@pytest.mark.parametrize("b", [1, 2, 37, 1024])
@pytest.mark.parametrize("strict", [True, False])
def test_jbond_loss_matches_reference(b, strict):
    for gamma in (0.0, 0.7):
        for ties in (True, False):
            out = _check_jbond(_jbond_inputs(b, ties=ties), beta=0.4, gamma=gamma, strict=strict)
    assert out.jbond_reward.shape == (b,)


def test_jbond_penalty_and_bf16():
    _check_jbond(_jbond_inputs(16), beta=1.0, gamma=2.0, penalty=0.0)
    _check_jbond(_jbond_inputs(16), beta=0.0, penalty=math.log(4))
    _check_jbond(_jbond_inputs(16, logp_dtype=torch.bfloat16), beta=0.5, gamma=0.5)
    # infinite rewards are ordered like any others
    lp, al, pr, ar, best = _jbond_inputs(6, ties=False)
    pr[0], ar[1, 0], ar[2, :] = -math.inf, math.inf, -math.inf
    _check_jbond((lp, al, pr, ar, best), beta=0.5)


# --------------------------------------------------------------------------------------------------------
# routing, custom-op registration, bad launcher arguments
# --------------------------------------------------------------------------------------------------------
def test_fp64_and_tensor_baseline_take_the_reference(monkeypatch):
    calls = []
    real = _backend.impl("bond_sequence", "cpu").bond_sequence
    monkeypatch.setattr(
        "bond_kernels._backend.impl",
        lambda op, name: type(
            "K", (), {"bond_sequence": staticmethod(lambda *a: calls.append(1) or real(*a))}
        ),
    )
    lp, rl, pr, rr, bl, _ = _bond_inputs(4, 2, 5, 1)
    bk.bond_loss(lp, rl, pr, rr, bl, n=2)
    assert calls == [1]  # fp32: the fused op ran
    bk.bond_loss(lp.detach().double().requires_grad_(True), rl.double(), pr, rr, bl.double(), n=2)
    bk.bond_loss(lp, rl, pr, rr, bl, n=2, baseline=torch.zeros(4, 2))
    assert calls == [1]  # fp64 and a tensor baseline ran the reference


@pytest.mark.parametrize("field", [0, 1, 2, 4])
def test_comparison_catches_a_small_error(monkeypatch, field):
    # The checks above can fail: an output of the fused op off by 1e-4 relative (a wrong baseline divisor,
    # a dropped C_N term would be far larger) must be reported.
    real = _backend.impl("bond_sequence", "cpu").bond_sequence

    def skewed(*args):
        outs = list(real(*args))
        outs[field] = outs[field] * (1 + 1e-4)
        return tuple(outs)

    monkeypatch.setattr(
        "bond_kernels._backend.impl",
        lambda op, name: type("K", (), {"bond_sequence": staticmethod(skewed)}),
    )
    with pytest.raises(AssertionError):
        _check_bond(_bond_inputs(6, 2, 8, 1, ties=False)[:-1] + (None,), n=4, correction=True)


def test_forced_triton_backend_falls_back_to_reference(monkeypatch):
    # BOND_KERNELS_BACKEND=triton forces a backend that has no sequence-level kernel: the loss still works.
    monkeypatch.setenv("BOND_KERNELS_BACKEND", "triton")
    _check_bond(_bond_inputs(3, 2, 4, 1)[:-1] + (None,), n=2)
    _check_jbond(_jbond_inputs(5), beta=0.5)


def test_custom_ops_opcheck():
    lp, rl, pr, rr, bl, mask = _bond_inputs(4, 3, 6, 2)
    torch.library.opcheck(
        bond_sequence, (lp.detach(), rl, pr, rr, mask, bl.detach(), 4.0, 0.5, 1, 0.0, True, 0, "cpu")
    )
    lp, al, pr, ar, best = _jbond_inputs(5)
    torch.library.opcheck(
        jbond_sequence, (lp.detach(), al, pr, ar, best.detach(), 0.5, 0.1, 2.0, True, "cpu")
    )


def test_compile_fullgraph_traces_the_fused_losses():
    # Dynamo must trace bond_loss / jbond_loss (validate=False: no host sync) without a graph break.
    lp, rl, pr, rr, bl, _ = _bond_inputs(6, 2, 8, 1)
    jl, al, jpr, ar, best = _jbond_inputs(6)

    def step(lp, bl, jl, best):
        o = bk.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, validate=False)
        j = bk.jbond_loss(jl, al, jpr, ar, best, gamma=0.1, validate=False)
        return o.loss + j.loss, o.backward_kl, j.reward_mean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(lp, bl, jl, best)
    exp = step(lp, bl, jl, best)
    for a, e in zip(got, exp):
        _close(a, e, "compiled")
    up = torch.randn(())
    g = torch.autograd.grad(got[0], (lp, bl, jl, best), up)
    e = torch.autograd.grad(exp[0], (lp, bl, jl, best), up)
    for a, b in zip(g, e):
        _close(a, b, "compiled grad")


def _launch(**over):
    lp, rl, pr, rr, bl, mask = _bond_inputs(4, 3, 6, 2)
    args = dict(
        policy_logp=lp.detach(),
        policy_ref_logp=rl,
        policy_rewards=pr,
        ref_rewards=rr,
        ref_mask=mask,
        bon_logp=bl.detach(),
        n=4.0,
        beta=0.5,
        mode=1,
        eps=0.0,
        correction=False,
        baseline=0,
    )
    args.update(over)
    return _backend.impl("bond_sequence", "cpu").bond_sequence(*args.values())


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(policy_logp=torch.zeros(4, 3, dtype=torch.float16)), TypeError, "policy_logp must be float32"),
        (dict(policy_ref_logp=torch.zeros(4, 2)), ValueError, "policy_ref_logp must have size 3"),
        (
            dict(policy_rewards=torch.zeros(4, 3, dtype=torch.int64)),
            TypeError,
            "policy_rewards must be float32 or float64",
        ),
        (
            dict(ref_rewards=torch.zeros(4, 6, dtype=torch.float64)),
            TypeError,
            "ref_rewards must have policy_rewards' dtype",
        ),
        (dict(ref_rewards=torch.zeros(5, 6)), ValueError, "ref_rewards must have B = 4"),
        (
            dict(ref_mask=torch.ones(4, 5, dtype=torch.bool)),
            ValueError,
            "ref_mask must have ref_rewards' shape",
        ),
        (dict(ref_mask=torch.ones(4, 6)), TypeError, "ref_mask must be a bool tensor"),
        (dict(bon_logp=torch.zeros(3, 2)), ValueError, "bon_logp must have size 4"),
        (dict(n=0.5), ValueError, "n must be a number >= 1"),
        (dict(beta=1.5), ValueError, "beta must be a number in"),
        (dict(mode=3), ValueError, "mode must be 0"),
        (dict(mode=2, eps=0.0), ValueError, "eps must be in"),
        (dict(baseline=5), ValueError, "baseline must be 0"),
    ],
)
def test_launcher_rejects_bad_arguments(over, exc, match):
    with pytest.raises(exc, match=match):
        _launch(**over)


def test_jbond_launcher_rejects_bad_arguments():
    lp, al, pr, ar, best = (t.detach() for t in _jbond_inputs(4))
    k = _backend.impl("bond_sequence", "cpu")
    with pytest.raises(ValueError, match="anchor_rewards must have size 2"):
        k.jbond_sequence(lp, al, pr, torch.zeros(4, 3), best, 0.5, 0.0, 1.0, True)
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        k.jbond_sequence(lp, al, pr, ar, best, 0.5, -1.0, 1.0, True)
    with pytest.raises(TypeError, match="policy_rewards must be float32"):
        k.jbond_sequence(lp, al, pr.double(), ar, best, 0.5, 0.0, 1.0, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["bond", "jbond"])
def test_whole_step_gradient_reaches_the_logits(loss, dtype):
    """logits -> sequence_logprobs (cpu kernels) -> fused bond/jbond loss -> backward, against the same chain
    through the float64 reference: the per-sequence coefficients must arrive at every logit."""
    g = torch.Generator().manual_seed(11)
    b, m, t, v = 3, 4, 5, 37
    logits = torch.randn(b * m, t, v, generator=g).mul_(3).to(dtype)
    labels = torch.randint(0, v, (b * m, t), generator=g)
    labels[0, 3:] = -100
    bon_logits = torch.randn(b, t, v, generator=g).to(dtype)
    bon_labels = torch.randint(0, v, (b, t), generator=g)
    ref_logp = torch.randn(b, m, generator=g, dtype=torch.float64) * 3 - 20
    rewards = torch.randn(b, m, generator=g)
    ref_rewards = torch.randn(b, 8, generator=g)
    anchor_rewards = torch.randn(b, 2, generator=g)
    scale = float(torch.rand((), generator=g)) + 0.5  # random upstream gradient of the scalar loss

    def chain(backend, x, xb):
        logp = bk.sequence_logprobs(x, labels, backend=backend).view(b, m)
        bon = bk.sequence_logprobs(xb, bon_labels, backend=backend).view(b, 1)
        if loss == "bond":
            out = bk.bond_loss(logp, ref_logp.to(logp.dtype), rewards, ref_rewards, bon, n=4, beta=0.5)
        else:
            # J-BOND takes one policy sample per prompt: use the first of each group.
            out = bk.jbond_loss(
                logp[:, 0], ref_logp[:, 0].to(logp.dtype), rewards[:, 0], anchor_rewards, bon[:, 0]
            )
        return out.loss

    x = logits.clone().requires_grad_(True)
    xb = bon_logits.clone().requires_grad_(True)
    (chain("cpu", x, xb) * scale).backward()
    x64 = logits.double().requires_grad_(True)
    xb64 = bon_logits.double().requires_grad_(True)
    (chain("torch", x64, xb64) * scale).backward()
    assert x.grad.dtype == dtype and xb.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(xb.grad.double(), xb64.grad, rtol=tol, atol=tol)
    assert x64.grad.abs().sum() > 0 and xb64.grad.abs().sum() > 0
