"""CPU benchmark of the fused linear head: ``linear_token_logprobs`` (cpu backend) against torch's own.

Forward + backward with gradients for hidden and weight at N = 2048, H = 1024, V = 32000 fp32 (hidden × 0.5,
weight × 0.05, random upstream gradient on the per-token log-probs).  Providers:

* torch eager: ``log_softmax(hidden @ weightᵀ)`` gathered at the labels, autograd backward;
* torch.compile of the same function (inductor's CPU backend; its compilation is outside the timing);
* torch ``F.linear_cross_entropy`` with its chunked path (``options=LinearCrossEntropyOptions()``,
  ``reduction="none"``, negated: the same per-token log-probs), where the torch version has it;
* ours, default ``recompute="auto"`` (the last tile's logits kept in the grad_weight buffer) and
  ``recompute="full"`` (every tile recomputed).

FLOP accounting: eager does three matmuls (2·N·H·V each: the logits, grad_hidden, grad_weight); the full
recompute schedule does four, so 0.75x eager is its ceiling where matmuls dominate; "auto" recomputes 3 of
the 4 tiles here (3.77 matmuls).  Timing: every provider once per round, in turn, medians of the rounds.
Memory: the peak extra resident size of one call (helpers of ``test_bench_cpu.py``, which map every tensor
above 1 MiB fresh so the peak sees it).

Run: ``python benchmarks/test_bench_cpu_linear.py`` (the table of BENCHMARKS.md) or
``pytest benchmarks/test_bench_cpu_linear.py --benchmark-only``.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from test_bench_cpu import cpu_model, peak_extra_bytes, round_robin_ms  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402

N, H, V = 2048, 1024, 32000
ROUNDS = 5


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g) * 0.5
    w = torch.randn(V, H, generator=g) * 0.05
    return h, w, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)


PROVIDERS = [
    "torch eager",
    "torch.compile",
    "torch F.linear_cross_entropy chunked",
    "bond_kernels (cpu)",
    "bond_kernels (cpu), recompute=full",
]


def _eager(hh, ww, y):
    return torch.log_softmax(hh @ ww.t(), -1).gather(-1, y[:, None]).squeeze(-1)


_compiled = {}


def per_token(provider):
    """``f(hidden, weight, labels) -> (N,) log-probs`` for a provider; LookupError when this torch lacks it."""
    if provider == "torch eager":
        return _eager
    if provider == "torch.compile":
        if "f" not in _compiled:
            _compiled["f"] = torch.compile(_eager)
        return _compiled["f"]
    if provider.startswith("torch F.linear_cross_entropy"):
        F, nn = torch.nn.functional, torch.nn
        if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
            raise LookupError(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
        opts = nn.LinearCrossEntropyOptions()
        return lambda hh, ww, y: -F.linear_cross_entropy(hh, ww, y, reduction="none", options=opts)
    recompute = "full" if "recompute=full" in provider else "auto"
    return lambda hh, ww, y: bk.linear_token_logprobs(hh, ww, y, backend="cpu", recompute=recompute)


def make(provider, h, w, y, g):
    f = per_token(provider)

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        f(hh, ww, y).backward(g)
        return hh.grad, ww.grad

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
def test_cpu_linear_token_logprobs(benchmark, provider):
    args = inputs()
    try:
        fn = make(provider, *args)
    except LookupError as exc:
        pytest.skip(f"peer unavailable in this torch: {exc}")
    benchmark.group = f"linear_token_logprobs fwd+bwd N={N} H={H} V={V} fp32"
    fn()  # torch.compile compiles here, outside the timed rounds
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 1)
    extra = peak_extra_bytes(fn)
    benchmark.extra_info["peak_gib"] = None if extra is None else round(extra / 2**30, 3)
    if provider != "torch eager":
        eager_ms, ours_ms = round_robin_ms([make("torch eager", *args), fn])
        benchmark.extra_info["ratio_vs_eager"] = round(eager_ms / ours_ms, 2)


def main():
    args = inputs()
    steps = _available(PROVIDERS, args)
    ms = dict(zip(steps, round_robin_ms(list(steps.values()))))
    peak = {p: peak_extra_bytes(fn) for p, fn in steps.items()}
    grads = (N * H + V * H) * 4
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {C.today()}; medians of {ROUNDS} rounds\n"
    )
    base = ms["torch eager"]
    rows = [[p, round(t), f"{base / t:.2f}x", f"{peak[p] / 2**20:.0f} MiB"] for p, t in ms.items()]
    print(C.markdown_table(["provider", "ms", "speed vs eager", "peak extra memory"], rows))
    print(f"\nthe two gradients alone: {grads / 2**20:.0f} MiB; the logits: {N * V * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
