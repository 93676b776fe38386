"""The public functional API (DESIGN.md section 6): validates, picks the backend, reshapes, reduces."""

import math
import numbers

import torch

from . import _backend
from . import _validate as V
from . import reference as ref
from .reference._common import reward_compare_dtype
from .reference.losses import LOG16

__all__ = [
    "best_of_n_indices",
    "bon_log_prob",
    "bond_loss",
    "jbond_loss",
    "linear_token_logprobs",
    "reward_quantiles",
    "sequence_logprobs",
    "sequence_logprobs_and_grad",
    "token_jeffreys",
    "token_logprobs",
    "token_logprobs_and_grad",
]


# --------------------------------------------------------------------------------------------------------
# per-token log-probs
# --------------------------------------------------------------------------------------------------------
def _token_args(logits, labels, temperature, softcap, ignore_index, inplace=False):
    V.float_tensor(logits, "logits")
    V.label_tensor(labels, logits)
    if logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary (last) dimension, got {V.describe(logits)}"
        )
    if inplace:
        V.writable_once(logits, "logits")
    temperature, softcap = V.transform_scalars(temperature, softcap)
    return temperature, softcap, V.integer(ignore_index, "ignore_index")


def _pick(op, backend, x: torch.Tensor):
    # fp64 inputs keep fp64 end to end: only the reference computes in fp64.
    if x.dtype == torch.float64 and backend in (None, "auto"):
        return "torch"
    name = _backend.resolve(op, backend, x.device)
    if name != "torch" and x.dtype == torch.float64:
        raise TypeError(
            f"backend {name!r} takes fp32, bf16 or fp16 inputs; fp64 runs on backend='torch', got fp64"
        )
    return name


def _as_rows(logits):
    """View logits as (N, V) or (B, T, V) with last stride 1, without a copy when the layout allows."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels need unit stride along the vocabulary
    if logits.dim() == 1:
        return logits.unsqueeze(0)
    if logits.dim() <= 3:
        return logits
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _inplace_rows(logits):
    """``_as_rows(logits)`` as a view of the caller's buffer (the gradient is written there), or a named error."""
    rows = _as_rows(logits)
    if logits.numel() and rows.data_ptr() != logits.data_ptr():
        raise ValueError(
            f"logits must be viewable as (N, V) or (B, T, V) without a copy with inplace=True (the gradient is "
            f"written in its place), got {V.describe(logits)}, strides {tuple(logits.stride())}"
        )
    return rows


def _flat_labels(labels):
    return labels.reshape(-1).to(torch.int64).contiguous()


def _check_token_rows(logp, logits, softcap, check):
    """A kept row without a distribution (NaN or +inf in it, or all -inf) makes its log-prob NaN on every
    backend; where ``check`` (values free to read, or validate=True) that raises a ValueError naming the
    cause instead of being returned (README, "Odd inputs")."""
    if check:
        V.explain_nan_rows(logp, [("logits", logits)], softcap=softcap, which="whose label is not ignored")


