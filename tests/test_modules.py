"""Modules hold configuration only: module == functional == reference (values and gradients with random
upstream gradients, torch backend), and EMAAnchor's fused update equals the reference loop."""

import copy

import pytest
import torch
from torch import nn

import bond_kernels as bk
from bond_kernels import reference as ref


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grads(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, inputs, upstream, allow_unused=True)


def _assert_same(a, b, exact):
    if exact:
        assert torch.equal(a, b), (a, b)
    else:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------------------------------
# TokenLogprobs / TokenJeffreys
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(temperature=0.8, softcap=6.0, ignore_index=3)],
    ids=["plain", "temp-softcap-ignore3"],
)
def test_token_logprobs_module_functional_reference(dtype, opts):
    g = _gen(1)
    logits = (2 * torch.randn(3, 4, 19, generator=g)).to(dtype)
    labels = torch.randint(0, 19, (3, 4), generator=g)
    labels[0, 1] = opts.get("ignore_index", -100)
    mod = bk.TokenLogprobs(return_entropy=True, backend="torch", **opts)
    assert "backend='torch'" in repr(mod)
    outs = []
    for fn in (
        lambda x: mod(x, labels),
        lambda x: bk.token_logprobs(x, labels, return_entropy=True, backend="torch", **opts),
        lambda x: ref.token_logprobs(x, labels, return_entropy=True, **opts),
    ):
        x = logits.clone().requires_grad_(True)
        logp, ent = fn(x)
        up = [
            torch.randn(labels.shape, generator=_gen(7), dtype=logp.dtype),
            torch.randn(labels.shape, generator=_gen(8), dtype=ent.dtype),
        ]
        (gx,) = _grads([logp, ent], [x], up)
        outs.append((logp.detach(), ent.detach(), gx))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            _assert_same(a, b, exact=True)
    assert outs[0][0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert outs[0][0][0, 1] == 0 and (outs[0][2][0, 1] == 0).all()


@pytest.mark.parametrize("beta,temperature", [(0.5, 1.0), (0.2, 1.4)])
def test_token_jeffreys_module_functional_reference(beta, temperature):
    g = _gen(2)
    pol = torch.randn(5, 23, generator=g)
    anc = torch.randn(5, 23, generator=g)
    mask = torch.tensor([False, True, False, False, True])
    mod = bk.TokenJeffreys(beta=beta, temperature=temperature, backend="torch")
    up = torch.randn(5, generator=g)
    outs = []
    for fn in (
        lambda x: mod(x, anc, ignore_mask=mask),
        lambda x: bk.token_jeffreys(
            x, anc, beta=beta, temperature=temperature, ignore_mask=mask, backend="torch"
        ),
        lambda x: ref.token_jeffreys(x, anc, beta=beta, temperature=temperature, ignore_mask=mask),
    ):
        x = pol.clone().requires_grad_(True)
        div = fn(x)
        (gx,) = _grads(div, [x], up)
        outs.append((div.detach(), gx))
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            _assert_same(a, b, exact=True)
    assert (outs[0][0][mask] == 0).all() and (outs[0][1][mask] == 0).all()


# ----------------------------------------------------------------------------------------------------
# BondLoss / JBondLoss
# ----------------------------------------------------------------------------------------------------
def _bond_inputs(dtype, seed=3, b=4, m=3, k=7, j=2):
    g = _gen(seed)
    return dict(
        policy_logp=(-4 * torch.rand(b, m, generator=g)).to(dtype),
        policy_ref_logp=(-4 * torch.rand(b, m, generator=g)).to(dtype),
        policy_rewards=torch.randint(0, 4, (b, m), generator=g).to(dtype),
        ref_rewards=torch.randint(0, 4, (b, k), generator=g).to(dtype),
        bon_logp=(-4 * torch.rand(b, j, generator=g)).to(dtype),
    )


BOND_FIELDS = (
    "loss",
    "backward_kl",
    "forward_ce",
    "mean_quantile",
    "kl_to_ref",
    "p_le",
    "bon_logp_target",
    "policy_coef",
    "bon_coef",
)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "opts",
    [
        dict(n=4),
        dict(n=2, beta=0.3, baseline="mean", smoothing=0.1, correction=True),
        dict(n=3.5, baseline="none", smoothing="none"),
    ],
    ids=["default", "mean-eps-correction", "none"],
)
@pytest.mark.parametrize("masked", [False, True])
def test_bond_loss_module_functional_reference(dtype, opts, masked):
    inp = _bond_inputs(dtype)
    mask = None
    if masked:
        mask = torch.rand(4, 7, generator=_gen(4)) < 0.7
        mask[:, 0] = True
    opts = dict(opts)
    n = opts.pop("n")
    mod = bk.BondLoss(n, **opts)
    assert f"n={n}" in repr(mod)
    up = torch.randn((), generator=_gen(5), dtype=dtype)
    results = []
    for fn in (
        lambda a: mod(*a, ref_mask=mask),
        lambda a: bk.bond_loss(*a, n=n, ref_mask=mask, **opts),
        lambda a: ref.bond_loss(*a, n=n, ref_mask=mask, **opts),
    ):
        args = [t.clone() for t in inp.values()]
        args[0].requires_grad_(True)
        args[4].requires_grad_(True)
        out = fn(args)
        gp, gb = _grads(out.loss, [args[0], args[4]], up)
        results.append((out, gp, gb))
    # Module and functional take the same path: bitwise equal.  The reference is the spec: equal in fp64 (the
    # functional runs it), and within fp32 rounding when fp32 inputs go through a compiled sequence-level op.
    for i, (out, gp, gb) in enumerate(results[1:], start=1):
        exact = i == 1 or dtype == torch.float64
        for field in BOND_FIELDS:
            _assert_same(
                getattr(results[0][0], field).to(torch.float64), getattr(out, field).to(torch.float64), exact
            )
        _assert_same(results[0][1], gp, exact)
        _assert_same(results[0][2], gb, exact)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "opts", [dict(), dict(beta=0.25, gamma=1.5, penalty=2.0, strict=False)], ids=["default", "custom"]
)
def test_jbond_loss_module_functional_reference(dtype, opts):
    g = _gen(6)
    b = 9
    inp = [
        (-4 * torch.rand(b, generator=g)).to(dtype),
        (-4 * torch.rand(b, generator=g)).to(dtype),
        torch.randint(0, 3, (b,), generator=g).to(dtype),
        torch.randint(0, 3, (b, 2), generator=g).to(dtype),
        (-4 * torch.rand(b, generator=g)).to(dtype),
    ]
    mod = bk.JBondLoss(**opts)
    assert "penalty=" in repr(mod)
    up = torch.randn((), generator=g, dtype=dtype)
    results = []
    for fn in (lambda a: mod(*a), lambda a: bk.jbond_loss(*a, **opts), lambda a: ref.jbond_loss(*a, **opts)):
        args = [t.clone() for t in inp]
        args[0].requires_grad_(True)
        args[4].requires_grad_(True)
        out = fn(args)
        gp, gb = _grads(out.loss, [args[0], args[4]], up)
        results.append((out, gp, gb))
    fields = (
        "loss",
        "reward_mean",
        "penalised_frac",
        "kl_to_anchor",
        "forward_ce",
        "jbond_reward",
        "policy_coef",
        "best_coef",
    )
    for i, (out, gp, gb) in enumerate(results[1:], start=1):
        exact = i == 1 or dtype == torch.float64
        for field in fields:
            _assert_same(
                getattr(results[0][0], field).to(torch.float64), getattr(out, field).to(torch.float64), exact
            )
        _assert_same(results[0][1], gp, exact)
        _assert_same(results[0][2], gb, exact)


