"""Custom ops and autograd for per-token log-probs (the launchers live in each backend).

Launcher contract, shared by every backend (``_backend.impl("token_logprobs", backend).<name>``):

``token_logprobs_fwd(logits, labels, temperature, softcap, ignore_index, return_entropy)``
    logits (N, V) or (B, T, V) float with last stride 1 (any other strides); labels (N,) int64 contiguous,
    N = B·T.  Returns ``(logp, lse, entropy)``, fp32 (``entropy`` is (0,) unless asked for); ignored rows give
    0.  ``lse`` (saved for backward) is the log-sum-exp of the transformed row ``z``, either whole, (N,), or
    split, (2, N) (backends in ``SPLIT_LSE``): ``lse[0]`` the row maximum ``x_m`` of the logits and
    ``lse[1] = log Σ_v exp(z_v − z(x_m))``, so the whole one is ``z(lse[0]) + lse[1]`` (:func:`full_lse`).
    From the split form the backward recomputes ``log p_v = z_v − z(x_m) − lse[1]`` as a difference first
    (``x_v − x_m``, or ``tanh(x_v/c) − tanh(x_m/c)``), to a rounding of ``log p_v``; from the whole one it
    carries one rounding of ``|z|`` (README, "Odd inputs").
``token_logprobs_bwd(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap,
ignore_index, inplace)``
    lse: either form above (the linear head and the vocab-parallel op pass a whole, global one).
    grad_logp (N,) fp32; grad_entropy (N,) fp32 or (0,).  Returns d/d logits in the logits' dtype and shape
    (written into ``logits`` itself when ``inplace``)::

        dz_v  = g_logp·(1[v = y] − p_v) − g_ent·p_v·(log p_v + H)
        dx_v  = dz_v / T · (1 − tanh²(x_v / c))   (the last factor only with a softcap c)

``token_logprobs_fwd_bwd(logits, labels, grad_logp, temperature, softcap, ignore_index, inplace)``
    the gradient computed in the forward sweep from a known upstream ``grad_logp``: ``(logp, grad)``.
"""

import torch

from .. import _backend

# Backends whose forward launchers return the split log-sum-exp (2, N) (token_logprobs_fwd above, and
# token_jeffreys_fwd's lse_p / lse_q); the others return it whole, (N,).
SPLIT_LSE = frozenset({"cpu", "triton"})


def lse_shape(n: int, backend: str) -> tuple:
    return (2, n) if backend in SPLIT_LSE else (n,)


def full_lse(lse: torch.Tensor, temperature: float, softcap: float) -> torch.Tensor:
    """The (N,) log-sum-exp of z from a launcher's ``lse``, whole (N,) or split (2, N) (see the contract)."""
    if lse.dim() == 1:
        return lse
    w = softcap * torch.tanh(lse[0] / softcap) if softcap else lse[0]
    return w * (1.0 / temperature) + lse[1]


def _empty_f32(like: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


@torch.library.custom_op("bond_kernels::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    return_entropy: bool,
    inplace_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logp, lse, ent = _backend.impl("token_logprobs", backend).token_logprobs_fwd(
        logits, labels, temperature, softcap, ignore_index, return_entropy
    )
    return logp, lse, ent


@token_logprobs_fwd.register_fake
def _(logits, labels, temperature, softcap, ignore_index, return_entropy, inplace_backward, backend):
    n = labels.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    return (
        logits.new_empty(n, **f32),
        logits.new_empty(lse_shape(n, backend), **f32),
        logits.new_empty(n if return_entropy else 0, **f32),
    )


@torch.library.custom_op("bond_kernels::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    return _backend.impl("token_logprobs", backend).token_logprobs_bwd(
        logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, False
    )


@token_logprobs_bwd.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


@torch.library.custom_op("bond_kernels::token_logprobs_bwd_inplace", mutates_args=("logits",))
def token_logprobs_bwd_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> None:
    _backend.impl("token_logprobs", backend).token_logprobs_bwd(
        logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, True
    )


@token_logprobs_bwd_inplace.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, backend):
    return None


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, softcap, ignore_index, return_entropy, inplace_backward, backend = inputs
    _, lse, ent = output
    ctx.save_for_backward(logits, labels, lse, ent)
    ctx.config = (temperature, softcap, ignore_index, inplace_backward, backend)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_lse, grad_ent):
    logits, labels, lse, ent = ctx.saved_tensors
    temperature, softcap, ignore_index, inplace, backend = ctx.config
    if grad_logp is None:
        grad_logp = torch.zeros(labels.shape[0], dtype=torch.float32, device=labels.device)
    grad_logp = grad_logp.float().contiguous()
    if grad_ent is None or ent.numel() == 0:
        grad_ent = _empty_f32(lse)
    else:
        grad_ent = grad_ent.float().contiguous()
    args = (labels, lse, ent, grad_logp, grad_ent, temperature, softcap, ignore_index, backend)
    if inplace:
        # The logits buffer is overwritten with its own gradient (documented in the functional API).
        token_logprobs_bwd_inplace(logits, *args)
        grad = logits
    else:
        grad = token_logprobs_bwd(logits, *args)
    return grad, None, None, None, None, None, None, None


token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("bond_kernels::token_logprobs_fwd_bwd", mutates_args=())
def token_logprobs_fwd_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    logp, grad = _backend.impl("token_logprobs", backend).token_logprobs_fwd_bwd(
        logits, labels, grad_logp, temperature, softcap, ignore_index, False
    )
    return logp, grad


@token_logprobs_fwd_bwd.register_fake
def _(logits, labels, grad_logp, temperature, softcap, ignore_index, backend):
    n = labels.shape[0]
    return (
        logits.new_empty(n, dtype=torch.float32),
        torch.empty(logits.shape, dtype=logits.dtype, device=logits.device),
    )


@torch.library.custom_op("bond_kernels::token_logprobs_fwd_bwd_inplace", mutates_args=("logits",))
def token_logprobs_fwd_bwd_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    logp, _ = _backend.impl("token_logprobs", backend).token_logprobs_fwd_bwd(
        logits, labels, grad_logp, temperature, softcap, ignore_index, True
    )
    return logp


@token_logprobs_fwd_bwd_inplace.register_fake
def _(logits, labels, grad_logp, temperature, softcap, ignore_index, backend):
    return logits.new_empty(labels.shape[0], dtype=torch.float32)
