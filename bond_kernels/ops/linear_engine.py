"""The chunked engine of the fused linear head: ``linear_token_logprobs`` tile by tile, never holding (N, V).

Math (the spec is ``bond_kernels.reference.linear_token_logprobs``)::

    x = hidden · weightᵀ + bias                      (N, V), never held whole
    z = softcap·tanh(x / softcap) / temperature
    logp[i] = z[i, y_i] − logsumexp_v z[i, v]        entropy[i] = logsumexp_v z[i, v] − Σ_v p[i, v]·z[i, v]

Every backend runs this engine; a backend only changes the tile plan (``ops/linear_plan.py``) and the
per-tile kernels (:class:`TileKernels`).  :class:`Chunked` binds the two into the launchers that the custom
ops (``ops/linear_token_logprobs.py``) find through ``_backend.impl("linear_token_logprobs", backend)``
(``CPU``, ``TRITON``, ``TORCH`` below); ``bond_kernels.distributed`` runs :func:`local_forward` /
:func:`local_backward` on its vocabulary shard with the same objects' ``.plan`` and ``.tiles``.

* The (N, V) logits are visited in tiles of ``rows × vocab`` (a ``Plan``).  Each tile is one matmul
  (``torch.mm``/``addmm``: BLAS on CPU, cuBLAS on GPU) followed by the per-token kernels of the backend
  (``token_logprobs_fwd``/``token_logprobs_bwd`` of ``_backend.impl("token_logprobs", backend)``, launcher
  contract in ``ops/token_logprobs.py``) run on the tile with *local* labels.
* Forward: each vocabulary tile gives per-row partial statistics (tile log-sum-exp ``l_k``, tile mean
  ``S_k = Σ softmax_k(z)·z`` for the entropy, and the target logit when the label falls in the tile).  They
  are combined at the end, ``lse = logsumexp_k l_k``, ``S = Σ_k exp(l_k − lse)·S_k`` — the same combine that
  ``bond_kernels.distributed`` then runs across ranks.  Only O(N · tiles) floats are kept.
* Backward: the tile logits are recomputed, the backward kernel turns them (in place) into ``dlogits`` using
  the GLOBAL ``lse`` and entropy; then ``grad_hidden += dlogits·W_tile``, ``grad_weight[tile] (+)=
  dlogitsᵀ·hidden_rows`` and ``grad_bias[tile] += Σ_rows dlogits``.
* Local labels (:func:`local_labels`): a row whose label lies in the tile gets ``label − tile_start``; an
  ignored row gets ``KERNEL_IGNORE`` (−1, never a valid local id); a row whose label lies outside the tile
  gets 0 so that the kernels still produce its log-sum-exp.  In the backward that row then carries a
  spurious one-hot at column 0, which the tile kernels' ``fixup`` overwrites with the exact value (computed
  in fp32 from the saved column-0 logit): O(rows) work, and no bf16 cancellation (``g(1 − p) − g`` would
  lose ~2⁻⁹·g).  The fix-up is ``fixup_column0_triton`` for triton, the torch one of
  ``reference/launchers.py`` otherwise.

Memory (analysis, see the plans): one tile of logits, an fp32 ``grad_hidden`` accumulator of ``rows × H``,
the gradients themselves, and O(N) statistics.

Kept tiles (``recompute="auto"``, the default when the weight needs a gradient): the backward needs a
``(V, H)`` buffer for ``grad_weight`` anyway.  The forward allocates it early and stores in it the logits of
the last vocabulary tiles, as many as fit in its first part while leaving the rows ``grad_weight`` of those
tiles will occupy untouched (``n·(V − c) ≤ c·H`` for kept columns ``[c, V)``: a fraction ``H / (N + H)`` of
the vocabulary, 1/3 at N = 2·H).  The backward processes the kept tiles first (no recompute; their
``grad_weight`` rows lie past the stored logits), then recomputes the others, whose ``grad_weight`` rows
overwrite the consumed logits.  At N = 2·H this removes 1/12 of the four matmuls, and so lifts the ceiling
of the recompute schedule from 0.75 to 0.82 of the matmul rate in the 6·N·H·V accounting, at no cost in
peak memory: the buffer is allocated in the forward instead of the backward.  What it does cost is that
the buffer lives from the forward to the backward (see :class:`Kept`).

The GPU schedule (the ``triton`` backend; chosen on analysis, the GPU measurement is owed, see BENCHMARKS.md):

* Arithmetic floor.  Forward + backward needs ``x = h·Wᵀ`` (2·N·H·V), ``grad_h = dx·W`` and
  ``grad_W = dxᵀ·h`` (4·N·H·V).  Without keeping the (N, V) logits (2.1 GB in bf16 at N = 8192,
  V = 128256: over the 1.2 GB budget on its own) the backward must recompute ``x``: 8·N·H·V in all, a
  ceiling of 6/8 = 0.75 of the matmul rate in the 6·N·H·V accounting, which is exactly docs/performance.md's
  target: any overhead beside the matmuls would miss it.  The upstream gradient of each token is unknown
  until the backward, so ``grad_W`` cannot be formed in the forward (Liger's trick needs a scalar loss).
  The kept tiles are what the recompute CAN avoid: at the benchmark shape 42240 of 128256 columns (tiles
  21-31 of 32) are kept, the backward recomputes 86016 columns, the matmuls total 7.34·N·H·V, and the
  ceiling becomes 0.82.  ``recompute="full"`` is the schedule without them; the benchmark measures both in
  one run.  What decides the result beyond that is how close each matmul runs to the card's measured bf16
  rate, and how little else runs beside them.
* Why cuBLAS tiles and not a fused Triton tile-matmul with an online log-sum-exp across vocabulary tiles:
  the target is a fraction of the ``torch.mm`` (cuBLAS) rate, and cuBLAS runs these tile shapes
  (8192 × 4096 × 4096) at that rate by construction; a hand-written Triton matmul can at best match it
  (not measured here), and a fused backward needs either atomics on ``grad_h``/``grad_W`` (run-to-run
  differences) or a second kernel per operand.  The per-token work between the matmuls is memory-bound and
  small next to them: per logit the four matmuls do 8·H = 32768 FLOPs (45 ps at 723 TFLOP/s) while the
  token kernels move 6 bytes (forward read; backward read + write: 2 ps at 3 TB/s), about 4 %.
* The forward combines per-tile log-sum-exps at the end (one ``logsumexp`` over a (tiles, N) array), so a
  tile costs one ``addmm`` and one token-kernel launch; the backward costs one ``addmm`` (recompute), the
  token backward kernel (in place), the fix-up (the O(N) correction for rows whose label lies in another
  tile), and two matmuls.
* Accuracy: the tiles hold the logits in the input dtype, exactly as ``(h @ W.T).float().log_softmax()``
  does in eager PyTorch; everything after the matmul runs in fp32.
"""

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import _backend
from ..reference.launchers import token_logprobs_fixup_column0
from .linear_extras import Extras
from .linear_plan import Plan, cpu_plan, gpu_plan
from .token_logprobs import full_lse

