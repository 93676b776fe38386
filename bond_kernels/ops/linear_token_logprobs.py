"""Fused linear head + per-token log-probs: custom ops, autograd, and the chunked engine behind them.

Math (the spec is :func:`linear_token_logprobs_reference`)::

    x = hidden · weightᵀ + bias                      (N, V), never held whole
    z = softcap·tanh(x / softcap) / temperature
    logp[i] = z[i, y_i] − logsumexp_v z[i, v]        entropy[i] = logsumexp_v z[i, v] − Σ_v p[i, v]·z[i, v]

Chunked engine (used by the ``cpu`` backend here and by the ``triton`` backend in
``ops/triton/linear_token_logprobs.py``, which only changes the plan and the kernels):

* The (N, V) logits are visited in tiles of ``rows × vocab`` (a :class:`Plan`).  Each tile is one matmul
  (``torch.mm``/``addmm``: BLAS on CPU, cuBLAS on GPU) followed by the per-token kernels of the backend
  (``token_logprobs_fwd``/``token_logprobs_bwd``, launcher contract in ``ops/token_logprobs.py``) run on the
  tile with *local* labels.
* Forward: each vocabulary tile gives per-row partial statistics (tile log-sum-exp ``l_k``, tile mean
  ``S_k = Σ softmax_k(z)·z`` for the entropy, and the target logit when the label falls in the tile).  They
  are combined at the end, ``lse = logsumexp_k l_k``, ``S = Σ_k exp(l_k − lse)·S_k`` — the same combine that
  ``bond_kernels.distributed`` then runs across ranks.  Only O(N · tiles) floats are kept.
* Backward: the tile logits are recomputed, the backward kernel turns them (in place) into ``dlogits`` using
  the GLOBAL ``lse`` and entropy; then ``grad_hidden += dlogits·W_tile``, ``grad_weight[tile] (+)=
  dlogitsᵀ·hidden_rows`` and ``grad_bias[tile] += Σ_rows dlogits``.
* Local labels: a row whose label lies in the tile gets ``label − tile_start``; an ignored row gets −1 (the
  ignore value handed to the kernels, never a valid local id); a row whose label lies outside the tile gets
  0 so that the kernels still produce its log-sum-exp.  In the backward that row then carries a spurious
  one-hot at column 0, which :func:`fixup_column0` overwrites with the exact value (computed in fp32 from
  the saved column-0 logit): O(rows) work, and no bf16 cancellation (``g(1 − p) − g`` would lose ~2⁻⁹·g).

Memory (analysis, see the plan helpers): one tile of logits, an fp32 ``grad_hidden`` accumulator of
``rows × H``, the gradients themselves, and O(N) statistics.

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
"""

import logging
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from .. import _backend
from .token_logprobs import full_lse

logger = logging.getLogger("bond_kernels")

# Kernels treat this label as "ignored".  User labels are remapped to it, so a user ignore_index that is a
# valid vocabulary id (ignore_index=0 for a pad token) cannot collide with the clamped local label 0.
_KERNEL_IGNORE = -1

# CPU tile budget: 64 MiB of fp32 logits (16M elements) keeps the tile, its softmax temporaries and the
# upcast weight slice inside a few hundred MB even on the torch fallback path.
CPU_TILE_BYTES = 64 << 20
# CPU row block: 4096 rows × H = 4096 fp32 is a 64 MiB grad_hidden accumulator.
CPU_MAX_ROWS = 4096


