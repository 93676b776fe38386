"""Reference divergences between a student's and a teacher's next-token distributions, from their hidden states
and LM heads (the logits are materialised here; ``bond_kernels.linear_token_jeffreys`` never does).

With ``z = cap_s(h_s·W_sᵀ + b_s)/T`` and ``a = cap_t(h_t·W_tᵀ + b_t)/T`` (``cap(x) = c·tanh(x/c)``, or the
identity without a softcap), ``s = softmax(z)`` the student and ``t = softmax(a)`` the teacher, per row:

``divergence="jeffreys"`` (the BOND token regulariser, as :func:`token_jeffreys` with p = s, q = t)::

    D = β·KL(s‖t) + (1−β)·KL(t‖s)
    ∂D/∂z_v = β·s_v·(log s_v − log t_v − KL(s‖t)) + (1−β)·(s_v − t_v)

``divergence="gjsd"`` (TRL's GKD / DistillationTrainer convention, Agarwal et al. 2024, Eq. 1): β = 0 is the
forward KL(t‖s), β = 1 the reverse KL(s‖t), and in between the generalised Jensen-Shannon divergence with the
mixture ``m = (1−β)·s + β·t``::

    D = β·KL(t‖m) + (1−β)·KL(s‖m) = H(m) − β·H(t) − (1−β)·H(s)
    ∂D/∂z_v = (1−β)·s_v·(log s_v − log m_v − KL(s‖m))

Entries with probability 0 (−inf logits) contribute 0 (``0·log 0 = 0``).  Only the student is differentiated.
"""

import math

import torch

from ._common import compute_dtype


def _logits(hidden, weight, bias, softcap, temperature, dtype):
    x = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        x = x + bias.to(dtype)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def _kl(p, logp, logq):
    """Σ p·(log p − log q) over the last dimension, 0 where p = 0."""
    return (p * torch.where(p > 0, logp - logq, torch.zeros((), dtype=p.dtype, device=p.device))).sum(-1)


def divergence_from_log_probs(log_s, log_t, beta: float, divergence: str):
    """Per-row divergence of two (..., V) log-probability tensors (the math in the module docstring)."""
    s, t = log_s.exp(), log_t.exp()
    if divergence == "jeffreys":
        return beta * _kl(s, log_s, log_t) + (1.0 - beta) * _kl(t, log_t, log_s)
    if beta == 0.0:
        return _kl(t, log_t, log_s)
    if beta == 1.0:
        return _kl(s, log_s, log_t)
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    return beta * _kl(t, log_t, log_m) + (1.0 - beta) * _kl(s, log_s, log_m)


def linear_token_jeffreys(
    hidden,
    weight,
    teacher_hidden,
    teacher_weight,
    *,
    bias=None,
    teacher_bias=None,
    beta=0.5,
    divergence="jeffreys",
    temperature=1.0,
    softcap=None,
    teacher_softcap=None,
    ignore_mask=None,
):
    """hidden (..., H_s), weight (V, H_s), teacher_hidden (..., H_t), teacher_weight (V, H_t); biases (V,) or
    None; ignore_mask (...) bool or None (True rows give 0 and no gradient).  Returns the per-token divergence
    (...), fp32 (fp64 for fp64 inputs), differentiable with respect to the student's hidden, weight and bias."""
    dtype = compute_dtype(hidden, teacher_hidden)
    z = _logits(hidden, weight, bias, softcap, temperature, dtype)
    a = _logits(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap, temperature, dtype).detach()
    if ignore_mask is not None:
        keep = ~ignore_mask.bool()
        zero = torch.zeros((), dtype=dtype, device=z.device)
        z = torch.where(keep.unsqueeze(-1), z, zero)
        a = torch.where(keep.unsqueeze(-1), a, zero)
    div = divergence_from_log_probs(torch.log_softmax(z, -1), torch.log_softmax(a, -1), beta, divergence)
    if ignore_mask is not None:
        div = torch.where(keep, div, torch.zeros((), dtype=dtype, device=div.device))
    return div
