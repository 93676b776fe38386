"""Forward of token_logprobs / token_jeffreys as a fraction of the read rate, and fwd+bwd against eager.

    PYTHONPATH=$PWD python benchmarks/cpu_token_kernels.py fwd 5   # fractions of the read rate
    PYTHONPATH=$PWD python benchmarks/cpu_token_kernels.py bwd 5   # fwd+bwd ratios against eager

Shapes 2048 x 32000 fp32 and 512 x 32000 bf16.  The read rate is ``sum`` over a resident fp32 buffer of the
inputs' size (twice that for Jeffreys, which reads two tensors), timed round-robin with the kernels (medians
of ``rounds`` calls after a warm-up), so load on the machine hits both alike.  For before/after comparisons
run it alternately with two builds on PYTHONPATH.
"""

import os
import sys

import torch

import bond_kernels as bk

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# test_bench_cpu's timing loop; importing it also sets glibc's mmap threshold to 1 MiB (big buffers are fresh
# mappings, first-touch faults included), as every CPU benchmark does.
from test_bench_cpu import round_robin_ms  # noqa: E402

SHAPES = [(2048, 32000, torch.float32), (512, 32000, torch.bfloat16)]


def forward_row(x, y, q, rounds):
    nbytes = x.numel() * x.element_size()
    one, two = torch.rand(nbytes // 4), torch.rand(2 * nbytes // 4)
    rd, t, rd2, tj = round_robin_ms(
        [
            lambda: one.sum(),
            lambda: bk.token_logprobs(x, y, backend="cpu"),
            lambda: two.sum(),
            lambda: bk.token_jeffreys(x, q, backend="cpu"),
        ],
        rounds,
    )
    return (
        f"read {nbytes / rd / 1e6:.1f} GB/s; token_logprobs {t:.2f} ms = {rd / t:.2f} of read; "
        f"token_jeffreys {tj:.2f} ms = {rd2 / tj:.2f} of read"
    )


def backward_row(x, y, q, grad, rounds):
    def leaf():
        return x.detach().requires_grad_(True)

    def eager():
        xl = leaf()
        torch.log_softmax(xl.float(), -1).gather(-1, y[:, None]).squeeze(-1).backward(grad)
        return xl.grad

    def ours():
        xl = leaf()
        bk.token_logprobs(xl, y, backend="cpu").backward(grad)
        return xl.grad

    def eager_jeffreys():
        xl = leaf()
        lp, lq = torch.log_softmax(xl.float(), -1), torch.log_softmax(q.float(), -1)
        div = 0.5 * (lp.exp() * (lp - lq)).sum(-1) + 0.5 * (lq.exp() * (lq - lp)).sum(-1)
        div.backward(grad)
        return xl.grad

    def ours_jeffreys():
        xl = leaf()
        bk.token_jeffreys(xl, q, backend="cpu").backward(grad)
        return xl.grad

    te, tc, tej, tcj = round_robin_ms([eager, ours, eager_jeffreys, ours_jeffreys], rounds)
    return (
        f"token_logprobs fwd+bwd eager {te:.1f} ours {tc:.1f} ms ratio {te / tc:.2f}; "
        f"token_jeffreys eager {tej:.1f} ours {tcj:.1f} ms ratio {tej / tcj:.2f}"
    )


def main():
    mode, rounds = sys.argv[1], int(sys.argv[2])
    g = torch.Generator().manual_seed(0)
    res = []
    for n, v, dt in SHAPES:
        x = (torch.randn(n, v, generator=g) * 4).to(dt)
        y = torch.randint(0, v, (n,), generator=g)
        q = (torch.randn(n, v, generator=g) * 4).to(dt)
        grad = torch.randn(n, generator=g)
        row = forward_row(x, y, q, rounds) if mode == "fwd" else backward_row(x, y, q, grad, rounds)
        res.append(f"{n}x{v} {str(dt)[6:]}: {row}")
    print(" | ".join(res), flush=True)


if __name__ == "__main__":
    main()
