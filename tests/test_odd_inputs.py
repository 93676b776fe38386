"""The contract for odd inputs (README, "Odd inputs"), one regression test per case of issue 14.

Every case runs on the ``torch`` and ``cpu`` backends (and on ``triton`` in the interpreter tests at the end):
aliased in-place outputs, NaN and ±inf logits, temperatures and softcaps at and beyond the fp32 range,
the autograd backward at tiny temperatures against fp64, and non-finite sequence log-probs in the losses.
"""

import math
import re

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _ext
from bond_kernels import reference as ref

BACKENDS = ["torch", "cpu"] if _ext.has_cpu() else ["torch"]
NAN, INF = float("nan"), float("inf")
TINY, HUGE = 2.0**-126, 2.0**126


def _raises(exc, name, fn, *words):
    """``fn()`` raises ``exc`` whose message names ``name`` as a word and contains every one of ``words``."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"message does not name {name!r}: {msg}"
    for w in words:
        assert w in msg, f"message lacks {w!r}: {msg}"
    return msg


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# aliased or overlapping logits
# ----------------------------------------------------------------------------------------------------
def _aliased(kind, n=4, v=11):
    g = _gen(1)
    if kind == "expanded":  # stride 0: every row is the same memory
        return torch.randn(1, v, generator=g).expand(n, v)
    if kind == "overlapping":  # row stride 3 < V = 11: consecutive rows share 8 elements
        return torch.randn(3 * (n - 1) + v, generator=g).as_strided((n, v), (3, 1))
    if kind == "expanded3d":  # (B, T, V) with an expanded time axis
        return torch.randn(2, 1, v, generator=g).expand(2, 3, v)
    raise KeyError(kind)


@pytest.mark.parametrize("kind", ["expanded", "overlapping", "expanded3d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_on_aliased_logits_raises(backend, kind):
    """The cpu kernels wrote every row's gradient into the same memory and returned log-probs off by 2.37
    (gradients by 2.70) without an error; every backend now refuses, naming logits, and writes nothing."""
    x = _aliased(kind)
    y = torch.randint(0, x.shape[-1], x.shape[:-1], generator=_gen(2))
    g = torch.randn(x.shape[:-1], generator=_gen(3))
    before = x.clone()
    calls = [
        lambda: bk.token_logprobs_and_grad(x, y, g, backend=backend, inplace=True),
        lambda: bk.token_logprobs(x, y, backend=backend, inplace=True),
    ]
    if x.dim() == 3:
        calls.append(lambda: bk.sequence_logprobs_and_grad(x, y, g[:, 0], backend=backend, inplace=True))
        calls.append(lambda: bk.sequence_logprobs(x, y, backend=backend, inplace=True))
    for fn in calls:
        _raises(ValueError, "logits", fn, "inplace=True", "overlapping")
    assert torch.equal(x, before)


@pytest.mark.parametrize("kind", ["expanded", "overlapping", "expanded3d"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_read_only_use_of_aliased_logits_is_exact(backend, kind):
    """Without inplace, expanded and overlapping logits are read in place and give the reference's values
    and gradients (the gradient of an expanded leaf sums over the rows that share it)."""
    x = _aliased(kind)
    y = torch.randint(0, x.shape[-1], x.shape[:-1], generator=_gen(2))
    g = torch.randn(x.shape[:-1], generator=_gen(3))
    base = x._base if x._base is not None else x
    leaf = base.detach().clone().requires_grad_(True)
    view = leaf.as_strided(x.shape, x.stride(), x.storage_offset())
    lp, ent = bk.token_logprobs(view, y, temperature=0.7, return_entropy=True, backend=backend)
    ((lp * g).sum() + ent.sum()).backward()
    leaf64 = base.detach().double().requires_grad_(True)
    view64 = leaf64.as_strided(x.shape, x.stride(), x.storage_offset())
    wlp, went = ref.token_logprobs(view64, y, temperature=0.7, return_entropy=True)
    ((wlp * g.double()).sum() + went.sum()).backward()
    torch.testing.assert_close(lp.double(), wlp.detach(), rtol=0, atol=3e-6)
    torch.testing.assert_close(ent.double(), went.detach(), rtol=0, atol=3e-6)
    torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-6)
    # the gradient-in-forward path: one gradient per (aliased) element of the view, in a fresh buffer
    lp2, grad2 = bk.token_logprobs_and_grad(x, y, g, temperature=0.7, backend=backend)
    x64 = x.detach().double().contiguous().requires_grad_(True)
    (wgrad,) = torch.autograd.grad((ref.token_logprobs(x64, y, temperature=0.7) * g.double()).sum(), x64)
    assert grad2.shape == x.shape
    torch.testing.assert_close(lp2.double(), wlp.detach(), rtol=0, atol=3e-6)
    torch.testing.assert_close(grad2.double(), wgrad, rtol=1e-5, atol=1e-6)


def test_inplace_accepts_disjoint_strided_views():
    """A slice (row stride > V) and a 3-D view with a transposed batch/time layout are written in place."""
    for backend in BACKENDS:
        base = torch.randn(6, 20, generator=_gen(4))
        x = base[:, 3:14]  # row stride 20 > V = 11
        y = torch.randint(0, 11, (6,), generator=_gen(5))
        g = torch.randn(6, generator=_gen(6))
        _, want = bk.token_logprobs_and_grad(x.clone(), y, g, backend=backend)
        _, got = bk.token_logprobs_and_grad(x, y, g, backend=backend, inplace=True)
        assert got.data_ptr() == x.data_ptr()
        torch.testing.assert_close(got, want)
        t = torch.randn(3, 2, 11, generator=_gen(7)).transpose(0, 1)  # (2, 3, 11), strides (11, 22, 1)
        yt = torch.randint(0, 11, (2, 3), generator=_gen(8))
        gt = torch.randn(2, 3, generator=_gen(9))
        _, want = bk.token_logprobs_and_grad(t.clone(), yt, gt, backend=backend)
        _, got = bk.token_logprobs_and_grad(t, yt, gt, backend=backend, inplace=True)
        torch.testing.assert_close(got, want)


# ----------------------------------------------------------------------------------------------------
# NaN and ±inf logits
# ----------------------------------------------------------------------------------------------------
def _rows_with(kind, n=4, v=9):
    x = torch.randn(n, v, generator=_gen(10))
    if kind == "all-nan":
        x[1] = NAN
    elif kind == "neginf-and-one-nan":
        x[1] = -INF
        x[1, 4] = NAN
    elif kind == "one-nan":
        x[1, 7] = NAN
    elif kind == "posinf":
        x[1, 2] = INF
    return x


@pytest.mark.parametrize("kind", ["all-nan", "neginf-and-one-nan", "one-nan"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_raise_an_error_that_says_nan(backend, kind):
    """The cpu backend said "a row whose entries are all -inf" for an all-NaN row (false) while the torch
    backend returned NaN.  Now every backend raises the same ValueError, naming the argument and NaN."""
    x = _rows_with(kind)
    y = torch.tensor([0, 3, 5, 8])
    g = torch.ones(4)
    for name, fn in (
        ("logits", lambda: bk.token_logprobs(x, y, backend=backend)),
        ("logits", lambda: bk.token_logprobs(x, y, softcap=5.0, return_entropy=True, backend=backend)),
        ("logits", lambda: bk.token_logprobs_and_grad(x, y, g, backend=backend)),
        ("logits", lambda: bk.sequence_logprobs(x.view(2, 2, -1), y.view(2, 2), backend=backend)),
        ("policy_logits", lambda: bk.token_jeffreys(x, torch.zeros_like(x), backend=backend)),
    ):
        msg = _raises(ValueError, name, fn, "NaN")
        assert "all -inf" not in msg
    _raises(
        ValueError, "anchor_logits", lambda: bk.token_jeffreys(torch.zeros_like(x), x, backend=backend), "NaN"
    )
    # the same row ignored is fine: 0, and no NaN in the gradient
    y_ign = y.clone()
    y_ign[1] = -100
    xl = x.clone().requires_grad_(True)
    lp = bk.token_logprobs(xl, y_ign, backend=backend)
    lp.sum().backward()
    assert lp[1] == 0 and torch.isfinite(lp).all() and torch.isfinite(xl.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_the_linear_head_says_nan(backend):
    hid = torch.randn(4, 5, generator=_gen(11))
    w = torch.randn(9, 5, generator=_gen(12))
    y = torch.tensor([0, 3, 5, 8])
    hid[2] = NAN
    msg = _raises(ValueError, "hidden", lambda: bk.linear_token_logprobs(hid, w, y, backend=backend), "nan")
    assert "all -inf" not in msg
    hid[2] = 0.0
    w[4, 1] = NAN
    _raises(ValueError, "weight", lambda: bk.linear_token_logprobs(hid, w, y, backend=backend), "nan")


@pytest.mark.parametrize("backend", BACKENDS)
def test_posinf_logits(backend):
    """+inf has no probability weight without a softcap (exp(inf − inf)): a named error; a softcap maps it to
    the cap, and the result is the reference's."""
    x = _rows_with("posinf")
    y = torch.tensor([0, 3, 5, 8])
    _raises(ValueError, "logits", lambda: bk.token_logprobs(x, y, backend=backend), "+inf")
    got = bk.token_logprobs(x, y, softcap=4.0, backend=backend)
    want = ref.token_logprobs(x.double(), y, softcap=4.0)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=3e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_neginf_row(backend):
    """No softcap: a kept all -inf row has no distribution (a named error on every backend).  With a softcap
    -inf maps to -softcap, the row is uniform: −log V on every backend (the cpu kernel raised)."""
    x = torch.randn(3, 7, generator=_gen(13))
    x[1] = -INF
    y = torch.tensor([0, 1, 2])
    _raises(ValueError, "logits", lambda: bk.token_logprobs(x, y, backend=backend), "-inf")
    lp = bk.token_logprobs(x, y, softcap=3.0, backend=backend)
    assert abs(lp[1].item() + math.log(7)) < 1e-6


