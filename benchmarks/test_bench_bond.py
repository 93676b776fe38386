"""GPU benchmarks of the BOND objective: the sequence-level kernel, token_jeffreys, and a whole BOND step.

1. Sequence level, B = 1024 prompts, n = 16 candidates (policy samples) per prompt, k = 64 reference
   rewards, one Best-of-N sample per prompt (docs/performance.md target: one launch, <= 0.01 ms on an H100):
   the fused ``bond_sequence`` op (cuda), the whole ``bk.bond_loss`` forward (+ backward), reward_quantiles
   alone (cuda, triton), J-BOND at B = 1024, each against the torch reference.  Two timings per row:
   ``triton.testing.do_bench`` (eager launches: includes the host launch overhead whenever the GPU outruns
   the host) and ``do_bench_cudagraph`` (the same work replayed from a CUDA graph: GPU time only).
2. ``token_jeffreys`` at N = 8192, V = 128256, bf16 (randn × 4, anchor = policy + noise): Triton against
   torch eager (the reference) and ``torch.compile`` of it.  Byte floors: forward reads both rows once,
   2·2·N·V bytes (target >= 0.85 of copy bandwidth); forward + backward adds one more read of both rows and
   the gradient write, 5·2·N·V.  Fractions are of the device-to-device copy bandwidth measured in the same
   process.  ``--table`` also times the forward kernel under a few (BLOCK, num_warps) choices.
3. A whole BOND step on N = 8192 tokens of V = 128256 bf16 logits (32 prompts, one policy sample and one
   Best-of-N sample each, 128 tokens per sequence): ``sequence_logprobs`` forward + backward + ``bond_loss``,
   against ``token_logprobs`` forward + backward alone on the same logits (target <= 1.10×), plus the
   gradient-in-forward variant (coefficients from behaviour log-probs, one read + one write).

Run (GPU only): ``pytest benchmarks/test_bench_bond.py -m gpu`` or ``python benchmarks/test_bench_bond.py
--table [--out results.md]`` (benchmarks/gpu_check.sh uses the latter; each row is appended to the file as
it is measured).  ``--seq-b B``, ``--jf N,V`` and ``--step PROMPTS,T,V`` change the shapes of parts 1-3.  With
``GPU_CHECK_DRY_RUN=1`` and no GPU it runs on the CPU (``TRITON_INTERPRET=1``; the sequence-level op on the
``cpu`` backend; perf_counter timings, not measurements; no CUDA-graph column): gpu_check.sh's dry run.
"""

import argparse
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

# Where the benchmarks run and which backend serves the sequence-level op: module globals, so a CPU smoke
# run (tiny sizes, "cpu") can exercise every code path of this file before it costs GPU time.
DEV = C.DEV
SEQ_BACKEND = "cuda" if DEV == "cuda" else "cpu"
SEQ_B, SEQ_M, SEQ_K, SEQ_J = 1024, 16, 64, 1
JF_N, JF_V = 8192, 128256
STEP_PROMPTS, STEP_T, STEP_V = 32, 128, 128256