# --------------------------------------------------------------------------------------------------------
# the reference (the ``torch`` backend): materialises the logits
# --------------------------------------------------------------------------------------------------------
def linear_token_logprobs_reference(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    temperature=1.0,
    softcap=None,
    ignore_index=-100,
    return_entropy=False,
):
    """``token_logprobs(hidden·weightᵀ + bias, labels)`` computed in fp32 (fp64 for fp64), logits materialised.

    hidden (..., H), weight (V, H), bias (V,) or None, labels (...) -> logp (...) [, entropy (...)].
    """
    from ..reference import token_logprobs
    from ..reference._common import compute_dtype

    dt = compute_dtype(hidden, weight)
    x = torch.nn.functional.linear(hidden.to(dt), weight.to(dt), None if bias is None else bias.to(dt))
    return token_logprobs(
        x,
        labels,
        temperature=temperature,
        softcap=softcap or None,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
    )


# --------------------------------------------------------------------------------------------------------
# per-tile token kernels: the backend's launchers, or a torch version of the same contract
# --------------------------------------------------------------------------------------------------------
def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transform(x, temperature, softcap):
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    if temperature != 1.0:
        x = x / temperature
    return x


def torch_token_fwd(logits, labels, temperature, softcap, ignore_index, return_entropy):
    """The ``token_logprobs_fwd`` launcher contract in plain torch (fp32 math; fp64 stays fp64)."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v).to(_stat_dtype(logits))
    z = _transform(x, temperature, softcap)
    keep = labels != ignore_index
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    lse = torch.logsumexp(z, dim=-1)
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = torch.where(keep, z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse, zero)
    if return_entropy:
        p = torch.exp(z - lse.unsqueeze(-1))
        zf = torch.where(torch.isneginf(z), zero, z)
        ent = torch.where(keep, lse - (p * zf).sum(-1), zero)
    else:
        ent = z.new_empty(0)
    return logp, torch.where(keep, lse, zero), ent


def torch_token_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, inplace
):
    """The ``token_logprobs_bwd`` launcher contract in plain torch: d/d logits in the logits' dtype."""
    v = logits.shape[-1]
    x = logits.reshape(-1, v).to(_stat_dtype(logits))
    z = _transform(x, temperature, softcap)
    keep = labels != ignore_index
    zero = torch.zeros((), dtype=z.dtype, device=z.device)
    lse = lse.to(z.dtype)
    g = torch.where(keep, grad_logp.to(z.dtype), zero)
    p = torch.exp(z - lse.unsqueeze(-1))
    dz = -g.unsqueeze(-1) * p
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    dz.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
    if grad_entropy.numel():
        ge = torch.where(keep, grad_entropy.to(z.dtype), zero)
        logp_v = torch.where(p > 0, z - lse.unsqueeze(-1), zero)
        dz = dz - ge.unsqueeze(-1) * p * (logp_v + entropy.to(z.dtype).unsqueeze(-1))
    dz = torch.where(keep.unsqueeze(-1), dz, zero)
    if temperature != 1.0:
        dz = dz / temperature
    if softcap:
        dz = dz * (1.0 - torch.tanh(x / softcap) ** 2)
    if inplace:
        logits.copy_(dz.view(logits.shape))
        return logits
    return dz.to(logits.dtype).view(logits.shape)


def fixup_column0(d, x0, out, lse, ent, g, g_ent, temperature, softcap):
    """Overwrite ``d[i, 0]`` for rows ``out`` (label outside the tile) with the gradient without one-hot.

    d (n, v) tile gradient; x0 (n,) the tile's column-0 logits saved before the backward kernel; out (n,)
    bool; lse, ent (n,) GLOBAL statistics (``ent`` empty when unused); g, g_ent (n,) upstream gradients::

        dz0 = −g·p0 − g_ent·p0·(log p0 + H),   p0 = exp(z0 − lse),   dx0 = dz0/T·(1 − tanh²(x0/c))
    """
    x0 = x0.to(lse.dtype)
    z0 = _transform(x0, temperature, softcap)
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    p0 = torch.exp(z0 - lse)
    dz0 = -g.to(lse.dtype) * p0
    if g_ent is not None and g_ent.numel():
        logp0 = torch.where(p0 > 0, z0 - lse, zero)
        dz0 = dz0 - g_ent.to(lse.dtype) * p0 * (logp0 + ent.to(lse.dtype))
    if temperature != 1.0:
        dz0 = dz0 / temperature
    if softcap:
        dz0 = dz0 * (1.0 - torch.tanh(x0 / softcap) ** 2)
    col = d[:, 0]
    col.copy_(torch.where(out, dz0.to(d.dtype), col))


