"""CPU benchmark of ``linear_token_jeffreys`` (on-policy distillation without logits) against its peers.

Forward + backward (gradients for the student's hidden and weight) of the per-token generalised JSD with
β = 0.5 (TRL's convention) at N = 1024 tokens, student H = 512, teacher H = 1024, V = 32000, fp32, random
upstream gradient on the per-token divergence.  Providers:

* torch eager: both models' (N, V) logits, ``log_softmax``, the mixture by ``logaddexp``, autograd;
* TRL's own chunked function, ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` (its torch path on
  CPU), where trl is installed;
* ours, ``divergence="gjsd"``, and ours in the Jeffreys convention (``divergence="jeffreys"``, one forward
  pass instead of two).

Liger's fused linear JSD is Triton-only (GPU), so it is not on this table; the GPU benchmark is owed.
FLOP accounting: eager does 2 forward matmuls (2·N·(H_s + H_t)·V) and 2 backward ones (4·N·H_s·V); a tiled
op that never holds the logits recomputes both models' tiles in the backward (+2·N·(H_s + H_t)·V), and the
generalised JSD's second forward pass adds the same again.  Timing: every provider once per round, in turn,
medians.  Memory: the peak extra resident size of one call (helpers of ``test_bench_cpu.py``).

Run: ``python benchmarks/test_bench_cpu_distill.py`` (the table of BENCHMARKS.md) or
``pytest benchmarks/test_bench_cpu_distill.py --benchmark-only``.
"""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from test_bench_cpu import cpu_model, peak_extra_bytes, round_robin_ms  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402

N, HS, HT, V = 1024, 512, 1024, 32000
BETA = 0.5
ROUNDS = 5
PROVIDERS = [
    "torch eager",
    "trl ChunkedDivergenceFunction",
    "bond_kernels (cpu) gjsd",
    "bond_kernels (cpu) jeffreys",
]


def inputs():
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(N, HS, generator=g)
    ws = torch.randn(V, HS, generator=g) * HS**-0.5 * 2
    ht = torch.randn(N, HT, generator=g)
    wt = torch.randn(V, HT, generator=g) * HT**-0.5 * 2
    return hs, ws, ht, wt, torch.randn(N, generator=g)


def _eager(hs, ws, ht, wt):
    log_s = torch.log_softmax(hs @ ws.T, -1)
    log_t = torch.log_softmax(ht @ wt.T, -1)
    log_m = torch.logaddexp(log_s + math.log1p(-BETA), log_t + math.log(BETA))
    return BETA * (log_t.exp() * (log_t - log_m)).sum(-1) + (1 - BETA) * (log_s.exp() * (log_s - log_m)).sum(
        -1
    )


def per_token(provider):
    """``f(hs, ws, ht, wt) -> (N,)`` for a provider; LookupError when the peer is not installed."""
    if provider == "torch eager":
        return _eager
    if provider.startswith("trl"):
        try:
            from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        except ImportError as exc:
            raise LookupError(f"trl is not importable: {exc}") from exc
        return lambda hs, ws, ht, wt: ChunkedDivergenceFunction.apply(hs, ws, None, ht, wt, None, BETA)[0]
    divergence = provider.split()[-1]
    return lambda hs, ws, ht, wt: bk.linear_token_jeffreys(
        hs, ws, ht, wt, beta=BETA, divergence=divergence, backend="cpu"
    )


def make(provider, hs, ws, ht, wt, g):
    f = per_token(provider)

    def step():
        h, w = hs.detach().requires_grad_(True), ws.detach().requires_grad_(True)
        f(h, w, ht, wt).backward(g)
        return h.grad, w.grad

    return step


def _available(providers, args):
    steps = {}
    for p in providers:
        try:
            steps[p] = make(p, *args)
        except LookupError as exc:
            print(f"{p}: unavailable ({exc})")
    return steps


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_linear_token_jeffreys(benchmark, provider):
    args = inputs()
    try:
        fn = make(provider, *args)
    except LookupError as exc:
        pytest.skip(f"peer unavailable: {exc}")
    benchmark.group = f"linear_token_jeffreys fwd+bwd N={N} H_s={HS} H_t={HT} V={V} fp32"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 1)
    extra = peak_extra_bytes(fn)
    benchmark.extra_info["peak_gib"] = None if extra is None else round(extra / 2**30, 3)


def main():
    args = inputs()
    steps = _available(PROVIDERS, args)
    # the same numbers first: every provider against eager on these inputs
    ref = per_token("torch eager")(*args[:4])
    for p in steps:
        if "jeffreys" not in p:
            err = (per_token(p)(*args[:4]) - ref).abs().max().item()
            print(f"{p}: max |Δ| vs eager {err:.2e}")
    ms = dict(zip(steps, round_robin_ms(list(steps.values()), rounds=ROUNDS)))
    peak = {p: peak_extra_bytes(fn) for p, fn in steps.items()}
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {C.today()}; medians of {ROUNDS} rounds\n"
    )
    base = ms["torch eager"]
    rows = [[p, round(t), f"{base / t:.2f}x", f"{peak[p] / 2**20:.0f} MiB"] for p, t in ms.items()]
    print(C.markdown_table(["provider", "ms", "speed vs eager", "peak extra memory"], rows))
    print(
        f"\nthe student's gradients alone: {(N * HS + V * HS) * 4 / 2**20:.0f} MiB; one model's logits: {N * V * 4 / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
