"""GPU benchmarks of per-token log-probs: ours (Triton) against torch eager, torch.compile and Liger.

Shapes (docs/performance.md): N = 8192 tokens, V ∈ {32000, 128256, 256000}, bf16 logits (randn × 4).

Byte floors (``_common.logprob_floor_bytes``; 2-byte logits):
  * ``fwd``      forward only: the logits read once, 2·N·V bytes.
  * ``fwd+bwd``  forward + backward through autograd: forward read, backward read, gradient write, 6·N·V.
    (To compare with a fwd+bwd fraction quoted against 4·N·V, multiply ours by 2/3.)
  * ``fwd_bwd``  gradient computed in the forward (caller supplies the upstream gradient): one read, one
    write, 4·N·V.  Our kernel reads a row twice above V = 16384 (second read from L2 while it fits), so
    this path can beat neither its floor nor the copy rate: the fraction says how close it gets.

Each row reports the median time (triton.testing.do_bench, L2 flushed between calls), GB/s of the floor,
the fraction of the device-to-device copy bandwidth measured in the same process, the peak memory
allocated during one call above the inputs (outputs and the gradient included), and for the forward the
max abs error of the log-probs against float64 on the first 256 rows of the same bf16 inputs.

Two ways to run (GPU only):
  * ``pytest benchmarks/test_bench_token_logprobs.py -m gpu`` (pytest-benchmark; numbers in extra_info);
  * ``python benchmarks/test_bench_token_logprobs.py --table`` prints one markdown table (benchmarks/
    gpu_check.sh uses this); ``--sweep`` times the launch configurations of the three kernels.
    One invocation can be cut down to what one stage of gpu_check.sh needs: ``--vocab 128256`` (one V),
    ``--modes fwd,fwd+bwd``, ``--providers torch.compile`` (keep only providers whose name contains one of
    these), ``--skip torch.compile`` (leave those out); ``--sweep-configs 4096x8,8192x16`` (BLOCK x warps;
    default: ``SWEEP_CONFIGS``, the pruned list) and ``--sweep-kernels fwd,bwd``.
  With ``GPU_CHECK_DRY_RUN=1`` and no GPU the script runs on the CPU (``TRITON_INTERPRET=1``, tiny ``--n``
  and ``--vocab``; timings from time.perf_counter, not measurements): gpu_check.sh's dry run.
"""

import argparse
import os
import re
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

N = 8192
VOCABS = [32000, 128256, 256000]
MODES = ["fwd", "fwd+bwd", "fwd_bwd"]
SEQ_B = 8  # sequence variants: 8 sequences of N/8 tokens, padded (B, T, V) layout
ERR_ROWS = 256

# Provider names per mode.  "triton" is the plain kernel; the "+" variants measure the cost of options
# against it (target: within 5%).
PROVIDERS = {
    "fwd": [
        "triton",
        "triton+entropy",
        "triton+T+softcap",
        "triton seq",
        "torch eager",
        "torch.compile",
        "liger",
    ],
    "fwd+bwd": [
        "triton",
        "triton+entropy",
        "triton+T+softcap",
        "triton seq",
        "triton inplace",
        "torch eager",
        "torch.compile",
        "liger",
    ],
    "fwd_bwd": ["triton", "triton inplace", "triton seq", "liger fwd (grad in place)"],
}
# Providers that overwrite their input (they get a private copy of the logits).
MUTATES = {"triton inplace", "liger", "liger fwd (grad in place)"}


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as exc:  # not installed, or built for another triton
        return None, f"{type(exc).__name__}: {exc}"
    return LigerCrossEntropyLoss(reduction="none"), None


