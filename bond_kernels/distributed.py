"""Vocabulary-parallel log-probs over ``torch.distributed`` (tensor parallelism over the vocabulary).

Each rank of ``process_group`` holds a contiguous slice of the vocabulary — of the logits (``token_logprobs``,
``sequence_logprobs``, both logits of ``token_jeffreys``) or of the output projection's weight and bias
(``linear_token_logprobs``) — in rank order, and every rank holds the same number of columns (pad the
vocabulary to a multiple of the world size, as Megatron does).  Labels are global vocabulary ids and, like the hidden states, are the same on
every rank; every rank gets the same (replicated) log-probs and entropies.

Per row, each rank computes over its slice (with the backend's per-token kernels, local labels clamped into
the slice) the partial log-sum-exp ``l_r``, the partial mean ``S_r = Σ softmax_r(z)·z`` (entropy) and the
target logit when the label lies in its slice; two all-reduces combine them::

    M = max_r l_r                                   (all-reduce MAX)
    Σ_r exp(l_r − M),  Σ_r exp(l_r − M)·S_r,  Σ_r target_r       (one all-reduce SUM of a (3, N) tensor)
    lse = M + log Σ_r exp(l_r − M),   S = Σ_r exp(l_r − lse)·S_r,   logp = target − lse,   H = lse − S

Backward (no collective for logits; one all-reduce of ``grad_hidden`` for the linear head): each rank runs the
backward kernel on its own shard with the GLOBAL ``lse`` and entropy, which gives its shard's gradient
``g·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)`` (times the softcap/temperature factor) except for rows whose
label lies on another rank: the clamped local label put a one-hot at local column 0 there, and an O(N)
fix-up rewrites that column exactly.  Upstream gradients must be the same on every rank (they are when the
loss is computed from the replicated outputs).  For the linear head ``grad_hidden`` is summed over ranks
inside the backward, so every rank gets the full gradient: do not all-reduce it again.

Every call first exchanges a few numbers per rank (one small ``all_gather``, one host synchronisation):
shard sizes (hence each rank's offset and the global vocabulary), N, H, dtype, the options, a checksum of the
labels and their range.  Unequal shard sizes, inconsistent metadata and labels outside the global vocabulary
raise the same ``ValueError`` on every rank (rather than a hang or wrong numbers), as do local argument
errors on any rank.
"""

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _backend
from . import _validate as V
from ._shards import ShardInfo, check_jeffreys, gather_checked, shard_info
from .ops.linear_engine import KERNEL_IGNORE, local_backward, local_forward, local_labels, make_kept
from .ops.linear_token_logprobs import saved_tensor_hooks_active
from .ops.token_logprobs import full_lse
from .reference.token_logprobs import segment_sum

__all__ = [
    "ShardInfo",
    "linear_token_logprobs",
    "sequence_logprobs",
    "shard_info",
    "token_jeffreys",
    "token_logprobs",
]


# --------------------------------------------------------------------------------------------------------
# the combine shared by both ops
# --------------------------------------------------------------------------------------------------------
def allreduce_stats(lse_l, s_l, target_l, group):
    """Combine per-rank (N,) partial statistics into global ``(lse, S or None, target)`` (two all-reduces)."""
    m = lse_l.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    zero = torch.zeros((), dtype=lse_l.dtype, device=lse_l.device)
    m_safe = torch.where(torch.isfinite(m), m, zero)  # an all −inf row stays −inf below, without NaN here
    e = torch.exp(lse_l - m_safe)
    parts = [e, target_l]
    if s_l is not None:
        parts.append(torch.where(e > 0, e * s_l, zero))
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    lse = m_safe + torch.log(stacked[0])
    s = stacked[2] / stacked[0] if s_l is not None else None
    return lse, s, stacked[1]


