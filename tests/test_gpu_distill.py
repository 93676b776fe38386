"""linear_token_jeffreys on the GPU (backend="triton": cuBLAS tiles, the Triton tile fold and tile gradient).

fp32 against float64 on the same inputs, tightly; bf16 against float64 on the same bf16 inputs, judged next
to eager PyTorch's own bf16 error (logits formed in bf16 by the matmul, as in the tiles); every convention
(Jeffreys, TRL's generalised JSD, the two KLs), softcaps and a temperature, ignored rows, a random upstream
gradient; and the same result as the torch tiles on the same device (the fused kernels change no math).
"""

import pytest
import torch

import bond_kernels as bk
from bond_kernels.reference.linear_token_jeffreys import linear_token_jeffreys as reference

pytestmark = pytest.mark.gpu

# (divergence, beta, temperature, student softcap, teacher softcap): why each is here.
MODES = [
    ("jeffreys", 0.5, 1.0, None, None),  # the BOND regulariser, one pass
    ("gjsd", 0.5, 0.9, 30.0, 50.0),  # TRL's generalised JSD (two passes), Gemma-style softcaps
    ("gjsd", 0.0, 1.0, None, None),  # TRL's beta = 0: KL(teacher || student), one pass
    ("gjsd", 1.0, 1.3, None, 20.0),  # TRL's beta = 1: KL(student || teacher)
]


def _inputs(n, hs, ht, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = [
        torch.randn(n, hs, device="cuda", generator=g).to(dtype),
        (torch.randn(v, hs, device="cuda", generator=g) * 3 / hs**0.5).to(dtype),
        torch.randn(v, device="cuda", generator=g).to(dtype),
    ]
    t = [
        torch.randn(n, ht, device="cuda", generator=g).to(dtype),
        (torch.randn(v, ht, device="cuda", generator=g) * 3 / ht**0.5).to(dtype),
        torch.randn(v, device="cuda", generator=g).to(dtype),
    ]
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    labels[::13] = -100
    up = torch.randn(n, device="cuda", generator=g)
    return s, t, labels, up


def _ours(s, t, labels, up, divergence, beta, temperature, cap_s, cap_t, backend="triton"):
    leaves = [x.clone().requires_grad_(True) for x in s]
    div = bk.linear_token_jeffreys(
        leaves[0],
        leaves[1],
        t[0],
        t[1],
        bias=leaves[2],
        teacher_bias=t[2],
        labels=labels,
        beta=beta,
        divergence=divergence,
        temperature=temperature,
        softcap=cap_s,
        teacher_softcap=cap_t,
        backend=backend,
    )
    grads = torch.autograd.grad((div * up).sum(), leaves)
    return [div, *grads]


def _truth(s, t, labels, up, divergence, beta, temperature, cap_s, cap_t):
    leaves = [x.detach().double().requires_grad_(True) for x in s]
    div = reference(
        leaves[0],
        leaves[1],
        t[0].double(),
        t[1].double(),
        bias=leaves[2],
        teacher_bias=t[2].double(),
        beta=beta,
        divergence=divergence,
        temperature=temperature,
        softcap=cap_s,
        teacher_softcap=cap_t,
        ignore_mask=labels == -100,
    )
    grads = torch.autograd.grad((div * up.double()).sum(), leaves)
    return [div, *grads]


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("mode", MODES, ids=[f"{m[0]}-{m[1]}" for m in MODES])
def test_fp32_against_fp64(mode):
    s, t, labels, up = _inputs(384, 256, 192, 32000, torch.float32)
    got = _ours(s, t, labels, up, *mode)
    want = _truth(s, t, labels, up, *mode)
    # fp32 tiles through cuBLAS (TF32 off by default for matmuls in torch): 1e-4 of the largest value
    for name, a, b in zip(("div", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        err = _rel(a, b)
        print(f"fp32 {mode[0]} beta={mode[1]} {name}: max error / max |value| = {err:.2e}")
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("mode", MODES, ids=[f"{m[0]}-{m[1]}" for m in MODES])
def test_bf16_within_eager_bf16_error(mode):
    # The tiles hold the logits in bf16, as eager (h @ W.T) does: the error budget is eager's own
    # (bf16 matmul, then fp32 math) against float64, with a factor 2 of slack.
    s, t, labels, up = _inputs(512, 512, 384, 50257, torch.bfloat16, seed=1)
    got = _ours(s, t, labels, up, *mode)
    want = _truth(s, t, labels, up, *mode)
    eager = _ours(s, t, labels, up, *mode, backend="torch")  # the same tiles with torch's elementwise ops
    for name, a, e, b in zip(("div", "grad_hidden", "grad_weight", "grad_bias"), got, eager, want):
        err, err_eager = _rel(a, b), _rel(e, b)
        print(f"bf16 {mode[0]} beta={mode[1]} {name}: ours {err:.2e}, torch tiles {err_eager:.2e}")
        assert err <= 2 * err_eager + 1e-3, (name, err, err_eager)


def test_fused_kernels_match_the_torch_tiles_in_fp32():
    # Same matmuls, same statistics: the Triton fold and gradient against the torch fold and gradient.
    s, t, labels, up = _inputs(300, 128, 96, 20000, torch.float32, seed=2)
    for mode in MODES:
        got = _ours(s, t, labels, up, *mode)
        ref = _ours(s, t, labels, up, *mode, backend="torch")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
