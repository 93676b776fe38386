"""Bad input (docs/design.md, "Numerics contract"; issue 4 item 8): each case raises the right exception type, and the
message names the offending argument (and, for tensors, what it got).  Also: the API never writes into the
caller's tensors unless ``inplace=True`` says so.

Mixed devices are simulated with the ``meta`` device (no GPU needed): a meta tensor has a device but no data,
so the device check must come before any check that reads values.
"""

import math
import re

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _backend

NAN = float("nan")


def _expect(exc, name, fn):
    """``fn()`` raises ``exc`` and the message names ``name`` as a word."""
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"message does not name {name!r}: {msg}"
    return msg


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Fresh, valid inputs per case (a case must not see another's mutation)
# ----------------------------------------------------------------------------------------------------
def _tok(n=6, v=11):
    g = _gen(1)
    return torch.randn(n, v, generator=g), torch.randint(0, v, (n,), generator=g)


def _quant(b=3, n=2, k=5):
    g = _gen(2)
    return torch.randn(b, n, generator=g), torch.randn(b, k, generator=g)


def _bond(b=3, m=2, k=5, j=1):
    g = _gen(3)
    return dict(
        policy_logp=torch.randn(b, m, generator=g).requires_grad_(True),
        policy_ref_logp=torch.randn(b, m, generator=g),
        policy_rewards=torch.randn(b, m, generator=g),
        ref_rewards=torch.randn(b, k, generator=g),
        bon_logp=torch.randn(b, j, generator=g).requires_grad_(True),
    )


def _call_bond(n=2, **over):
    args = _bond()
    kw = {key: over.pop(key) for key in list(over) if key in args}
    args.update(kw)
    return bk.bond_loss(
        args["policy_logp"],
        args["policy_ref_logp"],
        args["policy_rewards"],
        args["ref_rewards"],
        args["bon_logp"],
        n=n,
        **over,
    )


def _jbond(b=4):
    g = _gen(4)
    return dict(
        policy_logp=torch.randn(b, generator=g).requires_grad_(True),
        anchor_logp=torch.randn(b, generator=g),
        policy_rewards=torch.randn(b, generator=g),
        anchor_rewards=torch.randn(b, 2, generator=g),
        best_anchor_logp=torch.randn(b, generator=g).requires_grad_(True),
    )


def _call_jbond(**over):
    args = _jbond()
    kw = {key: over.pop(key) for key in list(over) if key in args}
    args.update(kw)
    return bk.jbond_loss(
        args["policy_logp"],
        args["anchor_logp"],
        args["policy_rewards"],
        args["anchor_rewards"],
        args["best_anchor_logp"],
        **over,
    )


def _meta(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _with_nan(x, index):
    x = x.clone()
    x[index] = NAN
    return x


# ----------------------------------------------------------------------------------------------------
# token_logprobs / sequence_logprobs
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("label", [11, 1000, -1, -3])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("validate", [False, True])
def test_labels_out_of_range(label, backend, validate):
    """torch and cpu backends raise ValueError naming labels, with or without validate=True (issue 2 item 7).

    backend="cpu" needs the compiled extension; if it is missing the call raises RuntimeError and this case
    fails (on purpose: CI builds the extension and the cpu path must reject the label).
    """
    logits, labels = _tok()
    labels[3] = label
    msg = _expect(
        ValueError, "labels", lambda: bk.token_logprobs(logits, labels, backend=backend, validate=validate)
    )
    assert str(label) in msg
    msg = _expect(
        ValueError,
        "labels",
        lambda: bk.sequence_logprobs(
            logits.view(2, 3, -1), labels.view(2, 3), backend=backend, validate=validate
        ),
    )


def test_ignored_label_is_not_out_of_range():
    logits, labels = _tok()
    labels[2] = -100
    out = bk.token_logprobs(logits, labels, backend="torch")
    assert out[2].item() == 0.0
    labels[2] = 7
    out = bk.token_logprobs(logits, labels, ignore_index=7, backend="torch")
    assert out[2].item() == 0.0


TOKEN_CASES = [
    # (id, callable, exception, argument named)
    ("labels-shape", lambda lg, y: bk.token_logprobs(lg, y[:-1]), ValueError, "labels"),
    ("labels-2d-vs-1d", lambda lg, y: bk.token_logprobs(lg, y.view(2, 3)), ValueError, "labels"),
    ("integer-logits", lambda lg, y: bk.token_logprobs(lg.to(torch.int64), y), TypeError, "logits"),
    ("bool-logits", lambda lg, y: bk.token_logprobs(lg > 0, y), TypeError, "logits"),
    ("float-labels", lambda lg, y: bk.token_logprobs(lg, y.float()), TypeError, "labels"),
    ("labels-not-tensor", lambda lg, y: bk.token_logprobs(lg, y.tolist()), TypeError, "labels"),
    ("logits-not-tensor", lambda lg, y: bk.token_logprobs(lg.tolist(), y), TypeError, "logits"),
    ("labels-on-meta", lambda lg, y: bk.token_logprobs(lg, _meta(y)), ValueError, "labels"),
    ("logits-on-meta", lambda lg, y: bk.token_logprobs(_meta(lg), y), ValueError, "labels"),
    ("empty-vocab", lambda lg, y: bk.token_logprobs(lg[:, :0], y), ValueError, "logits"),
    (
        "all-inf-row",
        lambda lg, y: bk.token_logprobs(lg.index_fill(0, torch.tensor([1]), -math.inf), y, backend="torch"),
        ValueError,
        "logits",
    ),
    ("temperature-0", lambda lg, y: bk.token_logprobs(lg, y, temperature=0.0), ValueError, "temperature"),
    ("temperature-neg", lambda lg, y: bk.token_logprobs(lg, y, temperature=-1.0), ValueError, "temperature"),
    ("temperature-nan", lambda lg, y: bk.token_logprobs(lg, y, temperature=NAN), ValueError, "temperature"),
    (
        "temperature-inf",
        lambda lg, y: bk.token_logprobs(lg, y, temperature=math.inf),
        ValueError,
        "temperature",
    ),
    ("temperature-str", lambda lg, y: bk.token_logprobs(lg, y, temperature="1"), ValueError, "temperature"),
    (
        "temperature-tensor",
        lambda lg, y: bk.token_logprobs(lg, y, temperature=torch.tensor(1.0)),
        ValueError,
        "temperature",
    ),
    ("softcap-neg", lambda lg, y: bk.token_logprobs(lg, y, softcap=-30.0), ValueError, "softcap"),
    ("softcap-inf", lambda lg, y: bk.token_logprobs(lg, y, softcap=math.inf), ValueError, "softcap"),
    ("softcap-nan", lambda lg, y: bk.token_logprobs(lg, y, softcap=NAN), ValueError, "softcap"),
    (
        "ignore-index-float",
        lambda lg, y: bk.token_logprobs(lg, y, ignore_index=1.5),
        TypeError,
        "ignore_index",
    ),
    ("backend-unknown", lambda lg, y: bk.token_logprobs(lg, y, backend="pytorch"), ValueError, "backend"),
    ("backend-not-str", lambda lg, y: bk.token_logprobs(lg, y, backend=1), ValueError, "backend"),
    (
        "fp64-on-cpu-kernels",
        lambda lg, y: bk.token_logprobs(lg.double(), y, backend="cpu"),
        TypeError,
        "backend",
    ),
    (
        "and-grad-shape",
        lambda lg, y: bk.token_logprobs_and_grad(lg, y, torch.ones(3)),
        ValueError,
        "grad_logp",
    ),
    (
        "and-grad-int",
        lambda lg, y: bk.token_logprobs_and_grad(lg, y, torch.ones(6, dtype=torch.int64)),
        TypeError,
        "grad_logp",
    ),
    (
        "and-grad-meta",
        lambda lg, y: bk.token_logprobs_and_grad(lg, y, torch.ones(6, device="meta")),
        ValueError,
        "grad_logp",
    ),
]


@pytest.mark.parametrize("case", TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_token_logprobs_bad_input(case):
    _, fn, exc, name = case
    logits, labels = _tok()
    msg = _expect(exc, name, lambda: fn(logits, labels))
    assert "got" in msg or "shape" in msg, msg


def test_unavailable_explicit_backend_raises_with_reason():
    """An explicit backend that cannot run raises RuntimeError saying why; auto never raises."""
    logits, labels = _tok()
    rewards, refs = _quant()
    msg = _expect(RuntimeError, "cuda", lambda: bk.token_logprobs(logits, labels, backend="cuda"))
    assert "token_logprobs" in msg
    msg = _expect(RuntimeError, "cuda", lambda: bk.reward_quantiles(rewards, refs, backend="cuda"))
    assert "unavailable" in msg and "cpu tensors" in msg.lower()
    _expect(RuntimeError, "cuda", lambda: bk.token_jeffreys(logits, logits, backend="cuda"))
    if not _backend.interpreting():  # under TRITON_INTERPRET=1 triton does run on CPU tensors
        msg = _expect(RuntimeError, "triton", lambda: bk.token_logprobs(logits, labels, backend="triton"))
        assert "CUDA" in msg
    bk.token_logprobs(logits, labels, backend="auto")  # never raises


def test_environment_backend_override_is_validated(monkeypatch):
    logits, labels = _tok()
    monkeypatch.setenv("BOND_KERNELS_BACKEND", "gpu")
    _expect(ValueError, "BOND_KERNELS_BACKEND", lambda: bk.token_logprobs(logits, labels))


SEQ_CASES = [
    ("padded-needs-3d", lambda lg, y: bk.sequence_logprobs(lg, y), ValueError, "logits"),
    (
        "packed-needs-2d",
        lambda lg, y: bk.sequence_logprobs(lg.view(2, 3, -1), y.view(2, 3), cu_seqlens=torch.tensor([0, 6])),
        ValueError,
        "logits",
    ),
    (
        "cu-float",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0.0, 6.0])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-2d",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([[0, 6]])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-one-entry",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0])),
        ValueError,
        "cu_seqlens",
    ),
    ("cu-not-tensor", lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=[0, 6]), TypeError, "cu_seqlens"),
    (
        "cu-past-total",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, 2, 9])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-short-of-total",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, 2, 4])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-not-from-0",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([1, 3, 6])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-decreasing",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, 4, 2, 6])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-negative",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, -2, 6])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-validate",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, 7]), validate=True),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-meta",
        lambda lg, y: bk.sequence_logprobs(lg, y, cu_seqlens=torch.tensor([0, 6], device="meta")),
        ValueError,
        "cu_seqlens",
    ),
    (
        "cu-and-grad",
        lambda lg, y: bk.sequence_logprobs_and_grad(lg, y, torch.ones(2), cu_seqlens=torch.tensor([0, 3, 8])),
        ValueError,
        "cu_seqlens",
    ),
    (
        "seq-coef-shape",
        lambda lg, y: bk.sequence_logprobs_and_grad(lg, y, torch.ones(3), cu_seqlens=torch.tensor([0, 3, 6])),
        ValueError,
        "seq_coef",
    ),
]


