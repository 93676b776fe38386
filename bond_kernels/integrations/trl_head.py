"""A drop-in for TRL's ``trl.trainer.utils.add_fused_lm_head``, computed by :func:`bond_kernels.linear_token_logprobs`.

TRL 1.16's GRPO, RLOO, DPO, KTO and SFT trainers call ``add_fused_lm_head(model, ...)`` once, then
``model(..., labels=labels, fused_lm_head=True)`` on every step, and read the per-token fields of TRL's own
``FusedCausalLMOutput`` (returned here too, the class imported from TRL).  ``bond_kernels.integrations.trl
.patch()`` swaps :func:`add_fused_lm_head` into ``trl.trainer.utils`` and every TRL module that imported it.

What the patched forward does with ``fused_lm_head=True`` (without it, the model's own forward runs):

* the backbone (``model.base_model``, or ``model.model`` for a vision-language model before transformers 5),
  with ``use_cache=False`` and router logits when the config asks for them;
* the labels shifted by one (or ``shift_labels`` taken as they are), the positions whose label is ``-100``
  dropped, and the rest scored by ``linear_token_logprobs`` over ``lm_head``'s weight and bias in one pass:
  log-probs, and where ``outputs`` asks, the entropy and the extras ``log_sum_sq_probs``, ``mean_logits``,
  ``is_top1`` (``ops/linear_extras.py``); the logits of the whole vocabulary are never held;
* logits ``z = softcap·tanh(scale·x/softcap)/temperature`` with the config's ``final_logit_softcapping``
  and logit scale (``logit_scale``, ``output_multiplier``, ``lm_head_multiplier`` or ``logits_scaling``, read
  as TRL reads them).  A positive scale is folded into the temperature and the softcap
  (``T/scale``, ``softcap/scale``: the same z); another one multiplies the hidden states and the bias;
* ``loss = −Σ log_probs / (num_items_in_batch, or the number of labelled positions, at least 1)``, plus the
  MoE load-balancing loss weighted by ``router_aux_loss_coef`` when router logits are on;
* each per-token field zero (False) where the label is ``-100``.  An all-masked micro-batch gives zeros that
  are still connected to the model, so its backward runs (and gives zero gradients).

Dtypes: the matmuls run in the autocast dtype when autocast is on, else in the hidden states' dtype; with
``cast_lm_head_to_fp32`` the hidden states and the head are cast to fp32 and autocast is off for the head (a
(V, H) fp32 copy of a bf16 head is made for the call).  Every field is fp32 (``is_top1`` bool), as TRL's.
``log_probs`` and ``entropy`` are differentiable; the extras are not.  Not supported: DeepSpeed ZeRO-3
(``NotImplementedError``: the backward reads the head's weight after ZeRO-3 has released it).
"""

import functools
import math
import types
from contextlib import nullcontext

import torch

from .. import functional as F

__all__ = ["FIELDS", "add_fused_lm_head"]

# The per-token fields ``outputs`` may name (``log_probs`` is always computed).
FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_EXTRAS = ("log_sum_sq_probs", "mean_logits", "is_top1")


def _logit_scale(text_config):
    """The multiplier of the logits that the model's config states (1.0 when it states none)."""
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(text_config, attr, None)
        if value is not None:
            return float(value)
    scaling = getattr(text_config, "logits_scaling", None)
    if scaling is not None:
        # HyperCLOVA X multiplies by logits_scaling; Granite and MiniCPM3 divide by it
        return float(scaling) if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return 1.0


def _backbone_attr(model, text_config):
    import transformers
    from packaging.version import Version

    if text_config is not model.config and Version(transformers.__version__) < Version("5.0.0"):
        return "model"
    return "base_model"


def _outputs_arg(outputs):
    if isinstance(outputs, str) or not isinstance(outputs, (tuple, list)):
        raise TypeError(f"outputs must be a tuple of names from {FIELDS}, got {outputs!r}")
    bad = [n for n in outputs if n not in FIELDS]
    if bad:
        raise ValueError(f"outputs must name fields among {FIELDS}, got {tuple(outputs)!r} ({bad[0]!r})")
    return tuple(outputs)


