"""linear_token_logprobs on the GPU (backend="triton": cuBLAS tiles + Triton token kernels).

bf16 at LLM shapes against float64 on the same bf16 inputs, judged next to eager PyTorch's own bf16 error;
fp32 against float64 tightly; the peak-memory bound of the tiled design at the benchmark shape; run-to-run
determinism; and the vocab-sharded engine pieces on the GPU (one process: offsets and the combine).
"""

import pytest
import torch

import bond_kernels as bk
from bond_kernels.ops import linear_engine as eng
from bond_kernels.reference.linear_token_logprobs import (
    linear_token_logprobs as linear_token_logprobs_reference,
)

pytestmark = pytest.mark.gpu

# (N, H, V, bias, temperature, softcap): why each is here.
BF16_CASES = [
    (2048, 1024, 128256, False, 1.0, None),  # Llama-3 vocabulary, 9 tiles of 14336, partial last one
    (1000, 512, 50257, True, 0.8, 30.0),  # GPT-2 vocabulary (odd), bias, temperature and Gemma-style softcap
]


def _inputs(n, h, v, dtype, bias, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hid = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    w = (torch.randn(v, h, device="cuda", generator=g) / h**0.5 * 4).to(dtype)
    b = torch.randn(v, device="cuda", generator=g).to(dtype) if bias else None
    y = torch.randint(0, v, (n,), device="cuda", generator=g)
    y[::37] = -100
    y[1], y[2] = 0, v - 1
    up = torch.randn(n, device="cuda", generator=g)
    up_ent = torch.randn(n, device="cuda", generator=g)
    return hid, w, b, y, up, up_ent


def _run(fn, hid, w, b, y, up, up_ent, **kw):
    leaves = [hid.clone().requires_grad_(True), w.clone().requires_grad_(True)]
    if b is not None:
        leaves.append(b.clone().requires_grad_(True))
    lp, ent = fn(
        leaves[0], leaves[1], y, bias=leaves[2] if b is not None else None, return_entropy=True, **kw
    )
    grads = torch.autograd.grad((lp * up.to(lp.dtype) + ent * up_ent.to(ent.dtype)).sum(), leaves)
    return [lp, ent, *grads]


def _eager_bf16(hid, w, y, bias=None, return_entropy=True, temperature=1.0, softcap=None):
    x = (hid @ w.t() + (0 if bias is None else bias)).float()
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    lp = torch.log_softmax(x / temperature, -1)
    keep = y != -100
    tok = lp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * keep
    ent = -(lp.exp() * lp).sum(-1) * keep
    return tok, ent


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.xdist_group("gpu_bigmem")  # up to ~15 GB: fp64 logits 2048 x 128256, autograd (conftest.py)
@pytest.mark.parametrize("n,h,v,bias,temperature,softcap", BF16_CASES)
def test_bf16_against_fp64_and_eager(n, h, v, bias, temperature, softcap):
    hid, w, b, y, up, up_ent = _inputs(n, h, v, torch.bfloat16, bias)
    kw = dict(temperature=temperature, softcap=softcap)
    ours = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, backend="triton", **kw)
    d64 = lambda t: None if t is None else t.double()
    want = _run(
        linear_token_logprobs_reference, d64(hid), d64(w), d64(b), y, up.double(), up_ent.double(), **kw
    )
    eager = _run(_eager_bf16, hid, w, b, y, up, up_ent, **kw)
    assert (
        ours[0].dtype == torch.float32 and ours[2].dtype == torch.bfloat16 and ours[3].dtype == torch.bfloat16
    )
    names = ["logp", "entropy", "grad hidden", "grad weight", "grad bias"]
    for name, a, e, ref in zip(names, ours, eager, want):
        err, err_eager = _max_err(a, ref), _max_err(e, ref)
        scale = ref.abs().max().item()
        # Same bf16 logits as eager, fp32 after the matmul: at most eager's error, plus bf16 rounding of the
        # tile-wise gradient sums (one rounding per row block of grad_weight; fp32 grad_hidden accumulation).
        assert err <= 2.0 * err_eager + 1e-2 * scale, f"{name}: ours {err:.3e}, eager bf16 {err_eager:.3e}"


def test_fp32_tight():
    hid, w, b, y, up, up_ent = _inputs(777, 256, 32003, torch.float32, True, seed=1)
    torch.backends.cuda.matmul.allow_tf32 = False
    ours = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, backend="triton", softcap=20.0)
    d64 = lambda t: None if t is None else t.double()
    want = _run(
        linear_token_logprobs_reference,
        d64(hid),
        d64(w),
        d64(b),
        y,
        up.double(),
        up_ent.double(),
        softcap=20.0,
    )
    for a, ref in zip(ours, want):
        scale = max(ref.abs().max().item(), 1.0)
        assert _max_err(a, ref) <= 2e-5 * scale


