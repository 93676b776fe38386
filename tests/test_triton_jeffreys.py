"""Triton token_jeffreys (forward, backward) and reward_quantiles on CPU tensors under ``TRITON_INTERPRET=1``.

Run: ``TRITON_INTERPRET=1 pytest tests/test_triton_jeffreys.py -m interpret``.  The divergence and its
gradient are checked against :func:`bond_kernels.reference.token_jeffreys` in float64 on the same rounded
inputs, with random upstream gradients; the quantiles must equal the fp32 reference exactly (integer counts,
IEEE divisions).  Shapes are small: the interpreter runs numpy per block.
"""

import math

import pytest
import torch
from conftest import FP32_OUT_ATOL, assert_close

import bond_kernels as bk
from bond_kernels import reference as ref
from bond_kernels.ops import triton as tk

pytestmark = [
    pytest.mark.interpret,
    # the interpreter evaluates exp of masked (−inf) lanes in numpy, which warns
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

# (N, V): why each shape is here.
SHAPES = [
    (1, 1),  # V = 1: p = q = 1, divergence and gradient exactly 0
    (7, 33),  # odd, far below one block
    (5, 2049),  # one column past a 2048-column forward block: a masked tail in the second iteration
    (3, 9000),  # several blocks of both online log-sum-exps (the running maxes move between blocks)
]
DTYPES = [torch.float32, torch.bfloat16]
# (beta, temperature)
OPTIONS = [(0.5, 1.0), (0.0, 0.7), (1.0, 1.3), (0.3, 1.0)]


def _case(n, v, dtype, *, scale=3.0):
    # Policy and anchor correlated (as a trained policy and its anchor are) plus a row offset in the anchor
    # (softmax ignores it; the kernel must not lose precision to it).
    z = torch.randn(n, v) * scale
    a = z + torch.randn(n, v) * 0.5 + torch.randn(n, 1) * 2
    return z.to(dtype), a.to(dtype)


def _reference(z, a, g, beta, temperature, ignore_mask=None):
    zd = z.detach().double().requires_grad_(True)
    div = ref.token_jeffreys(zd, a.double(), beta=beta, temperature=temperature, ignore_mask=ignore_mask)
    (grad,) = torch.autograd.grad(div, zd, g.double())
    return div.detach(), grad


def _check(z, a, beta, temperature, ignore_mask=None):
    n = z.shape[0]
    mask = ignore_mask if ignore_mask is not None else torch.empty(0, dtype=torch.bool)
    g = torch.randn(n)
    div, lse_p, lse_q, kl = tk.token_jeffreys_fwd(z, a, beta, temperature, mask)
    grad = tk.token_jeffreys_bwd(z, a, lse_p, lse_q, kl, g, beta, temperature, mask)
    e_div, e_grad = _reference(z, a, g, beta, temperature, ignore_mask)
    assert div.dtype == torch.float32 and grad.dtype == z.dtype and grad.shape == z.shape
    assert_close(div, e_div, atol=FP32_OUT_ATOL, rtol=1e-4)
    # bf16 gradients are judged against the fp64 gradient with bf16's storage tolerance.
    assert_close(grad, e_grad, dtype=z.dtype if z.dtype != torch.float32 else torch.float32)
    return div, grad


@pytest.mark.parametrize("beta,temperature", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_table(n, v, dtype, beta, temperature):
    z, a = _case(n, v, dtype)
    _check(z, a, beta, temperature)


def test_ignore_mask_rows_are_zero_and_not_read():
    z, a = _case(6, 300, torch.float32)
    ignore = torch.tensor([True, False, False, True, False, True])
    # Ignored rows may hold anything, even all −inf or NaN: they must give 0 and a zero gradient.
    z[0] = -math.inf
    a[3] = math.nan
    z[5] = math.nan
    div, grad = _check(z, a, 0.4, 0.9, ignore)
    assert torch.equal(div[ignore], torch.zeros(3))
    assert torch.equal(grad[ignore], torch.zeros(3, 300))


def test_neg_inf_entries():
    # Masked vocabulary (−inf in both rows): no NaN, exact zeros where p = q = 0.
    z, a = _case(4, 500, torch.float32)
    z[:, :50] = -math.inf
    a[:, :50] = -math.inf
    for beta in (1.0, 0.5, 0.0):
        div, grad = _check(z, a, beta, 1.0)
        assert torch.isfinite(div).all() and torch.isfinite(grad).all()
        assert torch.equal(grad[:, :50], torch.zeros(4, 50))
    # The policy excludes tokens the anchor allows: KL(q‖p) = inf, as in the reference.
    z[1, 100:120] = -math.inf
    div, _ = tk.token_jeffreys_fwd(z, a, 0.5, 1.0, torch.empty(0, dtype=torch.bool))[:2]
    assert math.isinf(div[1].item()) and torch.isfinite(div[[0, 2, 3]]).all()
    _check(z, a, 0.5, 1.0)


def test_any_row_stride_and_extreme_logits():
    # Rows of a wider buffer (row stride 700 ≠ V = 600) are read in place; logits of size ±1e4 do not
    # overflow the online log-sum-exps.
    big_z, big_a = _case(5, 700, torch.float32)
    z, a = big_z[:, 50:650], big_a[:, 100:700]
    assert z.stride(0) == 700 and not z.is_contiguous()
    _check(z, a, 0.5, 1.0)
    z2, a2 = torch.randn(3, 256) * 3000, torch.randn(3, 256) * 3000  # independent: nearly one-hot p, q apart
    div, _ = _check(z2, a2, 0.5, 2.0)
    assert (div > 100).all()


def test_functional_and_module_through_autograd():
    # bk.token_jeffreys(backend="triton") uses the custom op and its autograd; (B, T, V) leading dims.
    z, a = _case(2 * 3, 257, torch.float32)
    z, a = z.view(2, 3, 257), a.view(2, 3, 257)
    ignore = torch.tensor([[False, True, False], [False, False, True]])
    x = z.clone().requires_grad_(True)
    div = bk.token_jeffreys(x, a, beta=0.3, temperature=0.8, ignore_mask=ignore, backend="triton")
    g = torch.randn(2, 3)
    (grad,) = torch.autograd.grad(div, x, g)
    e_div, e_grad = _reference(z.view(6, 257), a.view(6, 257), g.view(6), 0.3, 0.8, ignore.view(6))
    assert_close(div.view(6), e_div, atol=FP32_OUT_ATOL, rtol=1e-4)
    assert_close(grad.view(6, 257), e_grad)
    mod = bk.TokenJeffreys(beta=0.3, temperature=0.8, backend="triton")
    assert torch.equal(mod(z, a, ignore), div.detach())


# --------------------------------------------------------------------------------------------------------
# reward_quantiles (Triton)
# --------------------------------------------------------------------------------------------------------
# (B, n, k): why each shape is here.
Q_SHAPES = [
    (1, 1, 1),  # smallest
    (5, 3, 7),  # odd sizes, far below one block
    (33, 16, 64),  # the benchmark's n = 16, k = 64
    (4, 40, 130),  # n above the candidate block and k over three reference blocks
]


@pytest.mark.parametrize("b,n,k", Q_SHAPES)
def test_reward_quantiles_exact(b, n, k):
    for ties in (True, False):
        if ties:
            r, rr = torch.randint(0, 5, (b, n)).float(), torch.randint(0, 5, (b, k)).float()
        else:
            r, rr = torch.randn(b, n), torch.randn(b, k)
        mask = torch.rand(b, k) < 0.6
        mask[:, 0] = True
        for m in (None, mask):
            for smoothing in ("none", "self", 0.3):
                got = bk.reward_quantiles(r, rr, ref_mask=m, smoothing=smoothing, backend="triton")
                exp = ref.reward_quantiles(r, rr, ref_mask=m, smoothing=smoothing)
                assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1]), (
                    ties,
                    m is not None,
                    smoothing,
                )


