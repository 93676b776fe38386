"""J-BOND in verl 0.9.1's extension points (issue 19, item 3): ``jbond_advantages`` on verl's own ``DataProto``
and the ``"jbond"`` policy loss taken from verl's own registry, against ``bond_kernels.reference.jbond_loss``
on fresh random batches (values and the gradient with respect to the per-token log-probs)."""

import numpy as np
import pytest
import torch
from test_integrations_trl_verl import _peer

import bond_kernels.integrations.verl as bk_verl
import bond_kernels.reference as ref


@pytest.fixture(scope="module")
def verl():
    _peer("verl.trainer.ppo.core_algos")
    return _peer("verl")


def _batch(verl, b, t, seed, ties=False):
    """A shuffled batch of 3 rows per prompt (roles 0, 1, 2 in random order), masks of random lengths."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * b
    order = torch.randperm(n, generator=g)
    uid = np.array([f"p{int(i) // 3}" for i in order], dtype=object)
    role = torch.tensor([int(i) % 3 for i in order])
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    scores = torch.randint(0, 3, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    rewards = torch.zeros(n, t)
    rewards[torch.arange(n), lengths - 1] = scores  # verl: the sequence reward at the last response token
    data = verl.DataProto.from_dict(
        tensors={
            "token_level_rewards": rewards,
            "old_log_probs": -torch.rand(n, t, generator=g) * 3 * mask,
            "ref_log_prob": -torch.rand(n, t, generator=g) * 3 * mask,
            "response_mask": mask,
            "jbond_role": role,
        },
        non_tensors={"uid": uid},
    )
    return data


def _expected(data, log_prob, beta, gamma, strict):
    """The reference loss from the batch's rows, with ``log_prob`` (requires grad) as the policy's log-probs."""
    mask = data.batch["response_mask"].float()
    role, uid = data.batch["jbond_role"], data.non_tensor_batch["uid"]
    prompts = sorted(set(uid.tolist()))
    row = {(u, int(r)): i for i, (u, r) in enumerate(zip(uid.tolist(), role.tolist()))}
    seq = (log_prob * mask).sum(-1)
    anchor = (data.batch["ref_log_prob"] * mask).sum(-1)
    reward = data.batch["token_level_rewards"].sum(-1)
    p = torch.tensor([row[(u, 0)] for u in prompts])
    a = torch.tensor([[row[(u, 1)], row[(u, 2)]] for u in prompts])
    best = torch.where(reward[a[:, 1]] > reward[a[:, 0]], a[:, 1], a[:, 0])
    return ref.jbond_loss(
        seq[p], anchor[p], reward[p], reward[a], seq[best], beta=beta, gamma=gamma, strict=strict
    )


@pytest.mark.parametrize(
    "beta,gamma,strict,ties", [(0.5, 0.0, True, False), (0.3, 1.5, False, True), (1.0, 0.5, True, True)]
)
def test_jbond_advantages_and_loss_match_reference(verl, beta, gamma, strict, ties):
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    assert bk_verl.register_jbond_loss() == "jbond"
    loss_fn = get_policy_loss_fn("jbond")
    data = _batch(verl, 5, 7, seed=11 + int(10 * beta), ties=ties)
    bk_verl.jbond_advantages(data, beta=beta, gamma=gamma, strict=strict)
    old = data.batch["old_log_probs"]
    mine = old.clone().requires_grad_(True)
    loss, metrics = loss_fn(
        old,
        mine,
        data.batch["advantages"],
        data.batch["response_mask"],
        "seq-mean-token-sum",
        OmegaConf.create({"global_batch_info": {}}),
        None,
    )
    theirs = old.clone().requires_grad_(True)
    want = _expected(data, theirs, beta, gamma, strict)
    torch.testing.assert_close(loss, want.loss.float(), rtol=1e-5, atol=1e-6)
    upstream = torch.randn(())
    (g1,) = torch.autograd.grad(loss * upstream, mine)
    (g2,) = torch.autograd.grad(want.loss * upstream, theirs)
    assert g2.abs().max() > 0
    torch.testing.assert_close(g1, g2.float(), rtol=1e-5, atol=1e-6)
    for k in ("reward_mean", "penalised_frac", "kl_to_anchor", "forward_ce"):
        assert data.meta_info["jbond"][k] == pytest.approx(float(getattr(want, k)), rel=1e-5, abs=1e-6)


def test_bad_input(verl):
    data = _batch(verl, 2, 4, seed=1)
    data.batch["jbond_role"][:] = 0
    with pytest.raises(ValueError, match="jbond_role"):
        bk_verl.jbond_advantages(data)
    data = _batch(verl, 2, 4, seed=1)
    data.batch.pop("ref_log_prob")
    with pytest.raises(ValueError, match="ref_log_prob"):
        bk_verl.jbond_advantages(data)
    data = _batch(verl, 2, 4, seed=1)
    with pytest.raises(ValueError, match="beta"):
        bk_verl.jbond_advantages(data, beta=1.5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        bk_verl.jbond_policy_loss(x, x, x, x, "token-mean", None)
