"""Shared benchmark accounting: byte floors, the copy-bandwidth ceiling, peak extra memory, the card's name.

Every memory-bound benchmark divides the bytes its op MUST move (its floor, stated where it is computed) by
the measured median time, and reports that rate as a fraction of the device-to-device copy bandwidth
measured in the same process (bytes read + bytes written), so results carry across cards and runs.

Dry run (``GPU_CHECK_DRY_RUN=1`` in the environment, no CUDA device): the GPU benchmark scripts run on the
CPU instead (``DEV = "cpu"``; the Triton kernels need ``TRITON_INTERPRET=1`` too), timed with
``time.perf_counter`` (``triton.testing.do_bench`` needs a GPU driver), with no peak-memory figure, and
every heading says DRY RUN: this proves benchmarks/gpu_check.sh and the scripts' code paths, never speed.
"""

import datetime
import os
import platform
import statistics
import time

import torch

GB = 1e9

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN", "0") == "1"
# Where the GPU benchmarks put their tensors: CUDA, or the CPU in a dry run on a machine without one.
DEV = "cuda" if torch.cuda.is_available() or not DRY_RUN else "cpu"


def no_device_reason():
    """None where the GPU benchmarks can run (a CUDA device, or a dry run), else why not."""
    if DEV == "cuda" and not torch.cuda.is_available():
        return "no CUDA device: these benchmarks need a GPU (GPU_CHECK_DRY_RUN=1 runs them on the CPU)"
    return None


def sync():
    """Wait for the device (a no-op on the CPU)."""
    if DEV == "cuda":
        torch.cuda.synchronize()


def empty_cache():
    """Hand cached device memory back (a no-op on the CPU)."""
    if DEV == "cuda":
        torch.cuda.empty_cache()


def card() -> str:
    """'NVIDIA H100 80GB HBM3, torch 2.11.0+cu130, triton 3.6.0' (or the CPU when there is no GPU)."""
    try:
        import triton

        tv = triton.__version__
    except Exception:  # triton is optional for the CPU benchmarks
        tv = "none"
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {cpu_name()}"
    dry = " — DRY RUN on the CPU (perf_counter timings, not measurements)" if DEV == "cpu" and DRY_RUN else ""
    return f"{dev}, torch {torch.__version__}, triton {tv}{dry}"


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
    """Median time of ``fn()`` in ms on the GPU (triton.testing.do_bench: L2 flushed between calls).

    On the CPU (dry run) one ``time.perf_counter`` call (``cpu_median_ms``): do_bench needs a GPU driver, and
    the Triton interpreter is far too slow for its millisecond budgets.  Callers warm up first.
    """
    if DEV != "cuda":
        return cpu_median_ms(fn)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def cpu_median_ms(fn, rounds=1) -> float:
    """Median wall time of ``rounds`` calls of ``fn()`` in ms (CPU, dry run: the numbers mean nothing, one
    call proves the path runs)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (2·nbytes per copy)."""

    if DEV != "cuda":
        nbytes = min(nbytes, 1 << 24)  # dry run: 16 MiB is plenty to exercise the code

    def timed():
        src = torch.empty(nbytes, dtype=torch.uint8, device=DEV).random_(0, 255)
        dst = torch.empty_like(src)
        return median_ms(lambda: dst.copy_(src))

    ms = timed()
    empty_cache()  # the two buffers died with timed()
    return 2 * nbytes / (ms * 1e-3)


_CPU_LIMITS = {}


def cpu_limits(nbytes: int, rounds: int = 5) -> dict:
    """This CPU's memory rates in bytes/s on a buffer of ``nbytes``, measured in this process (cached per size).

    ``read``: ``sum`` over a resident fp32 buffer (the cheapest full read torch has); ``write_resident``:
    ``fill_`` of a resident buffer; ``write_fresh``: ``fill_`` of a buffer allocated just before (its pages are
    touched for the first time, so the page faults count, as they do for a backward that allocates its
    gradient).  Measured at the op's own size, so a tensor that fits the last-level cache is judged against
    the cache's rate, as the op sees it.  Medians of ``rounds`` calls after a warm-up, with torch's threads.
    """
    key = (nbytes, torch.get_num_threads())
    if key not in _CPU_LIMITS:
        n = max(1, nbytes // 4)
        buf = torch.rand(n)

        def med(fn):
            fn()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        read = med(lambda: buf.sum())
        write = med(lambda: buf.fill_(0.5))
        fresh = med(lambda: torch.empty(n).fill_(0.5))
        del buf
        _CPU_LIMITS[key] = {
            "read": 4 * n / read,
            "write_resident": 4 * n / write,
            "write_fresh": 4 * n / fresh,
        }
    return _CPU_LIMITS[key]


def limit_ms(read_bytes: int, limits: dict, *, resident_write_bytes: int = 0, fresh_write_bytes: int = 0):
    """The time in ms an op must take at best: its floor traffic at the rates ``cpu_limits`` measured."""
    return 1e3 * (
        read_bytes / limits["read"]
        + resident_write_bytes / limits["write_resident"]
        + fresh_write_bytes / limits["write_fresh"]
    )


def limit_info(limits: dict, floor_ms: float, ms: float) -> dict:
    """extra_info columns: the measured rates (GB/s), the floor time, and the row's fraction of it."""
    return {
        "read_GBps": round(limits["read"] / GB, 2),
        "write_resident_GBps": round(limits["write_resident"] / GB, 2),
        "write_fresh_GBps": round(limits["write_fresh"] / GB, 2),
        "limit_ms": round(floor_ms, 3),
        "frac_of_limit": round(floor_ms / ms, 3),
    }


def peak_extra_bytes(fn) -> int:
    """Peak GPU memory allocated while ``fn()`` runs, above what was allocated before (inputs excluded).

    Outputs count while they are alive inside ``fn``; call it after a warm-up so compilation caches and
    lazily created workspaces do not count.  On the CPU (dry run) NaN, without calling ``fn``: there is no
    allocator statistic to read.
    """
    if DEV != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def cuda_graph_ms(fn, rep=50):
    """Median ms of ``fn`` replayed from a CUDA graph (do_bench_cudagraph); "n/a (CPU dry run)" on the CPU."""
    if DEV != "cuda":
        return "n/a (CPU dry run)"
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def fmt_gb(nbytes, x_logits=None) -> str:
    """'1.23 GB' (with ' (0.50×)' of the logits when given); 'n/a (CPU)' for the NaN of a CPU dry run."""
    if nbytes != nbytes:
        return "n/a (CPU)"
    return f"{nbytes / GB:.2f} GB" + ("" if x_logits is None else f" ({x_logits:.2f}×)")


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
