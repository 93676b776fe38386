"""Triton kernels for the token-level Jeffreys divergence: forward and backward.

Launcher contract: ``bond_kernels/ops/token_jeffreys.py`` (shared with the cpu backend).

Math, per row, with ``z = x/T`` (policy), ``a = y/T`` (anchor), ``d = z − a``, ``Δ = lse_p − lse_q``::

    KL(p‖q) = Σ_v p_v·(log p_v − log q_v) = Σ_v p_v·d_v − Δ
    KL(q‖p) = Σ_v q_v·(log q_v − log p_v) = −Σ_v q_v·d_v + Δ
    div     = β·KL(p‖q) + (1−β)·KL(q‖p)
    ∂div/∂x_v = [β·p_v·(log p_v − log q_v − KL(p‖q)) + (1−β)·(p_v − q_v)] / T

Forward: one sweep over both rows with two online log-sum-exps.  Each keeps a running max (a scalar, one
block reduction per iteration) and per-lane running sums, rescaled when the max grows: ``Σ e^{z−m_p}`` and
the cross term ``Σ e^{z−m_p}·d`` for p, ``Σ e^{a−m_q}`` and ``Σ e^{a−m_q}·(−d)`` for q.  Every element costs
two exponentials (one per distribution) and the rows are read once: ``2·b·V`` bytes for the two rows of
``b``-byte elements, O(1) stores.  Backward: one more read of both rows (``2·b·V``) and one write of the
gradient (``b·V``) from the saved ``lse_p``, ``lse_q`` and ``KL(p‖q)``.

``-inf`` entries (masked vocabulary) contribute nothing where their probability is 0: the cross terms are
``where(e > 0, e·d, 0)``, so 0·(±inf) never makes a NaN, as the reference's ``where(p > 0, ...)``.  An anchor
``-inf`` where the policy has mass gives ``KL(p‖q) = inf``, as it should.  Ignored rows are not read (their
loads are masked off) and give 0 outputs and a zero gradient.

Indexing: ``row·stride`` in int64 (16384 × 256000 elements overflow int32); any row stride, unit stride
along the vocabulary.  Everything is fp32 inside; the gradient is stored in the policy's dtype.
"""

import torch
import triton
import triton.language as tl

from . import _config

# Initial running max: finite, so that exp(m_old − m_new) stays NaN-free while a row has shown only −inf
# entries (exp(−inf − (−inf)) is NaN); any real logit / T is far above it.  A tl.constexpr: the compiler
# rejects plain Python globals inside @triton.jit (the interpreter does not).
_M_INIT = tl.constexpr(-1.0e30)

# Block caps.  The forward holds a block of both rows plus four per-lane accumulators: at 2048 bf16 columns
# (1024 fp32) and 8 warps it takes 72-80 registers (3 programs, 24 warps per SM, 48 KB in flight with the
# 3-stage pipeline); the backward keeps no accumulators: 4096 at 8 warps takes 35 (bf16) to 59 (fp32)
# registers, 3-6 programs per SM.  No variant spills.  Figures: BENCHMARKS.md "Compile budget" (through the launchers,
# with their alignment hints), checked in CI; timings of wider blocks are owed (gpu_check.sh sweep).
# The forward's saved log-sum-exps: split (2, N) (row max of the raw logits, ln Σ relative to it) or whole
# (N,); see the token_logprobs contract.
SPLIT_LSE = True

FWD_MAX_BLOCK = 2048
BWD_MAX_BLOCK = 4096


def _launch_config(n_cols: int, cap: int):
    """(BLOCK, num_warps) for a sweep over rows of ``n_cols`` columns, BLOCK capped at ``cap`` (see above)."""
    block = _config.block_size(n_cols, cap)
    return block, _config.num_warps(block)


