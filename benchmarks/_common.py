"""Shared benchmark accounting: byte floors, the copy-bandwidth ceiling, peak extra memory, the card's name.

Every memory-bound benchmark divides the bytes its op MUST move (its floor, stated where it is computed) by
the measured median time, and reports that rate as a fraction of the device-to-device copy bandwidth
measured in the same process (bytes read + bytes written), so results carry across cards and runs.
"""

import datetime
import os
import platform

import torch

GB = 1e9


def card() -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0' (or the CPU when there is no GPU)."""
    try:
        import triton

        tv = triton.__version__
    except Exception:  # triton is optional for the CPU benchmarks
        tv = "none"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_name()}"
    return f"{dev}, torch {torch.__version__}, triton {tv}"


def cpu_name() -> str:
    """'Intel(R) Xeon(R) Processor, 2 cores' from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"


def today() -> str:
    return datetime.date.today().isoformat()


def median_ms(fn, *, warmup=25, rep=100) -> float:
    """Median time of ``fn()`` in ms on the GPU (triton.testing.do_bench: L2 flushed between calls)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (2·nbytes per copy)."""

    def timed():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        return median_ms(lambda: dst.copy_(src))

    ms = timed()
    torch.cuda.empty_cache()  # the two buffers died with timed()
    return 2 * nbytes / (ms * 1e-3)


def peak_extra_bytes(fn) -> int:
    """Peak GPU memory allocated while ``fn()`` runs, above what was allocated before (inputs excluded).

    Outputs count while they are alive inside ``fn``; call it after a warm-up so compilation caches and
    lazily created workspaces do not count.
    """
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


# Byte floors of the token log-prob paths, for N rows of V logits of `elt` bytes (O(N) terms omitted:
# labels, log-probs, the saved log-sum-exp are < 0.01% of the logits at V ≥ 32000).
def logprob_floor_bytes(mode: str, n: int, v: int, elt: int) -> int:
    """``fwd``: read the logits once.  ``fwd+bwd`` (autograd): forward read + backward read + gradient write.
    ``fwd_bwd`` (gradient in forward): one read + one gradient write."""
    per = {"fwd": 1, "fwd+bwd": 3, "fwd_bwd": 2}[mode]
    return per * n * v * elt


def rate(nbytes: int, ms: float, copy_bps: float):
    """(GB/s, fraction of the copy bandwidth) for ``nbytes`` moved in ``ms``."""
    bps = nbytes / (ms * 1e-3)
    return bps / GB, bps / copy_bps


def markdown_table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