@dataclass(frozen=True)
class TokenKernels:
    """The per-tile kernels one backend provides (launcher contract of ``ops/token_logprobs.py``)."""

    name: str
    fwd: Callable
    bwd: Callable
    fixup: Callable = fixup_column0


_TORCH_KERNELS = TokenKernels("torch", torch_token_fwd, torch_token_bwd)
_said = set()


def token_kernels(backend: str) -> TokenKernels:
    """The backend's per-token launchers; the torch versions when the backend does not (yet) provide them."""
    if backend == "torch":
        return _TORCH_KERNELS
    try:
        mod = _backend.impl("token_logprobs", backend)
        fwd, bwd = mod.token_logprobs_fwd, mod.token_logprobs_bwd
    except (ImportError, AttributeError, RuntimeError) as exc:
        if backend not in _said:
            _said.add(backend)
            logger.info(
                "bond_kernels: %s token kernels unavailable (%s); linear tiles use torch", backend, exc
            )
        return _TORCH_KERNELS
    return TokenKernels(backend, fwd, bwd)


# --------------------------------------------------------------------------------------------------------
# tiling plan
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Tile shape and the dtype the tile matmuls run in."""

    rows: int
    vocab: int
    compute_dtype: torch.dtype


def _env_override():
    """``BOND_KERNELS_LINEAR_TILE="rows,vocab"`` (0 = automatic) fixes the tile shape (tuning and tests)."""
    spec = os.environ.get("BOND_KERNELS_LINEAR_TILE", "").strip()
    if not spec:
        return 0, 0
    try:
        rows, vocab = (int(s) for s in spec.split(","))
    except ValueError:
        raise ValueError(
            f"BOND_KERNELS_LINEAR_TILE must be 'rows,vocab' (integers, 0 = automatic), got {spec!r}"
        ) from None
    if rows < 0 or vocab < 0:
        raise ValueError(f"BOND_KERNELS_LINEAR_TILE must hold non-negative integers, got {spec!r}")
    return rows, vocab


def make_plan(n, v, h, dtype, *, compute_dtype, tile_bytes, max_rows, vocab_multiple=1, upcast_weight=False):
    """Rows first (up to ``max_rows``), then as many vocabulary columns as ``tile_bytes`` allows."""
    rows_env, vocab_env = _env_override()
    elem = torch.empty(0, dtype=compute_dtype).element_size()
    rows = rows_env or max(1, min(n, max_rows))
    rows = min(rows, max(n, 1))
    if vocab_env:
        vocab = vocab_env
    else:
        vocab = tile_bytes // (rows * elem)
        if upcast_weight:
            # The weight slice is upcast per tile too: keep it within the same budget.
            vocab = min(vocab, tile_bytes // (max(h, 1) * elem))
        if vocab < v:
            vocab = max(vocab_multiple, vocab // vocab_multiple * vocab_multiple)
            vocab = _align_to_kept(n, v, h, rows, vocab, vocab_multiple)
    vocab = max(1, min(vocab, v))
    return Plan(rows, vocab, compute_dtype)


def _align_to_kept(n, v, h, rows, vocab, multiple):
    """Shrink the tile (never grow it) so that a tile boundary falls at the first column :func:`make_kept`
    may keep: the kept tiles then cover up to H/(N+H) of the vocabulary, not only the whole tiles past it.
    At N = 2048, H = 1024, V = 32000 with 8192-column tiles one tile (7424 columns) was kept; with 7112-column
    tiles 10664 are (the most is 10666).  Only for one row block, the case that keeps anything."""
    if n > rows or n == 0:
        return vocab
    c_min = (n * v + n + h - 1) // (n + h)
    recomputed = (c_min + vocab - 1) // vocab  # tiles before the boundary
    aligned = (c_min + recomputed - 1) // recomputed
    aligned = (aligned + multiple - 1) // multiple * multiple
    return aligned if aligned <= vocab else vocab


def cpu_plan(n, v, h, dtype) -> Plan:
    # fp32 matmuls on CPU: bf16 GEMMs without AMX are slower than fp32 ones, and fp32 keeps the CPU path
    # as accurate as the reference.
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    return make_plan(
        n,
        v,
        h,
        dtype,
        compute_dtype=compute,
        tile_bytes=CPU_TILE_BYTES,
        max_rows=CPU_MAX_ROWS,
        upcast_weight=compute != dtype,
    )


# --------------------------------------------------------------------------------------------------------
# the engine
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


def _local_labels(y, ignore_index, v_offset, v_local, vocab):
    """(K, n) int64 per-tile labels (see the module docstring), (K, n) bool 'label in tile', (n,) bool kept."""
    keep = y != ignore_index
    rel = y - v_offset
    inside = keep & (rel >= 0) & (rel < v_local)
    k_tiles = (v_local + vocab - 1) // vocab
    tile_of = torch.where(inside, torch.div(rel, vocab, rounding_mode="floor"), torch.full_like(rel, -1))
    ks = torch.arange(k_tiles, device=y.device, dtype=torch.int64).unsqueeze(-1)
    in_tile = tile_of.unsqueeze(0) == ks
    fallback = torch.where(keep, torch.zeros_like(rel), torch.full_like(rel, _KERNEL_IGNORE))
    loc = torch.where(in_tile, rel.unsqueeze(0) - ks * vocab, fallback.unsqueeze(0)).contiguous()
    return loc, in_tile, keep


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
):
    """Statistics of each row over this weight's rows (a vocabulary slice starting at global id ``v_offset``).

    hidden (N, H); weight (V_local, H); bias (V_local,) or None; labels (N,) int64 global ids.
    Returns ``(lse, s, target, found)``, each (N,) in the statistics dtype (``found`` bool): log-sum-exp of
    ``z`` over the slice, ``Σ softmax(z)·z`` over the slice (None unless ``want_ent``), ``z[label]`` where the
    label lies in the slice (0 elsewhere), and whether it does.  Ignored rows hold unspecified values.
    ``kept`` (from :func:`make_kept` with this ``plan``): the kept tiles' logits are written there.
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
        loc, in_tile, _ = _local_labels(labels[r0:r1], ignore_index, v_offset, v_local, plan.vocab)
        lse_parts, s_parts, logp_parts = [], [], []
        for k, v0 in enumerate(range(0, v_local, plan.vocab)):
            v1 = min(v_local, v0 + plan.vocab)
            out = kept.tile(k, v0, v1, n) if kept is not None and k >= kept.first else None
            x = _tile_logits(h_rows, weight, bias, v0, v1, plan, out=out)
            loc_k, dead = loc[k], None
            if not softcap and _masks_tile(bias, v0, v1):
                # A bias of -inf over the whole tile leaves rows with no finite logit in it, which the per-row
                # kernels reject; globally they are fine (other tiles have mass): run them as ignored and
                # give them the tile statistics of an empty tile (lse -inf).  Read on CPU tensors only.
                dead = torch.isneginf(x).all(-1)
                loc_k = torch.where(dead, torch.full_like(loc_k, _KERNEL_IGNORE), loc_k)
            logp_k, lse_k, ent_k = tk.fwd(x, loc_k, temperature, softcap, _KERNEL_IGNORE, want_ent)
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
        loc, in_tile, keep = _local_labels(labels[r0:r1], ignore_index, v_offset, v_local, plan.vocab)
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
                x, loc[k], rows_lse, rows_ent, rows_g, rows_ge, temperature, softcap, _KERNEL_IGNORE, True
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
# CPU launchers (the ``cpu`` backend: the C++ token kernels per tile once bond_kernels._C has them)
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
    hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, tk, plan, kept=None
):
    lse, s, target, found = local_forward(
        hidden,
        weight,
        bias,
        labels,
        v_offset=0,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        want_ent=return_entropy,
        tk=tk,
        plan=plan,
        kept=kept,
    )
    return finish_forward(lse, s, target, found, labels, ignore_index, return_entropy)