def test_peak_memory_bound_at_benchmark_shape():
    """N = 8192, H = 4096, V = 128256 bf16, forward + backward: the tiled design's analytic bound.

    Bound = grad_weight (V·H·2) + the fp32 grad_hidden accumulator (N·H·4) + max(one logits tile, the
    bf16 grad_hidden output) + 64 MiB for O(N·tiles) statistics and cuBLAS.  (The issue's target is
    1.2 GB; this design's bound is about 1.25 GB — see BENCHMARKS.md.)
    """
    from bond_kernels.ops.linear_plan import gpu_plan

    n, h, v = 8192, 4096, 128256
    hid, w, _, y, up, _ = _inputs(n, h, v, torch.bfloat16, False)
    hid.requires_grad_(True)
    w.requires_grad_(True)

    def step():
        hid.grad = w.grad = None
        bk.linear_token_logprobs(hid, w, y, backend="triton").backward(up)

    step()  # warm-up: Triton compilation, cuBLAS workspaces
    hid.grad = w.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    plan = gpu_plan(n, v, h, torch.bfloat16)
    tile = plan.rows * plan.vocab * 2
    bound = v * h * 2 + n * h * 4 + max(tile, n * h * 2) + (64 << 20)
    print(f"peak extra memory {peak / 1e9:.3f} GB (bound {bound / 1e9:.3f} GB, plan {plan})")
    assert peak <= bound, (
        f"peak extra memory {peak / 1e9:.3f} GB exceeds the analytic bound {bound / 1e9:.3f} GB"
    )


def test_deterministic():
    hid, w, b, y, up, up_ent = _inputs(1500, 256, 40000, torch.bfloat16, True, seed=3)
    a = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, backend="triton")
    c = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, backend="triton")
    for x, z in zip(a, c):
        assert torch.equal(x, z)


def test_auto_picks_triton_and_matches():
    hid, w, b, y, up, up_ent = _inputs(300, 128, 5000, torch.bfloat16, False, seed=4)
    auto = bk.linear_token_logprobs(hid, w, y)
    tri = bk.linear_token_logprobs(hid, w, y, backend="triton")
    assert torch.equal(auto, tri)


def test_shard_engine_pieces_on_gpu():
    """Two vocabulary halves through the engine with offsets, combined like distributed.allreduce_stats."""
    from bond_kernels.ops.linear_plan import gpu_plan

    hid, w, _, y, up, up_ent = _inputs(513, 256, 30011, torch.float32, False, seed=5)
    tk = eng.TRITON.tiles
    cut = 14000
    parts = []
    for off, ws in ((0, w[:cut]), (cut, w[cut:])):
        plan = gpu_plan(513, ws.shape[0], 256, torch.float32)
        parts.append(
            eng.local_forward(
                hid,
                ws,
                None,
                y,
                v_offset=off,
                temperature=1.0,
                softcap=0.0,
                ignore_index=-100,
                want_ent=True,
                tk=tk,
                plan=plan,
            )
        )
    lse, s = eng.combine_stats(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    target = parts[0][2] * parts[0][3] + parts[1][2] * parts[1][3]
    keep = y != -100
    logp = torch.where(keep, target - lse, 0.0)
    ent = torch.where(keep, lse - s, 0.0)
    want_lp, want_ent = linear_token_logprobs_reference(hid.double(), w.double(), y, return_entropy=True)
    assert _max_err(logp, want_lp) < 1e-4 and _max_err(ent, want_ent) < 1e-4


def test_recompute_auto_matches_full():
    """recompute='auto' (kept tiles 6-8 of 9 at this shape) against 'full': the same forward bits, the
    same grad_weight bits (each tile's product is the same cuBLAS call on the same values), grad_hidden to
    fp32 summation order; both against float64 within eager's bf16 error."""
    n, h, v = 2048, 1024, 128256
    hid, w, b, y, up, up_ent = _inputs(n, h, v, torch.bfloat16, True, seed=6)
    kw = dict(backend="triton", temperature=0.9, softcap=30.0)
    from bond_kernels.ops.linear_plan import gpu_plan

    assert eng.make_kept(n, w, gpu_plan(n, v, h, torch.bfloat16)).first == 6
    auto = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, **kw)
    full = _run(bk.linear_token_logprobs, hid, w, b, y, up, up_ent, recompute="full", **kw)
    assert torch.equal(auto[0], full[0]) and torch.equal(auto[1], full[1])
    assert torch.equal(auto[3], full[3])
    torch.testing.assert_close(auto[2].float(), full[2].float(), rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(auto[4].float(), full[4].float(), rtol=1e-2, atol=1e-3)