# ----------------------------------------------------------------------------------------------------
# EMAAnchor
# ----------------------------------------------------------------------------------------------------
def _net(seed, hidden=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _train_a_little(net, seed):
    """Change parameters and BatchNorm buffers (running stats, the int64 num_batches_tracked)."""
    g = _gen(seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(3):
        loss = net(torch.randn(8, 5, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _state(module):
    out = dict(module.named_parameters())
    out.update(dict(module.named_buffers()))
    return out


@pytest.mark.parametrize("eta", [0.02, 0.5, 1.0, 0.0])
def test_ema_anchor_equals_reference_loop(eta):
    policy = _net(0)
    anchor_fused = copy.deepcopy(policy)
    anchor_loop = copy.deepcopy(policy)
    _train_a_little(policy, 1)
    ema = bk.EMAAnchor(anchor_fused, eta=eta)
    assert all(not p.requires_grad for p in anchor_fused.parameters())
    before = {k: v.detach().clone() for k, v in _state(anchor_fused).items()}
    for step in range(3):
        returned = ema.update(policy)
        assert returned is anchor_fused
        names = list(_state(anchor_loop))
        ref.ema_update([_state(anchor_loop)[k] for k in names], [_state(policy)[k] for k in names], eta)
        at_update = {k: v.detach().clone() for k, v in _state(policy).items()}
        _train_a_little(policy, 10 + step)
    fused, loop = _state(anchor_fused), _state(anchor_loop)
    assert fused.keys() == loop.keys()
    for name in fused:
        a, b = fused[name].detach(), loop[name].detach()
        assert a.dtype == b.dtype
        if a.is_floating_point():
            # lerp (a + eta (p - a)) and the loop's (1 - eta) a + eta p differ by rounding only.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            if eta == 0.0:
                assert torch.equal(a, before[name])
        else:
            assert torch.equal(a, b)  # integer buffers are copied, whatever eta
    # 3 training steps before each of the 3 updates: the anchor holds the count seen at the last update.
    assert fused["1.num_batches_tracked"].item() == at_update["1.num_batches_tracked"].item() == 9
    assert eta == 0.0 or not torch.equal(fused["1.running_mean"], before["1.running_mean"])
    if eta == 1.0:  # a hard update copies the policy as it was at the last update
        for name, value in at_update.items():
            torch.testing.assert_close(fused[name].detach(), value, rtol=0, atol=0)


def test_ema_anchor_one_foreach_call_per_device_dtype_group(monkeypatch):
    """One torch._foreach_lerp_ per (device, dtype) group, never one kernel per tensor."""
    policy = _net(2)
    policy.append(nn.Linear(3, 2).double())  # a second dtype group: fp64 weight and bias
    anchor = copy.deepcopy(policy)
    # Move parameters and buffers directly (a forward pass would feed fp32 activations to the fp64 layer).
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(3), dtype=p.dtype))
        for buf in policy.buffers():
            if buf.is_floating_point():
                buf.add_(1.0)
            else:
                buf.add_(5)
    calls = []
    real = torch._foreach_lerp_

    def counting(tensors, others, weight):
        calls.append((len(tensors), tensors[0].dtype))
        return real(tensors, others, weight)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    monkeypatch.setattr(torch.Tensor, "lerp_", lambda *a, **k: pytest.fail("per-tensor lerp_ used"))
    bk.EMAAnchor(anchor, eta=0.1).update(policy)
    n_fp32 = sum(1 for t in _state(policy).values() if t.dtype == torch.float32)
    n_fp64 = sum(1 for t in _state(policy).values() if t.dtype == torch.float64)
    assert sorted(calls, key=str) == sorted([(n_fp32, torch.float32), (n_fp64, torch.float64)], key=str)
    # fp32: two Linear weights and biases, BatchNorm weight, bias, running mean and var; fp64: the last Linear.
    assert n_fp32 == 8 and n_fp64 == 2
    assert anchor[1].num_batches_tracked.item() == policy[1].num_batches_tracked.item() == 5
    for name, a in _state(anchor).items():
        p = _state(policy)[name]
        if a.is_floating_point():
            assert not torch.equal(a, p)  # moved 10% of the way, not copied


def test_ema_anchor_rejects_a_different_architecture():
    anchor = _net(0)
    ema = bk.EMAAnchor(anchor, eta=0.1)
    wider = _net(0, hidden=7)
    with pytest.raises(ValueError, match=r"policy_module"):
        ema.update(wider)
    deeper = _net(0)
    deeper.append(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"policy_module"):
        ema.update(deeper)
    with pytest.raises(ValueError, match=r"policy_module"):
        ema.update(nn.Linear(5, 3))
    # Nothing was half-updated by the failed calls.
    assert torch.equal(anchor[0].weight, _net(0)[0].weight)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.BatchNorm1d(3))


def test_ema_anchor_checks_everything_before_moving_anything():
    """A shape mismatch late in the module list used to leave earlier tensors already updated."""
    anchor, policy = _bn_net(), _bn_net()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    policy[1].num_batches_tracked.fill_(9)
    policy[3].running_mean = torch.zeros(7)  # the last buffer: wrong shape
    before = copy.deepcopy(anchor.state_dict())
    ema = bk.EMAAnchor(anchor, eta=0.5)
    with pytest.raises(ValueError, match=r"policy_module.3.running_mean has shape \(7,\)"):
        ema.update(policy)
    after = anchor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ema_anchor_unwraps_torch_compile_and_takes_numeric_eta():
    import numpy as np

    anchor, policy = _bn_net(), _bn_net()
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_()
    want = copy.deepcopy(anchor)
    bk.EMAAnchor(want, eta=0.25).update(policy)
    for eta in (np.float32(0.25), torch.tensor(0.25)):
        got = copy.deepcopy(anchor)
        bk.EMAAnchor(torch.compile(got), eta=eta).update(torch.compile(policy))
        for (name, a), b in zip(got.state_dict().items(), want.state_dict().values()):
            assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="eta must be a number in"):
        bk.EMAAnchor(anchor, eta=torch.tensor([0.1, 0.2]))


def test_ema_anchor_policy_on_another_device():
    """An anchor kept elsewhere (here: the policy on meta has no values) gets a named error; a policy in
    another dtype or on the same device is averaged after a copy."""
    anchor = _bn_net()
    policy = copy.deepcopy(anchor).to("meta")
    with pytest.raises(ValueError, match=r"policy_module.0.weight is on the meta device"):
        bk.EMAAnchor(anchor, eta=0.5).update(policy)
    policy64 = copy.deepcopy(anchor).double()
    with torch.no_grad():
        for p in policy64.parameters():
            p.normal_()
    a = copy.deepcopy(anchor)
    bk.EMAAnchor(a, eta=0.5).update(policy64)
    want = (anchor[0].weight.double() + policy64[0].weight) / 2
    torch.testing.assert_close(a[0].weight, want.float())
