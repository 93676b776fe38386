"""Vocabulary-parallel token/sequence/linear log-probs over torch.distributed (gloo, CPU, loopback only).

Each world size is one spawn of processes that run every check (spawning costs seconds; the checks cost
milliseconds).  Every rank builds the same full tensors from one seed, keeps its (equal) slice of the
vocabulary, and compares values and its shard's gradients (random upstream gradients) with the
single-process reference on the full vocabulary.  The processes stop themselves: a 60 s gloo timeout inside,
and the parent terminates its own children after 120 s.
"""

import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bond_kernels as bk
from bond_kernels.reference.linear_token_logprobs import (
    linear_token_logprobs as linear_token_logprobs_reference,
)

# Equal shards of odd sizes (38 = 2 x 19, 36 = 4 x 9): no offset is a multiple of a power of two.
SHARDS = {2: (19, 19), 4: (9, 9, 9, 9)}
# (temperature, softcap): plain, both transforms.
OPTIONS = [(1.0, None), (0.7, 3.0)]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slice(x, rank, sizes):
    off = sum(sizes[:rank])
    return x[..., off : off + sizes[rank]]


def _close(got, want, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _labels(shape, vocab, sizes, gen):
    y = torch.randint(0, vocab, shape, generator=gen)
    flat = y.view(-1)
    flat[0] = -100  # ignored
    # Labels on every shard boundary (first and last id of each shard).
    edges = []
    off = 0
    for s in sizes:
        edges += [off, off + s - 1]
        off += s
    flat[1 : 1 + len(edges)] = torch.tensor(edges)
    return y


def _check_token(rank, world, dtype, backend, options=OPTIONS):
    sizes = SHARDS[world]
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(1234)
    for temperature, softcap in options:
        x = (torch.randn(3, 5, vocab, generator=gen) * 3).to(dtype)
        y = _labels((3, 5), vocab, sizes, gen)
        g, ge = torch.randn(3, 5, generator=gen, dtype=dtype), torch.randn(3, 5, generator=gen, dtype=dtype)
        full = x.clone().requires_grad_(True)
        want_lp, want_ent = bk.reference.token_logprobs(
            full, y, temperature=temperature, softcap=softcap, return_entropy=True
        )
        (want_grad,) = torch.autograd.grad((want_lp * g + want_ent * ge).sum(), full, retain_graph=True)
        shard = _slice(x, rank, sizes).clone().requires_grad_(True)
        lp, ent = bk.token_logprobs(
            shard,
            y,
            temperature=temperature,
            softcap=softcap,
            return_entropy=True,
            backend=backend,
            process_group=dist.group.WORLD,
        )
        (grad,) = torch.autograd.grad((lp * g + ent * ge).sum(), shard)
        what = f"token {dtype} {backend} T={temperature} c={softcap}"
        _close(lp, want_lp, dtype, what + " logp")
        _close(ent, want_ent, dtype, what + " entropy")
        _close(grad, _slice(want_grad, rank, sizes), dtype, what + " grad")

        # log-probs only (no entropy), the in-place backward, and sequence sums (padded and packed)
        shard2 = _slice(x, rank, sizes).clone().requires_grad_(True)
        buf = shard2 * 1  # a non-leaf buffer the in-place backward may overwrite
        lp2 = bk.token_logprobs(
            buf,
            y,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
            inplace=True,
            process_group=dist.group.WORLD,
        )
        (grad2,) = torch.autograd.grad((lp2 * g).sum(), shard2)
        (want2,) = torch.autograd.grad((want_lp * g).sum(), full, retain_graph=True)
        _close(lp2, want_lp, dtype, what + " logp (inplace)")
        _close(grad2, _slice(want2, rank, sizes), dtype, what + " grad (inplace)")

        gs = torch.randn(3, generator=gen, dtype=dtype)
        shard3 = _slice(x, rank, sizes).clone().requires_grad_(True)
        seq = bk.sequence_logprobs(
            shard3,
            y,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
            process_group=dist.group.WORLD,
        )
        (grad3,) = torch.autograd.grad((seq * gs).sum(), shard3)
        want_seq = want_lp.sum(-1)
        (want3,) = torch.autograd.grad((want_seq * gs).sum(), full)
        _close(seq, want_seq, dtype, what + " sequence (padded)")
        _close(grad3, _slice(want3, rank, sizes), dtype, what + " sequence grad")

        cu = torch.tensor([0, 4, 4, 15])  # an empty sequence in the middle
        packed = _slice(x, rank, sizes).reshape(15, -1).clone().requires_grad_(True)
        seq_p = bk.sequence_logprobs(
            packed,
            y.reshape(15),
            cu_seqlens=cu,
            temperature=temperature,
            softcap=softcap,
            backend=backend,
            process_group=dist.group.WORLD,
        )
        flat = want_lp.reshape(15)
        want_p = torch.stack([flat[0:4].sum(), flat[4:4].sum(), flat[4:15].sum()])
        _close(seq_p, want_p, dtype, what + " sequence (packed)")


def _check_masked_vocab(rank, world):
    """-inf logits (a masked vocabulary), including a row whose whole shard on one rank is -inf."""
    sizes = SHARDS[world]
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(6, vocab, generator=gen, dtype=torch.float64)
    x[:, 3] = float("-inf")
    x[2, : sizes[0]] = float("-inf")  # row 2: rank 0's whole shard masked
    y = torch.randint(sizes[0], vocab, (6,), generator=gen)
    g, ge = (
        torch.randn(6, generator=gen, dtype=torch.float64),
        torch.randn(6, generator=gen, dtype=torch.float64),
    )
    full = x.clone().requires_grad_(True)
    want_lp, want_ent = bk.reference.token_logprobs(full, y, return_entropy=True)
    (want_grad,) = torch.autograd.grad((want_lp * g + want_ent * ge).sum(), full)
    shard = _slice(x, rank, sizes).clone().requires_grad_(True)
    lp, ent = bk.token_logprobs(
        shard, y, return_entropy=True, backend="torch", process_group=dist.group.WORLD
    )
    (grad,) = torch.autograd.grad((lp * g + ent * ge).sum(), shard)
    _close(lp, want_lp, torch.float64, "masked logp")
    _close(ent, want_ent, torch.float64, "masked entropy")
    _close(grad, _slice(want_grad, rank, sizes), torch.float64, "masked grad")

    # The padding the unequal-shard error advises: a vocabulary one short of a multiple of the world size,
    # padded with a -inf column on the last rank, gives the unpadded vocabulary's log-probs and gradients.
    x1 = torch.randn(6, vocab - 1, generator=gen, dtype=torch.float64)
    y1 = torch.randint(0, vocab - 1, (6,), generator=gen)
    full1 = x1.clone().requires_grad_(True)
    want1, went1 = bk.reference.token_logprobs(full1, y1, return_entropy=True)
    (wgrad1,) = torch.autograd.grad((want1 * g + went1 * ge).sum(), full1)
    padded = torch.cat([x1, torch.full((6, 1), float("-inf"), dtype=torch.float64)], dim=1)
    shard1 = _slice(padded, rank, sizes).clone().requires_grad_(True)
    lp1, ent1 = bk.token_logprobs(shard1, y1, return_entropy=True, process_group=dist.group.WORLD)
    (grad1,) = torch.autograd.grad((lp1 * g + ent1 * ge).sum(), shard1)
    _close(lp1, want1, torch.float64, "padded logp")
    _close(ent1, went1, torch.float64, "padded entropy")
    wpad = torch.cat([wgrad1, torch.zeros(6, 1, dtype=torch.float64)], dim=1)
    _close(grad1, _slice(wpad, rank, sizes), torch.float64, "padded grad")


def _check_linear(rank, world, dtype, backend, options=OPTIONS):
    sizes = SHARDS[world]
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(4321)
    for (temperature, softcap), use_bias in zip(options, (False, True)[-len(options) :]):
        n, h = 13, 8
        hid = torch.randn(n, h, generator=gen).to(dtype)
        w = torch.randn(vocab, h, generator=gen).to(dtype)
        b = torch.randn(vocab, generator=gen).to(dtype) if use_bias else None
        y = _labels((n,), vocab, sizes, gen)
        g, ge = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
        leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        if use_bias:
            leaves.append(b.clone().requires_grad_(True))
        want_lp, want_ent = linear_token_logprobs_reference(
            leaves[0],
            leaves[1],
            y,
            bias=leaves[2] if use_bias else None,
            temperature=temperature,
            softcap=softcap,
            return_entropy=True,
        )
        want = torch.autograd.grad((want_lp * g + want_ent * ge).sum(), leaves)
        mine = [hid.clone().requires_grad_(True), _slice(w.t(), rank, sizes).t().clone().requires_grad_(True)]
        if use_bias:
            mine.append(_slice(b, rank, sizes).clone().requires_grad_(True))
        lp, ent = bk.linear_token_logprobs(
            mine[0],
            mine[1],
            y,
            bias=mine[2] if use_bias else None,
            temperature=temperature,
            softcap=softcap,
            return_entropy=True,
            backend=backend,
            process_group=dist.group.WORLD,
        )
        got = torch.autograd.grad((lp * g + ent * ge).sum(), mine)
        what = f"linear {dtype} {backend} T={temperature} c={softcap} bias={use_bias}"
        _close(lp, want_lp, dtype, what + " logp")
        _close(ent, want_ent, dtype, what + " entropy")
        _close(got[0], want[0], dtype, what + " grad hidden (full, all-reduced)")
        _close(got[1], _slice(want[1].t(), rank, sizes).t(), dtype, what + " grad weight shard")
        if use_bias:
            _close(got[2], _slice(want[2], rank, sizes), dtype, what + " grad bias shard")


def _check_linear_create_graph(rank, world):
    """backward(create_graph=True) (a gradient penalty elsewhere in the graph) gives the same first-order
    gradients as a plain backward, with kept tiles and without; it used to fail on an out= matmul."""
    sizes = SHARDS[world]
    gen = torch.Generator().manual_seed(99)
    hid = torch.randn(13, 8, generator=gen)
    w = _slice(torch.randn(sum(sizes), 8, generator=gen).t(), rank, sizes).t().contiguous()
    y = _labels((13,), sum(sizes), sizes, gen)
    g = torch.randn(13, generator=gen)
    for recompute in ("auto", "full"):
        grads = []
        for create_graph in (False, True):
            leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
            lp = bk.linear_token_logprobs(
                *leaves, y, backend="auto", process_group=dist.group.WORLD, recompute=recompute
            )
            grads.append(torch.autograd.grad((lp * g).sum(), leaves, create_graph=create_graph))
        for a, b in zip(*grads):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)


