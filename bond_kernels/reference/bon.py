"""Reference Best-of-N likelihood (BOND-MATH.md section 1) and Best-of-N selection."""

import math

import torch


def log_c_n(u, n):
    """Tie correction ``C_N(u) = log(expm1(N·u) / expm1(u))`` for ``u = log p_lt − log p_le <= 0``.

    Evaluated as ``log(−expm1(N·u)) − log(−expm1(u))`` (no cancellation near 0), with the limits
    ``C_N(0) = log N`` and ``C_N(−∞) = 0``.  Any real ``N >= 1``.
    """
    at_zero = u == 0
    u_safe = torch.where(at_zero, torch.full_like(u, -1.0), u)
    c = torch.log(-torch.expm1(n * u_safe)) - torch.log(-torch.expm1(u_safe))
    return torch.where(at_zero, torch.full_like(u, math.log(n)), c)


def bon_log_prob(ref_logp, p_le, p_lt, n):
    """Theorem 1 in log form: ``log π_BoN(y) = log π_ref(y) + (N−1)·log p_le(y) + C_N(log p_lt − log p_le)``.

    Elementwise and broadcasting.  ``p_lt = 0`` gives ``C_N = 0``; ``p_le = 0`` gives ``−∞`` for ``N > 1``
    (and ``log π_ref`` for ``N = 1``, where Best-of-1 is π_ref itself).  fp32, or fp64 if any input is fp64.
    """
    tensors = [t for t in (ref_logp, p_le, p_lt) if isinstance(t, torch.Tensor)]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    device = tensors[0].device if tensors else None
    ref_logp, p_le, p_lt = (torch.as_tensor(t, dtype=dtype, device=device) for t in (ref_logp, p_le, p_lt))
    log_le = torch.log(p_le)
    log_lt = torch.log(p_lt)
    # p_le = 0 forces p_lt = 0: define u = −∞ there (C_N = 0) instead of −∞ − (−∞) = NaN.
    u = torch.where(p_le > 0, log_lt - log_le, torch.full_like(log_le, -math.inf))
    u = torch.clamp(u, max=0.0)
    power = torch.zeros_like(log_le) if n == 1 else (n - 1) * log_le
    return ref_logp + power + log_c_n(u, n)


def best_of_n_indices(ref_rewards, n):
    """Index of the best sample in each consecutive group of ``n`` columns, ties to the earliest draw.

    ref_rewards: (B, k) -> (B, k // n) int64 indices into the k columns; group g covers columns
    ``g·n : (g+1)·n``; trailing ``k mod n`` columns are unused.
    """
    b, k = ref_rewards.shape
    groups = k // n
    grouped = ref_rewards[:, : groups * n].reshape(b, groups, n)
    # torch.argmax returns the first maximal index: ties go to the earliest draw, as Best-of-N does.
    local = grouped.argmax(dim=-1)
    offsets = torch.arange(groups, device=ref_rewards.device) * n
    return local + offsets
