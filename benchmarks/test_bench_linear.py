"""GPU benchmark of the fused linear head + log-probs: ours against torch eager, torch.compile and peers.

Shape (docs/performance.md): N = 8192 tokens, H = 4096, V = 128256, bf16, forward + backward with gradients for
hidden and weight (a random upstream gradient on the per-token log-probs; the peers that only produce a
scalar loss run with ``reduction="sum"``, i.e. an upstream gradient of ones).

Accounting:
  * FLOPs = 6·N·H·V (forward logits 2·N·H·V; backward grad_hidden and grad_weight 4·N·H·V).  A design that
    does not keep the logits recomputes them in the backward (8·N·H·V of matmuls), which is still counted
    as 6·N·H·V: the TFLOP/s column is comparable across providers.
  * "frac of matmul" = (6·N·H·V / time) / the bf16 rate of an 8192³ ``torch.mm`` measured in the same run.
  * "peak extra GB": peak CUDA memory allocated during one forward + backward above what was allocated
    before it (inputs and the upstream gradient): the logits a provider keeps, its scratch, AND the two
    gradients it returns (grad_weight alone is V·H·2 bytes = 1.05 GB here).  Printed in GB (1e9 bytes)
    and GiB (2**30 bytes): the H100 peer run's memory figures are GiB written as "GB" (its Cut Cross-Entropy
    row, 1.07, is below the 1.118e9 bytes of the two bf16 gradients that peer returns, but above their
    1.041 GiB), so its 1.2 target is compared with the GiB column.
  * "max abs err": log-probs of the first 256 rows against float64 on the same bf16 inputs (scalar-loss
    peers: their ``reduction="none"`` per-token losses, negated).
  * TRL's fused head (``trl.trainer.utils._ChunkedLogProbFunction``, what ``add_fused_lm_head`` runs in the
    GRPO, RLOO, DPO, KTO and SFT trainers; Triton on a GPU) is called as TRL calls it: on the labelled rows
    only (the gather included in the time), ``(hidden, weight, None, labels, temperature,
    _CHUNKED_LOGPROB_CHUNK_SIZE, softcap, 1.0, outputs)``; its "+entropy+T+softcap" row pairs with ours.
  * "matmuls only" is the floor of the full-recompute schedule: the four cuBLAS products (2 × h·Wᵀ,
    dlogits·W, dlogitsᵀ·h) on full-size operands, with nothing else.  ``recompute="auto"`` (the default,
    "ours (triton)") keeps the logits of the last H/(N+H) of the vocabulary in the grad_weight buffer and
    recomputes only the rest: at this shape 86016 of 128256 columns, so its floor is 3.67 of those four
    products; "ours (triton, recompute=full)" is the schedule without it, measured in the same run.

Two ways to run (GPU only):
  * ``pytest benchmarks/test_bench_linear.py -m gpu`` (pytest-benchmark; numbers in extra_info);
  * ``python benchmarks/test_bench_linear.py --table [--out FILE]`` prints one markdown table (used by
    benchmarks/gpu_check.sh); ``--n/--h/--v`` change the shape, ``--skip`` leaves providers out and
    ``--providers`` keeps only those whose name contains one of its comma-separated substrings.
  With ``GPU_CHECK_DRY_RUN=1`` and no GPU the script runs on the CPU (``TRITON_INTERPRET=1``, tiny shapes;
  perf_counter timings, not measurements; the matmul ceiling from a 256³ product): gpu_check.sh's dry run.
"""

import argparse
import contextlib
import os
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

N, H, V = 8192, 4096, 128256
ERR_ROWS = 256
PROVIDERS = [
    "ours (triton)",
    "ours (triton, recompute=full)",
    "ours +entropy+T+softcap",
    "torch eager",
    "torch.compile",
    "liger FLCE (sum)",
    "trl _ChunkedLogProbFunction",
    "trl _ChunkedLogProbFunction +entropy+T+softcap",
    "cut-cross-entropy (sum)",
    "torch F.linear_cross_entropy chunked (sum)",
    "matmuls only (floor of ours)",
    # The tile shape, measured (last: a run cut short by its time budget loses these first).  The default
    # plan is 8192 x 4096 (64 MiB); 2048 columns halve the tile and double the grad_hidden accumulations,
    # 8192 columns halve those and cost 64 MiB more than the 1.2 GiB target allows.
    "ours (triton, tile 8192x2048)",
    "ours (triton, tile 8192x8192)",
]
HEADER = [
    "N",
    "H",
    "V",
    "provider",
    "ms",
    "TFLOP/s (6NHV)",
    "frac of matmul",
    "peak extra GB",
    "peak extra GiB",
    "max abs err vs fp64",
]