def token_logprobs(
    logits,
    labels,
    *,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    backend="auto",
    inplace=False,
    validate=False,
    process_group=None,
):
    """Log-probability of each label, ``log softmax(z)[label]`` with ``z = softcap·tanh(x/softcap)/temperature``.

    logits: (..., V) fp32/bf16/fp16 (fp64 stays fp64 on the reference); labels: (...) int64 (int32 accepted).
    Returns ``logp`` (...) fp32, and ``entropy`` (...) fp32 with ``return_entropy=True``; positions whose label
    is ``ignore_index`` give 0 and no gradient.  Spec: :func:`bond_kernels.reference.token_logprobs`.

    inplace: the backward writes the gradient into the logits buffer, **destroying the logits** (saves one
        (N, V) buffer).  Only use it when nothing else reads the logits after this call.
    validate: check on the host (one synchronisation) that every label is in range and that no kept row is
        without a distribution (NaN or +inf in it, or all -inf; README, "Odd inputs").  On CPU tensors every
        backend checks anyway (no synchronisation to save); on a GPU without it such a row is NaN.
    process_group: logits sharded over the vocabulary across the group's ranks (tensor parallel), the same
        number of columns on every rank; labels are global ids.  See :func:`bond_kernels.distributed.token_logprobs`.
    """
    return_entropy = V.boolean(return_entropy, "return_entropy")
    inplace = V.boolean(inplace, "inplace")
    validate = V.boolean(validate, "validate")
    if process_group is not None:
        from . import distributed

        return distributed.token_logprobs(
            logits,
            labels,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            backend=backend,
            inplace=inplace,
            process_group=process_group,
        )
    temperature, softcap, ignore_index = _token_args(
        logits, labels, temperature, softcap, ignore_index, inplace
    )
    name = _pick("token_logprobs", backend, logits)
    check = validate or V.free_to_read(logits)
    if check or name == "torch":  # on CPU tensors every backend names a bad label (no sync to save)
        V.check_labels_in_range(labels, logits.shape[-1], ignore_index)
    if name == "torch":
        out = ref.token_logprobs(
            logits,
            labels,
            temperature=temperature,
            softcap=softcap or None,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
        _check_token_rows(out[0] if return_entropy else out, logits, softcap, check)
        return out
    from .ops.token_logprobs import token_logprobs_fwd

    if labels.numel() == 0:
        empty = logits.new_zeros(labels.shape, dtype=torch.float32) + logits.sum() * 0
        return (empty, empty.clone()) if return_entropy else empty
    logp, _, ent = token_logprobs_fwd(
        _inplace_rows(logits) if inplace else _as_rows(logits),
        _flat_labels(labels),
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        bool(inplace),
        name,
    )
    logp = logp.view(labels.shape)
    _check_token_rows(logp, logits, softcap, check)
    if return_entropy:
        return logp, ent.view(labels.shape)
    return logp


def _sequence_layout(logits, labels, cu_seqlens, validate=False):
    if cu_seqlens is None:
        if logits.dim() != 3:
            raise ValueError(
                f"logits must be (B, T, V) for padded sequences (or pass cu_seqlens), got {V.describe(logits)}"
            )
        return None
    V.tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of B+1 offsets, got {V.describe(cu_seqlens)}"
        )
    if logits.dim() != 2:
        raise ValueError(f"logits must be (total, V) with cu_seqlens, got {V.describe(logits)}")
    V.same_device(logits, cu_seqlens, "logits", "cu_seqlens")
    # Offsets outside [0, total] index out of bounds (or silently drop rows): check them where reading B+1
    # integers costs no device sync (CPU, outside torch.compile tracing), and everywhere with validate=True.
    if validate or V.free_to_read(cu_seqlens):
        V.check_cu_seqlens(cu_seqlens, logits.shape[0])
    return cu_seqlens


def _segsum(values, cu_seqlens):
    # Prefix sums in fp64, then differences at the offsets: deterministic (no atomics), no host sync, and
    # exact to fp32 rounding even for long packed batches.
    from .reference.token_logprobs import segment_sum

    return segment_sum(values, cu_seqlens)


def sequence_logprobs(
    logits,
    labels,
    *,
    cu_seqlens=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    backend="auto",
    inplace=False,
    validate=False,
    process_group=None,
):
    """Per-sequence ``log π(y) = Σ_t log π(y_t | y_<t)`` over non-ignored positions, fp32 (B,).

    Padded: logits (B, T, V), labels (B, T).  Packed: logits (total, V), labels (total,), cu_seqlens (B+1,)
    int offsets (sequence b is rows ``cu[b]:cu[b+1]``).  The sums are O(N) work on top of
    :func:`token_logprobs`; no extra pass touches the (N, V) logits.  ``inplace=True``: the backward writes
    the gradient into the logits buffer, **destroying the logits** (as in :func:`token_logprobs`).
    ``process_group``: vocabulary-sharded logits, see :func:`bond_kernels.distributed.sequence_logprobs`.
    """
    inplace = V.boolean(inplace, "inplace")
    validate = V.boolean(validate, "validate")
    if process_group is not None:
        from . import distributed

        return distributed.sequence_logprobs(
            logits,
            labels,
            cu_seqlens=cu_seqlens,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            backend=backend,
            inplace=inplace,
            process_group=process_group,
        )
    cu = _sequence_layout(logits, labels, cu_seqlens, validate)
    logp = token_logprobs(
        logits,
        labels,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
        inplace=inplace,
        validate=validate,
    )
    if cu is None:
        return logp.sum(-1)
    return _segsum(logp, cu)


