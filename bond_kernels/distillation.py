"""Functional API of the distillation ops: student-teacher divergences computed from hidden states and LM heads.

``linear_token_jeffreys`` is the BOND token regulariser (and TRL's generalised JSD) without either model's
(N, V) logits: see :mod:`bond_kernels.ops.linear_token_jeffreys` for the tiles and
:mod:`bond_kernels.reference.linear_token_jeffreys` for the math.
"""

import torch

from . import _backend
from . import _validate as V

DIVERGENCES = ("jeffreys", "gjsd")


def _kept_rows(labels, ignore_index, ignore_mask, hidden):
    """(N,) bool: True where the row counts (from labels != ignore_index and/or ~ignore_mask)."""
    lead, device = tuple(hidden.shape[:-1]), hidden.device
    keep = torch.ones(lead, dtype=torch.bool, device=device)
    if labels is not None:
        V.tensor(labels, "labels")
        if labels.dtype not in V.LABEL_DTYPES or tuple(labels.shape) != lead:
            raise ValueError(
                f"labels must be an int64 (or int32) tensor of shape {lead}, got {V.describe(labels)}"
            )
        if labels.device != device:
            raise ValueError(f"labels must be on hidden's device {device}, got {V.describe(labels)}")
        keep = keep & (labels != V.integer(ignore_index, "ignore_index"))
    if V.row_mask(ignore_mask, lead, hidden, what="hidden") is not None:
        keep = keep & ~ignore_mask
    return keep.reshape(-1)


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
    labels=None,
    ignore_index=-100,
    ignore_mask=None,
    return_entropy=False,
    backend="auto",
    process_group=None,
    tile_bytes=None,
):
    """Per-token divergence between the student's and the teacher's next-token distributions, from hidden
    states and LM heads, never holding either model's (N, V) logits.

    hidden (..., H_s) and weight (V, H_s) (+ bias (V,)): the student, differentiated (hidden, weight, bias).
    teacher_hidden (..., H_t) and teacher_weight (V, H_t) (+ teacher_bias): the teacher, a constant; they must
    not require grad (detach them, or freeze the teacher), since no gradient reaches them.
    divergence: ``"jeffreys"`` gives ``β·KL(s‖t) + (1−β)·KL(t‖s)`` (as :func:`bond_kernels.token_jeffreys`
    with the student as policy); ``"gjsd"`` gives TRL's GKD / DistillationTrainer convention: β = 0 the forward
    KL(t‖s), β = 1 the reverse KL(s‖t), in between the generalised JSD with mixture (1−β)·s + β·t.
    temperature divides both models' logits (after each model's softcap ``c·tanh(x/c)``).
    labels with ``ignore_index``, and/or ignore_mask (True = ignored), select rows: ignored rows give 0 and
    no gradient.  Returns (...) fp32 (fp64 for fp64 inputs, on the reference).  Spec:
    :func:`bond_kernels.reference.linear_token_jeffreys.linear_token_jeffreys`.
    return_entropy: also return the student's per-token entropy (...) fp32, not differentiated (a diagnostic,
        as TRL's DistillationTrainer logs it), from the same pass.
    process_group: vocabulary parallel (tensor-parallel LM heads): ``weight``, ``teacher_weight`` and the
        biases hold this rank's slice of the vocabulary (the same slice of both heads), while the hidden
        states and labels are the same on every rank.  The per-row statistics are gathered across the group
        (O(N) each), the divergence is the full vocabulary's on every rank, and grad_hidden is all-reduced;
        grad_weight and grad_bias are the rank's slices.  The student's hidden must require grad on every
        rank or on none (checked: a mismatch would hang the all-reduce).
    tile_bytes: bytes of one fp32 (N, C) logits tile (default 64 MiB on CUDA, 16 MiB on CPU).
    """
    return_entropy = V.boolean(return_entropy, "return_entropy")
    V.head_args(hidden, weight, bias, "")
    V.head_args(teacher_hidden, teacher_weight, teacher_bias, "teacher_")
    lead = tuple(hidden.shape[:-1])
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_hidden must have hidden's leading shape {lead} (one row per token), "
            f"got {V.describe(teacher_hidden)}"
        )
    if teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"teacher_weight must have weight's vocabulary size V = {weight.shape[0]} rows (the two models must "
            f"share a vocabulary), got {V.describe(teacher_weight)}"
        )
    V.same_device(hidden, teacher_hidden, "hidden", "teacher_hidden")
    for t, name in (
        (teacher_hidden, "teacher_hidden"),
        (teacher_weight, "teacher_weight"),
        (teacher_bias, "teacher_bias"),
    ):
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{name} requires grad, but linear_token_jeffreys gives the teacher no gradient: pass "
                f"{name}.detach() (or freeze the teacher with requires_grad_(False))"
            )
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    beta = V.unit_interval(beta, "beta")
    temperature, cap_s = V.transform_scalars(temperature, softcap)
    cap_t = V.softcap_value(teacher_softcap, temperature)
    keep = _kept_rows(labels, ignore_index, ignore_mask, hidden)
    if tile_bytes is not None and (
        isinstance(tile_bytes, bool) or not isinstance(tile_bytes, int) or tile_bytes < 1
    ):
        raise ValueError(f"tile_bytes must be a positive int, got {tile_bytes!r}")

    if process_group is not None:
        _check_group(process_group, hidden, weight, bias)
    # fp64 runs on the reference (in fp64), except across a process group, whose tiles compute in fp32.
    why = _backend.fp64_reason(hidden, teacher_hidden) if process_group is None else None
    name = _backend.choose("linear_token_jeffreys", backend, hidden.device, needs_reference=why)
    h_s = hidden.reshape(-1, hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    if why is not None:  # choose gave the reference (or raised)
        from .reference.linear_token_jeffreys import linear_token_jeffreys as reference

        div = reference(
            h_s,
            weight,
            h_t,
            teacher_weight,
            bias=bias,
            teacher_bias=teacher_bias,
            beta=beta,
            divergence=divergence,
            temperature=temperature,
            softcap=cap_s,
            teacher_softcap=cap_t,
            ignore_mask=~keep,
        )
        if not return_entropy:
            return div.view(lead)
        from .reference.token_logprobs import token_logprobs as ref_token_logprobs

        with torch.no_grad():  # the entropy is a diagnostic: no gradient, as on the tiled path
            logits = h_s.to(div.dtype) @ weight.to(div.dtype).T
            if bias is not None:
                logits = logits + bias.to(div.dtype)
            first = torch.zeros(h_s.shape[0], dtype=torch.long, device=h_s.device)
            _, ent = ref_token_logprobs(
                logits, first, temperature=temperature, softcap=cap_s, return_entropy=True
            )
            ent = torch.where(keep, ent, torch.zeros((), dtype=ent.dtype, device=ent.device))
        return div.view(lead), ent.view(lead)
    from .ops.linear_token_jeffreys import LinearTokenJeffreys, tile_columns

    cols = tile_columns(h_s.shape[0], weight.shape[0], hidden.device, tile_bytes)
    div, ent = LinearTokenJeffreys.apply(
        h_s,
        weight,
        bias,
        h_t,
        teacher_weight,
        teacher_bias,
        keep,
        beta,
        divergence,
        temperature,
        cap_s,
        cap_t,
        name,
        cols,
        process_group,
    )
    return (div.view(lead), ent.view(lead)) if return_entropy else div.view(lead)


def _check_group(group, hidden, weight, bias):
    """Every rank must agree on what decides the collectives: N, V per rank, and which grads are needed."""
    import torch.distributed as dist

    mine = torch.tensor(
        [
            hidden.numel() // max(hidden.shape[-1], 1),
            weight.shape[0],
            int(hidden.requires_grad),
            int(bias is None),
        ],
        dtype=torch.float64,
    )
    if dist.get_backend(group) == "nccl":
        mine = mine.to(hidden.device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(lo, hi):
        names = ("rows N", "vocabulary rows per rank", "hidden.requires_grad", "bias is None")
        diff = [f"{n}: {int(a)}..{int(b)}" for n, a, b in zip(names, lo.tolist(), hi.tolist()) if a != b]
        raise ValueError(
            "linear_token_jeffreys(process_group=...): the ranks disagree on "
            + ", ".join(diff)
            + " (every rank needs the same tokens, equal vocabulary slices and the same requires_grad)"
        )