def _eager(x, y):
    return torch.log_softmax(x.float(), dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


_COMPILED = {}
# torch.compile's backend for the "torch.compile" rows: inductor (what a trainer gets).  gpu_check.sh's CPU
# dry run sets "aot_eager" (dynamo and AOTAutograd without inductor's C++ compile, which takes ~30 s cold).
COMPILE_BACKEND = os.environ.get("BOND_BENCH_COMPILE_BACKEND", "inductor")


def _compiled(v):
    # Static shapes, one compiled function per V (as a trainer with a fixed vocabulary would see).
    if v not in _COMPILED:
        _COMPILED[v] = torch.compile(_eager, dynamic=False, backend=COMPILE_BACKEND)
    return _COMPILED[v]


def inputs(v, n=N, dtype=torch.bfloat16, seed=0):
    dev = C.DEV
    g = torch.Generator(device=dev).manual_seed(seed)
    x = (torch.randn(n, v, device=dev, generator=g) * 4).to(dtype)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    up = torch.randn(n, device=dev, generator=g)
    return x, y, up


def build(mode, provider, x, y, up):
    """A zero-argument callable doing one step of ``provider`` in ``mode``, and a log-prob getter (or None).

    Returns ``(fn, logp_fn)``; ``logp_fn()`` gives the plain (T = 1, no softcap) fp32 log-probs for the
    accuracy column (fwd only).
    Raises ``LookupError`` with the reason when the provider is unavailable here.
    """
    import bond_kernels as bk

    n, v = x.shape
    seq = (x.view(SEQ_B, n // SEQ_B, v), y.view(SEQ_B, n // SEQ_B))
    coef = up[:SEQ_B].contiguous()
    liger = None
    if provider.startswith("liger"):
        liger, why = _liger()
        if liger is None:
            raise LookupError(f"liger-kernel unavailable ({why})")

    if mode == "fwd":
        fns = {
            "triton": lambda: bk.token_logprobs(x, y, backend="triton"),
            "triton+entropy": lambda: bk.token_logprobs(x, y, return_entropy=True, backend="triton"),
            "triton+T+softcap": lambda: bk.token_logprobs(
                x, y, temperature=0.7, softcap=30.0, backend="triton"
            ),
            "triton seq": lambda: bk.sequence_logprobs(*seq, backend="triton"),
            "torch eager": lambda: _eager(x, y),
            "torch.compile": lambda: _compiled(v)(x, y),
            "liger": lambda: liger(x, y),
        }
        fn = fns[provider]
        if provider == "liger":
            return fn, lambda: -fn().float()
        if provider in ("triton seq", "triton+T+softcap"):
            return fn, None  # sums, or another function of the logits than the plain reference
        return fn, (lambda: fn()[0]) if provider == "triton+entropy" else fn

    if mode == "fwd+bwd":
        xr = x.detach().requires_grad_(True)

        def through_autograd(f):
            def step():
                out = f(xr)
                upstream = up if out.shape == up.shape else coef
                (grad,) = torch.autograd.grad(out, xr, upstream.to(out.dtype))
                return grad

            return step

        fns = {
            "triton": lambda t: bk.token_logprobs(t, y, backend="triton"),
            "triton+entropy": lambda t: sum(bk.token_logprobs(t, y, return_entropy=True, backend="triton")),
            "triton+T+softcap": lambda t: bk.token_logprobs(
                t, y, temperature=0.7, softcap=30.0, backend="triton"
            ),
            "triton seq": lambda t: bk.sequence_logprobs(
                t.view(SEQ_B, n // SEQ_B, v), seq[1], backend="triton"
            ),
            "torch eager": lambda t: _eager(t, y),
            "torch.compile": lambda t: _compiled(v)(t, y),
            "liger": lambda t: liger(t, y),
        }
        if provider == "triton inplace":
            # The logits buffer receives its own gradient: take it from a non-leaf so autograd allows it.
            base = x.detach().requires_grad_(True)

            def step():
                h = base.view_as(base)  # a view is a non-leaf whose storage the backward may reuse
                out = bk.token_logprobs(h, y, backend="triton", inplace=True)
                (grad,) = torch.autograd.grad(out, h, up)
                return grad

            return step, None
        return through_autograd(fns[provider]), None

    if mode == "fwd_bwd":
        if provider == "triton":
            return lambda: bk.token_logprobs_and_grad(x, y, up, backend="triton"), None
        if provider == "triton inplace":
            return lambda: bk.token_logprobs_and_grad(x, y, up, backend="triton", inplace=True), None
        if provider == "triton seq":
            return lambda: bk.sequence_logprobs_and_grad(*seq, coef, backend="triton"), None
        if provider == "liger fwd (grad in place)":
            xr = x.detach().requires_grad_(True)
            return lambda: liger(xr, y), None
    raise KeyError(f"no provider {provider!r} for mode {mode!r}")


def measure(mode, provider, v, copy_bps, n=N):
    """One table row as a dict; raises LookupError when the provider is unavailable."""
    x, y, up = inputs(v, n)
    if provider in MUTATES:
        x = x.clone()
    fn, logp_fn = build(mode, provider, x, y, up)
    fn()  # compile / warm up outside the timings
    C.sync()
    peak = C.peak_extra_bytes(fn)
    err = None
    if logp_fn is not None:
        import bond_kernels.reference as ref

        logp = logp_fn()[:ERR_ROWS].double()
        truth = ref.token_logprobs(x[:ERR_ROWS].double(), y[:ERR_ROWS])
        err = (logp - truth).abs().max().item()
    ms = C.median_ms(fn)
    floor = C.logprob_floor_bytes(mode, n, v, x.element_size())
    gbps, frac = C.rate(floor, ms, copy_bps)
    logits_bytes = x.numel() * x.element_size()
    del x, y, up, fn, logp_fn
    C.empty_cache()
    return {
        "v": v,
        "n": n,
        "mode": mode,
        "provider": provider,
        "ms": ms,
        "floor_bytes": floor,
        "gbps": gbps,
        "copy_frac": frac,
        "peak_extra_bytes": peak,
        "peak_extra_x_logits": peak / logits_bytes,
        "max_abs_err_fp64": err,
        "copy_bw_gbps": copy_bps / C.GB,
    }


def _row(r):
    err = "" if r["max_abs_err_fp64"] is None else f"{r['max_abs_err_fp64']:.2g}"
    return [
        r["v"],
        r["mode"],
        r["provider"],
        f"{r['ms']:.3f}",
        f"{r['gbps']:.0f}",
        f"{r['copy_frac']:.2f}",
        C.fmt_gb(r["peak_extra_bytes"], r["peak_extra_x_logits"]),
        err,
    ]


HEADER = [
    "V",
    "mode",
    "provider",
    "ms",
    "GB/s of floor",
    "frac of copy BW",
    "peak extra mem (× logits)",
    "max abs err vs fp64",
]


# --------------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------------
CASES = [(mode, p) for mode in MODES for p in PROVIDERS[mode]]


@pytest.mark.gpu
@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("mode,provider", CASES)
def test_token_logprobs(benchmark, copy_bw, mode, provider, v):
    if provider.startswith("liger") and _liger()[0] is None:
        pytest.skip(f"peer not installed: {_liger()[1]}")
    row = measure(mode, provider, v, copy_bw)
    x, y, up = inputs(v)
    if provider in MUTATES:
        x = x.clone()
    fn, _ = build(mode, provider, x, y, up)
    fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(row)
    benchmark.extra_info["card"] = C.card()


# --------------------------------------------------------------------------------------------------------
# script mode
# --------------------------------------------------------------------------------------------------------
def _emit(line, out):
    """Print a line and append it to ``out`` at once, so a run cut off by a timeout keeps its rows."""
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def selected(provider, only=(), skip=()):
    """Whether ``provider`` is measured: it contains one of ``only`` (when given) and none of ``skip``."""
    if only and not any(s in provider for s in only):
        return False
    return not any(s in provider for s in skip)


def table(vocabs, modes, skip, n=N, out=None, only=()):
    copy_bps = C.copy_bandwidth()
    backend = "" if COMPILE_BACKEND == "inductor" else f", torch.compile backend {COMPILE_BACKEND}"
    _emit(f"### token_logprobs, N = {n}, bf16{backend} — {C.card()}, {C.today()}\n", out)
    _emit(
        f"Copy bandwidth measured in this run: {copy_bps / C.GB:.0f} GB/s (read + write).  Floors: fwd 2·N·V, "
        "fwd+bwd 6·N·V, fwd_bwd 4·N·V bytes.\n",
        out,
    )
    _emit(C.markdown_table(HEADER, []), out)
    rows = []
    for v in vocabs:
        for mode in modes:
            for provider in PROVIDERS[mode]:
                if not selected(provider, only, skip):
                    continue
                t0 = time.time()
                try:
                    r = measure(mode, provider, v, copy_bps, n)
                except LookupError as exc:
                    _emit(f"| {v} | {mode} | {provider} | unavailable: {exc} | | | | |", out)
                    continue
                except Exception as exc:  # one failing peer must not lose the other rows
                    msg = f"{type(exc).__name__}: {exc}"[:300].replace("|", "/").replace("\n", " ")
                    _emit(f"| {v} | {mode} | {provider} | FAILED: {msg} | | | | |", out)
                    C.empty_cache()
                    continue
                rows.append(r)
                _emit(
                    "| " + " | ".join(str(c) for c in _row(r)) + f" |  <!-- {time.time() - t0:.1f} s -->", out
                )
    _emit("", out)
    return rows


# The launch configurations the sweep times by default: BLOCK x num_warps with 4 to 32 elements per thread
# (fewer than 4: 16-byte bf16 loads no longer fill; more than 32: the fp32 copy of the block plus the
# accumulators pass ~128 registers and spill, see _config.py).  14 of the 5 x 4 grid; the default of
# _config.py (4096 x 8) first, so a sweep cut off by its time budget still has the baseline.  Compiled for
# sm_90 by triton 3.9 with no GPU (bf16, no softcap or entropy: the sweep's variants), the 14 use 27-127
# registers a thread and no stack or local memory in each of the three kernels; 16384 x 4 (64 a thread)
# reaches 255 registers and 96-112 bytes of stack.
SWEEP_BLOCKS = (1024, 2048, 4096, 8192, 16384)
SWEEP_WARPS = (4, 8, 16, 32)
SWEEP_MIN_PER_THREAD, SWEEP_MAX_PER_THREAD = 4, 32


def pruned_configs(blocks=SWEEP_BLOCKS, warps=SWEEP_WARPS, lo=SWEEP_MIN_PER_THREAD, hi=SWEEP_MAX_PER_THREAD):
    """(BLOCK, num_warps) pairs with ``lo`` to ``hi`` elements per thread (32 threads a warp)."""
    return [(b, w) for b in blocks for w in warps if lo <= b // (32 * w) <= hi]


def _baseline_first(configs):
    from bond_kernels.ops.triton import _config

    base = (_config.MAX_BLOCK, _config.num_warps(_config.MAX_BLOCK))
    return sorted(configs, key=lambda c: c != base)  # stable: the rest keep their order


SWEEP_KERNELS = ("fwd", "bwd", "fwd_bwd")
# The pipeline knobs at the default block, timed right after the baseline (they are what the kernels were
# designed around without a GPU): the depth of the cp.async pipeline (_config.NUM_STAGES, 3) and, for the
# two-sweep gradient-in-forward only, its number of persistent programs (_config.two_sweep_programs: about
# 100 at V = 128256 bf16 on a 50 MB L2; 528 is ~4 per SM, an L2-oblivious grid).
PIPELINE_CONFIGS = ("4096x8s2", "4096x8s4", "4096x8s5", "4096x8p66", "4096x8p264", "4096x8p528")


def _parse_item(item):
    """``"4096x8"`` -> (4096, 8, None, None); ``"4096x8s4"`` sets NUM_STAGES; ``"4096x8p264"`` the programs."""
    m = re.fullmatch(r"(\d+)x(\d+)(?:s(\d+))?(?:p(\d+))?", item.strip())
    if not m:
        raise ValueError(
            f"--sweep-configs wants BLOCKxWARPS[sSTAGES][pPROGRAMS] items (e.g. 4096x8s4), got {item!r}"
        )
    block, warps, stages, programs = (int(g) if g else None for g in m.groups())
    return block, warps, stages, programs


def parse_configs(text):
    """``"4096x8,8192x16s4"`` -> [(4096, 8, None, None), (8192, 16, 4, None)]; ``"pruned"`` -> the baseline,
    ``PIPELINE_CONFIGS``, then the rest of the pruned BLOCK x warps list."""
    if text in ("", "pruned"):
        base, *rest = _baseline_first(pruned_configs())
        return (
            [(*base, None, None)]
            + [_parse_item(i) for i in PIPELINE_CONFIGS]
            + [(*c, None, None) for c in rest]
        )
    return [_parse_item(item) for item in text.split(",")]


def _label(block, warps, stages, programs):
    return f"{block}x{warps}" + (f"s{stages}" if stages else "") + (f"p{programs}" if programs else "")


def _sweep_vocab(v, n, copy_bps, out, configs, kernels=SWEEP_KERNELS):
    from bond_kernels.ops.triton import _config
    from bond_kernels.ops.triton import token_logprobs as tk

    x, y, up = inputs(v, n)
    _, lse, _ = tk.token_logprobs_fwd(x, y, 1.0, 0.0, -100, False)
    empty = torch.empty(0, device=x.device)
    # (kernel, launch, passes over the logits it must make: read, or read + write)
    launches = {
        "fwd": (lambda: tk.token_logprobs_fwd(x, y, 1.0, 0.0, -100, False), 1),
        "bwd": (lambda: tk.token_logprobs_bwd(x, y, lse, empty, up, empty, 1.0, 0.0, -100, False), 2),
        "fwd_bwd": (lambda: tk.token_logprobs_fwd_bwd(x, y, up, 1.0, 0.0, -100, False), 2),
    }
    rows = []
    # configuration outer, kernel inner: a sweep cut off by its budget has every kernel of the
    # configurations it reached
    for block, warps, stages, programs in configs:
        for name in kernels:
            if programs is not None and name != "fwd_bwd":
                continue  # the programs knob is the two-sweep kernel's only
            fn, passes = launches[name]
            t0 = time.time()
            with _config.forced(block=block, warps=warps, stages=stages, programs=programs):
                try:
                    fn()
                    ms = C.median_ms(fn, rep=50)
                except Exception as exc:
                    _emit(
                        f"| {v} | {name} | {block} | {warps} | {stages or '-'} | {programs or '-'} | "
                        f"FAILED: {type(exc).__name__} | |",
                        out,
                    )
                    continue
            frac = C.rate(passes * x.numel() * x.element_size(), ms, copy_bps)[1]
            r = [v, name, block, warps, stages or "-", programs or "-", f"{ms:.3f}", f"{frac:.2f}"]
            rows.append(r)
            _emit("| " + " | ".join(str(c) for c in r) + f" |  <!-- {time.time() - t0:.1f} s -->", out)
    return rows


def sweep(vocabs, n=N, out=None, configs=None, kernels=SWEEP_KERNELS):
    """Median ms of each kernel under each (BLOCK, num_warps): which default to keep (_config.py)."""
    configs = parse_configs("pruned") if configs is None else configs
    copy_bps = C.copy_bandwidth()
    header = ["V", "kernel", "BLOCK", "warps", "stages", "programs", "ms", "frac of copy BW"]
    _emit(f"### launch-configuration sweep, N = {n}, bf16 — {C.card()}, {C.today()}\n", out)
    _emit(
        f"Copy bandwidth measured in this run: {copy_bps / C.GB:.0f} GB/s.  Defaults: _config.py.  "
        f"{len(configs)} configurations (BLOCK x warps, s = NUM_STAGES, p = two-sweep programs): "
        f"{', '.join(_label(*c) for c in configs)}.\n",
        out,
    )
    _emit(C.markdown_table(header, []), out)
    rows = []
    for v in vocabs:
        rows += _sweep_vocab(v, n, copy_bps, out, configs, kernels)
        C.empty_cache()
    _emit("", out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="print the markdown table (do_bench medians)")
    ap.add_argument("--sweep", action="store_true", help="time the kernels under each BLOCK × num_warps")
    ap.add_argument("--vocab", default=",".join(map(str, VOCABS)), help="comma-separated V values")
    ap.add_argument("--sweep-vocab", default="128256", help="comma-separated V values for --sweep")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--skip", default="", help="comma-separated substrings of provider names to leave out")
    ap.add_argument(
        "--providers", default="", help="comma-separated substrings: keep only providers whose name has one"
    )
    ap.add_argument(
        "--sweep-configs",
        default="pruned",
        help="BLOCKxWARPS list for --sweep, e.g. 4096x8,8192x16 (default 'pruned': 4 to 32 elements a thread)",
    )
    ap.add_argument("--sweep-kernels", default=",".join(SWEEP_KERNELS), help="kernels for --sweep")
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    a = ap.parse_args(argv)
    why = C.no_device_reason()
    if why:
        print(why, file=sys.stderr)
        return 2
    modes = [m for m in a.modes.split(",") if m]
    kernels = [k for k in a.sweep_kernels.split(",") if k]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (choose from {', '.join(MODES)})")
    for k in kernels:
        if k not in SWEEP_KERNELS:
            ap.error(f"--sweep-kernels: unknown kernel {k!r} (choose from {', '.join(SWEEP_KERNELS)})")
    try:
        configs = parse_configs(a.sweep_configs)
    except ValueError as exc:
        ap.error(str(exc))
    if not (a.table or a.sweep):
        a.table = True
    if a.table:
        skip = [s for s in a.skip.split(",") if s]
        only = [s for s in a.providers.split(",") if s]
        table([int(v) for v in a.vocab.split(",")], modes, skip, a.n, a.out, only)
    if a.sweep:
        sweep([int(v) for v in a.sweep_vocab.split(",")], a.n, a.out, configs, kernels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
