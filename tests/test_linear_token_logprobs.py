"""linear_token_logprobs on CPU: the chunked engine (cpu backend) against the fp64 reference, plus bad input.

The tile shape is forced with BOND_KERNELS_LINEAR_TILE so that small problems still cross row-block and
vocabulary-tile boundaries (including a partial last tile and one-column tiles).
"""

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _backend
from bond_kernels.ops import linear_engine as eng
from bond_kernels.ops import linear_plan as plans
from bond_kernels.reference.linear_token_logprobs import (
    linear_token_logprobs as linear_token_logprobs_reference,
)

# (leading shape, H, V, tile override): why each is here.  Tile "" is the automatic plan; "5,7" gives row
# blocks and a partial last vocabulary tile; "64,1" one-column tiles (every label in another tile).
CASES = [
    ((37,), 16, 101, ""),  # odd sizes, V prime
    ((37,), 16, 101, "5,7"),
    ((37,), 16, 101, "64,1"),
    ((2, 9), 24, 257, ""),  # 3-D hidden (B, T, H); V = 2^8 + 1
    ((2, 9), 24, 257, "5,7"),
    ((2, 9), 24, 257, "64,1"),
    ((1,), 1, 1, ""),  # the degenerate corner: one row, one feature, one word
    ((6,), 8, 65_600, ""),  # V above 65536 (int32-sensitive index paths), few rows to stay fast
    ((6,), 8, 65_600, "4,16384"),  # ... in 5 tiles, the last one partial
]
# fp32 results against the fp64 reference of the same inputs.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(lead, h, v, dtype, *, bias, gen, scale=1.0):
    hid = (torch.randn(*lead, h, generator=gen) * scale).to(dtype)
    w = (torch.randn(v, h, generator=gen) / h**0.5 * 4).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    y = torch.randint(0, v, lead, generator=gen)
    flat = y.view(-1)
    flat[0] = -100
    if flat.numel() > 2:
        flat[1], flat[2] = 0, v - 1  # first and last word: first and last tile
    return hid, w, b, y


def _run(fn, hid, w, b, y, g, ge, **kw):
    leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if b is not None:
        leaves.append(b.clone().requires_grad_(True))
    lp, ent = fn(
        leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, return_entropy=True, **kw
    )
    grads = torch.autograd.grad((lp * g + ent * ge).sum(), leaves)
    return lp, ent, grads


def _reference64(hid, w, b, y, g, ge, **kw):
    to64 = lambda t: None if t is None else t.double()
    return _run(
        linear_token_logprobs_reference, to64(hid), to64(w), to64(b), y, g.double(), ge.double(), **kw
    )


def _compare(got, want, tol, what):
    lp, ent, grads = got
    wlp, went, wgrads = want
    torch.testing.assert_close(lp, wlp.float(), **tol, msg=lambda m: f"{what} logp: {m}")
    torch.testing.assert_close(ent, went.float(), **tol, msg=lambda m: f"{what} entropy: {m}")
    for name, a, b in zip(("hidden", "weight", "bias"), grads, wgrads):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{what} grad {name}: {m}")


@pytest.mark.parametrize("lead,h,v,tile", CASES)
@pytest.mark.parametrize("temperature,softcap,bias", [(1.0, None, False), (0.7, 3.0, True)])
def test_cpu_matches_reference(lead, h, v, tile, temperature, softcap, bias, monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    gen = torch.Generator().manual_seed(hash((lead, h, v)) % 2**31)
    hid, w, b, y = _inputs(lead, h, v, torch.float32, bias=bias, gen=gen)
    g, ge = torch.randn(lead, generator=gen), torch.randn(lead, generator=gen)
    kw = dict(temperature=temperature, softcap=softcap)
    got = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, backend="cpu", **kw)
    # fp32 sums over V terms (grad_hidden = dlogits·W) carry rounding growing like sqrt(V): 1e-4 at V = 65600.
    tol = max(2e-5, 4e-7 * v**0.5)
    want = _reference64(hid, w, b, y, g, ge, **kw)
    _compare(got, want, dict(rtol=tol, atol=tol), f"cpu {lead} {h} {v} tile={tile!r}")