def _zero3_enabled():
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def add_fused_lm_head(
    model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",), *, backend="auto"
):
    """TRL's ``add_fused_lm_head`` (same arguments, same ``FusedCausalLMOutput``) on our fused head.

    model: a transformers causal LM (before PEFT wraps it, as for TRL's); temperature: > 0, divides the logits;
    cast_lm_head_to_fp32: run the head in fp32 outside autocast; outputs: per-token fields among
    :data:`FIELDS` to compute (the others are None; ``log_probs`` always is); backend: ours (``"auto"``).
    Patches ``model.forward`` in place (an instance attribute); returns None.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    outputs = _outputs_arg(outputs)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    temperature = float(temperature)
    want_entropy = "entropy" in outputs
    extras = tuple(n for n in _EXTRAS if n in outputs)
    original_forward = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = _logit_scale(text_config)
    backbone_attr = _backbone_attr(model, text_config)

    @functools.wraps(type(model).forward)  # generate() checks its kwargs against this signature
    def _fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            for name, value in (
                ("labels", labels),
                ("shift_labels", shift_labels),
                ("num_items_in_batch", num_items_in_batch),
            ):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        if _zero3_enabled():
            raise NotImplementedError(
                "bond_kernels' add_fused_lm_head does not support DeepSpeed ZeRO-3: call "
                "bond_kernels.integrations.trl.unpatch() before building the trainer to use TRL's own head"
            )
        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_out = getattr(self, backbone_attr)(*args, **kwargs)
        hidden = backbone_out.last_hidden_state
        if shift_labels is None:
            if labels is None:
                raise ValueError("fused_lm_head=True needs labels (or shift_labels), got neither")
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards the head as DTensors: one gather per call
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        hidden, labels = hidden.to(weight.device), labels.to(weight.device)
        mask = labels != -100
        per_token = _score(
            hidden[mask],
            weight,
            bias,
            labels[mask].long(),
            temperature,
            softcap,
            scale,
            want_entropy,
            extras,
            cast_lm_head_to_fp32,
            backend,
        )
        # masked_scatter keeps an all-masked micro-batch connected to the model (a zero loss with a backward)
        fields = {n: t.new_zeros(mask.shape).masked_scatter(mask, t) for n, t in per_token.items()}
        log_probs = fields["log_probs"]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / count
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _router_loss(self, text_config, backbone_out, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=fields.get("entropy"),
            log_sum_sq_probs=fields.get("log_sum_sq_probs"),
            mean_logits=fields.get("mean_logits"),
            is_top1=fields.get("is_top1"),
            label_mask=mask,
            aux_loss=aux_loss,
        )

    model.forward = types.MethodType(_fused_forward, model)


def _score(h, weight, bias, y, temperature, softcap, scale, want_entropy, extras, cast_fp32, backend):
    """The per-token fields of the labelled rows ``h`` (n, H), ``y`` (n,): {name: (n,) tensor}."""
    device_type = h.device.type
    if cast_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = h.dtype
    h, weight = h.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    if scale > 0 and math.isfinite(scale):
        # z = c·tanh(s·x/c)/T = (c/s)·tanh(x/(c/s))/(T/s): the scale folds into the temperature and the softcap
        temperature, softcap = temperature / scale, (softcap / scale if softcap else None)
    elif scale != 1.0:
        h = h * scale
        bias = None if bias is None else bias * scale
    autocast = (
        torch.autocast(device_type, enabled=False)
        if torch.is_autocast_enabled(device_type)
        else nullcontext()
    )
    with autocast:
        out = F.linear_token_logprobs(
            h,
            weight,
            y,
            bias=bias,
            temperature=temperature,
            softcap=softcap,
            return_entropy=want_entropy,
            extras=extras,
            backend=backend,
        )
    out = out if isinstance(out, tuple) else (out,)
    fields = {"log_probs": out[0]}
    if want_entropy:
        fields["entropy"] = out[1]
    if extras:
        fields.update(out[-1])
    return fields


def _router_loss(model, text_config, backbone_out, attention_mask):
    """The MoE load-balancing loss, transformers' own (the function every MoE family reuses)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    num_experts = getattr(text_config, "num_experts", None) or getattr(model, "num_experts", None)
    top_k = getattr(text_config, "num_experts_per_tok", None) or getattr(model, "num_experts_per_tok", None)
    return load_balancing_loss_func(backbone_out.router_logits, num_experts, top_k, attention_mask)
