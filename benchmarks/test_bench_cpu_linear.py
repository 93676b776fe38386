"""CPU benchmark of the fused linear head: ``linear_token_logprobs`` (cpu backend) against torch eager.

Forward + backward with gradients for hidden and weight at N = 2048, H = 1024, V = 32000 fp32 (hidden × 0.5,
weight × 0.05, random upstream gradient).  Eager: ``log_softmax(hidden @ weightᵀ)`` gathered at the labels,
autograd backward.  FLOP accounting: eager does three matmuls (2·N·H·V each: the logits, grad_hidden,
grad_weight); the recompute schedule does four (the backward recomputes each logits tile), so 0.75x eager is
its ceiling where matmuls dominate.  Memory: the peak extra resident size of one call (helpers of
``test_bench_cpu.py``, which map every tensor above 1 MiB fresh so the peak sees it).

Run: ``python benchmarks/test_bench_cpu_linear.py`` (the table of BENCHMARKS.md) or
``pytest benchmarks/test_bench_cpu_linear.py --benchmark-only``.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from test_bench_cpu import cpu_model, paired_ms, peak_extra_bytes  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402

N, H, V = 2048, 1024, 32000
ROUNDS = 5


def inputs():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, H, generator=g) * 0.5
    w = torch.randn(V, H, generator=g) * 0.05
    return h, w, torch.randint(0, V, (N,), generator=g), torch.randn(N, generator=g)


def make(provider, h, w, y, g):
    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        if provider == "torch eager":
            lp = torch.log_softmax(hh @ ww.t(), -1).gather(-1, y[:, None]).squeeze(-1)
        else:
            lp = bk.linear_token_logprobs(hh, ww, y, backend="cpu")
        lp.backward(g)
        return hh.grad, ww.grad

    return step


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("provider", ["torch eager", "cpu"])
def test_cpu_linear_token_logprobs(benchmark, provider):
    args = inputs()
    fn = make(provider, *args)
    benchmark.group = f"linear_token_logprobs fwd+bwd N={N} H={H} V={V} fp32"
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 1)
    extra = peak_extra_bytes(fn)
    benchmark.extra_info["peak_gib"] = None if extra is None else round(extra / 2**30, 3)
    if provider == "cpu":
        eager_ms, ours_ms = paired_ms(make("torch eager", *args), fn, rounds=ROUNDS)
        benchmark.extra_info["ratio_vs_eager"] = round(eager_ms / ours_ms, 2)


def main():
    args = inputs()
    eager, ours = make("torch eager", *args), make("cpu", *args)
    e_ms, o_ms = paired_ms(eager, ours, rounds=ROUNDS)
    pe, po = peak_extra_bytes(eager), peak_extra_bytes(ours)
    grads = (N * H + V * H) * 4
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {C.today()}\n"
    )
    rows = [
        ["torch eager", round(e_ms), "1.0", f"{pe / 2**20:.0f} MiB"],
        ["bond_kernels (cpu)", round(o_ms), f"{e_ms / o_ms:.2f}x", f"{po / 2**20:.0f} MiB"],
    ]
    print(C.markdown_table(["provider", "ms", "speed vs eager", "peak extra memory"], rows))
    print(f"\nthe two gradients alone: {grads / 2**20:.0f} MiB; the logits: {N * V * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