# --------------------------------------------------------------------------------------------------------
# token_logprobs / sequence_logprobs on vocabulary-sharded logits
# --------------------------------------------------------------------------------------------------------
class _VocabParallelTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, info, temperature, softcap, ignore_index, want_ent, inplace, tk, group):
        v = logits.shape[-1]
        rows = logits.reshape(-1, v)
        y = labels.reshape(-1).to(torch.int64)
        loc, inside, keep = local_labels(y, ignore_index, info.offset, v)
        logp_l, lse_l, ent_l = tk.fwd(rows, loc, temperature, softcap, KERNEL_IGNORE, want_ent)
        lse_l = full_lse(lse_l, temperature, softcap)  # shards combine whole log-sum-exps
        sd = lse_l.dtype
        zero = torch.zeros((), dtype=sd, device=lse_l.device)
        target_l = torch.where(inside, logp_l + lse_l, zero)
        s_l = lse_l - ent_l if want_ent else None
        lse, s, target = allreduce_stats(lse_l, s_l, target_l, group)
        logp = torch.where(keep, target - lse, zero)
        ent = torch.where(keep, lse - s, zero) if want_ent else lse.new_empty(0)
        x0 = rows[:, 0].to(sd, copy=True)  # column 0 before an in-place backward overwrites it
        ctx.save_for_backward(logits, loc, lse, ent, x0, keep & ~inside)
        ctx.config = (temperature, softcap, want_ent, inplace, tk)
        if not want_ent:
            ctx.mark_non_differentiable(ent)
        return logp.view(labels.shape), ent.view(labels.shape) if want_ent else ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        logits, loc, lse, ent, x0, out = ctx.saved_tensors
        temperature, softcap, want_ent, inplace, tk = ctx.config
        rows = logits.reshape(-1, logits.shape[-1])
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp.reshape(-1).to(lse.dtype).contiguous()
        if want_ent and grad_ent is not None:
            ge = grad_ent.reshape(-1).to(lse.dtype).contiguous()
            ent_arg = ent
        else:
            ge = ent_arg = lse.new_empty(0)
        d = tk.bwd(rows, loc, lse, ent_arg, g, ge, temperature, softcap, KERNEL_IGNORE, bool(inplace))
        tk.fixup(d, x0, out, lse, ent_arg, g, ge, temperature, softcap)
        return d.view(logits.shape), None, None, None, None, None, None, None, None, None


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
    process_group,
    _pending_error=None,
    _layout=None,
):
    """:func:`bond_kernels.token_logprobs` for logits (..., V_r) sharded over the vocabulary across ranks.

    logits: this rank's contiguous slice of the vocabulary, rank order; labels (...) int64 global ids, the
    same on every rank.  Returns the global ``logp`` (...) fp32 [and ``entropy``] on every rank; the
    backward gives each rank the gradient of its own shard.  One host synchronisation (the metadata
    exchange; see the module docstring).  ``inplace``: the backward overwrites the shard with its gradient.
    """
    error = _pending_error
    if error is None:
        try:
            temperature, softcap, ignore_index = V.token_args(
                logits, labels, temperature, softcap, ignore_index
            )
            name = _backend.choose(
                "token_logprobs", backend, logits.device, needs_reference=_backend.fp64_reason(logits)
            )
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
    ok = error is None
    info = gather_checked(
        process_group,
        logits if isinstance(logits, torch.Tensor) else torch.empty(0),
        error,
        labels if ok else None,
        vocab=logits.shape[-1] if ok else 0,
        rows=labels.numel() if ok else 0,
        hidden=0,
        temperature=temperature if ok else 0.0,
        softcap=softcap if ok else 0.0,
        ignore_index=ignore_index if ok else 0,
        return_entropy=return_entropy,
        dtype=logits.dtype if ok else None,
        what="token_logprobs" if _layout is None else "sequence_logprobs",
        layout=_layout,
    )
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    # the linear head's per-tile kernels (token fwd/bwd and the column-0 fix-up) take the shard as one tile
    tk = _backend.impl("linear_token_logprobs", name).tiles
    logp, ent = _VocabParallelTokenLogprobs.apply(
        logits,
        labels,
        info,
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        bool(inplace),
        tk,
        process_group,
    )
    return (logp, ent) if return_entropy else logp


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
    process_group,
):
    """:func:`bond_kernels.sequence_logprobs` for vocabulary-sharded logits: per-sequence sums (B,) fp32."""
    cu, error, layout = None, None, None
    try:
        cu = V.sequence_layout(logits, cu_seqlens)
        # every rank must sum the same positions into the same sequences: the exchange compares this
        shape = torch.tensor(tuple(labels.shape), dtype=torch.int64, device=labels.device)
        layout = shape if cu is None else torch.cat([shape, torch.tensor([-1], device=cu.device), cu.long()])
    except (TypeError, ValueError) as exc:
        error = exc
    logp = token_logprobs(
        logits,
        labels,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        backend=backend,
        inplace=inplace,
        process_group=process_group,
        _pending_error=error,
        _layout=layout,
    )
    if cu is None:
        return logp.sum(-1)
    return segment_sum(logp, cu)


