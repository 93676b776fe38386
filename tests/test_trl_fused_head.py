"""Our ``add_fused_lm_head`` (bond_kernels.integrations.trl_head) against TRL's own (trl 1.16.0) on the same
tiny model: every ``FusedCausalLMOutput`` field, the loss, and every parameter's gradient under a random
upstream gradient on the differentiable fields; and the fused head's extra statistics
(``linear_token_logprobs(..., extras=...)``) against the reference on every CPU backend.

Each case builds two copies of one tiny Llama (seeded, built in code), gives one TRL's head and the other
ours, and runs both with ``fused_lm_head=True`` on left-padded inputs whose labels hold ``-100`` (prompt and
padding), some labels set to the model's own argmax so that ``is_top1`` is True somewhere and False elsewhere.
Temperature, softcap and logit scale are read by both heads from the config (``final_logit_softcapping``,
``logit_scale`` / ``logits_scaling``), as for Gemma-2, Cohere or Granite.
"""

import pytest
import torch
from test_integrations_trl_verl import _peer

import bond_kernels as bk
from bond_kernels import reference as ref
from bond_kernels.integrations import trl_head

VOCAB = 97
B, T = 3, 9
# fp32 both sides; TRL folds its tiles in fp32 in another order (and divides by T where we fold the scale):
# measured differences are ~1e-6 relative.  A wrong temperature, cap, scale or mask moves values by > 1e-2.
TOL = dict(rtol=2e-5, atol=2e-5)

CASES = {
    # id: (config overrides, temperature, head bias, call form, outputs)
    "plain": ({}, 1.0, False, "labels", trl_head.FIELDS),
    "temperature": ({}, 0.7, False, "labels", trl_head.FIELDS),
    "softcap-T1.3": ({"final_logit_softcapping": 2.0}, 1.3, False, "labels", trl_head.FIELDS),
    "logit-scale-fold": (
        {"logit_scale": 0.5, "final_logit_softcapping": 3.0},
        0.8,
        True,
        "labels",
        trl_head.FIELDS,
    ),
    "logits-scaling": ({"logits_scaling": 4.0}, 1.0, False, "labels", ("log_probs", "is_top1")),
    "negative-scale": ({"logit_scale": -0.8}, 0.9, True, "labels", trl_head.FIELDS),
    "shift-labels": ({}, 1.0, False, "shift_labels", ("log_probs", "entropy")),
    "num-items": ({}, 1.0, False, "num_items", ("log_probs", "entropy", "mean_logits")),
    "all-masked": ({}, 0.7, False, "all_masked", trl_head.FIELDS),
    "log-probs-only": ({}, 1.0, True, "labels", ("log_probs",)),
}


@pytest.fixture(scope="module")
def trl_utils():
    return _peer("trl.trainer.utils")


def _model(overrides, bias, seed=3):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    if bias:
        model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
    return model


def _batch(model, form):
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, VOCAB, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :3] = 0  # left padding
    attn[2, :1] = 0
    ids = ids.masked_fill(attn == 0, 0)
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :2] = -100  # the prompt
    with torch.no_grad():
        top = model(input_ids=ids, attention_mask=attn).logits.argmax(-1)  # (B, T): next-token argmax
    labels[:, 4] = torch.where(labels[:, 4] != -100, top[:, 3], labels[:, 4])  # label = argmax at 3 -> 4
    if form == "all_masked":
        labels[:] = -100
    kw = dict(input_ids=ids, attention_mask=attn, fused_lm_head=True)
    if form == "shift_labels":
        shifted = torch.cat([labels[:, 1:], torch.full((B, 1), -100)], 1)
        kw["shift_labels"] = shifted
    else:
        kw["labels"] = labels
    if form == "num_items":
        kw["num_items_in_batch"] = torch.tensor(23)
    return kw


