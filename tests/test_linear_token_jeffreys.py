"""linear_token_jeffreys: the student-teacher divergence from hidden states and LM heads, in vocabulary tiles.

Every backend against the fp64 reference on the same (rounded) inputs, values and the student's gradients
(hidden, weight, bias) with a random upstream gradient; both conventions (Jeffreys, TRL's generalised JSD at
β = 0, 1 and in between); softcaps, temperature, ignored rows; tiles smaller than the vocabulary (never the
whole (N, V)); and the bad inputs the issue lists.
"""

import pytest
import torch
from conftest import assert_close

import bond_kernels as bk
from bond_kernels.ops import linear_token_jeffreys as engine
from bond_kernels.reference.linear_token_jeffreys import linear_token_jeffreys as reference

# (N, H_s, H_t, V): why each shape is here.
SHAPES = [
    (1, 8, 8, 1),  # V = 1: both distributions are a point mass, the divergence and its gradient are 0
    (37, 24, 40, 1000),  # teacher wider than the student; four 256-column tiles, the last ragged
    (64, 32, 16, 2053),  # odd vocabulary, teacher narrower, 9 tiles
]
# (divergence, beta)
MODES = [("jeffreys", 0.3), ("jeffreys", 1.0), ("jeffreys", 0.0), ("gjsd", 0.5), ("gjsd", 0.0), ("gjsd", 1.0)]
# (temperature, student softcap, teacher softcap)
OPTIONS = [(1.0, None, None), (0.7, 5.0, 30.0)]


def _case(n, hs, ht, v, dtype, *, bias=True, ignore_frac=0.2):
    s = [torch.randn(n, hs), torch.randn(v, hs) * hs**-0.5 * 3, torch.randn(v) if bias else None]
    t = [torch.randn(n, ht), torch.randn(v, ht) * ht**-0.5 * 3, torch.randn(v) if bias else None]
    s = [x.to(dtype) if x is not None else None for x in s]
    t = [x.to(dtype) if x is not None else None for x in t]
    labels = torch.randint(0, v, (n,))
    labels[torch.rand(n) < ignore_frac] = -100
    return s, t, labels


def _run(s, t, labels, backend, **kw):
    leaves = [x.clone().requires_grad_(True) if x is not None else None for x in s]
    out = bk.linear_token_jeffreys(
        leaves[0],
        leaves[1],
        t[0],
        t[1],
        bias=leaves[2],
        teacher_bias=t[2],
        labels=labels,
        backend=backend,
        **kw,
    )
    return out, leaves


def _reference(s, t, labels, g, **kw):
    leaves = [x.detach().double().requires_grad_(True) if x is not None else None for x in s]
    tt = [x.double() if x is not None else None for x in t]
    out = reference(
        leaves[0],
        leaves[1],
        tt[0],
        tt[1],
        bias=leaves[2],
        teacher_bias=tt[2],
        ignore_mask=labels == -100,
        **kw,
    )
    grads = torch.autograd.grad((out * g.double()).sum(), [x for x in leaves if x is not None])
    return out.detach(), grads


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("temperature,softcap,teacher_softcap", OPTIONS)
@pytest.mark.parametrize("divergence,beta", MODES)
@pytest.mark.parametrize("n,hs,ht,v", SHAPES)
def test_values_and_student_gradients(
    n, hs, ht, v, divergence, beta, temperature, softcap, teacher_softcap, backend
):
    s, t, labels = _case(n, hs, ht, v, torch.float32)
    g = torch.randn(n)
    kw = dict(
        beta=beta,
        divergence=divergence,
        temperature=temperature,
        softcap=softcap,
        teacher_softcap=teacher_softcap,
    )
    out, leaves = _run(s, t, labels, backend, tile_bytes=4 * n * 256, **kw)
    (out * g).sum().backward()
    r_out, r_grads = _reference(s, t, labels, g, **kw)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert_close(out, r_out, torch.float32, scale=max(r_out.abs().max().item(), 1.0))
    assert torch.all(out[labels == -100] == 0)
    for leaf, r in zip([x for x in leaves if x is not None], r_grads):
        # atol 2e-5 of the largest entry: the gradient is a difference of terms of size |log p|·p (up to ~20×
        # larger than itself), each rounded in fp32; a wrong formula is off by O(1) of the largest entry
        assert_close(leaf.grad, r, torch.float32, scale=max(r.abs().max().item(), 1e-2), atol=2e-5)
    assert torch.all(leaves[0].grad[labels == -100] == 0)  # ignored rows: no gradient to their hidden state


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_leading_dims_no_bias(backend):
    """(B, T, H) bf16 inputs without biases: fp32 divergence, gradients in bf16, against fp64 on the rounded
    inputs (the tiles' matmuls run in fp32 on CPU)."""
    b, tt, v = 3, 5, 700
    s, t, labels = _case(b * tt, 16, 24, v, torch.bfloat16, bias=False)
    s[0], t[0], labels = s[0].view(b, tt, 16), t[0].view(b, tt, 24), labels.view(b, tt)
    g = torch.randn(b, tt)
    out, leaves = _run(s, t, labels, backend, beta=0.5, tile_bytes=4 * b * tt * 256)
    (out * g).sum().backward()
    r_out, r_grads = _reference(s, t, labels, g, beta=0.5)
    assert out.shape == (b, tt) and out.dtype == torch.float32
    assert_close(out, r_out, torch.float32, scale=max(r_out.abs().max().item(), 1.0), rtol=1e-4)
    assert leaves[0].grad.dtype == torch.bfloat16 and leaves[1].grad.dtype == torch.bfloat16
    for leaf, r in zip(leaves[:2], r_grads):
        assert_close(leaf.grad, r, torch.bfloat16)


