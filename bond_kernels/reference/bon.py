"""Reference Best-of-N likelihood (docs/math.md §6) and Best-of-N selection."""

import math

import torch


def log_c_n(u, n):
    """Tie correction ``C_N(u) = log(expm1(N·u) / expm1(u))`` for ``u = log p_lt − log p_le <= 0``.

    Any real ``N >= 1``; ``C_N(0) = log N``, ``C_N(−∞) = 0``.  Evaluated as ``log1p(t)`` with
    ``t = e^u · expm1((N−1)·u) / expm1(u)`` (the same quantity: ``expm1(N·u) = expm1(u) + e^u·expm1((N−1)·u)``),
    which is accurate to a few ulp for every ``u``.  The textbook ``log(−expm1(N·u)) − log(−expm1(u))``
    subtracts two logs of size ``|log|u||`` near ``u = 0`` (≈ 690 at ``u = −1e−300``: a 1000-ulp error
    for ``C_N ≈ log N``) and rounds ``1 − e^u`` to 1 far from 0.  For ``|u|`` below ``sqrt(tiny)``
    (≈ 1e−154 in fp64) the first-order series ``log N + (N−1)·u/2`` is exact to rounding and avoids
    subnormal products.
    """
    finfo = torch.finfo(u.dtype)
    tiny = abs(u) < math.sqrt(finfo.tiny)
    at_ninf = torch.isneginf(u)
    # Placeholders keep the unused branch finite: u = 0 gives 0/0, u = −∞ gives 0·∞ in (N−1)·u for N = 1.
    u_safe = torch.where(tiny | at_ninf, torch.full_like(u, -1.0), u)
    t = torch.exp(u_safe) * (torch.expm1((n - 1) * u_safe) / torch.expm1(u_safe))
    c = torch.log1p(t)
    c = torch.where(at_ninf, torch.zeros_like(u), c)
    series = math.log(n) + (n - 1) * 0.5 * u
    return torch.where(tiny, series, c)


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
