"""Triton kernel for the batched reward-rank quantiles (docs/math.md §5).

Launcher contract: ``bond_kernels/ops/reward_quantiles.py`` (shared with the cpu and cuda backends).

Each program takes ``BLOCK_R`` prompts and ``BLOCK_N`` of their candidates at once and compares them with
``BLOCK_K`` reference rewards per step as one (BLOCK_R, BLOCK_N, BLOCK_K) block, summing the comparisons over
the last axis: ``c_le = Σ mask·[r' <= r]``, ``c_lt = Σ mask·[r' < r]``, ``k = Σ mask``.  The divisions are
IEEE-rounded (``div_rn``) so the quantiles equal the fp32 reference's bit for bit.  Work is B·n·k
comparisons on 4·B·(n + k) bytes: at B = 1024, n = 16, k = 64 it is one launch of 256 programs.
"""

import torch
import triton
import triton.language as tl

from . import _config

# Elements of the (BLOCK_R, BLOCK_N, BLOCK_K) comparison block: 4096 at 4 warps is 32 per thread, three
# int32 counters and the comparisons stay well inside the register file.
_BLOCK_ELEMS = 4096
# Reference rewards per step: a whole row of the common k = 16..64 in one step, longer rows in steps of 64.
_MAX_BLOCK_K = 64


def _launch_config(n: int, k: int):
    """(BLOCK_R, BLOCK_N, BLOCK_K, num_warps): a comparison block of at most ``_BLOCK_ELEMS`` elements."""
    block_k = min(max(triton.next_power_of_2(max(k, 1)), 16), _MAX_BLOCK_K)
    block_n = min(max(triton.next_power_of_2(max(n, 1)), 1), max(_BLOCK_ELEMS // block_k, 1))
    block_r = max(_BLOCK_ELEMS // (block_k * block_n), 1)
    return block_r, block_n, block_k, 4


@triton.jit
def _reward_quantiles_kernel(
    # pointers
    rewards_ptr,
    ref_ptr,
    mask_ptr,
    p_le_ptr,
    p_lt_ptr,
    # sizes
    B,
    n,
    k,
    # scalars
    eps,
    # constexpr
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # int64 rows: row·k overflows int32 for B·k > 2^31 reference rewards.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    for n0 in range(0, n, BLOCK_N):
        cand = n0 + tl.arange(0, BLOCK_N)
        r_mask = row_ok[:, None] & (cand[None, :] < n)
        r = tl.load(rewards_ptr + rows[:, None] * n + cand[None, :], mask=r_mask, other=0.0)
        c_le = tl.zeros((BLOCK_R, BLOCK_N), tl.int32)
        c_lt = tl.zeros((BLOCK_R, BLOCK_N), tl.int32)
        kc = tl.zeros((BLOCK_R,), tl.int32)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            k_mask = row_ok[:, None] & (cols[None, :] < k)
            offs = rows[:, None] * k + cols[None, :]
            ref = tl.load(ref_ptr + offs, mask=k_mask, other=0.0)
            valid = k_mask
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + offs, mask=k_mask, other=0).to(tl.int32) != 0)
            le = (ref[:, None, :] <= r[:, :, None]) & valid[:, None, :]
            lt = (ref[:, None, :] < r[:, :, None]) & valid[:, None, :]
            c_le += tl.sum(le.to(tl.int32), 2)
            c_lt += tl.sum(lt.to(tl.int32), 2)
            kc += tl.sum(valid.to(tl.int32), 1)
        # Counts are exact in fp32 below 2^24 samples; the divisions round as the reference's do.
        le_f = c_le.to(tl.float32)
        lt_f = c_lt.to(tl.float32)
        k_f = kc.to(tl.float32)[:, None] + tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        if MODE == 1:
            # The candidate counts as one more reference sample that ties with itself: never 0.
            p_le = tl.math.div_rn(le_f + 1.0, k_f + 1.0)
            p_lt = tl.math.div_rn(lt_f, k_f + 1.0)
        else:
            p_le = tl.math.div_rn(le_f, k_f)
            p_lt = tl.math.div_rn(lt_f, k_f)
            if MODE == 2:
                p_le = tl.where(p_le < eps, eps, p_le)  # NaN (k = 0) stays NaN, as clamp_min leaves it
        out = rows[:, None] * n + cand[None, :]
        tl.store(p_le_ptr + out, p_le, mask=r_mask)
        tl.store(p_lt_ptr + out, p_lt, mask=r_mask)


def reward_quantiles(rewards, ref_rewards, ref_mask, mode, eps):
    """rewards (B, n), ref_rewards (B, k) fp32 contiguous; ref_mask (B, k) bool or (0,) -> (p_le, p_lt) fp32."""
    rewards = rewards.float().contiguous()
    ref_rewards = ref_rewards.float().contiguous()
    b, n = rewards.shape
    k = ref_rewards.shape[1]
    p_le = torch.empty((b, n), dtype=torch.float32, device=rewards.device)
    p_lt = torch.empty((b, n), dtype=torch.float32, device=rewards.device)
    if b == 0 or n == 0:
        return p_le, p_lt
    has_mask = ref_mask.numel() > 0
    mask = ref_mask.contiguous() if has_mask else ref_rewards
    block_r, block_n, block_k, warps = _launch_config(n, k)
    grid = (triton.cdiv(b, block_r),)
    _reward_quantiles_kernel[grid](
        rewards,
        ref_rewards,
        mask,
        p_le,
        p_lt,
        b,
        n,
        k,
        float(eps),
        MODE=int(mode),
        HAS_MASK=has_mask,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=warps,
        **_config.LAUNCH_OPTIONS,
    )
    return p_le, p_lt
