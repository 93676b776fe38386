"""DTensor inputs (torch.distributed.tensor) of token_logprobs, sequence_logprobs, token_jeffreys and
linear_token_logprobs: gloo on loopback, a 1-D CPU mesh of 2 and of 3 ranks.

One spawn per world size runs every case (spawning costs seconds, the cases milliseconds) and saves what it
got, values and each rank's local gradients (random upstream gradients), with torch.save; the assertions run
here in the parent, against torch's own ``loss_parallel`` cross-entropy (computed by the same workers on the
same DTensors) and against fp64 single-process computations on the full tensors.  The bad-input cases save
the exception each rank raised.
"""

import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_vocab_parallel import init_gloo, run_world, teardown

import bond_kernels as bk
from bond_kernels.reference.linear_token_logprobs import linear_token_logprobs as linear_reference

VOCAB = {2: 38, 3: 39}  # shards of 19 and 13 columns
B, T, H = 2, 5, 16


def _tensors(world, seed):
    """The full tensors of one case, the same on every rank and in the parent."""
    v = VOCAB[world]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, v, generator=gen) * 3
    a = torch.randn(B, T, v, generator=gen) * 2
    y = torch.randint(0, v, (B, T), generator=gen)
    y[0, 0] = -100
    y[0, 1], y[1, 4] = 0, v - 1  # the first and last column, on the first and last rank
    y[1, 0] = v // world  # the second rank's first column
    hid = torch.randn(B, T, H, generator=gen)
    w = torch.randn(v, H, generator=gen) / 2
    b = torch.randn(v, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.3
    g = [torch.randn(B, T, generator=gen) for _ in range(2)]
    gs = torch.randn(B, generator=gen)
    gp = torch.randn(2, generator=gen)
    return dict(x=x, a=a, y=y, hid=hid, w=w, b=b, mask=mask, g=g[0], ge=g[1], gs=gs, gp=gp)


CU = torch.tensor([0, 3, 10])  # packed: 2 sequences of 3 and 7 tokens


# --------------------------------------------------------------------------------------------------------
# the workers
# --------------------------------------------------------------------------------------------------------
def _local(t):
    return t.to_local().detach().clone() if hasattr(t, "to_local") else t.detach().clone()


def _grads(named):
    return {
        k: {"grad": _local(p.grad), "type": type(p.grad).__name__, "placements": str(p.grad.placements)}
        for k, p in named.items()
    }


def _out(*outs):
    return [
        {"value": _local(o), "type": type(o).__name__, "placements": str(getattr(o, "placements", None))}
        for o in outs
    ]


def _sharded_cases(mesh, world, pg):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, loss_parallel, parallelize_module

    def rep(t):
        return distribute_tensor(t, mesh, [Replicate()])

    res = {}
    c = _tensors(world, 1)
    # token_logprobs with the entropy, both transforms; labels plain
    xd = distribute_tensor(c["x"], mesh, [Shard(-1)]).requires_grad_(True)
    lp, ent = bk.token_logprobs(xd, c["y"], temperature=0.7, softcap=3.0, return_entropy=True)
    (lp * rep(c["g"]) + ent * rep(c["ge"])).sum().backward()
    res["token"] = {"out": _out(lp, ent), "grads": _grads({"logits": xd})}

    # against loss_parallel: logp = −CE (reduction none), both on (N, V) Shard(1); labels a Replicate
    # DTensor, process_group= the mesh's group (accepted)
    for temperature, softcap in ((1.0, None), (0.7, 3.0)):
        x2 = c["x"].view(B * T, -1)
        ours = distribute_tensor(x2, mesh, [Shard(1)]).requires_grad_(True)
        theirs = distribute_tensor(x2, mesh, [Shard(1)]).requires_grad_(True)
        yd = rep(c["y"].view(-1))
        lp = bk.token_logprobs(ours, yd, temperature=temperature, softcap=softcap, process_group=pg)
        (lp * rep(c["g"].view(-1))).sum().backward()
        with loss_parallel():
            z = theirs if softcap is None else softcap * torch.tanh(theirs / softcap)
            ce = F.cross_entropy(z / temperature, c["y"].view(-1), reduction="none")
            (-ce * rep(c["g"].view(-1))).sum().backward()
        res[f"loss_parallel T={temperature} c={softcap}"] = {
            "out": _out(lp, -ce),
            "grads": _grads({"ours": ours, "theirs": theirs}),
        }

    # the in-place backward: a non-leaf DTensor buffer that the gradient overwrites
    xd = distribute_tensor(c["x"], mesh, [Shard(-1)]).requires_grad_(True)
    lp = bk.token_logprobs(xd * 1, c["y"], inplace=True)
    (lp * rep(c["g"])).sum().backward()
    res["token inplace"] = {"out": _out(lp), "grads": _grads({"logits": xd})}

    # sequence sums, padded and packed (cu_seqlens a Replicate DTensor)
    xd = distribute_tensor(c["x"], mesh, [Shard(2)]).requires_grad_(True)
    seq = bk.sequence_logprobs(xd, c["y"], softcap=3.0)
    (seq * rep(c["gs"])).sum().backward()
    res["sequence padded"] = {"out": _out(seq), "grads": _grads({"logits": xd})}
    xd = distribute_tensor(c["x"].view(B * T, -1), mesh, [Shard(1)]).requires_grad_(True)
    seq = bk.sequence_logprobs(xd, c["y"].view(-1), cu_seqlens=rep(CU), temperature=0.8)
    (seq * rep(c["gs"])).sum().backward()
    res["sequence packed"] = {"out": _out(seq), "grads": _grads({"logits": xd})}

    # token_jeffreys, the anchor sharded too; with and without an ignore_mask
    for mask in (None, c["mask"]):
        # without a mask, logits far from 0 (exp overflows fp32 unless shifted by the global row maxima)
        shift = 150.0 if mask is None else 0.0
        pd = distribute_tensor(c["x"] + shift, mesh, [Shard(-1)]).requires_grad_(True)
        ad = distribute_tensor(c["a"] - shift, mesh, [Shard(-1)])
        div = bk.token_jeffreys(pd, ad, beta=0.3, temperature=0.8, ignore_mask=mask)
        (div * rep(c["g"])).sum().backward()
        res[f"jeffreys mask={mask is not None}"] = {"out": _out(div), "grads": _grads({"policy_logits": pd})}

    # token_jeffreys over process_group= on plain shards (the path the DTensors take)
    v_r = VOCAB[world] // world
    sl = slice(dist.get_rank() * v_r, (dist.get_rank() + 1) * v_r)
    pl = c["x"][..., sl].clone().requires_grad_(True)
    div = bk.token_jeffreys(
        pl, c["a"][..., sl], beta=0.3, temperature=0.8, ignore_mask=c["mask"], process_group=pg
    )
    (div * c["g"]).sum().backward()
    res["jeffreys process_group"] = {
        "out": _out(div),
        "grads": {"policy_logits": {"grad": pl.grad.clone(), "type": "Tensor", "placements": "None"}},
    }

    # linear_token_logprobs: hidden Replicate(), weight and bias Shard(0)
    hd = rep(c["hid"]).requires_grad_(True)
    wd = distribute_tensor(c["w"], mesh, [Shard(0)]).requires_grad_(True)
    bd = distribute_tensor(c["b"], mesh, [Shard(0)]).requires_grad_(True)
    lp, ent = bk.linear_token_logprobs(
        hd, wd, c["y"], bias=bd, temperature=0.7, softcap=3.0, return_entropy=True
    )
    (lp * rep(c["g"]) + ent * rep(c["ge"])).sum().backward()
    res["linear"] = {"out": _out(lp, ent), "grads": _grads({"hidden": hd, "weight": wd, "bias": bd})}

    # a ColwiseParallel lm_head (use_local_output=False): its Shard(0) weight through linear_token_logprobs
    # (hidden from_local'd as Replicate()), and its Shard(-1) logits through token_logprobs
    for how in ("linear", "logits"):
        head = torch.nn.Linear(H, VOCAB[world], bias=False)
        with torch.no_grad():
            head.weight.copy_(c["w"])
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
        hid = c["hid"].clone().requires_grad_(True)
        if how == "linear":
            lp = bk.linear_token_logprobs(DTensor.from_local(hid, mesh, [Replicate()]), head.weight, c["y"])
        else:
            lp = bk.token_logprobs(head(hid), c["y"])
        (lp * rep(c["g"])).sum().backward()
        res[f"colwise {how}"] = {
            "out": _out(lp),
            "grads": {
                **_grads({"weight": head.weight}),
                "hidden": {"grad": hid.grad.clone(), "type": "Tensor", "placements": "None"},
            },
        }
    return res


def _replicated_cases(mesh, world):
    from torch.distributed.tensor import Replicate, distribute_tensor

    def rep(t):
        return distribute_tensor(t, mesh, [Replicate()])

    res = {}
    c = _tensors(world, 2)
    xd = rep(c["x"]).requires_grad_(True)
    lp, ent = bk.token_logprobs(xd, c["y"], temperature=0.7, softcap=3.0, return_entropy=True)
    (lp * rep(c["g"]) + ent * rep(c["ge"])).sum().backward()
    res["token"] = {"out": _out(lp, ent), "grads": _grads({"logits": xd})}
    xd = rep(c["x"].view(B * T, -1)).requires_grad_(True)
    seq = bk.sequence_logprobs(xd, rep(c["y"].view(-1)), cu_seqlens=CU, temperature=0.8)
    (seq * rep(c["gs"])).sum().backward()
    res["sequence packed"] = {"out": _out(seq), "grads": _grads({"logits": xd})}
    pd = rep(c["x"]).requires_grad_(True)
    div = bk.token_jeffreys(pd, rep(c["a"]), beta=0.3, temperature=0.8, ignore_mask=rep(c["mask"]))
    (div * rep(c["g"])).sum().backward()
    res["jeffreys mask=True"] = {"out": _out(div), "grads": _grads({"policy_logits": pd})}
    hd, wd, bd = (rep(c[k]).requires_grad_(True) for k in ("hid", "w", "b"))
    lp, ent = bk.linear_token_logprobs(
        hd, wd, c["y"], bias=bd, temperature=0.7, softcap=3.0, return_entropy=True
    )
    (lp * rep(c["g"]) + ent * rep(c["ge"])).sum().backward()
    res["linear"] = {"out": _out(lp, ent), "grads": _grads({"hidden": hd, "weight": wd, "bias": bd})}
    return res


def _error_cases(mesh, world, pg):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    def rep(t):
        return distribute_tensor(t, mesh, [Replicate()])

    c = _tensors(world, 3)
    v = VOCAB[world]
    xs = distribute_tensor(c["x"], mesh, [Shard(-1)])
    wd = distribute_tensor(c["w"], mesh, [Shard(0)])
    uneven = torch.randn(B, T, v + 1)
    mesh2 = init_device_mesh("cpu", (world, 1))  # every rank creates its groups
    sub = dist.new_group(list(range(world - 1)))  # a group that is not the mesh's (rank world-1 not in it)
    calls = {
        "batch-sharded logits": lambda: bk.token_logprobs(
            distribute_tensor(c["x"], mesh, [Shard(0)]), c["y"]
        ),
        "batch-sharded sequence": lambda: bk.sequence_logprobs(
            distribute_tensor(c["x"], mesh, [Shard(1)]), c["y"]
        ),
        "anchor sharded elsewhere": lambda: bk.token_jeffreys(
            xs, distribute_tensor(c["a"], mesh, [Shard(0)])
        ),
        "weight sharded on H": lambda: bk.linear_token_logprobs(
            rep(c["hid"]), distribute_tensor(c["w"], mesh, [Shard(1)]), c["y"]
        ),
        "hidden sharded": lambda: bk.linear_token_logprobs(
            distribute_tensor(c["hid"], mesh, [Shard(0)]), wd, c["y"]
        ),
        "bias replicated, weight sharded": lambda: bk.linear_token_logprobs(
            rep(c["hid"]), wd, c["y"], bias=rep(c["b"])
        ),
        "uneven logits": lambda: bk.token_logprobs(distribute_tensor(uneven, mesh, [Shard(-1)]), c["y"]),
        "uneven weight": lambda: bk.linear_token_logprobs(
            rep(c["hid"]), distribute_tensor(torch.randn(v + 1, H), mesh, [Shard(0)]), c["y"]
        ),
        "2-D mesh": lambda: bk.token_logprobs(
            distribute_tensor(c["x"], mesh2, [Shard(-1), Replicate()]), c["y"]
        ),
        "plain hidden": lambda: bk.linear_token_logprobs(c["hid"], wd, c["y"]),
        "plain anchor": lambda: bk.token_jeffreys(xs, c["a"]),
        "plain logits, DTensor labels": lambda: bk.token_logprobs(c["x"], rep(c["y"])),
        "labels sharded": lambda: bk.token_logprobs(xs, distribute_tensor(c["y"], mesh, [Shard(0)])),
        "other process_group": lambda: bk.token_logprobs(xs, c["y"], process_group=sub),
        "replicated, labels differ": lambda: bk.token_logprobs(
            rep(c["x"]), (c["y"].clamp_min(0) + dist.get_rank()) % v
        ),
        "sharded, labels differ": lambda: bk.token_logprobs(xs, (c["y"].clamp_min(0) + dist.get_rank()) % v),
    }
    # token_jeffreys over process_group= on plain shards: unequal shards, N differing, a local error on one rank
    rank, v_r = dist.get_rank(), v // world
    p_r = c["x"][..., rank * v_r : (rank + 1) * v_r]
    a_r = c["a"][..., rank * v_r : (rank + 1) * v_r]
    wide = torch.randn(B, T, v_r + (rank == 0))
    calls["jeffreys unequal shards"] = lambda: bk.token_jeffreys(wide, wide, process_group=pg)
    rows = p_r[:1] if rank == 0 else p_r
    calls["jeffreys N differs"] = lambda: bk.token_jeffreys(rows, rows, process_group=pg)
    a_bad = a_r[..., :-1] if rank == 1 else a_r
    calls["jeffreys bad anchor on rank 1"] = lambda: bk.token_jeffreys(p_r, a_bad, process_group=pg)
    res = {}
    for name, call in calls.items():
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - recorded, the parent checks the type
            res[name] = (type(exc).__name__, str(exc))
        else:
            res[name] = (None, "no error")
    # the group still works after every error
    bk.token_logprobs(xs, c["y"])
    return res


def _worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        res = {
            "sharded": _sharded_cases(mesh, world, dist.group.WORLD),
            "replicated": _replicated_cases(mesh, world),
            "errors": _error_cases(mesh, world, dist.group.WORLD),
        }
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    teardown()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def world_results(request):
    world = request.param
    with tempfile.TemporaryDirectory() as d:
        run_world(world, worker=_worker, extra=(d,))
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    return world, ranks


# --------------------------------------------------------------------------------------------------------
# fp64 single-process expectations
# --------------------------------------------------------------------------------------------------------
def _expected(world, seed):
    c = {k: (v.double() if v.is_floating_point() else v) for k, v in _tensors(world, seed).items()}
    out = {}

    def leaf(k):
        return c[k].clone().requires_grad_(True)

    x = leaf("x")
    lp, ent = bk.reference.token_logprobs(x, c["y"], temperature=0.7, softcap=3.0, return_entropy=True)
    out["token"] = ([lp, ent], {"logits": torch.autograd.grad((lp * c["g"] + ent * c["ge"]).sum(), x)[0]})
    x = leaf("x")
    lp = bk.reference.token_logprobs(x, c["y"])
    out["token inplace"] = ([lp], {"logits": torch.autograd.grad((lp * c["g"]).sum(), x)[0]})
    x = leaf("x")
    seq = bk.reference.token_logprobs(x, c["y"], softcap=3.0).sum(-1)
    out["sequence padded"] = ([seq], {"logits": torch.autograd.grad((seq * c["gs"]).sum(), x)[0]})
    x = leaf("x")
    lp = bk.reference.token_logprobs(x.view(B * T, -1), c["y"].view(-1), temperature=0.8)
    seq = torch.stack([lp[CU[i] : CU[i + 1]].sum() for i in range(2)])
    out["sequence packed"] = (
        [seq],
        {"logits": torch.autograd.grad((seq * c["gs"]).sum(), x)[0].view(B * T, -1)},
    )
    for mask in (None, c["mask"]):
        shift = 150.0 if mask is None else 0.0
        x = (c["x"].float() + shift).double().requires_grad_(True)  # the worker's fp32 values
        a = (c["a"].float() - shift).double()
        div = bk.reference.token_jeffreys(x, a, beta=0.3, temperature=0.8, ignore_mask=mask)
        out[f"jeffreys mask={mask is not None}"] = (
            [div],
            {"policy_logits": torch.autograd.grad((div * c["g"]).sum(), x)[0]},
        )
    out["jeffreys process_group"] = out["jeffreys mask=True"]
    hid, w, b = leaf("hid"), leaf("w"), leaf("b")
    lp, ent = linear_reference(hid, w, c["y"], bias=b, temperature=0.7, softcap=3.0, return_entropy=True)
    grads = torch.autograd.grad((lp * c["g"] + ent * c["ge"]).sum(), [hid, w, b])
    out["linear"] = ([lp, ent], dict(zip(("hidden", "weight", "bias"), grads)))
    hid, w = leaf("hid"), leaf("w")
    lp = linear_reference(hid, w, c["y"])
    grads = torch.autograd.grad((lp * c["g"]).sum(), [hid, w])
    out["colwise linear"] = out["colwise logits"] = ([lp], dict(zip(("hidden", "weight"), grads)))
    return out


def _close(got, want, what):
    torch.testing.assert_close(
        got.double(), want.detach().double(), rtol=2e-5, atol=2e-5, msg=lambda m: f"{what}: {m}"
    )


# which dimension of each input the sharded cases shard
SHARD_DIM = {"logits": -1, "policy_logits": -1, "weight": 0, "bias": 0, "ours": -1, "theirs": -1}


def _check_against_fp64(world, ranks, mode, seed):
    want = _expected(world, seed)
    cases = ranks[0][mode]
    checked = [k for k in cases if k in want]
    assert len(checked) == len(want) if mode == "sharded" else len(checked) == len(cases), (
        sorted(cases),
        sorted(want),
    )
    for name in checked:
        outs, grads = want[name]
        for rank, res in enumerate(ranks):
            got = res[mode][name]
            for i, (o, w) in enumerate(zip(got["out"], outs)):
                if name == "jeffreys process_group":  # plain shards in, a plain tensor out
                    assert o["type"] == "Tensor", o
                else:
                    assert o["type"] == "DTensor" and o["placements"] == "(Replicate(),)", (name, o)
                _close(o["value"], w, f"{mode} {name} rank {rank} output {i}")
            assert set(got["grads"]) == set(grads), (name, sorted(got["grads"]))
            for k, g in got["grads"].items():
                full = grads[k]
                dim = SHARD_DIM.get(k)
                if mode == "sharded" and dim is not None:
                    size = full.shape[dim] // world
                    full = full.narrow(dim, rank * size, size)
                    placements = f"(Shard(dim={dim % full.dim()}),)"
                else:
                    placements = "(Replicate(),)"
                if g["type"] == "DTensor":
                    assert g["placements"] == placements, (name, k, g["placements"], placements)
                else:  # a plain input (the ColwiseParallel module's input, the process_group= case) stays plain
                    assert name in ("colwise linear", "colwise logits", "jeffreys process_group") and k in (
                        "hidden",
                        "policy_logits",
                    ), (name, k)
                _close(g["grad"], full, f"{mode} {name} rank {rank} grad {k}")


def test_sharded_matches_fp64(world_results):
    world, ranks = world_results
    _check_against_fp64(world, ranks, "sharded", 1)


def test_replicated_matches_fp64(world_results):
    world, ranks = world_results
    _check_against_fp64(world, ranks, "replicated", 2)


@pytest.mark.parametrize("options", ["T=1.0 c=None", "T=0.7 c=3.0"])
def test_matches_loss_parallel(world_results, options):
    """Log-probs equal −cross_entropy(reduction='none') of torch's loss_parallel on the same Shard(1)
    DTensors, with the same gradients (a random upstream gradient), each a DTensor Shard(1) on every rank."""
    world, ranks = world_results
    for rank, res in enumerate(ranks):
        got = res["sharded"][f"loss_parallel {options}"]
        ours, theirs = got["out"]
        assert ours["type"] == theirs["type"] == "DTensor"
        assert ours["placements"] == theirs["placements"] == "(Replicate(),)"
        _close(ours["value"], theirs["value"], f"rank {rank} logp vs -CE")
        g_ours, g_theirs = got["grads"]["ours"], got["grads"]["theirs"]
        assert g_ours["placements"] == g_theirs["placements"] == "(Shard(dim=1),)"
        assert g_ours["grad"].shape == (B * T, VOCAB[world] // world)
        _close(g_ours["grad"], g_theirs["grad"], f"rank {rank} grad vs loss_parallel's")


# (exception type, words the message must hold) of each bad input, on every rank
ERRORS = {
    "batch-sharded logits": ("ValueError", ["logits", "vocabulary", "Shard(2)", "Shard(0)"]),
    "batch-sharded sequence": ("ValueError", ["logits", "Shard(2)", "Shard(1)"]),
    "anchor sharded elsewhere": ("ValueError", ["anchor_logits", "Shard(2)", "Shard(0)"]),
    "weight sharded on H": ("ValueError", ["weight", "Shard(0)", "Shard(1)"]),
    "hidden sharded": ("ValueError", ["hidden", "Replicate()", "Shard(0)"]),
    "bias replicated, weight sharded": ("ValueError", ["bias", "Shard(0)", "Replicate()"]),
    "uneven logits": ("ValueError", ["logits", "evenly", "pad the vocabulary"]),
    "uneven weight": ("ValueError", ["weight", "evenly", "pad the vocabulary"]),
    "2-D mesh": ("ValueError", ["logits", "1-D", "mesh"]),
    "plain hidden": ("TypeError", ["hidden", "plain", "weight", "DTensor"]),
    "plain anchor": ("TypeError", ["anchor_logits", "plain", "policy_logits"]),
    "plain logits, DTensor labels": ("TypeError", ["logits", "plain", "labels"]),
    "labels sharded": ("ValueError", ["labels", "Replicate()", "Shard(0)"]),
    "other process_group": ("ValueError", ["process_group", "mesh"]),
    "replicated, labels differ": ("ValueError", ["labels", "identical"]),
    "sharded, labels differ": ("ValueError", ["labels", "identical"]),
    "jeffreys unequal shards": ("ValueError", ["policy_logits", "same size on every rank", "Pad"]),
    "jeffreys N differs": ("ValueError", ["policy_logits", "same number of rows"]),
    # rank 1 names its own argument; the others name rank 1 and its message
    "jeffreys bad anchor on rank 1": ("ValueError", ["anchor_logits", "shape"]),
}


def test_bad_inputs_raise_on_every_rank(world_results):
    world, ranks = world_results
    v = VOCAB[world]
    chunk = -(-(v + 1) // world)
    sizes = str([max(0, min(chunk, v + 1 - r * chunk)) for r in range(world)])
    for rank, res in enumerate(ranks):
        assert set(res["errors"]) == set(ERRORS), sorted(res["errors"])
        for name, (kind, words) in ERRORS.items():
            got_kind, msg = res["errors"][name]
            assert got_kind == kind, f"rank {rank} {name}: {got_kind}: {msg}"
            if name.startswith("uneven"):
                words = words + [sizes, str(world)]
            if name == "jeffreys bad anchor on rank 1" and rank != 1:
                words = words + ["rank 1"]
            for word in words:
                assert word in msg, f"rank {rank} {name}: expected {word!r} in {msg!r}"