@pytest.mark.parametrize("case", SEQ_CASES, ids=[c[0] for c in SEQ_CASES])
def test_sequence_logprobs_bad_input(case):
    _, fn, exc, name = case
    logits, labels = _tok()
    _expect(exc, name, lambda: fn(logits, labels))


# ----------------------------------------------------------------------------------------------------
# reward_quantiles, bon_log_prob, best_of_n_indices
# ----------------------------------------------------------------------------------------------------
QUANTILE_CASES = [
    ("nan-reward", lambda r, k: bk.reward_quantiles(_with_nan(r, (1, 0)), k), ValueError, "rewards"),
    ("nan-ref-reward", lambda r, k: bk.reward_quantiles(r, _with_nan(k, (2, 4))), ValueError, "ref_rewards"),
    ("empty-reference-set", lambda r, k: bk.reward_quantiles(r, k[:, :0]), ValueError, "ref_rewards"),
    ("mismatched-B", lambda r, k: bk.reward_quantiles(r, k[:2]), ValueError, "ref_rewards"),
    (
        "mask-empty-row",
        lambda r, k: bk.reward_quantiles(
            r, k, ref_mask=torch.ones(3, 5, dtype=torch.bool).index_fill(0, torch.tensor([1]), False)
        ),
        ValueError,
        "ref_mask",
    ),
    (
        "mask-not-bool",
        lambda r, k: bk.reward_quantiles(r, k, ref_mask=torch.ones(3, 5)),
        TypeError,
        "ref_mask",
    ),
    (
        "mask-shape",
        lambda r, k: bk.reward_quantiles(r, k, ref_mask=torch.ones(3, 4, dtype=torch.bool)),
        ValueError,
        "ref_mask",
    ),
    (
        "mask-meta",
        lambda r, k: bk.reward_quantiles(r, k, ref_mask=torch.ones(3, 5, dtype=torch.bool, device="meta")),
        ValueError,
        "ref_mask",
    ),
    ("ref-meta", lambda r, k: bk.reward_quantiles(r, _meta(k)), ValueError, "ref_rewards"),
    ("rewards-1d", lambda r, k: bk.reward_quantiles(r[:, 0], k), ValueError, "rewards"),
    ("rewards-bool", lambda r, k: bk.reward_quantiles(r > 0, k), TypeError, "rewards"),
    ("rewards-complex", lambda r, k: bk.reward_quantiles(r.to(torch.complex64), k), TypeError, "rewards"),
    (
        "smoothing-unknown",
        lambda r, k: bk.reward_quantiles(r, k, smoothing="laplace"),
        ValueError,
        "smoothing",
    ),
    ("smoothing-zero", lambda r, k: bk.reward_quantiles(r, k, smoothing=0.0), ValueError, "smoothing"),
    ("smoothing-negative", lambda r, k: bk.reward_quantiles(r, k, smoothing=-0.1), ValueError, "smoothing"),
    ("smoothing-above-1", lambda r, k: bk.reward_quantiles(r, k, smoothing=1.5), ValueError, "smoothing"),
    ("smoothing-bool", lambda r, k: bk.reward_quantiles(r, k, smoothing=True), ValueError, "smoothing"),
    ("smoothing-nan", lambda r, k: bk.reward_quantiles(r, k, smoothing=NAN), ValueError, "smoothing"),
    ("backend-unknown", lambda r, k: bk.reward_quantiles(r, k, backend="numpy"), ValueError, "backend"),
    (
        "bon-n-zero",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2), 0),
        ValueError,
        "n",
    ),
    (
        "bon-n-half",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2), 0.5),
        ValueError,
        "n",
    ),
    (
        "bon-n-nan",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2), NAN),
        ValueError,
        "n",
    ),
    (
        "bon-n-bool",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2), True),
        ValueError,
        "n",
    ),
    (
        "bon-n-str",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2), "2"),
        ValueError,
        "n",
    ),
    (
        "bon-p-le-str",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), "0.5", torch.ones(2), 2),
        TypeError,
        "p_le",
    ),
    (
        "bon-p-lt-meta",
        lambda r, k: bk.bon_log_prob(torch.zeros(2), torch.ones(2), torch.ones(2, device="meta"), 2),
        ValueError,
        "p_lt",
    ),
    ("boni-n-zero", lambda r, k: bk.best_of_n_indices(k, 0), ValueError, "n"),
    ("boni-n-float", lambda r, k: bk.best_of_n_indices(k, 2.0), TypeError, "n"),
    ("boni-n-above-k", lambda r, k: bk.best_of_n_indices(k, 6), ValueError, "ref_rewards"),
    ("boni-nan", lambda r, k: bk.best_of_n_indices(_with_nan(k, (0, 1)), 2), ValueError, "ref_rewards"),
    ("boni-1d", lambda r, k: bk.best_of_n_indices(k[0], 2), ValueError, "ref_rewards"),
]


