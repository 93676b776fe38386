"""Adversarial fuzzing of the public API (issue 14): every op on every backend CI has, against fp64 formulas
written here, on random shapes, dtypes, layouts, special values and option edges.

Each example draws the inputs, works out from them alone what the contract (README, "Odd inputs") says must
happen, and checks every backend: either the values and gradients of the formula below, to the stated
tolerance, or the same named ``ValueError``.  It also checks that nothing the caller passed in was
modified, unless ``inplace=True`` asked for it.

Reproducible: hypothesis runs derandomised (the examples are a function of the test's code), without an
example database.  The budget is a profile, ``BOND_FUZZ=ci`` (default, about a minute for the CPU part and
a minute for the interpreter part on 2 cores), ``small`` (the sanitizer job) or ``long``; the number of
examples per test scales with it.  The CPU part runs the ``torch`` and ``cpu`` backends; the ``interpret``
part the ``triton`` kernels under ``TRITON_INTERPRET=1`` (with the limits stated at ``TRITON_LIMITS``).
"""

import math
import os

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402

_PROFILES = {"small": 0.5, "ci": 3.0, "long": 30.0}
_SCALE = _PROFILES[os.environ.get("BOND_FUZZ", "ci")]


def _fuzz(examples):
    """Derandomised hypothesis settings with ``examples`` (times the profile's scale) examples."""
    return settings(
        max_examples=max(4, int(examples * _SCALE)),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


CPU_BACKENDS = ["torch"] + (["cpu"] if _ext.has_cpu() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TINY, HUGE = 2.0**-126, 2.0**126
F32_EPS = 2.0**-24

# Tolerances against the fp64 formulas (README, "Odd inputs"): fp32 outputs to an absolute VALUE_ATOL plus a
# relative VALUE_RTOL; gradients, in the logits' dtype, to GRAD_RTOL of their largest entry plus a rounding
# of the dtype.  Backends whose kernels keep a whole fp32 log-sum-exp (triton, the linear head, until the
# split lands there) add its one rounding of |z|max.
VALUE_ATOL, VALUE_RTOL, GRAD_RTOL = 5e-5, 2e-6, 1e-5
DTYPE_RTOL = {
    torch.float32: 0.0,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
}  # one ulp: a near-tie may round either way
WHOLE_LSE = {"triton"}

# The triton kernels (under the interpreter) until the kernel changes of the issue 14 report land: their
# forward keeps the running max of x·log2(e)/T, which overflows fp32 for tiny T, and starts it at -1e30, so
# a row whose z all lie below -1e30 (tiny T, or a softcap of 1e37 over -inf entries) gets +inf/NaN; and
# their tanh, 1 − 2/(e^{2y} + 1), has an absolute error of ~6e-8 near 0, c·6e-8 in z (0.06 at c = 1e6).  The
# interpreter part therefore draws T >= 1e-3 and softcaps <= 100; test_odd_inputs.py has the strict xfails.
TRITON_LIMITS = dict(min_temperature=1e-3, max_softcap=100.0)


# ----------------------------------------------------------------------------------------------------
# strategies
# ----------------------------------------------------------------------------------------------------
def _temperature(min_t=TINY):
    edges = [t for t in (TINY, 2.0**-100, 1e-30, 1e-6, 1e-3, HUGE, 1e30) if t >= min_t]
    return st.one_of(
        st.just(1.0),
        st.sampled_from(edges),
        st.floats(math.log(max(min_t, 1e-3)), math.log(1e3)).map(math.exp),
    )


def _softcap(max_c=HUGE):
    return st.one_of(
        st.none(),
        st.sampled_from([c for c in (TINY, 1e-3, 0.5, 30.0, 1e6, HUGE) if c <= max_c]),
        st.floats(math.log(0.1), math.log(min(100.0, max_c))).map(math.exp),
    )


LAYOUTS = ["contiguous", "sliced", "transposed_last", "expanded", "overlapping", "3d", "3d_shift", "3d_swap"]


@st.composite
def logits_case(draw, max_v=300, max_n=6, min_t=TINY, max_c=HUGE):
    """A logits view (N, V) or (B, T, V) over a base buffer, labels, special values and options."""
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(st.one_of(st.just(1), st.integers(2, 9), st.integers(10, max_v), st.sampled_from([127, 257])))
    v = min(v, max_v)
    layout = draw(st.sampled_from(LAYOUTS))
    three_d = layout.startswith("3d")
    lead = (
        (draw(st.integers(0, 3)), draw(st.integers(0, max_n // 2 + 1)))
        if three_d
        else (draw(st.integers(0, max_n)),)
    )
    n = math.prod(lead)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 1.0, 4.0, 30.0]))
    if layout == "contiguous":
        base = torch.randn(*lead, v, generator=g)
        view = (tuple(base.shape), base.stride(), 0)
    elif layout == "sliced":  # a column slice: row stride > V
        extra = draw(st.integers(1, 5))
        base = torch.randn(n, v + extra, generator=g)
        view = ((n, v), (v + extra, 1), draw(st.integers(0, extra)))
    elif layout == "transposed_last":  # vocabulary stride != 1: the API copies
        base = torch.randn(v, n, generator=g)
        view = ((n, v), (1, n), 0)
    elif layout == "expanded":  # stride-0 rows
        base = torch.randn(1, v, generator=g)
        view = ((n, v), (0, 1), 0)
    elif layout == "overlapping":  # row stride < V
        step = draw(st.integers(1, max(1, v - 1)))
        base = torch.randn(step * max(n - 1, 0) + v, generator=g)
        view = ((n, v), (step, 1), 0)
    elif layout == "3d":
        base = torch.randn(*lead, v, generator=g)
        view = (tuple(base.shape), base.stride(), 0)
    elif layout == "3d_shift":  # logits[:, :-1]
        base = torch.randn(lead[0], lead[1] + 1, v, generator=g)
        view = (lead + (v,), base.stride(), 0)
    else:  # "3d_swap": (T, B, V) memory read as (B, T, V)
        base = torch.randn(lead[1], lead[0], v, generator=g)
        view = (lead + (v,), (v, lead[0] * v, 1), 0)
    base = base * scale
    flat = base.view(-1)
    if flat.numel():
        special = draw(st.sampled_from(["none", "none", "mask", "mask", "nan", "posinf", "neginf_row"]))
        if special == "mask":
            flat[torch.rand(flat.shape, generator=g) < 0.3] = -math.inf
        elif special == "nan":
            flat[draw(st.integers(0, flat.numel() - 1))] = math.nan
        elif special == "posinf":
            flat[draw(st.integers(0, flat.numel() - 1))] = math.inf
        elif special == "neginf_row":
            start = draw(st.integers(0, flat.numel() - 1))
            flat[start : start + v] = -math.inf
    base = base.to(dtype)
    ignore_index = draw(st.sampled_from([-100, -100, 0]))
    labels = torch.randint(0, v, lead, generator=g)
    ignore = draw(st.sampled_from([0.0, 0.3, 1.0]))
    labels[torch.rand(lead, generator=g) < ignore] = ignore_index
    if n and draw(st.integers(0, 19)) == 0:  # now and then a label out of range
        labels.view(-1)[0] = v + draw(st.integers(0, 3))
    return dict(
        base=base,
        view=view,
        labels=labels,
        ignore_index=ignore_index,
        temperature=draw(_temperature(min_t)),
        softcap=draw(_softcap(max_c)),
        return_entropy=draw(st.booleans()),
        inplace=draw(st.sampled_from([False, False, True])),
        seed=seed,
    )


def _amax(t):
    return float(t.detach().abs().max()) if t.numel() else 0.0


def _same(a, b):
    """Bitwise equality (NaN included)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.shape == b.shape and torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _view(base, view):
    size, stride, offset = view
    return base.as_strided(size, stride, offset)


# ----------------------------------------------------------------------------------------------------
# fp64 formulas
# ----------------------------------------------------------------------------------------------------
def fp64_token(x, y, temperature, softcap, ignore_index):
    """(logp, entropy) in fp64: z = c·tanh(x/c)/T, shifted by the row max before the division."""
    keep = y != ignore_index
    x = torch.where(keep.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype))
    w = softcap * torch.tanh(x / softcap) if softcap else x
    t = (w - w.amax(-1, keepdim=True).detach()) / temperature
    lse = torch.logsumexp(t, -1)
    safe = torch.where(keep, y, torch.zeros_like(y))
    logp = torch.where(keep, t.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse, torch.zeros(()).double())
    p = torch.softmax(t, -1)
    tf = torch.where(torch.isneginf(t), torch.zeros(()).double(), t)
    ent = torch.where(keep, lse - (p * tf).sum(-1), torch.zeros(()).double())
    return logp, ent


def expected_token_error(x64, y, temperature, softcap, ignore_index, inplace, view):
    """The named error the contract requires for these inputs, as (exception, argument), or None, in the
    order the API checks: the in-place target, the scalars, the labels, then the rows."""
    v = x64.shape[-1]
    if inplace and not _writable(view, x64.shape):
        return ValueError, "logits"
    if inplace and view[1][-1] != 1 and view[0][-1] > 1 and x64.numel() > 1:
        return ValueError, "logits"  # in place needs a unit vocabulary stride
    if softcap and softcap / temperature > HUGE:
        return ValueError, "softcap"
    yf = y.reshape(-1)
    if bool(((yf != ignore_index) & ((yf < 0) | (yf >= v))).any()):
        return ValueError, "labels"
    keep = (y != ignore_index).reshape(-1)
    rows = x64.reshape(-1, v)[keep]
    bad = torch.isnan(rows).any(-1)
    if not softcap:
        bad |= torch.isposinf(rows).any(-1) | torch.isneginf(rows).all(-1)
    return (ValueError, "logits") if bool(bad.any()) else None


def _writable(view, shape):
    """No two elements of the view share memory (exact: the views drawn here are small)."""
    size, stride, _ = view
    offsets = torch.zeros((), dtype=torch.int64)
    for sz, st_ in zip(size, stride):
        offsets = (offsets.unsqueeze(-1) + torch.arange(sz) * st_).reshape(-1)
    return offsets.numel() == torch.unique(offsets).numel()


def _z_max(x64, temperature, softcap):
    finite = x64[torch.isfinite(x64)]
    if not finite.numel():
        return 0.0
    top = min(float(finite.abs().max()), softcap or math.inf)
    return top / temperature


def _close_values(got, want, extra=0.0, what=""):
    """fp32 results against the fp64 formula rounded to fp32 (below -3.4e38 that is -inf, as it must be)."""
    got, want = got.double(), want.float().double()
    assert got.shape == want.shape, what
    same_inf = (got == want) | (torch.isnan(got) & torch.isnan(want))
    err = torch.where(same_inf, torch.zeros(()).double(), (got - want).abs())
    tol = VALUE_ATOL + VALUE_RTOL * want.abs() + extra
    tol = torch.where(torch.isfinite(tol), tol, torch.zeros(()).double())
    bad = (err > tol) | (torch.isnan(got) != torch.isnan(want))
    assert not bool(bad.any()), (
        f"{what}: max error {float(err[bad].max())} (got {got[bad][:4]}, want {want[bad][:4]})"
    )


def _close_grad(got, want, dtype, scale, extra=0.0, what="", summed=False, saturation=None):
    """A gradient in ``dtype`` against the fp64 one rounded to ``dtype`` (values past the dtype's range clamp
    to its max on both sides: fp16 gradients at small T overflow as the exact ones do).  ``scale``: the size
    of the gradient's rows, max |upstream| / T (an entry is upstream·(onehot − p)/T: near a one-hot row the
    exact values are tiny differences, 1 − p_y, which fp32 cannot resolve below 2^-24 of the row's scale).
    ``summed``: autograd added several rows' gradients in ``dtype`` (an aliased leaf), rounding each term."""
    fin = torch.finfo(dtype)
    w = want.to(dtype).double().clamp(-fin.max, fin.max)
    gd = got.double().clamp(-fin.max, fin.max)
    scale = min(scale, fin.max)
    rounding = DTYPE_RTOL[dtype] * (4 * scale if summed else w.abs())
    tol = (GRAD_RTOL + extra) * scale + rounding + fin.tiny
    if saturation is not None:  # fp32 rounds 1 − tanh² to 2^-24 / (1 − |tanh|) of itself (README)
        tol = tol + 4 * F32_EPS * w.abs() / saturation.clamp_min(F32_EPS)
    err = torch.where(gd == w, torch.zeros(()).double(), (gd - w).abs())  # equal infinities are equal
    bad = (err > tol) | (torch.isnan(gd) != torch.isnan(w))
    # an exact value past the dtype's range has no representation: inf or NaN there is not an error
    bad &= ~(want.abs() > fin.max)
    assert not bool(bad.any()), f"{what}: gradient error {float(err.max()):.3g} of max {scale:.3g}"


# ----------------------------------------------------------------------------------------------------
# token_logprobs, token_logprobs_and_grad, sequence_logprobs(_and_grad)
# ----------------------------------------------------------------------------------------------------
def check_token_case(case, backend):
    base, view, y = case["base"], case["view"], case["labels"]
    temperature, softcap, ii = case["temperature"], case["softcap"], case["ignore_index"]
    want_ent, inplace = case["return_entropy"], case["inplace"]
    dtype = base.dtype
    base64 = base.double().requires_grad_(True)
    x64 = _view(base64, view)
    error = expected_token_error(x64.detach(), y, temperature, softcap, ii, inplace, view)
    error_and_grad = error
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + 1))
    gh = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"] + 2))
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ii, backend=backend)
    zmax = _z_max(x64.detach(), temperature, softcap)
    sat = (1 - torch.tanh(base.double() / softcap).abs()) if softcap else None
    sat_view = _view(sat, view) if softcap else None
    extra = 4 * F32_EPS * zmax if backend in WHOLE_LSE else 0.0
    if softcap:  # fp32 tanh rounds to ~2^-24 of the cap: |Δz| up to 2^-23·softcap/T on every backend
        extra += 4 * F32_EPS * min(zmax, softcap / temperature) * 2

    # the autograd path (inplace: the backward writes into the leaf's buffer)
    leaf = base.clone().requires_grad_(True)
    before = base.clone()
    event(f"{backend}: {error[1] + ' error' if error else 'values'}")
    if error_and_grad is not None:
        with pytest.raises(error_and_grad[0], match=rf"(?<![\w.]){error_and_grad[1]}(?!\w)"):
            bk.token_logprobs_and_grad(_view(x_copy := base.clone(), view), y, g, inplace=inplace, **kw)
        if inplace and not _writable(view, x64.shape):
            assert _same(x_copy, base), "an aliased in-place call wrote into the logits"
    if error is not None:
        with pytest.raises(error[0], match=rf"(?<![\w.]){error[1]}(?!\w)"):
            bk.token_logprobs(_view(leaf, view), y, return_entropy=want_ent, inplace=inplace, **kw)
        assert _same(leaf.detach(), before), "a rejected call wrote into the logits"
        return
    out = bk.token_logprobs(_view(leaf, view), y, return_entropy=want_ent, inplace=inplace, **kw)
    lp, ent = out if want_ent else (out, None)
    w_lp, w_ent = fp64_token(x64, y, temperature, softcap, ii)
    _close_values(lp, w_lp.detach(), extra, f"{backend} logp")
    loss64 = (w_lp * g.double()).sum()
    loss = (lp * g).sum()
    if want_ent:
        _close_values(ent, w_ent.detach(), extra, f"{backend} entropy")
        loss64 = loss64 + (w_ent * gh.double()).sum()
        loss = loss + (ent * gh).sum()
    (want_grad,) = torch.autograd.grad(loss64, base64)
    if lp.requires_grad:
        loss.backward()
        got = leaf.grad if leaf.grad is not None else torch.zeros_like(base)
        aliased = not _writable(view, x64.shape)
        rows = max(1, y.numel()) if aliased else 1  # an aliased element sums up to every row's gradient
        g_scale = (
            rows * (_amax(g) + (_amax(gh) * (2 + math.log(view[0][-1])) if want_ent else 0.0)) / temperature
        )
        _close_grad(
            got, want_grad, dtype, g_scale, extra, f"{backend} autograd", summed=aliased, saturation=sat
        )
    if not inplace:
        assert _same(base, before), "token_logprobs modified its input"

    if error_and_grad is not None:
        return
    # the gradient-in-forward path: the gradient of each element of the view (aliased ones separately)
    x = base.clone() if inplace else base
    logp2, grad2 = bk.token_logprobs_and_grad(_view(x, view), y, g, inplace=inplace, **kw)
    x_elem = x64.detach().clone().requires_grad_(True)
    w_lp2, _ = fp64_token(x_elem, y, temperature, softcap, ii)
    (want_elem,) = torch.autograd.grad((w_lp2 * g.double()).sum(), x_elem)
    w_lp2 = w_lp2.detach()
    _close_values(logp2, w_lp2, extra, f"{backend} and_grad logp")
    _close_grad(
        grad2, want_elem, dtype, _amax(g) / temperature, extra, f"{backend} and_grad", saturation=sat_view
    )
    if inplace:  # the buffer holds the gradient; what the view does not cover is untouched
        assert grad2.data_ptr() == _view(x, view).data_ptr()
        covered = torch.zeros(base.shape, dtype=torch.bool)
        _view(covered, view).fill_(True)
        assert _same(x[~covered], base[~covered]), "in place wrote outside the logits view"
    else:
        assert _same(base, before), "token_logprobs_and_grad modified its input"

    # sequences: padded (3-D) sums over T; packed (2-D) sums over cu_seqlens segments
    if len(view[0]) == 3 and not inplace:
        seq = bk.sequence_logprobs(_view(base, view), y, **kw)
        _close_values(seq, w_lp2.sum(-1), extra * y.shape[-1], f"{backend} sequence")
        coef = torch.randn(y.shape[0], generator=torch.Generator().manual_seed(case["seed"] + 3))
        seq2, sgrad = bk.sequence_logprobs_and_grad(_view(base, view), y, coef, **kw)
        _close_values(seq2, w_lp2.sum(-1), extra * y.shape[-1], f"{backend} sequence_and_grad")
    if len(view[0]) == 2 and not inplace and y.numel():
        cuts = sorted(
            torch.randint(
                0, y.numel() + 1, (2,), generator=torch.Generator().manual_seed(case["seed"])
            ).tolist()
        )
        cu = torch.tensor([0] + cuts + [y.numel()])
        seq = bk.sequence_logprobs(_view(base, view), y, cu_seqlens=cu, **kw)
        sums = torch.stack([w_lp2[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
        _close_values(seq, sums, extra * y.numel(), f"{backend} packed sequence")


@_fuzz(150)
@given(case=logits_case())
def test_token_ops_cpu_backends(case):
    for backend in CPU_BACKENDS:
        check_token_case(case, backend)


@pytest.mark.interpret
@_fuzz(30)
@given(
    case=logits_case(
        max_v=130, max_n=4, min_t=TRITON_LIMITS["min_temperature"], max_c=TRITON_LIMITS["max_softcap"]
    )
)
def test_token_ops_triton(case):
    check_token_case(case, "triton")


# ----------------------------------------------------------------------------------------------------
# token_jeffreys
# ----------------------------------------------------------------------------------------------------
@st.composite
def jeffreys_case(draw, max_v=300, max_n=6, min_t=TINY):
    dtype = draw(st.sampled_from(DTYPES))
    v = draw(st.one_of(st.just(1), st.integers(2, 9), st.integers(10, max_v)))
    lead = draw(st.sampled_from([(), (0,), (1,), (max_n,), (2, 3)]))
    lead = lead or (draw(st.integers(0, max_n)),)
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.0, 1.0, 4.0, 30.0]))
    policy = torch.randn(*lead, v, generator=g) * scale
    anchor = torch.randn(*lead, v, generator=g) * draw(st.sampled_from([0.0, 1.0, 4.0]))
    if policy.numel():
        special = draw(st.sampled_from(["none", "none", "mask", "nan_p", "nan_q", "posinf", "neginf_row"]))
        if special == "mask":  # the same masked vocabulary in both models (an infinite KL otherwise)
            m = torch.rand(policy.shape, generator=g) < 0.3
            policy[m] = anchor[m] = -math.inf
        elif special == "nan_p":
            policy.view(-1)[draw(st.integers(0, policy.numel() - 1))] = math.nan
        elif special == "nan_q":
            anchor.view(-1)[draw(st.integers(0, anchor.numel() - 1))] = math.nan
        elif special == "posinf":
            policy.view(-1)[draw(st.integers(0, policy.numel() - 1))] = math.inf
        elif special == "neginf_row":
            policy.view(-1, v)[0] = -math.inf
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(lead, generator=g) < draw(st.sampled_from([0.3, 1.0]))
    sliced = draw(st.booleans())
    return dict(
        policy=policy.to(dtype),
        anchor=anchor.to(dtype),
        sliced=sliced,
        mask=mask,
        beta=draw(st.sampled_from([0.0, 0.3, 0.5, 1.0])),
        temperature=draw(_temperature(min_t)),
        seed=seed,
    )