def chunked_launchers(plan_fn, kernels_fn):
    """The ``(fwd, bwd)`` launchers of the chunked engine for one backend.

    ``plan_fn(n, v, h, dtype)`` sizes the tiles; ``kernels_fn()`` gives the per-tile kernels.
    fwd: hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) int64 -> (logp, lse, entropy) fp32 (N,)
    and a :class:`Kept` when ``keep`` is true and the plan allows one (else None).
    bwd: returns ``(grad_hidden, grad_weight, grad_bias)`` in the inputs' dtypes (None where not needed);
    given the forward's ``kept`` it consumes it (``grad_weight`` is its buffer).
    """

    def fwd(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, keep=False):
        plan = plan_fn(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)
        kept = make_kept(hidden.shape[0], weight, plan) if keep else None
        out = engine_forward(
            hidden,
            weight,
            bias,
            labels,
            temperature,
            softcap,
            ignore_index,
            return_entropy,
            kernels_fn(),
            plan,
            kept,
        )
        return (*out, kept)

    def bwd(
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
            plan = plan_fn(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)
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
            tk=kernels_fn(),
            plan=plan,
            need_hidden=need_hidden,
            need_weight=need_weight,
            need_bias=need_bias,
            kept=kept,
        )

    return fwd, bwd


cpu_linear_token_logprobs_fwd, cpu_linear_token_logprobs_bwd = chunked_launchers(
    cpu_plan, lambda: token_kernels("cpu")
)


