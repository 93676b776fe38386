"""Reference BOND and J-BOND losses (docs/math.md §7 and §8)."""

import math
from typing import NamedTuple

import torch

from .bon import bon_log_prob
from .quantiles import reward_quantiles

# The J-BOND penalty: E[r_J] = −log 16·(1 − p_le)² equals log p_le at the median p_le = 1/2 (docs/math.md §8).
LOG16 = math.log(16)


class BondOutput(NamedTuple):
    """``bond_loss`` result.  Scalars are 0-dim fp32 tensors; per-sample tensors are detached."""

    loss: torch.Tensor  # scalar surrogate whose gradient is the BOND estimator
    backward_kl: torch.Tensor  # mean(log π − log π_BoN) over policy samples
    forward_ce: torch.Tensor  # mean(−log π(y_BoN)) over Best-of-N samples
    mean_quantile: torch.Tensor  # mean estimated p_le of the policy samples
    kl_to_ref: torch.Tensor  # mean(log π − log π_ref) over policy samples
    p_le: torch.Tensor  # (B, m)
    bon_logp_target: torch.Tensor  # (B, m) log π_BoN(y) of the policy samples
    policy_coef: torch.Tensor  # (B, m) d loss / d policy_logp
    bon_coef: torch.Tensor  # (B, j) d loss / d bon_logp


class JBondOutput(NamedTuple):
    """``jbond_loss`` result.  Scalars are 0-dim fp32 tensors; per-sample tensors are detached."""

    loss: torch.Tensor
    reward_mean: torch.Tensor  # mean J-BOND reward r_J
    penalised_frac: torch.Tensor  # fraction of policy samples with r_J = −penalty
    kl_to_anchor: torch.Tensor  # mean(log π − log π_anchor) over policy samples
    forward_ce: torch.Tensor  # mean(−log π(y'_best))
    jbond_reward: torch.Tensor  # (B,) r_J per prompt
    policy_coef: torch.Tensor  # (B,) d loss / d policy_logp
    best_coef: torch.Tensor  # (B,) d loss / d best_anchor_logp


def leave_one_out_mean(values, dim):
    """Mean of the *other* entries along ``dim`` (0 when there is no other entry)."""
    count = values.shape[dim]
    if count < 2:
        return torch.zeros_like(values)
    return (values.sum(dim, keepdim=True) - values) / (count - 1)


def _baseline(returns, baseline):
    """Baseline for the returns (B, m): per prompt when m > 1, else over the batch."""
    if isinstance(baseline, torch.Tensor):
        # A constant for autograd (docs/math.md §7): a baseline from a value head must not be trained
        # through the policy loss.
        return baseline.detach().to(returns.dtype).expand_as(returns)
    if baseline == "none":
        return torch.zeros_like(returns)
    per_prompt = returns.shape[1] > 1
    if baseline == "loo":
        if per_prompt:
            return leave_one_out_mean(returns, 1)
        return leave_one_out_mean(returns.reshape(-1), 0).reshape(returns.shape)
    if baseline == "mean":
        if per_prompt:
            return returns.mean(1, keepdim=True).expand_as(returns)
        return returns.mean().expand_as(returns)
    raise ValueError(f"baseline must be 'loo', 'mean', 'none' or a tensor, got {baseline!r}")


