"""Reference per-token and per-sequence log-probabilities of sampled tokens."""

import torch

from ._common import compute_dtype, shifted_logits


def token_logprobs(logits, labels, *, temperature=1.0, softcap=None, ignore_index=-100, return_entropy=False):
    """Log-probability of each label under ``softmax(z)``, with ``z = softcap·tanh(x/softcap) / temperature``.

    logits: (..., V) float; labels: (...) integer.  Returns ``logp`` (...) fp32 (fp64 for fp64 logits)::

        logp[i]    = z[i, y_i] − logsumexp_v z[i, v]
        entropy[i] = −Σ_v p[i, v] · log p[i, v]        with p = softmax(z[i])

    Positions whose label equals ``ignore_index`` give 0 for both and receive zero gradient.  ``-inf``
    logits (a masked vocabulary) are allowed; they contribute nothing to the entropy.
    """
    dtype = compute_dtype(logits)
    keep = labels != ignore_index
    # Zero the ignored rows first: an all -inf ignored row must not leak NaN into the gradient.
    x = torch.where(keep.unsqueeze(-1), logits.to(dtype), torch.zeros((), dtype=dtype, device=logits.device))
    # z − max z (every output is shift-invariant): no rounding of |z| = |x|/T at small temperatures.
    z = shifted_logits(x, temperature, softcap)
    lse = torch.logsumexp(z, dim=-1)
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    target = z.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, target - lse, torch.zeros((), dtype=dtype, device=logits.device))
    if not return_entropy:
        return logp
    p = torch.softmax(z, dim=-1)
    # Σ p·z over the entries with p > 0: where p underflows (or z is -inf) p·z is 0, and leaving z there
    # would make the backward's z·grad overflow (|z| ~ 1e38 at tiny T) and 0·inf turn the row NaN.
    z_live = torch.where(p > 0, z, torch.zeros((), dtype=dtype, device=z.device))
    entropy = lse - (p * z_live).sum(-1)
    entropy = torch.where(keep, entropy, torch.zeros((), dtype=dtype, device=logits.device))
    return logp, entropy


def segment_sum(values, cu_seqlens):
    """Σ over each packed segment ``values[cu[b] : cu[b+1]]`` -> (B,), in fp64, each segment on its own.

    (Differences of one fp64 prefix sum were exact only while the magnitudes were alike: a -inf log-prob (a
    masked label) made every later sequence NaN, and one of -8.5e37 absorbed the later ones to 0.)
    """
    out = torch.segment_reduce(
        values.to(torch.float64), "sum", offsets=cu_seqlens.long(), axis=0, unsafe=True
    )
    return out.to(values.dtype)


def sequence_logprobs(logits, labels, *, cu_seqlens=None, temperature=1.0, softcap=None, ignore_index=-100):
    """Per-sequence log-probability ``log π(y) = Σ_t log π(y_t | y_<t)`` over non-ignored positions.

    Padded: logits (B, T, V), labels (B, T) -> (B,).
    Packed: logits (total, V), labels (total,), cu_seqlens (B+1,) with cu[0] = 0, cu[B] = total -> (B,),
    sequence b being rows ``cu[b] : cu[b+1]``.
    """
    logp = token_logprobs(logits, labels, temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    if cu_seqlens is None:
        return logp.sum(-1)
    return segment_sum(logp, cu_seqlens)