def token_logprobs_and_grad(
    logits,
    labels,
    grad_logp,
    *,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    backend="auto",
    inplace=False,
):
    """Log-probs and their gradient in one sweep, for a known upstream gradient (the gradient-in-forward path).

    grad_logp: (...) float, the coefficient ``∂L/∂logp`` of each position.  Returns ``(logp, grad_logits)``
    with ``grad_logits = ∂(Σ grad_logp·logp)/∂logits`` in the logits' dtype and shape: one read of the logits
    and one write of the gradient.  Feed it on with ``logits.backward(grad_logits)``.  ``inplace=True`` writes
    the gradient into the logits buffer (the logits are destroyed) and returns it.  No autograd graph is built.
    """
    inplace = V.boolean(inplace, "inplace")
    temperature, softcap, ignore_index = _token_args(
        logits, labels, temperature, softcap, ignore_index, inplace
    )
    V.float_tensor(grad_logp, "grad_logp", min_dim=0)
    if tuple(grad_logp.shape) != tuple(labels.shape):
        raise ValueError(
            f"grad_logp must have the labels' shape {tuple(labels.shape)}, got {V.describe(grad_logp)}"
        )
    V.same_device(logits, grad_logp, "logits", "grad_logp")
    name = _pick("token_logprobs", backend, logits)
    check = V.free_to_read(logits)
    if check or name == "torch":
        V.check_labels_in_range(labels, logits.shape[-1], ignore_index)
        with torch.enable_grad():
            x = logits.detach().requires_grad_(True)
            logp = ref.token_logprobs(
                x, labels, temperature=temperature, softcap=softcap or None, ignore_index=ignore_index
            )
            _check_token_rows(logp, logits, softcap, check)
            (grad,) = torch.autograd.grad(logp, x, grad_logp.to(logp.dtype))
        if inplace:
            logits.data.copy_(grad)
            grad = logits
        return logp.detach(), grad
    from .ops.token_logprobs import token_logprobs_fwd_bwd, token_logprobs_fwd_bwd_inplace

    with torch.no_grad():
        rows = _inplace_rows(logits) if inplace else _as_rows(logits)
        g = grad_logp.reshape(-1).float().contiguous()
        if inplace:
            logp = token_logprobs_fwd_bwd_inplace(
                rows, _flat_labels(labels), g, temperature, softcap, ignore_index, name
            )
            # the logits are gone (the gradient overwrote them): the cause can no longer be named
            if check and bool(torch.isnan(logp).any()):
                raise ValueError(
                    "logits had a row without a distribution (NaN or +inf in it, or all -inf without a softcap) "
                    f"at position {V._position(labels.shape, int(torch.isnan(logp).nonzero()[0, 0]))}; with "
                    "inplace=True its gradient row, which now holds NaN, overwrote it"
                )
            return logp.view(labels.shape), logits
        logp, grad = token_logprobs_fwd_bwd(
            rows, _flat_labels(labels), g, temperature, softcap, ignore_index, name
        )
    _check_token_rows(logp.view(labels.shape), logits, softcap, check)
    return logp.view(labels.shape), grad.view(logits.shape)


def sequence_logprobs_and_grad(
    logits,
    labels,
    seq_coef,
    *,
    cu_seqlens=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    backend="auto",
    inplace=False,
):
    """Per-sequence log-probs and ``∂(Σ_b seq_coef[b]·log π(y_b))/∂logits`` in one read and one write.

    seq_coef: (B,) float per-sequence upstream coefficients known before the pass (for example
    ``BondOutput.policy_coef`` computed from behaviour log-probs).  Layout as :func:`sequence_logprobs`.
    Returns ``(seq_logp (B,) fp32, grad_logits)``.  ``inplace=True`` returns the logits tensor itself as
    ``grad_logits``: the gradient overwrites the logits, **destroying them**.
    """
    inplace = V.boolean(inplace, "inplace")
    cu = _sequence_layout(logits, labels, cu_seqlens)
    V.float_tensor(seq_coef, "seq_coef")
    nseq = labels.shape[0] if cu is None else cu.numel() - 1
    if tuple(seq_coef.shape) != (nseq,):
        raise ValueError(
            f"seq_coef must have shape ({nseq},), one coefficient per sequence, got {V.describe(seq_coef)}"
        )
    if cu is None:
        token_coef = seq_coef.float().unsqueeze(-1).expand(labels.shape)
    else:
        positions = torch.arange(labels.shape[0], device=labels.device)
        seq_id = torch.searchsorted(cu.long()[1:], positions, right=True).clamp_max(nseq - 1)
        token_coef = seq_coef.float()[seq_id]
    logp, grad = token_logprobs_and_grad(
        logits,
        labels,
        token_coef.contiguous(),
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
        inplace=inplace,
    )
    seq = logp.sum(-1) if cu is None else _segsum(logp, cu)
    return seq, grad


