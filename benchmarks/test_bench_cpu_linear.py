"""CPU benchmark of the fused linear head: ``linear_token_logprobs`` (cpu backend) against torch's own.

Forward + backward with gradients for hidden and weight at N = 2048, H = 1024, V = 32000 fp32 (hidden × 0.5,
weight × 0.05, random upstream gradient on the per-token log-probs).  Providers:

* torch eager: ``log_softmax(hidden @ weightᵀ)`` gathered at the labels, autograd backward;
* torch.compile of the same function (inductor's CPU backend; its compilation is outside the timing);
* torch ``F.linear_cross_entropy`` with its chunked path (``options=LinearCrossEntropyOptions()``,
  ``reduction="none"``, negated: the same per-token log-probs), where the torch version has it;
* TRL's own fused head, ``trl.trainer.utils._ChunkedLogProbFunction`` (what ``add_fused_lm_head`` runs for
  the GRPO, RLOO, DPO, KTO and SFT trainers), called as TRL calls it: ``(hidden, weight, bias, labels,
  temperature, _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, logit_scale, outputs)``; on a CPU it folds its tiles in
  torch (its Triton kernels are for CUDA/XPU);
* ours, default ``recompute="auto"`` (the last tile's logits kept in the grad_weight buffer) and
  ``recompute="full"`` (every tile recomputed).

``--entropy`` (``entropy=True`` in the pytest rows): every provider also returns the per-token entropy, and
the backward takes a random upstream gradient on it too (the chunked ``F.linear_cross_entropy`` has no
entropy and drops out).

FLOP accounting: eager does three matmuls (2·N·H·V each: the logits, grad_hidden, grad_weight); the full
recompute schedule does four, so 0.75x eager is its ceiling where matmuls dominate; "auto" recomputes 3 of
the 4 tiles here (3.77 matmuls).  Timing: every provider once per round, in turn, medians of the rounds.
Memory: the peak extra resident size of one call (helpers of ``test_bench_cpu.py``, which map every tensor
above 1 MiB fresh so the peak sees it).

Run: ``python benchmarks/test_bench_cpu_linear.py [--entropy] [--shape N,H,V]`` (the tables of
BENCHMARKS.md) or ``pytest benchmarks/test_bench_cpu_linear.py --benchmark-only``.
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


def inputs(n=N, h=H, v=V):
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(n, h, generator=g) * 0.5
    w = torch.randn(v, h, generator=g) * 0.05
    return (
        hid,
        w,
        torch.randint(0, v, (n,), generator=g),
        torch.randn(n, generator=g),
        torch.randn(n, generator=g),
    )


PROVIDERS = [
    "torch eager",
    "torch.compile",
    "torch F.linear_cross_entropy chunked",
    "TRL _ChunkedLogProbFunction",
    "bond_kernels (cpu)",
    "bond_kernels (cpu), recompute=full",
]


def _eager(hh, ww, y):
    return torch.log_softmax(hh @ ww.t(), -1).gather(-1, y[:, None]).squeeze(-1)


def _eager_entropy(hh, ww, y):
    logp = torch.log_softmax(hh @ ww.t(), -1)
    return logp.gather(-1, y[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


_compiled = {}


def _trl_head(entropy):
    """TRL's fused head as ``add_fused_lm_head`` calls it (temperature 1, no softcap, logit scale 1)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError as exc:
        raise LookupError(f"trl is not importable ({exc})") from exc
    fn, chunk = trl_utils._ChunkedLogProbFunction, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    outputs = ("log_probs", "entropy") if entropy else ("log_probs",)

    def f(hh, ww, y):
        logp, ent, *_ = fn.apply(hh, ww, None, y, 1.0, chunk, None, 1.0, outputs)
        return (logp, ent) if entropy else logp

    return f