def bond_loss(
    policy_logp,
    policy_ref_logp,
    policy_rewards,
    ref_rewards,
    bon_logp,
    *,
    n,
    beta=0.5,
    baseline="loo",
    smoothing="self",
    correction=False,
    ref_mask=None,
):
    """BOND surrogate loss: the Jeffreys divergence ``(1−β)·KL(π_BoN‖π) + β·KL(π‖π_BoN)`` estimator.

    policy_logp (B, m) log π(y) of m policy samples per prompt, with grad; policy_ref_logp (B, m)
    log π_ref(y); policy_rewards (B, m); ref_rewards (B, k) rewards of k reference samples (quantiles);
    bon_logp (B, j) log π of j Best-of-N samples per prompt, with grad.  ::

        p_le, p_lt = reward_quantiles(policy_rewards, ref_rewards, smoothing)
        log π_BoN  = log π_ref + (N−1)·log p_le [+ C_N(log p_lt − log p_le) if correction]
        R          = stopgrad(log π_BoN − log π)              (the backward-KL return)
        b          = baseline of R (leave-one-out mean per prompt if m > 1, else over the batch)
        L = (1−β)·mean(−bon_logp) + β·mean(−(R − b)·policy_logp)

    so ``∇L = (1−β)·(−E_BoN ∇log π) + β·E_π[∇log π·(log π − log π_BoN + b)]`` (docs/math.md §7;
    ``b`` is the baseline of ``R``, so ``−b`` is the baseline of ``log π − log π_BoN``).
    """
    dtype = torch.float64 if policy_logp.dtype == torch.float64 else torch.float32
    logp = policy_logp.to(dtype)
    p_le, p_lt = reward_quantiles(policy_rewards, ref_rewards, ref_mask=ref_mask, smoothing=smoothing)
    p_le, p_lt = p_le.to(dtype), p_lt.to(dtype)
    ref_logp = policy_ref_logp.detach().to(dtype)
    if correction:
        log_bon = bon_log_prob(ref_logp, p_le, p_lt, n)
    else:
        log_bon = ref_logp + (0.0 if n == 1 else (n - 1) * torch.log(p_le))
    returns = (log_bon - logp).detach()
    advantage = returns - _baseline(returns, baseline)
    policy_coef = -beta * advantage / returns.numel()
    bon_coef = torch.full_like(bon_logp, -(1.0 - beta) / max(bon_logp.numel(), 1), dtype=dtype)
    loss = (policy_coef * logp).sum() + (bon_coef * bon_logp.to(dtype)).sum()
    return BondOutput(
        loss=loss,
        backward_kl=(-returns).mean(),
        forward_ce=(-bon_logp.detach().to(dtype)).mean(),
        mean_quantile=p_le.mean(),
        kl_to_ref=(logp.detach() - ref_logp).mean(),
        p_le=p_le,
        bon_logp_target=log_bon.detach(),
        policy_coef=policy_coef.detach(),
        bon_coef=bon_coef.detach(),
    )


def jbond_loss(
    policy_logp,
    anchor_logp,
    policy_rewards,
    anchor_rewards,
    best_anchor_logp,
    *,
    beta=0.5,
    gamma=0.0,
    penalty=LOG16,
    strict=True,
):
    """J-BOND loss (docs/math.md §8), averaged over the B prompts.

    policy_logp (B,) log π_t(y) with grad; anchor_logp (B,) log π_anchor(y), no grad; policy_rewards (B,);
    anchor_rewards (B, 2); best_anchor_logp (B,) log π_t(y'_best) with grad.  ::

        r_J = −penalty  if r(y) < min(r(y'_1), r(y'_2))   (``<=`` when strict=False),  else 0
        R   = stopgrad(r_J − (log π_t(y) − log π_anchor(y)));   b = leave-one-out batch mean of R
        L   = mean[(1−β)·(−log π_t(y'_best)) − β·(R − b)·log π_t(y)
                   + γ·stopgrad(log π_t(y) − log π_anchor(y))·log π_t(y)]

    The γ term uses the KL-*decreasing* sign (its gradient lowers KL(π_t‖π_anchor)); the paper's
    Algorithm 2 prints the opposite sign, but its eq. 19 and experiments mean this one.
    """
    dtype = torch.float64 if policy_logp.dtype == torch.float64 else torch.float32
    logp = policy_logp.to(dtype)
    worst = anchor_rewards.to(dtype).min(dim=-1).values
    r = policy_rewards.to(dtype)
    bad = r < worst if strict else r <= worst
    r_j = torch.where(bad, torch.full_like(r, -penalty), torch.zeros_like(r))
    log_ratio = (logp - anchor_logp.to(dtype)).detach()
    returns = r_j - log_ratio
    advantage = returns - leave_one_out_mean(returns, 0)
    b = logp.shape[0]
    policy_coef = (-beta * advantage + gamma * log_ratio) / b
    best_coef = torch.full_like(logp, -(1.0 - beta) / b)
    loss = (policy_coef * logp).sum() + (best_coef * best_anchor_logp.to(dtype)).sum()
    return JBondOutput(
        loss=loss,
        reward_mean=r_j.mean(),
        penalised_frac=bad.to(dtype).mean(),
        kl_to_anchor=log_ratio.mean(),
        forward_ce=(-best_anchor_logp.detach().to(dtype)).mean(),
        jbond_reward=r_j,
        policy_coef=policy_coef.detach(),
        best_coef=best_coef.detach(),
    )
