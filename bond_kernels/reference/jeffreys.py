"""Reference token-level Jeffreys divergence between two full-vocabulary distributions."""

import torch

from ._common import compute_dtype, shifted_logits


def _xlogy_diff(p, logp, logq):
    """Σ_v p·(log p − log q), with 0·(anything) = 0 where p = 0 (masked -inf entries)."""
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    diff = torch.where(p > 0, logp - logq, zero)
    return (p * diff).sum(-1)


def token_jeffreys(policy_logits, anchor_logits, *, beta=0.5, temperature=1.0, ignore_mask=None):
    """Per-row ``β·KL(p‖q) + (1−β)·KL(q‖p)`` with ``p = softmax(policy/T)``, ``q = softmax(anchor/T)``.

    policy_logits, anchor_logits: (..., V) float; ignore_mask: (...) bool or None (True rows give 0 and
    zero gradient).  Returns (...) fp32 (fp64 for fp64 inputs); differentiable wrt ``policy_logits``::

        ∂/∂z_v = [β·p_v·(log p_v − log q_v − KL(p‖q)) + (1−β)·(p_v − q_v)] / T
    """
    dtype = compute_dtype(policy_logits, anchor_logits)
    z, a = policy_logits.to(dtype), anchor_logits.to(dtype)
    if ignore_mask is not None:
        keep = ~ignore_mask.bool()
        zero = torch.zeros((), dtype=dtype, device=z.device)
        z = torch.where(keep.unsqueeze(-1), z, zero)
        a = torch.where(keep.unsqueeze(-1), a, zero)
    # shifted by the row maxima before dividing by T: no rounding of |x|/T (README, "Odd inputs")
    z = shifted_logits(z, temperature, None)
    a = shifted_logits(a, temperature, None)
    logp = torch.log_softmax(z, -1)
    logq = torch.log_softmax(a, -1)
    p, q = logp.exp(), logq.exp()
    # A weight of 0 drops its term (0·KL is 0 even where that KL is infinite, a model putting mass where the
    # other has none: β = 0 is KL(q‖p) alone, not NaN).
    div = torch.zeros(z.shape[:-1], dtype=dtype, device=z.device)
    if beta > 0:
        div = div + beta * _xlogy_diff(p, logp, logq)
    if beta < 1:
        div = div + (1.0 - beta) * _xlogy_diff(q, logq, logp)
    if ignore_mask is not None:
        div = torch.where(keep, div, torch.zeros((), dtype=dtype, device=div.device))
    return div