# Kernels treat this label as "ignored".  User labels are remapped to it, so a user ignore_index that is a
# valid vocabulary id (ignore_index=0 for a pad token) cannot collide with the clamped local label 0.
KERNEL_IGNORE = -1


def local_labels(labels, ignore_index, offset, width):
    """The kernels' labels for the vocabulary columns ``[offset, offset + width)``, and which rows hold theirs.

    labels (n,) int64 global ids.  ``offset``, ``width``: ints (one slice: a vocabulary shard), or (K, 1)
    int64 tensors (K tiles at once).  Returns ``(loc, inside, keep)``: ``loc`` (n,) or (K, n) int64,
    ``label − offset`` where the label lies in the slice, ``KERNEL_IGNORE`` for an ignored row, 0 elsewhere
    (so the kernels still give that row its log-sum-exp; see the module docstring); ``inside`` of the same
    shape, bool; ``keep`` (n,) bool, the rows not ignored.
    """
    keep = labels != ignore_index
    rel = labels - offset
    inside = keep & (rel >= 0) & (rel < width)
    outside = torch.where(keep, torch.zeros_like(labels), torch.full_like(labels, KERNEL_IGNORE))
    return torch.where(inside, rel, outside), inside, keep


def _tile_labels(y, ignore_index, v_offset, v_local, vocab):
    """:func:`local_labels` for every ``vocab``-column tile of ``[v_offset, v_offset + v_local)``: (K, n)."""
    starts = torch.arange(0, v_local, vocab, device=y.device, dtype=torch.int64).unsqueeze(-1)
    widths = (v_local - starts).clamp(max=vocab)
    return local_labels(y, ignore_index, v_offset + starts, widths)


