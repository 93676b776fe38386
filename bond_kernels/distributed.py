"""Vocabulary-parallel log-probs over ``torch.distributed`` (tensor parallelism over the vocabulary).

Each rank of ``process_group`` holds a contiguous slice of the vocabulary — of the logits (``token_logprobs``,
``sequence_logprobs``) or of the output projection's weight and bias (``linear_token_logprobs``) — in rank
order, and every rank holds the same number of columns (pad the vocabulary to a multiple of the world
size, as Megatron does).  Labels are global vocabulary ids and, like the hidden states, are the same on
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

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from . import _backend
from .ops.linear_engine import KERNEL_IGNORE, local_backward, local_forward, local_labels, make_kept
from .ops.linear_token_logprobs import saved_tensor_hooks_active
from .ops.token_logprobs import full_lse

__all__ = ["ShardInfo", "linear_token_logprobs", "sequence_logprobs", "shard_info", "token_logprobs"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# Hashes of the labels and of the sequence layout: two residues modulo primes below 2^31 (exact in the fp64
# metadata vector), each of Σ_i (v_i + 1)·w_i with position weights w_i = (a·i + b) mod p.  Two positions
# share a weight only when they lie a multiple of p (> 2^31) apart, so swapping any two different values in
# a tensor of fewer than 2^31 elements changes the hash; unrelated tensors collide with odds ~2^-62.
# Products stay below 2^62 and sums of < 2^32 residues below 2^63: no int64 overflow anywhere.
_HASH_PRIMES = ((2147483647, 48271, 11), (2147483629, 40692, 7))
_FIELDS = (
    "error",
    "vocab",
    "rows",
    "hidden",
    "label_hash_1",
    "label_hash_2",
    "label_min",
    "label_max",
    "layout_hash_1",
    "layout_hash_2",
    "hidden_grad",
    "temperature",
    "softcap",
    "ignore_index",
    "return_entropy",
    "dtype",
)


class ShardInfo(NamedTuple):
    """Where this rank's vocabulary slice sits: ``[offset, offset + local_vocab)`` of ``global_vocab``."""

    rank: int
    world_size: int
    offset: int
    local_vocab: int
    global_vocab: int
    sizes: tuple


def _meta_device(group, like: torch.Tensor):
    # gloo moves CPU tensors; NCCL needs CUDA tensors (the inputs' device).
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else like.device


def _hash(values: torch.Tensor) -> torch.Tensor:
    """Two position-weighted residues of an int64 tensor (see ``_HASH_PRIMES``), float64 (2,), same device."""
    v = values.reshape(-1).to(torch.int64)
    i = torch.arange(v.numel(), device=v.device, dtype=torch.int64)
    out = []
    for p, a, b in _HASH_PRIMES:
        w = (i * a + b) % p  # a·i < 2^31·2^16: no overflow
        out.append((((v + 1) % p) * w % p).sum() % p)
    return torch.stack(out).to(torch.float64)


def _label_summary(labels, ignore_index):
    """(hash 1, hash 2, min, max) of the labels (ignored ones as -1) as a float64 (4,) tensor on their device."""
    y = labels.reshape(-1).to(torch.int64)
    keep = y != ignore_index
    if y.numel() == 0:
        return torch.tensor([0.0, 0.0, math.inf, -math.inf], dtype=torch.float64, device=labels.device)
    hashes = _hash(torch.where(keep, y, torch.full_like(y, -1)))
    yf = y.to(torch.float64)
    lo = torch.where(keep, yf, torch.full_like(yf, math.inf)).min()
    hi = torch.where(keep, yf, torch.full_like(yf, -math.inf)).max()
    return torch.cat([hashes, torch.stack([lo, hi])])