def test_engine_with_torch_tile_kernels_fp64(monkeypatch):
    """The engine itself (independent of the C++ kernels): fp64 through the torch tile kernels, to 1e-12,
    with and without kept tiles."""
    gen = torch.Generator().manual_seed(5)
    hid, w, b, y = _inputs((29,), 12, 97, torch.float64, bias=True, gen=gen)
    g, ge = (
        torch.randn(29, generator=gen, dtype=torch.float64),
        torch.randn(29, generator=gen, dtype=torch.float64),
    )
    want_lp, want_ent, want = _reference64(hid, w, b, y, g, ge, temperature=1.3, softcap=2.0)
    tk = eng.TORCH.tiles
    # (29, 10): one row block, so the forward keeps tiles 7, 8, 9 (29·(97 − 70) ≤ 70·12) in a Kept buffer
    kept_first = {(29, 97): None, (4, 10): None, (7, 1): None, (29, 10): 7}
    for (rows, vocab), first in kept_first.items():
        plan = plans.Plan(rows, vocab, torch.float64)
        kept = eng.make_kept(29, w, plan)
        assert (kept and kept.first) == first
        lp, lse, ent = eng.engine_forward(hid, w, b, y, 1.3, 2.0, -100, True, tk, plan, kept)
        grads = eng.local_backward(
            hid,
            w,
            b,
            y,
            lse,
            ent,
            g,
            ge,
            v_offset=0,
            temperature=1.3,
            softcap=2.0,
            ignore_index=-100,
            tk=tk,
            plan=plan,
            need_hidden=True,
            need_weight=True,
            need_bias=True,
            kept=kept,
        )
        if kept is not None:
            assert grads[1].data_ptr() == kept.buf.data_ptr()  # grad_weight IS the buffer
        torch.testing.assert_close(lp, want_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, want_ent, rtol=1e-12, atol=1e-12)
        for a, b_ in zip(grads, want):
            torch.testing.assert_close(a, b_, rtol=1e-12, atol=1e-12)


def test_bf16_error_is_eager_sized(monkeypatch):
    """bf16 inputs: errors against fp64 of the same bf16 values stay within 2x eager's bf16 error (+ slack)."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "8,64")
    gen = torch.Generator().manual_seed(11)
    hid, w, b, y = _inputs((33,), 32, 509, torch.bfloat16, bias=False, gen=gen)
    g, ge = torch.randn(33, generator=gen), torch.randn(33, generator=gen)
    want = _reference64(hid, w, None, y, g, ge)
    got = _run(bk.linear_token_logprobs, hid, w, None, y, g, ge, backend="cpu")
    assert got[2][0].dtype == torch.bfloat16 and got[2][1].dtype == torch.bfloat16

    def eager(h_, w_, y_, bias=None, return_entropy=True):
        lp = torch.log_softmax((h_ @ w_.t()).float(), -1)
        tok = lp.gather(-1, y_.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (y_ != -100)
        ent = -(lp.exp() * lp).sum(-1) * (y_ != -100)
        return tok, ent

    ref_eager = _run(eager, hid, w, None, y, g, ge)
    for i, what in enumerate(("logp", "entropy")):
        err = (got[i].double() - want[i]).abs().max().item()
        err_eager = (ref_eager[i].double() - want[i]).abs().max().item()
        assert err <= 2 * err_eager + 1e-4, f"{what}: ours {err:.2e} vs eager bf16 {err_eager:.2e}"
    for a, b_, e in zip(got[2], want[2], ref_eager[2]):
        err = (a.double() - b_).abs().max().item()
        err_eager = (e.double() - b_).abs().max().item()
        assert err <= 2 * err_eager + 1e-3, f"grad: ours {err:.2e} vs eager bf16 {err_eager:.2e}"


@pytest.mark.parametrize("ignore_index", [-100, 0])
def test_ignore_index_even_when_it_is_a_word(ignore_index, monkeypatch):
    """ignore_index=0 (a pad id inside the vocabulary) must not collide with the clamped local label 0."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "3,5")
    gen = torch.Generator().manual_seed(3)
    hid, w, b, y = _inputs((17,), 8, 23, torch.float32, bias=True, gen=gen)
    y[0] = y[4] = y[5] = y[6] = ignore_index
    g, ge = torch.randn(17, generator=gen), torch.randn(17, generator=gen)
    kw = dict(ignore_index=ignore_index)
    got = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, backend="cpu", **kw)
    _compare(got, _reference64(hid, w, b, y, g, ge, **kw), TOL[torch.float32], f"ignore_index={ignore_index}")
    ignored = y == ignore_index
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all()


