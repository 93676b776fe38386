"""The C++/OpenMP ``cpu`` backend against :mod:`bond_kernels.reference`, through the public API.

Every op x {fp32, bf16, fp16} x the shape table below, on forward values and on gradients with a random
upstream gradient.  The ground truth is the reference evaluated in float64 on the same (already rounded)
inputs; the tolerance of each result is the table entry of the dtype it is stored in (``conftest.TOL`` for
gradients in the logits' dtype, ``VALUE_ATOL`` for the fp32 log-probs / entropies / divergences).  Also:
torch.compile(fullgraph=True), torch.library.opcheck, bad labels, every instruction set the CPU has,
determinism across thread counts.
"""

import os
import sys

import pytest
import torch
from conftest import TOL, assert_close

import bond_kernels as bk
from bond_kernels import _ext
from bond_kernels import reference as ref

pytestmark = pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")

IGNORE = -100
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Absolute tolerance of fp32 outputs (log-probs, entropies, divergences) computed in fp32 from inputs of
# each dtype, against float64 on the same inputs.  The computation is the same for every input dtype (loads
# are exact), so the bound is one fp32 log-sum-exp over V <= 65543 terms of logits of magnitude ~15.
VALUE_ATOL = {torch.float32: 3e-5, torch.bfloat16: 3e-5, torch.float16: 3e-5}

# Gradients are stored in the logits' dtype: the conftest table (bf16 keeps 8 mantissa bits, rtol 8e-3).
GRAD_TOL = {d: TOL[d] for d in DTYPES}

# Shapes of the token tables: name -> why it is here.  ``_make`` builds each one.
SHAPES = {
    "7x1271": "odd sizes, no power of two anywhere; V not a multiple of any vector width",
    "3x65543": "V >= 65536: 32 summation blocks of 2048, indices past 16 bits",
    "slice": "(9, 700) column slice of a (9, 1000) tensor: row stride 1000 != V, read without a copy",
    "3d_shift": "logits[:, :-1] of a (2, 6, 333) tensor: 3-D with batch stride 6*333 != 5*333",
    "ignored": "(12, 513) with every other row ignored",
    "all_ignored": "(5, 257) with every row ignored: zero log-probs and an all-zero gradient",
    "neginf": "(6, 900) with a masked vocabulary: a third of each row is -inf (never at the label)",
}

# (temperature, softcap, return_entropy): plain; tempered with the entropy and its gradient; softcapped.
OPTIONS = [(1.0, None, False), (0.7, None, True), (1.3, 12.0, True)]


def _make(name, dtype):
    """(logits, labels): logits in ``dtype`` (possibly a non-contiguous view), labels int64 of its leading shape."""
    if name == "7x1271":
        x, y = torch.randn(7, 1271) * 4, torch.randint(0, 1271, (7,))
    elif name == "3x65543":
        x, y = torch.randn(3, 65543) * 4, torch.randint(0, 65543, (3,))
    elif name == "slice":
        x, y = (torch.randn(9, 1000) * 4)[:, :700], torch.randint(0, 700, (9,))
    elif name == "3d_shift":
        x, y = (torch.randn(2, 6, 333) * 4)[:, :-1], torch.randint(0, 333, (2, 5))
    elif name == "ignored":
        x, y = torch.randn(12, 513) * 4, torch.randint(0, 513, (12,))
        y[::2] = IGNORE
    elif name == "all_ignored":
        x, y = torch.randn(5, 257) * 4, torch.full((5,), IGNORE)
    elif name == "neginf":
        x, y = torch.randn(6, 900) * 4, torch.randint(0, 900, (6,))
        mask = torch.rand(6, 900) < 0.33
        mask[torch.arange(6), y] = False
        x = x.masked_fill(mask, float("-inf"))
    else:
        raise KeyError(name)
    # Rounding to bf16/fp16 keeps the view's strides (the slice stays a slice).
    base = x._base if x._base is not None else x
    xb = base.to(dtype)
    x = xb.as_strided(x.shape, x.stride(), x.storage_offset())
    return x, y


def _leaf(x):
    """A leaf that requires grad with x's (possibly non-contiguous) layout."""
    return x.detach().requires_grad_(True)


