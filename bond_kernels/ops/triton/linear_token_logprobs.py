"""Triton kernel of the fused linear head: the column-0 fix-up of a vocabulary tile's gradient.

The linear head (``ops/linear_engine.py``) runs the token kernels of ``ops/triton/token_logprobs.py`` on each
vocabulary tile with local labels; a row whose label lies in another tile is given the local label 0, so the
backward puts a spurious one-hot at column 0.  ``fixup_column0_triton`` overwrites ``d[i, 0]`` of those rows
with the exact value, computed in fp32 from the saved column-0 logit (O(rows) work, one launch)::

    dz0 = −g·p0 − g_ent·p0·(log p0 + H),   p0 = exp(z0 − lse),   dx0 = dz0/T·(1 − tanh²(x0/c))

Its torch twin, and the contract, is ``reference.launchers.token_logprobs_fixup_column0``.
"""

import torch
import triton
import triton.language as tl

from . import _config

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
    """``reference.launchers.token_logprobs_fixup_column0`` in one launch (same arguments, same math)."""
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