def fp64_jeffreys(p, q, beta, temperature, mask):
    keep = torch.ones(p.shape[:-1], dtype=torch.bool) if mask is None else ~mask
    zero = torch.zeros((), dtype=torch.float64)
    p = torch.where(keep.unsqueeze(-1), p, zero)
    q = torch.where(keep.unsqueeze(-1), q, zero)
    lp = torch.log_softmax((p - p.amax(-1, keepdim=True).detach()) / temperature, -1)
    lq = torch.log_softmax((q - q.amax(-1, keepdim=True).detach()) / temperature, -1)
    # 0·log 0 = 0: mask the log-ratio (not the product, whose backward would be 0·NaN)
    kl_pq = (lp.exp() * torch.where(lp.exp() > 0, lp - lq, zero)).sum(-1)
    kl_qp = (lq.exp() * torch.where(lq.exp() > 0, lq - lp, zero)).sum(-1)
    div = (beta * kl_pq if beta else 0.0) + ((1 - beta) * kl_qp if beta < 1 else 0.0)
    return torch.where(keep, div, zero)


def _bad_rows(x, keep):
    rows = x.reshape(-1, x.shape[-1])[keep.reshape(-1)]
    return torch.isnan(rows).any(-1) | torch.isposinf(rows).any(-1) | torch.isneginf(rows).all(-1)