# --------------------------------------------------------------------------------------------------------
# the engine: statistics and gradients over one vocabulary slice
# --------------------------------------------------------------------------------------------------------
def _tile_logits(h_rows, weight, bias, v0, v1, plan, out=None):
    w = weight[v0:v1]
    if w.dtype != plan.compute_dtype:
        w = w.to(plan.compute_dtype)
    if bias is None:
        return torch.mm(h_rows, w.t(), out=out)
    b = bias[v0:v1]
    if b.dtype != plan.compute_dtype:
        b = b.to(plan.compute_dtype)
    return torch.addmm(b, h_rows, w.t(), out=out)


@dataclass
class Kept:
    """Logits of the vocabulary tiles ``first …`` stored by the forward in the future ``grad_weight`` buffer.

    ``buf`` is a flat ``V_local·H`` tensor of the weight's dtype: tile ``k ≥ first`` (columns ``[v0, v1)``) is
    the contiguous ``(n, v1 − v0)`` block at element ``n·(v0 − first·vocab)``.  The backward consumes it once
    (it becomes ``grad_weight``); ``plan`` is the forward's, so a changed tile override cannot misread it.
    Cost: ``V_local·H`` elements held from the forward to the backward, one buffer per call; a caller that
    runs several forwards before one backward pays that once per call (``recompute="full"`` does not).
    """

    buf: torch.Tensor
    first: int
    plan: Plan

    def tile(self, k, v0, v1, n):
        start = n * (v0 - self.first * self.plan.vocab)
        return self.buf[start : start + n * (v1 - v0)].view(n, v1 - v0)


def make_kept(n, weight, plan) -> Optional[Kept]:
    """The :class:`Kept` buffer for ``n`` rows over ``weight``'s vocabulary, or None when no tile can be kept.

    None when the rows span several row blocks (``grad_weight`` then sums over blocks, so its buffer is busy
    from the first block on), when the tiles are not in the weight's dtype (CPU fp32 tiles of a bf16 weight),
    or when not even the last tile fits.
    """
    v, h = weight.shape
    if n == 0 or n > plan.rows or plan.compute_dtype != weight.dtype or v == 0:
        return None
    k_tiles = (v + plan.vocab - 1) // plan.vocab
    # Smallest tile-aligned first kept column c with n·(V − c) ≤ c·H, i.e. c ≥ n·V / (n + H).
    c_min = (n * v + n + h - 1) // (n + h)
    first = (c_min + plan.vocab - 1) // plan.vocab
    if first >= k_tiles:
        return None
    return Kept(torch.empty(v * h, dtype=weight.dtype, device=weight.device), first, plan)


def combine_stats(lse_k, s_k):
    """Combine per-part (K, n) log-sum-exps and entropy means into (n,) totals; -inf parts contribute 0."""
    lse = torch.logsumexp(lse_k, dim=0)
    if s_k is None:
        return lse, None
    zero = torch.zeros((), dtype=lse_k.dtype, device=lse_k.device)
    dead = torch.isneginf(lse_k)
    w = torch.where(dead, zero, torch.exp(lse_k - lse.unsqueeze(0)))
    s = (w * torch.where(dead, zero, s_k)).sum(0)
    return lse, s


def _masks_tile(bias, v0, v1) -> bool:
    """True if the bias masks some word of the tile with -inf (CPU tensors, outside torch.compile: reading
    values elsewhere would synchronise)."""
    if bias is None or bias.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(torch.isneginf(bias[v0:v1]).any())


