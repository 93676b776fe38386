"""The public sequence-level BOND functions (docs/design.md, "Public API"): reward quantiles, Best-of-N log-probs and
the BOND / J-BOND losses.  Each validates its arguments (``_validate``), picks its backend (``_backend``)
and calls the op or the reference.  Re-exported by :mod:`bond_kernels.functional`.
"""

import numbers

import torch

from . import _backend
from . import _validate as V
from . import reference as ref
from .reference._common import reward_compare_dtype
from .reference.losses import LOG16

__all__ = ["best_of_n_indices", "bon_log_prob", "bond_loss", "jbond_loss", "reward_quantiles"]


def reward_quantiles(rewards, ref_rewards, *, ref_mask=None, smoothing="none", backend="auto", validate=True):
    """Monte-Carlo reward-rank quantiles ``(p_le, p_lt)``, fp32 (B, n), from k reference samples per prompt.

    rewards (B, n); ref_rewards (B, k); ref_mask (B, k) bool or None; smoothing "none", "self" (the candidate
    counts as one more reference sample that ties with it) or a float ε (clamp ``p_le >= ε``).
    Spec: :func:`bond_kernels.reference.reward_quantiles`.  ``validate`` rejects NaN rewards and rows with no
    valid reference sample (one host synchronisation; turn it off inside CUDA-graph capture).
    """
    validate = V.boolean(validate, "validate")
    rewards, ref_rewards = V.quantile_inputs(rewards, ref_rewards, ref_mask, validate)
    mode, eps = V.smoothing(smoothing)
    # fp64 or integer rewards compare in fp64, which only the reference does
    fp64 = reward_compare_dtype(rewards, ref_rewards) == torch.float64
    integer = not (rewards.is_floating_point() and ref_rewards.is_floating_point())
    why = _backend.FP64_NEEDS_REFERENCE if fp64 else None
    if integer:  # the kernels compare in fp32, which rounds integers above 2^24 (ties that are not there)
        why = (
            "compares fp32 rewards; integer rewards run exactly (in fp64) on backend='torch' or 'auto', got "
            f"rewards {rewards.dtype} and ref_rewards {ref_rewards.dtype}"
        )
    name = _backend.choose("reward_quantiles", backend, rewards.device, needs_reference=why)
    if name == "torch":
        return ref.reward_quantiles(rewards, ref_rewards, ref_mask=ref_mask, smoothing=smoothing)
    from .ops.reward_quantiles import reward_quantiles as _op

    mask = (
        ref_mask.contiguous()
        if ref_mask is not None
        else torch.empty(0, dtype=torch.bool, device=rewards.device)
    )
    r32, k32 = rewards.float().contiguous(), ref_rewards.float().contiguous()
    # auto with two GPU kernels: the faster on this card for this shape bucket (timed once; same results)
    (b, n), k = rewards.shape, ref_rewards.shape[1]
    bucket = tuple(1 << max(int(x) - 1, 0).bit_length() for x in (b, n, k)) + (mask.numel() > 0,)
    name = _backend.measured(
        "reward_quantiles", backend, rewards.device, bucket, lambda nm: _op(r32, k32, mask, mode, eps, nm)
    )
    return _op(r32, k32, mask, mode, eps, name)