# Size of the square bf16 product whose rate is the ceiling (a CPU dry run takes a small one).
MATMUL_N = 8192 if C.DEV == "cuda" else 256


def matmul_tflops() -> float:
    """bf16 ``torch.mm`` rate of MATMUL_N³ (8192³ on the GPU) in TFLOP/s: the ceiling of this run."""
    m = MATMUL_N
    a = torch.randn(m, m, device=C.DEV, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=C.DEV, dtype=torch.bfloat16)
    ms = C.median_ms(lambda: torch.mm(a, b))
    return 2 * m**3 / (ms * 1e-3) / 1e12


def inputs(n=N, h=H, v=V, seed=0):
    dev = C.DEV
    g = torch.Generator(device=dev).manual_seed(seed)
    hid = torch.randn(n, h, device=dev, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(v, h, device=dev, generator=g) / h**0.5 * 4).to(torch.bfloat16).requires_grad_(True)
    y = torch.randint(0, v, (n,), device=dev, generator=g)
    y[::97] = -100
    up = torch.randn(n, device=dev, generator=g)
    return hid, w, y, up


def _eager(hid, w, y):
    lp = torch.log_softmax((hid @ w.t()).float(), -1)
    keep = y != -100
    return lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep


_compiled = None


def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return liger_fused_linear_cross_entropy
    except Exception as exc:  # not installed (or broken): the row says so
        raise LookupError(f"liger-kernel: {type(exc).__name__}: {exc}") from None


def _trl_head():
    try:
        from trl.trainer import utils as trl_utils

        return trl_utils._ChunkedLogProbFunction, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    except Exception as exc:  # not installed (or broken): the row says so
        raise LookupError(f"trl: {type(exc).__name__}: {exc}") from None


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy
    except Exception as exc:
        raise LookupError(f"cut-cross-entropy: {type(exc).__name__}: {exc}") from None


def _torch_lce():
    import torch.nn as nn
    import torch.nn.functional as F

    if not hasattr(F, "linear_cross_entropy") or not hasattr(nn, "LinearCrossEntropyOptions"):
        raise LookupError(f"torch {torch.__version__} has no chunked F.linear_cross_entropy")
    return lambda hid, w, y, reduction: F.linear_cross_entropy(
        hid, w, y, reduction=reduction, ignore_index=-100, options=nn.LinearCrossEntropyOptions()
    )


@contextlib.contextmanager
def _tile_override(tile):
    """``BOND_KERNELS_LINEAR_TILE=tile`` inside the block (nothing when ``tile`` is None), restored after."""
    if tile is None:
        yield
        return
    saved = os.environ.get("BOND_KERNELS_LINEAR_TILE")
    os.environ["BOND_KERNELS_LINEAR_TILE"] = tile
    try:
        yield
    finally:
        if saved is None:
            del os.environ["BOND_KERNELS_LINEAR_TILE"]
        else:
            os.environ["BOND_KERNELS_LINEAR_TILE"] = saved


