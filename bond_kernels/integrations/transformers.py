"""Per-token and per-sequence log-probs of a Hugging Face ``transformers`` causal LM, without its logits.

:func:`sequence_logprobs` runs the model's backbone (the decoder stack, final norm included) and then
:func:`bond_kernels.linear_token_logprobs` with the model's own output projection (``lm_head``; tied input
embeddings are the same tensor, so their gradient flows to the embedding), its bias if it has one, and the
model's final-logit transform (Gemma-2's ``final_logit_softcapping``; Cohere's ``logit_scale`` and
Granite's ``logits_scaling`` as a temperature).  The (B, T, V) logits are never formed.
"""

from typing import NamedTuple

import torch

from .. import functional as F


class SequenceLogprobs(NamedTuple):
    """``token_logprobs`` (B, T−1) fp32: log π(label[t+1] | tokens ≤ t), 0 at ignored labels;
    ``sequence_logprobs`` (B,) fp32: their sum over each row."""

    token_logprobs: torch.Tensor
    sequence_logprobs: torch.Tensor


def _backbone(model):
    """The module that maps input ids to final hidden states (everything but the output projection)."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError):
            dec = None
        if isinstance(dec, torch.nn.Module) and dec is not model:
            return dec
    prefix = getattr(model, "base_model_prefix", "")
    dec = getattr(model, prefix, None) if prefix else None
    if isinstance(dec, torch.nn.Module) and dec is not model:
        return dec
    raise TypeError(
        f"model must be a transformers causal LM with a backbone (model.model, model.get_decoder() or "
        f"model.<base_model_prefix>) and an lm_head, got {type(model).__name__}"
    )


def _head(model):
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"model must have an output projection (lm_head) with a (V, H) weight, got {type(model).__name__}"
        )
    return weight, getattr(head, "bias", None)


def _logit_transform(config, temperature):
    """(temperature, softcap) reproducing the model's own final-logit transform, then ``/ temperature``."""
    softcap = getattr(config, "final_logit_softcapping", None) or None
    scale = getattr(config, "logit_scale", None)  # Cohere: logits · logit_scale
    divide = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    t = float(temperature)
    if scale not in (None, 1, 1.0) or divide not in (None, 1, 1.0):
        if softcap:
            raise NotImplementedError(
                "a model with both a logit scale and final_logit_softcapping is not supported"
            )
        if scale not in (None, 1, 1.0):
            t = t / float(scale)
        if divide not in (None, 1, 1.0):
            t = t * float(divide)
    return t, softcap


def sequence_logprobs(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    temperature=1.0,
    ignore_index=-100,
    backend="auto",
    **model_kwargs,
):
    """Log-probs of ``labels`` under a causal LM, through the fused linear head (never the full logits).

    input_ids (B, T) int; attention_mask (B, T) or None; labels (B, T) int in the transformers convention —
    the same shape as ``input_ids``, ``ignore_index`` (-100) where nothing is scored, shifted inside so that
    position t's prediction scores ``labels[:, t+1]``.  ``labels=None`` scores ``input_ids`` wherever
    ``attention_mask`` is 1.  Extra keyword arguments go to the backbone (e.g. ``position_ids``).
    Returns :class:`SequenceLogprobs`; differentiable with respect to the model's parameters.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be a (B, T) integer tensor, got {getattr(input_ids, 'shape', type(input_ids))}"
        )
    if labels is None:
        labels = (
            input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
        )
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"labels must have input_ids' shape {tuple(input_ids.shape)} (shifted inside), got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must hold at least 2 positions to score a next token, got T = {input_ids.shape[1]}"
        )
    backbone = _backbone(model)
    weight, bias = _head(model)
    temperature, softcap = _logit_transform(model.config, temperature)
    model_kwargs.setdefault("use_cache", False)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[:, :-1]
    if hidden.dtype != weight.dtype:  # e.g. autocast: the head runs in the weight's dtype
        hidden = hidden.to(weight.dtype)
    logp = F.linear_token_logprobs(
        hidden,
        weight,
        labels[:, 1:],
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
    )
    return SequenceLogprobs(logp, logp.sum(-1))