def bon_log_prob(ref_logp, p_le, p_lt, n, *, validate=True):
    """``log π_BoN(y) = log π_ref(y) + (N−1)·log p_le + C_N(log p_lt − log p_le)`` (Theorem 1), elementwise.

    Broadcasting; fp32 (fp64 if any input is fp64).  ``C_N`` is evaluated without cancellation near
    ``p_lt = p_le`` and is 0 at ``p_lt = 0``.  ``validate`` checks ``0 <= p_lt <= p_le <= 1`` (quantiles, no
    NaN, up to 1e-6 of rounding slack; one host synchronisation).  Spec: :func:`bond_kernels.reference.bon_log_prob`.
    """
    V.best_of(n)
    validate = V.boolean(validate, "validate")
    named = (("ref_logp", ref_logp), ("p_le", p_le), ("p_lt", p_lt))
    for name, t in named:
        if not isinstance(t, (torch.Tensor, numbers.Real)) or isinstance(t, bool):
            raise TypeError(f"{name} must be a tensor or a number, got {type(t).__name__}")
        if isinstance(t, torch.Tensor):
            V.float_tensor(t, name, min_dim=0)
    # 0-dim tensors broadcast like numbers (torch lets a CPU scalar meet a CUDA tensor); others share a device.
    tensors = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.dim() > 0]
    for name, t in tensors[1:]:
        V.same_device(tensors[0][1], t, tensors[0][0], name)
    shapes = {name: tuple(t.shape) for name, t in named if isinstance(t, torch.Tensor)}
    try:
        torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        raise ValueError(f"ref_logp, p_le and p_lt must broadcast together, got shapes {shapes}") from None
    if validate:
        like = tensors[0][1] if tensors else None
        dev = like.device if like is not None else None
        le = torch.as_tensor(p_le, device=dev)
        lt = torch.as_tensor(p_lt, device=dev)
        if V.has_data(le) and V.has_data(lt):
            # slack for rounding: quantiles summed from a CDF of 47375 outcomes reached 1 + 9e-15 (fp64)
            tol = max(1e-6, 4 * torch.finfo(torch.promote_types(le.dtype, lt.dtype)).eps)
            bad = ~((lt >= 0) & (lt <= le + tol) & (le <= 1 + tol))
            if bool(bad.any()):
                le_b, lt_b = torch.broadcast_tensors(le, lt)
                i = bad.nonzero()[0].tolist() if bad.dim() else []
                got = (float(le_b[tuple(i)]), float(lt_b[tuple(i)]))
                raise ValueError(
                    "p_le and p_lt must be quantiles with 0 <= p_lt <= p_le <= 1 (no NaN), got "
                    f"p_le = {got[0]!r}, p_lt = {got[1]!r} at position {tuple(i)} ({int(bad.sum())} such)"
                )
    return ref.bon_log_prob(ref_logp, p_le, p_lt, n)


def best_of_n_indices(ref_rewards, n, *, validate=True):
    """Index of the best of each consecutive group of ``n`` samples (ties to the earliest), (B, k // n) int64."""
    validate = V.boolean(validate, "validate")
    ref_rewards = V.reward_tensor(ref_rewards, "ref_rewards")
    n = V.integer(n, "n")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if ref_rewards.shape[1] < n:
        raise ValueError(
            f"ref_rewards must hold at least n = {n} samples per prompt, got {V.describe(ref_rewards)}"
        )
    if validate:
        V.check_no_nan(ref_rewards, "ref_rewards")
    return ref.best_of_n_indices(ref_rewards, n)


def bond_loss(
    policy_logp,
    policy_ref_logp,
    policy_rewards,
    ref_rewards,
    bon_logp,
    *,
    n,
    beta=0.5,
    baseline="loo",
    smoothing="self",
    correction=False,
    ref_mask=None,
    validate=True,
):
    """BOND loss: the Jeffreys-divergence estimator of docs/math.md §7 as a surrogate scalar.

    policy_logp (B, m) with grad; policy_ref_logp (B, m); policy_rewards (B, m); ref_rewards (B, k);
    bon_logp (B, j) with grad.  Returns :class:`BondOutput`.  Spec and math:
    :func:`bond_kernels.reference.bond_loss`.  ``validate`` (one host synchronisation) rejects NaN rewards,
    and non-finite log-probs (a -inf log-prob is an impossible sample: the loss would be infinite or NaN).
    ``smoothing="none"`` may still give ``p_le = 0`` and so ``log π_BoN = −inf`` (README, "Odd inputs").
    """
    validate = V.boolean(validate, "validate")
    V.logp_tensor(policy_logp, "policy_logp", dims=2)
    shape = tuple(policy_logp.shape)
    if 0 in shape:
        raise ValueError(
            f"policy_logp must hold at least one prompt and one policy sample per prompt, got {V.describe(policy_logp)}"
        )
    V.logp_tensor(policy_ref_logp, "policy_ref_logp", shape=shape)
    policy_rewards, ref_rewards = V.quantile_inputs(
        policy_rewards, ref_rewards, ref_mask, validate, names=("policy_rewards", "ref_rewards", "ref_mask")
    )
    if tuple(policy_rewards.shape) != shape:
        raise ValueError(
            f"policy_rewards must have policy_logp's shape {shape}, got {V.describe(policy_rewards)}"
        )
    V.logp_tensor(bon_logp, "bon_logp", dims=2)
    if bon_logp.shape[0] != shape[0]:
        raise ValueError(
            f"bon_logp must have B = {shape[0]} rows like policy_logp, got {V.describe(bon_logp)}"
        )
    V.best_of(n)
    beta = V.unit_interval(beta, "beta")
    mode_eps = V.smoothing(smoothing)
    correction = V.boolean(correction, "correction")
    if isinstance(baseline, torch.Tensor):
        if baseline.shape != policy_logp.shape:
            raise ValueError(f"baseline must have policy_logp's shape {shape}, got {V.describe(baseline)}")
        V.float_tensor(baseline, "baseline", min_dim=0)
        V.same_device(policy_logp, baseline, "policy_logp", "baseline")
    elif baseline not in ("loo", "mean", "none"):
        raise ValueError(f"baseline must be 'loo', 'mean', 'none' or a tensor, got {baseline!r}")
    for name, t in (
        ("policy_ref_logp", policy_ref_logp),
        ("policy_rewards", policy_rewards),
        ("bon_logp", bon_logp),
    ):
        V.same_device(policy_logp, t, "policy_logp", name)
    if validate:
        for name, t in (
            ("policy_logp", policy_logp),
            ("policy_ref_logp", policy_ref_logp),
            ("bon_logp", bon_logp),
        ):
            V.check_finite(t, name, V.LOGP_FINITE)
    out = _bond_loss(
        policy_logp,
        policy_ref_logp,
        policy_rewards,
        ref_rewards,
        bon_logp,
        n,
        beta,
        baseline,
        smoothing,
        mode_eps,
        correction,
        ref_mask,
    )
    return out