def _truth_token(x, y, temperature, softcap, return_entropy, g, gh):
    """float64 reference values and d/dx of sum(g * logp) (+ sum(gh * entropy))."""
    xd = x.detach().double().requires_grad_(True)
    out = ref.token_logprobs(
        xd, y, temperature=temperature, softcap=softcap, ignore_index=IGNORE, return_entropy=return_entropy
    )
    if return_entropy:
        lp, ent = out
        loss = (lp * g.double()).sum() + (ent * gh.double()).sum()
    else:
        lp, ent = out, None
        loss = (lp * g.double()).sum()
    (grad,) = torch.autograd.grad(loss, xd)
    return lp.detach(), (ent.detach() if ent is not None else None), grad


def _check_value(got, want, dtype):
    assert got.dtype == torch.float32
    assert_close(got, want, dtype=torch.float32, rtol=0, atol=VALUE_ATOL[dtype], scale=1.0)


def _check_grad(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    tol = GRAD_TOL[dtype]
    assert_close(got, want, dtype=dtype, rtol=tol["rtol"], atol=tol["atol"])


# ------------------------------------------------------------------------------------------------ tokens
@pytest.mark.parametrize("opts", OPTIONS, ids=["plain", "T0.7+entropy", "softcap12+entropy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_logprobs(shape, dtype, opts):
    temperature, softcap, return_entropy = opts
    x, y = _make(shape, dtype)
    g, gh = torch.randn(y.shape), torch.randn(y.shape)
    want_lp, want_ent, want_grad = _truth_token(x, y, temperature, softcap, return_entropy, g, gh)

    xl = _leaf(x)
    out = bk.token_logprobs(
        xl,
        y,
        temperature=temperature,
        softcap=softcap,
        ignore_index=IGNORE,
        return_entropy=return_entropy,
        backend="cpu",
    )
    if return_entropy:
        lp, ent = out
        _check_value(ent, want_ent, dtype)
        ((lp * g).sum() + (ent * gh).sum()).backward()
    else:
        lp = out
        (lp * g).sum().backward()
    _check_value(lp, want_lp, dtype)
    _check_grad(xl.grad, want_grad, dtype)
    keep = y != IGNORE
    assert torch.all(lp[~keep] == 0)
    assert torch.all(xl.grad[~keep] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["7x1271", "3d_shift", "neginf"])
def test_token_logprobs_inplace_backward(shape, dtype):
    """inplace=True: the backward writes the gradient over the logits (here a strided view of a bigger
    buffer, so entries outside the view must stay untouched)."""
    x, y = _make(shape, dtype)
    g = torch.randn(y.shape)
    _, _, want_grad = _truth_token(x, y, 0.9, None, False, g, None)
    base = (x._base if x._base is not None else x).clone()
    view = base.as_strided(x.shape, x.stride(), x.storage_offset())
    before = base.clone()
    leaf = view.detach().requires_grad_(True)  # shares base's storage
    lp = bk.token_logprobs(leaf, y, temperature=0.9, backend="cpu", inplace=True)
    (lp * g).sum().backward()
    _check_grad(leaf.grad, want_grad, dtype)
    _check_grad(view, want_grad, dtype)  # the logits buffer itself now holds the gradient
    outside = torch.ones_like(base, dtype=torch.bool)
    outside.as_strided(x.shape, x.stride(), x.storage_offset()).fill_(False)
    assert torch.equal(base[outside], before[outside]), "entries outside the view were written"


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("opts", [(1.0, None), (0.8, 20.0)], ids=["plain", "T0.8+softcap20"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["7x1271", "3x65543", "slice", "3d_shift", "ignored", "neginf"])
def test_token_logprobs_and_grad(shape, dtype, opts, inplace):
    temperature, softcap = opts
    x, y = _make(shape, dtype)
    g = torch.randn(y.shape)
    want_lp, _, want_grad = _truth_token(x, y, temperature, softcap, False, g, None)
    xin = x
    if inplace:  # keep the caller's strided layout: clone the whole buffer and view it the same way
        base = (x._base if x._base is not None else x).clone()
        xin = base.as_strided(x.shape, x.stride(), x.storage_offset())
    before = x.clone()
    lp, grad = bk.token_logprobs_and_grad(
        xin, y, g, temperature=temperature, softcap=softcap, backend="cpu", inplace=inplace
    )
    _check_value(lp, want_lp, dtype)
    _check_grad(grad, want_grad, dtype)
    if inplace:
        assert grad.data_ptr() == xin.data_ptr(), "inplace=True must return the logits buffer"
        _check_grad(xin, want_grad, dtype)
    else:
        assert torch.equal(x, before), "inplace=False must not write into the logits"


# --------------------------------------------------------------------------------------------- sequences
def _padded(name, dtype):
    """(logits (B, T, V), labels (B, T)) for the padded-sequence table."""
    if name == "3d_shift":
        x, y = _make("3d_shift", dtype)  # (2, 5, 333) strided view, trailing padding ignored
        y[0, 3:] = IGNORE
        return x, y
    if name == "long_vocab":  # V >= 65536, one all-padding sequence
        x = (torch.randn(3, 2, 65543) * 4).to(dtype)
        y = torch.randint(0, 65543, (3, 2))
        y[1] = IGNORE
        return x, y
    if name == "neginf_odd":  # odd sizes, a masked third of the vocabulary, ragged padding
        x = torch.randn(5, 7, 611) * 4
        y = torch.randint(0, 611, (5, 7))
        mask = torch.rand(5, 7, 611) < 0.33
        mask.scatter_(-1, y.unsqueeze(-1), False)
        y[2, 4:] = IGNORE
        y[4, 1:] = IGNORE
        return x.masked_fill(mask, float("-inf")).to(dtype), y
    raise KeyError(name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["3d_shift", "long_vocab", "neginf_odd"])
def test_sequence_logprobs_padded(shape, dtype):
    x, y = _padded(shape, dtype)
    b = x.shape[0]
    coef = torch.randn(b)
    xd = x.detach().double().requires_grad_(True)
    want = ref.sequence_logprobs(xd, y, ignore_index=IGNORE)
    (want_grad,) = torch.autograd.grad((want * coef.double()).sum(), xd)
    xl = _leaf(x)
    seq = bk.sequence_logprobs(xl, y, ignore_index=IGNORE, backend="cpu")
    (seq * coef).sum().backward()
    assert seq.shape == (b,)
    _check_value(seq, want.detach(), dtype)
    _check_grad(xl.grad, want_grad, dtype)
    # the gradient-in-forward path gives the same sums and gradient
    seq2, grad2 = bk.sequence_logprobs_and_grad(x, y, coef, ignore_index=IGNORE, backend="cpu")
    _check_value(seq2, want.detach(), dtype)
    _check_grad(grad2, want_grad, dtype)


# (total rows, V, cu_seqlens): an empty sequence in the middle; V >= 65536; one sequence; all empty at the end
PACKED = {
    "empty_middle": (19, 611, [0, 4, 4, 13, 19]),
    "long_vocab": (5, 65543, [0, 2, 5]),
    "one_sequence": (33, 1271, [0, 33]),
    "empty_tail": (6, 257, [0, 6, 6, 6]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(PACKED))
def test_sequence_logprobs_packed(layout, dtype):
    total, v, offsets = PACKED[layout]
    x = (torch.randn(total, v) * 4).to(dtype)
    y = torch.randint(0, v, (total,))
    y[:: max(total // 3, 2)] = IGNORE
    cu = torch.tensor(offsets, dtype=torch.int32)
    nseq = cu.numel() - 1
    coef = torch.randn(nseq)
    xd = x.double().requires_grad_(True)
    want = ref.sequence_logprobs(xd, y, cu_seqlens=cu, ignore_index=IGNORE)
    (want_grad,) = torch.autograd.grad((want * coef.double()).sum(), xd)
    xl = _leaf(x)
    seq = bk.sequence_logprobs(xl, y, cu_seqlens=cu, ignore_index=IGNORE, backend="cpu")
    (seq * coef).sum().backward()
    assert seq.shape == (nseq,)
    _check_value(seq, want.detach(), dtype)
    empty = cu[1:] == cu[:-1]
    assert torch.all(seq[empty] == 0)
    _check_grad(xl.grad, want_grad, dtype)
    seq2, grad2 = bk.sequence_logprobs_and_grad(x, y, coef, cu_seqlens=cu, ignore_index=IGNORE, backend="cpu")
    _check_value(seq2, want.detach(), dtype)
    _check_grad(grad2, want_grad, dtype)


# ------------------------------------------------------------------------------------------ quantiles
# (B prompts, n candidates, k references): odd sizes; one of each; k = 1; a long reference set.
QUANTILE_SHAPES = [(37, 9, 53), (1, 1, 1), (6, 4, 1), (3, 5, 4099)]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("smoothing", ["none", "self", 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", QUANTILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reward_quantiles(shape, dtype, smoothing, masked):
    b, n, k = shape
    # Few distinct levels: many exact ties, where <= and < differ.
    rewards = (torch.randint(0, 12, (b, n)) * 0.25).to(dtype)
    refs = (torch.randint(0, 12, (b, k)) * 0.25).to(dtype)
    if k >= 3:
        refs[0, :3] = torch.tensor([float("inf"), float("-inf"), 1.0]).to(dtype)
    mask = None
    if masked:
        mask = torch.rand(b, k) < 0.6
        mask[:, 0] = True  # every prompt keeps a valid sample
    p_le, p_lt = bk.reward_quantiles(rewards, refs, ref_mask=mask, smoothing=smoothing, backend="cpu")
    w_le, w_lt = ref.reward_quantiles(rewards, refs, ref_mask=mask, smoothing=smoothing)
    assert p_le.dtype == torch.float32 and p_le.shape == (b, n)
    # Counts are exact and the divisions are the reference's fp32 divisions: equal bit for bit.
    torch.testing.assert_close(p_le, w_le, rtol=0, atol=0)
    torch.testing.assert_close(p_lt, w_lt, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- jeffreys
JEFFREYS_SHAPES = {
    "7x1271": "odd sizes",
    "3x65543": "V >= 65536",
    "slice": "policy rows with stride 1000 != V (no copy)",
    "neginf": "entries masked (-inf) in both models",
}


def _jeffreys_inputs(shape, dtype):
    x, _ = _make(shape, dtype)
    if shape == "neginf":
        a = x.float() + torch.randn(x.shape)  # same -inf pattern (mask), different finite values
    else:
        a = torch.randn(x.shape) * 3
    return x, a.to(dtype)


@pytest.mark.parametrize("opts", [(0.5, 1.0, False), (0.2, 0.8, True)], ids=["beta0.5", "beta0.2+T0.8+mask"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(JEFFREYS_SHAPES))
def test_token_jeffreys(shape, dtype, opts):
    beta, temperature, use_mask = opts
    x, a = _jeffreys_inputs(shape, dtype)
    mask = None
    if use_mask:
        mask = torch.zeros(x.shape[0], dtype=torch.bool)
        mask[1] = True
    g = torch.randn(x.shape[0])
    xd = x.detach().double().requires_grad_(True)
    want = ref.token_jeffreys(xd, a.double(), beta=beta, temperature=temperature, ignore_mask=mask)
    (want_grad,) = torch.autograd.grad((want * g.double()).sum(), xd)
    xl = _leaf(x)
    div = bk.token_jeffreys(xl, a, beta=beta, temperature=temperature, ignore_mask=mask, backend="cpu")
    (div * g).sum().backward()
    _check_value(div, want.detach(), dtype)
    _check_grad(xl.grad, want_grad, dtype)
    if mask is not None:
        assert div[1] == 0 and torch.all(xl.grad[1] == 0)


# ------------------------------------------------------------------------------------- errors, edges
def test_out_of_range_label_raises_value_error():
    x = torch.randn(4, 50)
    for bad in (50, -1, 10**6):
        y = torch.tensor([0, 1, bad, 3])
        with pytest.raises(ValueError, match=r"\blabels\b"):
            bk.token_logprobs(x, y, backend="cpu")
        with pytest.raises(ValueError, match=r"\blabels\b"):
            bk.token_logprobs_and_grad(x, y, torch.ones(4), backend="cpu")
    with pytest.raises(ValueError, match=r"\blabels\b.*\b50\b"):
        bk.sequence_logprobs(x.view(2, 2, 50), torch.tensor([[0, 50], [1, 2]]), backend="cpu")


def test_all_neginf_row():
    x = torch.randn(3, 40)
    x[1] = float("-inf")
    y = torch.tensor([0, IGNORE, 5])
    xl = _leaf(x)
    lp = bk.token_logprobs(xl, y, backend="cpu")  # ignored: fine, and no NaN leaks into the gradient
    (lp * torch.randn(3)).sum().backward()
    assert lp[1] == 0 and torch.all(xl.grad[1] == 0) and torch.isfinite(xl.grad).all()
    with pytest.raises(ValueError, match=r"-inf"):
        bk.token_logprobs(x, torch.tensor([0, 1, 5]), backend="cpu")


def test_every_isa_matches_reference():
    """The baseline, AVX2 and AVX-512 clones of the kernels (those this CPU has) agree with the reference."""
    cpu = _ext.require().cpu
    active = cpu._isa()
    x, y = _make("7x1271", torch.bfloat16)
    g, gh = torch.randn(7), torch.randn(7)
    want_lp, want_ent, want_grad = _truth_token(x, y, 0.9, 9.0, True, g, gh)
    try:
        for isa in cpu._supported_isas():
            cpu._set_isa(isa)
            xl = _leaf(x)
            lp, ent = bk.token_logprobs(
                xl, y, temperature=0.9, softcap=9.0, return_entropy=True, backend="cpu"
            )
            ((lp * g).sum() + (ent * gh).sum()).backward()
            _check_value(lp, want_lp, torch.bfloat16)
            _check_value(ent, want_ent, torch.bfloat16)
            _check_grad(xl.grad, want_grad, torch.bfloat16)
    finally:
        cpu._set_isa(active)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_every_isa_matches_reference_without_softcap_and_for_jeffreys(beta):
    """The shifted-exponent sweeps (no softcap: exp of t <= 0) and both Jeffreys kernels, whose loops differ
    per weight (beta = 0 drops a term), in every clone this CPU has, on rows with masked (-inf) entries."""
    cpu = _ext.require().cpu
    active = cpu._isa()
    x, y = _make("neginf", torch.float32)
    a = (x + torch.randn(x.shape)).to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    g = torch.randn(x.shape[0])
    want_lp, _, want_grad = _truth_token(x, y, 0.8, None, False, g, None)
    xd = x.detach().double().requires_grad_(True)
    want_div = ref.token_jeffreys(xd, a.double(), beta=beta, temperature=0.8)
    (want_jgrad,) = torch.autograd.grad((want_div * g.double()).sum(), xd)
    try:
        for isa in cpu._supported_isas():
            cpu._set_isa(isa)
            xl = _leaf(x)
            lp = bk.token_logprobs(xl, y, temperature=0.8, backend="cpu")
            (lp * g).sum().backward()
            _check_value(lp, want_lp, torch.bfloat16)
            _check_grad(xl.grad, want_grad, torch.bfloat16)
            lp2, grad2 = bk.token_logprobs_and_grad(x, y, g, temperature=0.8, backend="cpu")
            _check_value(lp2, want_lp, torch.bfloat16)
            _check_grad(grad2, want_grad, torch.bfloat16)
            xl = _leaf(x)
            div = bk.token_jeffreys(xl, a, beta=beta, temperature=0.8, backend="cpu")
            (div * g).sum().backward()
            _check_value(div, want_div.detach(), torch.bfloat16)
            _check_grad(xl.grad, want_jgrad, torch.bfloat16)
    finally:
        cpu._set_isa(active)


def test_deterministic_across_runs_and_threads():
    x, y = _make("ignored", torch.float32)
    g = torch.randn(y.shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads), max(2, threads)):
            torch.set_num_threads(n)
            lp, grad = bk.token_logprobs_and_grad(x, y, g, backend="cpu")
            outs.append((lp, grad))
    finally:
        torch.set_num_threads(threads)
    for lp, grad in outs[1:]:
        assert torch.equal(lp, outs[0][0]) and torch.equal(grad, outs[0][1])


# ------------------------------------------------------------------------------ torch.compile, opcheck
def test_torch_compile_fullgraph():
    x, y = _make("7x1271", torch.float32)
    g = torch.randn(7)

    def f(logits, labels):
        lp, ent = bk.token_logprobs(logits, labels, temperature=0.8, return_entropy=True, backend="cpu")
        return (lp * g).sum() + ent.sum(), lp, ent

    compiled = torch.compile(f, fullgraph=True)
    xa, xb = _leaf(x), _leaf(x)
    (la, lpa, enta), (lb, lpb, entb) = f(xa, y), compiled(xb, y)
    la.backward()
    lb.backward()
    # The op's outputs and gradient are the same kernels' bits; the loss is summed by inductor's fused
    # reduction in another order than eager's two sums and one add: equal to one fp32 rounding (the bitwise
    # comparison held or failed with the last bits of the log-probs).
    torch.testing.assert_close(lpb, lpa, rtol=0, atol=0)
    torch.testing.assert_close(entb, enta, rtol=0, atol=0)
    torch.testing.assert_close(lb, la, rtol=2**-22, atol=0)
    torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)


def test_opcheck_custom_ops():
    from bond_kernels.ops import reward_quantiles as rq_ops
    from bond_kernels.ops import token_jeffreys as tj_ops
    from bond_kernels.ops import token_logprobs as tl_ops

    x = torch.randn(5, 97, requires_grad=True)
    y = torch.randint(0, 97, (5,))
    y[2] = IGNORE
    torch.library.opcheck(tl_ops.token_logprobs_fwd, (x, y, 0.9, 0.0, IGNORE, True, False, "cpu"))
    torch.library.opcheck(
        tl_ops.token_logprobs_fwd_bwd, (x.detach(), y, torch.randn(5), 1.0, 5.0, IGNORE, "cpu")
    )
    a = torch.randn(5, 97)
    torch.library.opcheck(
        tj_ops.token_jeffreys_fwd, (x, a, 0.3, 1.0, torch.empty(0, dtype=torch.bool), "cpu")
    )
    r, k = torch.randn(3, 4), torch.randn(3, 6)
    torch.library.opcheck(rq_ops.reward_quantiles, (r, k, torch.empty(0, dtype=torch.bool), 1, 0.0, "cpu"))


def test_empty_batch():
    """(B, 0, V) and (0, V) logits: empty results and an empty gradient, no error."""
    for shape in [(2, 0, 7), (0, 7)]:
        x = torch.randn(shape)
        y = torch.zeros(shape[:-1], dtype=torch.long)
        lp, grad = bk.token_logprobs_and_grad(x, y, torch.zeros(shape[:-1]), backend="cpu")
        assert lp.shape == shape[:-1] and grad.shape == shape
        assert bk.token_logprobs(x, y, backend="cpu").shape == shape[:-1]


# ------------------------------------------------------------------------------- large, fresh gradients
def test_gradient_buffers_above_8_mib_get_huge_page_advice_and_stay_exact():
    """Gradients of >= 8 MiB are allocated with transparent-huge-page advice (python/src/common.h): the
    advice must reach the kernel on Linux and change no value (fwd+bwd, gradient-in-forward, Jeffreys)."""
    cpu = _ext.require().cpu
    n, v = 80, 40_003  # 12.8 MB of fp32 gradient, V odd
    x = torch.randn(n, v) * 4
    y = torch.randint(0, v, (n,))
    y[::7] = IGNORE
    g = torch.randn(n)
    thp = os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled") and sys.platform.startswith("linux")
    advised = cpu._advise_huge_pages(torch.empty_like(x))
    assert (advised >= 8 << 20) if thp else (advised >= 0)
    assert cpu._advise_huge_pages(torch.empty(1000)) == 0  # small buffers are left alone

    want_lp, _, want_grad = _truth_token(x, y, 1.0, None, False, g, None)
    xl = _leaf(x)
    lp = bk.token_logprobs(xl, y, backend="cpu")
    (lp * g).sum().backward()
    _check_value(lp, want_lp, torch.float32)
    _check_grad(xl.grad, want_grad, torch.float32)

    lp2, grad2 = bk.token_logprobs_and_grad(x, y, g, backend="cpu")
    _check_value(lp2, want_lp, torch.float32)
    _check_grad(grad2, want_grad, torch.float32)

    a = torch.randn(n, v) * 3
    xd = x.double().requires_grad_(True)
    want = ref.token_jeffreys(xd, a.double(), beta=0.3)
    (want_j,) = torch.autograd.grad((want * g.double()).sum(), xd)
    xl = _leaf(x)
    div = bk.token_jeffreys(xl, a, beta=0.3, backend="cpu")
    (div * g).sum().backward()
    _check_value(div, want.detach(), torch.float32)
    _check_grad(xl.grad, want_j, torch.float32)