# --------------------------------------------------------------------------------------------------------
# linear_token_logprobs with the output projection sharded over the vocabulary
# --------------------------------------------------------------------------------------------------------
class _VocabParallelLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        bias,
        labels,
        info,
        temperature,
        softcap,
        ignore_index,
        want_ent,
        name,
        group,
        keep,
    ):
        # the backend's engine launchers: cpu and torch tile with the CPU budget (fp32 or fp64), triton with
        # the GPU one
        engine = _backend.impl("linear_token_logprobs", name)
        tk = engine.tiles
        plan = engine.plan(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)
        # This rank's grad_weight buffer keeps its last tiles' logits (recompute="auto"): a local choice,
        # nothing about the exchange changes.
        kept = make_kept(hidden.shape[0], weight, plan) if keep and ctx.needs_input_grad[1] else None
        lse_l, s_l, target_l, _ = local_forward(
            hidden,
            weight,
            bias,
            labels,
            v_offset=info.offset,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            want_ent=want_ent,
            tk=tk,
            plan=plan,
            kept=kept,
        )
        ctx.kept = kept
        keep = labels != ignore_index
        zero = torch.zeros((), dtype=lse_l.dtype, device=lse_l.device)
        lse, s, target = allreduce_stats(lse_l, s_l, target_l, group)  # fp64, as local_forward combines
        logp = torch.where(keep, target - lse, zero)
        ent = torch.where(keep, lse - s, zero) if want_ent else lse.new_empty(0)
        # fp32 outputs and saved statistics (fp64 for an fp64 plan), as the single-process op returns
        out = torch.float64 if plan.compute_dtype == torch.float64 else torch.float32
        logp, lse, ent = logp.to(out), lse.to(out), ent.to(out)
        ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
        ctx.config = (info, temperature, softcap, ignore_index, want_ent, tk, plan, group)
        if not want_ent:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @once_differentiable  # no grad mode inside: create_graph=True must not record the engine's out= matmuls
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
        info, temperature, softcap, ignore_index, want_ent, tk, plan, group = ctx.config
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        kept, ctx.kept = ctx.kept, None  # consumed once: a retained graph's second backward recomputes
        g = torch.zeros_like(lse) if grad_logp is None else grad_logp
        ge = grad_ent if (want_ent and grad_ent is not None) else None
        gh, gw, gb = local_backward(
            hidden,
            weight,
            bias,
            labels,
            lse,
            ent,
            g,
            ge,
            v_offset=info.offset,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            tk=tk,
            plan=plan,
            need_hidden=need_h,
            need_weight=need_w,
            need_bias=need_b and bias is not None,
            hidden_grad_fp32=True,
            kept=kept,
        )
        if need_h:
            # Each rank holds the contribution of its vocabulary slice; hidden is replicated, so its
            # gradient is their sum (in fp32, cast once).
            dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=group)
            gh = gh.to(hidden.dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


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
    process_group,
    recompute="auto",
):
    """:func:`bond_kernels.linear_token_logprobs` with ``weight`` (V_r, H) / ``bias`` (V_r,) sharded by vocabulary.

    hidden (..., H) and labels (...) (global ids) are the same on every rank.  Returns the global ``logp``
    [and ``entropy``] on every rank.  Backward: each rank gets its own shard's weight/bias gradient and the
    full ``grad_hidden`` (summed over ranks inside, one all-reduce).  Tiles as the single-GPU op (bounded
    memory, the logits are never materialised); ``recompute`` as there, per rank.
    """
    error = None
    try:
        temperature, softcap, ignore_index = V.linear_args(
            hidden, weight, labels, bias, temperature, softcap, ignore_index
        )
        name = _backend.choose(
            "linear_token_logprobs", backend, hidden.device, needs_reference=_backend.fp64_reason(hidden)
        )
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    ok = error is None
    info = gather_checked(
        process_group,
        hidden if isinstance(hidden, torch.Tensor) else torch.empty(0),
        error,
        labels if ok else None,
        vocab=weight.shape[0] if ok else 0,
        rows=labels.numel() if ok else 0,
        hidden=hidden.shape[-1] if ok else 0,
        temperature=temperature if ok else 0.0,
        softcap=softcap if ok else 0.0,
        ignore_index=ignore_index if ok else 0,
        return_entropy=return_entropy,
        dtype=hidden.dtype if ok else None,
        what="linear_token_logprobs",
        hidden_grad=ok and torch.is_grad_enabled() and hidden.requires_grad,
    )
    rows = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1).to(torch.int64).contiguous()
    logp, ent = _VocabParallelLinear.apply(
        rows,
        weight,
        bias,
        y,
        info,
        temperature,
        softcap,
        ignore_index,
        bool(return_entropy),
        name,
        process_group,
        recompute == "auto" and not torch.compiler.is_compiling() and not saved_tensor_hooks_active(),
    )
    logp = logp.view(labels.shape)
    if return_entropy:
        return logp, ent.view(labels.shape)
    return logp