def test_reward_quantiles_infinite_and_masked_nan():
    r = torch.tensor([[-math.inf, 0.0, math.inf]])
    rr = torch.tensor([[math.inf, -math.inf, 0.0, math.nan]])
    mask = torch.tensor([[True, True, True, False]])  # the NaN sample is masked out: never counts
    got = tk.reward_quantiles(r, rr, mask, 0, 0.0)
    exp = ref.reward_quantiles(r, rr, ref_mask=mask)
    assert torch.equal(got[0], exp[0]) and torch.equal(got[1], exp[1])
    assert torch.equal(got[0], torch.tensor([[1 / 3, 2 / 3, 1.0]]))


def test_auto_quantiles_measure_the_two_kernels(monkeypatch, quantile_launches):
    """The measured ``auto`` end to end through the functional API, with the Triton kernel as one of the two
    candidates (on CPU under the interpreter, 'cpu' stands in for the CUDA C++ kernel): both run, the
    faster is kept per bucket, the result has the reference's bits, and the next call times nothing."""
    from bond_kernels import _backend

    monkeypatch.setattr(_backend, "MEASURED", {("reward_quantiles", "cpu"): ("cpu", "triton")})
    launched = quantile_launches
    g = torch.Generator().manual_seed(8)
    r, rr = torch.randn(6, 3, generator=g), torch.randn(6, 10, generator=g)
    got = bk.reward_quantiles(r, rr, smoothing="self")
    rounds = 1 + _backend.MEASURE_ROUNDS
    assert launched.count("cpu") >= rounds and launched.count("triton") >= rounds, launched
    (choice,) = _backend._MEASURED_CHOICE.values()
    # the interpreter is far slower than the C++ kernel: the measurement must see it
    assert choice == "cpu"
    want = bk.reference.reward_quantiles(r, rr, smoothing="self")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    launched.clear()
    bk.reward_quantiles(r, rr, smoothing="self")
    assert launched == ["cpu"]