# --------------------------------------------------------------------------------------------------------
# sequence-level BOND math
# --------------------------------------------------------------------------------------------------------
def _smoothing(smoothing):
    if smoothing is None or smoothing == "none":
        return 0, 0.0
    if smoothing == "self":
        return 1, 0.0
    if isinstance(smoothing, numbers.Real) and not isinstance(smoothing, bool) and 0.0 < smoothing <= 1.0:
        return 2, float(smoothing)
    raise ValueError(f"smoothing must be 'none', 'self' or a float in (0, 1], got {smoothing!r}")


def _reward_tensor(x, name, *, dims=2):
    V.tensor(x, name)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got {V.describe(x)}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got {V.describe(x)}")
    return x


def _check_quantile_inputs(
    rewards, ref_rewards, ref_mask, validate, names=("rewards", "ref_rewards", "ref_mask")
):
    r_name, k_name, m_name = names
    rewards = _reward_tensor(rewards, r_name)
    ref_rewards = _reward_tensor(ref_rewards, k_name)
    V.same_device(rewards, ref_rewards, r_name, k_name)
    if rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError(
            f"{k_name} must have one row per prompt like {r_name} (B = {rewards.shape[0]}), got {V.describe(ref_rewards)}"
        )
    if ref_rewards.shape[1] == 0:
        raise ValueError(
            f"{k_name} must hold at least one reference sample per prompt (k >= 1), got {V.describe(ref_rewards)}"
        )
    if ref_mask is not None:
        V.tensor(ref_mask, m_name)
        if ref_mask.dtype != torch.bool:
            raise TypeError(f"{m_name} must be a bool tensor, got {V.describe(ref_mask)}")
        if tuple(ref_mask.shape) != tuple(ref_rewards.shape):
            raise ValueError(
                f"{m_name} must have {k_name}'s shape {tuple(ref_rewards.shape)}, got {V.describe(ref_mask)}"
            )
        V.same_device(ref_rewards, ref_mask, k_name, m_name)
    if validate:
        V.check_no_nan(rewards, r_name)
        if ref_mask is None:
            V.check_no_nan(ref_rewards, k_name)
        else:
            V.check_no_nan(torch.where(ref_mask, ref_rewards, torch.zeros_like(ref_rewards)), k_name)
            V.check_rows_nonempty(ref_mask, m_name)
    return rewards, ref_rewards


def reward_quantiles(rewards, ref_rewards, *, ref_mask=None, smoothing="none", backend="auto", validate=True):
    """Monte-Carlo reward-rank quantiles ``(p_le, p_lt)``, fp32 (B, n), from k reference samples per prompt.

    rewards (B, n); ref_rewards (B, k); ref_mask (B, k) bool or None; smoothing "none", "self" (the candidate
    counts as one more reference sample that ties with it) or a float ε (clamp ``p_le >= ε``).
    Spec: :func:`bond_kernels.reference.reward_quantiles`.  ``validate`` rejects NaN rewards and rows with no
    valid reference sample (one host synchronisation; turn it off inside CUDA-graph capture).
    """
    validate = V.boolean(validate, "validate")
    rewards, ref_rewards = _check_quantile_inputs(rewards, ref_rewards, ref_mask, validate)
    mode, eps = _smoothing(smoothing)
    # fp64 or integer rewards compare in fp64, which only the reference does
    fp64 = reward_compare_dtype(rewards, ref_rewards) == torch.float64
    integer = not (rewards.is_floating_point() and ref_rewards.is_floating_point())
    if integer and backend not in (None, "auto", "torch"):
        # the kernels compare in fp32, which rounds integers above 2^24 (ties that are not there)
        raise TypeError(
            f"backend {backend!r} compares fp32 rewards; integer rewards run exactly (in fp64) on backend='torch' "
            f"or 'auto', got rewards {rewards.dtype} and ref_rewards {ref_rewards.dtype}"
        )
    name = _pick("reward_quantiles", backend, rewards.to(torch.float64) if fp64 else rewards)
    if name == "torch" or fp64:
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
    ref_rewards = _reward_tensor(ref_rewards, "ref_rewards")
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


