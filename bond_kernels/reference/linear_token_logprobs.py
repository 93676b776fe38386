"""Reference fused linear head + per-token log-probs: the logits materialised, then ``token_logprobs``."""

import torch

from ._common import compute_dtype
from .token_logprobs import token_logprobs


def linear_token_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
):
    """``token_logprobs(hidden·weightᵀ + bias, labels)`` computed in fp32 (fp64 for fp64), logits materialised.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...) -> logp (...) [, entropy (...)]::

        x = hidden · weightᵀ + bias                      (..., V)
        z = softcap·tanh(x / softcap) / temperature
        logp[i] = z[i, y_i] − logsumexp_v z[i, v]        entropy[i] = logsumexp_v z[i, v] − Σ_v p[i, v]·z[i, v]

    The fused op (``ops/linear_token_logprobs.py``) computes the same without holding the (N, V) logits.
    """
    dt = compute_dtype(hidden, weight)
    x = torch.nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return token_logprobs(
        x,
        labels,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
    )
