"""Triton kernels of the tiled student-teacher divergence (``ops/linear_token_jeffreys.py``, whose docstring
has the math): the forward's fold of one vocabulary tile into the running row statistics, and the backward's
gradient of one tile, each in one read of the two heads' matmul outputs.

Per row and tile, with ``z = cap_s(x)/T`` (student) and ``a = cap_t(y)/T`` (teacher) computed from the raw
matmul outputs ``x``, ``y`` in the kernel, the running state (fp32, updated in place) is::

    m_s, s_s = max, Σ e^{z − m_s}          a_s = Σ e^{z − m_s}·(z − m_s)    (the student's entropy)
    m_t, s_t = max, Σ e^{a − m_t}
    c_s = Σ e^{z − m_s}·(z − a)            c_t = Σ e^{a − m_t}·(a − z)      (the cross terms; WITH_CROSS)

What it replaces: torch ran about ten elementwise passes over each fp32 (N, C) tile (the upcast, the cap,
the division, two exps, the cross products, the sums), ~20 tile-sized reads and writes, against one read of
the two bf16 tiles here (4·C bytes a row).  At N = 8192 and C = 2048 that is 1.3 GB against 67 MB of memory
traffic per tile, next to a 0.27 TFLOP pair of matmuls (by analysis: no GPU has run it yet).

The backward kernel turns the two raw tiles and the rows' statistics into the student's tile gradient
``dx = coef·dz/T·(1 − tanh²(x/c))`` in the matmul dtype (read 2, write 1 tile), where torch took the cap
twice, the exponentials, the products, the mask and the cast as separate fp32 passes.

One program per row, a loop over the tile's columns in blocks: a scalar running max per distribution, per-
lane sums, merged with the incoming state at the end (``where`` guards keep −inf maxes and empty sums NaN-
free, as the torch fold's).  ``-inf`` entries contribute nothing: products are ``where(e > 0, e·d, 0)``.
"""

import math

import torch
import triton
import triton.language as tl

from . import _config
from .token_logprobs_kernels import _tanh

_M_INIT = tl.constexpr(-1.0e30)

# 2048 columns a block: both rows' blocks and five per-lane accumulators, as the token_jeffreys forward
# (whose 2048 × 8 warps compile to 72-80 registers without spills, BENCHMARKS.md "Compile budget").
MAX_BLOCK = 2048


@triton.jit
def _merge(m0, s0, m1, s1):
    # scales of the incoming state (m0, s0) and the tile's (m1, s1) to the common max, 0 for an empty sum
    m = tl.maximum(m0, m1)
    k0 = tl.where(s0 > 0, tl.exp(m0 - m), 0.0)
    k1 = tl.where(s1 > 0, tl.exp(m1 - m), 0.0)
    return m, k0, k1


