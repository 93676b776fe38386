"""Custom op for the batched reward-rank quantiles (no gradient: rewards are data).

Launcher contract: ``reward_quantiles(rewards, ref_rewards, ref_mask, mode, eps)``
    rewards (B, n) float, ref_rewards (B, k) float (both contiguous, same dtype), ref_mask (B, k) bool or
    (0,) for none; mode a ``_validate.Smoothing`` (0 = "none", 1 = "self", 2 = clamp p_le to at least ``eps``).  Returns
    ``(p_le, p_lt)`` fp32 (B, n), as ``reference.reward_quantiles`` defines them.
"""

import torch

from .. import _backend


@torch.library.custom_op("bond_kernels::reward_quantiles", mutates_args=())
def reward_quantiles(
    rewards: torch.Tensor,
    ref_rewards: torch.Tensor,
    ref_mask: torch.Tensor,
    mode: int,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    p_le, p_lt = _backend.impl("reward_quantiles", backend).reward_quantiles(
        rewards, ref_rewards, ref_mask, mode, eps
    )
    return p_le, p_lt


@reward_quantiles.register_fake
def _(rewards, ref_rewards, ref_mask, mode, eps, backend):
    return (
        rewards.new_empty(rewards.shape, dtype=torch.float32),
        rewards.new_empty(rewards.shape, dtype=torch.float32),
    )
