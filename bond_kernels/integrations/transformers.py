"""Per-token and per-sequence log-probs of a Hugging Face ``transformers`` causal LM, without its logits.

:func:`sequence_logprobs` runs the model's backbone (the decoder stack, final norm included) and then
:func:`bond_kernels.linear_token_logprobs` with the model's own output projection (``lm_head``; tied input
embeddings are the same tensor, so their gradient flows to the embedding), its bias if it has one, and the
model's final-logit transform read from its (text) config: a softcap (``final_logit_softcapping``: Gemma 2/3,
``logits_soft_cap``: RecurrentGemma) or a multiplier applied as a temperature (Cohere's ``logit_scale``,
Granite's ``logits_scaling`` (÷), HyperCLOVAX's ``logits_scaling`` (×), Falcon-H1's ``lm_head_multiplier``).
The (B, T, V) logits are never formed.

A model class can post-process its logits in ways no config field announces.  So the first call for each
model object checks, once, on at most ``_VERIFY_TOKENS`` tokens of the first row, that the model's own forward
gives exactly "lm_head(backbone output), then the transform above", and that lm_head's output is
``hidden·weightᵀ + bias`` of its own weight and bias (no LoRA adapter or other extra term the fused head
would miss): forward hooks record what the backbone returns and what ``lm_head`` receives and returns, and
the results are compared element-wise.  A mismatch raises instead of returning wrong log-probs.
``verify=False`` skips the check.

The computation runs inside the model's forward, called through the outermost wrapper the model is trained
in (``DistributedDataParallel``, FSDP2's ``fully_shard``, ``torch.compile``, a PEFT model; see
``_wrappers``): for the call, the inner model's ``forward`` is an instance attribute that runs the backbone
and the fused head and returns the log-probs, so DDP's reducer is prepared, FSDP2 gathers the parameters
(``lm_head.weight`` is then the full tensor) and registers its backward hooks, and ``torch.compile``
traces both.  The head's parameters are read inside that forward, never outside it.
"""

import types
import weakref
from typing import NamedTuple

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()

from .. import _validate as V
from .. import functional as F
from ..reference._common import transform_logits
from . import _wrappers