def local_forward(
    hidden,
    weight,
    bias,
    labels,
    *,
    v_offset,
    temperature,
    softcap,
    ignore_index,
    want_ent,
    tk,
    plan,
    kept=None,
    extras=None,
):
    """Statistics of each row over this weight's rows (a vocabulary slice starting at global id ``v_offset``).

    hidden (N, H); weight (V_local, H); bias (V_local,) or None; labels (N,) int64 global ids.
    Returns ``(lse, s, target, found)``, each (N,) in the statistics dtype (``found`` bool): log-sum-exp of
    ``z`` over the slice, ``Σ softmax(z)·z`` over the slice (None unless ``want_ent``), ``z[label]`` where the
    label lies in the slice (0 elsewhere), and whether it does.  Ignored rows hold unspecified values.
    ``kept`` (from :func:`make_kept` with this ``plan``): the kept tiles' logits are written there.
    ``extras`` (an ``Extras`` of ops/linear_extras.py): each tile is folded into it, in this same pass.
    """
    n = hidden.shape[0]
    v_local = weight.shape[0]
    # The per-tile statistics are combined in fp64 (O(N·tiles) work): in fp32 the entropy's combine
    # H = lse − Σ_k w_k·S_k loses ~2^-24·|z| per tile, 8e-6 at 257 one-column tiles (1e-6 untiled), which
    # the entropy gradient inherits.  The outputs are rounded to fp32 once, at the end.
    sd = torch.float64
    lse = torch.empty(n, dtype=sd, device=hidden.device)
    s = torch.empty(n, dtype=sd, device=hidden.device) if want_ent else None
    target = torch.empty(n, dtype=sd, device=hidden.device)
    found = torch.empty(n, dtype=torch.bool, device=hidden.device)
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        h_rows = hidden[r0:r1]
        if h_rows.dtype != plan.compute_dtype:
            h_rows = h_rows.to(plan.compute_dtype)
        loc, in_tile, _ = _tile_labels(labels[r0:r1], ignore_index, v_offset, v_local, plan.vocab)
        lse_parts, s_parts, logp_parts = [], [], []
        for k, v0 in enumerate(range(0, v_local, plan.vocab)):
            v1 = min(v_local, v0 + plan.vocab)
            out = kept.tile(k, v0, v1, n) if kept is not None and k >= kept.first else None
            x = _tile_logits(h_rows, weight, bias, v0, v1, plan, out=out)
            if extras is not None:
                extras.fold(x, r0, r1, v_offset + v0)
            loc_k, dead = loc[k], None
            if not softcap and _masks_tile(bias, v0, v1):
                # A bias of -inf over the whole tile leaves rows with no finite logit in it, which the per-row
                # kernels reject; globally they are fine (other tiles have mass): run them as ignored and
                # give them the tile statistics of an empty tile (lse -inf).  Read on CPU tensors only.
                dead = torch.isneginf(x).all(-1)
                loc_k = torch.where(dead, torch.full_like(loc_k, KERNEL_IGNORE), loc_k)
            logp_k, lse_k, ent_k = tk.fwd(x, loc_k, temperature, softcap, KERNEL_IGNORE, want_ent)
            lse_k = full_lse(lse_k, temperature, softcap)  # tiles combine whole log-sum-exps
            if dead is not None:
                lse_k = torch.where(dead, torch.full_like(lse_k, float("-inf")), lse_k)
            del x
            lse_parts.append(lse_k)
            logp_parts.append(logp_k)
            if want_ent:
                s_parts.append(lse_k - ent_k)
        lse_k = torch.stack(lse_parts).to(sd)
        tot, s_tot = combine_stats(lse_k, torch.stack(s_parts).to(sd) if want_ent else None)
        lse[r0:r1] = tot
        if want_ent:
            s[r0:r1] = s_tot
        zero = torch.zeros((), dtype=sd, device=hidden.device)
        # a tile without mass for the row (lse -inf) holds its label only with logit -inf: no NaN from -inf + inf
        z_y = torch.where(torch.isneginf(lse_k), lse_k, torch.stack(logp_parts).to(sd) + lse_k)
        target[r0:r1] = torch.where(in_tile, z_y, zero).sum(0)
        found[r0:r1] = in_tile.any(0)
    return lse, s, target, found


