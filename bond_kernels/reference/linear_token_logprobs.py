"""Reference fused linear head + per-token log-probs: the logits materialised, then ``token_logprobs``."""

import torch

from ._common import compute_dtype, transform_logits
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


# The extra per-token statistics of the fused head (``linear_token_logprobs(..., extras=...)``), by name.
EXTRAS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def linear_token_extras(
    hidden, weight, labels, extras, *, bias=None, temperature=1.0, softcap=None, ignore_index=-100
):
    """The extra statistics ``extras`` (names from :data:`EXTRAS`) of each row's ``z``, logits materialised.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...) -> {name: (...) tensor}, no gradient::

        z = softcap·tanh(x / softcap) / temperature       (x = hidden · weightᵀ + bias)
        log_sum_sq_probs[i] = log Σ_v p[i, v]²  = logsumexp_v 2·z[i, v] − 2·logsumexp_v z[i, v]   (fp32/fp64)
        mean_logits[i]      = (1/V) Σ_v z[i, v]                                                  (fp32/fp64)
        is_top1[i]          = y_i is the first index of max_v z[i, v]                            (bool)

    Rows whose label equals ``ignore_index`` give 0 (False).
    """
    dt = compute_dtype(hidden, weight)
    with torch.no_grad():
        x = torch.nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
        z = transform_logits(x, temperature, softcap)
        keep = labels != ignore_index
        zero = torch.zeros((), dtype=dt, device=x.device)
        out = {}
        for name in extras:
            if name == "log_sum_sq_probs":
                value = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            elif name == "mean_logits":
                value = z.mean(-1)
            elif name == "is_top1":
                value = (z.argmax(-1) == labels) & keep  # argmax: the first of tied maxima
            else:
                raise ValueError(f"extras must name entries of {EXTRAS}, got {name!r}")
            out[name] = value if name == "is_top1" else torch.where(keep, value, zero)
    return out
