"""Training engines on 2 gloo processes (CPU, loopback): DDP and FSDP2 around tiny transformers models.

``integrations.transformers.sequence_logprobs`` is called with the wrapped model, each rank scoring half of
a batch; after ``backward`` every rank's gradients (FSDP2: its shards, gathered here only to compare) must
equal the single-process gradient of the whole batch (1e-5 of each parameter's largest), which they do only
if the wrapper's reducer / reduce-scatter ran.  Models: a Llama with an untied head, one with tied
embeddings, a Gemma-2 with a final-logit softcap.  Then ``EMAAnchor.update`` under both engines: every
anchor tensor (FSDP2: every local shard) must be exactly ``torch.lerp(anchor, policy, eta)``.  And the
misuses that cannot be right: DDP's ``.module`` passed in, an output projection sharded on its own,
anchors that do not line up with the policy.

One spawn of 2 processes runs every case (spawn and gloo init cost seconds, a case milliseconds); each rank
writes its results with ``torch.save``; the tests below read them.
"""

import copy
import os
import time
import traceback

import pytest
import torch
from test_vocab_parallel import init_gloo, run_world, teardown
from torch.distributed.tensor import DTensor

transformers = pytest.importorskip("transformers")

import bond_kernels as bk  # noqa: E402
from bond_kernels.integrations.transformers import sequence_logprobs  # noqa: E402

WORLD = 2
VOCAB = 96
B, T = 4, 9  # B // WORLD rows per rank
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
)
ETA = 0.3
MODELS = ("llama-untied", "llama-tied", "gemma2-softcap")
ENGINES = ("ddp", "ddp-find-unused", "fsdp2")
CASES = [(e, m) for e in ENGINES for m in MODELS if e != "ddp-find-unused" or m == "llama-untied"]


def build(name, seed=0):
    torch.manual_seed(seed)
    if name == "gemma2-softcap":
        cfg = transformers.Gemma2Config(
            **SMALL,
            head_dim=8,
            final_logit_softcapping=3.0,
            attn_implementation="eager",
            tie_word_embeddings=True,
        )
        return transformers.Gemma2ForCausalLM(cfg).float()
    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=name == "llama-tied")
    return transformers.LlamaForCausalLM(cfg).float()


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    mask[2, 7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # an unscored prompt
    return ids, mask, labels, torch.randn(B, T - 1, generator=gen), torch.randn(B, generator=gen)


def loss_of(out, g_tok, g_seq):
    """Mean over this process's rows: DDP and FSDP2 average the ranks' gradients, so the ranks' halves
    give the gradient of the mean over the whole batch."""
    return ((out.token_logprobs * g_tok).sum(-1) + out.sequence_logprobs * g_seq).mean()


def wrap(engine, model):
    if engine.startswith("ddp"):
        return torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=engine == "ddp-find-unused"
        )
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def _full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def _grads(model):
    return {n: _full(p.grad).detach().clone() for n, p in model.named_parameters()}


def _case(rank, engine, name):
    ids, mask, labels, g_tok, g_seq = batch()
    rows = slice(rank * (B // WORLD), (rank + 1) * (B // WORLD))
    ref_model = build(name)
    ref = sequence_logprobs(ref_model, ids, mask, labels)
    loss_of(ref, g_tok, g_seq).backward()
    policy = build(name)
    anchor = copy.deepcopy(policy)
    wrapped = wrap(engine, policy)
    out = sequence_logprobs(wrapped, ids[rows], mask[rows], labels[rows])
    loss_of(out, g_tok[rows], g_seq[rows]).backward()
    inner = wrapped.module if engine.startswith("ddp") else wrapped
    result = dict(
        want_tok=ref.token_logprobs.detach()[rows],
        got_tok=out.token_logprobs.detach(),
        want_grads=_grads(ref_model),
        got_grads=_grads(inner),
    )
    # A step of the policy, so that the anchor has somewhere to go; then the anchor update.
    torch.optim.SGD(wrapped.parameters(), lr=0.5).step()
    if engine == "fsdp2":
        wrap(engine, anchor)
    ema = bk.EMAAnchor(anchor, eta=ETA)
    a_state = {n: t for n, t in anchor.named_parameters()}
    local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in a_state.items()}
    p_local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in inner.named_parameters()}
    want = {n: torch.lerp(local[n].detach().clone(), p_local[n].detach(), ETA) for n in local}
    before = {n: local[n].detach().clone() for n in local}
    ema.update(wrapped)
    result["anchor_exact"] = {n: torch.equal(local[n], want[n]) for n in local}
    result["anchor_moved"] = {n: not torch.equal(local[n], before[n]) for n in local}
    result["anchor_local_rows"] = {n: (local[n].shape[0], a_state[n].shape[0]) for n in local}
    return result