def test_matches_token_jeffreys_on_materialised_logits():
    """The same number as token_jeffreys on the logits h·Wᵀ + b (the student is the policy)."""
    s, t, labels = _case(20, 16, 16, 900, torch.float32)
    out = bk.linear_token_jeffreys(
        s[0], s[1], t[0], t[1], bias=s[2], teacher_bias=t[2], beta=0.4, labels=labels
    )
    logits_s = s[0] @ s[1].T + s[2]
    logits_t = t[0] @ t[1].T + t[2]
    direct = bk.token_jeffreys(logits_s, logits_t, beta=0.4, ignore_mask=labels == -100)
    torch.testing.assert_close(out, direct, rtol=1e-4, atol=1e-5)


def test_tiles_never_span_the_vocabulary(monkeypatch):
    """With a tile budget below one (N, V) tile, every matmul covers at most C < V columns."""
    seen = []
    matmul = engine.Head.matmul

    def spy(self, c0, c1, **kw):
        seen.append(c1 - c0)
        return matmul(self, c0, c1, **kw)

    monkeypatch.setattr(engine.Head, "matmul", spy)
    s, t, labels = _case(16, 8, 8, 3000, torch.float32)
    leaves = [x.clone().requires_grad_(True) for x in s]
    out = bk.linear_token_jeffreys(
        leaves[0], leaves[1], t[0], t[1], bias=leaves[2], teacher_bias=t[2], tile_bytes=4 * 16 * 512
    )
    out.sum().backward()
    assert seen and max(seen) == 512 < 3000


def test_frozen_student_weight_and_inputs_unchanged():
    s, t, labels = _case(12, 8, 8, 300, torch.float32)
    before = [x.clone() for x in s + t]
    h = s[0].clone().requires_grad_(True)
    out = bk.linear_token_jeffreys(
        h, s[1], t[0], t[1], bias=s[2], teacher_bias=t[2], labels=labels, divergence="gjsd"
    )
    out.sum().backward()
    assert h.grad is not None and h.grad.shape == h.shape
    for x, y in zip(s + t, before):
        assert torch.equal(x, y)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_triton_backend_under_the_interpreter():
    s, t, labels = _case(9, 8, 12, 600, torch.float32)
    g = torch.randn(9)
    out, leaves = _run(s, t, labels, "triton", beta=0.3, softcap=4.0, tile_bytes=4 * 9 * 256)
    (out * g).sum().backward()
    r_out, r_grads = _reference(s, t, labels, g, beta=0.3, softcap=4.0)
    assert_close(out, r_out, torch.float32, scale=max(r_out.abs().max().item(), 1.0))
    for leaf, r in zip(leaves, r_grads):
        assert_close(leaf.grad, r, torch.float32)


def test_fp64_runs_the_reference_in_fp64():
    s, t, labels = _case(6, 8, 8, 50, torch.float64)
    out = bk.linear_token_jeffreys(s[0], s[1], t[0], t[1], bias=s[2], teacher_bias=t[2], labels=labels)
    assert out.dtype == torch.float64


