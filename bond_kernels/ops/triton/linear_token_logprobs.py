"""GPU path of ``linear_token_logprobs``: cuBLAS tile matmuls + the Triton per-token kernels.

Design (chosen on analysis; the GPU measurement is owed, see BENCHMARKS.md):

* Arithmetic floor.  Forward + backward needs ``x = h·Wᵀ`` (2·N·H·V), ``grad_h = dx·W`` and
  ``grad_W = dxᵀ·h`` (4·N·H·V).  Without keeping the (N, V) logits (2.1 GB in bf16 at N = 8192,
  V = 128256: over the 1.2 GB budget on its own) the backward must recompute ``x``: 8·N·H·V in all, a
  ceiling of 6/8 = 0.75 of the matmul rate in the 6·N·H·V accounting, which is exactly PERFORMANCE.md's
  target: any overhead beside the matmuls would miss it.  The upstream gradient of each token is unknown
  until the backward, so ``grad_W`` cannot be formed in the forward (Liger's trick needs a scalar loss).
  What the recompute CAN avoid: the (V, H) ``grad_W`` buffer must exist in the backward anyway, and
  nothing is in it before then, so the forward allocates it and keeps there the logits of the last
  H/(N+H) of the vocabulary (``recompute="auto"``, the :class:`Kept` layout in the engine's docstring).  At
  the benchmark shape that is 42240 of 128256 columns (tiles 21-31 of 32): the backward recomputes 86016
  columns, the matmuls total 7.34·N·H·V, and the ceiling becomes 0.82.  Peak memory does not move (the
  buffer is allocated in the forward instead of the backward).  ``recompute="full"`` is the schedule
  without it; the benchmark measures both in one run.  What decides the result beyond that is how close
  each matmul runs to the card's measured bf16 rate, and how little else runs beside them.
* Why cuBLAS tiles and not a fused Triton tile-matmul with an online log-sum-exp across vocabulary tiles:
  the target is a fraction of the ``torch.mm`` (cuBLAS) rate, and cuBLAS runs these tile shapes
  (8192 × 4096 × 4096) at that rate by construction; a hand-written Triton matmul can at best match it
  (not measured here), and a fused backward needs either atomics on ``grad_h``/``grad_W`` (run-to-run
  differences) or a second kernel per operand.  The per-token work between the matmuls is memory-bound and
  small next to them: per logit the four matmuls do 8·H = 32768 FLOPs (45 ps at 723 TFLOP/s) while the
  token kernels move 6 bytes (forward read; backward read + write: 2 ps at 3 TB/s), about 4 %.
* Why tiles over the vocabulary (whole N per tile up to 8192 rows) rather than chunks of rows with the
  whole vocabulary: chunking rows makes ``grad_W`` (V × H, 1.05 GB in bf16) an accumulator that is read
  and written once per chunk — 32 chunks of 256 rows move 67 GB, about 22 ms at 3 TB/s, and round ``grad_W``
  to bf16 32 times.  Tiling the vocabulary writes each ``grad_W`` tile exactly once (cuBLAS accumulates in
  fp32 inside) and accumulates only ``grad_h`` (N × H fp32, 134 MB) across tiles: 32 read-modify-writes,
  8.6 GB of traffic inside the matmul epilogues (2.9 ms if none of it overlapped the math; larger tiles
  halve it at +67 MB each doubling).
* The forward combines per-tile log-sum-exps at the end (one ``logsumexp`` over a (tiles, N) array), so a
  tile costs one ``addmm`` and one token-kernel launch; the backward costs one ``addmm`` (recompute), the
  token backward kernel (in place), :func:`fixup_column0_triton` (the O(N) correction for rows whose label
  lies in another tile), and two matmuls.
* Memory (analysis at N = 8192, H = 4096, V = 128256, bf16): the 64 MiB logits tile, the 134 MB fp32
  ``grad_h`` accumulator, ``grad_W`` (1.05 GB; the bf16 ``grad_h``, 67 MB, is allocated after the last
  tile is freed) and O(N · tiles) statistics: about 1.26e9 bytes = 1.17 GiB peak over the inputs,
  gradients included (the gradients alone are 1.12e9 bytes; the target, 1.2 in PERFORMANCE.md's GiB).

Accuracy: the tiles hold the logits in the input dtype, exactly as ``(h @ W.T).float().log_softmax()`` does
in eager PyTorch; everything after the matmul runs in fp32.
"""