def _errors(rank):
    """Misuses: each must raise a ValueError naming the fix (the same on every rank)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    ids, mask, labels, _, _ = batch()
    msgs = {}

    def catch(key, fn):
        try:
            fn()
        except ValueError as exc:
            msgs[key] = str(exc)
        else:
            msgs[key] = None

    ddp = wrap("ddp", build("llama-untied"))
    catch("ddp-module", lambda: sequence_logprobs(ddp.module, ids, mask, labels))
    # Without autograd there is nothing for DDP to reduce: scoring samples through .module is allowed.
    with torch.no_grad():
        msgs["ddp-module-no-grad"] = (
            sequence_logprobs(ddp.module, ids, mask, labels).token_logprobs,
            sequence_logprobs(ddp, ids, mask, labels).token_logprobs,
        )
    sharded = wrap("fsdp2", build("llama-untied"))
    catch("anchor-plain-vs-fsdp2", lambda: bk.EMAAnchor(build("llama-untied")).update(sharded))
    catch(
        "anchor-fsdp2-vs-plain",
        lambda: bk.EMAAnchor(wrap("fsdp2", build("llama-untied"))).update(build("llama-untied")),
    )
    from torch.distributed.fsdp import FullyShardedDataParallel

    fsdp1 = FullyShardedDataParallel(build("llama-untied"), device_id=torch.device("cpu"))
    catch("anchor-plain-vs-fsdp1", lambda: bk.EMAAnchor(build("llama-untied")).update(fsdp1))
    other = build("llama-untied")
    for layer in other.model.layers:
        fully_shard(layer, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    fully_shard(other, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    catch("anchor-other-placement", lambda: bk.EMAAnchor(other).update(sharded))
    # The output projection sharded on its own: its forward (which gathers it) is not what the head calls.
    head_alone = build("llama-untied")
    for layer in head_alone.model.layers:
        fully_shard(layer)
    fully_shard(head_alone.lm_head)
    fully_shard(head_alone)
    catch("fsdp2-head-alone", lambda: sequence_logprobs(head_alone, ids, mask, labels, verify=False))
    return msgs


def _worker(rank, world, port, out_dir):
    init_gloo(rank, world, port)
    try:
        start = time.monotonic()
        results = {f"{e}/{m}": _case(rank, e, m) for e, m in CASES}
        results["errors"] = _errors(rank)
        results["seconds"] = time.monotonic() - start
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        traceback.print_exc()
        raise
    teardown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines")
    start = time.monotonic()
    run_world(WORLD, worker=_worker, extra=(str(out),), deadline_s=240.0)
    loaded = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    print(f"\nengine workers: {time.monotonic() - start:.1f} s wall, cases {loaded[0]['seconds']:.1f} s")
    return loaded


@pytest.mark.parametrize("engine, name", CASES, ids=[f"{e}-{m}" for e, m in CASES])
def test_gradients_equal_the_full_batch(ranks, engine, name):
    for rank, res in enumerate(ranks):
        res = res[f"{engine}/{name}"]
        torch.testing.assert_close(res["got_tok"], res["want_tok"], rtol=1e-5, atol=1e-5)
        assert res["got_grads"].keys() == res["want_grads"].keys()
        for n, want in res["want_grads"].items():
            got = res["got_grads"][n]
            scale = want.abs().max().item()
            assert scale > 0, n
            err = (got - want).abs().max().item() / scale
            assert err <= 1e-5, f"rank {rank}, {engine}, {name}: grad of {n} off by {err:.3g} of its largest"


@pytest.mark.parametrize("engine, name", CASES, ids=[f"{e}-{m}" for e, m in CASES])
def test_anchor_update_is_the_lerp(ranks, engine, name):
    for res in ranks:
        res = res[f"{engine}/{name}"]
        assert all(res["anchor_exact"].values()), [n for n, ok in res["anchor_exact"].items() if not ok]
        assert all(res["anchor_moved"].values())
        if engine == "fsdp2":  # each rank updated its shard of every parameter (dim 0 split in two)
            for n, (local, full) in res["anchor_local_rows"].items():
                assert local == (full + 1) // 2 or local == full // 2, (n, local, full)


def test_module_without_autograd_is_allowed(ranks):
    for res in ranks:
        through_module, through_ddp = res["errors"]["ddp-module-no-grad"]
        assert through_module.abs().sum() > 0
        torch.testing.assert_close(through_module, through_ddp, rtol=0, atol=0)


@pytest.mark.parametrize(
    "case, needles",
    [
        ("ddp-module", ["DistributedDataParallel", "pass the DistributedDataParallel itself"]),
        ("anchor-plain-vs-fsdp2", ["policy_module.", "is a DTensor, the anchor's is a plain tensor"]),
        ("anchor-fsdp2-vs-plain", ["policy_module.", "is a plain tensor, the anchor's is a DTensor"]),
        ("anchor-plain-vs-fsdp1", ["_flat_param", "FSDP1 renames and flattens"]),
        ("anchor-other-placement", ["policy_module.", "is sharded as (Shard(dim=0),)", "Shard(dim=1)"]),
        (
            "fsdp2-head-alone",
            ["'lm_head'", "still sharded", "fully_shard to the decoder layers and the root"],
        ),
    ],
)
def test_misuse_raises_naming_the_fix(ranks, case, needles):
    for res in ranks:
        msg = res["errors"][case]
        assert msg is not None, f"{case}: no error"
        for needle in needles:
            assert needle in msg, (needle, msg)