@pytest.mark.parametrize("case", QUANTILE_CASES, ids=[c[0] for c in QUANTILE_CASES])
def test_quantile_bad_input(case):
    _, fn, exc, name = case
    rewards, refs = _quant()
    _expect(exc, name, lambda: fn(rewards, refs))


# ----------------------------------------------------------------------------------------------------
# bond_loss / jbond_loss (issue 4 item 8)
# ----------------------------------------------------------------------------------------------------
def _mask_empty_row():
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2] = False
    return mask


BOND_CASES = [
    ("n-zero", dict(n=0), ValueError, "n"),
    ("n-below-1", dict(n=0.99), ValueError, "n"),
    ("n-inf", dict(n=math.inf), ValueError, "n"),
    ("beta-negative", dict(beta=-0.1), ValueError, "beta"),
    ("beta-above-1", dict(beta=1.1), ValueError, "beta"),
    ("beta-nan", dict(beta=NAN), ValueError, "beta"),
    (
        "nan-policy-reward",
        dict(policy_rewards=_with_nan(torch.zeros(3, 2), (0, 1))),
        ValueError,
        "policy_rewards",
    ),
    ("nan-ref-reward", dict(ref_rewards=_with_nan(torch.zeros(3, 5), (2, 2))), ValueError, "ref_rewards"),
    ("empty-reference-set", dict(ref_rewards=torch.zeros(3, 0)), ValueError, "ref_rewards"),
    ("mask-empty-row", dict(ref_mask=_mask_empty_row()), ValueError, "ref_mask"),
    ("B-ref-rewards", dict(ref_rewards=torch.zeros(4, 5)), ValueError, "ref_rewards"),
    ("B-bon-logp", dict(bon_logp=torch.zeros(2, 1)), ValueError, "bon_logp"),
    ("shape-ref-logp", dict(policy_ref_logp=torch.zeros(3, 3)), ValueError, "policy_ref_logp"),
    ("shape-policy-rewards", dict(policy_rewards=torch.zeros(3, 1)), ValueError, "policy_rewards"),
    ("policy-logp-1d", dict(policy_logp=torch.zeros(3)), ValueError, "policy_logp"),
    ("policy-logp-int", dict(policy_logp=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "policy_logp"),
    ("bon-logp-int", dict(bon_logp=torch.zeros(3, 1, dtype=torch.int32)), TypeError, "bon_logp"),
    ("smoothing-unknown", dict(smoothing="add-one"), ValueError, "smoothing"),
    ("smoothing-zero", dict(smoothing=0.0), ValueError, "smoothing"),
    ("baseline-unknown", dict(baseline="median"), ValueError, "baseline"),
    ("baseline-shape", dict(baseline=torch.zeros(3, 1)), ValueError, "baseline"),
    ("baseline-int", dict(baseline=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "baseline"),
    ("baseline-meta", dict(baseline=torch.zeros(3, 2, device="meta")), ValueError, "baseline"),
    ("correction-str", dict(correction="False"), TypeError, "correction"),
    (
        "meta-policy-rewards",
        dict(policy_rewards=torch.zeros(3, 2, device="meta"), ref_rewards=torch.zeros(3, 5, device="meta")),
        ValueError,
        "policy_rewards",
    ),
    ("meta-ref-rewards", dict(ref_rewards=torch.zeros(3, 5, device="meta")), ValueError, "ref_rewards"),
    ("meta-bon-logp", dict(bon_logp=torch.zeros(3, 1, device="meta")), ValueError, "bon_logp"),
    ("meta-ref-logp", dict(policy_ref_logp=torch.zeros(3, 2, device="meta")), ValueError, "policy_ref_logp"),
]


@pytest.mark.parametrize("case", BOND_CASES, ids=[c[0] for c in BOND_CASES])
def test_bond_loss_bad_input(case):
    _, over, exc, name = case
    over = dict(over)
    n = over.pop("n", 2)
    _expect(exc, name, lambda: _call_bond(n=n, **over))


def test_bond_loss_module_bad_input():
    args = _bond()
    _expect(ValueError, "beta", lambda: bk.BondLoss(2, beta=2.0)(*args.values()))
    _expect(ValueError, "n", lambda: bk.BondLoss(0)(*args.values()))


JBOND_CASES = [
    ("beta-negative", dict(beta=-0.5), ValueError, "beta"),
    ("beta-above-1", dict(beta=1.5), ValueError, "beta"),
    ("gamma-negative", dict(gamma=-1.0), ValueError, "gamma"),
    ("gamma-nan", dict(gamma=NAN), ValueError, "gamma"),
    ("penalty-negative", dict(penalty=-math.log(16)), ValueError, "penalty"),
    (
        "nan-policy-reward",
        dict(policy_rewards=torch.tensor([0.0, NAN, 1.0, 2.0])),
        ValueError,
        "policy_rewards",
    ),
    (
        "nan-anchor-reward",
        dict(anchor_rewards=_with_nan(torch.zeros(4, 2), (3, 1))),
        ValueError,
        "anchor_rewards",
    ),
    ("three-anchors", dict(anchor_rewards=torch.zeros(4, 3)), ValueError, "anchor_rewards"),
    ("B-anchor-rewards", dict(anchor_rewards=torch.zeros(5, 2)), ValueError, "anchor_rewards"),
    ("B-policy-rewards", dict(policy_rewards=torch.zeros(3)), ValueError, "policy_rewards"),
    ("B-anchor-logp", dict(anchor_logp=torch.zeros(5)), ValueError, "anchor_logp"),
    ("B-best-logp", dict(best_anchor_logp=torch.zeros(2)), ValueError, "best_anchor_logp"),
    ("empty-batch", dict(policy_logp=torch.zeros(0)), ValueError, "policy_logp"),
    ("policy-logp-2d", dict(policy_logp=torch.zeros(4, 1)), ValueError, "policy_logp"),
    ("policy-logp-int", dict(policy_logp=torch.zeros(4, dtype=torch.int64)), TypeError, "policy_logp"),
    (
        "meta-rewards",
        dict(policy_rewards=torch.zeros(4, device="meta"), anchor_rewards=torch.zeros(4, 2, device="meta")),
        ValueError,
        "policy_rewards",
    ),
    ("meta-anchor-logp", dict(anchor_logp=torch.zeros(4, device="meta")), ValueError, "anchor_logp"),
    ("meta-best-logp", dict(best_anchor_logp=torch.zeros(4, device="meta")), ValueError, "best_anchor_logp"),
]


@pytest.mark.parametrize("case", JBOND_CASES, ids=[c[0] for c in JBOND_CASES])
def test_jbond_loss_bad_input(case):
    _, over, exc, name = case
    _expect(exc, name, lambda: _call_jbond(**dict(over)))


# ----------------------------------------------------------------------------------------------------
# token_jeffreys and EMAAnchor
# ----------------------------------------------------------------------------------------------------
JEFFREYS_CASES = [
    ("shape", lambda p: bk.token_jeffreys(p, p[:-1]), ValueError, "anchor_logits"),
    ("int-policy", lambda p: bk.token_jeffreys(p.long(), p), TypeError, "policy_logits"),
    ("int-anchor", lambda p: bk.token_jeffreys(p, p.long()), TypeError, "anchor_logits"),
    ("meta-anchor", lambda p: bk.token_jeffreys(p, _meta(p)), ValueError, "anchor_logits"),
    ("beta-above-1", lambda p: bk.token_jeffreys(p, p, beta=1.01), ValueError, "beta"),
    ("beta-negative", lambda p: bk.token_jeffreys(p, p, beta=-0.01), ValueError, "beta"),
    ("temperature-0", lambda p: bk.token_jeffreys(p, p, temperature=0), ValueError, "temperature"),
    (
        "mask-not-bool",
        lambda p: bk.token_jeffreys(p, p, ignore_mask=torch.zeros(6)),
        ValueError,
        "ignore_mask",
    ),
    (
        "mask-shape",
        lambda p: bk.token_jeffreys(p, p, ignore_mask=torch.zeros(5, dtype=torch.bool)),
        ValueError,
        "ignore_mask",
    ),
    (
        "mask-meta",
        lambda p: bk.token_jeffreys(p, p, ignore_mask=torch.zeros(6, dtype=torch.bool, device="meta")),
        ValueError,
        "ignore_mask",
    ),
    ("backend-unknown", lambda p: bk.token_jeffreys(p, p, backend="jax"), ValueError, "backend"),
]


@pytest.mark.parametrize("case", JEFFREYS_CASES, ids=[c[0] for c in JEFFREYS_CASES])
def test_token_jeffreys_bad_input(case):
    _, fn, exc, name = case
    logits, _ = _tok()
    _expect(exc, name, lambda: fn(logits))


def test_ema_anchor_bad_input():
    net = torch.nn.Linear(3, 2)
    for eta in (-0.1, 1.5, NAN, "0.1", True):
        _expect(ValueError, "eta", lambda eta=eta: bk.EMAAnchor(net, eta=eta))
    _expect(TypeError, "anchor_module", lambda: bk.EMAAnchor({"w": torch.zeros(1)}))


# ----------------------------------------------------------------------------------------------------
# Inputs are never modified (unless inplace=True)
# ----------------------------------------------------------------------------------------------------
def _snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def _assert_unchanged(tensors, before):
    for t, b in zip(tensors, before):
        assert torch.equal(t.detach(), b), "an input tensor was modified"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_token_ops_do_not_modify_inputs(backend):
    g = _gen(9)
    logits = torch.randn(4, 5, 13, generator=g).requires_grad_(True)
    labels = torch.randint(0, 13, (4, 5), generator=g)
    labels[0, 0] = -100
    anchor = torch.randn(4, 5, 13, generator=g)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1, 1] = True
    cu = torch.tensor([0, 7, 20])
    grad_logp = torch.randn(4, 5, generator=g)
    inputs = [logits, labels, anchor, mask, cu, grad_logp]
    before = _snapshot(inputs)
    logp, ent = bk.token_logprobs(
        logits, labels, temperature=0.9, softcap=5.0, return_entropy=True, backend=backend
    )
    seq = bk.sequence_logprobs(logits, labels, backend=backend)
    packed = bk.sequence_logprobs(logits.view(20, 13), labels.view(20), cu_seqlens=cu, backend=backend)
    div = bk.token_jeffreys(logits, anchor, ignore_mask=mask, backend=backend)
    loss = (logp * grad_logp).sum() + ent.sum() + seq.sum() + packed.sum() + div.sum()
    loss.backward()
    bk.token_logprobs_and_grad(logits.detach(), labels, grad_logp, backend=backend)
    bk.sequence_logprobs_and_grad(logits.detach(), labels, torch.ones(4), backend=backend)
    _assert_unchanged(inputs, before)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_inplace_true_is_the_only_way_to_write_into_logits(backend):
    g = _gen(10)
    logits = torch.randn(6, 17, generator=g)
    labels = torch.randint(0, 17, (6,), generator=g)
    grad_logp = torch.randn(6, generator=g)
    logp, grad = bk.token_logprobs_and_grad(logits.clone(), labels, grad_logp, backend=backend)
    buffer = logits.clone()
    logp2, grad2 = bk.token_logprobs_and_grad(buffer, labels, grad_logp, backend=backend, inplace=True)
    assert grad2.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, grad)  # the logits buffer now holds the gradient, as documented
    torch.testing.assert_close(logp2, logp)


