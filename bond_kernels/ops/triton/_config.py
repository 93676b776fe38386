"""Launch configuration for the Triton kernels: one named helper per decision, each with its reason.

Every kernel here runs one program per row of the logits and sweeps the vocabulary in blocks of ``BLOCK``
columns, so the two knobs are the block size (elements each program holds per loop iteration) and the number
of warps that share it.  Runs are reproducible by default: the configuration is a pure function of ``V``
and the dtype.  ``BOND_KERNELS_AUTOTUNE=1`` (read once, at import) turns on ``triton.autotune`` over a small
set of configurations instead; tuning reruns each kernel several times, so keep it off under CUDA-graph
capture and in the interpreter (which cannot time kernels).
"""

import contextlib

import torch
import triton

from ... import _env

# Per-iteration block cap of the streaming sweeps (forward, backward).  4096 columns at 8 warps is 16 values
# per thread: the fp32 copy of the block plus the per-lane accumulators of the online log-sum-exp.  At the
# benchmark shapes the forward takes 48-64 registers (79-80 with the entropy): 3-5 programs, 24-40 warps
# per SM; the backward 32-64: 4-6 programs.  Every figure here is from BENCHMARKS.md "Compile budget" (triton
# 3.9, sm_90, benchmarks/compile_budget.py through the launchers, so with the alignment hints real launches
# get; CI fails on any spill).  Timings of the alternatives are owed (gpu_check.sh sweep).
MAX_BLOCK = 4096

# Depth of the software pipeline of every streaming loop (``tl.range(num_stages=...)``, lowered to cp.async
# by triton 3.6 and 3.9): NUM_STAGES − 1 blocks are being copied into shared memory while one is reduced.
# At 3 stages a 4096-column bf16 sweep has 16 KB in flight per program (shared memory 16 KB per program,
# 4 programs per SM: 64 KB), against the ~25 KB per SM that 4.8 TB/s at ~0.7 us latency over 132 SMs needs.
NUM_STAGES = 3

# Largest row the gradient-in-forward kernel keeps whole in registers (one read of the logits instead of
# two sweeps).  16384 columns at 16 warps is 32 fp32 values per thread: 86-126 registers, one program
# (16 warps) per SM, no spills.  A longer row would spill to local memory, which costs more than the second sweep.
SINGLE_PASS_MAX = 16384

# Block and pipeline depth of the two-sweep gradient-in-forward.  Its grid is bounded (two_sweep_programs),
# often to about one program per SM, so each program needs more bytes in flight than a streaming sweep:
# 4096 columns at 8 warps with 5 stages keeps 4 blocks ahead, 32 KB of bf16 per program (76-111 registers,
# up to 2-3 programs per SM).  8192 columns at 16 warps reached the 128-register cap of 16-warp programs with
# a softcap on triton 3.6 (an 8-byte spill).
TWO_SWEEP_BLOCK = 4096
TWO_SWEEP_STAGES = 5

# Share of L2 the rows in flight of the two-sweep kernel may occupy, so that its second read of a row hits
# L2 (a 128256-column bf16 row is 250 KB: 132 SMs × 4 programs would be 132 MB of rows, over a 50 MB L2).
TWO_SWEEP_L2_SHARE = 0.5

# Options every launch passes.  FP fusion (fused multiply-add) stays on explicitly: it is what every
# accuracy and speed figure here was taken with, triton 3.9 warns on each compile when the option is left
# unset, and triton 3.10 changes its default to off.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def autotune_enabled() -> bool:
    """True when ``BOND_KERNELS_AUTOTUNE=1``: kernels are wrapped in ``triton.autotune`` at import time."""
    return _env.switch("BOND_KERNELS_AUTOTUNE")


def fast_tanh(device) -> bool:
    """Whether softcap's tanh is the one-instruction ``tanh.approx.f32`` (CUDA only, opt-in with
    ``BOND_KERNELS_FAST_TANH=1``).  Off by default: its relative error, about 2^-11 by the PTX manual, is
    |softcap|·2^-11 in the capped logit (0.015 at softcap = 30, 150× the 1e-4 accuracy target), against ~1e-7
    of the exp2 formula, which costs three special-function instructions per element instead of one."""
    return getattr(device, "type", None) == "cuda" and _env.switch("BOND_KERNELS_FAST_TANH")


# Set only by ``forced()`` (the benchmarks' launch-configuration sweep); empty in normal use.
_FORCED = {}


@contextlib.contextmanager
def forced(block=None, warps=None, stages=None, programs=None):
    """Within the block, streaming sweeps launch with this BLOCK / num_warps / NUM_STAGES, and the two-sweep
    kernel with this many programs (benchmark sweeps only)."""
    saved = dict(_FORCED)
    given = (("block", block), ("warps", warps), ("stages", stages), ("programs", programs))
    _FORCED.update({k: v for k, v in given if v is not None})
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def block_size(n_cols: int, cap: int = MAX_BLOCK) -> int:
    """Next power of two of ``n_cols`` capped at ``cap`` (register pressure, see ``MAX_BLOCK``); at least 16."""
    if "block" in _FORCED and cap in (MAX_BLOCK, TWO_SWEEP_BLOCK):
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


def num_stages(two_sweep: bool = False) -> int:
    """Software-pipeline depth of the streaming loops (``NUM_STAGES``; ``TWO_SWEEP_STAGES`` for that kernel)."""
    return _FORCED.get("stages", TWO_SWEEP_STAGES if two_sweep else NUM_STAGES)


_DEVICE_PROPS = {}


def _props(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_PROPS:
        _DEVICE_PROPS[index] = torch.cuda.get_device_properties(index)
    return _DEVICE_PROPS[index]


def two_sweep_programs(n_rows: int, row_bytes: int, device) -> int:
    """Programs of the persistent two-sweep kernel: as many rows in flight as fit in ``TWO_SWEEP_L2_SHARE`` of
    L2, but at least half the SMs (fewer cannot pull the card's bandwidth) and at most one per row.  On CPU
    (the interpreter) 3, so that the tests run several rows per program with an uneven split."""
    if "programs" in _FORCED:
        return max(1, min(n_rows, _FORCED["programs"]))
    if getattr(device, "type", None) != "cuda":
        return max(1, min(n_rows, 3))
    props = _props(device)
    rows = int(props.L2_cache_size * TWO_SWEEP_L2_SHARE) // max(int(row_bytes), 1)
    return max(1, min(n_rows, max(rows, props.multi_processor_count // 2)))


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