def _logp_tensor(x, name, shape=None, dims=None):
    V.float_tensor(x, name, min_dim=0)
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got {V.describe(x)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {V.describe(x)}")
    return x


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
    """BOND loss: the Jeffreys-divergence estimator of BOND-MATH.md section 3 as a surrogate scalar.

    policy_logp (B, m) with grad; policy_ref_logp (B, m); policy_rewards (B, m); ref_rewards (B, k);
    bon_logp (B, j) with grad.  Returns :class:`BondOutput`.  Spec and math:
    :func:`bond_kernels.reference.bond_loss`.  ``validate`` (one host synchronisation) rejects NaN rewards,
    and non-finite log-probs (a -inf log-prob is an impossible sample: the loss would be infinite or NaN).
    ``smoothing="none"`` may still give ``p_le = 0`` and so ``log π_BoN = −inf`` (README, "Odd inputs").
    """
    validate = V.boolean(validate, "validate")
    _logp_tensor(policy_logp, "policy_logp", dims=2)
    shape = tuple(policy_logp.shape)
    if 0 in shape:
        raise ValueError(
            f"policy_logp must hold at least one prompt and one policy sample per prompt, got {V.describe(policy_logp)}"
        )
    _logp_tensor(policy_ref_logp, "policy_ref_logp", shape=shape)
    policy_rewards, ref_rewards = _check_quantile_inputs(
        policy_rewards, ref_rewards, ref_mask, validate, names=("policy_rewards", "ref_rewards", "ref_mask")
    )
    if tuple(policy_rewards.shape) != shape:
        raise ValueError(
            f"policy_rewards must have policy_logp's shape {shape}, got {V.describe(policy_rewards)}"
        )
    _logp_tensor(bon_logp, "bon_logp", dims=2)
    if bon_logp.shape[0] != shape[0]:
        raise ValueError(
            f"bon_logp must have B = {shape[0]} rows like policy_logp, got {V.describe(bon_logp)}"
        )
    V.best_of(n)
    beta = V.unit_interval(beta, "beta")
    _smoothing(smoothing)
    V.boolean(correction, "correction")
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
            V.check_finite(t, name, _LOGP_FINITE)
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
        correction,
        ref_mask,
    )
    return out


