"""The public functional API (docs/design.md, "Public API"): validates (``_validate``), picks the backend (``_backend``),
reshapes, calls the op or the reference, reduces.  The token-level functions live here; the sequence-level
BOND functions in :mod:`bond_kernels.objectives`, re-exported."""

import torch

from . import _backend, _dtensor
from . import _validate as V
from . import reference as ref
from .objectives import best_of_n_indices, bon_log_prob, bond_loss, jbond_loss, reward_quantiles
from .reference.token_logprobs import segment_sum

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
    DTensor logits (``Shard`` on the last dimension, or ``Replicate()``, on a 1-D mesh) run that path over the
    mesh's group and give ``Replicate()`` DTensors (``bond_kernels._dtensor``; README, "Tensor parallelism").
    """
    if _dtensor.any_dtensor(logits, labels):  # DTensor inputs: the local shards, Replicate() outputs
        return _dtensor.dispatch(token_logprobs, locals())
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
    temperature, softcap, ignore_index = V.token_args(
        logits, labels, temperature, softcap, ignore_index, inplace
    )
    name = _backend.choose(
        "token_logprobs", backend, logits.device, needs_reference=_backend.fp64_reason(logits)
    )
    check = validate or V.free_to_read(logits)
    if check or name == "torch":  # on CPU tensors every backend names a bad label (no sync to save)
        V.check_labels_in_range(labels, logits.shape[-1], ignore_index)
    if name == "torch":
        out = ref.token_logprobs(
            logits,
            labels,
            temperature=temperature,
            softcap=softcap,
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
    DTensor logits as in :func:`token_logprobs`.
    """
    if _dtensor.any_dtensor(logits, labels, cu_seqlens):
        return _dtensor.dispatch(sequence_logprobs, locals())
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
    cu = V.sequence_layout(logits, cu_seqlens, validate)
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
    return segment_sum(logp, cu)


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
    temperature, softcap, ignore_index = V.token_args(
        logits, labels, temperature, softcap, ignore_index, inplace
    )
    V.float_tensor(grad_logp, "grad_logp", min_dim=0)
    if tuple(grad_logp.shape) != tuple(labels.shape):
        raise ValueError(
            f"grad_logp must have the labels' shape {tuple(labels.shape)}, got {V.describe(grad_logp)}"
        )
    V.same_device(logits, grad_logp, "logits", "grad_logp")
    name = _backend.choose(
        "token_logprobs", backend, logits.device, needs_reference=_backend.fp64_reason(logits)
    )
    check = V.free_to_read(logits)
    if check or name == "torch":
        V.check_labels_in_range(labels, logits.shape[-1], ignore_index)
        with torch.enable_grad():
            x = logits.detach().requires_grad_(True)
            logp = ref.token_logprobs(
                x, labels, temperature=temperature, softcap=softcap, ignore_index=ignore_index
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
    cu = V.sequence_layout(logits, cu_seqlens)
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
    seq = logp.sum(-1) if cu is None else segment_sum(logp, cu)
    return seq, grad


# --------------------------------------------------------------------------------------------------------
# token-level Jeffreys divergence
# --------------------------------------------------------------------------------------------------------
def token_jeffreys(
    policy_logits,
    anchor_logits,
    *,
    beta=0.5,
    temperature=1.0,
    ignore_mask=None,
    backend="auto",
    process_group=None,
):
    """Per-row ``β·KL(p‖q) + (1−β)·KL(q‖p)``, ``p = softmax(policy/T)``, ``q = softmax(anchor/T)``; (...) fp32.

    policy_logits, anchor_logits: (..., V) float of the same shape; ignore_mask (...) bool or None.
    Differentiable with respect to ``policy_logits`` (the anchor is treated as a constant).
    A kept row without a distribution (NaN or +inf in it, or all -inf) gives NaN, and where the values are
    free to read (CPU tensors outside torch.compile) a ValueError naming the cause (README, "Odd inputs").
    Spec: :func:`bond_kernels.reference.token_jeffreys`.  ``process_group``: both logits sharded over the
    vocabulary (equal slices, rank order), see :func:`bond_kernels.distributed.token_jeffreys`.  DTensor
    logits (both ``Shard`` on the last dimension, or both ``Replicate()``) as in :func:`token_logprobs`.
    """
    if _dtensor.any_dtensor(policy_logits, anchor_logits, ignore_mask):
        return _dtensor.dispatch(token_jeffreys, locals())
    if process_group is not None:
        from . import distributed

        kw = dict(beta=beta, temperature=temperature, ignore_mask=ignore_mask, backend=backend)
        return distributed.token_jeffreys(policy_logits, anchor_logits, process_group=process_group, **kw)
    beta, temperature = V.jeffreys_args(policy_logits, anchor_logits, beta, temperature, ignore_mask)
    lead = tuple(policy_logits.shape[:-1])
    name = _backend.choose(
        "token_jeffreys",
        backend,
        policy_logits.device,
        needs_reference=_backend.fp64_reason(policy_logits, anchor_logits),
    )
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
    extras=(),
):
    """:func:`token_logprobs` of the logits ``hidden·weightᵀ + bias``, without materialising them.

    hidden: (..., H) float; weight: (V, H) of hidden's dtype (an ``nn.Linear``/``lm_head`` weight); bias: (V,)
    or None; labels: (...) int64.  Returns ``logp`` (...) fp32 [and ``entropy`` (...) fp32]; differentiable
    with respect to hidden, weight and bias.  The logits are visited in tiles (bounded memory; see
    ``bond_kernels/ops/linear_engine.py``).  Spec: :func:`bond_kernels.reference.linear_token_logprobs`.

    process_group: ``weight`` (and ``bias``) hold this rank's contiguous slice of the vocabulary (tensor
        parallel), the same number of rows on every rank; hidden and labels (global ids) are the same on every rank.  See
        :func:`bond_kernels.distributed.linear_token_logprobs`.  DTensors: ``weight`` and ``bias``
        ``Shard(0)`` with ``hidden`` ``Replicate()`` (a ``ColwiseParallel`` lm_head), or all ``Replicate()``.
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
    extras: names among ``"log_sum_sq_probs"`` (log Σ_v p², fp32), ``"mean_logits"`` (the mean of z over the
        vocabulary, fp32) and ``"is_top1"`` (the label is the first argmax of z, bool), computed from the same
        tiles in the same pass (``ops/linear_extras.py``), without gradient, 0 / False at ignored positions.
        When given, a dict of them (labels' shape each) is returned after the other outputs.  Not with
        ``process_group``.  Spec: :func:`bond_kernels.reference.linear_token_extras`.
    """
    return_entropy = V.boolean(return_entropy, "return_entropy")
    extras = _extras_arg(extras, process_group)
    validate = V.boolean(validate, "validate")
    if not isinstance(recompute, str) or recompute not in ("auto", "full"):
        raise ValueError(f"recompute must be 'auto' or 'full', got {recompute!r}")
    if _dtensor.any_dtensor(hidden, weight, bias, labels):  # e.g. a ColwiseParallel lm_head's Shard(0) weight
        return _dtensor.dispatch(linear_token_logprobs, locals())
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
    temperature, softcap, ignore_index = V.linear_args(
        hidden, weight, labels, bias, temperature, softcap, ignore_index
    )
    name = _backend.choose(
        "linear_token_logprobs", backend, hidden.device, needs_reference=_backend.fp64_reason(hidden)
    )
    if validate or name == "torch" or V.free_to_read(labels):
        V.check_labels_in_range(labels, weight.shape[0], ignore_index)
    check = validate or V.free_to_read(hidden)
    from .ops import linear_extras as lin_extras
    from .ops import linear_token_logprobs as lin

    if name == "torch":
        out = ref.linear_token_logprobs(
            hidden,
            weight,
            labels,
            bias=bias,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            return_entropy=return_entropy,
        )
        _check_linear_rows(out[0] if return_entropy else out, hidden, weight, bias, softcap, check)
        if not extras:
            return out
        more = ref.linear_token_extras(
            hidden,
            weight,
            labels,
            extras,
            bias=bias,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
        )
        return (*(out if return_entropy else (out,)), more)
    if labels.numel() == 0:
        empty = hidden.new_zeros(labels.shape, dtype=torch.float32) + (hidden.sum() + weight.sum()) * 0
        out = (empty, empty.clone()) if return_entropy else empty
        if not extras:
            return out
        more = {
            n: torch.zeros(
                labels.shape, dtype=torch.bool if n == "is_top1" else torch.float32, device=hidden.device
            )
            for n in extras
        }
        return (*(out if return_entropy else (out,)), more)
    rows = hidden.reshape(-1, hidden.shape[-1])
    keep = (
        recompute == "auto"
        and torch.is_grad_enabled()
        and weight.requires_grad
        and not torch.compiler.is_compiling()
        and not lin.saved_tensor_hooks_active()
    )
    op = lin.KeptLinearTokenLogprobs.apply if keep else lin.linear_token_logprobs_fwd
    logp, _, ent, *more = op(
        rows,
        weight,
        bias,
        _flat_labels(labels),
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        name,
        lin_extras.mask_of(extras),
    )
    logp = logp.view(labels.shape)
    _check_linear_rows(logp, hidden, weight, bias, softcap, check)
    out = (logp, ent.view(labels.shape)) if return_entropy else (logp,)
    if extras:
        found = dict(zip(ref.EXTRAS, more))
        out = (*out, {n: found[n].view(labels.shape) for n in extras})
    return out if len(out) > 1 else logp


def _extras_arg(extras, process_group):
    """``linear_token_logprobs``'s ``extras``: a tuple of distinct names from ``reference.EXTRAS``."""
    if isinstance(extras, str) or not isinstance(extras, (tuple, list)):
        raise TypeError(f"extras must be a tuple of names from {ref.EXTRAS}, got {extras!r}")
    bad = [n for n in extras if n not in ref.EXTRAS]
    if bad or len(set(extras)) != len(extras):
        raise ValueError(f"extras must be distinct names from {ref.EXTRAS}, got {tuple(extras)!r}")
    if extras and process_group is not None:
        raise ValueError(
            f"extras are not supported with process_group (vocabulary-parallel), got {tuple(extras)!r}"
        )
    return tuple(extras)


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