def test_sequence_level_ops_do_not_modify_inputs():
    bond = _bond(b=3, m=2, k=5, j=2)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 1] = False
    baseline = torch.randn(3, 2)
    inputs = list(bond.values()) + [mask, baseline]
    before = _snapshot(inputs)
    for kw in (dict(), dict(ref_mask=mask, correction=True, smoothing=0.1), dict(baseline=baseline)):
        out = bk.bond_loss(*bond.values(), n=3, **kw)
        out.loss.backward()
    bk.reward_quantiles(bond["policy_rewards"], bond["ref_rewards"], ref_mask=mask, smoothing="self")
    bk.best_of_n_indices(bond["ref_rewards"], 2)
    bk.bon_log_prob(bond["policy_ref_logp"], torch.full((3, 2), 0.5), torch.full((3, 2), 0.25), 4)
    jb = _jbond()
    jb_before = _snapshot(jb.values())
    for gamma in (0.0, 1.0):
        bk.jbond_loss(*jb.values(), gamma=gamma).loss.backward()
    _assert_unchanged(inputs, before)
    _assert_unchanged(list(jb.values()), jb_before)


# ----------------------------------------------------------------------------------------------------
# Found by an adversarial pass over the public API (2026-11-27)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["False", "no", 2, None, 0.5])
def test_flags_must_be_bools(flag):
    """A string such as "False" is truthy: taken as True it destroyed the logits (inplace) or returned a
    tuple (return_entropy).  Every flag now raises TypeError naming itself, and nothing is written."""
    logits, labels = _tok()
    before = logits.clone()
    g = torch.randn(labels.shape, generator=_gen(9))
    calls = {
        "inplace": lambda: bk.token_logprobs(logits.requires_grad_(False), labels, inplace=flag),
        "return_entropy": lambda: bk.token_logprobs(logits, labels, return_entropy=flag),
        "validate": lambda: bk.sequence_logprobs(logits.view(2, 3, -1), labels.view(2, 3), validate=flag),
    }
    for name, fn in calls.items():
        _expect(TypeError, name, fn)
    _expect(TypeError, "inplace", lambda: bk.token_logprobs_and_grad(logits, labels, g, inplace=flag))
    _expect(
        TypeError,
        "inplace",
        lambda: bk.sequence_logprobs_and_grad(logits.view(2, 3, -1), labels.view(2, 3), g[:2], inplace=flag),
    )
    _expect(TypeError, "strict", lambda: _call_jbond(strict=flag))
    _expect(TypeError, "validate", lambda: _call_bond(validate=flag))
    r, k = _quant()
    _expect(TypeError, "validate", lambda: bk.reward_quantiles(r, k, validate=flag))
    _expect(TypeError, "validate", lambda: bk.best_of_n_indices(k, 2, validate=flag))
    hid, w = torch.randn(6, 4, generator=_gen(5)), torch.randn(11, 4, generator=_gen(6))
    _expect(
        TypeError, "return_entropy", lambda: bk.linear_token_logprobs(hid, w, labels, return_entropy=flag)
    )
    assert torch.equal(logits, before)