def _accumulate(dst, a, b, first):
    """``dst (=|+=) a @ b`` with fp32 accumulation when ``dst`` is fp32 and ``a``/``b`` are bf16/fp16."""
    if a.dtype == dst.dtype:
        if first:
            torch.mm(a, b, out=dst)
        else:
            dst.addmm_(a, b)
        return
    if dst.is_cuda and _mm_out_dtype_ok(dst.device):
        # One cuBLAS call with an fp32 output: no (rows, H) bf16 temporary and no bf16 rounding of the sum.
        if first:
            torch.mm(a, b, out_dtype=dst.dtype, out=dst)
        else:
            torch.addmm(dst, a, b, out_dtype=dst.dtype, out=dst)
        return
    # No fp32-output matmul: a temporary product in the inputs' dtype, in row chunks so that it stays
    # small (2048 rows × H = 4096 bf16 is 16 MiB) next to the (rows, H) accumulator.
    for i in range(0, a.shape[0], _PRODUCT_ROWS):
        prod = torch.mm(a[i : i + _PRODUCT_ROWS], b)
        if first:
            dst[i : i + _PRODUCT_ROWS].copy_(prod)
        else:
            dst[i : i + _PRODUCT_ROWS].add_(prod)


_PRODUCT_ROWS = 2048


_MM_OUT_DTYPE = {}


def _mm_out_dtype_ok(device) -> bool:
    """Whether this torch has ``mm``/``addmm`` with ``out_dtype`` (bf16 in, fp32 out) on CUDA; probed once."""
    key = str(device)
    if key not in _MM_OUT_DTYPE:
        try:
            a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
            acc = torch.zeros(16, 16, dtype=torch.float32, device=device)
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            _MM_OUT_DTYPE[key] = bool(acc[0, 0].item() == 32.0)
        except Exception:  # older torch: no out_dtype overloads
            _MM_OUT_DTYPE[key] = False
    return _MM_OUT_DTYPE[key]


