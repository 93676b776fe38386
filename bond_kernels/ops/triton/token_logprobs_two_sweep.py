"""Triton kernel for per-token log-probs: the gradient in forward for rows too long for registers.

The gradient needs ``lse`` before the first element can be written.  Rows longer than
``_config.SINGLE_PASS_MAX`` columns take two sweeps in the same program, the first computing ``lse``, the
second reading the row again and writing the gradient: ``3·b·V`` bytes requested (``b`` bytes an element),
of which the second read is served from L2 only while the rows in flight fit in it (at V = 128256 bf16 a
row is 250 KB, so the ~500 programs an unbounded grid keeps resident would need 130 MB).  This kernel is
therefore persistent, with its grid bounded by ``_config.two_sweep_programs``, and hints the first read
evict-last (triton 3.9 keeps the hint on cp.async; 3.6 drops it there).  Liger's in-place cross-entropy
makes the same two sweeps per row, unbounded.

Math, base-2 arithmetic and indexing as in ``token_logprobs_kernels.py`` (whose helpers it uses); the
launcher is ``token_logprobs_fwd_bwd`` in ``token_logprobs.py``.
"""

import triton
import triton.language as tl

from .token_logprobs_kernels import _capped, _grad_block, _lse_step, _row_start, _safe, _zero_row


@triton.jit(do_not_specialize=["N", "T", "ignore_index"])
def _token_logprobs_fwd_bwd_two_sweep_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    grad_logp_ptr,
    logp_ptr,
    grad_ptr,
    # sizes
    N,
    T,
    V,
    # strides (elements)
    stride_b,
    stride_t,
    grad_stride_b,
    grad_stride_t,
    # scalars
    scale,
    inv_temp,
    softcap,
    inv_softcap,
    ignore_index,
    # constexpr
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Gradient in the forward for rows longer than _config.SINGLE_PASS_MAX: per row, sweep 1 computes the
    # log-sum-exp, sweep 2 reads the row again and writes the gradient.  The second read is served by L2
    # only while every row in flight stays there, so the grid is persistent and bounded
    # (_config.two_sweep_programs: rows in flight × row bytes ≤ a share of L2); sweep 1 marks its lines
    # evict-last, sweep 2 and the gradient stores evict-first, so the gradient does not push the rows out.
    offs = tl.arange(0, BLOCK)
    v_full = tl.multiple_of(V - V % BLOCK, BLOCK)  # triton 3.6 vectorises the tail only with this hint
    for r in range(tl.program_id(0), N, tl.num_programs(0)):
        row = tl.cast(r, tl.int64)  # int64: row·stride reaches 16384 × 262144 > 2^31 (r may be a Python int)
        label = tl.load(labels_ptr + row).to(tl.int64)
        grad_row = grad_ptr + _row_start(row, T, grad_stride_b, grad_stride_t)
        if label == ignore_index:
            tl.store(logp_ptr + row, 0.0)
            _zero_row(grad_row, V, BLOCK)
        else:
            row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
            in_range = (label >= 0) & (label < V)
            g = tl.where(in_range, tl.load(grad_logp_ptr + row), float("nan"))  # bad label → NaN row
            label32 = tl.where(in_range, label, -1).to(tl.int32)
            # The label logit first: in place, sweep 2 overwrites it.
            w_y, t_y = _capped(
                tl.load(row_ptr + tl.where(in_range, label, 0)),
                softcap,
                inv_softcap,
                HAS_SOFTCAP,
                FAST_TANH,
            )
            # Sweep 1: online log-sum-exp (as the forward kernel, without the entropy).
            m_x = tl.full((), float("-inf"), tl.float32)
            m_v, t0 = _capped(m_x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
            s = tl.zeros([BLOCK], dtype=tl.float32)
            for start in tl.range(0, v_full, BLOCK, num_stages=NUM_STAGES):
                x = tl.load(row_ptr + start + offs, eviction_policy="evict_last")
                v, t = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
                m_x, m_v, s, unused = _lse_step(
                    x.to(tl.float32),
                    v,
                    m_x,
                    m_v,
                    s,
                    s,
                    scale,
                    softcap,
                    inv_softcap,
                    HAS_SOFTCAP,
                    FAST_TANH,
                    False,
                )
            if v_full < V:
                cols = v_full + offs
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_last")
                v, t = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
                xm = tl.where(mask, x.to(tl.float32), float("-inf"))
                v = tl.where(mask, v, float("-inf"))
                m_x, m_v, s, unused = _lse_step(
                    xm, v, m_x, m_v, s, s, scale, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH, False
                )
            log2_s = tl.log2(tl.sum(s, 0))
            ref = _safe(m_v)
            # Sweep 2: read the row again (from L2) and write the gradient.
            for start in tl.range(0, v_full, BLOCK, num_stages=NUM_STAGES):
                x = tl.load(row_ptr + start + offs, eviction_policy="evict_first")
                v, t_cap = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
                d = (v - ref) * scale - log2_s
                dx = _grad_block(d, t_cap, offs, label32 - start, g, 0.0, 0.0, inv_temp, HAS_SOFTCAP, False)
                tl.store(
                    grad_row + start + offs, dx.to(grad_ptr.dtype.element_ty), eviction_policy="evict_first"
                )
            if v_full < V:
                cols = v_full + offs
                mask = cols < V
                x = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first")
                v, t_cap = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
                d = tl.where(mask, (v - ref) * scale - log2_s, float("-inf"))
                dx = _grad_block(d, t_cap, offs, label32 - v_full, g, 0.0, 0.0, inv_temp, HAS_SOFTCAP, False)
                tl.store(
                    grad_row + cols,
                    dx.to(grad_ptr.dtype.element_ty),
                    mask=mask,
                    eviction_policy="evict_first",
                )
            logp = ((w_y - ref) * scale - log2_s) * 0.6931471805599453
            tl.store(logp_ptr + row, tl.where(in_range, logp, float("nan")))