def _run(add, overrides, temperature, bias, form, outputs):
    model = _model(overrides, bias)
    kw = _batch(model, form)
    add(model, temperature=temperature, outputs=outputs)
    out = model(**kw)
    g = torch.Generator().manual_seed(7)
    total = out.loss * 1.7
    for name in ("log_probs", "entropy"):
        t = getattr(out, name)
        if t is not None:
            total = total + (t * torch.randn(t.shape, generator=g)).sum()
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("case", list(CASES))
def test_fused_head_matches_trl(trl_utils, case):
    overrides, temperature, bias, form, outputs = CASES[case]
    theirs, g_theirs = _run(trl_utils.add_fused_lm_head, overrides, temperature, bias, form, outputs)
    ours, g_ours = _run(trl_head.add_fused_lm_head, overrides, temperature, bias, form, outputs)
    assert type(ours) is trl_utils.FusedCausalLMOutput
    assert torch.equal(ours.label_mask, theirs.label_mask)
    mask = theirs.label_mask
    if form == "all_masked":
        assert not bool(mask.any())
    else:
        assert 0 < int(mask.sum()) < mask.numel()
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    for name in trl_head.FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        assert (a is None) == (b is None), name
        if b is None:
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        if name == "is_top1":
            assert torch.equal(a, b)
            if form != "all_masked":
                assert bool(b.any()) and not bool(b[mask].all()), "is_top1 is untested on one side"
        else:
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, name=name: f"{name}: {m}")
        assert bool((a[~mask] == 0).all()), name
        assert a.requires_grad == b.requires_grad, name
    assert ours.aux_loss is None and theirs.aux_loss is None
    assert sorted(g_ours) == sorted(g_theirs)
    for name, g in g_theirs.items():
        scale = g.abs().max().item()
        if form == "all_masked":
            assert scale == 0 and g_ours[name].abs().max().item() == 0, name
            continue
        torch.testing.assert_close(
            g_ours[name], g, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fused_head_keeps_the_plain_forward(trl_utils):
    model = _model({}, False)
    kw = _batch(model, "labels")
    kw.pop("fused_lm_head")
    with torch.no_grad():
        before = model(**kw)
        trl_head.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        after = model(**kw)  # fused_lm_head=False: the model's own forward, its loss and logits
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    torch.testing.assert_close(after.loss, before.loss, rtol=0, atol=0)


def test_fused_head_bad_arguments(trl_utils):
    model = _model({}, False)
    with pytest.raises(ValueError, match="outputs must name fields"):
        trl_head.add_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(TypeError, match="outputs must be a tuple"):
        trl_head.add_fused_lm_head(model, outputs="entropy")
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        trl_head.add_fused_lm_head(model, temperature=0.0)
    trl_head.add_fused_lm_head(model)
    kw = _batch(model, "labels")
    kw.pop("labels")
    with pytest.raises(ValueError, match="needs labels"):
        model(**kw)


# --------------------------------------------------------------------------------------------------------
# the op's extras against the reference
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("tile", ["", "4,24", "64,1"])
@pytest.mark.parametrize("temperature,softcap,bias", [(1.0, None, False), (0.7, 3.0, True)])
def test_linear_extras_match_reference(backend, tile, temperature, softcap, bias, monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_LINEAR_TILE", tile)
    g = torch.Generator().manual_seed(2)
    n, h, v = 13, 16, 101
    hid = torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) * 0.6
    b = torch.randn(v, generator=g) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    x = hid @ w.T + (0 if b is None else b)
    y[3:7] = x[3:7].argmax(-1)  # some labels are the argmax
    y[0] = -100
    names = ref.EXTRAS
    leaves = [hid.clone().requires_grad_(), w.clone().requires_grad_()]
    lp, ent, more = bk.linear_token_logprobs(
        *leaves[:1],
        leaves[1],
        y,
        bias=b,
        temperature=temperature,
        softcap=softcap,
        return_entropy=True,
        extras=names,
        backend=backend,
    )
    want = ref.linear_token_extras(hid, w, y, names, bias=b, temperature=temperature, softcap=softcap)
    assert sorted(more) == sorted(names)
    for name in names:
        assert more[name].dtype == want[name].dtype and not more[name].requires_grad, name
        if name == "is_top1":
            assert torch.equal(more[name], want[name])
            assert 0 < int(want[name].sum()) < n - 1
        else:
            torch.testing.assert_close(more[name], want[name], rtol=1e-5, atol=1e-5)
    # fp64 check of the spec itself: log Σ p² and the mean straight from the softmax
    xd = hid.double() @ w.double().T + (0 if b is None else b.double())
    zd = (softcap * torch.tanh(xd / softcap) if softcap else xd) / temperature
    p = torch.softmax(zd, -1)
    keep = y != -100
    torch.testing.assert_close(
        more["log_sum_sq_probs"][keep].double(), (p * p).sum(-1).log()[keep], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(more["mean_logits"][keep].double(), zd.mean(-1)[keep], rtol=1e-5, atol=1e-5)
    # asking for extras leaves the log-probs, the entropy and their gradients as without them
    gl, ge = torch.randn(n, generator=g), torch.randn(n, generator=g)
    grads = torch.autograd.grad((lp * gl + ent * ge).sum(), leaves)
    leaves2 = [hid.clone().requires_grad_(), w.clone().requires_grad_()]
    lp2, ent2 = bk.linear_token_logprobs(
        leaves2[0],
        leaves2[1],
        y,
        bias=b,
        temperature=temperature,
        softcap=softcap,
        return_entropy=True,
        backend=backend,
    )
    torch.testing.assert_close(lp, lp2, rtol=0, atol=0)
    torch.testing.assert_close(ent, ent2, rtol=0, atol=0)
    for a, c in zip(grads, torch.autograd.grad((lp2 * gl + ent2 * ge).sum(), leaves2)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_linear_extras_bad_input():
    hid, w, y = torch.randn(4, 8), torch.randn(11, 8), torch.randint(0, 11, (4,))
    with pytest.raises(ValueError, match="extras must be distinct names"):
        bk.linear_token_logprobs(hid, w, y, extras=("mean_logits", "logits"))
    with pytest.raises(ValueError, match="extras must be distinct names"):
        bk.linear_token_logprobs(hid, w, y, extras=("mean_logits", "mean_logits"))
    with pytest.raises(TypeError, match="extras must be a tuple"):
        bk.linear_token_logprobs(hid, w, y, extras="is_top1")
    # no row: empty extras of the right dtypes beside the (connected) empty log-probs
    lp, more = bk.linear_token_logprobs(hid[:0], w, y[:0], extras=("is_top1", "mean_logits"))
    assert lp.shape == (0,) and more["is_top1"].dtype == torch.bool and more["mean_logits"].shape == (0,)
    with pytest.raises(ValueError, match="extras are not supported with process_group"):
        bk.linear_token_logprobs(hid, w, y, extras=("is_top1",), process_group=object())


# --------------------------------------------------------------------------------------------------------
# patch() / unpatch() of add_fused_lm_head
# --------------------------------------------------------------------------------------------------------
# TRL 1.16 modules that bind add_fused_lm_head by name (`from ..trainer.utils import add_fused_lm_head`).
TRAINER_MODULES = [
    "trl.trainer.grpo_trainer",
    "trl.trainer.rloo_trainer",
    "trl.trainer.dpo_trainer",
    "trl.trainer.kto_trainer",
    "trl.trainer.sft_trainer",
]
LATER_MODULE = "trl.experimental.async_grpo.async_grpo_trainer"


def test_patch_swaps_the_fused_head_into_every_trainer(trl_utils):
    import importlib
    import sys

    import bond_kernels.integrations.trl as bk_trl

    original = trl_utils.add_fused_lm_head
    before = [_peer(name) for name in TRAINER_MODULES]  # imported before patch()
    for mod in before:
        assert mod.add_fused_lm_head is original, mod.__name__
    try:
        assert "add_fused_lm_head" in bk_trl.patch()
        assert trl_utils.add_fused_lm_head is bk_trl.add_fused_lm_head is trl_head.add_fused_lm_head
        for mod in before:
            assert mod.add_fused_lm_head is trl_head.add_fused_lm_head, mod.__name__
        # every TRL module that binds the name, found by scanning, not only the five named above
        holders = [
            name
            for name, mod in list(sys.modules.items())
            if name.startswith("trl.") and vars(mod).get("add_fused_lm_head") is original
        ]
        assert holders == [], holders
        later = importlib.import_module(LATER_MODULE)  # before or after patch(): ours either way
        assert later.add_fused_lm_head is trl_head.add_fused_lm_head
        assert importlib.import_module("trl.trainer").add_fused_lm_head is trl_head.add_fused_lm_head
    finally:
        bk_trl.unpatch()
    assert trl_utils.add_fused_lm_head is original
    for mod in before + [sys.modules[LATER_MODULE]]:
        assert mod.add_fused_lm_head is original, mod.__name__
    assert sys.modules["trl.trainer"].add_fused_lm_head is original


def test_linear_op_with_extras_passes_opcheck():
    """The custom op's schema, fake (shapes and dtypes of the extras) and autograd registration agree."""
    from bond_kernels.ops import linear_token_logprobs as lin

    g = torch.Generator().manual_seed(4)
    hid = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(19, 8, generator=g, requires_grad=True)
    y = torch.randint(0, 19, (6,), generator=g)
    y[0] = -100
    for mask in (7, 4, 0):
        torch.library.opcheck(
            lin.linear_token_logprobs_fwd, (hid, w, None, y, 0.9, 0.0, -100, True, "cpu", mask)
        )


@pytest.mark.parametrize("cast", [True, False], ids=["cast_lm_head_to_fp32", "bf16-head"])
def test_fused_head_bf16_model_matches_trl(trl_utils, cast):
    """A bf16 model: with ``cast_lm_head_to_fp32`` both heads run in fp32 on the same bf16 hidden states (tight);
    without it TRL rounds its bf16 tile products where our CPU plan accumulates them in fp32 (bf16 tolerance)."""

    def run(add):
        model = _model({}, False).to(torch.bfloat16)
        kw = _batch(model, "labels")
        add(model, temperature=0.8, cast_lm_head_to_fp32=cast, outputs=("log_probs", "entropy"))
        out = model(**kw)
        g = torch.Generator().manual_seed(5)
        (out.log_probs * torch.randn(out.log_probs.shape, generator=g)).sum().backward()
        return out, model.lm_head.weight.grad.float()

    theirs, gw_theirs = run(trl_utils.add_fused_lm_head)
    ours, gw_ours = run(trl_head.add_fused_lm_head)
    tol = dict(rtol=2e-5, atol=2e-5) if cast else dict(rtol=3e-2, atol=3e-2)
    for name in ("log_probs", "entropy"):
        a, b = getattr(ours, name), getattr(theirs, name)
        assert a.dtype == b.dtype == torch.float32, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")
    scale = gw_theirs.abs().max().item()
    torch.testing.assert_close(gw_ours, gw_theirs, rtol=2e-2, atol=2e-2 * scale)


def test_fused_head_moe_aux_loss_matches_trl(trl_utils):
    """A tiny Mixtral whose config asks for router logits: the load-balancing loss, weighted into the loss."""
    import transformers

    def run(add):
        config = transformers.MixtralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.3,
            max_position_embeddings=32,
            pad_token_id=0,
        )
        torch.manual_seed(8)
        model = transformers.MixtralForCausalLM(config).float()
        kw = _batch(model, "labels")
        add(model, outputs=("log_probs",))
        out = model(**kw)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    theirs, g_theirs = run(trl_utils.add_fused_lm_head)
    ours, g_ours = run(trl_head.add_fused_lm_head)
    assert theirs.aux_loss is not None and ours.aux_loss is not None
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss, **TOL)
    torch.testing.assert_close(ours.loss, theirs.loss, **TOL)
    assert sorted(g_ours) == sorted(g_theirs)
    for name, g in g_theirs.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(
            g_ours[name], g, rtol=1e-4, atol=1e-4 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_fused_head_refuses_zero3(trl_utils, monkeypatch):
    model = _model({}, False)
    trl_head.add_fused_lm_head(model)
    monkeypatch.setattr(trl_head, "_zero3_enabled", lambda: True)
    with pytest.raises(NotImplementedError, match="ZeRO-3.*unpatch"):
        model(**_batch(model, "labels"))
