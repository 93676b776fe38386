"""The BOND objective's GPU kernels (marked ``gpu``; run by ``benchmarks/gpu_check.sh``).

* ``cuda`` reward_quantiles (CUDA C++) and ``triton`` reward_quantiles: equal to the fp32 reference bit for
  bit (integer counts, IEEE divisions), ragged masks, every smoothing mode, k from 1 to above a warp's reach.
* the fused sequence-level op (``_C.cuda.bond_sequence`` / ``jbond_sequence``) through ``bk.bond_loss`` /
  ``bk.jbond_loss``: every output field and the gradients match the reference on the same device to fp32
  rounding, in the single-block, per-prompt multi-block and last-block (batch baseline) regimes; results
  are bitwise reproducible; torch.compile(fullgraph=True) and CUDA-graph capture work.
* Triton token_jeffreys on bf16 logits at V = 128256 against float64 (forward and gradient).
"""

import math

import pytest
import torch
from conftest import FP32_OUT_ATOL, assert_close

import bond_kernels as bk
from bond_kernels import _backend
from bond_kernels import reference as R

pytestmark = pytest.mark.gpu

# fp32 per-element math against the reference's fp32 torch ops on the same device: a few ulp.
RTOL, ATOL = 4e-6, 1e-6


def _close(actual, expected, name):
    a, e = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(e)
    scale = e[finite].abs().max().item() if finite.any() else 1.0
    try:
        torch.testing.assert_close(a, e, rtol=RTOL, atol=ATOL * max(scale, 1.0), equal_nan=True)
    except AssertionError as exc:
        raise AssertionError(f"{name}: {exc}") from None


# --------------------------------------------------------------------------------------------------------
# reward quantiles
# --------------------------------------------------------------------------------------------------------
# (B, n, k): why each shape is here.
Q_SHAPES = [
    (1, 1, 1),  # one candidate, one reference sample: one lane per candidate
    (1024, 16, 64),  # the benchmark shape: 8 lanes per candidate
    (37, 5, 3),  # odd sizes; k below the lane threshold
    (100, 7, 2049),  # k above a warp's 32 lanes × 64: every lane strides several times
    (3000, 1, 16),  # one candidate per prompt, many blocks
]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("b,n,k", Q_SHAPES)
def test_reward_quantiles_exact(b, n, k, backend, device):
    for ties in (True, False):
        if ties:
            r = torch.randint(0, 6, (b, n), device=device).float()
            rr = torch.randint(0, 6, (b, k), device=device).float()
        else:
            r, rr = torch.randn(b, n, device=device), torch.randn(b, k, device=device)
        mask = torch.rand(b, k, device=device) < 0.6
        mask[:, 0] = True
        for m in (None, mask):
            for smoothing in ("none", "self", 0.3):
                got = bk.reward_quantiles(r, rr, ref_mask=m, smoothing=smoothing, backend=backend)
                exp = R.reward_quantiles(r, rr, ref_mask=m, smoothing=smoothing)
                assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1]), (
                    ties,
                    m is not None,
                    smoothing,
                )


def test_reward_quantiles_infinite_and_masked_nan(device):
    r = torch.tensor([[-math.inf, 0.0, math.inf]], device=device)
    rr = torch.tensor([[math.inf, -math.inf, 0.0, math.nan]], device=device)
    mask = torch.tensor([[True, True, True, False]], device=device)  # the masked NaN never counts
    for backend in ("cuda", "triton"):
        got = bk.reward_quantiles(r, rr, ref_mask=mask, backend=backend, validate=False)
        assert torch.equal(got[0], torch.tensor([[1 / 3, 2 / 3, 1.0]], device=device)), backend


def test_auto_prefers_the_cuda_kernels(device):
    assert _backend.resolve("reward_quantiles", "auto", device) == "cuda"
    assert _backend.resolve("bond_sequence", "auto", device) == "cuda"


def test_auto_quantiles_measure_both_kernels_once(device, quantile_launches):
    """auto times the CUDA C++ and Triton quantile kernels on the first call of a shape bucket (CUDA
    events), keeps the faster, and gives the same bits as both; the next call of the bucket times nothing."""
    launched = quantile_launches
    g = torch.Generator(device=device).manual_seed(3)
    r = torch.randn(1024, 16, device=device, generator=g)
    rr = torch.randn(1024, 64, device=device, generator=g)
    got = bk.reward_quantiles(r, rr, smoothing="self")
    rounds = 1 + _backend.MEASURE_ROUNDS
    assert launched.count("cuda") >= rounds and launched.count("triton") >= rounds, launched
    (choice,) = _backend._MEASURED_CHOICE.values()
    assert choice in ("cuda", "triton")
    for backend in ("cuda", "triton"):
        want = bk.reward_quantiles(r, rr, smoothing="self", backend=backend)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), backend
    launched.clear()
    bk.reward_quantiles(r, rr, smoothing="self")
    assert launched == [choice]