# --------------------------------------------------------------------------------------------------------
# 1. sequence level
# --------------------------------------------------------------------------------------------------------
def seq_inputs(b=SEQ_B, m=SEQ_M, k=SEQ_K, j=SEQ_J, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    lp = (torch.randn(b, m, device=DEV, generator=g) * 4 - 30).requires_grad_(True)
    rl = torch.randn(b, m, device=DEV, generator=g) * 4 - 30
    pr = torch.randn(b, m, device=DEV, generator=g)
    rr = torch.randn(b, k, device=DEV, generator=g)
    bl = (torch.randn(b, j, device=DEV, generator=g) * 4 - 30).requires_grad_(True)
    return lp, rl, pr, rr, bl


# Each reference comes before the cases compared with it: rows are written as they are measured, with
# their speed-up over a reference already timed.
SEQ_CASES = [
    "bond_sequence op (cuda), m = 16",
    "bond_sequence op (cuda), m = 1 (batch LOO, last block)",
    "reference bond_loss fwd",
    "bk.bond_loss fwd (fused)",
    "reference bond_loss fwd+bwd",
    "bk.bond_loss fwd+bwd (fused)",
    "reference reward_quantiles",
    "reward_quantiles (cuda)",
    "reward_quantiles (triton)",
    "jbond_sequence op (cuda), B = 1024",
    "reference jbond_loss fwd",
    "bk.jbond_loss fwd (fused)",
]


def seq_cases(b=SEQ_B):
    """{name: (fn, reference name or None)} for the sequence-level rows (names: SEQ_CASES)."""
    import bond_kernels as bk
    from bond_kernels import reference as R
    from bond_kernels.ops.bond_sequence import bond_sequence, jbond_sequence

    lp, rl, pr, rr, bl = seq_inputs(b)
    no_mask = torch.empty(0, dtype=torch.bool, device=DEV)
    lpd, bld = lp.detach(), bl.detach()
    kw = dict(n=16, beta=0.5, correction=True)
    up = torch.randn((), device=DEV)

    def fwd_bwd(f):
        def step():
            out = f()
            return torch.autograd.grad(out.loss, (lp, bl), up)

        return step

    jl, jal, jpr = lp[:, 0].detach().requires_grad_(True), rl[:, 0].contiguous(), pr[:, 0].contiguous()
    jar, jbest = rr[:, :2].contiguous(), bl[:, 0].detach().requires_grad_(True)
    cases = {
        "bond_sequence op (cuda), m = 16": (
            lambda: bond_sequence(lpd, rl, pr, rr, no_mask, bld, 16.0, 0.5, 1, 0.0, True, 0, SEQ_BACKEND),
            None,
        ),
        "bond_sequence op (cuda), m = 1 (batch LOO, last block)": (
            lambda: bond_sequence(
                lpd[:, :1], rl[:, :1], pr[:, :1], rr, no_mask, bld, 16.0, 0.5, 1, 0.0, True, 0, SEQ_BACKEND
            ),
            None,
        ),
        "bk.bond_loss fwd (fused)": (
            lambda: bk.bond_loss(lp, rl, pr, rr, bl, validate=False, **kw),
            "reference bond_loss fwd",
        ),
        "reference bond_loss fwd": (lambda: R.bond_loss(lp, rl, pr, rr, bl, **kw), None),
        "bk.bond_loss fwd+bwd (fused)": (
            fwd_bwd(lambda: bk.bond_loss(lp, rl, pr, rr, bl, validate=False, **kw)),
            "reference bond_loss fwd+bwd",
        ),
        "reference bond_loss fwd+bwd": (fwd_bwd(lambda: R.bond_loss(lp, rl, pr, rr, bl, **kw)), None),
        "reward_quantiles (cuda)": (
            lambda: bk.reward_quantiles(pr, rr, smoothing="self", backend=SEQ_BACKEND, validate=False),
            "reference reward_quantiles",
        ),
        "reward_quantiles (triton)": (
            lambda: bk.reward_quantiles(pr, rr, smoothing="self", backend="triton", validate=False),
            "reference reward_quantiles",
        ),
        "reference reward_quantiles": (lambda: R.reward_quantiles(pr, rr, smoothing="self"), None),
        "jbond_sequence op (cuda), B = 1024": (
            lambda: jbond_sequence(
                jl.detach(), jal, jpr, jar, jbest.detach(), 0.5, 0.1, 2.77, True, SEQ_BACKEND
            ),
            None,
        ),
        "bk.jbond_loss fwd (fused)": (
            lambda: bk.jbond_loss(jl, jal, jpr, jar, jbest, gamma=0.1, validate=False),
            "reference jbond_loss fwd",
        ),
        "reference jbond_loss fwd": (lambda: R.jbond_loss(jl, jal, jpr, jar, jbest, gamma=0.1), None),
    }
    assert sorted(cases) == sorted(SEQ_CASES)
    return {name: cases[name] for name in SEQ_CASES}


def measure_seq(b=SEQ_B):
    """Yields one row a case, in SEQ_CASES order, as soon as it is timed (speed-ups against earlier rows)."""
    cases = seq_cases(b)
    done = {}
    for name, (fn, vs) in cases.items():
        try:
            fn()
            C.sync()
            eager = C.median_ms(fn, warmup=50, rep=200)
        except Exception as exc:  # e.g. no _C.cuda (build failed): the other rows still get numbers
            msg = f"FAILED: {type(exc).__name__}: {exc}"[:200].replace("|", "/").replace("\n", " ")
            yield {"name": name, "eager_ms": msg, "graph_ms": "", "speedup": ""}
            continue
        try:
            graph = C.cuda_graph_ms(fn, rep=50)
        except Exception as exc:  # a provider that cannot be captured still gets its eager time
            graph = f"n/a ({type(exc).__name__})"
        r = done[name] = {"name": name, "eager_ms": eager, "graph_ms": graph, "speedup": ""}
        ref = done.get(vs) if vs else None
        if ref is not None:
            parts = []
            if isinstance(graph, float) and isinstance(ref["graph_ms"], float):
                parts.append(f"{ref['graph_ms'] / graph:.1f}× (graph)")
            parts.append(f"{ref['eager_ms'] / eager:.1f}× (eager)")
            r["speedup"] = ", ".join(parts)
        yield r


# --------------------------------------------------------------------------------------------------------
# 2. token_jeffreys
# --------------------------------------------------------------------------------------------------------
def jf_inputs(n=JF_N, v=JF_V, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    z = (torch.randn(n, v, device=DEV, generator=g) * 4).to(torch.bfloat16)
    a = (z.float() + torch.randn(n, v, device=DEV, generator=g)).to(torch.bfloat16)
    up = torch.randn(n, device=DEV, generator=g)
    return z, a, up


_COMPILED = {}


def _jf_eager(z, a):
    from bond_kernels import reference as R

    return R.token_jeffreys(z, a, beta=0.5)


def _jf_compiled():
    if "jf" not in _COMPILED:
        _COMPILED["jf"] = torch.compile(_jf_eager, dynamic=False)
    return _COMPILED["jf"]


JF_PROVIDERS = ["triton", "torch eager", "torch.compile"]


def jf_build(mode, provider, z, a, up):
    import bond_kernels as bk

    f = {
        "triton": lambda t: bk.token_jeffreys(t, a, beta=0.5, backend="triton"),
        "torch eager": lambda t: _jf_eager(t, a),
        "torch.compile": lambda t: _jf_compiled()(t, a),
    }[provider]
    if mode == "fwd":
        return lambda: f(z)
    zr = z.detach().requires_grad_(True)

    def step():
        (grad,) = torch.autograd.grad(f(zr), zr, up)
        return grad

    return step


def measure_jf(copy_bps, n=JF_N, v=JF_V, skip=()):
    """Yields one row a (mode, provider) as soon as it is timed."""
    from bond_kernels import reference as R

    z, a, up = jf_inputs(n, v)
    truth = R.token_jeffreys(z[:256].double(), a[:256].double(), beta=0.5)
    for mode, passes in (("fwd", 2), ("fwd+bwd", 5)):
        for provider in JF_PROVIDERS:
            if any(s in provider for s in skip):
                continue
            try:
                fn = jf_build(mode, provider, z, a, up)
                out = fn()
                C.sync()
                err = (out[:256].double() - truth).abs().max().item() if mode == "fwd" else None
                del out
                peak = C.peak_extra_bytes(fn)
                ms = C.median_ms(fn)
            except Exception as exc:  # e.g. torch eager out of memory: keep the other rows
                C.empty_cache()
                yield {"mode": mode, "provider": provider, "failed": f"{type(exc).__name__}: {exc}"[:200]}
                continue
            floor = passes * n * v * z.element_size()
            gbps, frac = C.rate(floor, ms, copy_bps)
            C.empty_cache()
            yield {
                "mode": mode,
                "provider": provider,
                "ms": ms,
                "gbps": gbps,
                "frac": frac,
                "peak": peak,
                "err": err,
                "floor": floor,
            }


def sweep_jf(copy_bps, n=JF_N, v=JF_V):
    """Yields the forward/backward kernel time under a few (BLOCK, num_warps), row by row: which caps to
    keep (ops/triton/token_jeffreys.py)."""
    from bond_kernels.ops.triton import token_jeffreys as tj

    z, a, up = jf_inputs(n, v)
    no_mask = torch.empty(0, dtype=torch.bool, device=DEV)
    div, lse_p, lse_q, kl = tj.token_jeffreys_fwd(z, a, 0.5, 1.0, no_mask)
    outs = [torch.empty(n, device=DEV) for _ in range(4)]
    grad = torch.empty_like(z)
    for kernel, passes in (("fwd", 2), ("bwd", 3)):
        for block, warps in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16), (8192, 16)):
            if kernel == "fwd":

                def fn(block=block, warps=warps):
                    tj._token_jeffreys_fwd_kernel[(n,)](
                        z,
                        a,
                        no_mask,
                        *outs,
                        v,
                        z.stride(0),
                        a.stride(0),
                        0.5,
                        1.0,
                        HAS_IGNORE=False,
                        BLOCK=block,
                        num_warps=warps,
                    )
            else:

                def fn(block=block, warps=warps):
                    tj._token_jeffreys_bwd_kernel[(n,)](
                        z,
                        a,
                        no_mask,
                        lse_p,
                        lse_q,
                        kl,
                        up,
                        grad,
                        v,
                        z.stride(0),
                        a.stride(0),
                        grad.stride(0),
                        0.5,
                        1.0,
                        HAS_IGNORE=False,
                        BLOCK=block,
                        num_warps=warps,
                    )

            try:
                fn()
                ms = C.median_ms(fn, rep=50)
            except Exception as exc:
                yield [kernel, block, warps, f"FAILED: {type(exc).__name__}", ""]
                continue
            frac = C.rate(passes * n * v * z.element_size(), ms, copy_bps)[1]
            yield [kernel, block, warps, f"{ms:.3f}", f"{frac:.2f}"]


