"""Custom ops and autograd for the token-level Jeffreys divergence.

Launcher contract (``_backend.impl("token_jeffreys", backend).<name>``):

``token_jeffreys_fwd(policy, anchor, beta, temperature, ignore_mask)``
    policy, anchor (N, V) float, last stride 1; ignore_mask (N,) bool or (0,) for none.
    Returns ``(div, lse_p, lse_q, kl_pq)`` fp32 (N,): the divergence ``β·KL(p‖q) + (1−β)·KL(q‖p)``, the two
    log-sum-exps of the tempered rows and ``KL(p‖q)`` (all three saved for backward).  Ignored rows give 0.
    ``lse_p``/``lse_q`` are whole (N,) or split (2, N) = [row max, log-sum-exp relative to it] for backends in
    ``token_logprobs.SPLIT_LSE``, as the token_logprobs contract describes.
``token_jeffreys_bwd(policy, anchor, lse_p, lse_q, kl_pq, grad_div, beta, temperature, ignore_mask)``
    grad_div (N,) fp32 -> d/d policy in the policy's dtype::

        d/dz_v = g·[β·p_v·(log p_v − log q_v − KL(p‖q)) + (1−β)·(p_v − q_v)] / T
"""

import torch

from .. import _backend
from .token_logprobs import lse_shape


@torch.library.custom_op("bond_kernels::token_jeffreys_fwd", mutates_args=())
def token_jeffreys_fwd(
    policy: torch.Tensor,
    anchor: torch.Tensor,
    beta: float,
    temperature: float,
    ignore_mask: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    div, lse_p, lse_q, kl_pq = _backend.impl("token_jeffreys", backend).token_jeffreys_fwd(
        policy, anchor, beta, temperature, ignore_mask
    )
    return div, lse_p, lse_q, kl_pq


@token_jeffreys_fwd.register_fake
def _(policy, anchor, beta, temperature, ignore_mask, backend):
    n = policy.shape[0]
    shapes = (n, lse_shape(n, backend), lse_shape(n, backend), n)
    return tuple(policy.new_empty(shape, dtype=torch.float32) for shape in shapes)


@torch.library.custom_op("bond_kernels::token_jeffreys_bwd", mutates_args=())
def token_jeffreys_bwd(
    policy: torch.Tensor,
    anchor: torch.Tensor,
    lse_p: torch.Tensor,
    lse_q: torch.Tensor,
    kl_pq: torch.Tensor,
    grad_div: torch.Tensor,
    beta: float,
    temperature: float,
    ignore_mask: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    return _backend.impl("token_jeffreys", backend).token_jeffreys_bwd(
        policy, anchor, lse_p, lse_q, kl_pq, grad_div, beta, temperature, ignore_mask
    )


@token_jeffreys_bwd.register_fake
def _(policy, anchor, lse_p, lse_q, kl_pq, grad_div, beta, temperature, ignore_mask, backend):
    return torch.empty(policy.shape, dtype=policy.dtype, device=policy.device)


def _setup_context(ctx, inputs, output):
    policy, anchor, beta, temperature, ignore_mask, backend = inputs
    _, lse_p, lse_q, kl_pq = output
    ctx.save_for_backward(policy, anchor, lse_p, lse_q, kl_pq, ignore_mask)
    ctx.config = (beta, temperature, backend)
    ctx.mark_non_differentiable(lse_p, lse_q, kl_pq)


def _backward(ctx, grad_div, *_):
    policy, anchor, lse_p, lse_q, kl_pq, ignore_mask = ctx.saved_tensors
    beta, temperature, backend = ctx.config
    if grad_div is None:
        return None, None, None, None, None, None
    grad = token_jeffreys_bwd(
        policy,
        anchor,
        lse_p,
        lse_q,
        kl_pq,
        grad_div.float().contiguous(),
        beta,
        temperature,
        ignore_mask,
        backend,
    )
    return grad, None, None, None, None, None


token_jeffreys_fwd.register_autograd(_backward, setup_context=_setup_context)