def local_backward(
    hidden,
    weight,
    bias,
    labels,
    lse,
    ent,
    grad_logp,
    grad_ent,
    *,
    v_offset,
    temperature,
    softcap,
    ignore_index,
    tk,
    plan,
    need_hidden,
    need_weight,
    need_bias,
    hidden_grad_fp32=False,
    kept=None,
):
    """Gradients of ``Σ g·logp + Σ g_ent·entropy`` through this vocabulary slice, from GLOBAL lse/entropy.

    Returns ``(grad_hidden, grad_weight, grad_bias)`` (None where not needed).  ``grad_hidden`` is this
    slice's contribution (the full gradient when the slice is the whole vocabulary), in hidden's dtype, or
    fp32 with ``hidden_grad_fp32`` (the vocab-parallel caller all-reduces it before casting).
    ``kept``: the forward's :class:`Kept` (then ``plan`` must be ``kept.plan``); it is consumed, and becomes
    ``grad_weight``.
    """
    n, _ = hidden.shape
    v_local = weight.shape[0]
    dev = hidden.device
    sd = lse.dtype
    want_ent = grad_ent is not None and grad_ent.numel() > 0
    g = grad_logp.to(sd).contiguous()
    ge = grad_ent.to(sd).contiguous() if want_ent else lse.new_empty(0)
    ent_arg = ent.to(sd).contiguous() if want_ent else lse.new_empty(0)
    acc_dtype = torch.float64 if sd == torch.float64 else torch.float32
    gh = gw = gb = None
    gh_dtype = acc_dtype if hidden_grad_fp32 else hidden.dtype
    # grad_hidden accumulates over vocabulary tiles in fp32.  When the output is fp32 it is its own
    # accumulator.  Otherwise, with one row block, the output (in hidden's dtype) is only allocated after
    # the loop, once the last tile is freed: peak = accumulator + tile, not accumulator + tile + output.
    single_block = n <= plan.rows
    if need_hidden and (gh_dtype == acc_dtype or not single_block):
        gh = torch.empty(hidden.shape, dtype=gh_dtype, device=dev)
    if need_weight:
        if kept is not None:
            gw = kept.buf.view(weight.shape)
        else:
            gw = torch.empty(weight.shape, dtype=weight.dtype, device=dev)
    # Kept tiles first: their grad_weight rows lie past the stored logits, which the other tiles' grad_weight
    # rows overwrite once every kept tile is consumed (the Kept layout, module docstring).
    k_tiles = (v_local + plan.vocab - 1) // plan.vocab
    first_kept = kept.first if kept is not None else k_tiles
    order = list(range(first_kept, k_tiles)) + list(range(first_kept))
    if need_bias:
        gb_acc = torch.zeros(v_local, dtype=acc_dtype, device=dev)
    for r0 in range(0, n, plan.rows):
        r1 = min(n, r0 + plan.rows)
        first_rows = r0 == 0
        h_rows = hidden[r0:r1]
        if h_rows.dtype != plan.compute_dtype:
            h_rows = h_rows.to(plan.compute_dtype)
        loc, in_tile, keep = _tile_labels(labels[r0:r1], ignore_index, v_offset, v_local, plan.vocab)
        if need_hidden:
            direct = gh_dtype == acc_dtype  # accumulate straight into the output rows
            acc = gh[r0:r1] if direct else torch.empty(r1 - r0, hidden.shape[1], dtype=acc_dtype, device=dev)
        rows_lse, rows_g = lse[r0:r1].contiguous(), g[r0:r1]
        rows_ent = ent_arg[r0:r1].contiguous() if want_ent else ent_arg
        rows_ge = ge[r0:r1] if want_ent else ge
        for i, k in enumerate(order):
            v0 = k * plan.vocab
            v1 = min(v_local, v0 + plan.vocab)
            if k >= first_kept:
                x = kept.tile(k, v0, v1, r1 - r0)
            else:
                x = _tile_logits(h_rows, weight, bias, v0, v1, plan)
            x0 = x[:, 0].to(sd, copy=True)  # a copy: the kernel below overwrites x with its gradient
            d = tk.bwd(
                x, loc[k], rows_lse, rows_ent, rows_g, rows_ge, temperature, softcap, KERNEL_IGNORE, True
            )
            tk.fixup(d, x0, keep & ~in_tile[k], rows_lse, rows_ent, rows_g, rows_ge, temperature, softcap)
            if need_bias:
                gb_acc[v0:v1] += d.sum(0, dtype=acc_dtype)
            if need_weight:
                w_slice = gw[v0:v1]
                if d.dtype == w_slice.dtype:
                    _accumulate(w_slice, d.t(), h_rows, first_rows)
                else:  # CPU fp32 tiles for a bf16/fp16 weight: round each row block's sum once
                    part = torch.mm(d.t(), h_rows).to(w_slice.dtype)
                    if first_rows:
                        w_slice.copy_(part)
                    else:
                        w_slice.add_(part)
            if need_hidden:
                w = weight[v0:v1]
                if w.dtype != plan.compute_dtype:
                    w = w.to(plan.compute_dtype)
                _accumulate(acc, d, w, i == 0)
            del x, d
        if need_hidden and not direct:
            if gh is None:  # single row block: the tile is gone, the output replaces the accumulator
                gh = acc.to(gh_dtype)
            else:
                gh[r0:r1] = acc
            del acc
    if need_bias:
        gb = gb_acc.to(bias.dtype)
    return gh, gw, gb


# --------------------------------------------------------------------------------------------------------
# single-process outputs, and the launchers of one backend
# --------------------------------------------------------------------------------------------------------
def finish_forward(lse, s, target, found, labels, ignore_index, want_ent):
    """Single-process outputs from whole-vocabulary statistics: ``(logp, lse, entropy)`` (fp32).

    A label outside [0, V) that is not ignored gives NaN (the kernels' no-sync contract).
    """
    keep = labels != ignore_index
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    nan = torch.full((), float("nan"), dtype=lse.dtype, device=lse.device)
    logp = torch.where(keep, torch.where(found, target - lse, nan), zero)
    ent = torch.where(keep, lse - s, zero) if want_ent else lse.new_empty(0)
    return logp, torch.where(keep, lse, zero), ent


def engine_forward(
    hidden, weight, bias, labels, temperature, softcap, ignore_index, want_ent, tk, plan, kept=None, ex=None
):
    """:func:`local_forward` over the whole vocabulary (folding ``ex``), then :func:`finish_forward`."""
    lse, s, target, found = local_forward(
        hidden,
        weight,
        bias,
        labels,
        v_offset=0,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        want_ent=want_ent,
        tk=tk,
        plan=plan,
        kept=kept,
        extras=ex,
    )
    return finish_forward(lse, s, target, found, labels, ignore_index, want_ent)


