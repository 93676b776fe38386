"""The demo's synthetic language and its programmatic reward (``bond_kernels.demo`` describes the run)."""

import torch


class Grammar:
    """A sparse random Markov chain over tokens ``1 .. vocab-1``; token 0 is BOS and never follows anything.

    Each content token moves to ``fanout`` random successors with Dirichlet(1) weights; a ``smooth`` share of
    the mass is spread uniformly over all content tokens so that every continuation stays possible.  The
    target token is the content token whose stationary frequency is closest to ``target_freq``.
    """

    bos = 0

    def __init__(self, vocab, seed, *, fanout=4, smooth=0.05, target_freq=0.04):
        if vocab < 8:
            raise ValueError(f"vocab must be >= 8 for the demo's language, got {vocab}")
        self.vocab = vocab
        g = torch.Generator().manual_seed(seed)
        n = vocab - 1
        trans = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            succ = torch.randperm(n, generator=g)[:fanout]
            weights = -torch.log(torch.rand(fanout, generator=g, dtype=torch.float64))  # Dirichlet(1)
            trans[i, succ] = weights / weights.sum()
        trans = (1.0 - smooth) * trans + smooth / n
        # Stationary distribution: the chain is irreducible and aperiodic thanks to the uniform share,
        # so 200 power iterations converge far below fp64 needs for picking a target.
        pi = torch.full((n,), 1.0 / n, dtype=torch.float64)
        for _ in range(200):
            pi = pi @ trans
        self.transition = trans.float()
        self.start = pi.float()
        self.target = int((pi - target_freq).abs().argmin()) + 1
        self.target_freq = float(pi[self.target - 1])
        # Tie-breaking weights per token; the target's own weight does not matter (it scores 1 anyway).
        self.weights = torch.rand(vocab, generator=g)
        # Entropy rate of the chain in nats per token (what a perfect reference would reach).
        logt = torch.log(trans)
        self.entropy_rate = float(-(pi.unsqueeze(1) * trans * logt).sum())

    def sample(self, count, length, generator):
        """``count`` sequences ``[BOS, x_1, .., x_{length-1}]`` of the chain, int64 (count, length), on CPU."""
        out = torch.empty(count, length, dtype=torch.int64)
        out[:, 0] = self.bos
        state = torch.multinomial(self.start.expand(count, -1), 1, generator=generator).squeeze(1)
        out[:, 1] = state + 1
        for t in range(2, length):
            state = torch.multinomial(self.transition[state], 1, generator=generator).squeeze(1)
            out[:, t] = state + 1
        return out

    def reward(self, responses):
        """``r(y) = #target + 0.1 · mean_t w[y_t]`` for responses (..., R) int64 -> (...) fp32."""
        w = self.weights.to(responses.device)
        hits = (responses == self.target).sum(-1).float()
        return hits + 0.1 * w[responses].mean(-1)
