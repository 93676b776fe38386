"""Reference EMA anchor update (docs/math.md §8, "EMA anchor")."""

import torch


@torch.no_grad()
def ema_update(anchor_tensors, policy_tensors, eta):
    """θ_anchor ← (1 − η)·θ_anchor + η·θ_policy, one tensor at a time (the slow, obvious loop)."""
    for a, p in zip(anchor_tensors, policy_tensors):
        if a.is_floating_point():
            a.mul_(1.0 - eta).add_(p.to(a.dtype), alpha=eta)
        else:
            a.copy_(p)