def _exchange(group, like, error, values, labels, ignore_index, layout):
    """all_gather this rank's metadata; raise on every rank if any rank reported an error."""
    if error is None:
        summary = _label_summary(labels, ignore_index)
        layout_hash = _hash(layout)
    else:
        summary, layout_hash = torch.zeros(4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    head = torch.tensor(
        [0.0 if error is None else 1.0, values["vocab"], values["rows"], values["hidden"]],
        dtype=torch.float64,
    )
    tail = torch.tensor(
        [
            values["hidden_grad"],
            values["temperature"],
            values["softcap"],
            values["ignore_index"],
            values["return_entropy"],
            values["dtype"],
        ],
        dtype=torch.float64,
    )
    dev = _meta_device(group, like)
    vec = torch.cat([head.to(dev), summary.to(dev), layout_hash.to(dev), tail.to(dev)])
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(gathered, vec, group=group)
    rows = [dict(zip(_FIELDS, t.tolist())) for t in gathered]
    if any(r["error"] for r in rows):
        messages = [None] * world
        dist.all_gather_object(
            messages, None if error is None else f"{type(error).__name__}: {error}", group=group
        )
        if error is not None:
            raise error
        bad = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
        raise ValueError(f"process_group: another rank rejected its inputs ({'; '.join(bad)})")
    return rows


def _shown(field, v):
    """A gathered metadata value as the caller wrote it (dtype names, softcap None)."""
    if field == "dtype":
        return str(_DTYPES[int(v)]).replace("torch.", "") if 0 <= v < len(_DTYPES) else "?"
    if field == "softcap" and v == 0:
        return None
    if field in ("return_entropy", "hidden_grad"):
        return bool(v)
    return int(v) if float(v).is_integer() else v


def _check_consistent(rows, what, names):
    """Every rank must agree on ``names`` (a field, or a tuple of fields: a hash); otherwise raise with the
    per-rank values (hashes not shown)."""
    for field, arg, meaning in names:
        fields = field if isinstance(field, tuple) else (field,)
        vals = [tuple(r[f] for f in fields) for r in rows]
        if any(v != vals[0] for v in vals):
            # a tuple of fields is a hash: its values mean nothing to the caller
            got = "" if len(fields) > 1 else f"; got {[_shown(field, v[0]) for v in vals]} across ranks"
            raise ValueError(f"{arg} must {meaning} on every rank of process_group ({what}){got}")


def shard_info(rows, rank, ignore_index, shard) -> ShardInfo:
    """Offsets from the gathered shard sizes (equal on every rank); checks the labels against the global
    vocabulary.  ``shard`` names the sharded argument in the error."""
    sizes = tuple(int(r["vocab"]) for r in rows)
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            f"{shard} must have the same size on every rank of process_group (equal contiguous slices of the "
            f"vocabulary); got sizes {list(sizes)} across ranks. Pad the vocabulary to a multiple of the world "
            "size"
        )
    total = sum(sizes)
    lo = min(r["label_min"] for r in rows)
    hi = max(r["label_max"] for r in rows)
    if lo < 0 or hi >= total:
        bad = int(lo if lo < 0 else hi)
        raise ValueError(
            f"labels must lie in [0, {total}) — the global vocabulary, the sum of the shard sizes {list(sizes)} "
            f"across process_group — or equal ignore_index={ignore_index}, got {bad}"
        )
    return ShardInfo(rank, len(sizes), sum(sizes[:rank]), sizes[rank], total, sizes)


def _gather_checked(
    group,
    like,
    error,
    labels,
    *,
    vocab,
    rows,
    hidden,
    temperature,
    softcap,
    ignore_index,
    return_entropy,
    dtype,
    what,
    layout=None,
    hidden_grad=False,
):
    values = dict(
        vocab=vocab,
        rows=rows,
        hidden=hidden,
        hidden_grad=float(bool(hidden_grad)),
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=float(bool(return_entropy)),
        dtype=float(_DTYPES.index(dtype)) if dtype in _DTYPES else -1.0,
    )
    if error is None:
        try:
            for key in ("temperature", "softcap", "ignore_index"):
                float(values[key])
        except (TypeError, ValueError) as exc:  # pragma: no cover - the argument checks catch these first
            error = exc
    if error is not None:
        values = {k: 0.0 for k in values}
    if layout is None and error is None:
        layout = torch.tensor(tuple(labels.shape), dtype=torch.int64)
    gathered = _exchange(group, like, error, values, labels, ignore_index if error is None else 0, layout)
    _check_consistent(
        gathered,
        what,
        [
            (
                "rows",
                "labels",
                "hold the same number of positions N (the tokens are replicated, the vocabulary is sharded)",
            ),
            ("hidden", "hidden", "have the same size H"),
            ("dtype", "the sharded input", "have the same dtype"),
            ("temperature", "temperature", "be the same"),
            ("softcap", "softcap", "be the same"),
            ("ignore_index", "ignore_index", "be the same"),
            ("return_entropy", "return_entropy", "be the same"),
            (
                "hidden_grad",
                "hidden.requires_grad",
                "be the same (the backward all-reduces grad_hidden on every rank or on none)",
            ),
            (
                ("layout_hash_1", "layout_hash_2"),
                "labels and cu_seqlens",
                "describe the same sequences (the same shape, the same cu_seqlens)",
            ),
            (("label_hash_1", "label_hash_2"), "labels", "be identical (global vocabulary ids)"),
        ],
    )
    shard = (
        "weight (its rows, the vocabulary shard)"
        if what == "linear_token_logprobs"
        else "logits (its last dimension, the vocabulary shard)"
    )
    return shard_info(gathered, dist.get_rank(group), ignore_index, shard)


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
    from . import functional as F

    error = _pending_error
    if error is None:
        try:
            temperature, softcap, ignore_index = F._token_args(
                logits, labels, temperature, softcap, ignore_index
            )
            name = F._pick("token_logprobs", backend, logits)
        except (TypeError, ValueError, RuntimeError) as exc:
            error = exc
    ok = error is None
    info = _gather_checked(
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
    from . import functional as F

    cu, error, layout = None, None, None
    try:
        cu = F._sequence_layout(logits, labels, cu_seqlens)
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
    return F._segsum(logp, cu)


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
    from . import functional as F

    error = None
    try:
        temperature, softcap, ignore_index = F._linear_args(
            hidden, weight, labels, bias, temperature, softcap, ignore_index
        )
        name = F._pick("linear_token_logprobs", backend, hidden)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    ok = error is None
    info = _gather_checked(
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