def test_all_ignored_and_empty():
    hid = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    y = torch.full((4,), -100)
    lp = bk.linear_token_logprobs(hid, w, y, backend="cpu")
    assert (lp == 0).all()
    (lp * torch.randn(4)).sum().backward()
    assert (hid.grad == 0).all() and (w.grad == 0).all()
    empty = bk.linear_token_logprobs(hid[:0], w, y[:0], backend="cpu")
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_frozen_weight_and_noncontiguous_hidden(monkeypatch):
    """Only the gradients asked for are computed; a strided view of hidden is read without a problem."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "4,6")
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(3, 7, 10, generator=gen)
    w = torch.randn(19, 10, generator=gen)
    y = torch.randint(0, 19, (3, 6), generator=gen)
    g = torch.randn(3, 6, generator=gen)
    hid = base.clone().requires_grad_(True)
    lp = bk.linear_token_logprobs(hid[:, :-1], w, y, backend="cpu")  # w does not require grad
    (gh,) = torch.autograd.grad((lp * g).sum(), hid)
    hid64 = base.double().requires_grad_(True)
    want = linear_token_logprobs_reference(hid64[:, :-1], w.double(), y)
    (wgh,) = torch.autograd.grad((want * g.double()).sum(), hid64)
    torch.testing.assert_close(lp, want.float(), **TOL[torch.float32])
    torch.testing.assert_close(gh.double(), wgh, **TOL[torch.float32])


@pytest.mark.parametrize("bad", [9, 1000, -5])
def test_out_of_range_label_raises_on_cpu(bad):
    """On CPU tensors every backend checks the labels (no synchronisation to save); the engine itself, as a
    GPU launch without validate=True would, leaves NaN in that row only."""
    hid, w = torch.randn(5, 4), torch.randn(9, 4)
    y = torch.tensor([1, 2, bad, 3, -100])
    for backend in ("cpu", "auto", "torch"):
        with pytest.raises(ValueError, match=rf"labels must lie in \[0, 9\).*got {bad}"):
            bk.linear_token_logprobs(hid, w, y, backend=backend)
    lp, *_ = eng.CPU.fwd(hid, w, None, y, 1.0, 0.0, -100, False)
    assert torch.isnan(lp[2]) and torch.isfinite(lp[[0, 1, 3, 4]]).all()


def test_deterministic(monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "5,7")
    gen = torch.Generator().manual_seed(2)
    hid, w, b, y = _inputs((21,), 8, 45, torch.float32, bias=True, gen=gen)
    g, ge = torch.randn(21, generator=gen), torch.randn(21, generator=gen)
    a = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, backend="cpu")
    c = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, backend="cpu")
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert all(torch.equal(x, z) for x, z in zip(a[2], c[2]))


def test_auto_and_torch_backends_agree():
    gen = torch.Generator().manual_seed(4)
    hid, w, b, y = _inputs((2, 5), 8, 31, torch.float32, bias=True, gen=gen)
    auto = bk.linear_token_logprobs(hid, w, y, bias=b)
    ref = bk.linear_token_logprobs(hid, w, y, bias=b, backend="torch")
    torch.testing.assert_close(auto, ref, rtol=1e-5, atol=1e-5)
    assert bk.linear_token_logprobs(hid.double(), w.double(), y, bias=b.double()).dtype == torch.float64


def test_cpu_plan_bounds_the_tile():
    """The CPU plan at the benchmark shape: a tile of at most 64 MiB of fp32 logits (and weight slice)."""
    plan = plans.cpu_plan(8192, 128256, 4096, torch.bfloat16)
    assert plan.rows * plan.vocab * 4 <= plans.CPU_TILE_BYTES
    assert plan.vocab * 4096 * 4 <= plans.CPU_TILE_BYTES
    assert plan.rows <= plans.CPU_MAX_ROWS and plan.compute_dtype == torch.float32


def test_tiles_never_exceed_the_plan(monkeypatch):
    seen = []
    real = eng._tile_logits

    def spy(h_rows, weight, bias, v0, v1, plan, out=None):
        x = real(h_rows, weight, bias, v0, v1, plan, out=out)
        seen.append(x.numel())
        return x

    monkeypatch.setattr(eng, "_tile_logits", spy)
    monkeypatch.setattr(plans, "CPU_TILE_BYTES", 4 * 64)  # 64 fp32 elements per tile
    hid, w = torch.randn(40, 8, requires_grad=True), torch.randn(50, 8)
    y = torch.randint(0, 50, (40,))
    lp = bk.linear_token_logprobs(hid, w, y, backend="cpu")
    lp.sum().backward()
    assert len(seen) > 10 and max(seen) <= 64


def test_explicit_backends():
    ok, _ = _backend.availability("cpu", "cpu")
    hid, w, y = torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,))
    if not ok:
        with pytest.raises(RuntimeError, match="'cpu' is unavailable"):
            bk.linear_token_logprobs(hid, w, y, backend="cpu")
    with pytest.raises(RuntimeError, match="does not implement"):
        bk.linear_token_logprobs(hid, w, y, backend="cuda")


# --------------------------------------------------------------------------------------------------------
# bad input: each error names the argument
# --------------------------------------------------------------------------------------------------------
def _bad(**over):
    args = dict(hidden=torch.randn(3, 4), weight=torch.randn(5, 4), labels=torch.randint(0, 5, (3,)))
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return lambda: bk.linear_token_logprobs(args["hidden"], args["weight"], args["labels"], **kw)


@pytest.mark.parametrize(
    "over,exc,pattern",
    [
        (dict(weight=torch.randn(5, 6)), ValueError, r"weight must have hidden's size H = 4"),
        (dict(weight=torch.randn(4, 5)), ValueError, r"weight must have hidden's size H = 4.*\(4, 5\)"),
        (dict(weight=torch.randn(20)), ValueError, r"weight must be \(V, H\)"),
        (dict(weight=torch.randn(0, 4)), ValueError, r"weight must hold at least one"),
        (dict(weight=torch.randn(5, 4, dtype=torch.float64)), TypeError, r"weight must have hidden's dtype"),
        (dict(weight=torch.randint(0, 3, (5, 4))), TypeError, r"weight must be a float tensor"),
        (dict(bias=torch.randn(6)), ValueError, r"bias must have shape \(5,\).*\(6,\)"),
        (dict(bias=torch.randn(5, 1)), ValueError, r"bias must have shape \(5,\)"),
        (dict(bias=torch.randn(5, dtype=torch.float64)), TypeError, r"bias must have weight's dtype"),
        (
            dict(labels=torch.randint(0, 5, (4,))),
            ValueError,
            r"labels must have hidden's leading shape \(3,\)",
        ),
        (dict(labels=torch.rand(3)), TypeError, r"labels must be an int64"),
        (dict(hidden=[[1.0]]), TypeError, r"hidden must be a torch.Tensor"),
        (dict(temperature=0.0), ValueError, r"temperature must be a finite number > 0"),
        (dict(softcap=-1.0), ValueError, r"softcap"),
        (dict(backend="gpu"), ValueError, r"backend must be one of"),
    ],
)
def test_bad_input(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _bad(**over)()


def test_bad_tile_override(monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "8")
    with pytest.raises(ValueError, match="BOND_KERNELS_LINEAR_TILE"):
        bk.linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,)), backend="cpu"
        )


def test_torch_compile_fullgraph():
    """The custom ops trace under torch.compile(fullgraph=True) and give the eager values and gradients."""
    gen = torch.Generator().manual_seed(21)
    hid, w, b, y = _inputs((2, 5), 8, 31, torch.float32, bias=True, gen=gen)
    leaves = [t.clone().requires_grad_(True) for t in (hid, w, b)]

    def f(h_, w_, b_, y_):
        return bk.linear_token_logprobs(h_, w_, y_, bias=b_, return_entropy=True, softcap=2.0, backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(*leaves, y), f(*leaves, y)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)
    g = torch.randn(2, 5, generator=gen)
    ga = torch.autograd.grad((got[0] * g + got[1]).sum(), leaves)
    ge = torch.autograd.grad((want[0] * g + want[1]).sum(), leaves)
    for a, e in zip(ga, ge):
        torch.testing.assert_close(a, e)


def test_accumulate_without_fp32_output_matmul(monkeypatch):
    """The fallback of the fp32 grad_hidden accumulation (bf16 tiles, no out_dtype matmul): row chunks."""
    monkeypatch.setattr(eng, "_PRODUCT_ROWS", 3)
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(10, 7, generator=gen).to(torch.bfloat16)
    b = torch.randn(7, 5, generator=gen).to(torch.bfloat16)
    dst = torch.full((10, 5), float("nan"))
    eng._accumulate(dst, a, b, True)
    want = a.float() @ b.float()
    torch.testing.assert_close(dst, want, rtol=1e-2, atol=1e-2)
    eng._accumulate(dst, a, b, False)
    torch.testing.assert_close(dst, 2 * want, rtol=1e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------------------
# recompute="auto": the forward keeps the last tiles' logits in the future grad_weight buffer
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,v,h,vocab", [(29, 97, 12, 10), (8, 50, 40, 7), (64, 1000, 3, 1), (5, 9, 1, 2)])
def test_kept_layout_never_overlaps(n, v, h, vocab):
    """The stored logits [0, n·(V − c)) and the kept tiles' grad_weight rows [c·H, V·H) are disjoint, and the
    first kept tile is the earliest one for which that holds (no tile that could be kept is recomputed)."""
    plan = plans.Plan(n, vocab, torch.float32)
    kept = eng.make_kept(n, torch.empty(v, h), plan)
    k_tiles = -(-v // vocab)
    fits = [n * (v - k * vocab) <= k * vocab * h for k in range(k_tiles)]
    first = fits.index(True) if any(fits) else k_tiles
    if first == k_tiles:
        assert kept is None
        return
    assert kept.first == first and kept.buf.numel() == v * h
    c = first * vocab
    for k in range(first, k_tiles):
        v0, v1 = k * vocab, min(v, (k + 1) * vocab)
        t = kept.tile(k, v0, v1, n)
        start = t.storage_offset()
        assert t.shape == (n, v1 - v0) and t.is_contiguous()
        assert start + t.numel() <= n * (v - c) <= c * h  # inside the store, before the kept rows of grad_W


def test_make_kept_declines():
    w = torch.empty(100, 8)
    assert eng.make_kept(9, w, plans.Plan(8, 10, torch.float32)) is None  # two row blocks
    assert eng.make_kept(8, w, plans.Plan(8, 10, torch.float64)) is None  # tiles in another dtype
    assert eng.make_kept(8, w, plans.Plan(8, 100, torch.float32)) is None  # one tile: it cannot be kept
    assert eng.make_kept(0, w, plans.Plan(8, 10, torch.float32)) is None


def _count_recomputes(monkeypatch):
    """Counts tile matmuls: "kept" wrote into the Kept buffer, "plain" into a fresh tile."""
    calls = {"plain": 0, "kept": 0}
    real = eng._tile_logits

    def spy(h_rows, weight, bias, v0, v1, plan, out=None):
        calls["kept" if out is not None else "plain"] += 1
        return real(h_rows, weight, bias, v0, v1, plan, out=out)

    monkeypatch.setattr(eng, "_tile_logits", spy)
    return calls


@pytest.mark.parametrize("bias,tile", [(False, "64,8"), (True, "64,13")])
def test_auto_keeps_tiles_and_matches(bias, tile, monkeypatch):
    """recompute='auto' against 'full' and the fp64 reference: identical forward, gradients to fp32
    rounding, and the backward recomputes only the tiles that were not kept."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    gen = torch.Generator().manual_seed(31)
    hid, w, b, y = _inputs((3, 11), 20, 211, torch.float32, bias=bias, gen=gen)
    g, ge = torch.randn(3, 11, generator=gen), torch.randn(3, 11, generator=gen)
    kw = dict(temperature=0.8, softcap=4.0, backend="cpu")
    calls = _count_recomputes(monkeypatch)
    auto = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, **kw)
    vocab = int(tile.split(",")[1])
    k_tiles = -(-211 // vocab)
    first = eng.make_kept(33, w, plans.Plan(33, vocab, torch.float32)).first
    assert calls["kept"] == k_tiles - first > 0  # the forward wrote the kept tiles into the buffer
    # forward: the `first` tiles that are not kept; backward: only those again (K + `first` without keeping)
    assert calls["plain"] == 2 * first
    full = _run(bk.linear_token_logprobs, hid, w, b, y, g, ge, recompute="full", **kw)
    assert torch.equal(auto[0], full[0]) and torch.equal(auto[1], full[1])
    want = _reference64(hid, w, b, y, g, ge, temperature=0.8, softcap=4.0)
    _compare(auto, want, dict(rtol=2e-5, atol=2e-5), f"auto tile={tile}")
    for a, f in zip(auto[2], full[2]):
        torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-6)


