"""Reference Monte-Carlo reward-rank quantiles (docs/math.md §5)."""

import torch

from ._common import compute_dtype, reward_compare_dtype


def reward_quantiles(rewards, ref_rewards, *, ref_mask=None, smoothing="none"):
    """Empirical quantiles of each candidate's reward among the reference rewards of the same prompt.

    rewards: (B, n) candidates; ref_rewards: (B, k) reference samples; ref_mask: (B, k) bool or None
    (True = valid sample; a row's k is its count of valid samples).  Returns ``(p_le, p_lt)``, each (B, n)::

        c_le = Σ_j mask_j · 1[r'_j <= r]        c_lt = Σ_j mask_j · 1[r'_j < r]
        "none":  p_le = c_le / k,            p_lt = c_lt / k
        "self":  p_le = (c_le + 1) / (k + 1), p_lt = c_lt / (k + 1)   (the candidate ties with itself)
        float ε: p_le = max(c_le / k, ε),    p_lt = c_lt / k

    fp32 results (fp64 for fp64 inputs).  ``±inf`` rewards are ordered as usual; NaN is rejected upstream.
    The comparisons are exact: integer rewards are compared as fp64 (exact below 2^53), not rounded to fp32.
    """
    dtype = compute_dtype(rewards, ref_rewards)  # of the results
    exact = reward_compare_dtype(rewards, ref_rewards)
    r = rewards.to(exact).unsqueeze(-1)
    ref = ref_rewards.to(exact).unsqueeze(-2)
    valid = torch.ones_like(ref, dtype=torch.bool) if ref_mask is None else ref_mask.bool().unsqueeze(-2)
    c_le = ((ref <= r) & valid).sum(-1).to(dtype)
    c_lt = ((ref < r) & valid).sum(-1).to(dtype)
    k = valid.sum(-1).to(dtype)
    if smoothing == "self":
        return (c_le + 1) / (k + 1), c_lt / (k + 1)
    p_le, p_lt = c_le / k, c_lt / k
    if smoothing == "none" or smoothing is None:
        return p_le, p_lt
    return p_le.clamp_min(float(smoothing)), p_lt