def build(provider, hid, w, y, up):
    """(step, per_token) where ``step()`` runs forward + backward and ``per_token(h, w, y)`` the log-probs."""
    import bond_kernels as bk

    global _compiled
    if provider.startswith("ours"):
        kw = dict(temperature=0.9, softcap=30.0) if "+" in provider else {}
        if "recompute=full" in provider:  # the schedule without kept tiles: every tile recomputed
            kw["recompute"] = "full"
        ent = "+entropy" in provider
        # "tile RxC": the plan's override, set around the forward and the backward (make_plan reads it per
        # call; with tiles kept, the backward reuses the forward's plan anyway)
        tile = provider.split("tile ")[1].rstrip(")").replace("x", ",") if "tile " in provider else None

        def per_token(h_, w_, y_):
            with _tile_override(tile):
                out = bk.linear_token_logprobs(h_, w_, y_, backend="triton", return_entropy=ent, **kw)
            return out[0] if ent else out

        def step():
            with _tile_override(tile):
                out = bk.linear_token_logprobs(hid, w, y, backend="triton", return_entropy=ent, **kw)
                if ent:
                    torch.autograd.backward(out, (up, up))
                else:
                    out.backward(up)

        return step, per_token
    if provider == "torch eager":
        return (lambda: _eager(hid, w, y).backward(up)), _eager
    if provider == "torch.compile":
        if _compiled is None:
            _compiled = torch.compile(_eager)
        return (lambda: _compiled(hid, w, y).backward(up)), _compiled
    if provider.startswith("liger"):
        f = _liger()
        return (
            lambda: f(hid, w, y, reduction="sum").backward()
        ), lambda h_, w_, y_: -f(h_, w_, y_, reduction="none")
    if provider.startswith("trl"):
        fn, chunk = _trl_head()
        ent = "+entropy" in provider
        temperature, softcap = (0.9, 30.0) if "+" in provider else (1.0, None)
        outputs = ("log_probs", "entropy") if ent else ("log_probs",)

        def trl_out(h_, w_, y_):
            keep = y_ != -100  # TRL scores the labelled rows only
            logp, entropy, *_ = fn.apply(
                h_[keep], w_, None, y_[keep], temperature, chunk, softcap, 1.0, outputs
            )
            return keep, logp, entropy

        def trl_step():
            keep, logp, entropy = trl_out(hid, w, y)
            if ent:
                torch.autograd.backward((logp, entropy), (up[keep], up[keep]))
            else:
                logp.backward(up[keep])

        def trl_per_token(h_, w_, y_):
            keep, logp, _ = trl_out(h_, w_, y_)
            return logp.new_zeros(keep.shape).masked_scatter(keep, logp)

        return trl_step, trl_per_token
    if provider.startswith("cut-cross-entropy"):
        f = _cce()
        return (
            lambda: f(hid, w, y, reduction="sum").backward()
        ), lambda h_, w_, y_: -f(h_, w_, y_, reduction="none")
    if provider.startswith("torch F.linear_cross_entropy"):
        f = _torch_lce()
        return (lambda: f(hid, w, y, "sum").backward()), lambda h_, w_, y_: -f(h_, w_, y_, "none")
    if provider.startswith("matmuls only"):
        hd, wd = hid.detach(), w.detach()
        logits = torch.empty(hd.shape[0], wd.shape[0], device=hd.device, dtype=torch.bfloat16)
        gh, gw = torch.empty_like(hd), torch.empty_like(wd)

        def step():
            torch.mm(hd, wd.t(), out=logits)  # forward
            torch.mm(hd, wd.t(), out=logits)  # backward recompute
            torch.mm(logits, wd, out=gh)
            torch.mm(logits.t(), hd, out=gw)

        return step, None
    raise ValueError(provider)


def _clear(hid, w):
    hid.grad = None
    w.grad = None


def measure(provider, tflops_peak, n=N, h=H, v=V):
    hid, w, y, up = inputs(n, h, v)
    step, per_token = build(provider, hid, w, y, up)

    def run():
        _clear(hid, w)
        step()

    run()  # warm-up: compilation, autotuning, cuBLAS workspaces
    _clear(hid, w)
    C.sync()
    ms = C.median_ms(run, warmup=5, rep=30)
    _clear(hid, w)
    peak = C.peak_extra_bytes(run) if not provider.startswith("matmuls") else float("nan")
    _clear(hid, w)
    err = "n/a"
    if per_token is not None:
        with torch.no_grad():
            hs, ys = hid[:ERR_ROWS].detach(), y[:ERR_ROWS]
            got = per_token(hs, w.detach(), ys).double()
            kw = dict(temperature=0.9, softcap=30.0) if "+" in provider else {}
            from bond_kernels.reference.linear_token_logprobs import (
                linear_token_logprobs as linear_token_logprobs_reference,
            )

            want = linear_token_logprobs_reference(hs.double(), w.detach().double(), ys, **kw)
            err = f"{(got - want).abs().max().item():.2e}"
    tflops = 6 * n * h * v / (ms * 1e-3) / 1e12
    return dict(
        N=n,
        H=h,
        V=v,
        provider=provider,
        ms=ms,
        tflops=tflops,
        frac=tflops / tflops_peak,
        peak_gb=peak / C.GB,
        peak_gib=peak / 2**30,
        err=err,
    )


