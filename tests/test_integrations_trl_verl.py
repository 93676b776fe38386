"""bond_kernels.integrations.trl / .verl against the peers' own functions (trl 1.16.0, verl 0.9.1).

The oracle is always the peer's code, imported from the installed package (``make setup`` installs the
pins of tests/requirements-peers.txt on CPython 3.11-3.12; without them these tests skip, and fail under
CI=true on those Pythons):

- the peer's function on the same logits upcast to fp64 (fp32 for verl's 32M-element shape, to keep the
  file's run time small): values (ours are fp32, or fp64 for fp64 logits) and gradients (in the logits'
  dtype) under a random upstream gradient, to the tolerance of the dtype they are stored in;
- the peer's function on the logits as given: ours must be no less exact than the peer itself, judged
  against that upcast truth (TRL's and verl's eager paths compute bf16 logits in bf16: up to 4e-2 off in a
  log-prob and 1e-1 in an entropy at (4, 32, 1024), where ours stay below 1e-6).

Shapes are the peers' own tests': TRL's tests/test_utils.py (4, 32, 1024) for selective_log_softmax, with
index widths K = 1, 8, and (768,), (32, 768), (8, 16, 768), (2, 4, 8, 768) with chunk sizes 1, 16 for
entropy_from_logits; verl's tests/utils/test_torch_functional.py (2, 512, 32000).  Plus what trainers pass:
``logits[:, :-1]`` (a strided view), row masks, temperatures 0.7 (TRL's tests) and 1.5 (verl's, applied by
the caller), and verl's -100 labels and in-place backward (its CUDA path, flash-attn's cross-entropy).
"""

import importlib
import importlib.util
import os
import sys

import pytest
import torch
from conftest import FP32_OUT_ATOL, TOL, assert_close

import bond_kernels.integrations.trl as bk_trl
import bond_kernels.integrations.verl as bk_verl

# The Pythons tests/requirements-peers.txt installs the peers for (its environment markers).
PINNED_PYTHONS = ((3, 11), (3, 13))
ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
DTYPES = [torch.float32, torch.bfloat16]


def _peer(module):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        why = f"{module} is not importable ({e}); `make setup` installs tests/requirements-peers.txt"
        if os.environ.get("CI") and PINNED_PYTHONS[0] <= sys.version_info[:2] < PINNED_PYTHONS[1]:
            pytest.fail(why)  # CI installs the pins for these Pythons: missing is a set-up failure
        pytest.skip(why)


@pytest.fixture(scope="module")
def trl_utils():
    return _peer("trl.trainer.utils")


@pytest.fixture(scope="module")
def verl_F():
    return _peer("verl.utils.torch_functional")


def _run(fn, x, upstream, *args, **kwargs):
    """(outputs, gradients wrt x) of ``fn(x, *args)``; ``upstream`` one random gradient per output.
    Runs on a copy with ``x``'s strides (``clone`` would make a strided view contiguous), which verl's
    in-place backward may overwrite."""
    x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype).copy_(x).requires_grad_(True)
    out = fn(x, *args, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)
    live = [(o, g.to(o.dtype)) for o, g in zip(outs, upstream) if o.requires_grad]
    torch.autograd.backward([o for o, _ in live], [g for _, g in live])
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return [o.detach() for o in outs], grad


def _chunks(*tensors, rows=64):
    """Matching blocks of ``rows`` rows of (..., V) tensors: a check of verl's 32M-element gradients then
    allocates 16 MB at a time instead of several 256 MB fp64 copies."""
    flat = [t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1) for t in tensors]
    for i in range(0, flat[0].shape[0], rows):
        yield [f[i : i + rows] for f in flat]


def _err(a, b):
    return max(
        ((x.double() - y.double()).abs().max().item() for x, y in _chunks(a, b) if x.numel()), default=0.0
    )