# Why validate=True rejects non-finite sequence log-probs in the losses (README, "Odd inputs").
_LOGP_FINITE = (
    "a log-probability of a sampled sequence; -inf is an impossible sample and would make the loss and its "
    "gradient infinite or NaN"
)


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
    correction,
    ref_mask,
):
    # fp64 log-probs keep fp64 end to end and a tensor baseline is the reference's feature: both run the spec.
    if policy_logp.dtype == torch.float64 or isinstance(baseline, torch.Tensor):
        name = "torch"
    else:
        import os

        # BOND_KERNELS_BACKEND may force a backend without a sequence-level kernel (triton): the O(B)
        # reference then serves, instead of refusing the whole loss.
        forced = os.environ.get("BOND_KERNELS_BACKEND", "") or "auto"
        if forced in _backend.BACKENDS and forced != "auto" and forced not in _backend.OPS["bond_sequence"]:
            name = "torch"
        else:
            name = _backend.resolve("bond_sequence", "auto", policy_logp.device)
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
    from .ops.bond_sequence import BASELINES, bond_sequence

    # One launch: quantiles -> log π_BoN -> returns -> baselines -> coefficients and diagnostics.  Rewards are
    # compared in fp64 when either is fp64 or an integer (exactly, as the reference does), else in fp32.
    mode, eps = _smoothing(smoothing)
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
        BASELINES[baseline],
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
    """J-BOND loss (BOND-MATH.md section 4), averaged over prompts; returns :class:`JBondOutput`.

    policy_logp (B,) with grad; anchor_logp (B,) no grad; policy_rewards (B,); anchor_rewards (B, 2);
    best_anchor_logp (B,) with grad.  The γ term lowers KL(π‖π_anchor) (see the reference's docstring for
    the sign).  Spec: :func:`bond_kernels.reference.jbond_loss`.
    """
    strict = V.boolean(strict, "strict")
    validate = V.boolean(validate, "validate")
    _logp_tensor(policy_logp, "policy_logp", dims=1)
    (b,) = policy_logp.shape
    if b < 1:
        raise ValueError("policy_logp must hold at least one prompt, got B = 0")
    _logp_tensor(anchor_logp, "anchor_logp", shape=(b,))
    _logp_tensor(best_anchor_logp, "best_anchor_logp", shape=(b,))
    policy_rewards = _reward_tensor(policy_rewards, "policy_rewards", dims=1)
    if tuple(policy_rewards.shape) != (b,):
        raise ValueError(f"policy_rewards must have shape ({b},), got {V.describe(policy_rewards)}")
    anchor_rewards = _reward_tensor(anchor_rewards, "anchor_rewards")
    if tuple(anchor_rewards.shape) != (b, 2):
        raise ValueError(
            f"anchor_rewards must have shape ({b}, 2): two anchor samples per prompt, got {V.describe(anchor_rewards)}"
        )
    beta = V.unit_interval(beta, "beta")
    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, numbers.Real)
        or gamma < 0
        or not math.isfinite(gamma)
    ):
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if (
        isinstance(penalty, bool)
        or not isinstance(penalty, numbers.Real)
        or penalty < 0
        or not math.isfinite(penalty)
    ):
        raise ValueError(f"penalty must be a finite number >= 0, got {penalty!r}")
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
            V.check_finite(t, name, _LOGP_FINITE)
    if policy_logp.dtype == torch.float64:
        name = "torch"  # fp64 keeps fp64 end to end: only the reference computes in fp64
    else:
        import os

        # As in bond_loss: a forced backend without the sequence-level kernel (triton) leaves it to the reference.
        forced = os.environ.get("BOND_KERNELS_BACKEND", "") or "auto"
        if forced in _backend.BACKENDS and forced != "auto" and forced not in _backend.OPS["bond_sequence"]:
            name = "torch"
        else:
            name = _backend.resolve("bond_sequence", "auto", policy_logp.device)
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
        float(gamma),
        float(penalty),
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