def _row(r):
    peak = "" if r["peak_gb"] != r["peak_gb"] else f"{r['peak_gb']:.2f}"
    peak_gib = "" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
    return [
        r["N"],
        r["H"],
        r["V"],
        r["provider"],
        f"{r['ms']:.2f}",
        f"{r['tflops']:.0f}",
        f"{r['frac']:.2f}",
        peak,
        peak_gib,
        r["err"],
    ]


# --------------------------------------------------------------------------------------------------------
# pytest-benchmark
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matmul_peak():
    return matmul_tflops()


@pytest.mark.gpu
@pytest.mark.parametrize("provider", PROVIDERS)
def test_linear_token_logprobs(benchmark, matmul_peak, provider):
    try:
        row = measure(provider, matmul_peak)
    except LookupError as exc:
        pytest.skip(f"peer not installed: {exc}")
    hid, w, y, up = inputs()
    step, _ = build(provider, hid, w, y, up)

    def timed():
        _clear(hid, w)
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=5, warmup_rounds=1, iterations=1)
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


def table(skip=(), n=N, h=H, v=V, out=None, only=()):
    peak = matmul_tflops()
    C.empty_cache()
    _emit(
        f"### linear_token_logprobs, N = {n}, H = {h}, V = {v}, bf16, fwd+bwd — {C.card()}, {C.today()}\n",
        out,
    )
    _emit(
        f"bf16 {MATMUL_N}³ matmul measured in this run: {peak:.0f} TFLOP/s.  FLOPs counted: 6·N·H·V = "
        f"{6 * n * h * v / 1e12:.1f} TFLOP.  Peak extra memory includes the returned gradients "
        f"(grad_weight alone: {v * h * 2 / C.GB:.2f} GB).\n",
        out,
    )
    _emit(C.markdown_table(HEADER, []), out)
    rows = []
    for provider in PROVIDERS:
        if only and not any(s in provider for s in only):
            continue
        if any(s in provider for s in skip):
            continue
        t0 = time.time()
        try:
            r = measure(provider, peak, n, h, v)
        except LookupError as exc:
            _emit(f"| {n} | {h} | {v} | {provider} | unavailable: {exc} | | | | |", out)
            continue
        except Exception as exc:  # one failing peer must not lose the other rows
            _emit(
                f"| {n} | {h} | {v} | {provider} | FAILED: {type(exc).__name__}: {str(exc)[:200]} | | | | |",
                out,
            )
            C.empty_cache()
            continue
        C.empty_cache()  # the provider's tensors died with measure()
        rows.append(r)
        _emit("| " + " | ".join(str(c) for c in _row(r)) + f" |  <!-- {time.time() - t0:.1f} s -->", out)
    _emit("", out)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", action="store_true", help="print the markdown table (do_bench medians)")
    ap.add_argument("--n", type=int, default=N)
    ap.add_argument("--h", type=int, default=H)
    ap.add_argument("--v", type=int, default=V)
    ap.add_argument("--skip", default="", help="comma-separated substrings of provider names to leave out")
    ap.add_argument(
        "--providers", default="", help="comma-separated substrings: keep only providers whose name has one"
    )
    ap.add_argument("--out", default=None, help="append the markdown to this file")
    a = ap.parse_args(argv)
    why = C.no_device_reason()
    if why:
        print(why, file=sys.stderr)
        return 2
    only = [s for s in a.providers.split(",") if s]
    table([s for s in a.skip.split(",") if s], a.n, a.h, a.v, a.out, only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