def _expect_error(fn, *needles):
    try:
        fn()
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        for needle in needles:
            assert needle in msg, f"expected {needle!r} in the error, got {msg!r}"
        return
    raise AssertionError(f"expected an error mentioning {needles}")


def _check_errors(rank, world):
    pg = dist.group.WORLD
    sizes = SHARDS[world]
    vocab = sum(sizes)
    gen = torch.Generator().manual_seed(7)  # the same labels on every rank
    x = torch.randn(4, sizes[rank])
    y = torch.randint(0, vocab, (4,), generator=gen)
    # N differs on rank 1: every rank raises (nobody hangs).
    n = 5 if rank == 1 else 4
    _expect_error(
        lambda: bk.token_logprobs(
            torch.randn(n, sizes[rank]), torch.zeros(n, dtype=torch.long), process_group=pg
        ),
        "labels",
        "same number of positions",
    )
    # A label outside the global vocabulary (but inside no shard) on every rank.
    bad = y.clone()
    bad[2] = vocab
    _expect_error(lambda: bk.token_logprobs(x, bad, process_group=pg), "labels", f"[0, {vocab})", str(vocab))
    neg = y.clone()
    neg[1] = -3
    _expect_error(lambda: bk.token_logprobs(x, neg, process_group=pg), "labels", "-3")
    # Labels that differ across ranks (they must be the same global ids everywhere).
    _expect_error(lambda: bk.token_logprobs(x, (y + rank) % vocab, process_group=pg), "labels", "identical")
    # Options that differ across ranks.
    _expect_error(lambda: bk.token_logprobs(x, y, temperature=1.0 + rank, process_group=pg), "temperature")
    # A local argument error on one rank only: that rank names the argument, the others say which rank failed.
    hid = torch.randn(4, 8)
    w = torch.randn(sizes[rank], 9 if rank == 1 else 8)
    if rank == 1:
        _expect_error(lambda: bk.linear_token_logprobs(hid, w, y, process_group=pg), "weight", "H = 8")
    else:
        _expect_error(lambda: bk.linear_token_logprobs(hid, w, y, process_group=pg), "rank 1", "weight")
    bias = torch.randn(sizes[rank] + (1 if rank == 0 else 0))
    w8 = torch.randn(sizes[rank], 8)
    _expect_error(lambda: bk.linear_token_logprobs(hid, w8, y, bias=bias, process_group=pg), "bias")
    # Hidden sizes that differ across ranks (each rank consistent with itself).
    hh = 8 + rank
    _expect_error(
        lambda: bk.linear_token_logprobs(
            torch.randn(4, hh), torch.randn(sizes[rank], hh), y, process_group=pg
        ),
        "hidden",
        "same size H",
    )
    # Sequence layouts that differ across ranks: each rank would sum different positions into its sequences.
    xs = torch.randn(4, sizes[rank])
    cu = torch.tensor([0, 1, 4]) if rank == 0 else torch.tensor([0, 3, 4])
    _expect_error(lambda: bk.sequence_logprobs(xs, y, cu_seqlens=cu, process_group=pg), "cu_seqlens")
    if rank == 0:  # padded (2, 2) on rank 0, packed (4,) with cu_seqlens on the others: the same N
        call = lambda: bk.sequence_logprobs(xs.view(2, 2, -1), y.view(2, 2), process_group=pg)  # noqa: E731
    else:
        call = lambda: bk.sequence_logprobs(xs, y, cu_seqlens=torch.tensor([0, 2, 4]), process_group=pg)  # noqa: E731
    _expect_error(call, "cu_seqlens", "same sequences")
    # Options that differ are named with the values the caller wrote (not internal codes).
    _expect_error(lambda: bk.token_logprobs(x, y, ignore_index=-100 - rank, process_group=pg), "ignore_index")
    xd = x.to(torch.bfloat16) if rank == 0 else x
    _expect_error(lambda: bk.token_logprobs(xd, y, process_group=pg), "dtype", "bfloat16", "float32")
    _expect_error(
        lambda: bk.token_logprobs(x, y, softcap=None if rank == 0 else 5.0, process_group=pg),
        "softcap",
        "None",
    )
    # hidden.requires_grad differing: only some ranks would all-reduce grad_hidden in the backward (a hang).
    hid_g = hid.clone().requires_grad_(rank == 0)
    _expect_error(
        lambda: bk.linear_token_logprobs(hid_g, torch.randn(sizes[rank], 8), y, process_group=pg),
        "hidden.requires_grad",
    )
    # Two labels swapped 65521 positions apart (the period of the old checksum's weights) on one rank.
    n_big = 65522
    yb = torch.randint(0, vocab, (n_big,), generator=torch.Generator().manual_seed(3))
    yb[0], yb[n_big - 1] = 1, vocab - 2
    if rank == 1:
        yb[0], yb[n_big - 1] = yb[n_big - 1].clone(), yb[0].clone()
    _expect_error(
        lambda: bk.token_logprobs(torch.randn(n_big, sizes[rank]), yb, process_group=pg),
        "labels",
        "identical",
    )
    # Shards of unequal sizes (rank 0 holds one more column): every rank raises, with the sizes.
    uneven = [s + (1 if r == 0 else 0) for r, s in enumerate(sizes)]
    _expect_error(
        lambda: bk.token_logprobs(torch.randn(4, uneven[rank]), y, process_group=pg),
        "logits",
        "same size on every rank",
        str(uneven),
    )
    _expect_error(
        lambda: bk.sequence_logprobs(torch.randn(1, 4, uneven[rank]), y.view(1, 4), process_group=pg),
        "logits",
        str(uneven),
    )
    _expect_error(
        lambda: bk.linear_token_logprobs(hid, torch.randn(uneven[rank], 8), y, process_group=pg),
        "weight",
        "same size on every rank",
        str(uneven),
    )
    # The group still works after all of that.
    bk.token_logprobs(x, y, process_group=pg)