def test_integer_rewards_are_compared_exactly():
    """Integers above 2^24 are not representable in fp32: 2^24 + 1 rounds onto 2^24 and makes a tie that is
    not there.  auto/torch compare integers in fp64 and return fp32; the fp32 kernels refuse them by name."""
    big = 2**24
    r = torch.tensor([[big + 1, big]])
    k = torch.tensor([[big, big + 1, big + 2, big - 7]])
    p_le, p_lt = bk.reward_quantiles(r, k)
    assert p_le.dtype == torch.float32 and p_lt.dtype == torch.float32
    assert p_le.tolist() == [[0.75, 0.5]] and p_lt.tolist() == [[0.5, 0.25]]
    want = bk.reference.reward_quantiles(r, k)
    assert torch.equal(want[0], p_le) and torch.equal(want[1], p_lt)
    msg = _expect(TypeError, "backend", lambda: bk.reward_quantiles(r, k, backend="cpu"))
    assert "int64" in msg
    args = _bond(b=1, m=2, k=4)
    out = bk.bond_loss(
        args["policy_logp"], args["policy_ref_logp"], r, k, args["bon_logp"], n=2, smoothing="none"
    )
    assert out.p_le.tolist() == [[0.75, 0.5]]


def test_empty_dimensions_get_named_errors():
    _expect(ValueError, "policy_logits", lambda: bk.token_jeffreys(torch.randn(4, 0), torch.randn(4, 0)))
    y = torch.zeros(4, dtype=torch.long)
    _expect(ValueError, "hidden", lambda: bk.linear_token_logprobs(torch.randn(4, 0), torch.randn(7, 0), y))
    for b, m in ((0, 2), (3, 0)):
        args = _bond()
        args["policy_logp"] = torch.randn(b, m, requires_grad=True)
        _expect(ValueError, "policy_logp", lambda a=args: bk.bond_loss(*a.values(), n=2))


