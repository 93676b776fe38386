"""linear_token_jeffreys with process_group= (vocabulary parallel, gloo on loopback, 2 and 3 ranks).

Every rank builds the same full tensors from one seed, keeps its equal slice of both heads' vocabulary and
compares the divergence, the entropy and its shard's gradients (random upstream gradient) with the
single-process op on the full vocabulary; tiles smaller than a shard, so tile and shard boundaries mix.
"""

import traceback

import pytest
import torch
import torch.distributed as dist
from test_vocab_parallel import init_gloo, run_world, teardown

import bond_kernels as bk


def _case(v, gen):
    n, hs, ht = 11, 8, 12
    s = [torch.randn(n, hs, generator=gen), torch.randn(v, hs, generator=gen), torch.randn(v, generator=gen)]
    t = [torch.randn(n, ht, generator=gen), torch.randn(v, ht, generator=gen), torch.randn(v, generator=gen)]
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2] = -100
    return s, t, labels, torch.randn(n, generator=gen)


def _check(rank, world, divergence, beta, softcap):
    v_r = 19
    gen = torch.Generator().manual_seed(7)
    s, t, labels, g = _case(v_r * world, gen)
    kw = dict(
        beta=beta,
        divergence=divergence,
        softcap=softcap,
        teacher_softcap=softcap,
        labels=labels,
        temperature=0.8,
        return_entropy=True,
        tile_bytes=4 * 11 * 256,
    )
    full = [x.clone().requires_grad_(True) for x in s]
    div, ent = bk.linear_token_jeffreys(full[0], full[1], t[0], t[1], bias=full[2], teacher_bias=t[2], **kw)
    (div * g).sum().backward()
    sl = slice(rank * v_r, (rank + 1) * v_r)
    mine = [
        s[0].clone().requires_grad_(True),
        s[1][sl].clone().requires_grad_(True),
        s[2][sl].clone().requires_grad_(True),
    ]
    # tiles of 8 columns inside each 19-column shard
    d_r, e_r = bk.linear_token_jeffreys(
        mine[0],
        mine[1],
        t[0],
        t[1][sl],
        bias=mine[2],
        teacher_bias=t[2][sl],
        process_group=dist.group.WORLD,
        **{**kw, "tile_bytes": 4 * 11 * 8},
    )
    (d_r * g).sum().backward()
    what = f"rank {rank}/{world} {divergence} beta={beta} softcap={softcap}"
    close = lambda a, b, name: torch.testing.assert_close(
        a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what} {name}: {m}"
    )  # noqa: E731
    close(d_r, div.detach(), "divergence")
    close(e_r, ent, "entropy")
    close(mine[0].grad, full[0].grad, "grad hidden")
    close(mine[1].grad, full[1].grad[sl], "grad weight")
    close(mine[2].grad, full[2].grad[sl], "grad bias")


def _check_mismatch(rank):
    h = torch.randn(4, 8, requires_grad=rank == 0)
    w = torch.randn(5, 8)
    try:
        bk.linear_token_jeffreys(h, w, torch.randn(4, 8), torch.randn(5, 8), process_group=dist.group.WORLD)
    except ValueError as exc:
        assert "hidden.requires_grad" in str(exc), str(exc)
    else:
        raise AssertionError("a requires_grad mismatch across ranks was not refused")


def _worker(rank, world, port):
    init_gloo(rank, world, port)
    try:
        for divergence, beta in (("jeffreys", 0.3), ("gjsd", 0.5), ("gjsd", 0.0)):
            for softcap in (None, 4.0):
                _check(rank, world, divergence, beta, softcap)
        _check_mismatch(rank)
    except BaseException:
        traceback.print_exc()
        raise
    teardown()


@pytest.mark.parametrize("world", [2, 3])
def test_linear_token_jeffreys_vocab_parallel(world):
    run_world(world, worker=_worker)
