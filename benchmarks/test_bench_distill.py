"""GPU benchmark of ``linear_token_jeffreys`` (distillation without logits) against eager, TRL and Liger.

Forward + backward (student hidden and weight gradients) of the per-token generalised JSD, β = 0.5 (TRL's
convention), at docs/performance.md's linear-head shape: N = 8192 tokens, student and teacher H = 4096, V = 128256,
bf16, random upstream gradient.  Providers: torch eager (both logits, log_softmax, logaddexp mixture);
TRL's ``ChunkedDivergenceFunction`` (its Triton path on a GPU) where trl is installed; Liger's
``LigerFusedLinearJSD`` (its β weighs the teacher, as TRL's; it returns the mean over tokens, so it is timed on
its own reduction) where liger-kernel is installed; ours in the gjsd and Jeffreys conventions.

FLOPs counted: eager's 2·N·(H_s + H_t)·V forward plus 4·N·H_s·V backward; the ceiling column divides them
by the time at the bf16 matmul rate measured in the same run.  Peak extra memory includes the returned
gradients.  Under ``GPU_CHECK_DRY_RUN=1`` without CUDA it runs on CPU at a tiny shape (the numbers mean
nothing: it proves the path).

    python benchmarks/test_bench_distill.py --table [--out results.md] [--skip eager]
"""

import argparse
import math
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from test_bench_linear import _emit  # noqa: E402

import bond_kernels as bk  # noqa: E402

N, H, V = (8192, 4096, 128256) if C.DEV == "cuda" else (32, 16, 500)
BETA = 0.5
PROVIDERS = [
    "torch eager",
    "trl ChunkedDivergenceFunction",
    "liger LigerFusedLinearJSD",
    "ours gjsd",
    "ours jeffreys",
]
HEADER = [
    "N",
    "H",
    "V",
    "provider",
    "ms",
    "TFLOP/s (eager's FLOPs)",
    "frac of matmul rate",
    "peak extra memory",
]


def inputs(n, h, v):
    g = torch.Generator(device=C.DEV).manual_seed(0)
    dt = torch.bfloat16 if C.DEV == "cuda" else torch.float32
    mk = lambda *s: (torch.randn(*s, device=C.DEV, generator=g) * s[-1] ** -0.5 * 4).to(dt)  # noqa: E731
    hs, ws = torch.randn(n, h, device=C.DEV, generator=g).to(dt), mk(v, h)
    ht, wt = torch.randn(n, h, device=C.DEV, generator=g).to(dt), mk(v, h)
    return hs, ws, ht, wt, torch.randn(n, device=C.DEV, generator=g)


def _eager(hs, ws, ht, wt):
    log_s = torch.log_softmax((hs @ ws.T).float(), -1)
    log_t = torch.log_softmax((ht @ wt.T).float(), -1)
    log_m = torch.logaddexp(log_s + math.log1p(-BETA), log_t + math.log(BETA))
    return BETA * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - BETA) * (log_s.exp() * (log_s - log_m)).sum(
        -1
    )


def step_fn(provider, hs, ws, ht, wt, g):
    """A zero-argument forward + backward for ``provider``; LookupError when the peer is missing."""
    if provider == "torch eager":
        f = _eager
    elif provider.startswith("trl"):
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        except ImportError as exc:
            raise LookupError(f"trl not importable: {exc}") from exc
        f = lambda a, b, c, d: ChunkedDivergenceFunction.apply(a, b, None, c, d, None, BETA)[0]  # noqa: E731
    elif provider.startswith("liger"):
        try:
            from liger_kernel.transformers import LigerFusedLinearJSD
        except ImportError as exc:
            raise LookupError(f"liger-kernel not importable: {exc}") from exc
        if C.DEV != "cuda":
            raise LookupError("Liger's fused linear JSD is Triton-only (needs a GPU)")
        jsd = LigerFusedLinearJSD(jsd_beta=BETA, temperature=1.0)

        def step():
            a, b = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
            jsd(a, b, ht, wt).backward()  # a scalar (mean over tokens): Liger has no per-token output
            return a.grad, b.grad

        return step
    else:
        divergence = provider.split()[-1]
        f = lambda a, b, c, d: bk.linear_token_jeffreys(a, b, c, d, beta=BETA, divergence=divergence)  # noqa: E731

    def step():
        a, b = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        f(a, b, ht, wt).float().backward(g)
        return a.grad, b.grad

    return step


def matmul_tflops():
    m = 8192 if C.DEV == "cuda" else 256
    dt = torch.bfloat16 if C.DEV == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=C.DEV, dtype=dt), torch.randn(m, m, device=C.DEV, dtype=dt)
    return 2 * m**3 / (C.median_ms(lambda: torch.mm(a, b)) * 1e-3) / 1e12


def table(skip=(), n=N, h=H, v=V, out=None):
    peak = matmul_tflops()
    flops = 2 * n * 2 * h * v + 4 * n * h * v
    _emit(
        f"### linear_token_jeffreys (gjsd β = {BETA}), N = {n}, H = {h}, V = {v}, fwd+bwd — {C.card()}, {C.today()}\n",
        out,
    )
    _emit(
        f"matmul rate measured in this run: {peak:.0f} TFLOP/s; eager's FLOPs: {flops / 1e12:.2f} TFLOP.\n",
        out,
    )
    _emit(C.markdown_table(HEADER, []), out)
    args = inputs(n, h, v)
    for provider in PROVIDERS:
        if any(s in provider for s in skip):
            continue
        t0 = time.time()
        try:
            step = step_fn(provider, *args)
            step()  # warm-up (compiles Triton kernels)
            ms = C.median_ms(step, warmup=2, rep=20)
            mem = C.peak_extra_bytes(step)
        except LookupError as exc:
            _emit(f"| {n} | {h} | {v} | {provider} | unavailable: {exc} | | | |", out)
            continue
        except Exception as exc:  # one failing peer must not lose the other rows
            _emit(
                f"| {n} | {h} | {v} | {provider} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | |",
                out,
            )
            C.empty_cache()
            continue
        tf = flops / (ms * 1e-3) / 1e12
        mem_s = "n/a (CPU)" if mem != mem else f"{mem / C.GB:.2f} GB"
        row = [n, h, v, provider, f"{ms:.3f}", f"{tf:.0f}", f"{tf / peak:.2f}", mem_s]
        _emit("| " + " | ".join(str(c) for c in row) + f" |  <!-- {time.time() - t0:.1f} s -->", out)
        C.empty_cache()
    _emit("", out)


@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
def test_distill_fwd_bwd(benchmark, provider):
    args = inputs(N, H, V)
    try:
        step = step_fn(provider, *args)
    except LookupError as exc:
        pytest.skip(str(exc))
    step()
    benchmark.group = f"linear_token_jeffreys fwd+bwd N={N} H={H} V={V}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="print the markdown table")
    ap.add_argument("--skip", default="", help="comma-separated substrings of provider names to leave out")
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    a = ap.parse_args(argv)
    if not a.table:
        ap.error("nothing to do: pass --table")
    table(skip=[s for s in a.skip.split(",") if s], out=a.out)


if __name__ == "__main__":
    main()