def per_token(provider, entropy=False):
    """``f(hidden, weight, labels) -> (N,) log-probs`` (and the (N,) entropies with ``entropy``) for a
    provider; LookupError when it is not available here."""
    eager = _eager_entropy if entropy else _eager
    if provider == "torch eager":
        return eager
    if provider == "torch.compile":
        if entropy not in _compiled:
            _compiled[entropy] = torch.compile(eager)
        return _compiled[entropy]
    if provider.startswith("torch F.linear_cross_entropy"):
        F, nn = torch.nn.functional, torch.nn
        if entropy:
            raise LookupError("F.linear_cross_entropy has no entropy")
        if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
            raise LookupError(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
        opts = nn.LinearCrossEntropyOptions()
        return lambda hh, ww, y: -F.linear_cross_entropy(hh, ww, y, reduction="none", options=opts)
    if provider.startswith("TRL"):
        return _trl_head(entropy)
    recompute = "full" if "recompute=full" in provider else "auto"
    return lambda hh, ww, y: bk.linear_token_logprobs(
        hh, ww, y, backend="cpu", recompute=recompute, return_entropy=entropy
    )


def make(provider, h, w, y, g, ge, entropy=False):
    f = per_token(provider, entropy)

    def step():
        hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
        out = f(hh, ww, y)
        if entropy:
            torch.autograd.backward(out, (g, ge))
        else:
            out.backward(g)
        return hh.grad, ww.grad

    return step


def _available(providers, args, entropy):
    steps = {}
    for p in providers:
        try:
            steps[p] = make(p, *args, entropy=entropy)
        except LookupError as exc:
            print(f"{p}: unavailable ({exc})")
    return steps


@pytest.mark.skipif(not _ext.has_cpu(), reason="bond_kernels._C (cpu) is not built")
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cpu_linear_token_logprobs(benchmark, provider, entropy):
    args = inputs()
    try:
        fn = make(provider, *args, entropy=entropy)
    except LookupError as exc:
        pytest.skip(f"peer unavailable here: {exc}")
    benchmark.group = f"linear_token_logprobs fwd+bwd{' +entropy' if entropy else ''} N={N} H={H} V={V} fp32"
    fn()  # torch.compile compiles here, outside the timed rounds
    benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    benchmark.extra_info["ms"] = round(benchmark.stats.stats.median * 1e3, 1)
    extra = peak_extra_bytes(fn)
    benchmark.extra_info["peak_gib"] = None if extra is None else round(extra / 2**30, 3)
    if provider != "torch eager":
        eager_ms, ours_ms = round_robin_ms([make("torch eager", *args, entropy=entropy), fn])
        benchmark.extra_info["ratio_vs_eager"] = round(eager_ms / ours_ms, 2)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entropy", action="store_true", help="log-probs and entropies, gradients on both")
    ap.add_argument("--shape", default=f"{N},{H},{V}", help="N,H,V (default: %(default)s)")
    ap.add_argument("--skip", action="append", default=[], help="leave out a provider (repeatable)")
    opts = ap.parse_args(argv)
    n, h, v = (int(x) for x in opts.shape.split(","))
    args = inputs(n, h, v)
    steps = _available([p for p in PROVIDERS if p not in opts.skip], args, opts.entropy)
    ms = dict(zip(steps, round_robin_ms(list(steps.values()))))
    peak = {p: peak_extra_bytes(fn) for p, fn in steps.items()}
    grads = (n * h + v * h) * 4
    what = "log-probs + entropies" if opts.entropy else "log-probs"
    print(
        f"\n{cpu_model()} ({os.cpu_count()} cores), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, {C.today()}; {what}, fwd+bwd, N={n} H={h} V={v} fp32; medians of {ROUNDS} rounds\n"
    )
    base = ms.get("torch eager")
    trl = ms.get("TRL _ChunkedLogProbFunction")
    rows = [
        [
            p,
            round(t),
            f"{base / t:.2f}x" if base else "-",
            f"{trl / t:.2f}x" if trl else "-",
            f"{peak[p] / 2**20:.0f} MiB" if peak[p] is not None else "-",
        ]
        for p, t in ms.items()
    ]
    print(C.markdown_table(["provider", "ms", "speed vs eager", "speed vs TRL", "peak extra memory"], rows))
    print(f"\nthe two gradients alone: {grads / 2**20:.0f} MiB; the logits: {n * v * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