# ----------------------------------------------------------------------------------------------------
# temperature and softcap outside what fp32 kernels can compute
# ----------------------------------------------------------------------------------------------------
def _token_calls(backend, **kw):
    x = torch.randn(3, 7, generator=_gen(14))
    y = torch.tensor([0, 1, 2])
    h, w = torch.randn(3, 4, generator=_gen(15)), torch.randn(7, 4, generator=_gen(16))
    calls = {
        "token_logprobs": lambda: bk.token_logprobs(x, y, backend=backend, **kw),
        "and_grad": lambda: bk.token_logprobs_and_grad(x, y, torch.ones(3), backend=backend, **kw),
        "sequence": lambda: bk.sequence_logprobs(x.view(1, 3, 7), y.view(1, 3), backend=backend, **kw),
        "linear": lambda: bk.linear_token_logprobs(h, w, y, backend=backend, **kw),
    }
    if "softcap" not in kw:
        calls["jeffreys"] = lambda: bk.token_jeffreys(x, x.flip(0), backend=backend, **kw)
    return calls


@pytest.mark.parametrize(
    "kw",
    [
        dict(softcap=1e-50),  # 0 in fp32: was silently "no softcap"
        dict(softcap=1e-46),  # below the smallest fp32 subnormal: the same
        dict(softcap=1e-39),  # subnormal: 1/c overflows
        dict(softcap=1e39),  # inf in fp32: was "the kernel rejected its arguments (bad size or stride)"
        dict(temperature=1e-50),
        dict(temperature=1e-40),  # subnormal: NaN on cpu, -inf/NaN on torch
        dict(temperature=1e39),
        dict(temperature=1e38),  # finite in fp32, but 1/T is subnormal
    ],
    ids=lambda kw: f"{next(iter(kw))}={next(iter(kw.values())):g}",
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scalars_outside_the_fp32_range_are_rejected(backend, kw):
    (name,) = kw
    for fn in _token_calls(backend, **kw).values():
        _raises(ValueError, name, fn, "2^-126, 2^126")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_over_temperature_must_be_representable(backend):
    for fn in _token_calls(backend, softcap=1e30, temperature=1e-10).values():
        _raises(ValueError, "softcap", fn, "temperature", "2^126")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scalars_at_the_edges_of_the_range(backend):
    """T = 2^126 and softcap = 2^-126 give the uniform −log V their limits imply; T = 2^-126 the one-hot of
    the row maximum (log-prob 0 at the argmax, −inf elsewhere); softcap = 2^126 is no cap at all."""
    x = torch.randn(5, 7, generator=_gen(17)) * 3
    y = torch.tensor([0, 1, 2, 3, 4])
    uniform = torch.full((5,), -math.log(7), dtype=torch.float64)
    for kw in (dict(temperature=HUGE), dict(softcap=TINY)):
        torch.testing.assert_close(bk.token_logprobs(x, y, backend=backend, **kw).double(), uniform)
    # c/T = 1/4: every logit saturates to ±c, so z = ±1/4 (the fp64 reference of the same formula)
    kw = dict(softcap=TINY, temperature=TINY * 4)
    want = ref.token_logprobs(x.double(), y, **kw)
    assert not torch.allclose(want, uniform)
    torch.testing.assert_close(bk.token_logprobs(x, y, backend=backend, **kw).double(), want)
    lp = bk.token_logprobs(x, x.argmax(-1), temperature=TINY, backend=backend)
    assert torch.equal(lp, torch.zeros(5))
    other = (x.argmax(-1) + 1) % 7  # (x_y − x_max)/T: about −1e38, or below −FLT_MAX (−inf in fp32)
    want = ref.token_logprobs(x.double(), other, temperature=TINY).float()
    assert torch.isneginf(want).any() and torch.isfinite(want).any()
    torch.testing.assert_close(bk.token_logprobs(x, other, temperature=TINY, backend=backend), want)
    torch.testing.assert_close(
        bk.token_logprobs(x, y, softcap=HUGE, backend=backend), bk.token_logprobs(x, y, backend=backend)
    )


# ----------------------------------------------------------------------------------------------------
# the autograd backward at tiny temperatures, against fp64
# ----------------------------------------------------------------------------------------------------
# Stated bound (README): max |grad − grad_fp64| ≤ GRAD_RTOL · max |grad_fp64| for any temperature in range
# (measured: at most 5e-7 for token_logprobs and 3e-6 for token_jeffreys, vectorised or not).
GRAD_RTOL = 1e-5


def _tempered(t, n=6, v=300, offset=4.0):
    """Logits whose differences are O(T) (a non-trivial distribution at temperature T) on top of a large
    common value, so |z| = |x|/T is as large as fp32 allows resolving (up to ~1e6 at offset 4)."""
    g = _gen(18)
    spread = max(t, offset * 2.0**-20)  # at least 2^4 ulps of the offset between neighbours
    x = offset + spread * torch.randn(n, v, generator=g) * 3
    return (
        x.float(),
        torch.randint(0, v, (n,), generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
    )


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("temperature", [1e-1, 1e-3, 1e-6, 1e-12, 1e-30, TINY])
@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_backward_at_tiny_temperatures(backend, temperature):
    """The autograd backward recomputed p = exp(x/T − lse) from an fp32 lse: an error of one rounding of |z|
    (2.7e-3 relative at T = 1e-4, inf below 1e-10 on cpu).  It now shifts by the saved row max first and
    stays at fp32 rounding, like the *_and_grad path, for every temperature the API accepts."""
    x, y, g, gh = _tempered(temperature)
    x64 = x.double().requires_grad_(True)
    lp64, ent64 = ref.token_logprobs(x64, y, temperature=temperature, return_entropy=True)
    (want,) = torch.autograd.grad(
        (lp64 * g.double()).sum() + (ent64 * gh.double()).sum(), x64, retain_graph=True
    )
    xl = x.clone().requires_grad_(True)
    lp, ent = bk.token_logprobs(xl, y, temperature=temperature, return_entropy=True, backend=backend)
    ((lp * g).sum() + (ent * gh).sum()).backward()
    assert _rel_err(xl.grad, want) <= GRAD_RTOL
    torch.testing.assert_close(lp.double(), lp64.detach(), rtol=1e-6, atol=1e-5)
    (want_g,) = torch.autograd.grad((lp64 * g.double()).sum(), x64)
    _, grad2 = bk.token_logprobs_and_grad(x, y, g, temperature=temperature, backend=backend)
    assert _rel_err(grad2, want_g) <= GRAD_RTOL


@pytest.mark.parametrize("temperature", [1e-3, 1e-6, 1e-12, TINY])
@pytest.mark.parametrize("backend", BACKENDS)
def test_token_jeffreys_backward_at_tiny_temperatures(backend, temperature):
    x, _, g, _ = _tempered(temperature)
    a, _, _, _ = _tempered(temperature, offset=-2.0)
    a = a.roll(1, 0)
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(
        (ref.token_jeffreys(x64, a.double(), beta=0.3, temperature=temperature) * g.double()).sum(), x64
    )
    xl = x.clone().requires_grad_(True)
    (bk.token_jeffreys(xl, a, beta=0.3, temperature=temperature, backend=backend) * g).sum().backward()
    assert _rel_err(xl.grad, want) <= GRAD_RTOL


# ----------------------------------------------------------------------------------------------------
# non-finite sequence log-probs in the losses
# ----------------------------------------------------------------------------------------------------
def _bond_args():
    g = _gen(19)
    return dict(
        policy_logp=torch.randn(3, 2, generator=g).requires_grad_(True),
        policy_ref_logp=torch.randn(3, 2, generator=g),
        policy_rewards=torch.randn(3, 2, generator=g),
        ref_rewards=torch.randn(3, 5, generator=g),
        bon_logp=torch.randn(3, 1, generator=g).requires_grad_(True),
    )


def _jbond_args():
    g = _gen(20)
    return dict(
        policy_logp=torch.randn(4, generator=g).requires_grad_(True),
        anchor_logp=torch.randn(4, generator=g),
        policy_rewards=torch.randn(4, generator=g),
        anchor_rewards=torch.randn(4, 2, generator=g),
        best_anchor_logp=torch.randn(4, generator=g).requires_grad_(True),
    )


@pytest.mark.parametrize("value", [-INF, NAN, INF], ids=["-inf", "nan", "+inf"])
@pytest.mark.parametrize("name", ["policy_logp", "policy_ref_logp", "bon_logp"])
def test_bond_loss_rejects_non_finite_log_probs(name, value):
    """A -inf policy log-prob gave a NaN loss and ±inf gradients for its whole prompt, a NaN input a NaN
    loss, silently.  validate=True (the default) now names the argument, the value and its position."""
    args = _bond_args()
    with torch.no_grad():
        args[name][1, 0] = value
    for fp64 in (False, True):  # the cpu kernel path and the reference path
        a = {k: (v.double() if fp64 else v) for k, v in args.items()}
        _raises(ValueError, name, lambda a=a: bk.bond_loss(*a.values(), n=4), "finite", "(1, 0)")
    out = bk.bond_loss(*args.values(), n=4, validate=False)  # opted out: the arithmetic as it falls
    assert not torch.isfinite(out.loss)


@pytest.mark.parametrize("value", [-INF, NAN], ids=["-inf", "nan"])
@pytest.mark.parametrize("name", ["policy_logp", "anchor_logp", "best_anchor_logp"])
def test_jbond_loss_rejects_non_finite_log_probs(name, value):
    args = _jbond_args()
    with torch.no_grad():
        args[name][2] = value
    _raises(ValueError, name, lambda: bk.jbond_loss(*args.values()), "finite", "(2,)")
    out = bk.jbond_loss(*args.values(), validate=False)
    assert not torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------------
# the triton kernels under the interpreter: the same contract
# ----------------------------------------------------------------------------------------------------
@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["expanded", "overlapping"])
def test_triton_inplace_on_aliased_logits_raises(kind):
    x = _aliased(kind)
    y = torch.randint(0, x.shape[-1], x.shape[:-1], generator=_gen(2))
    _raises(
        ValueError,
        "logits",
        lambda: bk.token_logprobs_and_grad(x, y, torch.ones(4), backend="triton", inplace=True),
    )


@pytest.mark.interpret
@pytest.mark.parametrize("kind", ["all-nan", "neginf-and-one-nan", "one-nan"])
def test_triton_nan_logits_say_nan(kind):
    x = _rows_with(kind)
    y = torch.tensor([0, 3, 5, 8])
    _raises(ValueError, "logits", lambda: bk.token_logprobs(x, y, backend="triton"), "NaN")
    _raises(
        ValueError, "logits", lambda: bk.token_logprobs_and_grad(x, y, torch.ones(4), backend="triton"), "NaN"
    )
    _raises(
        ValueError,
        "policy_logits",
        lambda: bk.token_jeffreys(x, torch.zeros_like(x), backend="triton"),
        "NaN",
    )


@pytest.mark.interpret
def test_triton_all_neginf_and_posinf_rows():
    x = torch.randn(3, 7, generator=_gen(13))
    x[1] = -INF
    y = torch.tensor([0, 1, 2])
    _raises(ValueError, "logits", lambda: bk.token_logprobs(x, y, backend="triton"), "-inf")
    lp = bk.token_logprobs(x, y, softcap=3.0, backend="triton")
    assert abs(lp[1].item() + math.log(7)) < 1e-6
    x = _rows_with("posinf")
    _raises(
        ValueError,
        "logits",
        lambda: bk.token_logprobs(x, torch.tensor([0, 3, 5, 8]), backend="triton"),
        "+inf",
    )


@pytest.mark.interpret
@pytest.mark.parametrize(
    "kw", [dict(softcap=1e-50), dict(temperature=1e-40), dict(temperature=1e39)], ids=str
)
def test_triton_scalars_outside_the_fp32_range_are_rejected(kw):
    (name,) = kw
    for fn in _token_calls("triton", **kw).values():
        _raises(ValueError, name, fn, "2^-126, 2^126")


# The Triton kernels save the split log-sum-exp (row max of the capped logits, ln Σ relative to it) and
# take every exponent relative to the row max before dividing by T, as the cpu kernels do.
@pytest.mark.interpret
@pytest.mark.parametrize("temperature", [1e-3, 1e-12, TINY])
def test_triton_autograd_backward_at_tiny_temperatures(temperature):
    x, y, g, _ = _tempered(temperature)
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(
        (ref.token_logprobs(x64, y, temperature=temperature) * g.double()).sum(), x64
    )
    xl = x.clone().requires_grad_(True)
    (bk.token_logprobs(xl, y, temperature=temperature, backend="triton") * g).sum().backward()
    assert _rel_err(xl.grad, want) <= GRAD_RTOL


@pytest.mark.interpret
@pytest.mark.parametrize("temperature", [1e-3, 1e-12, TINY])
def test_triton_token_jeffreys_backward_at_tiny_temperatures(temperature):
    x, _, g, _ = _tempered(temperature)
    a = _tempered(temperature, offset=-2.0)[0].roll(1, 0)
    x64 = x.double().requires_grad_(True)
    (want,) = torch.autograd.grad(
        (ref.token_jeffreys(x64, a.double(), beta=0.3, temperature=temperature) * g.double()).sum(), x64
    )
    xl = x.clone().requires_grad_(True)
    (bk.token_jeffreys(xl, a, beta=0.3, temperature=temperature, backend="triton") * g).sum().backward()
    assert _rel_err(xl.grad, want) <= GRAD_RTOL


def test_split_lse_flags_agree():
    """The contract's SPLIT_LSE set and the Triton launchers' own flags say the same (the kernels module may not
    import the layer above it, so the fact is written in both places)."""
    import importlib

    from bond_kernels.ops.token_logprobs import SPLIT_LSE

    for name in ("token_logprobs", "token_jeffreys"):
        module = importlib.import_module(f"bond_kernels.ops.triton.{name}")
        assert module.SPLIT_LSE == ("triton" in SPLIT_LSE), name


# ----------------------------------------------------------------------------------------------------
# found by the fuzz suite (tests/test_fuzz.py)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_after_a_masked_label(backend):
    """A label whose logit is -inf has log-prob -inf; the packed sums subtracted one fp64 prefix sum, so every
    later sequence became NaN (inf − inf), and a huge log-prob absorbed the later ones to 0."""
    x = torch.zeros(4, 3)
    x[0, 1] = -INF
    y = torch.tensor([1, 0, 0, 0])
    cu = torch.tensor([0, 1, 1, 4])
    seq = bk.sequence_logprobs(x, y, cu_seqlens=cu, backend=backend)
    assert seq[0] == -INF and seq[1] == 0
    assert abs(seq[2].item() + 3 * math.log(3)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_jeffreys_with_a_zero_weight_on_an_infinite_kl(backend):
    """beta = 0 is KL(q‖p) alone; where KL(p‖q) is infinite (q underflows where p has mass) the
    divergence was 0·inf = NaN (and a misleading error).  T = 2^-126: log q is -inf in fp32.  A weight of 0 now drops its term, in value and
    gradient."""
    p = torch.zeros(2, 4)
    q = torch.tensor([[0.0, -10.0, -20.0, -30.0], [30.0, 20.0, 10.0, 0.0]])  # (q_v − q_max)/T < −FLT_MAX
    xl = p.clone().requires_grad_(True)
    div = bk.token_jeffreys(xl, q, beta=0.0, temperature=TINY, backend=backend)
    want = ref.token_jeffreys(p.double(), q.double(), beta=0.0, temperature=TINY)
    assert torch.isfinite(div).all()
    torch.testing.assert_close(div.double(), want, rtol=1e-6, atol=0)
    div.sum().backward()
    assert torch.isfinite(xl.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_row_max_is_exactly_zero(backend):
    """With a softcap the shift was c·tanh(x_max/c), which -ffp-contract fused unrounded on one side only: at
    c/T = 4e31 a single-word row's log-prob was +inf (it is 0), and its gradient not 0."""
    x = torch.tensor([[1.5410]])
    for temperature in (1e-6, 7.9e-31):
        xl = x.clone().requires_grad_(True)
        lp, ent = bk.token_logprobs(
            xl, torch.tensor([0]), softcap=30.0, temperature=temperature, return_entropy=True, backend=backend
        )
        (lp + ent).sum().backward()
        assert lp.item() == 0.0 and ent.item() == 0.0 and xl.grad.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_head_with_a_bias_that_masks_whole_tiles(backend, monkeypatch):
    """A bias of -inf (a masked word) over a whole vocabulary tile made the tile kernels raise "a row whose
    entries are all -inf" for rows that have mass in other tiles; and a row masked everywhere said
    "bias must be finite" instead of naming the masking."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,1")
    hid = torch.randn(3, 4, generator=_gen(21))
    w = torch.randn(5, 4, generator=_gen(22))
    b = torch.zeros(5)
    b[[0, 3]] = -INF
    y = torch.tensor([0, 1, 4])
    got = bk.linear_token_logprobs(hid, w, y, bias=b, backend=backend)
    want = ref.token_logprobs(torch.nn.functional.linear(hid.double(), w.double(), b.double()), y)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert got[0] == -INF
    _raises(
        ValueError,
        "bias",
        lambda: bk.linear_token_logprobs(hid, w, y, bias=torch.full((5,), -INF), backend=backend),
        "all -inf",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_needs_a_unit_vocabulary_stride(backend):
    """The torch backend wrote a transposed view in place while the cpu backend raised; both raise now."""
    base = torch.randn(5, 4, generator=_gen(23))
    x = base.t()  # (4, 5), strides (1, 4)
    y = torch.tensor([0, 1, 2, 3])
    _raises(
        ValueError,
        "logits",
        lambda: bk.token_logprobs_and_grad(x, y, torch.ones(4), backend=backend, inplace=True),
        "contiguous last dimension",
    )
    _raises(
        ValueError,
        "logits",
        lambda: bk.token_logprobs(x, y, backend=backend, inplace=True),
        "contiguous last dimension",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_gradient_does_not_underflow(backend):
    """softcap 2^-126 at T = 1e30: the reference's chain rule (grad·c)·sech²·(1/c) underflowed to 0."""
    x = torch.tensor([[0.0, -0.0, 0.0]])
    xl = x.clone().requires_grad_(True)
    bk.token_logprobs(xl, torch.tensor([1]), softcap=TINY, temperature=1e30, backend=backend).sum().backward()
    torch.testing.assert_close(xl.grad, torch.tensor([[-1 / 3, 2 / 3, -1 / 3]]) / 1e30, rtol=1e-5, atol=0)


@pytest.mark.interpret
def test_triton_rows_below_the_initial_running_max():
    x = torch.tensor([[-math.inf]])
    lp = bk.token_logprobs(x, torch.tensor([0]), softcap=1e37, backend="triton")  # z = -1e37·log2(e)
    assert lp.item() == 0.0


@pytest.mark.interpret
def test_triton_large_softcap_is_accurate():
    x = torch.tensor([[1.5410, -0.2934]])
    got = bk.token_logprobs(x, torch.tensor([1]), softcap=1e6, backend="triton")
    want = ref.token_logprobs(x.double(), torch.tensor([1]), softcap=1e6)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_jeffreys_zero_weight_with_a_masked_anchor_word(backend):
    """The anchor masks a word (-inf) the policy gives mass: KL(p‖q) = inf, and beta = 0 is KL(q‖p) alone."""
    p, q = torch.zeros(2, 4), torch.zeros(2, 4)
    q[:, 1] = -INF
    xl = p.clone().requires_grad_(True)
    div = bk.token_jeffreys(xl, q, beta=0.0, backend=backend)
    div.sum().backward()
    torch.testing.assert_close(div, torch.full((2,), math.log(4 / 3)))
    torch.testing.assert_close(xl.grad[0], torch.tensor([-1 / 12, 1 / 4, -1 / 12, -1 / 12]))


@pytest.mark.interpret
def test_triton_token_jeffreys_zero_weight_with_a_masked_anchor_word():
    p, q = torch.zeros(2, 4), torch.zeros(2, 4)
    q[:, 1] = -INF
    xl = p.clone().requires_grad_(True)
    div = bk.token_jeffreys(xl, q, beta=0.0, backend="triton")
    torch.testing.assert_close(div, torch.full((2,), math.log(4 / 3)))
    div.sum().backward()
    torch.testing.assert_close(xl.grad[0], torch.tensor([-1 / 12, 1 / 4, -1 / 12, -1 / 12]))
