"""CPU benchmarks of the BOND objective: the C++/OpenMP ``cpu`` backend against the torch reference, same process.

The GPU targets of docs/performance.md (issue 4, item 7) are measured by ``test_bench_bond.py`` on a GPU; this file
measures the same three things on the CPU fallback, where every user (and CI) can run them:

1. Sequence level at the issue's shape, B = 1024 prompts, n = 16 candidates, k = 64 references, one Best-of-N
   sample per prompt: ``bk.bond_loss`` forward and forward + backward (the fused ``bond_sequence`` op on
   the cpu backend), ``bk.reward_quantiles`` and ``bk.jbond_loss`` forward, each against the same call of
   ``bond_kernels.reference``.  These are O(B·(n + k)) computations: the point is the launch count and the
   Python overhead, not bandwidth.
2. ``token_jeffreys`` at N = 512, V = 32000 fp32 (randn × 4, anchor = policy + noise): cpu against the
   reference.  Byte floors as on the GPU: forward reads both rows once, 2·N·V·elt; forward + backward adds
   one more read of both and the gradient write, 5·N·V·elt.
3. A whole BOND step on N = 2048 tokens of V = 32000 bf16 logits (16 prompts, one policy sample and one
   Best-of-N sample each, 64 tokens per sequence): ``sequence_logprobs`` forward + backward + ``bond_loss``
   against ``token_logprobs`` forward + backward alone on the same logits.  The fused design promises that
   the loss adds nothing that scales with N·V (the GPU target is <= 1.10x); this checks the claim here.

Every ratio comes from the two calls timed alternately in one loop (medians of ``ROUNDS``), as in
``test_bench_cpu.py``, so both see the same load of a shared machine.

Run: ``pytest benchmarks/test_bench_cpu_bond.py --benchmark-only`` or ``python benchmarks/test_bench_cpu_bond.py``
(a markdown table).
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
import test_bench_bond as B  # noqa: E402
from test_bench_cpu import cpu_model, paired_ms  # noqa: E402

import bond_kernels as bk  # noqa: E402
from bond_kernels import _ext  # noqa: E402
from bond_kernels import reference as R  # noqa: E402

ROUNDS = 7
JF_N, JF_V = 512, 32000
STEP_PROMPTS, STEP_T, STEP_V = 16, 64, 32000


def seq_pairs():
    """{row name: (ours, reference)} at B = 1024, n = 16, k = 64 (test_bench_bond's inputs, on the CPU)."""
    B.DEV = "cpu"
    lp, rl, pr, rr, bl = B.seq_inputs()
    kw = dict(n=16, beta=0.5, correction=True)
    up = torch.randn(())

    def fwd_bwd(f):
        return lambda: torch.autograd.grad(f().loss, (lp, bl), up)

    jl, jal, jpr = lp[:, 0].detach().requires_grad_(True), rl[:, 0].contiguous(), pr[:, 0].contiguous()
    jar, jbest = rr[:, :2].contiguous(), bl[:, 0].detach().requires_grad_(True)
    return {
        "bond_loss fwd": (
            lambda: bk.bond_loss(lp, rl, pr, rr, bl, validate=False, **kw),
            lambda: R.bond_loss(lp, rl, pr, rr, bl, **kw),
        ),
        "bond_loss fwd+bwd": (
            fwd_bwd(lambda: bk.bond_loss(lp, rl, pr, rr, bl, validate=False, **kw)),
            fwd_bwd(lambda: R.bond_loss(lp, rl, pr, rr, bl, **kw)),
        ),
        "reward_quantiles": (
            lambda: bk.reward_quantiles(pr, rr, smoothing="self", backend="cpu", validate=False),
            lambda: R.reward_quantiles(pr, rr, smoothing="self"),
        ),
        "jbond_loss fwd": (
            lambda: bk.jbond_loss(jl, jal, jpr, jar, jbest, gamma=0.1, validate=False),
            lambda: R.jbond_loss(jl, jal, jpr, jar, jbest, gamma=0.1),
        ),
    }


def jeffreys_pairs():
    """{row name: (ours, reference, floor bytes)} for token_jeffreys at JF_N x JF_V fp32."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(JF_N, JF_V, generator=g) * 4
    a = z + torch.randn(JF_N, JF_V, generator=g)
    up = torch.randn(JF_N, generator=g)
    elt = z.element_size()

    def fwd_bwd(f):
        def step():
            zl = z.detach().requires_grad_(True)
            return torch.autograd.grad(f(zl), zl, up)

        return step

    return {
        "token_jeffreys fwd": (
            lambda: bk.token_jeffreys(z, a, beta=0.5, backend="cpu"),
            lambda: R.token_jeffreys(z, a, beta=0.5),
            2 * JF_N * JF_V * elt,
        ),
        "token_jeffreys fwd+bwd": (
            fwd_bwd(lambda zl: bk.token_jeffreys(zl, a, beta=0.5, backend="cpu")),
            fwd_bwd(lambda zl: R.token_jeffreys(zl, a, beta=0.5)),
            5 * JF_N * JF_V * elt,
        ),
    }


def step_pair():
    """(BOND step, token_logprobs fwd+bwd) on the same bf16 logits, built by test_bench_bond on the CPU."""
    B.DEV, B.SEQ_BACKEND = "cpu", "cpu"
    inputs = B.step_inputs(prompts=STEP_PROMPTS, t=STEP_T, v=STEP_V)
    return B.step_build("BOND step", *inputs), B.step_build("token_logprobs fwd+bwd", *inputs)


def table_rows():
    rows = []
    for name, (ours, ref) in seq_pairs().items():
        ours_ms, ref_ms = paired_ms(ours, ref, rounds=ROUNDS)
        rows.append(
            [
                f"{name}, B=1024 n=16 k=64",
                "cpu",
                round(ours_ms, 3),
                "reference",
                round(ref_ms, 3),
                round(ref_ms / ours_ms, 1),
                "",
            ]
        )
    for name, (ours, ref, nbytes) in jeffreys_pairs().items():
        ours_ms, ref_ms = paired_ms(ours, ref, rounds=ROUNDS)
        gbps = round(nbytes / (ours_ms * 1e-3) / C.GB, 2)
        rows.append(
            [
                f"{name}, {JF_N}x{JF_V} fp32",
                "cpu",
                round(ours_ms, 3),
                "reference",
                round(ref_ms, 3),
                round(ref_ms / ours_ms, 1),
                f"{gbps} GB/s of the floor",
            ]
        )
    step, tok = step_pair()
    step_ms, tok_ms = paired_ms(step, tok, rounds=ROUNDS)
    n = 2 * STEP_PROMPTS * STEP_T
    rows.append(
        [
            f"BOND step (sequence_logprobs fwd+bwd + bond_loss), {n}x{STEP_V} bf16",
            "cpu",
            round(step_ms, 3),
            "token_logprobs fwd+bwd (cpu)",
            round(tok_ms, 3),
            "",
            f"step / token_logprobs = {step_ms / tok_ms:.3f}x (GPU target <= 1.10x)",
        ]
    )
    return rows


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("name", ["bond_loss fwd", "bond_loss fwd+bwd", "reward_quantiles", "jbond_loss fwd"])
@pytest.mark.parametrize("provider", ["cpu", "reference"])
def test_cpu_sequence_level(benchmark, name, provider):
    ours, ref = seq_pairs()[name]
    benchmark.group = f"{name} B=1024 n=16 k=64"
    benchmark.pedantic(ours if provider == "cpu" else ref, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 4)
    if provider == "cpu":
        ours_ms, ref_ms = paired_ms(ours, ref, rounds=ROUNDS)
        benchmark.extra_info["ratio_vs_eager"] = round(ref_ms / ours_ms, 2)


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("name", ["token_jeffreys fwd", "token_jeffreys fwd+bwd"])
@pytest.mark.parametrize("provider", ["cpu", "reference"])
def test_cpu_token_jeffreys(benchmark, name, provider):
    ours, ref, nbytes = jeffreys_pairs()[name]
    benchmark.group = f"{name} {JF_N}x{JF_V} fp32"
    benchmark.pedantic(ours if provider == "cpu" else ref, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info.update({"ms": round(ms, 3), "GB/s": round(nbytes / (ms * 1e-3) / C.GB, 2)})
    if provider == "cpu":
        ours_ms, ref_ms = paired_ms(ours, ref, rounds=ROUNDS)
        benchmark.extra_info["ratio_vs_eager"] = round(ref_ms / ours_ms, 2)


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("provider", ["BOND step", "token_logprobs fwd+bwd"])
def test_cpu_bond_step(benchmark, provider):
    step, tok = step_pair()
    benchmark.group = f"whole BOND step {2 * STEP_PROMPTS * STEP_T}x{STEP_V} bf16"
    benchmark.pedantic(step if provider == "BOND step" else tok, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 3)
    if provider == "BOND step":
        step_ms, tok_ms = paired_ms(step, tok, rounds=ROUNDS)
        benchmark.extra_info["frac"] = round(step_ms / tok_ms, 3)  # step / token_logprobs fwd+bwd


def main():
    rows = table_rows()
    header = ["what", "ours", "ours ms", "against", "their ms", "speed-up", "note"]
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, isa {_ext.require().cpu._isa()}, {C.today()}\n"
    )
    print(C.markdown_table(header, rows))


if __name__ == "__main__":
    main()