def _launchers(backend: str):
    if backend == "cpu":
        return cpu_linear_token_logprobs_fwd, cpu_linear_token_logprobs_bwd
    if backend == "triton":
        from .triton import linear_token_logprobs as tl_mod

        return tl_mod.linear_token_logprobs_fwd, tl_mod.linear_token_logprobs_bwd
    raise ValueError(f"linear_token_logprobs has no chunked launcher for backend {backend!r}")


# --------------------------------------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------------------------------------
def _empty(like):
    return torch.empty(0, dtype=like.dtype, device=like.device)


@torch.library.custom_op("bond_kernels::linear_token_logprobs_fwd", mutates_args=())
def linear_token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    return_entropy: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fwd, _ = _launchers(backend)
    logp, lse, ent, _ = fwd(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy)
    return logp.float(), lse.float(), ent.float()


@linear_token_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend):
    n = labels.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (
        hidden.new_empty(n, **f32),
        hidden.new_empty(n, **f32),
        hidden.new_empty(n if return_entropy else 0, **f32),
    )


@torch.library.custom_op("bond_kernels::linear_token_logprobs_bwd", mutates_args=())
def linear_token_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    temperature: float,
    softcap: float,
    ignore_index: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _launchers(backend)
    gh, gw, gb = bwd(
        hidden,
        weight,
        bias,
        labels,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        temperature,
        softcap,
        ignore_index,
        need_hidden,
        need_weight,
        need_bias and bias is not None,
    )
    return (
        gh if gh is not None else _empty(hidden),
        gw if gw is not None else _empty(weight),
        gb if gb is not None else _empty(weight),
    )


