"""Triton kernels for per-token log-probs: the shared helpers and the streaming kernels.

Forward, backward, and the one-pass gradient in forward (rows held whole in registers); the two-sweep
persistent gradient in forward is in ``token_logprobs_two_sweep.py``; the launchers (and the autotuning
wrappers) are in ``token_logprobs.py``, with the launcher contract in ``bond_kernels/ops/token_logprobs.py``.

Math (``z = softcap·tanh(x/softcap) / T``, per row, ``y`` the label)::

    lse  = log Σ_v exp(z_v)                 logp = z_y − lse          H = lse − Σ_v p_v·z_v
    dz_v = g·(1[v = y] − p_v) − g_H·p_v·(log p_v + H)                dx_v = dz_v / T · (1 − tanh²(x_v/softcap))

Kernels work in base 2: ``u = z·log2(e)`` so every exponential is one ``exp2`` (one MUFU instruction), and
results are converted back with ``ln 2`` at the end.  Everything is fp32 inside; the gradient is stored in
the logits' dtype.

Memory traffic per row of ``V`` elements of ``b`` bytes (what the benchmarks divide by):
  * forward: one read (``b·V``) plus O(1) stores.  An online log-sum-exp keeps a running max (scalar, one
    block reduction per iteration) and per-lane running sums; the label logit is one extra scalar load.
  * backward: one read and one write (``2·b·V``), from the saved ``lse`` (and ``H``).
  * gradient in forward: the gradient needs ``lse`` before the first element can be written.  Rows of at
    most ``_config.SINGLE_PASS_MAX`` columns are held whole in registers: one read and one write
    (``2·b·V``).  Longer rows take two sweeps (``token_logprobs_two_sweep.py``).

Pipelining: each streaming loop runs over the whole blocks without a mask and is software-pipelined with
``tl.range(num_stages=_config.NUM_STAGES)``, which triton 3.6 and 3.9 lower to cp.async (``LDGSTS`` in the
SASS; ``benchmarks/compile_budget.py`` fails if a streaming kernel loses it); one masked block takes the
ragged tail.  The label compare is 32-bit against a block-relative scalar.

Indexing: row ``r = b·T + t`` of a (B, T, V) view starts at ``b·stride_b + t·stride_t`` (a 2-D (N, V) input is
B = N, T = 1), so ``logits[:, :-1]`` is read in place.  Offsets are int64: 16384 × 262144 elements overflow
int32.  Only ``T`` and ``V`` are runtime sizes (``T`` is not specialised at all, so a new sequence length
never recompiles).
"""

import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(y, FAST: tl.constexpr):
    if FAST:
        # One MUFU.TANH instruction (sm_75+), opt-in on CUDA (``_config.fast_tanh``).  The PTX manual gives a
        # maximum relative error of about 2^-11: |softcap|·2^-11 in the capped logit, 0.015 at softcap = 30
        # (tests/test_gpu_token_logprobs.py measures it against fp64).  The formula below costs three
        # special-function instructions per element (exp2, and the reciprocal inside the division).
        return tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=f,f", [y], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        # Without libdevice (the interpreter cannot run it): 1 − 2/(e^{2y} + 1).  e^{2y} overflows to +inf
        # for y > 44 and gives exactly 1; y = −inf gives exactly −1; absolute error ~1e-7 near 0.
        # Near 0 that formula's absolute error (~6e-8) is a large relative one, c·6e-8 in the capped logit
        # (a 6% error at softcap 1e6): below |y| = 0.25 a Taylor polynomial, relative error < 1e-8 there.
        y2 = y * y
        poly = y * (
            1.0
            + y2
            * (
                -0.3333333333333333
                + y2 * (0.13333333333333333 + y2 * (-0.05396825396825397 + y2 * 0.021869488536155203))
            )
        )
        return tl.where(tl.abs(y) < 0.25, poly, 1.0 - 2.0 / (tl.exp2(y * 2.8853900817779268) + 1.0))


