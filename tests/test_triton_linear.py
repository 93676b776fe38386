"""The GPU path of linear_token_logprobs (backend="triton") on CPU tensors under TRITON_INTERPRET=1.

Run: ``TRITON_INTERPRET=1 pytest tests/test_triton_linear.py -m interpret``.  This drives the GPU launchers'
Python logic (the tile plan, per-tile Triton token kernels, the Triton column-0 fix-up kernel, the gradient
accumulation) with fp32 tensors: the interpreter's ``tl.dot`` on bf16 is wrong, and the tile matmuls here
are torch's anyway.  Everything is compared with the float64 reference on the same inputs.
"""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import bond_kernels as bk
from bond_kernels.reference.launchers import token_logprobs_fixup_column0
from bond_kernels.reference.linear_token_logprobs import (
    linear_token_logprobs as linear_token_logprobs_reference,
)

pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

# (N, H, V, tile override): automatic (one tile), row blocks with a partial last vocabulary tile,
# one-column tiles (every row's label lies in another tile: the fix-up runs on every row), and one row block
# in 24-column tiles, whose last three (the last one partial) the forward keeps for the backward.
CASES = [
    (13, 16, 101, ""),
    (13, 16, 101, "4,24"),
    (6, 8, 19, "64,1"),
    (13, 16, 101, "64,24"),
]
TOL = dict(rtol=3e-5, atol=3e-5)


def _data(n, h, v, *, bias, gen, dtype=torch.float32):
    hid = torch.randn(n, h, generator=gen, dtype=dtype)
    w = torch.randn(v, h, generator=gen, dtype=dtype) * (3 / h**0.5)
    b = torch.randn(v, generator=gen, dtype=dtype) if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    y[0], y[1], y[2] = -100, 0, v - 1
    return hid, w, b, y


def _grads(fn, hid, w, b, y, g, ge, **kw):
    leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if b is not None:
        leaves.append(b.clone().requires_grad_(True))
    lp, ent = fn(
        leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, return_entropy=True, **kw
    )
    return (lp, ent, *torch.autograd.grad((lp * g + ent * ge).sum(), leaves))


@pytest.mark.parametrize("n,h,v,tile", CASES)
@pytest.mark.parametrize(
    "temperature,softcap,bias,ignore_index",
    [(1.0, None, False, -100), (0.7, 3.0, True, -100), (1.0, None, True, 0)],
)
def test_triton_path_matches_reference(n, h, v, tile, temperature, softcap, bias, ignore_index, monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    gen = torch.Generator().manual_seed(n * 1000 + v)
    hid, w, b, y = _data(n, h, v, bias=bias, gen=gen)
    if ignore_index != -100:
        y[0] = y[3] = ignore_index
    g, ge = torch.randn(n, generator=gen), torch.randn(n, generator=gen)
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    got = _grads(bk.linear_token_logprobs, hid, w, b, y, g, ge, backend="triton", **kw)
    d64 = lambda t: None if t is None else t.double()
    want = _grads(linear_token_logprobs_reference, d64(hid), d64(w), d64(b), y, g.double(), ge.double(), **kw)
    names = ["logp", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, a, e in zip(names, got, want):
        torch.testing.assert_close(a.double(), e, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert (got[0][y == ignore_index] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,with_entropy", [(0.0, False), (2.5, True)])
def test_fixup_kernel_matches_torch(dtype, softcap, with_entropy):
    """The Triton column-0 fix-up against the torch version, on a strided column of a (n, v) tile."""
    from bond_kernels.ops.triton.linear_token_logprobs import fixup_column0_triton

    gen = torch.Generator().manual_seed(17)
    n, v = 1500, 5  # more rows than one program's block (1024): two programs, a masked tail
    d_a = torch.randn(n, v, generator=gen).to(dtype)
    d_b = d_a.clone()
    x0 = torch.randn(n, generator=gen) * 4
    out = torch.rand(n, generator=gen) < 0.6
    lse = torch.logsumexp(torch.randn(n, 50, generator=gen) * 3, -1)
    g = torch.randn(n, generator=gen)
    ent = torch.rand(n, generator=gen) * 3 if with_entropy else torch.empty(0)
    ge = torch.randn(n, generator=gen) if with_entropy else torch.empty(0)
    token_logprobs_fixup_column0(d_a, x0, out, lse, ent, g, ge, 0.8, softcap)
    fixup_column0_triton(d_b, x0, out, lse, ent, g, ge, 0.8, softcap)
    assert torch.equal(d_b[:, 1:], d_a[:, 1:])  # only column 0 is touched
    assert torch.equal(d_b[~out, 0], d_a[~out, 0])  # and only where asked
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(d_b[:, 0].float(), d_a[:, 0].float(), **tol)
    assert not torch.equal(d_a[out, 0], torch.zeros_like(d_a[out, 0]))


def test_gpu_plan_at_the_benchmark_shape():
    """N = 8192, H = 4096, V = 128256 bf16: one row block, 4096-column tiles (a 64 MiB bf16 tile)."""
    from bond_kernels.ops.linear_plan import GPU_TILE_BYTES, gpu_plan

    plan = gpu_plan(8192, 128256, 4096, torch.bfloat16)
    assert (plan.rows, plan.vocab, plan.compute_dtype) == (8192, 4096, torch.bfloat16)
    assert plan.rows * plan.vocab * 2 <= GPU_TILE_BYTES
    many = gpu_plan(20000, 128256, 4096, torch.bfloat16)
    assert many.rows == 8192 and many.vocab % 256 == 0


def _vp_worker(rank, world, port, tile):
    from test_vocab_parallel import OPTIONS, _check_linear, _check_token, teardown

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["BOND_KERNELS_LINEAR_TILE"] = tile
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    # temperature + softcap (+ bias for the linear head): the option set that exercises every term
    _check_token(rank, world, torch.float32, "triton", options=OPTIONS[1:])
    _check_linear(rank, world, torch.float32, "triton", options=OPTIONS[1:])
    teardown()


def test_vocab_parallel_triton_two_ranks():
    """The vocab-parallel paths with the Triton per-shard kernels and fix-up (2 gloo processes, loopback)."""
    from test_vocab_parallel import run_world

    run_world(2, worker=_vp_worker, extra=("3,4",))


@pytest.mark.parametrize("n,h,v,tile", CASES[1:3])
def test_triton_path_extras_match_reference(n, h, v, tile, monkeypatch):
    """The fused head's extras (log Σ p², mean logit, is_top1) on the triton backend: folded from the same
    tiles as the log-probs (ops/linear_extras.py), against the reference."""
    from bond_kernels.reference import EXTRAS, linear_token_extras

    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    gen = torch.Generator().manual_seed(n * 7 + v)
    hid, w, b, y = _data(n, h, v, bias=True, gen=gen)
    x = hid @ w.T + b
    y[3:6] = x[3:6].argmax(-1)
    for temperature, softcap in ((1.0, None), (0.7, 3.0)):
        lp, more = bk.linear_token_logprobs(
            hid, w, y, bias=b, temperature=temperature, softcap=softcap, extras=EXTRAS, backend="triton"
        )
        want = linear_token_extras(hid, w, y, EXTRAS, bias=b, temperature=temperature, softcap=softcap)
        assert torch.equal(more["is_top1"], want["is_top1"]) and bool(want["is_top1"].any())
        for name in ("log_sum_sq_probs", "mean_logits"):
            torch.testing.assert_close(more[name], want[name], **TOL)
