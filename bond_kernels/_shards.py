"""The metadata exchange of the vocabulary-parallel ops (``bond_kernels.distributed``).

Every call first exchanges a few numbers per rank (one small ``all_gather``, one host synchronisation):
shard sizes (hence each rank's offset and the global vocabulary), N, H, dtype, the options, a checksum of the
labels and their range.  Unequal shard sizes, inconsistent metadata and labels outside the global vocabulary
raise the same ``ValueError`` on every rank (rather than a hang or wrong numbers), as do local argument
errors on any rank (a rank whose arguments failed its checks sends its error instead of its metadata).
"""

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

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
    return gather_or_raise(group, like, error, vec, _FIELDS)


def gather_or_raise(group, like, error, vec, fields):
    """all_gather the float64 vector ``vec`` (its first entry 1.0 where this rank's ``error`` is set) as one
    dict ``fields -> value`` per rank; if any rank reported an error, raise on every rank: the erring rank
    its own error, the others a ValueError naming the ranks and their messages."""
    vec = vec.to(_meta_device(group, like))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(vec) for _ in range(world)]
    dist.all_gather(gathered, vec, group=group)
    rows = [dict(zip(fields, t.tolist())) for t in gathered]
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


def gather_checked(
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


_JEFFREYS_FIELDS = ("error", "rows", "vocab", "beta", "temperature", "mask", "mask_1", "mask_2", "dtype")


def check_jeffreys(group, like, error, *, rows, vocab, beta, temperature, ignore_mask, dtype):
    """The metadata exchange of the vocabulary-parallel ``token_jeffreys`` (one ``all_gather``): every rank
    must agree on N, its shard size, beta, the temperature, ignore_mask (hashed) and the dtype; otherwise (or when any rank's arguments failed) every rank raises."""
    if error is None:
        mask = torch.zeros(2) if ignore_mask is None else _hash(ignore_mask.to(torch.int64)).cpu()
        code = float(_DTYPES.index(dtype)) if dtype in _DTYPES else -1.0
        head = [0.0, rows, vocab, beta, temperature, float(ignore_mask is not None)]
        vec = torch.tensor(head + mask.tolist() + [code], dtype=torch.float64)
    else:
        vec = torch.zeros(len(_JEFFREYS_FIELDS), dtype=torch.float64)
        vec[0] = 1.0
    gathered = gather_or_raise(group, like, error, vec, _JEFFREYS_FIELDS)
    sizes = [int(r["vocab"]) for r in gathered]
    if any(s != sizes[0] for s in sizes):
        raise ValueError(
            "policy_logits must have the same size on every rank of process_group (equal contiguous slices of "
            f"the vocabulary); got sizes {sizes} across ranks. Pad the vocabulary to a multiple of the world size"
        )
    _check_consistent(
        gathered,
        "token_jeffreys",
        [
            ("rows", "policy_logits", "hold the same number of rows N (the tokens are replicated)"),
            ("beta", "beta", "be the same"),
            ("temperature", "temperature", "be the same"),
            ("dtype", "policy_logits", "have the same dtype"),
            (("mask", "mask_1", "mask_2"), "ignore_mask", "be identical (or None on every rank)"),
        ],
    )