@triton.jit
def _jeffreys_tile_fold_kernel(
    # pointers
    xs_ptr,
    xt_ptr,
    state_ptr,
    # sizes and strides
    N,
    C,
    stride_s,
    stride_t,
    # scalars
    inv_t,
    cap_s,
    inv_cap_s,
    cap_t,
    inv_cap_t,
    # constexpr
    HAS_CAP_S: tl.constexpr,
    HAS_CAP_T: tl.constexpr,
    WITH_CROSS: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row·stride overflows int32 at 8192 rows × 2^18 columns
    xs_row = xs_ptr + row * stride_s
    xt_row = xt_ptr + row * stride_t
    cols = tl.arange(0, BLOCK)
    m_s = tl.full((), _M_INIT, tl.float32)
    m_t = tl.full((), _M_INIT, tl.float32)
    s_s = tl.zeros((BLOCK,), tl.float32)
    s_t = tl.zeros((BLOCK,), tl.float32)
    a_s = tl.zeros((BLOCK,), tl.float32)
    c_s = tl.zeros((BLOCK,), tl.float32)
    c_t = tl.zeros((BLOCK,), tl.float32)
    for start in tl.range(0, C, BLOCK, num_stages=NUM_STAGES):
        offs = start + cols
        valid = offs < C
        x = tl.load(xs_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        y = tl.load(xt_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if HAS_CAP_S:
            x = cap_s * _tanh(x * inv_cap_s, False)
        if HAS_CAP_T:
            y = cap_t * _tanh(y * inv_cap_t, False)
        z = tl.where(valid, x * inv_t, float("-inf"))
        a = tl.where(valid, y * inv_t, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(z, 0))
        mt_new = tl.maximum(m_t, tl.max(a, 0))
        alpha_s = tl.exp(m_s - ms_new)
        alpha_t = tl.exp(m_t - mt_new)
        d_s = z - ms_new
        e_s = tl.exp(d_s)
        e_t = tl.exp(a - mt_new)
        # the entropy sum is relative to the max: it moves by (m − m_new)·s when the max grows
        a_s = alpha_s * (a_s + tl.where(s_s > 0, (m_s - ms_new) * s_s, 0.0)) + tl.where(
            e_s > 0, e_s * d_s, 0.0
        )
        if WITH_CROSS:
            c_s = alpha_s * c_s + tl.where(e_s > 0, e_s * (z - a), 0.0)
            c_t = alpha_t * c_t + tl.where(e_t > 0, e_t * (a - z), 0.0)
        s_s = s_s * alpha_s + e_s
        s_t = s_t * alpha_t + e_t
        m_s = ms_new
        m_t = mt_new

    # merge with the incoming state: rows (m_s, s_s, a_s, c_s, m_t, s_t, c_t) of the (7, N) state
    S1 = tl.sum(s_s, 0)
    T1 = tl.sum(s_t, 0)
    m0 = tl.load(state_ptr + row)
    s0 = tl.load(state_ptr + N + row)
    a0 = tl.load(state_ptr + 2 * N + row)
    m, k0, k1 = _merge(m0, s0, m_s, S1)
    a_tile = tl.sum(a_s, 0) + tl.where(S1 > 0, (m_s - m) * S1, 0.0)
    a_old = a0 + tl.where(s0 > 0, (m0 - m) * s0, 0.0)
    tl.store(state_ptr + row, m)
    tl.store(state_ptr + N + row, s0 * k0 + S1 * k1)
    tl.store(state_ptr + 2 * N + row, a_old * k0 + a_tile * k1)
    mt0 = tl.load(state_ptr + 4 * N + row)
    st0 = tl.load(state_ptr + 5 * N + row)
    mt, kt0, kt1 = _merge(mt0, st0, m_t, T1)
    tl.store(state_ptr + 4 * N + row, mt)
    tl.store(state_ptr + 5 * N + row, st0 * kt0 + T1 * kt1)
    if WITH_CROSS:
        c0 = tl.load(state_ptr + 3 * N + row)
        ct0 = tl.load(state_ptr + 6 * N + row)
        tl.store(state_ptr + 3 * N + row, c0 * k0 + tl.sum(c_s, 0) * k1)
        tl.store(state_ptr + 6 * N + row, ct0 * kt0 + tl.sum(c_t, 0) * kt1)


def jeffreys_tile_fold(state, xs, xt, temperature, cap_s, cap_t, with_cross):
    """Fold one tile into ``state`` in place.

    state: (7, N) fp32 contiguous, rows (m_s, s_s, a_s, c_s, m_t, s_t, c_t) (start: m = −inf, the rest 0);
    xs, xt: (N, C) raw logits of the student's and the teacher's tile (any float dtype, last stride 1);
    cap_s, cap_t: softcaps (0.0 = off); with_cross: also fold the cross terms (c_s, c_t).
    """
    n, c = xs.shape
    if n == 0 or c == 0:
        return
    block = _config.block_size(c, MAX_BLOCK)
    _jeffreys_tile_fold_kernel[(n,)](
        xs,
        xt,
        state,
        n,
        c,
        xs.stride(0),
        xt.stride(0),
        1.0 / temperature,
        float(cap_s),
        1.0 / cap_s if cap_s else 0.0,
        float(cap_t),
        1.0 / cap_t if cap_t else 0.0,
        HAS_CAP_S=bool(cap_s),
        HAS_CAP_T=bool(cap_t),
        WITH_CROSS=bool(with_cross),
        BLOCK=block,
        NUM_STAGES=_config.num_stages(),
        num_warps=_config.num_warps(block),
        **_config.LAUNCH_OPTIONS,
    )


# The gradient keeps no accumulators: 4096 columns a block, as the token_jeffreys backward (35-59 registers
# at 8 warps there).
GRAD_MAX_BLOCK = 4096


@triton.jit
def _jeffreys_tile_grad_kernel(
    # pointers
    xs_ptr,
    xt_ptr,
    lse_s_ptr,
    lse_t_ptr,
    kl_ptr,
    coef_ptr,
    dx_ptr,
    # sizes and strides
    N,
    C,
    stride_s,
    stride_t,
    stride_d,
    # scalars
    inv_t,
    cap_s,
    inv_cap_s,
    cap_t,
    inv_cap_t,
    beta,
    log_w_s,
    log_w_t,
    # constexpr
    HAS_CAP_S: tl.constexpr,
    HAS_CAP_T: tl.constexpr,
    GJSD: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    xs_row = xs_ptr + row * stride_s
    xt_row = xt_ptr + row * stride_t
    d_row = dx_ptr + row * stride_d
    # coef is 0 on ignored rows: they read nothing (a NaN in an ignored row's hidden state stays out) and
    # store 0
    g = tl.load(coef_ptr + row) * inv_t
    limit = tl.where(g != 0.0, C, 0)
    lse_s = tl.load(lse_s_ptr + row)
    lse_t = tl.load(lse_t_ptr + row)
    kl = tl.load(kl_ptr + row)
    cols = tl.arange(0, BLOCK)
    for start in tl.range(0, C, BLOCK, num_stages=NUM_STAGES):
        offs = start + cols
        live = offs < limit
        x = tl.load(xs_row + offs, mask=live, other=0.0).to(tl.float32)
        y = tl.load(xt_row + offs, mask=live, other=0.0).to(tl.float32)
        if HAS_CAP_S:
            t = _tanh(x * inv_cap_s, False)
            x = cap_s * t
        if HAS_CAP_T:
            y = cap_t * _tanh(y * inv_cap_t, False)
        log_s = x * inv_t - lse_s
        log_t = y * inv_t - lse_t
        s = tl.exp(log_s)
        if GJSD:
            # log m = logaddexp(log s + log(1−β), log t + log β); dD/dz = (1−β)·s·(log s − log m − KL(s‖m))
            u = log_s + log_w_s
            w = log_t + log_w_t
            hi = tl.maximum(u, w)
            log_m = hi + tl.log(1.0 + tl.exp(tl.minimum(u, w) - hi))
            dz = (1.0 - beta) * tl.where(s > 0, s * (log_s - log_m - kl), 0.0)
        else:
            # Jeffreys: β·s·(log s − log t − KL(s‖t)) + (1−β)·(s − t); a zero weight drops its term
            dz = tl.where(beta > 0.0, beta * tl.where(s > 0, s * (log_s - log_t - kl), 0.0), 0.0)
            dz += tl.where(beta < 1.0, (1.0 - beta) * (s - tl.exp(log_t)), 0.0)
        dx = dz * g
        if HAS_CAP_S:
            dx = dx * (1.0 - t * t)
        tl.store(d_row + offs, tl.where(live, dx, 0.0).to(dx_ptr.dtype.element_ty), mask=offs < C)


def jeffreys_tile_grad(xs, xt, lse_s, lse_t, kl, coef, temperature, cap_s, cap_t, beta, gjsd):
    """d(Σ coef·D)/d(student's raw tile logits), (N, C) in xs' dtype, from the two raw tiles.

    xs, xt: (N, C) raw logits of the student's and the teacher's tile (last stride 1); lse_s, lse_t (N,) fp32
    whole log-sum-exps of the full rows; kl (N,) fp32 KL(s‖t) (Jeffreys) or KL(s‖m) (``gjsd``); coef (N,)
    fp32, 0 on ignored rows (which give 0); beta the Jeffreys weight or the generalised JSD's β.
    """
    n, c = xs.shape
    dx = torch.empty_like(xs)
    if n == 0 or c == 0:
        return dx
    block = _config.block_size(c, GRAD_MAX_BLOCK)
    log_w_s = math.log1p(-beta) if gjsd else 0.0
    log_w_t = math.log(beta) if gjsd else 0.0
    _jeffreys_tile_grad_kernel[(n,)](
        xs,
        xt,
        lse_s,
        lse_t,
        kl,
        coef,
        dx,
        n,
        c,
        xs.stride(0),
        xt.stride(0),
        dx.stride(0),
        1.0 / temperature,
        float(cap_s),
        1.0 / cap_s if cap_s else 0.0,
        float(cap_t),
        1.0 / cap_t if cap_t else 0.0,
        float(beta),
        log_w_s,
        log_w_t,
        HAS_CAP_S=bool(cap_s),
        HAS_CAP_T=bool(cap_t),
        GJSD=bool(gjsd),
        BLOCK=block,
        NUM_STAGES=_config.num_stages(),
        num_warps=_config.num_warps(block),
        **_config.LAUNCH_OPTIONS,
    )
    return dx
