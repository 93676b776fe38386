"""Launch configuration for the Triton kernels: one named helper per decision, each with its reason.

Every kernel here runs one program per row of the logits and sweeps the vocabulary in blocks of ``BLOCK``
columns, so the two knobs are the block size (elements each program holds per loop iteration) and the number
of warps that share it.  Runs are reproducible by default: the configuration is a pure function of ``V``
and the dtype.  ``BOND_KERNELS_AUTOTUNE=1`` (read once, at import) turns on ``triton.autotune`` over a small
set of configurations instead; tuning reruns each kernel several times, so keep it off under CUDA-graph
capture and in the interpreter (which cannot time kernels).
"""

import contextlib
import os

import triton

# Per-iteration block cap of the streaming sweeps (forward, backward, the two-sweep gradient-in-forward).
# 4096 columns at 8 warps is 16 values per thread: the fp32 copy of the block plus the two per-lane
# accumulators of the online log-sum-exp (running sum, entropy term).  ptxas (triton 3.6 and 3.9, sm_90)
# gives these kernels 53-80 registers per thread and no spills, i.e. 3-4 programs (24-32 warps) per SM,
# each with 8 KB (bf16) of loads in flight per iteration.  Larger blocks add registers and cut the
# programs per SM.  Timings of the alternatives are owed (benchmarks: --sweep; BENCHMARKS.md, GPU section).
MAX_BLOCK = 4096

# Largest row the gradient-in-forward kernel keeps whole in registers (one read of the logits instead of
# two sweeps).  16384 columns at 16 warps is 32 fp32 values per thread: ptxas gives 113-128 registers and
# no spills (one program per SM).  A longer row would spill to local memory, which costs more than the
# second sweep it saves.
SINGLE_PASS_MAX = 16384


# Options every launch passes.  FP fusion (fused multiply-add) stays on explicitly: it is what every
# accuracy and speed figure here was taken with, triton 3.9 warns on each compile when the option is left
# unset, and triton 3.10 changes its default to off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def autotune_enabled() -> bool:
    """True when ``BOND_KERNELS_AUTOTUNE=1``: kernels are wrapped in ``triton.autotune`` at import time."""
    return os.environ.get("BOND_KERNELS_AUTOTUNE", "0") == "1"


# Set only by ``forced()`` (the benchmarks' launch-configuration sweep); empty in normal use.
_FORCED = {}


@contextlib.contextmanager
def forced(block=None, warps=None):
    """Within the block, streaming sweeps launch with this BLOCK / num_warps (benchmark sweeps only)."""
    saved = dict(_FORCED)
    _FORCED.update({k: v for k, v in (("block", block), ("warps", warps)) if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def block_size(n_cols: int, cap: int = MAX_BLOCK) -> int:
    """Next power of two of ``n_cols`` capped at ``cap`` (register pressure, see ``MAX_BLOCK``); at least 16."""
    if "block" in _FORCED and cap == MAX_BLOCK:
        return _FORCED["block"]
    return max(16, min(triton.next_power_of_2(max(int(n_cols), 1)), cap))


def num_warps(block: int) -> int:
    """Warps per program: keep 8 to 32 elements per thread, so each thread issues 16-byte vector loads."""
    if "warps" in _FORCED:
        return _FORCED["warps"]
    if block <= 1024:
        return 4
    if block <= 4096:
        return 8
    return 16


def single_pass(n_cols: int) -> bool:
    """Whether the gradient-in-forward kernel holds the whole row in registers (one read of the logits)."""
    return int(n_cols) <= SINGLE_PASS_MAX


def streaming_configs():
    """Configurations ``BOND_KERNELS_AUTOTUNE=1`` tries for the streaming sweeps (BLOCK × warps)."""
    out = []
    for block in (2048, 4096, 8192, 16384):
        for warps in (4, 8, 16, 32):
            if block // (32 * warps) < 4:  # fewer than 4 values per thread: 16-byte loads no longer fill
                continue
            out.append(triton.Config({"BLOCK": block}, num_warps=warps))
    return out


def warp_configs():
    """Configurations ``BOND_KERNELS_AUTOTUNE=1`` tries when the block size is fixed by the launcher."""
    return [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]