def test_auto_hidden_grad_only_and_retained_graph(monkeypatch):
    """The buffer is consumed once: a hidden-only backward, then a second backward through the retained
    graph (which must recompute every tile, not read gradients as logits), both equal to the reference."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,9")
    gen = torch.Generator().manual_seed(32)
    hid, w, _, y = _inputs((30,), 16, 100, torch.float32, bias=False, gen=gen)
    g = torch.randn(30, generator=gen)
    hl, wl = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp = bk.linear_token_logprobs(hl, wl, y, backend="cpu")
    (gh1,) = torch.autograd.grad(lp, hl, g, retain_graph=True)
    gh2, gw2 = torch.autograd.grad(lp, (hl, wl), g * 0.5 + 1)
    hd, wd = hid.double().requires_grad_(True), w.double().requires_grad_(True)
    ref = linear_token_logprobs_reference(hd, wd, y)
    (rh1,) = torch.autograd.grad(ref, hd, g.double(), retain_graph=True)
    rh2, rw2 = torch.autograd.grad(ref, (hd, wd), g.double() * 0.5 + 1)
    for a, e in ((gh1, rh1), (gh2, rh2), (gw2, rw2)):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)


def test_auto_accumulates_into_existing_grad(monkeypatch):
    """weight.grad already set: autograd adds our buffer into it (two steps = twice one step's gradient)."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,9")
    gen = torch.Generator().manual_seed(33)
    hid, w, _, y = _inputs((30,), 16, 100, torch.float32, bias=False, gen=gen)
    g = torch.randn(30, generator=gen)
    wl = w.clone().requires_grad_(True)
    bk.linear_token_logprobs(hid, wl, y, backend="cpu").backward(g)
    once = wl.grad.clone()
    bk.linear_token_logprobs(hid, wl, y, backend="cpu").backward(g)
    torch.testing.assert_close(wl.grad, 2 * once)


def test_no_buffer_without_weight_grad(monkeypatch):
    """A frozen weight, no_grad, or recompute='full': the custom op path, nothing kept (the spy sees no
    tile written into a buffer)."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,9")
    calls = _count_recomputes(monkeypatch)
    hid, w, y = torch.randn(30, 16, requires_grad=True), torch.randn(100, 16), torch.randint(0, 100, (30,))
    bk.linear_token_logprobs(hid, w, y, backend="cpu").sum().backward()
    with torch.no_grad():
        bk.linear_token_logprobs(hid, w.requires_grad_(True), y, backend="cpu")
    bk.linear_token_logprobs(hid, w, y, backend="cpu", recompute="full").sum().backward()
    assert calls["kept"] == 0


@pytest.mark.parametrize("bad", ["partial", None, 1, True])
def test_bad_recompute(bad):
    with pytest.raises(ValueError, match=r"recompute must be 'auto' or 'full', got"):
        bk.linear_token_logprobs(
            torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 5, (3,)), recompute=bad
        )


# --------------------------------------------------------------------------------------------------------
# adversarial: recompute='auto'
# --------------------------------------------------------------------------------------------------------
def test_auto_backward_with_create_graph(monkeypatch):
    """backward(create_graph=True) (a gradient penalty elsewhere in the graph, or an optimizer that asks for
    it): 'full' gives the first-order gradients, so 'auto' must too, not fail on an ``out=`` matmul that
    autograd now records.  Differentiating those gradients again is unsupported in both schedules."""
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,7")
    gen = torch.Generator().manual_seed(41)
    hid, w, b, y = _inputs((10,), 6, 40, torch.float32, bias=True, gen=gen)
    g = torch.randn(10, generator=gen)
    want = _reference64(hid, w, b, y, g, torch.zeros(10))[2]
    for recompute in ("auto", "full"):
        leaves = [t.clone().requires_grad_(True) for t in (hid, w, b)]
        lp = bk.linear_token_logprobs(
            leaves[0], leaves[1], y, bias=leaves[2], backend="cpu", recompute=recompute
        )
        got = torch.autograd.grad((lp * g).sum(), leaves, create_graph=True)
        for a, e in zip(got, want):
            torch.testing.assert_close(a.detach().double(), e, rtol=2e-5, atol=2e-5)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(got[1].sum(), leaves)


@pytest.mark.parametrize("wrap", ["checkpoint", "save_on_cpu"])
def test_auto_keeps_nothing_under_saved_tensor_hooks(wrap, monkeypatch):
    """The kept buffer is held on ctx, past any saved-tensor hooks.  Under non-reentrant checkpoint the
    forward's buffer would live to the backward and the recomputed forward would allocate a second one (peak
    2·V·H where 'full' has V·H); under save_on_cpu it would stay on the device.  So: nothing kept there, and
    the gradients still equal the reference."""
    import torch.utils.checkpoint as cp

    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", "64,7")
    calls = _count_recomputes(monkeypatch)
    gen = torch.Generator().manual_seed(42)
    hid, w, b, y = _inputs((10,), 6, 40, torch.float32, bias=True, gen=gen)
    g = torch.randn(10, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (hid, w, b)]
    fn = lambda h_, w_, b_: bk.linear_token_logprobs(h_, w_, y, bias=b_, backend="cpu")
    if wrap == "checkpoint":
        lp = cp.checkpoint(fn, *leaves, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            lp = fn(*leaves)
    got = torch.autograd.grad((lp * g).sum(), leaves)
    assert calls["kept"] == 0
    for a, e in zip(got, _reference64(hid, w, b, y, g, torch.zeros(10))[2]):
        torch.testing.assert_close(a.double(), e, rtol=2e-5, atol=2e-5)


def test_plan_aligns_a_tile_boundary_to_the_kept_region():
    """The automatic plan shrinks (never grows) the tile so that the kept region starts on a tile boundary:
    at the CPU benchmark shape 10664 of the 10666 columns that may be kept, where 8192-column tiles kept
    7424; and over many shapes it never keeps less than the unaligned tile would."""
    plan = plans.cpu_plan(2048, 32000, 1024, torch.float32)
    kept = eng.make_kept(2048, torch.empty(32000, 1024, device="meta"), plan)
    assert plan.vocab <= 8192 and 32000 - kept.first * plan.vocab == 10664
    assert plans._align_to_kept(0, 100, 8, 1, 10, 1) == 10  # no rows: nothing to align (no division by zero)
    assert plans._align_to_kept(9, 100, 8, 4, 10, 1) == 10  # several row blocks keep nothing
    gen = torch.Generator().manual_seed(7)
    for _ in range(300):
        n, v, h = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (600, 5000, 300))
        budget = int(torch.randint(1, 4 * v, (1,), generator=gen))
        mult = int(torch.randint(1, 64, (1,), generator=gen))
        base = max(mult, min(budget, v) // mult * mult)
        aligned = plans._align_to_kept(n, v, h, n, base, mult)
        assert aligned <= base
        assert _kept_cols(n, v, h, aligned) >= _kept_cols(n, v, h, base), (n, v, h, base, aligned)


def _kept_cols(n, v, h, vocab):
    k = eng.make_kept(n, torch.empty(v, h, device="meta"), plans.Plan(n, min(vocab, v), torch.float32))
    return 0 if k is None else v - k.first * min(vocab, v)