# --------------------------------------------------------------------------------------------------------
# fused BOND / J-BOND
# --------------------------------------------------------------------------------------------------------
# (B, m, k, j): why each shape is here.
B_SHAPES = [
    (1, 1, 1, 1),  # one block, batch LOO with nobody to leave out
    (1024, 16, 64, 1),  # benchmark shape: 512 blocks of 2 prompts, per-prompt baselines
    (1024, 1, 64, 1),  # m = 1: batch baseline finished by the last block (32 blocks)
    (5000, 1, 16, 2),  # many blocks draw tickets; the last one sums 40 partials and writes 5000 coefficients
    (3, 300, 8, 1),  # m above one pass of a block: a prompt takes several passes
    (64, 4, 4096, 2),  # long reference rows: a full warp per candidate
    (8, 3, 5, 0),  # no Best-of-N samples
]


def _bond_inputs(b, m, k, j, device, *, ties=True, reward_dtype=torch.float32):
    lp = (torch.randn(b, m, device=device) * 4 - 30).requires_grad_(True)
    rl = torch.randn(b, m, device=device) * 4 - 30
    if ties:
        pr = torch.randint(0, 5, (b, m), device=device).to(reward_dtype)
        rr = torch.randint(0, 5, (b, k), device=device).to(reward_dtype)
    else:
        pr = torch.randn(b, m, device=device, dtype=reward_dtype)
        rr = torch.randn(b, k, device=device, dtype=reward_dtype)
    bl = (torch.randn(b, j, device=device) * 4 - 30).requires_grad_(True)
    mask = torch.rand(b, k, device=device) < 0.6
    mask[:, 0] = True
    return lp, rl, pr, rr, bl, mask


def _check_bond(inputs, **kw):
    lp, rl, pr, rr, bl = inputs
    up = torch.randn((), device=lp.device)
    out = bk.bond_loss(lp, rl, pr, rr, bl, **kw)
    g = torch.autograd.grad(out.loss, (lp, bl), up)
    exp = R.bond_loss(lp, rl, pr, rr, bl, **kw)
    e = torch.autograd.grad(exp.loss, (lp, bl), up)
    for f in exp._fields:
        _close(getattr(out, f), getattr(exp, f), f)
    _close(g[0], e[0], "grad policy_logp")
    _close(g[1], e[1], "grad bon_logp")
    return out


@pytest.mark.parametrize("b,m,k,j", B_SHAPES)
def test_bond_loss_matches_reference(b, m, k, j, device):
    for correction in (False, True):
        for smoothing in ("self", "none", 0.2):
            for baseline in ("loo", "mean", "none"):
                lp, rl, pr, rr, bl, mask = _bond_inputs(b, m, k, j, device)
                _check_bond(
                    (lp, rl, pr, rr, bl),
                    n=4,
                    beta=0.3,
                    baseline=baseline,
                    smoothing=smoothing,
                    correction=correction,
                )
                _check_bond(
                    (lp, rl, pr, rr, bl),
                    n=2.5,
                    beta=0.7,
                    baseline=baseline,
                    smoothing=smoothing,
                    correction=correction,
                    ref_mask=mask,
                )


def test_bond_loss_fp64_rewards(device):
    lp, rl, pr, rr, bl, _ = _bond_inputs(256, 4, 32, 1, device, ties=False, reward_dtype=torch.float64)
    _check_bond((lp, rl, pr, rr, bl), n=8, correction=True)


def test_bond_sequence_is_deterministic(device):
    lp, rl, pr, rr, bl, mask = _bond_inputs(5000, 1, 64, 2, device, ties=False)
    first = bk.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, ref_mask=mask)
    for _ in range(3):
        again = bk.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, ref_mask=mask)
        for f in first._fields:
            assert torch.equal(getattr(first, f), getattr(again, f)), f


def _jbond_inputs(b, device, *, ties=True):
    lp = (torch.randn(b, device=device) * 4 - 30).requires_grad_(True)
    al = torch.randn(b, device=device) * 4 - 30
    if ties:
        pr = torch.randint(0, 4, (b,), device=device).float()
        ar = torch.randint(0, 4, (b, 2), device=device).float()
    else:
        pr, ar = torch.randn(b, device=device), torch.randn(b, 2, device=device)
    best = (torch.randn(b, device=device) * 4 - 30).requires_grad_(True)
    return lp, al, pr, ar, best


