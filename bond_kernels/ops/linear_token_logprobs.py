"""Fused linear head + per-token log-probs: the custom ops and their autograd.

Math: ``token_logprobs(hidden·weightᵀ + bias, labels)`` without holding the (N, V) logits; the spec is
``bond_kernels.reference.linear_token_logprobs``.  The ops take the backend's name and run its launchers,
``_backend.impl("linear_token_logprobs", backend)``: the chunked engine of ``ops/linear_engine.py`` with
that backend's tile plan (``ops/linear_plan.py``) and per-tile kernels.

* ``linear_token_logprobs_fwd`` / ``linear_token_logprobs_bwd``: ``torch.library`` custom ops (with fakes),
  the forward's autograd running the backward op; what ``torch.compile`` traces.
* :class:`KeptLinearTokenLogprobs`: ``recompute="auto"`` in eager mode, the same math plus the forward's
  kept tiles (``linear_engine.Kept``), held on ``ctx`` until the backward turns them into ``grad_weight``.
"""

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _backend


# --------------------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------------------
def _empty(like):
    return torch.empty(0, dtype=like.dtype, device=like.device)


@torch.library.custom_op("bond_kernels::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
    extras: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    logp, lse, ent, _, more = _backend.impl("linear_token_logprobs", backend).fwd(
        hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, extras=extras
    )
    return (logp.float(), lse.float(), ent.float(), *more)


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend, extras=0):
    n = labels.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        hidden.new_empty(n, **f32),
        hidden.new_empty(n, **f32),
        hidden.new_empty(n if return_entropy else 0, **f32),
        *(hidden.new_empty(n if extras & bit else 0, **f32) for bit in (1, 2)),
        hidden.new_empty(n if extras & 4 else 0, dtype=torch.bool, device=hidden.device),
    )


@torch.library.custom_op("bond_kernels::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gh, gw, gb = _backend.impl("linear_token_logprobs", backend).bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        temperature,
        softcap,
        ignore_index,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    return (
        gh if gh is not None else _empty(hidden),
        gw if gw is not None else _empty(weight),
        gb if gb is not None else _empty(weight),
    )


@linear_token_logprobs_bwd.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    temperature,
    softcap,
    ignore_index,
    need_hidden,
    need_weight,
    need_bias,
    backend,
):
    gh = torch.empty(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty(weight.shape if need_weight else (0,), dtype=weight.dtype, device=weight.device)
    has_b = need_bias and bias is not None
    gb = torch.empty(
        bias.shape if has_b else (0,), dtype=(bias if has_b else weight).dtype, device=weight.device
    )
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend, *_ = inputs
    _, lse, ent, *extras = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
    ctx.config = (temperature, softcap, ignore_index, backend)
    ctx.mark_non_differentiable(lse, *extras)  # the extras (ops/linear_extras.py) have no gradient


def _upstream(lse, ent, grad_logp, grad_ent):
    """The upstream gradients as the launchers take them: fp32, contiguous, an empty entropy one if unused."""
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_logp = grad_logp.float().contiguous()
    if grad_ent is None or ent.numel() == 0:
        grad_ent = torch.empty(0, dtype=torch.float32, device=lse.device)
    else:
        grad_ent = grad_ent.float().contiguous()
    return grad_logp, grad_ent


def _gradients(ctx, grad_logp, grad_ent, bwd):
    """Both autograd paths' backward: ``bwd`` takes the launcher contract's arguments (``need_bias`` already
    false without a bias) and returns ``(grad_hidden, grad_weight, grad_bias)``."""
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    temperature, softcap, ignore_index, _ = ctx.config
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_logp, grad_ent = _upstream(lse, ent, grad_logp, grad_ent)
    gh, gw, gb = bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        ent,
        grad_logp,
        grad_ent,
        temperature,
        softcap,
        ignore_index,
        bool(need_h),
        bool(need_w),
        bool(need_b) and bias is not None,
    )
    return (
        gh if need_h else None,
        gw if need_w else None,
        gb if need_b and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, grad_logp, grad_lse, grad_ent, *_):
    backend = ctx.config[3]
    return _gradients(ctx, grad_logp, grad_ent, lambda *args: linear_token_logprobs_bwd(*args, backend))


linear_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpoint, ``save_on_cpu``): the kept buffer
    lives on ctx, out of their reach, so keeping there would cost what they exist to save (under checkpoint,
    the forward's buffer held to the backward plus a second one in the recomputed forward: 2·V·H at peak)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    except (AttributeError, TypeError, RuntimeError):  # private API: a torch without it keeps as before
        return False


class KeptLinearTokenLogprobs(torch.autograd.Function):
    """``recompute="auto"`` in eager mode: the custom op's math, plus the forward's ``linear_engine.Kept`` tiles.

    The kept buffer is held on ``ctx`` (not ``save_for_backward``): the backward turns it into
    ``grad_weight`` in place, and drops the reference first, so a second backward through a retained
    graph recomputes every tile instead of reading gradients as logits.  torch.compile traces the custom
    op instead (``functional.linear_token_logprobs`` never routes a compiled call here).
    """

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        temperature,
        softcap,
        ignore_index,
        return_entropy,
        backend,
        extras=0,
    ):
        logp, lse, ent, kept, more = _backend.impl("linear_token_logprobs", backend).fwd(
            hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, True, extras
        )
        out = logp.float(), lse.float(), ent.float(), *more
        inputs = (hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend)
        _setup_context(ctx, inputs, out)
        ctx.kept = kept
        return out

    @staticmethod
    @once_differentiable  # no grad mode inside: create_graph=True must not record the out= matmuls (as 'full')
    def backward(ctx, grad_logp, grad_lse, grad_ent, *_):
        kept, ctx.kept = ctx.kept, None
        bwd = _backend.impl("linear_token_logprobs", ctx.config[3]).bwd
        return _gradients(ctx, grad_logp, grad_ent, lambda *args: bwd(*args, kept=kept))