def test_token_jeffreys_all_neg_inf_kept_row():
    g = _gen(11)
    p, q = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    p[1] = -math.inf
    _expect(ValueError, "policy_logits", lambda: bk.token_jeffreys(p, q, backend="torch"))
    keep_out = torch.tensor([False, True, False])
    div = bk.token_jeffreys(p, q, ignore_mask=keep_out, backend="torch")
    assert div[1].item() == 0.0 and torch.isfinite(div).all()
    q[2] = -math.inf
    _expect(
        ValueError, "anchor_logits", lambda: bk.token_jeffreys(p, q, ignore_mask=keep_out, backend="torch")
    )


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_meta_logits_give_meta_log_probs(backend):
    """Shape propagation on ``meta`` (e.g. a model built on the meta device) reads no values."""
    logits, labels = _tok()
    out = bk.token_logprobs(_meta(logits), _meta(labels), backend=backend)
    assert out.device.type == "meta" and tuple(out.shape) == tuple(labels.shape)
    seq = bk.sequence_logprobs(_meta(logits).view(2, 3, -1), _meta(labels).view(2, 3), backend=backend)
    assert seq.device.type == "meta" and tuple(seq.shape) == (2,)


def test_ignore_index_must_fit_int64():
    logits, labels = _tok()
    _expect(ValueError, "ignore_index", lambda: bk.token_logprobs(logits, labels, ignore_index=2**70))
    _expect(ValueError, "ignore_index", lambda: bk.token_logprobs(logits, labels, ignore_index=-(2**63) - 1))