@triton.jit
def _token_jeffreys_fwd_kernel(
    # pointers
    policy_ptr,
    anchor_ptr,
    ignore_ptr,
    div_ptr,
    lse_p_ptr,
    lse_q_ptr,
    kl_ptr,
    # sizes and strides
    N,
    V,
    stride_p,
    stride_a,
    # scalars
    beta,
    inv_t,
    # constexpr
    HAS_IGNORE: tl.constexpr,
    SPLIT_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row·stride overflows int32 at 16384 × 256000
    p_row = policy_ptr + row * stride_p
    a_row = anchor_ptr + row * stride_a
    if HAS_IGNORE:
        keep = tl.load(ignore_ptr + row).to(tl.int32) == 0
    else:
        keep = row >= 0  # always true, as a scalar tensor
    # Ignored rows read nothing: their sweep sees a row of length 0.
    limit = tl.where(keep, V, 0)
    cols = tl.arange(0, BLOCK)

    # The maxes are of the raw logits x, y (before the temperature), and every exponent and cross term is
    # taken relative to them, then divided by T: |x|/T itself is never formed (at T = 1e-12 the cross terms
    # Σ p·(x − y)/T minus (m_p − m_q)/T cancelled 1e12-sized numbers: 2.4 of relative gradient error).
    m_p = tl.full((), _M_INIT, tl.float32)
    m_q = tl.full((), _M_INIT, tl.float32)
    s_p = tl.zeros((BLOCK,), tl.float32)  # Σ e^{(x − m_p)/T}, per lane
    s_q = tl.zeros((BLOCK,), tl.float32)  # Σ e^{(y − m_q)/T}
    c_p = tl.zeros((BLOCK,), tl.float32)  # Σ e^{(x − m_p)/T}·δ,  δ = ((x − m_p) − (y − m_q))/T
    c_q = tl.zeros((BLOCK,), tl.float32)  # Σ e^{(y − m_q)/T}·(−δ)
    for start in tl.range(0, V, BLOCK, num_stages=NUM_STAGES):
        offs = start + cols
        valid = offs < limit
        x = tl.load(p_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        y = tl.load(a_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        mp_new = tl.maximum(m_p, tl.max(x, 0))
        mq_new = tl.maximum(m_q, tl.max(y, 0))
        alpha_p = tl.exp((m_p - mp_new) * inv_t)
        alpha_q = tl.exp((m_q - mq_new) * inv_t)
        # δ of the entries seen so far moves by −(Δm_p − Δm_q)/T when the maxes grow
        moved = ((mp_new - m_p) - (mq_new - m_q)) * inv_t
        e_p = tl.exp((x - mp_new) * inv_t)
        e_q = tl.exp((y - mq_new) * inv_t)
        d = ((x - mp_new) - (y - mq_new)) * inv_t
        c_p = alpha_p * (c_p - tl.where(s_p > 0, s_p * moved, 0.0)) + tl.where(e_p > 0, e_p * d, 0.0)
        c_q = alpha_q * (c_q + tl.where(s_q > 0, s_q * moved, 0.0)) + tl.where(e_q > 0, -(e_q * d), 0.0)
        s_p = s_p * alpha_p + e_p
        s_q = s_q * alpha_q + e_q
        m_p = mp_new
        m_q = mq_new

    sum_p = tl.sum(s_p, 0)
    sum_q = tl.sum(s_q, 0)
    log_sp = tl.log(sum_p)
    log_sq = tl.log(sum_q)
    # log p − log q = δ − (log S_p − log S_q): the maxes are already inside δ
    delta = log_sp - log_sq
    kl_pq = tl.sum(c_p, 0) / sum_p - delta
    kl_qp = tl.sum(c_q, 0) / sum_q + delta
    # a term whose weight is 0 is dropped, not multiplied: 0·inf (an anchor that masks a word the policy
    # has, at β = 0) would be NaN
    div = tl.where(beta > 0.0, beta * kl_pq, 0.0) + tl.where(beta < 1.0, (1.0 - beta) * kl_qp, 0.0)
    tl.store(div_ptr + row, tl.where(keep, div, 0.0))
    if SPLIT_LSE:
        # (row max of the raw logits, ln Σ relative to it), the token_logprobs contract's split form
        tl.store(lse_p_ptr + row, tl.where(keep, m_p, 0.0))
        tl.store(lse_p_ptr + N + row, tl.where(keep, log_sp, 0.0))
        tl.store(lse_q_ptr + row, tl.where(keep, m_q, 0.0))
        tl.store(lse_q_ptr + N + row, tl.where(keep, log_sq, 0.0))
    else:
        tl.store(lse_p_ptr + row, tl.where(keep, m_p * inv_t + log_sp, 0.0))
        tl.store(lse_q_ptr + row, tl.where(keep, m_q * inv_t + log_sq, 0.0))
    tl.store(kl_ptr + row, tl.where(keep, kl_pq, 0.0))


@triton.jit
def _token_jeffreys_bwd_kernel(
    # pointers
    policy_ptr,
    anchor_ptr,
    ignore_ptr,
    lse_p_ptr,
    lse_q_ptr,
    kl_ptr,
    grad_div_ptr,
    grad_ptr,
    # sizes and strides
    N,
    V,
    stride_p,
    stride_a,
    stride_g,
    # scalars
    beta,
    inv_t,
    # constexpr
    HAS_IGNORE: tl.constexpr,
    SPLIT_LSE: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = policy_ptr + row * stride_p
    a_row = anchor_ptr + row * stride_a
    g_row = grad_ptr + row * stride_g
    if HAS_IGNORE:
        keep = tl.load(ignore_ptr + row).to(tl.int32) == 0
    else:
        keep = row >= 0
    # log p = (x − shift_p)/T − c_p: split lse (row max, ln Σ relative to it) or a whole one (shift 0)
    if SPLIT_LSE:
        shift_p = tl.load(lse_p_ptr + row)
        shift_q = tl.load(lse_q_ptr + row)
        c_p = tl.load(lse_p_ptr + N + row)
        c_q = tl.load(lse_q_ptr + N + row)
    else:
        shift_p = 0.0
        shift_q = 0.0
        c_p = tl.load(lse_p_ptr + row)
        c_q = tl.load(lse_q_ptr + row)
    kl = tl.load(kl_ptr + row)
    # Ignored rows: g = 0 and nothing is read (masked loads give −inf, so p = q = 0): the gradient is 0.
    g = tl.where(keep, tl.load(grad_div_ptr + row), 0.0) * inv_t
    w_p = g * beta
    w_d = g * (1.0 - beta)
    limit = tl.where(keep, V, 0)
    cols = tl.arange(0, BLOCK)
    for start in tl.range(0, V, BLOCK, num_stages=NUM_STAGES):
        offs = start + cols
        in_row = offs < V
        valid = offs < limit
        x = tl.load(p_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        y = tl.load(a_row + offs, mask=valid, other=float("-inf")).to(tl.float32)
        log_p = (x - shift_p) * inv_t - c_p
        log_q = (y - shift_q) * inv_t - c_q
        p = tl.exp(log_p)
        q = tl.exp(log_q)
        t = tl.where(p > 0, p * (log_p - log_q - kl), 0.0)
        grad = tl.where(beta > 0.0, w_p * t, 0.0) + w_d * (p - q)  # β = 0: KL(p‖q) (maybe inf) is not there
        tl.store(g_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _ignore_arg(ignore_mask: torch.Tensor, like: torch.Tensor):
    if ignore_mask.numel() == 0:
        return like, False  # any pointer: HAS_IGNORE=False never reads it
    return ignore_mask.contiguous(), True


def token_jeffreys_fwd(policy, anchor, beta, temperature, ignore_mask):
    """policy, anchor (N, V) float, last stride 1; ignore_mask (N,) bool or (0,) -> (div, lse_p, lse_q, kl_pq)."""
    policy, anchor = _rows(policy), _rows(anchor)
    n, v = policy.shape
    lse_shape = (2, n) if SPLIT_LSE else (n,)
    shapes = ((n,), lse_shape, lse_shape, (n,))
    outs = [torch.empty(shape, dtype=torch.float32, device=policy.device) for shape in shapes]
    if n == 0:
        return tuple(outs)
    ignore, has_ignore = _ignore_arg(ignore_mask, outs[0])
    # the cap is in bf16 columns: fp32 rows take half as many, so a block is the same bytes (at 2048 fp32
    # columns ptxas spilled 28 bytes, see the compile budget)
    block, warps = _launch_config(v, FWD_MAX_BLOCK * 2 // max(policy.element_size(), anchor.element_size()))
    _token_jeffreys_fwd_kernel[(n,)](
        policy,
        anchor,
        ignore,
        *outs,
        n,
        v,
        policy.stride(0),
        anchor.stride(0),
        float(beta),
        1.0 / float(temperature),
        HAS_IGNORE=has_ignore,
        SPLIT_LSE=SPLIT_LSE,
        BLOCK=block,
        NUM_STAGES=_config.num_stages(),
        num_warps=warps,
        **_config.LAUNCH_OPTIONS,
    )
    return tuple(outs)


def token_jeffreys_bwd(policy, anchor, lse_p, lse_q, kl_pq, grad_div, beta, temperature, ignore_mask):
    """Gradient of Σ grad_div·div with respect to ``policy``, in the policy's dtype, shape (N, V)."""
    policy, anchor = _rows(policy), _rows(anchor)
    n, v = policy.shape
    grad = torch.empty((n, v), dtype=policy.dtype, device=policy.device)
    if n == 0:
        return grad
    split = lse_p.dim() == 2  # (2, N) split or (N,) whole (token_logprobs' contract)
    for lse, name in ((lse_p, "lse_p"), (lse_q, "lse_q")):
        if tuple(lse.shape) != ((2, n) if split else (n,)):
            raise ValueError(f"{name} must be ({n},) or (2, {n}) like lse_p, got shape {tuple(lse.shape)}")
    ignore, has_ignore = _ignore_arg(ignore_mask, kl_pq)
    block, warps = _launch_config(v, BWD_MAX_BLOCK)
    _token_jeffreys_bwd_kernel[(n,)](
        policy,
        anchor,
        ignore,
        lse_p.contiguous(),
        lse_q.contiguous(),
        kl_pq.contiguous(),
        grad_div.float().contiguous(),
        grad,
        n,
        v,
        policy.stride(0),
        anchor.stride(0),
        grad.stride(0),
        float(beta),
        1.0 / float(temperature),
        HAS_IGNORE=has_ignore,
        SPLIT_LSE=split,
        BLOCK=block,
        NUM_STAGES=_config.num_stages(),
        num_warps=warps,
        **_config.LAUNCH_OPTIONS,
    )
    return grad