def _assert_grad_close(actual, expected, dtype):
    scale = max(max((e.abs().max().item() for (e,) in _chunks(expected) if e.numel()), default=0.0), 1e-3)
    tol = TOL[dtype]
    for a, e in _chunks(actual, expected):
        e64 = e.double()
        if not bool(((a.double() - e64).abs() <= tol["atol"] * scale + tol["rtol"] * e64.abs()).all()):
            assert_close(a, e, dtype=dtype, scale=scale)  # the same test, with torch.testing's report


def _compare(peer_fn, ours_fn, x, upstream, *args, truth_dtype=torch.float64, **kwargs):
    """ours vs the peer on ``truth_dtype`` logits (tight) and vs the peer's own error on ``x`` as given."""
    truth_dtype = torch.float64 if x.dtype == torch.float64 else truth_dtype
    ours, ours_grad = _run(ours_fn, x, upstream, *args, **kwargs)
    truth, truth_grad = _run(peer_fn, x.to(truth_dtype), upstream, *args, **kwargs)
    want_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    for o, t in zip(ours, truth):
        assert o.dtype == want_dtype and o.shape == t.shape
        # fp32 outputs (fp64 for fp64 logits) against the truth: a few fp32 roundings of |log p| and H.
        assert_close(o, t, dtype=want_dtype, atol=FP32_OUT_ATOL if want_dtype == torch.float32 else 1e-12)
    assert ours_grad.dtype == x.dtype
    _assert_grad_close(ours_grad, truth_grad, x.dtype)
    if truth_dtype != x.dtype:
        peer, peer_grad = _run(peer_fn, x, upstream, *args, **kwargs)
        floor = 4 * FP32_OUT_ATOL
        for o, p, t in zip(ours, peer, truth):
            assert _err(o, t) <= _err(p, t) + floor, "less exact than the peer's own function"
        g_floor = 8 * torch.finfo(x.dtype).eps * truth_grad.abs().max().item()
        assert _err(ours_grad, truth_grad) <= _err(peer_grad, truth_grad) + g_floor
    return ours, truth


# --------------------------------------------------------------------------------------------------------
# TRL: selective_log_softmax, entropy_from_logits, selective_log_softmax_and_entropy
# --------------------------------------------------------------------------------------------------------
B, T, VOCAB = 4, 32, 1024  # TRL's TestSelectiveLogSoftmax


def _logits(shape, dtype, layout="contiguous"):
    if layout == "shifted":  # what trainers pass: logits[:, :-1], rows strided by (T + 1)·V
        return torch.randn(shape[0], shape[1] + 1, *shape[2:], dtype=dtype)[:, :-1]
    return torch.randn(*shape, dtype=dtype)


# (temperature, layout): TRL's tests use 1.0 and 0.7; trainers pass logits[:, :-1] (a strided view).
@pytest.mark.parametrize("temperature, layout", [(1.0, "contiguous"), (0.7, "shifted")])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_trl_selective_log_softmax(trl_utils, dtype, temperature, layout):
    x = _logits((B, T, VOCAB), dtype, layout)
    assert x.is_contiguous() == (layout == "contiguous")
    index = torch.randint(0, VOCAB, (B, T))
    g = [torch.randn(B, T)]
    _compare(trl_utils.selective_log_softmax, bk_trl.selective_log_softmax, x, g, index, temperature)


@pytest.mark.parametrize("k", [1, 8])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_trl_selective_log_softmax_multi_index(trl_utils, dtype, k):
    x = _logits((B, T, VOCAB), dtype)
    index = torch.randint(0, VOCAB, (B, T, k))
    index[0, 0] = 7  # a label repeated within a row
    g = [torch.randn(B, T, k)]
    for temperature in (1.0, 0.7):
        ours, _ = _compare(
            trl_utils.selective_log_softmax, bk_trl.selective_log_softmax, x, g, index, temperature
        )
        assert ours[0].shape == (B, T, k)