# Positions of the one-time check: enough to cover a few vocabulary rows, small enough to cost nothing.
_VERIFY_TOKENS = 8
# Element-wise tolerance of the check, in units of the logits' dtype epsilon, relative to 1 + |logit|: the
# model may round the transform in its own dtype (Gemma-2 in bf16: three roundings, about 1.2%), while the
# multipliers in use (Cohere 0.0625, Granite 1/8 ... 1/16, Falcon-H1, HyperCLOVAX) are far from 1.
_VERIFY_EPS = 4.0
_VERIFIED = weakref.WeakKeyDictionary()


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
    """(module, weight (V, H), bias or None) of the model's output projection."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"model must have an output projection (lm_head) with a (V, H) weight, got {type(model).__name__}"
        )
    return head, weight, getattr(head, "bias", None)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _logit_transform(config, temperature):
    """(temperature, softcap) reproducing the model's own final-logit transform, then ``/ temperature``.

    The model's logits are ``m · lm_head(h)`` (a multiplier m, folded into the temperature) or
    ``c · tanh(lm_head(h) / c)`` (a softcap c); the fused head applies the softcap, then ``/ temperature``.
    """
    cfg = _text_config(config)
    softcap = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logits_soft_cap", None) or None
    m = 1.0
    scale = getattr(cfg, "logit_scale", None)  # Cohere: logits · logit_scale
    if scale not in (None, 1, 1.0):
        m *= float(scale)
    scaling = getattr(cfg, "logits_scaling", None)  # Granite: ÷ logits_scaling; HyperCLOVAX: ×
    if scaling not in (None, 1, 1.0):
        multiplies = str(getattr(cfg, "model_type", "")).startswith("hyperclovax")
        m = m * float(scaling) if multiplies else m / float(scaling)
    head_mult = getattr(cfg, "lm_head_multiplier", None)  # Falcon-H1: logits · lm_head_multiplier
    if head_mult not in (None, 1, 1.0):
        m *= float(head_mult)
    if m != 1.0 and softcap:
        raise NotImplementedError(
            f"model: a logit multiplier ({m}) together with a final-logit softcap ({softcap}) is not supported"
        )
    return float(temperature) / m, softcap


def _relative_error(x, ref):
    """max |x − ref| / (1 + |ref|): relative for large entries, absolute near 0 (host sync)."""
    return ((x - ref).abs() / (1.0 + ref.abs())).max().item()


def _verify_head(model, backbone, head, input_ids):
    """Once per model: its own forward on a few tokens must give ``transform(lm_head(backbone output))``."""
    ids = input_ids[:1, :_VERIFY_TOKENS]
    seen = {}

    def on_backbone(module, args, out):
        seen["backbone"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def on_head(module, args, out):
        # The weight as the forward sees it (FSDP2: the gathered tensor, not the shard).
        seen["head_in"], seen["head_out"] = args[0], out
        seen["weight"], seen["bias"] = module.weight, getattr(module, "bias", None)

    modules = list(model.modules())
    training = [m.training for m in modules]
    hooks = [backbone.register_forward_hook(on_backbone), head.register_forward_hook(on_head)]
    try:
        model.eval()  # no dropout: the check compares one forward with itself
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False)
    except Exception as exc:
        raise RuntimeError(
            f"model: the one-time check of {type(model).__name__}'s logits (its own forward on "
            f"{tuple(ids.shape)} tokens) failed with {type(exc).__name__}: {exc}; pass verify=False to skip it"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
        for mod, flag in zip(modules, training):
            mod.training = flag
    logits = out.logits if hasattr(out, "logits") else out[0]
    where = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    skip = "; pass verify=False to skip this check if you know better"
    if "head_out" not in seen or "backbone" not in seen:
        missing = "its output projection" if "head_out" not in seen else "its backbone"
        raise ValueError(f"model: {where} never called {missing} as a module in its forward{skip}")
    h_in, h_bb = seen["head_in"], seen["backbone"]
    if h_in.shape != h_bb.shape or not torch.equal(h_in, h_bb):
        raise ValueError(
            f"model: {where} transforms the backbone's hidden states before lm_head; the fused head would "
            f"score the untransformed ones{skip}"
        )
    eps = torch.finfo(logits.dtype).eps if logits.dtype.is_floating_point else 0.0
    tol = _VERIFY_EPS * max(eps, torch.finfo(torch.float32).eps)
    # The fused head computes hidden·weightᵀ + bias from the module's weight and bias alone: a head whose
    # forward adds more (a LoRA adapter on lm_head, a quantised layer) would be scored without it.
    head_out, weight, bias = seen["head_out"].float(), seen["weight"], seen["bias"]
    plain = torch.nn.functional.linear(h_in.float(), weight.float(), None if bias is None else bias.float())
    head_err = _relative_error(plain, head_out)
    if not head_err <= tol:
        raise ValueError(
            f"model: {where} has an output projection ({type(head).__name__}) whose output is not "
            f"hidden·weightᵀ + bias of its weight and bias (e.g. a LoRA adapter on lm_head; largest relative "
            f"difference {head_err:.3g}); merge the adapter first{skip}"
        )
    temperature, softcap = _logit_transform(model.config, 1.0)
    z = transform_logits(head_out, temperature, softcap)
    got = logits.float()
    if got.shape != z.shape:
        raise ValueError(
            f"model: {where} returns logits of shape {tuple(got.shape)} from lm_head outputs of shape "
            f"{tuple(z.shape)}; the fused head cannot reproduce that{skip}"
        )
    err = _relative_error(z, got)
    if not err <= tol:
        raise ValueError(
            f"model: {where} post-processes its logits in a way its config does not announce (the fused "
            f"head reproduces softcap={softcap}, multiplier={1.0 / temperature:g}; largest relative "
            f"difference {err:.3g}){skip}"
        )


def sequence_logprobs(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    temperature=1.0,
    ignore_index=-100,
    backend="auto",
    verify=True,
    recompute="auto",
    **model_kwargs,
):
    """Log-probs of ``labels`` under a causal LM, through the fused linear head (never the full logits).

    input_ids (B, T) int; attention_mask (B, T) or None; labels (B, T) int in the transformers convention —
    the same shape as ``input_ids``, ``ignore_index`` (-100) where nothing is scored, shifted inside so that
    position t's prediction scores ``labels[:, t+1]``.  ``labels=None`` scores ``input_ids`` wherever
    ``attention_mask`` is 1 at that position and the one before (so left and right padding give the same
    sums; with left padding pass ``position_ids`` as generation does).  Extra keyword arguments go to the
    backbone (e.g. ``position_ids``).
    Returns :class:`SequenceLogprobs`; differentiable with respect to the model's parameters.

    model: the model as it is trained: plain, ``DistributedDataParallel`` (pass the DDP object: its
    ``.module`` raises, DDP would not reduce the gradients), FSDP2-sharded (the output projection in the
    root's group), ``torch.compile``d, or a PEFT model; the call goes through its forward.

    verify: on the first call for this model object, run its own forward once on at most
    ``_VERIFY_TOKENS`` tokens of the first row (no gradient, dropout off, one host synchronisation) and
    raise if its logits are not the head's output through the transform read from its config (see the
    module docstring).  Skipped under ``torch.compile`` tracing.
    recompute: as in :func:`bond_kernels.linear_token_logprobs` ("full" when several calls run before one
    backward).
    """
    verify = V.boolean(verify, "verify")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.is_floating_point()
        or input_ids.is_complex()
        or input_ids.dtype == torch.bool
    ):
        raise ValueError(
            "input_ids must be a (B, T) integer tensor, got "
            + (
                f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}"
                if isinstance(input_ids, torch.Tensor)
                else type(input_ids).__name__
            )
        )
    if input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one sequence, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape)
    ):
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got "
            + (
                str(tuple(attention_mask.shape))
                if isinstance(attention_mask, torch.Tensor)
                else type(attention_mask).__name__
            )
        )
    if labels is None:
        labels = input_ids
        if attention_mask is not None:
            # Score only tokens whose previous position is real: with left padding the first real token would
            # otherwise be scored from a pad's state, and the sum would depend on the padding side.
            scored = attention_mask != 0
            scored[:, 1:] &= attention_mask[:, :-1] != 0
            labels = input_ids.masked_fill(~scored, ignore_index)
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"labels must have input_ids' shape {tuple(input_ids.shape)} (shifted inside), got "
            f"{tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids must hold at least 2 positions to score a next token, got T = {input_ids.shape[1]}"
        )
    outer, model = _wrappers.unwrap(model)
    backbone = _backbone(model)
    head, _, _ = _head(model)
    # Without autograd (scoring samples under no_grad) there is no gradient for DDP to reduce: .module is fine.
    if outer is model and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        owner = _wrappers.ddp_owner(model)
        if owner is not None:
            raise ValueError(
                f"model: this {type(model).__name__} is the .module of a DistributedDataParallel; pass the "
                "DistributedDataParallel itself, so that its forward prepares the gradient all-reduce (through "
                "the .module the gradients stay those of this rank's batch)"
            )
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embed, "num_embeddings", None)
    if rows is not None and V.free_to_read(input_ids) and input_ids.numel() > 0:
        lo, hi = int(input_ids.min()), int(input_ids.max())  # the embedding would raise an IndexError
        if lo < 0 or hi >= rows:
            raise ValueError(
                f"input_ids must lie in [0, {rows}) (the model's input embedding), got {lo if lo < 0 else hi}"
            )
    if verify and model not in _VERIFIED and not torch.compiler.is_compiling():
        _verify_head(model, backbone, head, input_ids)
        _VERIFIED[model] = True
    temperature, softcap = _logit_transform(model.config, temperature)
    model_kwargs.setdefault("use_cache", False)
    options = (float(temperature), softcap, ignore_index, backend, recompute)
    # The fused head runs as the inner model's forward, called by the outermost wrapper's: DDP prepares
    # its reducer, FSDP2 gathers the parameters (lm_head.weight inside is the full tensor) and registers
    # its backward hooks, torch.compile traces it.  An instance attribute, removed again afterwards.
    had = "forward" in model.__dict__
    previous = model.__dict__.get("forward")
    model.forward = types.MethodType(_fused_forward, model)
    try:
        out = outer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **{_LABELS: labels, _OPTIONS: options},
            **model_kwargs,
        )
    finally:
        if had:
            model.forward = previous
        else:
            del model.forward
    if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(
            f"model: {type(outer).__name__}'s forward did not return what the inner model's forward returned "
            f"(got {type(out).__name__}); the fused head cannot run through this wrapper"
        )
    return SequenceLogprobs(*out)


# Keyword arguments that carry the labels and the head's options through the wrappers' forwards.
_LABELS = "_bond_kernels_labels"
_OPTIONS = "_bond_kernels_head"
# Passed as None by wrappers (PEFT) that spell out a causal LM's whole signature; the backbone takes none.
_DROPPED_IF_NONE = ("labels", "inputs_embeds", "output_attentions", "output_hidden_states", "return_dict")


def _fused_forward(self, input_ids=None, attention_mask=None, **kwargs):
    """The model's forward while :func:`sequence_logprobs` runs: backbone, then the fused head."""
    labels = kwargs.pop(_LABELS)
    temperature, softcap, ignore_index, backend, recompute = kwargs.pop(_OPTIONS)
    for key in _DROPPED_IF_NONE:
        if key in kwargs and kwargs[key] is None:
            del kwargs[key]
    backbone = _backbone(self)
    _, weight, bias = _head(self)  # read here: FSDP2 has put the gathered parameters in place
    if isinstance(weight, DTensor):
        owner = _wrappers.fsdp_sharded_owner(self, weight)
        if owner is not None:
            raise ValueError(
                f"model: the output projection's weight is still sharded inside the forward: FSDP2 shards it "
                f"with {owner!r} on its own, whose parameters are gathered only while {owner!r}'s forward runs "
                "(the fused head does not call it); apply fully_shard to the decoder layers and the root only, "
                "so the output projection (and a tied input embedding) is in the root's group"
            )
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
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
        recompute=recompute,
    )
    if logp._is_view():  # FSDP2 hooks the forward's outputs; an in-place op on a view would lose its hook
        logp = logp.clone()
    return SequenceLogprobs(logp, logp.sum(-1))