def _bad(**over):
    s, t, labels = _case(4, 8, 6, 50, torch.float32)
    args = dict(
        hidden=s[0],
        weight=s[1],
        teacher_hidden=t[0],
        teacher_weight=t[1],
        bias=s[2],
        teacher_bias=t[2],
        labels=labels,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,exc,words",
    [
        (
            dict(teacher_weight=torch.randn(49, 6), teacher_bias=None),
            ValueError,
            "teacher_weight must have weight's vocabulary size",
        ),
        (dict(weight=torch.randn(50, 7)), ValueError, "weight must be (V, H)"),
        (dict(teacher_hidden=torch.randn(4, 5)), ValueError, "teacher_weight must be (V, H)"),
        (
            dict(teacher_hidden=torch.randn(5, 6)),
            ValueError,
            "teacher_hidden must have hidden's leading shape",
        ),
        (
            dict(teacher_weight=torch.randn(50, 6, requires_grad=True)),
            ValueError,
            "teacher_weight requires grad",
        ),
        (
            dict(teacher_hidden=torch.randn(4, 6, requires_grad=True)),
            ValueError,
            "teacher_hidden requires grad",
        ),
        (
            dict(ignore_mask=torch.zeros(5, dtype=torch.bool)),
            ValueError,
            "ignore_mask must be a bool tensor of shape (4,)",
        ),
        (dict(ignore_mask=torch.zeros(4)), ValueError, "ignore_mask must be a bool tensor"),
        (dict(labels=torch.zeros(4, 2, dtype=torch.long)), ValueError, "labels must be an int64"),
        (dict(beta=1.5), ValueError, "beta"),
        (dict(beta=-0.1), ValueError, "beta"),
        (dict(divergence="jsd"), ValueError, "divergence must be one of"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(teacher_bias=torch.randn(49)), ValueError, "teacher_bias must be (50,)"),
        (dict(hidden=torch.randn(4, 8, dtype=torch.float64)), TypeError, "weight must have hidden's dtype"),
        (dict(hidden=torch.zeros(4, 8, dtype=torch.long)), TypeError, "hidden must be a float tensor"),
        (dict(tile_bytes=0), ValueError, "tile_bytes"),
    ],
)
def test_bad_input(over, exc, words):
    args = _bad(**over)
    with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")):
        bk.linear_token_jeffreys(
            args.pop("hidden"),
            args.pop("weight"),
            args.pop("teacher_hidden"),
            args.pop("teacher_weight"),
            **args,
        )


@pytest.mark.parametrize("divergence,beta", [("jeffreys", 0.5), ("gjsd", 0.5), ("gjsd", 0.0)])
def test_student_entropy_from_the_same_pass(divergence, beta):
    """return_entropy=True: the student's entropy per token (no gradient), against the reference entropy of
    the materialised logits, with large logits (|z| ~ 60) so a cancelling Σ p·z would show; the divergence
    is unchanged and still differentiable."""
    from bond_kernels import reference as ref

    s, t, labels = _case(24, 16, 16, 1500, torch.float32)
    s[1] = s[1] * 8
    h = s[0].clone().requires_grad_(True)
    div, ent = bk.linear_token_jeffreys(
        h,
        s[1],
        t[0],
        t[1],
        bias=s[2],
        teacher_bias=t[2],
        labels=labels,
        beta=beta,
        divergence=divergence,
        softcap=50.0,
        temperature=0.9,
        return_entropy=True,
        tile_bytes=4 * 24 * 256,
    )
    logits = s[0].double() @ s[1].double().T + s[2].double()
    _, r_ent = ref.token_logprobs(
        logits, torch.zeros(24, dtype=torch.long), temperature=0.9, softcap=50.0, return_entropy=True
    )
    r_ent = torch.where(labels == -100, torch.zeros((), dtype=torch.float64), r_ent)
    assert not ent.requires_grad and ent.dtype == torch.float32
    torch.testing.assert_close(ent.double(), r_ent, rtol=0, atol=2e-5)
    plain = bk.linear_token_jeffreys(
        s[0],
        s[1],
        t[0],
        t[1],
        bias=s[2],
        teacher_bias=t[2],
        labels=labels,
        beta=beta,
        divergence=divergence,
        softcap=50.0,
        temperature=0.9,
        tile_bytes=4 * 24 * 256,
    )
    assert torch.equal(div.detach(), plain)
    div.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()
    fp64 = [x.double() for x in s], [x.double() for x in t]
    _, e64 = bk.linear_token_jeffreys(
        fp64[0][0],
        fp64[0][1],
        fp64[1][0],
        fp64[1][1],
        bias=fp64[0][2],
        teacher_bias=fp64[1][2],
        labels=labels,
        beta=beta,
        divergence=divergence,
        softcap=50.0,
        temperature=0.9,
        return_entropy=True,
    )
    torch.testing.assert_close(e64, r_ent, rtol=1e-9, atol=1e-9)


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates both sides of a where
@pytest.mark.parametrize("with_cross", [True, False], ids=["cross", "lse-only"])
@pytest.mark.parametrize(
    "temperature,cap_s,cap_t",
    [(1.0, 0.0, 0.0), (0.7, 5.0, 30.0), (1.3, 0.0, 8.0)],
    ids=["plain", "caps", "t-cap"],
)
def test_triton_tile_fold_matches_the_torch_fold(monkeypatch, with_cross, temperature, cap_s, cap_t):
    # The fused per-tile fold (one Triton kernel) against the torch fold it replaces, over three tiles of
    # different widths with 64-column blocks (ragged last block), -inf entries and maxes that grow along the
    # vocabulary (the running sums are rescaled).
    from bond_kernels.ops.triton import linear_token_jeffreys as fold_mod

    monkeypatch.setattr(fold_mod, "MAX_BLOCK", 64)
    n, h, widths = 7, 5, (150, 64, 91)
    v = sum(widths)
    hs, ws = torch.randn(n, h), torch.randn(v, h) * 2
    ht, wt = torch.randn(n, h + 3), torch.randn(v, h + 3) * 2
    # ramps: the maxes grow from block to block, so every block rescales the running sums
    bs, bt = torch.randn(v) + torch.linspace(0, 2, v), torch.randn(v) * 0.5 + torch.linspace(0, 3, v)
    # words masked in both heads (-inf without a softcap; a softcap makes them -cap): the cross terms stay
    # finite (a word masked in one head only makes them +inf, which would compare equal whatever the sums)
    bs[[3, 170, 200]] = bt[[3, 170, 200]] = float("-inf")
    student = engine.Head(hs, ws, bs, cap_s, temperature)
    teacher = engine.Head(ht, wt, bt, cap_t, temperature)
    student.hidden[2] = 0.0  # row 2: its logits are the bias alone
    want, got = engine._new_state(n, hs.device), engine._new_state(n, hs.device)
    c0 = 0
    for w in widths:
        engine.torch_tile_fold(want, student, teacher, c0, c0 + w, with_cross)
        engine.triton_tile_fold(got, student, teacher, c0, c0 + w, with_cross)
        c0 += w
    rows = [0, 1, 2, 4, 5] + ([3, 6] if with_cross else [])
    torch.testing.assert_close(got[rows], want[rows], rtol=2e-5, atol=2e-5)
    # and the statistics they give: lse and entropy of the student, lse of the teacher
    for st in (got, want):
        assert torch.isfinite(st[1]).all() and (st[1] > 0).all()