def _bond_loss(
    policy_logp,
    policy_ref_logp,
    policy_rewards,
    ref_rewards,
    bon_logp,
    n,
    beta,
    baseline,
    smoothing,
    mode_eps,
    correction,
    ref_mask,
):
    # fp64 log-probs keep fp64 end to end and a tensor baseline is the reference's feature: both run the spec.
    # BOND_KERNELS_BACKEND may force a backend without a sequence-level kernel (triton): the O(B) reference
    # then serves, instead of refusing the whole loss.
    why = (
        "fp64 or a tensor baseline"
        if policy_logp.dtype == torch.float64 or torch.is_tensor(baseline)
        else None
    )
    name = _backend.choose(
        "bond_sequence", "auto", policy_logp.device, needs_reference=why, env_may_defer=True
    )
    if name == "torch":
        return ref.bond_loss(
            policy_logp,
            policy_ref_logp,
            policy_rewards,
            ref_rewards,
            bon_logp,
            n=n,
            beta=beta,
            baseline=baseline,
            smoothing=smoothing,
            correction=correction,
            ref_mask=ref_mask,
        )
    from .ops.bond_sequence import bond_sequence

    # One launch: quantiles -> log π_BoN -> returns -> baselines -> coefficients and diagnostics.  Rewards are
    # compared in fp64 when either is fp64 or an integer (exactly, as the reference does), else in fp32.
    mode, eps = mode_eps
    exact = reward_compare_dtype(policy_rewards, ref_rewards)
    rdt = torch.float64 if exact == torch.float64 else torch.float32
    mask = (
        ref_mask.contiguous()
        if ref_mask is not None
        else torch.empty(0, dtype=torch.bool, device=policy_logp.device)
    )
    p_le, log_bon, policy_coef, bon_coef, stats = bond_sequence(
        policy_logp.detach().float().contiguous(),
        policy_ref_logp.detach().float().contiguous(),
        policy_rewards.detach().to(rdt).contiguous(),
        ref_rewards.detach().to(rdt).contiguous(),
        mask,
        bon_logp.detach().float().contiguous(),
        float(n),
        beta,
        mode,
        eps,
        bool(correction),
        V.BASELINES[baseline],
        name,
    )
    # The coefficients are constants: the gradient reaches each sequence's tokens as one number per sequence.
    loss = (policy_coef * policy_logp.float()).sum() + (bon_coef * bon_logp.float()).sum()
    return ref.BondOutput(
        loss=loss,
        backward_kl=stats[0],
        forward_ce=stats[1],
        mean_quantile=stats[2],
        kl_to_ref=stats[3],
        p_le=p_le,
        bon_logp_target=log_bon,
        policy_coef=policy_coef,
        bon_coef=bon_coef,
    )