@triton.jit
def _capped(x, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, FAST_TANH: tl.constexpr):
    # Loaded logits → (v, t): v is the logit in the units the kernels subtract maxes in, t = tanh(x/softcap)
    # (the softcap's derivative is 1 − t²).  With a softcap v = t and the launcher's scale carries the factor
    # softcap·log2(e)/T, so an exponent is (tanh(x/c) − tanh(x_max/c))·c·log2(e)/T: equal logits give exactly
    # 0 (c·tanh(x/c) − c·tanh(x_max/c) can differ by an unrounded FMA, which c/T = 4e31 makes +inf).  Without
    # a softcap v = x and scale = log2(e)/T.  Maxes are taken before the temperature, so |x|/T is never
    # rounded (at T = 1e-4 that rounding alone was 2.7e-3 of relative gradient error).
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        t = _tanh(x * inv_softcap, FAST_TANH)
        return t, t
    else:
        return x, x


@triton.jit
def _safe(m_v):
    # A running max that is still −inf (no finite entry yet) subtracts as 0: exponents stay −inf, no NaN.
    return tl.where(m_v == float("-inf"), 0.0, m_v)


@triton.jit
def _lse_step(
    x,
    v,
    m_x,
    m_v,
    s,
    a,
    scale,
    softcap,
    inv_softcap,
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
):
    # One block of the online log-sum-exp in base 2 (x and v = −inf where masked): the running max m_x of the
    # raw logits (one block reduction; the split lse saves it), m_v its value in v units, per-lane running sums
    # s of 2^{(v − m_v)·scale}, and for the entropy a_v = Σ e·(v − m_v)·scale, rescaled like s.
    m_x_new = tl.maximum(m_x, tl.max(x, 0))
    m_v_new, t_unused = _capped(m_x_new, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
    ref = _safe(m_v_new)
    shift = (m_v - ref) * scale  # ≤ 0; −inf while the row had no finite entry
    alpha = tl.exp2(shift)
    d = (v - ref) * scale
    e = tl.exp2(d)
    if RETURN_ENTROPY:
        a = alpha * (a + tl.where(s > 0.0, shift * s, 0.0)) + tl.where(e > 0.0, e * d, 0.0)
    s = s * alpha + e
    return m_x_new, m_v_new, s, a


@triton.jit
def _row_start(row, T, stride_b, stride_t):
    # row = b·T + t; int64 arithmetic throughout (row is already int64).
    b = row // T
    t = row - b * T
    return b * stride_b + t * stride_t


@triton.jit
def _grad_block(
    d,
    t_cap,
    offs,
    label_rel,
    g,
    g_ent,
    ent,
    inv_temp,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
):
    # d(g·logp + g_H·H)/dx for one block from d = log2 p (−inf where masked).  The label compare is 32-bit
    # and block-relative: offs (int32 lane index) against label − block start, a scalar (a 64-bit compare
    # per element was a quarter of the loop's instructions).
    p = tl.exp2(d)
    dz = tl.where(offs == label_rel, g, 0.0) - g * p
    if HAS_GRAD_ENTROPY:
        # p·(log p + H) → 0 where p = 0 (−inf logits): avoid 0·(−inf).
        dz -= g_ent * tl.where(p > 0.0, p * (d * 0.6931471805599453 + ent), 0.0)
    dx = dz * inv_temp
    if HAS_SOFTCAP:
        dx = dx * (1.0 - t_cap * t_cap)
    return dx


# --------------------------------------------------------------------------------------------------------
# kernels
#
# Every sweep is split into the whole blocks (v_full = V − V mod BLOCK columns, loaded without a mask:
# no per-element compare or select) and one masked tail block.  The whole-block loop is software-pipelined
# (``tl.range(num_stages=NUM_STAGES)``: cp.async copies of the next NUM_STAGES − 1 blocks are in flight
# while one block is reduced), so the block reductions' barriers no longer stall the loads.
# --------------------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["N", "T", "ignore_index"])
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    logp_ptr,
    lse_ptr,
    ent_ptr,
    # sizes
    N,
    T,
    V,
    # strides (elements)
    stride_b,
    stride_t,
    # scalars
    scale,
    softcap,
    inv_softcap,
    ignore_index,
    # constexpr
    HAS_SOFTCAP: tl.constexpr,
    FAST_TANH: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    SPLIT_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row·stride reaches 16384 × 262144 > 2^31
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:  # ignored rows skip the sweep
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if SPLIT_LSE:
            tl.store(lse_ptr + N + row, 0.0)
        if RETURN_ENTROPY:
            tl.store(ent_ptr + row, 0.0)
        return
    row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    offs = tl.arange(0, BLOCK)
    v_full = tl.multiple_of(V - V % BLOCK, BLOCK)  # triton 3.6 vectorises the tail only with this hint

    m_x = tl.full((), float("-inf"), tl.float32)
    m_v, t0 = _capped(m_x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    a = tl.zeros([BLOCK], dtype=tl.float32)
    for start in tl.range(0, v_full, BLOCK, num_stages=NUM_STAGES):
        x = tl.load(row_ptr + start + offs).to(tl.float32)
        v, t = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
        m_x, m_v, s, a = _lse_step(
            x, v, m_x, m_v, s, a, scale, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH, RETURN_ENTROPY
        )
    if v_full < V:
        cols = v_full + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        v, t = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
        # mask after the softcap: tanh(0) is not −inf (and a real −inf logit caps to a finite −c)
        x = tl.where(mask, x, float("-inf"))
        v = tl.where(mask, v, float("-inf"))
        m_x, m_v, s, a = _lse_step(
            x, v, m_x, m_v, s, a, scale, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH, RETURN_ENTROPY
        )
    s_tot = tl.sum(s, 0)
    log2_s = tl.log2(s_tot)
    ref = _safe(m_v)

    # Label gather: one scalar load, transformed exactly like the sweep.  Out of range → NaN (no host sync).
    in_range = (label >= 0) & (label < V)
    x_y = tl.load(row_ptr + tl.where(in_range, label, 0))
    v_y, t_y = _capped(x_y, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
    logp = tl.where(in_range, ((v_y - ref) * scale - log2_s) * 0.6931471805599453, float("nan"))
    tl.store(logp_ptr + row, logp)
    if SPLIT_LSE:
        # (row max of the raw logits, ln Σ exp(z − z(max))): the backward recomputes log p without rounding
        tl.store(lse_ptr + row, m_x)
        tl.store(lse_ptr + N + row, log2_s * 0.6931471805599453)
    else:
        tl.store(lse_ptr + row, (ref * scale + log2_s) * 0.6931471805599453)
    if RETURN_ENTROPY:
        # H = lse − E[z] = ln2·(log2 s − Σa/s): relative to the max, so no cancellation of large logits.
        tl.store(ent_ptr + row, (log2_s - tl.sum(a, 0) / s_tot) * 0.6931471805599453)


@triton.jit
def _zero_row(grad_row, V, BLOCK: tl.constexpr):
    # An ignored row's gradient: zeros, without reading the logits.
    offs = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=grad_row.dtype.element_ty)
    for start in range(0, V, BLOCK):
        cols = start + offs
        tl.store(grad_row + cols, zero, mask=cols < V)


@triton.jit(do_not_specialize=["N", "T", "ignore_index"])
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    lse_ptr,
    ent_ptr,
    grad_logp_ptr,
    grad_ent_ptr,
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
    HAS_GRAD_ENTROPY: tl.constexpr,
    SPLIT_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row·stride reaches 16384 × 262144 > 2^31
    label = tl.load(labels_ptr + row).to(tl.int64)
    grad_row = grad_ptr + _row_start(row, T, grad_stride_b, grad_stride_t)
    if label == ignore_index:  # zero gradient, no read of the logits
        _zero_row(grad_row, V, BLOCK)
        return
    row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    offs = tl.arange(0, BLOCK)
    v_full = tl.multiple_of(V - V % BLOCK, BLOCK)  # triton 3.6 vectorises the tail only with this hint
    in_range = (label >= 0) & (label < V)
    g = tl.where(in_range, tl.load(grad_logp_ptr + row), float("nan"))  # bad label → NaN row
    label32 = tl.where(in_range, label, -1).to(tl.int32)  # V < 2^31: the in-range label fits
    # log2 p = (v − ref)·scale − c2: split lse (raw row max, ln Σ relative to it) or a whole one (ref 0)
    if SPLIT_LSE:
        m_v, t0 = _capped(tl.load(lse_ptr + row), softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
        ref = _safe(m_v)
        c2 = tl.load(lse_ptr + N + row) * 1.4426950408889634
    else:
        ref = 0.0
        c2 = tl.load(lse_ptr + row) * 1.4426950408889634
    g_ent = 0.0
    ent = 0.0
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_ent_ptr + row)
        ent = tl.load(ent_ptr + row)
    # In place (grad_ptr == logits_ptr, same strides) is safe: each block is read before it is written, the
    # blocks in flight ahead of it are other columns, and no other program touches this row.
    for start in tl.range(0, v_full, BLOCK, num_stages=NUM_STAGES):
        x = tl.load(row_ptr + start + offs)
        v, t_cap = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
        d = (v - ref) * scale - c2
        dx = _grad_block(
            d, t_cap, offs, label32 - start, g, g_ent, ent, inv_temp, HAS_SOFTCAP, HAS_GRAD_ENTROPY
        )
        tl.store(grad_row + start + offs, dx.to(grad_ptr.dtype.element_ty))
    if v_full < V:
        cols = v_full + offs
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0)
        v, t_cap = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
        d = tl.where(mask, (v - ref) * scale - c2, float("-inf"))
        dx = _grad_block(
            d, t_cap, offs, label32 - v_full, g, g_ent, ent, inv_temp, HAS_SOFTCAP, HAS_GRAD_ENTROPY
        )
        tl.store(grad_row + cols, dx.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["T", "ignore_index"])
def _token_logprobs_fwd_bwd_kernel(
    # pointers
    logits_ptr,
    labels_ptr,
    grad_logp_ptr,
    logp_ptr,
    grad_ptr,
    # sizes
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
):
    # Gradient in the forward for rows of V ≤ BLOCK ≤ _config.SINGLE_PASS_MAX: the whole row lives in
    # registers, one read and one write.
    row = tl.program_id(0).to(tl.int64)  # int64: row·stride reaches 16384 × 262144 > 2^31
    label = tl.load(labels_ptr + row).to(tl.int64)
    grad_row = grad_ptr + _row_start(row, T, grad_stride_b, grad_stride_t)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        _zero_row(grad_row, V, BLOCK)
        return
    row_ptr = logits_ptr + _row_start(row, T, stride_b, stride_t)
    offs = tl.arange(0, BLOCK)
    in_range = (label >= 0) & (label < V)
    g = tl.where(in_range, tl.load(grad_logp_ptr + row), float("nan"))  # bad label → NaN row
    label32 = tl.where(in_range, label, -1).to(tl.int32)
    # The label logit first: in place, the store below overwrites it.
    w_y, t_y = _capped(
        tl.load(row_ptr + tl.where(in_range, label, 0)), softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH
    )
    mask = offs < V
    x = tl.load(row_ptr + offs, mask=mask, other=0.0)
    v, t_cap = _capped(x, softcap, inv_softcap, HAS_SOFTCAP, FAST_TANH)
    m_v, t0 = _capped(
        tl.max(tl.where(mask, x.to(tl.float32), float("-inf")), 0),
        softcap,
        inv_softcap,
        HAS_SOFTCAP,
        FAST_TANH,
    )
    ref = _safe(m_v)
    d = tl.where(mask, (v - ref) * scale, float("-inf"))  # relative to the row max: |x|/T is never rounded
    log2_s = tl.log2(tl.sum(tl.exp2(d), 0))
    dx = _grad_block(d - log2_s, t_cap, offs, label32, g, 0.0, 0.0, inv_temp, HAS_SOFTCAP, False)
    tl.store(grad_row + offs, dx.to(grad_ptr.dtype.element_ty), mask=mask)
    logp = ((w_y - ref) * scale - log2_s) * 0.6931471805599453
    tl.store(logp_ptr + row, tl.where(in_range, logp, float("nan")))