@pytest.mark.parametrize("k", [None, 8], ids=["one", "k8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trl_row_mask(trl_utils, dtype, k):
    """row_mask 0 gives log-prob 0 and zero gradient (an int mask, as TRL's trainers pass)."""
    x = _logits((B, T, VOCAB), dtype)
    shape = (B, T) if k is None else (B, T, k)
    index = torch.randint(0, VOCAB, shape)
    mask = torch.rand(shape) > 0.3
    mask[1] = False  # a whole sequence masked
    g = [torch.randn(shape)]
    ours, _ = _compare(
        trl_utils.selective_log_softmax, bk_trl.selective_log_softmax, x, g, index, 0.7, mask.to(torch.int64)
    )
    assert torch.all(ours[0][~mask] == 0)


# TRL's shapes, each with one of its chunk sizes 1 and 16 (the chunk size changes only TRL's loop).
@pytest.mark.parametrize(
    "shape, chunk_size", [((768,), 1), ((32, 768), 16), ((8, 16, 768), 1), ((2, 4, 8, 768), 16)], ids=str
)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_trl_entropy_from_logits(trl_utils, dtype, shape, chunk_size):
    x = _logits(shape, dtype)
    g = [torch.randn(shape[:-1])]
    ours, _ = _compare(trl_utils.entropy_from_logits, bk_trl.entropy_from_logits, x, g, chunk_size=chunk_size)
    assert ours[0].shape == shape[:-1]


@pytest.mark.parametrize(
    "entropy_requires_grad, masked", [(True, False), (False, True)], ids=["grad-nomask", "nograd-mask"]
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trl_selective_log_softmax_and_entropy(trl_utils, dtype, temperature, entropy_requires_grad, masked):
    x = _logits((B, T, VOCAB), dtype, "shifted")
    index = torch.randint(0, VOCAB, (B, T))
    mask = (torch.rand(B, T) > 0.3) if masked else None
    g = [torch.randn(B, T), torch.randn(B, T)]
    ours, _ = _compare(
        trl_utils.selective_log_softmax_and_entropy,
        bk_trl.selective_log_softmax_and_entropy,
        x,
        g,
        index,
        entropy_requires_grad,
        temperature,
        mask,
    )
    _, ent = bk_trl.selective_log_softmax_and_entropy(
        x.detach().requires_grad_(), index, entropy_requires_grad, temperature, mask
    )
    assert ent.requires_grad == entropy_requires_grad
    if masked:
        assert torch.all(ours[0][~mask] == 0) and torch.all(ours[1][~mask] == 0)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_trl_any_leading_dims(trl_utils, backend):
    """2-D and 4-D logits, on both CPU backends (TRL's selective_log_softmax cannot take 1-D logits: its
    fp32 path loops over the first dimension; its entropy can, and TRL's (768,) case above covers it)."""
    for shape in [(7, 257), (2, 3, 5, 257)]:
        x = _logits(shape, torch.float32)
        index = torch.randint(0, 257, shape[:-1])
        ours, _ = _run(
            bk_trl.selective_log_softmax, x, [torch.randn(shape[:-1])], index, 0.9, backend=backend
        )
        peer, _ = _run(trl_utils.selective_log_softmax, x.double(), [torch.randn(shape[:-1])], index, 0.9)
        assert_close(ours[0], peer[0], dtype=torch.float32, atol=FP32_OUT_ATOL)
        ent, _ = _run(bk_trl.entropy_from_logits, x, [torch.randn(shape[:-1])], backend=backend)
        assert_close(
            ent[0], trl_utils.entropy_from_logits(x.double()), dtype=torch.float32, atol=FP32_OUT_ATOL
        )


# --------------------------------------------------------------------------------------------------------
# verl: logprobs_from_logits, entropy_from_logits, entropy_from_logits_with_chunking
# --------------------------------------------------------------------------------------------------------
VERL_SHAPE = (2, 512, 32000)  # verl's test_logprobs_from_logits_v2


@pytest.fixture(scope="module")
def verl_logits():
    gen = torch.Generator().manual_seed(13)
    base = torch.randn(VERL_SHAPE, generator=gen)
    labels = torch.randint(0, VERL_SHAPE[-1], VERL_SHAPE[:-1], generator=gen)
    return base, labels


def test_verl_shape(verl_F, verl_logits):
    """verl's own test shape in bf16, trainers' dtype (~3 s of CPU: each pass of the peer costs ~1 s here);
    the other dtypes run at TRL's shape below."""
    base, labels = verl_logits
    # fp32 is the truth at this shape (the peer on fp32 logits): fp64 would double the cost.
    _compare(
        verl_F.logprobs_from_logits,
        bk_verl.logprobs_from_logits,
        base.to(torch.bfloat16),
        [torch.randn(VERL_SHAPE[:-1])],
        labels,
        truth_dtype=torch.float32,
        inplace_backward=False,
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_verl_logprobs_small(verl_F, dtype):
    """All four dtypes of verl's test, at TRL's shape, strided, with verl's default inplace_backward=True;
    the logits divided by verl's test temperature 1.5 first."""
    x = _logits((B, T, VOCAB), dtype, "shifted").div_(1.5)  # in place, as verl does: still strided
    labels = torch.randint(0, VOCAB, (B, T))
    _compare(verl_F.logprobs_from_logits, bk_verl.logprobs_from_logits, x, [torch.randn(B, T)], labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verl_inplace_backward(verl_F, dtype):
    """inplace_backward=True (verl's default) writes the gradient over the logits, as flash-attn's kernel
    does on verl's CUDA path; the gradient is the same as without it."""
    x = _logits((B * T, VOCAB), dtype)  # verl's packed (total_nnz, V) rows
    labels = torch.randint(0, VOCAB, (B * T,))
    g = torch.randn(B * T)
    leaf = x.clone().requires_grad_(True)
    lp = bk_verl.logprobs_from_logits(leaf, labels)  # default inplace_backward=True
    lp.backward(g)
    _, want = _run(verl_F.logprobs_from_logits, x.double(), [g], labels)
    assert_close(leaf.grad, want, dtype=dtype)
    assert_close(leaf.detach(), want, dtype=dtype)  # the logits buffer now holds the gradient


def test_verl_ignore_index(verl_F):
    """-100 labels give 0 and zero gradient (flash-attn's ignore_index on verl's CUDA path; verl's CPU
    fallback raises on them), the other positions match verl's function."""
    x = _logits((B * T, VOCAB), torch.bfloat16)
    labels = torch.randint(0, VOCAB, (B * T,))
    ignored = torch.rand(B * T) < 0.25
    labels[ignored] = -100
    g = torch.randn(B * T)
    ours, grad = _run(bk_verl.logprobs_from_logits, x, [g], labels, inplace_backward=False)
    peer, peer_grad = _run(verl_F.logprobs_from_logits, x.double(), [g * ~ignored], labels.clamp(min=0))
    assert torch.all(ours[0][ignored] == 0) and torch.all(grad[ignored] == 0)
    assert_close(ours[0], peer[0] * ~ignored, dtype=torch.float32, atol=FP32_OUT_ATOL)
    assert_close(grad, peer_grad, dtype=torch.bfloat16)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_verl_entropy_small(verl_F, dtype):
    x = _logits((B, T, VOCAB), dtype, "shifted")
    _compare(verl_F.entropy_from_logits, bk_verl.entropy_from_logits, x, [torch.randn(B, T)])


@pytest.mark.parametrize("chunk_size", [2048, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_verl_entropy_from_logits_with_chunking(verl_F, dtype, chunk_size):
    x = _logits((B * T * 4, VOCAB), dtype)  # (N, V): 512 rows, 6 chunks of 100
    g = [torch.randn(B * T * 4)]
    _compare(
        verl_F.entropy_from_logits_with_chunking,
        bk_verl.entropy_from_logits_with_chunking,
        x,
        g,
        chunk_size=chunk_size,
    )
    # verl's chunked variant computes in fp32 and returns fp32, as ours does.
    assert verl_F.entropy_from_logits_with_chunking(x, chunk_size).dtype == torch.float32


# --------------------------------------------------------------------------------------------------------
# patch() / unpatch()
# --------------------------------------------------------------------------------------------------------
def _first_unimported(names):
    return next((n for n in names if n not in sys.modules), None)


TRL_NAMES = ["selective_log_softmax", "entropy_from_logits", "selective_log_softmax_and_entropy"]
# TRL modules that bind selective_log_softmax with `from ...trainer.utils import` (trl 1.16.0).
TRL_CONSUMERS = [
    "trl.experimental.orpo.orpo_trainer",
    "trl.experimental.cpo.cpo_trainer",
    "trl.experimental.sdpo.loss_utils",
    "trl.experimental.sdft.loss_utils",
]


def test_trl_patch_unpatch(trl_utils):
    originals = {n: getattr(trl_utils, n) for n in TRL_NAMES}
    before = importlib.import_module(TRL_CONSUMERS[0])  # imported before patch()
    assert before.selective_log_softmax is originals["selective_log_softmax"]
    later_name = _first_unimported(TRL_CONSUMERS[1:])
    try:
        assert sorted(bk_trl.patch()) == sorted(
            TRL_NAMES + ["add_fused_lm_head", "_chunked_divergence_loss"]
        )  # + the trainers' fused head and the distillation loss
        bk_trl.patch()  # idempotent
        for n in TRL_NAMES:
            assert getattr(trl_utils, n) is getattr(bk_trl, n)
        assert before.selective_log_softmax is bk_trl.selective_log_softmax
        if later_name is not None:  # imported after patch(): reads ours from trl.trainer.utils
            later = importlib.import_module(later_name)
            assert later.selective_log_softmax is bk_trl.selective_log_softmax
        # TRL code that calls the patched names now runs ours.
        x = torch.randn(2, 3, 50, dtype=torch.bfloat16)
        out = before.selective_log_softmax(x, torch.randint(0, 50, (2, 3)))
        assert out.dtype == torch.float32
    finally:
        bk_trl.unpatch()
    bk_trl.unpatch()  # idempotent
    for n in TRL_NAMES:
        assert getattr(trl_utils, n) is originals[n]
    assert before.selective_log_softmax is originals["selective_log_softmax"]
    if later_name is not None:
        assert sys.modules[later_name].selective_log_softmax is originals["selective_log_softmax"]


VERL_NAMES = ["logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking"]


def test_verl_patch_unpatch(verl_F):
    originals = {n: getattr(verl_F, n) for n in VERL_NAMES}
    consumer = "verl.workers.rollout.naive.naive_rollout"  # `from verl.utils.torch_functional import ...`
    imported_before = consumer in sys.modules
    try:
        assert sorted(bk_verl.patch()) == sorted(VERL_NAMES)
        mod = importlib.import_module(consumer)  # before or after patch(): ours either way
        bk_verl.patch()
        for n in VERL_NAMES:
            assert getattr(verl_F, n) is getattr(bk_verl, n)
        assert mod.logprobs_from_logits is bk_verl.logprobs_from_logits
    finally:
        bk_verl.unpatch()
    for n in VERL_NAMES:
        assert getattr(verl_F, n) is originals[n]
    assert mod.logprobs_from_logits is originals["logprobs_from_logits"]
    if not imported_before:  # now imported: a second round patches it in place
        try:
            bk_verl.patch()
            assert mod.logprobs_from_logits is bk_verl.logprobs_from_logits
        finally:
            bk_verl.unpatch()
        assert mod.logprobs_from_logits is originals["logprobs_from_logits"]


@pytest.mark.parametrize("peer", ["trl", "verl"])
def test_import_without_peer_and_patch_error(monkeypatch, peer):
    """A fresh copy of the integration module runs with the peer blocked (as if not installed): its
    functions work, and patch() raises an ImportError that names the pip install."""
    for name in [n for n in sys.modules if n == peer or n.startswith(peer + ".")] + [peer]:
        monkeypatch.setitem(sys.modules, name, None)
    spec = importlib.util.find_spec(f"bond_kernels.integrations.{peer}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x = torch.randn(3, 11)
    fn = mod.selective_log_softmax if peer == "trl" else mod.logprobs_from_logits
    assert fn(x, torch.tensor([1, 2, 3])).shape == (3,)
    with pytest.raises(ImportError, match=f"pip install {peer}"):
        mod.patch()


# --------------------------------------------------------------------------------------------------------
# bad input: errors name the argument
# --------------------------------------------------------------------------------------------------------
def _bad_cases():
    x = torch.randn(2, 3, 11)
    i = torch.randint(0, 11, (2, 3))
    sls, ent, both = (
        bk_trl.selective_log_softmax,
        bk_trl.entropy_from_logits,
        bk_trl.selective_log_softmax_and_entropy,
    )
    lp, vent, vchunk = (
        bk_verl.logprobs_from_logits,
        bk_verl.entropy_from_logits,
        bk_verl.entropy_from_logits_with_chunking,
    )
    return [
        ("logits-list", sls, ([[1.0]], i), {}, TypeError, "logits"),
        ("logits-int", sls, (x.long(), i), {}, TypeError, "logits"),
        ("logits-empty-vocab", sls, (x[..., :0], i), {}, ValueError, "logits"),
        ("index-float", sls, (x, i.float()), {}, TypeError, "index"),
        ("index-shape", sls, (x, i[:, :2]), {}, ValueError, "index"),
        ("index-rank", sls, (x, i[..., None, None]), {}, ValueError, "index"),
        ("index-minus100", sls, (x, i.masked_fill(i == i[0, 0], -100)), {}, ValueError, "index"),
        ("index-too-big", sls, (x, i + 11), {}, ValueError, "index"),
        ("index-k-too-big", sls, (x, torch.full((2, 3, 4), 11)), {}, ValueError, "index"),
        ("index-device", sls, (x, i.to("meta")), {}, ValueError, "index"),
        ("temperature-0", sls, (x, i, 0.0), {}, ValueError, "temperature"),
        ("temperature-neg", sls, (x, i, -1.0), {}, ValueError, "temperature"),
        ("temperature-str", sls, (x, i, "1"), {}, ValueError, "temperature"),
        ("row_mask-shape", sls, (x, i, 1.0, torch.ones(2, 2, dtype=torch.bool)), {}, ValueError, "row_mask"),
        ("row_mask-float", sls, (x, i, 1.0, torch.ones(2, 3)), {}, TypeError, "row_mask"),
        ("row_mask-list", sls, (x, i, 1.0, [[1]]), {}, TypeError, "row_mask"),
        ("chunk_size-0", ent, (x, 0), {}, ValueError, "chunk_size"),
        ("chunk_size-float", ent, (x, 1.5), {}, ValueError, "chunk_size"),
        ("ent-logits-int", ent, (x.long(),), {}, TypeError, "logits"),
        ("both-index-k", both, (x, i[..., None]), {}, ValueError, "index"),
        ("both-requires-grad", both, (x, i, "yes"), {}, TypeError, "entropy_requires_grad"),
        ("both-temperature", both, (x, i, True, 0), {}, ValueError, "temperature"),
        (
            "both-row_mask",
            both,
            (x, i, True, 1.0, torch.ones(3, dtype=torch.bool)),
            {},
            ValueError,
            "row_mask",
        ),
        ("verl-labels-float", lp, (x, i.float()), {}, TypeError, "labels"),
        ("verl-labels-shape", lp, (x, i[0]), {}, ValueError, "labels"),
        ("verl-labels-range", lp, (x, i + 11), {}, ValueError, "labels"),
        ("verl-labels-neg", lp, (x, i - 11), {}, ValueError, "labels"),
        ("verl-inplace", lp, (x, i, "True"), {}, TypeError, "inplace_backward"),
        ("verl-logits-int", lp, (x.long(), i), {}, TypeError, "logits"),
        ("verl-ent-logits", vent, (None,), {}, TypeError, "logits"),
        ("verl-chunk", vchunk, (x, 0), {}, ValueError, "chunk_size"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, fn, args, kwargs, exc, name = case
    with pytest.raises(exc, match=name):
        fn(*args, **kwargs)
