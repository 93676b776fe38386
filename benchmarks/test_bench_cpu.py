"""CPU benchmarks of per-token log-probs: the C++/OpenMP ``cpu`` backend against torch eager, same process.

Run: ``pytest benchmarks/test_bench_cpu.py --benchmark-only`` (or ``python benchmarks/test_bench_cpu.py``
for a markdown table).  Shapes: N = 2048, V = 32000 fp32 (the target of docs/performance.md's CPU section), and
two smaller ones (512 x 32000 bf16, 128 x 128256 fp32), random logits scaled by 4.

Byte accounting (``_common.logprob_floor_bytes``, `elt` bytes per logit; O(N) terms omitted):
  * ``fwd``      the logits read once: N·V·elt.
  * ``fwd+bwd``  forward + backward through autograd: forward read, backward read, gradient write: 3·N·V·elt.
  * ``fwd_bwd``  gradient computed in the forward sweep (``token_logprobs_and_grad``): one read, one write:
    2·N·V·elt (cpu backend only; eager has no such path, so its ratio is against eager fwd+bwd).
The limit: ``_common.cpu_limits`` measures this machine's read, write-to-resident and write-to-fresh-page
rates at the logits' size in the same process; ``limit_ms`` is the floor traffic at those rates (forward:
one read; autograd: two reads and a gradient written into fresh pages; ``fwd_bwd``: a read and a fresh
write), and ``frac_of_limit`` = limit_ms / median ms (1.0 = at the memory limit).
GB/s is that floor divided by the median time, for every provider (eager moves several times the floor:
``log_softmax`` writes a full fp32 copy, and its backward reads two and writes two).  Each cpu row also
records ``ratio_vs_eager`` = eager median / cpu median for the same shape and mode, both timed in one
interleaved loop (eager, cpu, eager, cpu, ...) so that both see the same machine load: on a shared 2-core
machine the absolute times drift by 2x from minute to minute, the ratio much less.  And the peak extra
resident memory of one call (the process's high-water mark above its resident size before the call, reset
through /proc/self/clear_refs; outputs and the gradient count), in units of the logits' size.

Memory caveat: resident-size peaks only see buffers the process maps fresh.  glibc serves a request of up
to 32 MiB from memory freed earlier (already resident, invisible here), so this module sets glibc's mmap
threshold to 1 MiB at import: every tensor above 1 MiB is then mapped on allocation and unmapped on free,
for both providers alike (first-touch page faults included, as glibc already does above 32 MiB).
"""

import ctypes
import os
import statistics
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402

# (N, V, dtype): the 2048 x 32000 fp32 target, a bf16 shape, and a large vocabulary.
SHAPES = [(2048, 32000, torch.float32), (512, 32000, torch.bfloat16), (128, 128256, torch.float32)]
MODES = ["fwd", "fwd+bwd", "fwd_bwd"]
PROVIDERS = ["torch eager", "cpu"]
ROUNDS = 5  # medians of 5 calls after one warm-up: the whole file stays under ~90 s on 2 cores


def _fresh_mappings_above_1mib():
    """mallopt(M_MMAP_THRESHOLD, 1 MiB) on glibc (see the module docstring); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


_fresh_mappings_above_1mib()


def _inputs(n, v, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 4).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return x, y, torch.randn(n, generator=g)


def _eager_logp(x, y):
    return torch.log_softmax(x.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def cpu_model() -> str:
    """lscpu's model name (from /proc/cpuinfo), e.g. 'Intel(R) Xeon(R) Processor'; the machine type elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.machine()


def make_fn(provider, mode, x, y, g):
    """A zero-argument callable running one step; it returns what it produced (kept alive for memory)."""
    if provider == "torch eager":
        if mode == "fwd":
            return lambda: _eager_logp(x, y)

        def eager_step():
            xl = x.detach().requires_grad_(True)
            _eager_logp(xl, y).backward(g)
            return xl.grad

        return eager_step  # fwd_bwd has no eager counterpart: the same autograd step
    if mode == "fwd":
        return lambda: bk.token_logprobs(x, y, backend="cpu")
    if mode == "fwd+bwd":

        def cpu_step():
            xl = x.detach().requires_grad_(True)
            bk.token_logprobs(xl, y, backend="cpu").backward(g)
            return xl.grad

        return cpu_step
    return lambda: bk.token_logprobs_and_grad(x, y, g, backend="cpu")