# --------------------------------------------------------------------------------------------------------
# 3. a whole BOND step
# --------------------------------------------------------------------------------------------------------
def step_inputs(prompts=STEP_PROMPTS, t=STEP_T, v=STEP_V, k=16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    nseq = 2 * prompts  # one policy sample and one Best-of-N sample per prompt
    x = (torch.randn(nseq, t, v, device=DEV, generator=g) * 4).to(torch.bfloat16)
    y = torch.randint(0, v, (nseq, t), device=DEV, generator=g)
    ref_logp = -torch.rand(prompts, 1, device=DEV, generator=g) * 200 - 1400
    rewards = torch.randn(prompts, 1, device=DEV, generator=g)
    ref_rewards = torch.randn(prompts, k, device=DEV, generator=g)
    up = torch.randn(nseq * t, device=DEV, generator=g)
    return x, y, ref_logp, rewards, ref_rewards, up


STEP_PROVIDERS = ["token_logprobs fwd+bwd", "BOND step", "BOND step, grad in forward"]


def step_build(provider, x, y, ref_logp, rewards, ref_rewards, up):
    import bond_kernels as bk

    nseq, t, v = x.shape
    p = nseq // 2
    xr = x.detach().requires_grad_(True)
    if provider == "token_logprobs fwd+bwd":

        def run():
            logp = bk.token_logprobs(xr.view(-1, v), y.view(-1))
            (grad,) = torch.autograd.grad(logp, xr, up)
            return grad

        return run
    if provider == "BOND step":

        def run():
            seq = bk.sequence_logprobs(xr, y)
            out = bk.bond_loss(
                seq[:p].view(p, 1),
                ref_logp,
                rewards,
                ref_rewards,
                seq[p:].view(p, 1),
                n=4,
                correction=True,
                validate=False,
            )
            (grad,) = torch.autograd.grad(out.loss, xr)
            return grad

        return run
    if provider == "BOND step, grad in forward":
        # Coefficients from behaviour log-probs (here: the sampler's, passed in), then one sweep that
        # computes the log-probs and their gradient together.
        behaviour = ref_logp + 5.0

        def run():
            from bond_kernels.ops.bond_sequence import bond_sequence

            no_mask = torch.empty(0, dtype=torch.bool, device=DEV)
            _, _, pc, bc, _ = bond_sequence(
                behaviour,
                ref_logp,
                rewards,
                ref_rewards,
                no_mask,
                behaviour,
                4.0,
                0.5,
                1,
                0.0,
                True,
                0,
                SEQ_BACKEND,
            )
            coef = torch.cat([pc.view(-1), bc.view(-1)])
            _, grad = bk.sequence_logprobs_and_grad(x, y, coef)
            return grad

        return run
    raise KeyError(provider)


def measure_step(copy_bps, skip=(), prompts=STEP_PROMPTS, t=STEP_T, v=STEP_V):
    """Yields one row a provider as soon as it is timed (the first, token_logprobs alone, is the base)."""
    x, y, ref_logp, rewards, ref_rewards, up = step_inputs(prompts, t, v)
    base = None
    n = x.shape[0] * x.shape[1]
    for provider in STEP_PROVIDERS:
        if any(s in provider for s in skip):
            continue
        try:
            fn = step_build(provider, x, y, ref_logp, rewards, ref_rewards, up)
            fn()
            C.sync()
            peak = C.peak_extra_bytes(fn)
            ms = C.median_ms(fn)
        except Exception as exc:
            C.empty_cache()
            yield {"provider": provider, "failed": f"{type(exc).__name__}: {exc}"[:200]}
            continue
        C.empty_cache()
        if provider == "token_logprobs fwd+bwd":
            base = ms
        floor = (3 if "grad in forward" not in provider else 2) * n * v * x.element_size()
        yield {
            "provider": provider,
            "ms": ms,
            "peak": peak,
            "ratio": f"{ms / base:.3f}×" if base else "",
            "frac": C.rate(floor, ms, copy_bps)[1],
        }


# --------------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("name", SEQ_CASES)
def test_sequence_level(benchmark, name):
    fn, _ = seq_cases()[name]
    fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=50, warmup_rounds=5, iterations=1)
    benchmark.extra_info.update({"case": name, "card": C.card()})