def jbond_loss(
    policy_logp,
    anchor_logp,
    policy_rewards,
    anchor_rewards,
    best_anchor_logp,
    *,
    beta=0.5,
    gamma=0.0,
    penalty=LOG16,
    strict=True,
    validate=True,
):
    """J-BOND loss (docs/math.md §8), averaged over prompts; returns :class:`JBondOutput`.

    policy_logp (B,) with grad; anchor_logp (B,) no grad; policy_rewards (B,); anchor_rewards (B, 2);
    best_anchor_logp (B,) with grad.  The γ term lowers KL(π‖π_anchor) (see the reference's docstring for
    the sign).  Spec: :func:`bond_kernels.reference.jbond_loss`.
    """
    strict = V.boolean(strict, "strict")
    validate = V.boolean(validate, "validate")
    V.logp_tensor(policy_logp, "policy_logp", dims=1)
    (b,) = policy_logp.shape
    if b < 1:
        raise ValueError("policy_logp must hold at least one prompt, got B = 0")
    V.logp_tensor(anchor_logp, "anchor_logp", shape=(b,))
    V.logp_tensor(best_anchor_logp, "best_anchor_logp", shape=(b,))
    policy_rewards = V.reward_tensor(policy_rewards, "policy_rewards", dims=1)
    if tuple(policy_rewards.shape) != (b,):
        raise ValueError(f"policy_rewards must have shape ({b},), got {V.describe(policy_rewards)}")
    anchor_rewards = V.reward_tensor(anchor_rewards, "anchor_rewards")
    if tuple(anchor_rewards.shape) != (b, 2):
        raise ValueError(
            f"anchor_rewards must have shape ({b}, 2): two anchor samples per prompt, got {V.describe(anchor_rewards)}"
        )
    beta = V.unit_interval(beta, "beta")
    gamma = V.non_negative(gamma, "gamma")
    penalty = V.non_negative(penalty, "penalty")
    for name, t in (
        ("anchor_logp", anchor_logp),
        ("policy_rewards", policy_rewards),
        ("anchor_rewards", anchor_rewards),
        ("best_anchor_logp", best_anchor_logp),
    ):
        V.same_device(policy_logp, t, "policy_logp", name)
    if validate:
        V.check_no_nan(policy_rewards, "policy_rewards")
        V.check_no_nan(anchor_rewards, "anchor_rewards")
        for name, t in (
            ("policy_logp", policy_logp),
            ("anchor_logp", anchor_logp),
            ("best_anchor_logp", best_anchor_logp),
        ):
            V.check_finite(t, name, V.LOGP_FINITE)
    # As in bond_loss: fp64 runs on the reference; a forced backend without the sequence kernel defers to it.
    why = "fp64" if policy_logp.dtype == torch.float64 else None
    name = _backend.choose(
        "bond_sequence", "auto", policy_logp.device, needs_reference=why, env_may_defer=True
    )
    if name == "torch":
        return ref.jbond_loss(
            policy_logp,
            anchor_logp,
            policy_rewards,
            anchor_rewards,
            best_anchor_logp,
            beta=beta,
            gamma=gamma,
            penalty=penalty,
            strict=strict,
        )
    from .ops.bond_sequence import jbond_sequence

    # The reference computes in policy_logp's dtype (fp32 here): rewards and anchor log-probs are cast to it.
    jbond_reward, policy_coef, best_coef, stats = jbond_sequence(
        policy_logp.detach().float().contiguous(),
        anchor_logp.detach().float().contiguous(),
        policy_rewards.detach().float().contiguous(),
        anchor_rewards.detach().float().contiguous(),
        best_anchor_logp.detach().float().contiguous(),
        beta,
        gamma,
        penalty,
        bool(strict),
        name,
    )
    loss = (policy_coef * policy_logp.float()).sum() + (best_coef * best_anchor_logp.float()).sum()
    return ref.JBondOutput(
        loss=loss,
        reward_mean=stats[0],
        penalised_frac=stats[1],
        kl_to_anchor=stats[2],
        forward_ce=stats[3],
        jbond_reward=jbond_reward,
        policy_coef=policy_coef,
        best_coef=best_coef,
    )
