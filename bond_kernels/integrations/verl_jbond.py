"""J-BOND's loss in verl 0.9.1's extension points: per-row coefficients on a ``DataProto`` and a registered
policy loss.  Import as ``bond_kernels.integrations.verl.jbond_advantages`` / ``.register_jbond_loss``.

::

    import bond_kernels.integrations.verl as bk_verl
    bk_verl.register_jbond_loss()          # in every worker: actor.policy_loss.loss_mode = "jbond"
    batch = bk_verl.jbond_advantages(batch, beta=0.5, gamma=0.0)   # on the driver, after log-probs

verl has no anchor rollout and no EMA reference model, so the caller provides both (see the README):

- the batch holds **3 rows per prompt** (same ``non_tensor_batch["uid"]``) and ``batch["jbond_role"]`` says
  which is which: 0 = the policy sample, 1 and 2 = the two anchor samples (sampled by the caller with the
  anchor's weights);
- ``batch["token_level_rewards"]`` (verl's reward, summed over the response = the sequence reward),
  ``batch["old_log_probs"]`` (the actor's per-token log-probs of the rows) and ``batch["ref_log_prob"]``
  (the reference worker's, which must hold the **anchor's** weights), ``batch["response_mask"]``.

:func:`jbond_advantages` runs :func:`bond_kernels.jbond_loss` on the (B,) sequence values and writes
``batch["advantages"]`` (and ``"returns"``): per row a constant over its response tokens, ``−coef · N``
(N rows in the batch), 0 on the worse anchor sample.  The ``"jbond"`` policy loss is then
``mean_rows Σ_t (−advantage · log π_t)`` (verl's ``agg_loss`` with ``seq-mean-token-sum``), whose gradient
is ``jbond_loss``'s: ``coef`` times each row's sequence log-prob.  The leave-one-out baseline is over the
batch given, so call it on the driver's whole batch (never on one data-parallel shard).
"""

import numpy as np
import torch

from .. import objectives
from ..reference.losses import LOG16

__all__ = ["JBOND_LOSS", "jbond_advantages", "jbond_policy_loss", "register_jbond_loss"]

JBOND_LOSS = "jbond"


def _seq(t, mask):
    return (t.float() * mask).sum(-1)


def jbond_advantages(data, *, beta=0.5, gamma=0.0, penalty=LOG16, strict=True):
    """Write J-BOND's per-row coefficients into ``data.batch["advantages"]`` / ``["returns"]``; returns
    ``data`` (a ``verl.DataProto``, changed in place as verl's own ``compute_advantage`` does) and the
    :class:`bond_kernels.JBondOutput` diagnostics as ``data.meta_info["jbond"]`` (floats)."""
    for key in ("token_level_rewards", "old_log_probs", "ref_log_prob", "response_mask", "jbond_role"):
        if key not in data.batch.keys():
            raise ValueError(f"data.batch must hold {key!r} for J-BOND, got keys {sorted(data.batch.keys())}")
    if "uid" not in data.non_tensor_batch:
        raise ValueError("data.non_tensor_batch must hold 'uid' (the prompt of each row)")
    mask = data.batch["response_mask"].float()
    role = data.batch["jbond_role"].long().reshape(-1)
    uid = np.asarray(data.non_tensor_batch["uid"])
    n = role.shape[0]
    groups = {}
    for i, u in enumerate(uid.tolist()):
        groups.setdefault(u, []).append(i)
    rows = []  # (B, 3): row of the policy sample, then of anchor samples 1 and 2
    for u, idx in groups.items():
        roles = sorted(int(role[i]) for i in idx)
        if roles != [0, 1, 2]:
            raise ValueError(
                f"data.batch['jbond_role'] must give each uid one row of each role 0 (policy), 1, 2 (anchor "
                f"samples); uid {u!r} has roles {roles}"
            )
        rows.append([next(i for i in idx if int(role[i]) == r) for r in (0, 1, 2)])
    rows = torch.tensor(rows, dtype=torch.long, device=role.device)
    reward = data.batch["token_level_rewards"].float().sum(-1)
    logp = _seq(data.batch["old_log_probs"], mask)
    anchor_logp = _seq(data.batch["ref_log_prob"], mask)
    anchor_rewards = reward[rows[:, 1:]]
    second = anchor_rewards[:, 1] > anchor_rewards[:, 0]  # ties go to the first anchor sample
    best = torch.where(second, rows[:, 2], rows[:, 1])
    out = objectives.jbond_loss(
        logp[rows[:, 0]],
        anchor_logp[rows[:, 0]],
        reward[rows[:, 0]],
        anchor_rewards,
        logp[best],
        beta=beta,
        gamma=gamma,
        penalty=penalty,
        strict=strict,
    )
    coef = torch.zeros(n, dtype=torch.float32, device=role.device)
    coef[rows[:, 0]] = out.policy_coef.float()
    coef[best] = coef[best] + out.best_coef.float()
    adv = (-coef * n).unsqueeze(-1) * mask
    data.batch["advantages"] = adv
    data.batch["returns"] = adv
    data.meta_info["jbond"] = {
        k: float(getattr(out, k)) for k in ("reward_mean", "penalised_frac", "kl_to_anchor", "forward_ce")
    }
    return data


def jbond_policy_loss(
    old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="seq-mean-token-sum", config=None, *_
):
    """verl ``PolicyLossFn``: ``agg_loss(−advantages · log_prob, "seq-mean-token-sum")``; with the advantages
    of :func:`jbond_advantages` its gradient is J-BOND's.  ``loss_agg_mode`` must be ``seq-mean-token-sum``
    (J-BOND weighs whole-sequence log-probs)."""
    from verl.trainer.ppo.core_algos import agg_loss

    if loss_agg_mode != "seq-mean-token-sum":
        raise ValueError(f"loss_agg_mode must be 'seq-mean-token-sum' for J-BOND, got {loss_agg_mode!r}")
    info = {}
    if config is not None:
        info = dict(getattr(config, "global_batch_info", None) or {})
    loss = agg_loss(
        loss_mat=-advantages.detach() * log_prob,
        loss_mask=response_mask,
        loss_agg_mode=loss_agg_mode,
        **info,
    )
    return loss, {"actor/jbond_kl_to_old": ((old_log_prob - log_prob.detach()) * response_mask).sum().item()}


def register_jbond_loss():
    """Register :func:`jbond_policy_loss` as verl's policy loss ``"jbond"`` (``actor.policy_loss.loss_mode``);
    idempotent; returns the name.  Run it in every process that builds an actor."""
    from verl.trainer.ppo.core_algos import register_policy_loss

    register_policy_loss(JBOND_LOSS)(jbond_policy_loss)
    return JBOND_LOSS