def check_jeffreys_case(case, backend):
    p, q, mask, beta, temperature = (
        case["policy"],
        case["anchor"],
        case["mask"],
        case["beta"],
        case["temperature"],
    )
    v = p.shape[-1]
    if case["sliced"]:  # policy rows inside a wider buffer (row stride > V)
        wide = torch.zeros(*p.shape[:-1], v + 3, dtype=p.dtype)
        wide[..., 1 : v + 1] = p
        p = wide[..., 1 : v + 1]
    keep = torch.ones(p.shape[:-1], dtype=torch.bool) if mask is None else ~mask
    before = [p.clone(), q.clone()]
    bad_p, bad_q = _bad_rows(p.double(), keep), _bad_rows(q.double(), keep)
    kw = dict(beta=beta, temperature=temperature, ignore_mask=mask, backend=backend)
    if bool((bad_p | bad_q).any()):
        first = int((bad_p | bad_q).nonzero()[0, 0])
        name = "policy_logits" if bool(bad_p[first]) else "anchor_logits"
        with pytest.raises(ValueError, match=rf"(?<![\w.]){name}(?!\w)"):
            bk.token_jeffreys(p, q, **kw)
        return
    leaf = p.detach().clone().requires_grad_(True)
    div = bk.token_jeffreys(leaf, q, **kw)
    assert _same(p, before[0]) and _same(q, before[1]), "token_jeffreys modified its inputs"
    # A KL is O(|x_p − x_q|/T): where that comes within 2^4 of fp32's largest number the sums and products
    # inside overflow (README, "Odd inputs"): only the absence of an error is asserted there.
    finite = torch.isfinite(p.double()) & torch.isfinite(q.double())
    spread = (
        float(((p.double() - q.double()).abs() / temperature)[finite].max()) if bool(finite.any()) else 0.0
    )
    spread = max(spread, _z_max(p.double(), temperature, None), _z_max(q.double(), temperature, None))
    if spread > torch.finfo(torch.float32).max / 16:
        return
    p64 = p.double().requires_grad_(True)
    want = fp64_jeffreys(p64, q.double(), beta, temperature, mask)
    zmax = max(_z_max(p.double(), temperature, None), _z_max(q.double(), temperature, None))
    extra = 4 * F32_EPS * zmax if backend in WHOLE_LSE else 0.0
    _close_values(div, want.detach(), extra * 4, f"{backend} jeffreys")
    gd = torch.randn(div.shape, generator=torch.Generator().manual_seed(case["seed"]))
    if div.requires_grad:
        (div * gd).sum().backward()
        (want_g,) = torch.autograd.grad((want * gd.double()).sum(), p64)
        # |d div / dz| <= |g|·(β·(|log p − log q| + KL) + 1): scale by the row's log-ratio spread
        scale = _amax(gd) * (2 + 2 * spread) / temperature
        if scale > torch.finfo(torch.float32).max / 16:  # the gradient's size itself is past fp32's range
            return
        _close_grad(leaf.grad, want_g, p.dtype, scale, extra * 4, f"{backend} jeffreys grad")