# --------------------------------------------------------------------------------------------------------
# token-level Jeffreys divergence
# --------------------------------------------------------------------------------------------------------
def token_jeffreys(
    policy_logits, anchor_logits, *, beta=0.5, temperature=1.0, ignore_mask=None, backend="auto"
):
    """Per-row ``β·KL(p‖q) + (1−β)·KL(q‖p)``, ``p = softmax(policy/T)``, ``q = softmax(anchor/T)``; (...) fp32.

    policy_logits, anchor_logits: (..., V) float of the same shape; ignore_mask (...) bool or None.
    Differentiable with respect to ``policy_logits`` (the anchor is treated as a constant).
    A kept row without a distribution (NaN or +inf in it, or all -inf) gives NaN, and where the values are
    free to read (CPU tensors outside torch.compile) a ValueError naming the cause (README, "Odd inputs").
    Spec: :func:`bond_kernels.reference.token_jeffreys`.
    """
    V.float_tensor(policy_logits, "policy_logits")
    V.float_tensor(anchor_logits, "anchor_logits")
    if tuple(anchor_logits.shape) != tuple(policy_logits.shape):
        raise ValueError(
            f"anchor_logits must have policy_logits' shape {tuple(policy_logits.shape)}, got {V.describe(anchor_logits)}"
        )
    V.same_device(policy_logits, anchor_logits, "policy_logits", "anchor_logits")
    if policy_logits.shape[-1] == 0:
        raise ValueError(
            f"policy_logits must have a non-empty vocabulary (last) dimension, got {V.describe(policy_logits)}"
        )
    beta = V.unit_interval(beta, "beta")
    temperature = V.temperature(temperature)
    lead = tuple(policy_logits.shape[:-1])
    if ignore_mask is not None:
        V.tensor(ignore_mask, "ignore_mask")
        if ignore_mask.dtype != torch.bool or tuple(ignore_mask.shape) != lead:
            raise ValueError(
                f"ignore_mask must be a bool tensor of shape {lead}, got {V.describe(ignore_mask)}"
            )
        V.same_device(policy_logits, ignore_mask, "policy_logits", "ignore_mask")
    fp64 = anchor_logits.dtype == torch.float64
    name = _pick("token_jeffreys", backend, policy_logits if not fp64 else anchor_logits)
    named = [("policy_logits", policy_logits), ("anchor_logits", anchor_logits)]
    check = V.free_to_read(policy_logits)
    if name == "torch":
        div = ref.token_jeffreys(
            policy_logits, anchor_logits.detach(), beta=beta, temperature=temperature, ignore_mask=ignore_mask
        )
        if check:
            V.explain_nan_rows(div, named, which="that ignore_mask keeps")
        return div
    from .ops.token_jeffreys import token_jeffreys_fwd

    v = policy_logits.shape[-1]

    def rows(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        return x.reshape(-1, v)

    mask = (
        ignore_mask.reshape(-1).contiguous()
        if ignore_mask is not None
        else torch.empty(0, dtype=torch.bool, device=policy_logits.device)
    )
    div, *_ = token_jeffreys_fwd(
        rows(policy_logits), rows(anchor_logits.detach()), beta, temperature, mask, name
    )
    div = div.view(lead)
    if check:
        V.explain_nan_rows(div, named, which="that ignore_mask keeps")
    return div


# --------------------------------------------------------------------------------------------------------
# fused linear head + per-token log-probs
# --------------------------------------------------------------------------------------------------------
def _linear_args(hidden, weight, labels, bias, temperature, softcap, ignore_index):
    """Shape/dtype/device checks of :func:`linear_token_logprobs` (no host sync); returns the scalars."""
    V.float_tensor(hidden, "hidden")
    V.float_tensor(weight, "weight")
    h = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) = (vocabulary, hidden size), got {V.describe(weight)}")
    if weight.shape[1] != h:
        raise ValueError(
            f"weight must have hidden's size H = {h} as its second dimension (weight is (V, H)), got {V.describe(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must hold at least one vocabulary row, got {V.describe(weight)}")
    if h == 0:
        raise ValueError(f"hidden must have a non-empty hidden (last) dimension H, got {V.describe(hidden)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {V.describe(weight)}")
    V.same_device(hidden, weight, "hidden", "weight")
    if bias is not None:
        V.float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one entry per weight row, got {V.describe(bias)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {V.describe(bias)}")
        V.same_device(hidden, bias, "hidden", "bias")
    V.tensor(labels, "labels")
    if labels.dtype not in V.LABEL_DTYPES:
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {V.describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {V.describe(labels)}"
        )
    V.same_device(hidden, labels, "hidden", "labels")
    temperature, softcap = V.transform_scalars(temperature, softcap)
    return temperature, softcap, V.integer(ignore_index, "ignore_index")


def linear_token_logprobs(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
    backend="auto",
    process_group=None,
    validate=False,
    recompute="auto",
):
    """:func:`token_logprobs` of the logits ``hidden·weightᵀ + bias``, without materialising them.

    hidden: (..., H) float; weight: (V, H) of hidden's dtype (an ``nn.Linear``/``lm_head`` weight); bias: (V,)
    or None; labels: (...) int64.  Returns ``logp`` (...) fp32 [and ``entropy`` (...) fp32]; differentiable
    with respect to hidden, weight and bias.  The logits are visited in tiles (bounded memory; see
    ``bond_kernels/ops/linear_token_logprobs.py``).  Spec: ``ops.linear_token_logprobs.linear_token_logprobs_reference``.

    process_group: ``weight`` (and ``bias``) hold this rank's contiguous slice of the vocabulary (tensor
        parallel), the same number of rows on every rank; hidden and labels (global ids) are the same on every rank.  See
        :func:`bond_kernels.distributed.linear_token_logprobs`.
    validate: check on the host (one synchronisation) that every label is in [0, V).  Without it a label out
        of range gives NaN in its row on a GPU; the cpu and torch backends always check (no synchronisation
        to save there).
    recompute: ``"auto"`` (default) or ``"full"``.  The backward recomputes the logits tile by tile.  With
        ``"auto"``, when the weight needs a gradient (eager mode, one row block of the plan), the forward
        allocates grad_weight's (V, H) buffer, which the backward needs anyway, and keeps in it the logits of
        the last H/(N+H) of the vocabulary, so the backward recomputes only the rest (1/12 fewer matmul
        FLOPs at N = 2·H; the same peak memory in a forward followed by its backward).  The price: that
        buffer is held from the forward to the backward.  Several forwards before one backward (a loop
        over chunks) hold one each: use ``"full"`` there, which holds nothing but the inputs.  Nothing is
        kept under torch.compile or while saved-tensor hooks are active (non-reentrant checkpoint,
        ``save_on_cpu``).
    """
    return_entropy = V.boolean(return_entropy, "return_entropy")
    validate = V.boolean(validate, "validate")
    if not isinstance(recompute, str) or recompute not in ("auto", "full"):
        raise ValueError(f"recompute must be 'auto' or 'full', got {recompute!r}")
    if process_group is not None:
        from . import distributed

        return distributed.linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
            backend=backend,
            process_group=process_group,
            recompute=recompute,
        )
    temperature, softcap, ignore_index = _linear_args(
        hidden, weight, labels, bias, temperature, softcap, ignore_index
    )
    name = _pick("linear_token_logprobs", backend, hidden)
    if validate or name == "torch" or V.free_to_read(labels):
        V.check_labels_in_range(labels, weight.shape[0], ignore_index)
    check = validate or V.free_to_read(hidden)
    from .ops import linear_token_logprobs as lin

    if name == "torch":
        out = lin.linear_token_logprobs_reference(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            softcap=softcap or None,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
        _check_linear_rows(out[0] if return_entropy else out, hidden, weight, bias, softcap, check)
        return out
    if labels.numel() == 0:
        empty = hidden.new_zeros(labels.shape, dtype=torch.float32) + (hidden.sum() + weight.sum()) * 0
        return (empty, empty.clone()) if return_entropy else empty
    rows = hidden.reshape(-1, hidden.shape[-1])
    keep = (
        recompute == "auto"
        and torch.is_grad_enabled()
        and weight.requires_grad
        and not torch.compiler.is_compiling()
        and not lin.saved_tensor_hooks_active()
    )
    op = lin.KeptLinearTokenLogprobs.apply if keep else lin.linear_token_logprobs_fwd
    logp, _, ent = op(
        rows,
        weight,
        bias,
        _flat_labels(labels),
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        name,
    )
    logp = logp.view(labels.shape)
    _check_linear_rows(logp, hidden, weight, bias, softcap, check)
    if return_entropy:
        return logp, ent.view(labels.shape)
    return logp


def _check_linear_rows(logp, hidden, weight, bias, softcap, check):
    """A kept row's log-prob is NaN where its logits have no distribution: name the cause (README, "Odd
    inputs"); only where ``check`` (values free to read, or validate=True).  The first such row's logits are
    recomputed (one row, O(V·H)) and explained like token_logprobs' rows."""
    if not check or not V.has_data(logp) or not bool(torch.isnan(logp.detach()).any()):
        return
    first = int(torch.isnan(logp.detach()).reshape(-1).nonzero()[0, 0])
    h_row = hidden.detach().reshape(-1, hidden.shape[-1])[first]
    why = "the logits hidden·weightᵀ + bias of a row whose label is not ignored would be NaN"
    for name, t in (("hidden", h_row), ("weight", weight), ("bias", bias)):
        if t is not None and bool(torch.isnan(t).any()):
            V.check_finite({"hidden": hidden}.get(name, t), name, why)
    x = torch.nn.functional.linear(
        h_row.float(), weight.detach().float(), None if bias is None else bias.detach().float()
    )
    where = V._position(logp.shape, first)
    if not softcap and bool(torch.isneginf(x).all()):
        raise ValueError(
            f"bias must leave a finite logit in every row whose label is not ignored: the logits of the row at "
            f"position {where} are all -inf (bias {V.describe(bias)} masks every word)"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):  # bias may hold -inf (a masked word)
        V.check_finite(t, name, why)
    if bias is not None and bool(torch.isposinf(bias).any()):
        V.check_finite(bias, "bias", why)
    raise ValueError(
        f"hidden, weight and bias are finite, but the logits hidden·weightᵀ + bias of the row at position "
        f"{where} overflow fp32 (+inf, or inf − inf): scale the inputs down or set a softcap"
    )