# --------------------------------------------------------------------------------------------------------
# token_jeffreys on vocabulary-sharded policy and anchor logits
# --------------------------------------------------------------------------------------------------------
def _jeffreys_terms(policy, anchor, keep, m, lse, temperature):
    """This shard's ``(log p, log q)`` (N, V_r) from the global row maxima ``m`` (2, N) and the global
    log-sum-exps ``lse`` (2, N) of the shifted, tempered rows; ignored rows are zeros."""
    dt = m.dtype
    z, a = policy.to(dt), anchor.to(dt)
    if keep is not None:
        zero = torch.zeros((), dtype=dt, device=z.device)
        z = torch.where(keep.unsqueeze(-1), z, zero)
        a = torch.where(keep.unsqueeze(-1), a, zero)
    # shifted by the row maxima before dividing by T, as the reference does
    logp = (z - m[0].unsqueeze(-1)) / temperature - lse[0].unsqueeze(-1)
    logq = (a - m[1].unsqueeze(-1)) / temperature - lse[1].unsqueeze(-1)
    return logp, logq


def _xlogy_diff(p, logp, logq):
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    return (p * torch.where(p > 0, logp - logq, zero)).sum(-1)


class _VocabParallelJeffreys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, policy, anchor, keep, beta, temperature, group):
        dt = torch.float64 if torch.float64 in (policy.dtype, anchor.dtype) else torch.float32
        zero = torch.zeros((), dtype=dt, device=policy.device)
        z, a = policy.to(dt), anchor.to(dt)
        if keep is not None:
            z = torch.where(keep.unsqueeze(-1), z, zero)
            a = torch.where(keep.unsqueeze(-1), a, zero)
        m = torch.stack([z.amax(-1), a.amax(-1)])
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        m = torch.where(torch.isfinite(m), m, zero)  # a row of -inf gives NaN below, as on one process
        sums = torch.stack(
            [
                torch.exp((z - m[0].unsqueeze(-1)) / temperature).sum(-1),
                torch.exp((a - m[1].unsqueeze(-1)) / temperature).sum(-1),
            ]
        )
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        lse = torch.log(sums)
        logp, logq = _jeffreys_terms(policy, anchor, keep, m, lse, temperature)
        p, q = logp.exp(), logq.exp()
        # KL(p‖q) and KL(q‖p) are sums over the vocabulary: each rank adds its shard's terms
        kl = torch.stack([_xlogy_diff(p, logp, logq), _xlogy_diff(q, logq, logp)])
        dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
        div = torch.zeros_like(kl[0])
        if beta > 0:  # a weight of 0 drops its term (0·inf is not NaN here either)
            div = div + beta * kl[0]
        if beta < 1:
            div = div + (1.0 - beta) * kl[1]
        if keep is not None:
            div = torch.where(keep, div, zero)
        ctx.save_for_backward(policy, anchor, keep, m, lse, kl[0])
        ctx.config = (beta, temperature)
        return div

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_div):
        policy, anchor, keep, m, lse, kl_pq = ctx.saved_tensors
        beta, temperature = ctx.config
        logp, logq = _jeffreys_terms(policy, anchor, keep, m, lse, temperature)
        p, q = logp.exp(), logq.exp()
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        d = torch.zeros_like(p)
        if beta > 0:
            d = d + beta * p * (torch.where(p > 0, logp - logq, zero) - kl_pq.unsqueeze(-1))
        if beta < 1:
            d = d + (1.0 - beta) * (p - q)
        g = grad_div.to(p.dtype)
        if keep is not None:
            g = torch.where(keep, g, zero)
        d = d * (g / temperature).unsqueeze(-1)
        return d.to(policy.dtype), None, None, None, None, None