@pytest.mark.parametrize("b", [1, 2, 1024, 5000])
def test_jbond_loss_matches_reference(b, device):
    for strict in (True, False):
        for gamma in (0.0, 0.5):
            lp, al, pr, ar, best = _jbond_inputs(b, device)
            up = torch.randn((), device=device)
            out = bk.jbond_loss(lp, al, pr, ar, best, beta=0.4, gamma=gamma, strict=strict)
            g = torch.autograd.grad(out.loss, (lp, best), up)
            exp = R.jbond_loss(lp, al, pr, ar, best, beta=0.4, gamma=gamma, strict=strict)
            e = torch.autograd.grad(exp.loss, (lp, best), up)
            for f in exp._fields:
                _close(getattr(out, f), getattr(exp, f), f)
            _close(g[0], e[0], "grad policy_logp")
            _close(g[1], e[1], "grad best_anchor_logp")


def test_compile_fullgraph(device):
    lp, rl, pr, rr, bl, _ = _bond_inputs(512, 4, 64, 1, device)
    jl, al, jpr, ar, best = _jbond_inputs(512, device)
    z = torch.randn(64, 32000, device=device, dtype=torch.bfloat16)
    a = (z.float() + torch.randn_like(z, dtype=torch.float32) * 0.5).to(torch.bfloat16)

    def step(lp, bl, jl, best, z):
        o = bk.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, validate=False)
        j = bk.jbond_loss(jl, al, jpr, ar, best, gamma=0.1, validate=False)
        t = bk.token_jeffreys(z, a, beta=0.5, backend="triton").mean()
        return o.loss + j.loss + t, o.backward_kl, j.reward_mean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    zc = z.clone().requires_grad_(True)
    ze = z.clone().requires_grad_(True)
    got = compiled(lp, bl, jl, best, zc)
    exp = step(lp, bl, jl, best, ze)
    for x, y in zip(got, exp):
        _close(x, y, "compiled value")
    gc = torch.autograd.grad(got[0], (lp, bl, jl, best, zc))
    ge = torch.autograd.grad(exp[0], (lp, bl, jl, best, ze))
    for x, y in zip(gc, ge):
        assert_close(x, y, rtol=1e-4)


def test_cuda_graph_capture_and_replay(device):
    b, m, k = 1024, 16, 64
    lp, rl, pr, rr, bl, mask = _bond_inputs(b, m, k, 1, device, ties=False)
    lp, bl = lp.detach(), bl.detach()

    def run():
        o = bk.bond_loss(lp, rl, pr, rr, bl, n=4, correction=True, ref_mask=mask, validate=False)
        j = bk.jbond_loss(lp[:, 0], rl[:, 0], pr[:, 0], rr[:, :2], bl[:, 0], validate=False)
        return o.policy_coef, o.backward_kl, o.p_le, j.policy_coef, j.reward_mean

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run()
    new = _bond_inputs(b, m, k, 1, device, ties=False)
    with torch.no_grad():
        for dst, src in zip((lp, rl, pr, rr, bl), new[:5]):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = run()
    for s, e in zip(static, eager):
        assert torch.equal(s, e)


# --------------------------------------------------------------------------------------------------------
# Triton token_jeffreys at the benchmark vocabulary
# --------------------------------------------------------------------------------------------------------
def test_token_jeffreys_bf16_against_fp64(device):
    n, v = 64, 128256
    z = (torch.randn(n, v, device=device) * 4).to(torch.bfloat16)
    a = (z.float() + torch.randn(n, v, device=device)).to(torch.bfloat16)
    ignore = torch.zeros(n, dtype=torch.bool, device=device)
    ignore[::7] = True
    x = z.clone().requires_grad_(True)
    div = bk.token_jeffreys(x, a, beta=0.5, temperature=0.9, ignore_mask=ignore, backend="triton")
    g = torch.randn(n, device=device)
    (grad,) = torch.autograd.grad(div, x, g)
    zd = z.double().requires_grad_(True)
    e_div = R.token_jeffreys(zd, a.double(), beta=0.5, temperature=0.9, ignore_mask=ignore)
    (e_grad,) = torch.autograd.grad(e_div, zd, g.double())
    # docs/performance.md's accuracy target for fp32 results from bf16 inputs: max abs error <= 1e-4 vs fp64.
    assert (div.double() - e_div).abs().max().item() <= 1e-4
    assert_close(div, e_div, atol=FP32_OUT_ATOL, rtol=1e-4)
    assert_close(grad, e_grad)  # bf16 gradient: bf16 storage tolerance against the fp64 gradient