def median_ms(fn, rounds=ROUNDS):
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def round_robin_ms(fns, rounds=ROUNDS):
    """Median ms of each callable, timed in turn within every round (one warm-up call each first)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def paired_ms(fn_a, fn_b, rounds=ROUNDS):
    """Medians of fn_a and fn_b timed alternately (one warm-up each)."""
    return tuple(round_robin_ms([fn_a, fn_b], rounds))


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn):
    """Peak resident memory of ``fn()`` above the resident size before it (Linux; None elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _status_kb("VmRSS:")
        out = fn()
        peak = _status_kb("VmHWM:")
        del out
        return max(0, peak - before) * 1024
    except (OSError, KeyError):
        return None


def row_info(provider, mode, n, v, dtype, ms, inputs, fn):
    """The accounting of one row: floor bytes, GB/s, ratio to eager (paired timing), extra memory."""
    x, y, g = inputs
    nbytes = C.logprob_floor_bytes(mode, n, v, x.element_size())
    extra = peak_extra_bytes(fn)
    ratio = 1.0
    if provider != "torch eager":
        eager_mode = "fwd" if mode == "fwd" else "fwd+bwd"  # fwd_bwd is judged against eager fwd+bwd
        eager_ms, cpu_ms = paired_ms(make_fn("torch eager", eager_mode, x, y, g), fn)
        ratio = eager_ms / cpu_ms
    info = {
        "shape": f"{n}x{v}",
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "provider": provider,
        "median_ms": round(ms, 3),
        "floor_bytes": nbytes,
        "GB/s": round(nbytes / (ms * 1e-3) / C.GB, 2),
        "ratio_vs_eager": round(ratio, 2),
        "extra_mem_x_logits": None if extra is None else round(extra / (n * v * x.element_size()), 2),
        "threads": torch.get_num_threads(),
        "isa": _ext.require().cpu._isa(),
    }
    info.update(C.limit_info(*_limit(mode, n, v, x.element_size()), ms))
    return info


def _limit(mode, n, v, elt):
    """(rates, floor ms) of a row: the forward reads the logits; the autograd backward reads them again and
    writes the gradient into pages it has just allocated; ``fwd_bwd`` reads once and writes fresh once."""
    size = n * v * elt
    limits = C.cpu_limits(size)
    reads = {"fwd": 1, "fwd+bwd": 2, "fwd_bwd": 1}[mode]
    fresh = 0 if mode == "fwd" else size
    return limits, C.limit_ms(reads * size, limits, fresh_write_bytes=fresh)


def measure(provider, mode, n, v, dtype):
    """(median ms, row info) timed with time.perf_counter (the table mode of ``main``)."""
    inputs = _inputs(n, v, dtype)
    fn = make_fn(provider, mode, *inputs)
    ms = median_ms(fn)
    return ms, row_info(provider, mode, n, v, dtype, ms, inputs, fn)


def _cases():
    for n, v, dtype in SHAPES:
        for mode in MODES:
            for provider in PROVIDERS:
                if provider == "torch eager" and mode == "fwd_bwd":
                    continue
                yield pytest.param(
                    provider, mode, n, v, dtype, id=f"{n}x{v}-{str(dtype)[6:]}-{mode}-{provider}"
                )


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("provider,mode,n,v,dtype", list(_cases()))
def test_cpu_token_logprobs(benchmark, provider, mode, n, v, dtype):
    inputs = _inputs(n, v, dtype)
    fn = make_fn(provider, mode, *inputs)
    benchmark.group = f"token_logprobs {n}x{v} {str(dtype)[6:]} {mode}"
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update(row_info(provider, mode, n, v, dtype, ms, inputs, fn))
    benchmark.extra_info["cpu"] = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main():
    rows = []
    for n, v, dtype in SHAPES:
        for mode in MODES:
            for provider in PROVIDERS:
                if provider == "torch eager" and mode == "fwd_bwd":
                    continue
                _, info = measure(provider, mode, n, v, dtype)
                rows.append(info)
                print(info, flush=True)
    header = [
        "shape",
        "dtype",
        "mode",
        "provider",
        "median_ms",
        "GB/s",
        "ratio_vs_eager",
        "extra_mem_x_logits",
        "frac_of_limit",
    ]
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"isa {_ext.require().cpu._isa()}, {C.today()}\n"
    )
    print(C.markdown_table(header, [[r[h] for h in header] for r in rows]))


if __name__ == "__main__":
    main()