def token_jeffreys(
    policy_logits,
    anchor_logits,
    *,
    beta=0.5,
    temperature=1.0,
    ignore_mask=None,
    backend="auto",
    process_group,
):
    """:func:`bond_kernels.token_jeffreys` for policy and anchor logits (..., V_r) sharded over the vocabulary.

    Both hold this rank's contiguous slice of the vocabulary (rank order, equal sizes); ``ignore_mask`` is
    the same on every rank.  Returns the global divergence (...) on every rank; the backward gives each
    rank its own shard's gradient, with no collective.  Computed with torch ops on each shard (fp32, fp64
    for fp64 inputs; a few (N, V_r) temporaries) and three all-reduces of (2, N) row statistics (maxima,
    sums of exponentials, the two KL sums); ``backend`` is checked but the computation is the same on every
    backend.  One metadata exchange first, as for the other ops (the module docstring).
    """
    error = None
    try:
        beta, temperature = V.jeffreys_args(policy_logits, anchor_logits, beta, temperature, ignore_mask)
        _backend.choose("token_jeffreys", backend, policy_logits.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    ok = error is None
    check_jeffreys(
        process_group,
        policy_logits if isinstance(policy_logits, torch.Tensor) else torch.empty(0),
        error,
        rows=policy_logits.numel() // policy_logits.shape[-1] if ok else 0,
        vocab=policy_logits.shape[-1] if ok else 0,
        beta=beta if ok else 0.0,
        temperature=temperature if ok else 0.0,
        ignore_mask=ignore_mask,
        dtype=policy_logits.dtype if ok else None,
    )
    lead = tuple(policy_logits.shape[:-1])
    v = policy_logits.shape[-1]
    keep = None if ignore_mask is None else ~ignore_mask.reshape(-1)
    div = _VocabParallelJeffreys.apply(
        policy_logits.reshape(-1, v),
        anchor_logits.detach().reshape(-1, v),
        keep,
        beta,
        temperature,
        process_group,
    )
    return div.view(lead)