@linear_token_logprobs_bwd.register_fake
def _(
    hidden,
    weight,
    bias,
    labels,
    lse,
    entropy,
    grad_logp,
    grad_entropy,
    temperature,
    softcap,
    ignore_index,
    need_hidden,
    need_weight,
    need_bias,
    backend,
):
    gh = torch.empty(hidden.shape if need_hidden else (0,), dtype=hidden.dtype, device=hidden.device)
    gw = torch.empty(weight.shape if need_weight else (0,), dtype=weight.dtype, device=weight.device)
    has_b = need_bias and bias is not None
    gb = torch.empty(
        bias.shape if has_b else (0,), dtype=(bias if has_b else weight).dtype, device=weight.device
    )
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend = inputs
    _, lse, ent = output
    ctx.save_for_backward(hidden, weight, bias, labels, lse, ent)
    ctx.config = (temperature, softcap, ignore_index, backend)
    ctx.mark_non_differentiable(lse)


def _upstream(lse, ent, grad_logp, grad_ent):
    """The upstream gradients as the launchers take them: fp32, contiguous, an empty entropy one if unused."""
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    grad_logp = grad_logp.float().contiguous()
    if grad_ent is None or ent.numel() == 0:
        grad_ent = torch.empty(0, dtype=torch.float32, device=lse.device)
    else:
        grad_ent = grad_ent.float().contiguous()
    return grad_logp, grad_ent


def _gradients(ctx, grad_logp, grad_ent, bwd):
    """Both autograd paths' backward: ``bwd`` takes the launcher contract's arguments (``need_bias`` already
    false without a bias) and returns ``(grad_hidden, grad_weight, grad_bias)``."""
    hidden, weight, bias, labels, lse, ent = ctx.saved_tensors
    temperature, softcap, ignore_index, _ = ctx.config
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_logp, grad_ent = _upstream(lse, ent, grad_logp, grad_ent)
    gh, gw, gb = bwd(
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
        bool(need_h),
        bool(need_w),
        bool(need_b) and bias is not None,
    )
    return (
        gh if need_h else None,
        gw if need_w else None,
        gb if need_b and bias is not None else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, grad_logp, grad_lse, grad_ent):
    backend = ctx.config[3]
    return _gradients(ctx, grad_logp, grad_ent, lambda *args: linear_token_logprobs_bwd(*args, backend))


linear_token_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are active (non-reentrant checkpoint, ``save_on_cpu``): the kept buffer
    lives on ctx, out of their reach, so keeping there would cost what they exist to save (under checkpoint,
    the forward's buffer held to the backward plus a second one in the recomputed forward: 2·V·H at peak)."""
    try:
        return torch._C._autograd._top_saved_tensors_default_hooks(True) is not None
    except (AttributeError, TypeError, RuntimeError):  # private API: a torch without it keeps as before
        return False


class KeptLinearTokenLogprobs(torch.autograd.Function):
    """``recompute="auto"`` in eager mode: the custom op's math, plus the forward's :class:`Kept` tiles.

    The kept buffer is held on ``ctx`` (not ``save_for_backward``): the backward turns it into
    ``grad_weight`` in place, and drops the reference first, so a second backward through a retained
    graph recomputes every tile instead of reading gradients as logits.  torch.compile traces the custom
    op instead (``functional.linear_token_logprobs`` never routes a compiled call here).
    """

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend
    ):
        fwd, _ = _launchers(backend)
        logp, lse, ent, kept = fwd(
            hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, keep=True
        )
        out = logp.float(), lse.float(), ent.float()
        inputs = (hidden, weight, bias, labels, temperature, softcap, ignore_index, return_entropy, backend)
        _setup_context(ctx, inputs, out)
        ctx.kept = kept
        return out

    @staticmethod
    @once_differentiable  # no grad mode inside: create_graph=True must not record the out= matmuls (as 'full')
    def backward(ctx, grad_logp, grad_lse, grad_ent):
        kept, ctx.kept = ctx.kept, None
        _, bwd = _launchers(ctx.config[3])
        return _gradients(ctx, grad_logp, grad_ent, lambda *args: bwd(*args, kept=kept))