@pytest.mark.gpu
@pytest.mark.parametrize("provider", JF_PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_token_jeffreys(benchmark, copy_bw, mode, provider):
    z, a, up = jf_inputs()
    fn = jf_build(mode, provider, z, a, up)
    fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    ms = C.median_ms(fn)
    passes = 2 if mode == "fwd" else 5
    gbps, frac = C.rate(passes * z.numel() * z.element_size(), ms, copy_bw)
    benchmark.extra_info.update({"ms": ms, "gbps": gbps, "copy_frac": frac, "card": C.card()})


@pytest.mark.gpu
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_bond_step(benchmark, provider):
    fn = step_build(provider, *step_inputs())
    fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update({"card": C.card()})


# --------------------------------------------------------------------------------------------------------
# script mode
# --------------------------------------------------------------------------------------------------------
def _emit(line, out):
    """Print a line and append it to ``out`` at once, so a run cut off by a timeout keeps its rows."""
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def _fmt(x, spec):
    return format(x, spec) if isinstance(x, float) else str(x)


def table(skip=(), out=None, sweep=True, jf=(JF_N, JF_V), step=(STEP_PROMPTS, STEP_T, STEP_V), seq_b=SEQ_B):
    t0 = time.time()
    copy_bps = C.copy_bandwidth()
    head = f"{C.card()}, {C.today()}"
    _emit(
        f"### BOND sequence level, B = {seq_b}, n = {SEQ_M}, k = {SEQ_K}, j = {SEQ_J}, ops on the "
        f"{SEQ_BACKEND} backend — {head}\n",
        out,
    )
    _emit("Medians: do_bench (eager launches) and do_bench_cudagraph (GPU time of a replayed graph).\n", out)
    _emit(C.markdown_table(["case", "ms (eager)", "ms (CUDA graph)", "speed-up vs torch reference"], []), out)
    try:
        for r in measure_seq(seq_b):
            _emit(
                f"| {r['name']} | {_fmt(r['eager_ms'], '.4f')} | {_fmt(r['graph_ms'], '.4f')} | {r['speedup']} |",
                out,
            )
    except Exception as exc:
        _emit(f"| sequence level | FAILED: {type(exc).__name__}: {exc} | | |", out)
    _emit("", out)

    jf_n, jf_v = jf
    _emit(f"### token_jeffreys, N = {jf_n}, V = {jf_v}, bf16 — {head}\n", out)
    _emit(
        f"Copy bandwidth measured in this run: {copy_bps / C.GB:.0f} GB/s (read + write).  Floors: fwd "
        "2·2·N·V bytes, fwd+bwd 5·2·N·V.\n",
        out,
    )
    _emit(
        C.markdown_table(
            [
                "mode",
                "provider",
                "ms",
                "GB/s of floor",
                "frac of copy BW",
                "peak extra mem",
                "max abs err vs fp64 (256 rows)",
            ],
            [],
        ),
        out,
    )
    for r in measure_jf(copy_bps, jf_n, jf_v, skip=skip):
        if "failed" in r:
            _emit(f"| {r['mode']} | {r['provider']} | FAILED: {r['failed']} | | | | |", out)
            continue
        err = "" if r["err"] is None else f"{r['err']:.2g}"
        _emit(
            f"| {r['mode']} | {r['provider']} | {r['ms']:.3f} | {r['gbps']:.0f} | {r['frac']:.2f} | "
            f"{C.fmt_gb(r['peak'])} | {err} |",
            out,
        )
    _emit("", out)

    if sweep:
        _emit(f"### token_jeffreys launch configurations, N = {jf_n}, V = {jf_v}, bf16 — {head}\n", out)
        _emit("Floors: fwd kernel 2·2·N·V bytes, bwd kernel 3·2·N·V.\n", out)
        _emit(C.markdown_table(["kernel", "BLOCK", "warps", "ms", "frac of copy BW"], []), out)
        for r in sweep_jf(copy_bps, jf_n, jf_v):
            _emit("| " + " | ".join(str(c) for c in r) + " |", out)
        _emit("", out)
        C.empty_cache()

    prompts, t, v = step
    _emit(
        f"### whole BOND step, N = {prompts * 2 * t} tokens ({prompts} prompts × (policy + BoN) × "
        f"{t}), V = {v}, bf16 — {head}\n",
        out,
    )
    _emit(
        "Target: BOND step <= 1.10× token_logprobs fwd+bwd.  Floors: 3·2·N·V bytes through autograd, 2·2·N·V "
        "with the gradient in the forward.\n",
        out,
    )
    _emit(
        C.markdown_table(
            ["provider", "ms", "× token_logprobs fwd+bwd", "frac of copy BW", "peak extra mem"], []
        ),
        out,
    )
    for r in measure_step(copy_bps, skip, prompts, t, v):
        if "failed" in r:
            _emit(f"| {r['provider']} | FAILED: {r['failed']} | | | |", out)
            continue
        _emit(
            f"| {r['provider']} | {r['ms']:.3f} | {r['ratio']} | {r['frac']:.2f} | {C.fmt_gb(r['peak'])} |",
            out,
        )
    _emit(f"\n<!-- test_bench_bond.py --table took {time.time() - t0:.0f} s -->\n", out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="print the markdown tables (do_bench medians)")
    ap.add_argument("--no-sweep", action="store_true", help="leave out the token_jeffreys launch sweep")
    ap.add_argument("--skip", default="", help="comma-separated substrings of provider names to leave out")
    ap.add_argument("--seq-b", type=int, default=SEQ_B, help="prompts B of the sequence-level rows")
    ap.add_argument("--jf", default=f"{JF_N},{JF_V}", help="N,V of the token_jeffreys rows")
    ap.add_argument(
        "--step", default=f"{STEP_PROMPTS},{STEP_T},{STEP_V}", help="PROMPTS,T,V of the whole-step rows"
    )
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    a = ap.parse_args(argv)
    why = C.no_device_reason()
    if why:
        print(why, file=sys.stderr)
        return 2
    jf = tuple(int(x) for x in a.jf.split(","))
    step = tuple(int(x) for x in a.step.split(","))
    if len(jf) != 2 or len(step) != 3:
        ap.error("--jf takes N,V and --step PROMPTS,T,V")
    table([s for s in a.skip.split(",") if s], a.out, not a.no_sweep, jf, step, a.seq_b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