@_fuzz(100)
@given(case=jeffreys_case())
def test_token_jeffreys_cpu_backends(case):
    for backend in CPU_BACKENDS:
        check_jeffreys_case(case, backend)


@pytest.mark.interpret
@_fuzz(20)
@given(case=jeffreys_case(max_v=130, max_n=4, min_t=TRITON_LIMITS["min_temperature"]))
def test_token_jeffreys_triton(case):
    check_jeffreys_case(case, "triton")


# ----------------------------------------------------------------------------------------------------
# linear_token_logprobs
# ----------------------------------------------------------------------------------------------------
@st.composite
def linear_case(draw, max_v=300, max_n=6):
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.sampled_from([(0,), (1,), (draw(st.integers(2, max_n)),), (2, 3)]))
    h = draw(st.sampled_from([1, 3, 8, 16]))
    v = draw(st.one_of(st.just(1), st.integers(2, 9), st.integers(10, max_v)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=g) * draw(st.sampled_from([0.0, 1.0, 3.0]))
    weight = torch.randn(v, h, generator=g) / h**0.5
    bias = torch.randn(v, generator=g) if draw(st.booleans()) else None
    special = draw(st.sampled_from(["none", "none", "none", "nan_hidden", "nan_weight", "inf_bias"]))
    if special == "nan_hidden" and hidden.numel():
        hidden.view(-1)[draw(st.integers(0, hidden.numel() - 1))] = math.nan
    elif special == "nan_weight":
        weight.view(-1)[draw(st.integers(0, weight.numel() - 1))] = math.nan
    elif special == "inf_bias" and bias is not None:
        bias[draw(st.integers(0, v - 1))] = -math.inf  # a masked word
    labels = torch.randint(0, v, lead, generator=g)
    labels[torch.rand(lead, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    return dict(
        hidden=hidden.to(dtype),
        weight=weight.to(dtype),
        bias=None if bias is None else bias.to(dtype),
        labels=labels,
        temperature=draw(st.one_of(st.just(1.0), st.floats(math.log(1e-2), math.log(1e2)).map(math.exp))),
        softcap=draw(st.one_of(st.none(), st.floats(math.log(0.5), math.log(50.0)).map(math.exp))),
        return_entropy=draw(st.booleans()),
        tile=draw(st.sampled_from(["", "", "3,5", "64,1"])),
        seed=seed,
    )


def check_linear_case(case, backend, monkeypatch):
    hid, w, b, y = case["hidden"], case["weight"], case["bias"], case["labels"]
    temperature, softcap, want_ent = case["temperature"], case["softcap"], case["return_entropy"]
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", case["tile"])
    kw = dict(bias=b, temperature=temperature, softcap=softcap, return_entropy=want_ent, backend=backend)
    keep = y != -100
    x64 = torch.nn.functional.linear(hid.double(), w.double(), None if b is None else b.double())
    rows = x64.reshape(-1, w.shape[0])[keep.reshape(-1)]
    before = [t.clone() for t in (hid, w) + ((b,) if b is not None else ())]
    dead = torch.isneginf(rows).all(-1) if not softcap else torch.zeros(rows.shape[0], dtype=torch.bool)
    if bool(torch.isnan(rows).any()) or bool(dead.any()):
        first = int((torch.isnan(rows).any(-1) | dead).nonzero()[0, 0])
        row_h = hid.reshape(-1, hid.shape[-1])[keep.reshape(-1)][first]
        name = (
            "hidden" if bool(torch.isnan(row_h).any()) else "weight" if bool(torch.isnan(w).any()) else "bias"
        )
        with pytest.raises(ValueError, match=rf"(?<![\w.]){name}(?!\w)"):
            bk.linear_token_logprobs(hid, w, y, **kw)
        return
    leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if b is not None:
        leaves.append(b.clone().requires_grad_(True))
    kw["bias"] = leaves[2] if b is not None else None
    out = bk.linear_token_logprobs(leaves[0], leaves[1], y, **kw)
    lp, ent = out if want_ent else (out, None)
    l64 = [t.double().requires_grad_(True) for t in (hid, w) + ((b,) if b is not None else ())]
    x = torch.nn.functional.linear(l64[0], l64[1], l64[2] if b is not None else None)
    w_lp, w_ent = fp64_token(x, y, temperature, softcap, -100)
    # The engine computes the logits in fp32 (rounding ~2^-24·sqrt(H)·|h||w|) and combines the tiles' whole
    # log-sum-exps (one rounding of |z|): both scale with |z|max.
    zmax = _z_max(x.detach(), temperature, softcap)
    extra = 8 * F32_EPS * (1 + zmax) * math.sqrt(hid.shape[-1])
    if hid.dtype != torch.float32:  # the logits of bf16/fp16 tiles are rounded to the dtype
        extra += 2 * DTYPE_RTOL[hid.dtype] * (1 + zmax)
    _close_values(lp, w_lp.detach(), extra, f"{backend} linear logp")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(case["seed"]))
    loss, loss64 = (lp * g).sum(), (w_lp * g.double()).sum()
    if want_ent:
        _close_values(ent, w_ent.detach(), extra * (2 + math.log(w.shape[0])), f"{backend} linear entropy")
        loss, loss64 = loss + ent.sum(), loss64 + w_ent.sum()
    if lp.requires_grad and y.numel():
        grads = torch.autograd.grad(loss, leaves)
        want = torch.autograd.grad(loss64, l64)
        for name, got_g, want_g, t in zip(("hidden", "weight", "bias"), grads, want, l64):
            # d logits / d hidden = weight (and back): the row gradient scale times the other factor's size
            other = {"hidden": w, "weight": hid, "bias": torch.ones(1)}[name]
            scale = (
                (_amax(g) + (3 + math.log(w.shape[0])) * want_ent)
                / temperature
                * max(1.0, _amax(other.double()))
            )
            scale *= max(1, y.numel()) if name != "hidden" else 1  # weight/bias sum over rows
            _close_grad(
                got_g,
                want_g,
                t.dtype if t.dtype != torch.float64 else hid.dtype,
                scale,
                extra,
                f"{backend} linear grad {name}",
            )
    for t, t0 in zip((hid, w) + ((b,) if b is not None else ()), before):
        assert _same(t, t0), "linear_token_logprobs modified its inputs"


@_fuzz(60)
@given(case=linear_case())
def test_linear_token_logprobs_cpu_backends(case):
    with pytest.MonkeyPatch.context() as mp:
        for backend in CPU_BACKENDS:
            check_linear_case(case, backend, mp)


@pytest.mark.interpret
@_fuzz(12)
@given(case=linear_case(max_v=64, max_n=4))
def test_linear_token_logprobs_triton(case):
    with pytest.MonkeyPatch.context() as mp:
        check_linear_case(case, "triton", mp)


# ----------------------------------------------------------------------------------------------------
# reward_quantiles, bon_log_prob, best_of_n_indices
# ----------------------------------------------------------------------------------------------------
@st.composite
def rewards_case(draw, max_b=5, max_n=5, max_k=12):
    b, n, k = draw(st.integers(1, max_b)), draw(st.integers(1, max_n)), draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from([3, 1000]))  # few levels: many exact ties
    rewards = torch.randint(0, levels, (b, n), generator=g).float() * 0.5
    refs = torch.randint(0, levels, (b, k), generator=g).float() * 0.5
    special = draw(st.sampled_from(["none", "none", "inf", "nan_reward", "nan_ref", "nan_masked"]))
    mask = torch.rand(b, k, generator=g) < 0.7 if draw(st.booleans()) else None
    if mask is not None:
        mask[:, 0] = True
    if special == "inf":
        rewards[0, 0] = math.inf
        refs.view(-1)[draw(st.integers(0, b * k - 1))] = -math.inf
    elif special == "nan_reward":
        rewards.view(-1)[draw(st.integers(0, b * n - 1))] = math.nan
    elif special == "nan_ref":
        refs.view(-1)[draw(st.integers(0, b * k - 1))] = math.nan
    elif special == "nan_masked" and mask is not None and k > 1:
        mask[0, 1] = False
        refs[0, 1] = math.nan  # ignored by the mask: allowed
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    return dict(
        rewards=rewards.to(dtype),
        refs=refs.to(dtype),
        mask=mask,
        smoothing=draw(st.sampled_from(["none", "self", 0.25, 1.0])),
        seed=seed,
    )


def fp64_quantiles(r, refs, mask, smoothing):
    m = torch.ones_like(refs, dtype=torch.bool) if mask is None else mask
    r, refs = r.double(), refs.double()
    le = ((refs.unsqueeze(1) <= r.unsqueeze(2)) & m.unsqueeze(1)).sum(-1).double()
    lt = ((refs.unsqueeze(1) < r.unsqueeze(2)) & m.unsqueeze(1)).sum(-1).double()
    k = m.sum(-1, keepdim=True).double()
    if smoothing == "self":
        return (le + 1) / (k + 1), lt / (k + 1)
    p_le, p_lt = le / k, lt / k
    if smoothing != "none":
        p_le = p_le.clamp_min(smoothing)
    return p_le, p_lt


def _quantile_error(case):
    r, refs, mask = case["rewards"], case["refs"], case["mask"]
    if bool(torch.isnan(r).any()):
        return "rewards"
    live = refs if mask is None else torch.where(mask, refs, torch.zeros_like(refs))
    return "ref_rewards" if bool(torch.isnan(live).any()) else None


@_fuzz(100)
@given(case=rewards_case())
def test_reward_quantiles_cpu_backends(case):
    for backend in CPU_BACKENDS:
        check_quantiles(case, backend)


@pytest.mark.interpret
@_fuzz(15)
@given(case=rewards_case())
def test_reward_quantiles_triton(case):
    check_quantiles(case, "triton")


def check_quantiles(case, backend):
    r, refs, mask, smoothing = case["rewards"], case["refs"], case["mask"], case["smoothing"]
    before = [r.clone(), refs.clone()]
    error = _quantile_error(case)
    if error:
        with pytest.raises(ValueError, match=rf"(?<![\w.]){error}(?!\w)"):
            bk.reward_quantiles(r, refs, ref_mask=mask, smoothing=smoothing, backend=backend)
        return
    p_le, p_lt = bk.reward_quantiles(r, refs, ref_mask=mask, smoothing=smoothing, backend=backend)
    w_le, w_lt = fp64_quantiles(r, refs, mask, smoothing)
    # exact counts, one fp32 division (the fp64 quotient rounded to fp32 is the same number)
    assert torch.equal(p_le, w_le.float()) and torch.equal(p_lt, w_lt.float()), backend
    assert _same(r, before[0]) and _same(refs, before[1])


@st.composite
def bon_case(draw):
    shape = draw(st.sampled_from([(), (1,), (3,), (2, 3)]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    p_le = torch.rand(shape, generator=g, dtype=torch.float64)
    frac = torch.rand(shape, generator=g, dtype=torch.float64)
    edge = draw(st.sampled_from(["none", "zero_lt", "tie", "one", "tiny_gap"]))
    if edge == "zero_lt":
        frac = torch.zeros(shape, dtype=torch.float64)
    elif edge == "tie":
        frac = torch.ones(shape, dtype=torch.float64)
    elif edge == "one":
        p_le = torch.ones(shape, dtype=torch.float64)
    p_lt = p_le * frac
    if edge == "tiny_gap":
        p_lt = p_le * (1 - 1e-6)
    return dict(
        ref_logp=torch.randn(shape, generator=g, dtype=torch.float64) * 30,
        p_le=p_le,
        p_lt=p_lt,
        n=draw(st.one_of(st.sampled_from([1, 2, 16]), st.floats(1.0, 64.0))),
        fp64=draw(st.booleans()),
    )


def fp64_bon(ref_logp, p_le, p_lt, n):
    """log π_ref + (N−1)·log p_le + log((p_le^N − p_lt^N)/(p_le^(N−1)·(p_le − p_lt))) (the N-th term of
    Theorem 1 in the same units), evaluated elementwise in Python floats with the limits written out."""
    out = []
    for a, le, lt in zip(ref_logp.reshape(-1).tolist(), p_le.reshape(-1).tolist(), p_lt.reshape(-1).tolist()):
        if n == 1:
            out.append(a)
            continue
        if le == 0:
            out.append(-math.inf)
            continue
        u = math.log(lt) - math.log(le) if lt > 0 else -math.inf
        if u == -math.inf:
            c = 0.0
        elif abs(u) < 1e-12:
            c = math.log(n) + (n - 1) * u / 2
        else:
            c = math.log(math.expm1(n * u) / math.expm1(u))
        out.append(a + (n - 1) * math.log(le) + c)
    return torch.tensor(out, dtype=torch.float64).reshape(ref_logp.shape)


@_fuzz(100)
@given(case=bon_case())
def test_bon_log_prob(case):
    dt = torch.float64 if case["fp64"] else torch.float32
    args = [case[k].to(dt) for k in ("ref_logp", "p_le", "p_lt")]
    got = bk.bon_log_prob(*args, case["n"])
    want = fp64_bon(*(a.double() for a in args), case["n"])
    assert got.dtype == dt
    tol = dict(rtol=1e-12, atol=1e-10) if case["fp64"] else dict(rtol=4e-6, atol=4e-5)
    torch.testing.assert_close(got.double(), want, equal_nan=False, **tol)


@_fuzz(60)
@given(case=rewards_case(max_k=12))
def test_best_of_n_indices(case):
    refs, k = case["refs"], case["refs"].shape[1]
    n = 1 + case["seed"] % k
    if bool(torch.isnan(refs).any()):
        with pytest.raises(ValueError, match="ref_rewards"):
            bk.best_of_n_indices(refs, n)
        return
    got = bk.best_of_n_indices(refs, n)
    groups = k // n
    for b in range(refs.shape[0]):
        for j in range(groups):
            block = refs[b, j * n : (j + 1) * n].double().tolist()
            assert got[b, j].item() == j * n + block.index(max(block))  # the earliest of the best


# ----------------------------------------------------------------------------------------------------
# bond_loss, jbond_loss (the fused cpu sequence kernel for fp32 inputs, the reference for fp64)
# ----------------------------------------------------------------------------------------------------
def _loo(x):
    """Leave-one-out means along the last dimension (0 with fewer than two entries)."""
    m = x.shape[-1]
    return torch.zeros_like(x) if m < 2 else (x.sum(-1, keepdim=True) - x) / (m - 1)


def fp64_bond(lp, rl, pr, rr, bl, mask, n, beta, baseline, smoothing, correction):
    p_le, p_lt = fp64_quantiles(pr, rr, mask, smoothing)
    if correction:
        log_bon = fp64_bon(rl, p_le, p_lt, n)
    else:
        log_bon = rl + (0.0 if n == 1 else (n - 1) * torch.log(p_le))
    ret = log_bon - lp
    b, m = ret.shape
    if baseline == "none":
        base = torch.zeros_like(ret)
    elif m > 1:
        base = _loo(ret) if baseline == "loo" else ret.mean(-1, keepdim=True).expand_as(ret)
    else:
        flat = ret.reshape(1, -1)
        base = (_loo(flat) if baseline == "loo" else flat.mean(-1, keepdim=True).expand_as(flat)).reshape(
            ret.shape
        )
    policy_coef = -beta * (ret - base) / ret.numel()
    bon_coef = torch.full(bl.shape, -(1 - beta) / max(bl.numel(), 1), dtype=torch.float64)
    return dict(
        loss=(policy_coef * lp).sum() + (bon_coef * bl).sum(),
        backward_kl=(-ret).mean(),
        mean_quantile=p_le.mean(),
        kl_to_ref=(lp - rl).mean(),
        p_le=p_le,
        bon_logp_target=log_bon,
        policy_coef=policy_coef,
        bon_coef=bon_coef,
    )


@st.composite
def bond_case(draw):
    b, m, k, j = (
        draw(st.integers(1, 4)),
        draw(st.integers(1, 4)),
        draw(st.integers(1, 8)),
        draw(st.integers(0, 3)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    case = dict(
        lp=torch.randn(b, m, generator=g) * 4 - 30,
        rl=torch.randn(b, m, generator=g) * 4 - 30,
        pr=torch.randint(0, 4, (b, m), generator=g).float(),
        rr=torch.randint(0, 4, (b, k), generator=g).float(),
        bl=torch.randn(b, j, generator=g) * 4 - 30,
    )
    special = draw(
        st.sampled_from(["none", "none", "none", "ninf_lp", "nan_lp", "ninf_rl", "ninf_bl", "nan_pr"])
    )
    target = {"ninf_lp": "lp", "nan_lp": "lp", "ninf_rl": "rl", "ninf_bl": "bl", "nan_pr": "pr"}.get(special)
    if target and case[target].numel():
        case[target].view(-1)[draw(st.integers(0, case[target].numel() - 1))] = (
            math.nan if special.startswith("nan") else -math.inf
        )
    mask = None
    if draw(st.booleans()):
        mask = torch.rand(b, k, generator=g) < 0.7
        mask[:, 0] = True
    case.update(
        mask=mask,
        n=draw(st.sampled_from([1, 2, 4, 2.5])),
        beta=draw(st.sampled_from([0.0, 0.3, 1.0])),
        baseline=draw(st.sampled_from(["loo", "mean", "none"])),
        smoothing=draw(st.sampled_from(["self", "none", 0.25])),
        correction=draw(st.booleans()),
        fp64=draw(st.booleans()),
    )
    return case


_BOND_NAMES = dict(
    lp="policy_logp", rl="policy_ref_logp", pr="policy_rewards", rr="ref_rewards", bl="bon_logp"
)


@_fuzz(120)
@given(case=bond_case())
def test_bond_loss(case):
    dt = torch.float64 if case["fp64"] else torch.float32
    t = {key: case[key].to(dt) for key in _BOND_NAMES}
    t["lp"].requires_grad_(True)
    t["bl"].requires_grad_(True)
    before = {key: v.detach().clone() for key, v in t.items()}
    kw = dict(
        n=case["n"],
        beta=case["beta"],
        baseline=case["baseline"],
        smoothing=case["smoothing"],
        correction=case["correction"],
        ref_mask=case["mask"],
    )
    args = [t[key] for key in _BOND_NAMES]
    bad = [key for key in _BOND_NAMES if not bool(torch.isfinite(t[key]).all())]
    if bad:  # validate=True (the default): NaN rewards and non-finite log-probs are named
        with pytest.raises(ValueError, match=rf"(?<![\w.]){_BOND_NAMES[bad[0]]}(?!\w)"):
            bk.bond_loss(*args, **kw)
        return
    out = bk.bond_loss(*args, **kw)
    want = fp64_bond(
        *(case[key].double() for key in _BOND_NAMES),
        case["mask"],
        case["n"],
        case["beta"],
        case["baseline"],
        case["smoothing"],
        case["correction"],
    )
    finite = bool(torch.isfinite(want["bon_logp_target"]).all())  # smoothing="none" may give p_le = 0
    for name, w in want.items():
        got, w = getattr(out, name).detach().double(), w.detach()
        if not finite:
            if name in ("p_le", "bon_coef"):
                torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
            continue
        scale = float(w.abs().max()) if w.numel() else 1.0
        tol = 1e-12 if dt == torch.float64 else 4e-6
        torch.testing.assert_close(got, w, rtol=tol, atol=tol * max(1.0, scale) * 30, msg=name)
    if finite:
        g_lp, g_bl = torch.autograd.grad(out.loss, [t["lp"], t["bl"]])
        # the returns log π_BoN − log π cancel: fp32 keeps them to ~2^-24 of the log-probs' size
        big = 1 + max(_amax(case["lp"]), _amax(case["rl"]))
        atol = 1e-12 if dt == torch.float64 else 4 * F32_EPS * big / t["lp"].numel()
        torch.testing.assert_close(g_lp.double(), want["policy_coef"].detach(), rtol=1e-5, atol=atol)
        torch.testing.assert_close(g_bl.double(), want["bon_coef"], rtol=1e-5, atol=1e-7)
    for key, v in t.items():
        assert _same(v.detach(), before[key]), "bond_loss modified its inputs"


def fp64_jbond(lp, al, pr, ar, bl, beta, gamma, penalty, strict):
    worst = ar.min(-1).values
    bad = pr < worst if strict else pr <= worst
    r_j = torch.where(bad, torch.full_like(pr, -penalty), torch.zeros_like(pr))
    ratio = lp - al
    ret = r_j - ratio
    b = lp.shape[0]
    policy_coef = (-beta * (ret - _loo(ret)) + gamma * ratio) / b
    best_coef = torch.full_like(lp, -(1 - beta) / b)
    return dict(
        loss=(policy_coef * lp).sum() + (best_coef * bl).sum(),
        reward_mean=r_j.mean(),
        penalised_frac=bad.double().mean(),
        kl_to_anchor=ratio.mean(),
        forward_ce=(-bl).mean(),
        jbond_reward=r_j,
        policy_coef=policy_coef,
        best_coef=best_coef,
    )


_JBOND_NAMES = dict(
    lp="policy_logp", al="anchor_logp", pr="policy_rewards", ar="anchor_rewards", bl="best_anchor_logp"
)


@_fuzz(100)
@given(
    b=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    special=st.sampled_from(["none", "none", "ninf_lp", "nan_al", "ninf_bl", "nan_ar"]),
    beta=st.sampled_from([0.0, 0.5, 1.0]),
    gamma=st.sampled_from([0.0, 0.1]),
    penalty=st.sampled_from([0.0, math.log(16)]),
    strict=st.booleans(),
    fp64=st.booleans(),
)
def test_jbond_loss(b, seed, special, beta, gamma, penalty, strict, fp64):
    g = torch.Generator().manual_seed(seed)
    c = dict(
        lp=torch.randn(b, generator=g) * 4 - 30,
        al=torch.randn(b, generator=g) * 4 - 30,
        pr=torch.randint(0, 3, (b,), generator=g).float(),
        ar=torch.randint(0, 3, (b, 2), generator=g).float(),
        bl=torch.randn(b, generator=g) * 4 - 30,
    )
    key = {"ninf_lp": "lp", "nan_al": "al", "ninf_bl": "bl", "nan_ar": "ar"}.get(special)
    if key:
        c[key].view(-1)[0] = math.nan if special.startswith("nan") else -math.inf
    dt = torch.float64 if fp64 else torch.float32
    t = {k: v.to(dt) for k, v in c.items()}
    t["lp"].requires_grad_(True)
    t["bl"].requires_grad_(True)
    kw = dict(beta=beta, gamma=gamma, penalty=penalty, strict=strict)
    if key:
        with pytest.raises(ValueError, match=rf"(?<![\w.]){_JBOND_NAMES[key]}(?!\w)"):
            bk.jbond_loss(*t.values(), **kw)
        return
    out = bk.jbond_loss(*t.values(), **kw)
    want = fp64_jbond(*(v.double() for v in c.values()), beta, gamma, penalty, strict)
    tol = 1e-12 if fp64 else 4e-6
    for name, w in want.items():
        torch.testing.assert_close(getattr(out, name).detach().double(), w, rtol=tol, atol=tol * 30, msg=name)
    g_lp, g_bl = torch.autograd.grad(out.loss, [t["lp"], t["bl"]])
    atol = 1e-12 if fp64 else 4 * F32_EPS * (1 + max(_amax(c["lp"]), _amax(c["al"]))) / b
    torch.testing.assert_close(g_lp.double(), want["policy_coef"], rtol=1e-5, atol=atol)
    torch.testing.assert_close(g_bl.double(), want["best_coef"], rtol=1e-5, atol=1e-7)
