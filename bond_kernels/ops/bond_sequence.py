"""Custom ops for the sequence-level BOND / J-BOND math: one kernel launch from rewards to loss coefficients.

Nothing here is differentiated: the ops take detached values and return, besides the diagnostics, the
per-sequence coefficients ``∂L/∂log π(y)``.  ``functional.bond_loss`` / ``jbond_loss`` then build
``loss = Σ policy_coef·policy_logp + Σ bon_coef·bon_logp`` from the differentiable log-probs, so the
gradient reaches the token gradients through ``sequence_logprobs``' backward as one number per sequence.
The math is :func:`bond_kernels.reference.bond_loss` / :func:`~bond_kernels.reference.jbond_loss`.

Launcher contract (``_backend.impl("bond_sequence", backend).<name>``; backends ``cpu`` and ``cuda``):

``bond_sequence(policy_logp, policy_ref_logp, policy_rewards, ref_rewards, ref_mask, bon_logp, n, beta, mode,
eps, correction, baseline)``
    policy_logp, policy_ref_logp (B, m) fp32; policy_rewards (B, m) and ref_rewards (B, k) both fp32 or both
    fp64 (comparisons happen in that dtype, as the reference's); ref_mask (B, k) bool or (0,) for none;
    bon_logp (B, j) fp32.  ``n`` float >= 1; ``beta`` in [0, 1]; ``mode``/``eps`` the smoothing of
    ``ops/reward_quantiles.py``; ``correction`` adds the tie correction C_N; ``baseline`` a ``_validate.Baseline``: 0 = leave-one-out,
    1 = mean, 2 = none (per prompt when m > 1, else over the batch).  Returns fp32
    ``(p_le (B, m), log_bon (B, m), policy_coef (B, m), bon_coef (B, j), stats (4,))`` with
    ``stats = [backward_kl, forward_ce, mean_quantile, kl_to_ref]``::

        log_bon     = log π_ref + (N−1)·log p_le [+ C_N(log p_lt − log p_le)]
        R           = log_bon − log π;   b = baseline of R
        policy_coef = −β·(R − b) / (B·m);   bon_coef = −(1−β) / (B·j)

``jbond_sequence(policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp, beta, gamma,
penalty, strict)``
    policy_logp, anchor_logp, policy_rewards, best_anchor_logp (B,) fp32; anchor_rewards (B, 2) fp32.
    Returns fp32 ``(jbond_reward (B,), policy_coef (B,), best_coef (B,), stats (4,))`` with
    ``stats = [reward_mean, penalised_frac, kl_to_anchor, forward_ce]``::

        r_J = −penalty if r(y) < min(r(y'_1), r(y'_2)) (<= when not strict) else 0
        R   = r_J − (log π − log π_anchor);   b = leave-one-out batch mean of R
        policy_coef = (−β·(R − b) + γ·(log π − log π_anchor)) / B;   best_coef = −(1−β) / B

Per-element values are computed in fp32 with the reference's operations; batch sums are fp64, added in a
fixed order (deterministic).  No host synchronisation.
"""

import torch

from .. import _backend


@torch.library.custom_op("bond_kernels::bond_sequence", mutates_args=())
def bond_sequence(
    policy_logp: torch.Tensor,
    policy_ref_logp: torch.Tensor,
    policy_rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    ref_mask: torch.Tensor,
    bon_logp: torch.Tensor,
    n: float,
    beta: float,
    mode: int,
    eps: float,
    correction: bool,
    baseline: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p_le, log_bon, policy_coef, bon_coef, stats = _backend.impl("bond_sequence", backend).bond_sequence(
        policy_logp,
        policy_ref_logp,
        policy_rewards,
        ref_rewards,
        ref_mask,
        bon_logp,
        n,
        beta,
        mode,
        eps,
        correction,
        baseline,
    )
    return p_le, log_bon, policy_coef, bon_coef, stats


@bond_sequence.register_fake
def _(
    policy_logp,
    policy_ref_logp,
    policy_rewards,
    ref_rewards,
    ref_mask,
    bon_logp,
    n,
    beta,
    mode,
    eps,
    correction,
    baseline,
    backend,
):
    f32 = dict(dtype=torch.float32, device=policy_logp.device)
    return (
        torch.empty(policy_logp.shape, **f32),
        torch.empty(policy_logp.shape, **f32),
        torch.empty(policy_logp.shape, **f32),
        torch.empty(bon_logp.shape, **f32),
        torch.empty(4, **f32),
    )


@torch.library.custom_op("bond_kernels::jbond_sequence", mutates_args=())
def jbond_sequence(
    policy_logp: torch.Tensor,
    anchor_logp: torch.Tensor,
    policy_rewards: torch.Tensor,
    anchor_rewards: torch.Tensor,
    best_anchor_logp: torch.Tensor,
    beta: float,
    gamma: float,
    penalty: float,
    strict: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    jbond_reward, policy_coef, best_coef, stats = _backend.impl("bond_sequence", backend).jbond_sequence(
        policy_logp,
        anchor_logp,
        policy_rewards,
        anchor_rewards,
        best_anchor_logp,
        beta,
        gamma,
        penalty,
        strict,
    )
    return jbond_reward, policy_coef, best_coef, stats


@jbond_sequence.register_fake
def _(
    policy_logp,
    anchor_logp,
    policy_rewards,
    anchor_rewards,
    best_anchor_logp,
    beta,
    gamma,
    penalty,
    strict,
    backend,
):
    f32 = dict(dtype=torch.float32, device=policy_logp.device)
    b = policy_logp.shape[0]
    return torch.empty(b, **f32), torch.empty(b, **f32), torch.empty(b, **f32), torch.empty(4, **f32)