def init_gloo(rank, world, port):
    """One worker's process group: gloo on loopback, one thread, a 60 s timeout (the workers stop themselves)."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )


def _worker(rank, world, port, tile):
    os.environ["BOND_KERNELS_LINEAR_TILE"] = tile
    init_gloo(rank, world, port)
    try:
        for dtype, backend in ((torch.float64, "torch"), (torch.float32, "auto")):
            _check_token(rank, world, dtype, backend)
            _check_linear(rank, world, dtype, backend)
        # One row block of 13 rows in 4-column tiles: each rank's forward keeps its shard's last tiles in
        # its grad_weight buffer (recompute="auto"; 2 of 5 tiles at V_r = 19, 1 of 3 at V_r = 9).
        os.environ["BOND_KERNELS_LINEAR_TILE"] = "16,4"
        _check_linear(rank, world, torch.float32, "auto")
        _check_linear_create_graph(rank, world)
        os.environ["BOND_KERNELS_LINEAR_TILE"] = tile
        _check_masked_vocab(rank, world)
        _check_errors(rank, world)
    except BaseException:
        traceback.print_exc()
        raise  # the parent sees the exception and terminates the other ranks
    teardown()


def teardown():
    """Leave without tearing c10d down.  destroy_process_group() and interpreter exit race with gloo's
    threads: even behind a barrier, a rank aborted about 1 run in 7 ("terminate called without an active
    exception", SIGABRT).  So: a barrier (every check is done), then a count in the TCPStore; ranks other
    than 0 leave as soon as rank 0's store has their count, and rank 0, the store's host, leaves last;
    each leaves with os._exit(0), which skips the C++ destructors that abort."""
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    store.add("bond_kernels_left", 1)
    if dist.get_rank() == 0:
        deadline = time.monotonic() + 30
        while store.add("bond_kernels_left", 0) < dist.get_world_size() and time.monotonic() < deadline:
            time.sleep(0.01)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_world(world, worker=_worker, extra=(), deadline_s=120.0):
    """Spawn ``world`` processes on loopback, wait with a deadline, terminate our own children on timeout."""
    ctx = mp.spawn(worker, args=(world, _free_port(), *extra), nprocs=world, join=False)
    end = time.monotonic() + deadline_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"vocab-parallel workers (world {world}) did not finish in {deadline_s} s")


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world):
    # Tiles of 3 rows × 4 vocabulary columns inside each shard: the linear head crosses tile and shard
    # boundaries in the same call.
    run_world(world, extra=("3,4",))