def test_bon_log_prob_inputs():
    lp = torch.randn(3, generator=_gen(12))
    le, lt = torch.tensor([0.5, 0.9, 1.0]), torch.tensor([0.25, 0.9, 0.0])
    ok = bk.bon_log_prob(lp, le, lt, 4)
    torch.testing.assert_close(ok, bk.reference.bon_log_prob(lp, le, lt, 4))
    msg = _expect(ValueError, "p_le", lambda: bk.bon_log_prob(lp, le[:2], lt[:2], 4))
    assert "broadcast" in msg
    _expect(TypeError, "p_le", lambda: bk.bon_log_prob(lp, le.to(torch.complex64), lt, 4))
    for bad_le, bad_lt in ((1.5, 0.1), (-0.2, 0.0), (0.5, 0.6), (0.5, NAN), (NAN, 0.1)):
        msg = _expect(ValueError, "p_le", lambda a=bad_le, b=bad_lt: bk.bon_log_prob(lp, a, b, 4))
        assert "0 <= p_lt <= p_le <= 1" in msg
    out = bk.bon_log_prob(lp, 1.5, 0.1, 4, validate=False)  # the caller opted out: the formula as it is
    assert out.shape == lp.shape


def test_ema_anchor_update_needs_a_module():
    anchor = bk.EMAAnchor(torch.nn.Linear(2, 2), 0.1)
    _expect(TypeError, "policy_module", lambda: anchor.update(torch.zeros(2)))