import torch
import triton
import triton.language as tl

from ..linear_token_logprobs import (
    TokenKernels,
    chunked_launchers,
    make_plan,
    token_kernels,
)
from . import _config

# A 64 MiB logits tile: at N = 8192 rows in bf16 that is 4096 vocabulary columns, a matmul of
# 8192 × 4096 × 4096 — large enough for cuBLAS to run at its full rate.
GPU_TILE_BYTES = 64 << 20
# Up to 8192 rows share one pass over the vocabulary so that grad_W tiles are written once; more rows
# become row blocks whose grad_W contributions are added (one rounding per extra block).
GPU_MAX_ROWS = 8192
# Vocabulary tiles in multiples of 256 columns keep every matmul dimension a multiple of the MMA tiles.
GPU_VOCAB_MULTIPLE = 256
# The fix-up is one element per row: 1024 rows per program.
FIXUP_BLOCK = 1024


@triton.jit
def _linear_fixup_kernel(
    d_ptr,
    x0_ptr,
    out_ptr,
    lse_ptr,
    ent_ptr,
    g_ptr,
    ge_ptr,  # pointers
    n_rows,  # sizes
    stride_d,  # strides
    inv_temperature,
    softcap,  # scalars
    HAS_ENT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 offsets: the row stride times the row index exceeds 2^31 for 16384 × 256000 logits.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n_rows
    fix = tl.load(out_ptr + offs, mask=in_range, other=0) != 0
    x0 = tl.load(x0_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        # tanh through exp (libdevice is unavailable in the interpreter): 1 − 2/(e^{2u} + 1), exact limits ±1.
        t = 1.0 - 2.0 / (tl.exp(2.0 * x0 / softcap) + 1.0)
        z0 = softcap * t * inv_temperature
    else:
        z0 = x0 * inv_temperature
    p0 = tl.exp(z0 - lse)
    dz = -g * p0
    if HAS_ENT:
        ent = tl.load(ent_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        ge = tl.load(ge_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        logp0 = tl.where(p0 > 0, z0 - lse, 0.0)
        dz = dz - ge * p0 * (logp0 + ent)
    dz = dz * inv_temperature
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    tl.store(d_ptr + offs * stride_d, dz.to(d_ptr.dtype.element_ty), mask=in_range & fix)


def fixup_column0_triton(d, x0, out, lse, ent, g, g_ent, temperature, softcap):
    """Triton version of :func:`bond_kernels.ops.linear_token_logprobs.fixup_column0` (one launch)."""
    n = d.shape[0]
    if n == 0:
        return
    has_ent = g_ent is not None and g_ent.numel() > 0
    dummy = lse
    grid = (triton.cdiv(n, FIXUP_BLOCK),)
    _linear_fixup_kernel[grid](
        d,
        x0.float().contiguous(),
        out.contiguous().view(torch.uint8),
        lse.float().contiguous(),
        ent.float().contiguous() if has_ent else dummy,
        g.float().contiguous(),
        g_ent.float().contiguous() if has_ent else dummy,
        n,
        d.stride(0),
        1.0 / temperature,
        float(softcap or 0.0),
        HAS_ENT=has_ent,
        HAS_SOFTCAP=bool(softcap),
        BLOCK=FIXUP_BLOCK,
        **_config.LAUNCH_OPTIONS,
    )


def triton_tile_kernels() -> TokenKernels:
    """Per-tile kernels of the triton backend: the Triton token kernels and the Triton fix-up."""
    tk = token_kernels("triton")
    return TokenKernels("triton", tk.fwd, tk.bwd, fixup_column0_triton)


def gpu_plan(n, v, h, dtype):
    # Tiles run in the input dtype (bf16 tensor cores); fp64 never reaches this backend.
    return make_plan(
        n,
        v,
        h,
        dtype,
        compute_dtype=dtype,
        tile_bytes=GPU_TILE_BYTES,
        max_rows=GPU_MAX_ROWS,
        vocab_multiple=GPU_VOCAB_MULTIPLE,
    )


# The chunked engine's launchers with the GPU tile plan and the Triton per-tile kernels.
linear_token_logprobs_fwd, linear_token_logprobs_bwd = chunked_launchers(gpu_plan, triton_tile_kernels)