@dataclass(frozen=True)
class TileKernels:
    """The per-tile kernels of one backend: ``fwd``/``bwd`` its token launchers (contract in
    ``ops/token_logprobs.py``), ``fixup`` the column-0 fix-up (contract:
    ``reference.launchers.token_logprobs_fixup_column0``)."""

    name: str
    fwd: Callable
    bwd: Callable
    fixup: Callable


def _tile_kernels(backend: str) -> TileKernels:
    """The registry's token launchers of ``backend`` and its fix-up; raises (no fall-back) if it has none."""
    token = _backend.impl("token_logprobs", backend)
    try:
        fwd, bwd = token.token_logprobs_fwd, token.token_logprobs_bwd
    except AttributeError as exc:
        raise RuntimeError(
            f"linear_token_logprobs: backend {backend!r} has no per-tile token kernels ({exc})"
        ) from exc
    if backend == "triton":
        # imported here, not at the top: a CPU-only install without triton imports this module
        from .triton.linear_token_logprobs import fixup_column0_triton as fixup
    else:
        fixup = token_logprobs_fixup_column0
    return TileKernels(backend, fwd, bwd, fixup)


class Chunked:
    """The engine's launchers for one backend: its tile plan and its per-tile kernels.

    ``plan(n, v, h, dtype)`` sizes the tiles; ``tiles`` are the per-tile kernels (loaded on first use).
    fwd: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64 -> (logp, lse, entropy) fp32 (N,),
    a :class:`Kept` when ``keep`` is true and the plan allows one (else None), and the ``extras`` (a bit mask,
    ``ops/linear_extras.py``) as ``(log_sum_sq_probs, mean_logits, is_top1)``, empty where not asked.
    bwd: returns ``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtypes (None where not needed);
    given the forward's ``kept`` it consumes it (``grad_weight`` is its buffer).
    """

    def __init__(self, backend: str, plan_fn: Callable[..., Plan]):
        self.backend = backend
        self._plan_fn = plan_fn
        self._tiles = None

    def __repr__(self):
        return f"Chunked({self.backend!r}, {self._plan_fn.__name__})"

    def plan(self, n, v, h, dtype) -> Plan:
        return self._plan_fn(n, v, h, dtype)

    @property
    def tiles(self) -> TileKernels:
        if self._tiles is None:
            self._tiles = _tile_kernels(self.backend)
        return self._tiles

    def fwd(
        self, hidden, weight, bias, labels, temperature, softcap, ignore_index, entropy, keep=False, extras=0
    ):
        n, v = hidden.shape[0], weight.shape[0]
        plan = self.plan(n, v, hidden.shape[1], hidden.dtype)
        kept = make_kept(n, weight, plan) if keep else None
        ex = Extras(extras, n, v, temperature, softcap, self.backend, hidden.device) if extras else None
        out = engine_forward(
            hidden,
            weight,
            bias,
            labels,
            temperature,
            softcap,
            ignore_index,
            entropy,
            self.tiles,
            plan,
            kept,
            ex,
        )
        return (*out, kept, Extras.results(ex, out[1], labels, ignore_index))

    def bwd(
        self,
        hidden,
        weight,
        bias,
        labels,
        lse,
        ent,
        grad_logp,
        grad_ent,
        temperature,
        softcap,
        ignore_index,
        need_hidden,
        need_weight,
        need_bias,
        kept=None,
    ):
        if kept is not None:
            plan = kept.plan
        else:
            plan = self.plan(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)
        return local_backward(
            hidden,
            weight,
            bias,
            labels,
            lse,
            ent,
            grad_logp,
            grad_ent,
            v_offset=0,
            temperature=temperature,
            softcap=softcap,
            ignore_index=ignore_index,
            tk=self.tiles,
            plan=plan,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            kept=kept,
        )


# The registry's entries (_backend._REGISTRY["linear_token_logprobs"]).  The torch backend's public path is
# the reference itself; these torch launchers (torch tile kernels, the CPU tile budget, fp32 or fp64) serve
# the vocabulary-parallel op and the tests of the engine.
CPU = Chunked("cpu", cpu_plan)
TRITON = Chunked("triton", gpu_plan)
TORCH = Chunked("torch", cpu_plan)
