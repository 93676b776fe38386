"""The demo's evaluation: reward quantiles against π_ref samples, Best-of-N of π_ref, the sampled
``KL(π‖π_ref)`` of a policy, and the exact Best-of-N curve."""

import math

import torch

import bond_kernels as bk

from .model import sample, seq_logp

# Best-of-N sizes measured against the reference in the final table (the issue asks for 2, 4, 8).
BON_SIZES = (2, 4, 8)
# The exact Best-of-N curve is drawn for N = 1..64.
BON_CURVE_MAX = 64


def mid_quantile(rewards, ref_rewards):
    """``(p_le + p_lt) / 2`` of each candidate (B, n) among the reference rewards (B, k) of its prompt."""
    p_le, p_lt = bk.reward_quantiles(rewards, ref_rewards, smoothing="none")
    return 0.5 * (p_le + p_lt)


class Evaluator:
    """Fixed held-out prompts with ``k`` reference samples each (for quantiles) and ``bon_pool`` more
    reference samples each (for Best-of-N); π_ref is frozen, so these are drawn once."""

    def __init__(self, reference, grammar, prompts, *, k, bon_pool, length, backend):
        self.reference, self.grammar, self.prompts = reference, grammar, prompts
        self.length, self.backend = length, backend
        b, p = prompts.shape
        self.prompt_len = p
        ref = sample(reference, prompts.repeat_interleave(k + bon_pool, 0), length)
        rewards = grammar.reward(ref[:, p:]).view(b, k + bon_pool)
        self.ref_rewards = rewards[:, :k].contiguous()
        self.pool_rewards = rewards[:, k:].contiguous()

    def best_of(self, n):
        """Mean reward and mean quantile of Best-of-n of π_ref (groups of the pool; ties to the earliest)."""
        idx = bk.best_of_n_indices(self.pool_rewards, n)
        winners = self.pool_rewards.gather(1, idx)
        q = mid_quantile(winners, self.ref_rewards)
        return float(winners.mean()), float(q.mean()), int(winners.numel())

    @torch.no_grad()
    def policy(self, model, samples):
        """Mean reward, mean quantile and sampled KL(π‖π_ref) of ``samples`` policy draws per prompt."""
        b = self.prompts.shape[0]
        y = sample(model, self.prompts.repeat_interleave(samples, 0), self.length)
        rewards = self.grammar.reward(y[:, self.prompt_len :]).view(b, samples)
        q = mid_quantile(rewards, self.ref_rewards)
        lp = seq_logp(model, y, self.prompt_len, backend=self.backend)
        lp_ref = seq_logp(self.reference, y, self.prompt_len, backend=self.backend)
        kl = lp - lp_ref
        return {
            "reward": float(rewards.mean()),
            "quantile": float(q.mean()),
            "kl_to_ref": float(kl.mean()),
            # one sample has no spread: NaN (null in the JSON) without torch's degrees-of-freedom warning
            "kl_to_ref_stderr": float(kl.std() / math.sqrt(kl.numel())) if kl.numel() > 1 else float("nan"),
            "samples": int(rewards.numel()),
        }


def bon_curve(max_n=BON_CURVE_MAX):
    """Exact Best-of-N points for continuous rewards: (KL = log N − (N−1)/N, E[quantile] = N/(N+1))."""
    return [(math.log(n) - (n - 1) / n, n / (n + 1)) for n in range(1, max_n + 1)]