@pytest.mark.interpret
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates both sides of a where
@pytest.mark.parametrize("mode,beta", [("jeffreys", 0.3), ("jeffreys", 0.0), ("kl", 1.0), ("gjsd", 0.4)])
@pytest.mark.parametrize(
    "temperature,cap_s,cap_t", [(1.0, 0.0, 0.0), (0.7, 5.0, 30.0)], ids=["plain", "caps"]
)
def test_triton_tile_grad_matches_the_torch_gradient(monkeypatch, mode, beta, temperature, cap_s, cap_t):
    # The fused per-tile gradient (one Triton kernel from the two raw tiles) against the torch path it
    # replaces, on a column slice of the rows (the statistics are the full rows'), 64-column blocks, an
    # ignored row holding NaN (it must give exact zeros), random upstream coefficients.
    from bond_kernels.ops.triton import linear_token_jeffreys as fold_mod

    monkeypatch.setattr(fold_mod, "GRAD_MAX_BLOCK", 64)
    n, h, v = 6, 5, 300
    student = engine.Head(torch.randn(n, h), torch.randn(v, h) * 2, torch.randn(v), cap_s, temperature)
    teacher = engine.Head(
        torch.randn(n, h + 2), torch.randn(v, h + 2) * 2, torch.randn(v), cap_t, temperature
    )
    state = engine._new_state(n, torch.device("cpu"))
    engine.torch_tile_fold(state, student, teacher, 0, v, True)
    lse_s = state[0] + torch.log(state[1])
    lse_t = state[4] + torch.log(state[5])
    if mode == "gjsd":
        _, aux = engine.gjsd_pass(student, teacher, lse_s, lse_t, beta, n, v, 128)
    else:
        aux = engine.jeffreys_stats(student, teacher, n, v, 128, engine.TORCH)[2]
    keep = torch.tensor([True, True, False, True, True, True])
    coef = torch.where(keep, torch.randn(n), torch.zeros(()))
    student.hidden[2] = float("nan")  # the ignored row
    grad = engine._TileGrad(mode, beta, lse_s, lse_t, aux, coef, keep, torch.empty(0, dtype=torch.bool))
    c0, c1 = 37, 251  # a slice: the statistics are the whole rows'
    want = engine.torch_tile_grad(engine.TORCH, student, teacher, c0, c1, grad)
    got = engine.triton_tile_grad(engine.TRITON, student, teacher, c0, c1, grad)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    assert want.abs().max() > 1e-3  # the comparison is not of zeros
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * want.abs().max().item())
