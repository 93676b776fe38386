"""The Triton token log-prob kernels on CPU tensors under ``TRITON_INTERPRET=1``, against the reference.

Run: ``TRITON_INTERPRET=1 pytest tests/test_triton_token_logprobs.py -m interpret``.  Everything is checked
against :mod:`bond_kernels.reference` evaluated in float64 on the same (already rounded) inputs, forward
values and gradients, with random upstream gradients.  Shapes are small (the interpreter runs numpy per
block); the GPU tables live in ``test_gpu_token_logprobs.py``.
"""

import pytest
import torch
from conftest import FP32_OUT_ATOL, assert_close

import bond_kernels as bk
from bond_kernels import reference as ref

pytestmark = [
    pytest.mark.interpret,
    # the interpreter evaluates exp2 of masked lanes and huge arguments in numpy, which warns on overflow
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

IGNORE = -100

# (N, V): why each shape is here.
SHAPES = [
    (1, 1),  # V = 1: logp is exactly 0, the gradient exactly 0
    (7, 33),  # odd, far below one block
    (41, 1271),  # odd sizes, one block
    (16, 4097),  # one column past a 4096-column block: the masked tail of the second iteration
    (5, 8192),  # whole blocks only: the pipelined loop covers the row and the masked tail is skipped
    (3, 20000),  # five blocks of the online log-sum-exp; above the single-pass limit of the fused path
]
DTYPES = [torch.float32, torch.bfloat16]
# (temperature, softcap, return_entropy)
OPTIONS = [
    (1.0, None, False),
    (0.7, None, True),
    (1.3, 12.0, True),
]


def _case(n, v, dtype, *, ignore_frac=0.2, scale=4.0):
    x = (torch.randn(n, v) * scale).to(dtype)
    y = torch.randint(0, v, (n,))
    drop = torch.rand(n) < ignore_frac
    if n > 2:
        drop[0], drop[1] = True, False  # at least one ignored and one kept row
    y[drop] = IGNORE
    return x, y


def _reference(x, y, g, g_ent, temperature=1.0, softcap=None, return_entropy=False, ignore_index=IGNORE):
    """float64 values and the gradient of Σ g·logp (+ Σ g_ent·H) on the same rounded inputs."""
    xd = x.detach().to(torch.float64).requires_grad_(True)
    out = ref.token_logprobs(
        xd,
        y,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
    )
    if return_entropy:
        logp, ent = out
        loss = (logp * g.double()).sum() + (ent * g_ent.double()).sum()
    else:
        logp, ent = out, None
        loss = (logp * g.double()).sum()
    (grad,) = torch.autograd.grad(loss, xd)
    return logp.detach(), (ent.detach() if ent is not None else None), grad


@pytest.mark.parametrize("temperature,softcap,return_entropy", OPTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v", SHAPES)
def test_values_and_gradients(n, v, dtype, temperature, softcap, return_entropy):
    x, y = _case(n, v, dtype)
    g, g_ent = torch.randn(n), torch.randn(n)
    xt = x.clone().requires_grad_(True)
    out = bk.token_logprobs(
        xt, y, temperature=temperature, softcap=softcap, return_entropy=return_entropy, backend="triton"
    )
    logp, ent = out if return_entropy else (out, None)
    loss = (logp * g).sum() + ((ent * g_ent).sum() if return_entropy else 0.0)
    (grad,) = torch.autograd.grad(loss, xt)

    r_logp, r_ent, r_grad = _reference(x, y, g, g_ent, temperature, softcap, return_entropy)
    assert logp.dtype == torch.float32 and logp.shape == (n,)
    torch.testing.assert_close(logp.double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    if return_entropy:
        assert ent.dtype == torch.float32
        torch.testing.assert_close(ent.double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close(grad, r_grad, scale=max(r_grad.abs().max().item(), g.abs().max().item()))
    ignored = y == IGNORE
    assert torch.all(logp[ignored] == 0) and torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("ignore_index", [0, 7])
def test_ignore_index_that_is_a_vocabulary_id(ignore_index):
    """An ignore_index inside [0, V): rows with that label give 0 and no gradient, every other row is scored
    (labels of -100 do not occur: with this ignore_index they would be out of range)."""
    n, v = 11, 1029
    x, _ = _case(n, v, torch.float32)
    y = torch.randint(0, v, (n,))
    y[::3] = ignore_index
    g, g_ent = torch.randn(n), torch.randn(n)
    xt = x.clone().requires_grad_(True)
    logp, ent = bk.token_logprobs(
        xt, y, ignore_index=ignore_index, temperature=1.2, return_entropy=True, backend="triton"
    )
    (grad,) = torch.autograd.grad((logp * g).sum() + (ent * g_ent).sum(), xt)
    r_logp, r_ent, r_grad = _reference(x, y, g, g_ent, 1.2, None, True, ignore_index=ignore_index)
    torch.testing.assert_close(logp.double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    torch.testing.assert_close(ent.double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    assert_close(grad, r_grad, scale=max(r_grad.abs().max().item(), g.abs().max().item()))
    ignored = y == ignore_index
    assert torch.all(logp[ignored] == 0) and torch.all(grad[ignored] == 0) and torch.all(logp[~ignored] < 0)


def test_fp16_values_and_gradients():
    x, y = _case(9, 3001, torch.float16)
    g, g_ent = torch.randn(9), torch.randn(9)
    xt = x.clone().requires_grad_(True)
    logp, ent = bk.token_logprobs(xt, y, return_entropy=True, temperature=0.9, backend="triton")
    (grad,) = torch.autograd.grad((logp * g).sum() + (ent * g_ent).sum(), xt)
    r_logp, r_ent, r_grad = _reference(x, y, g, g_ent, 0.9, None, True)
    torch.testing.assert_close(logp.double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    torch.testing.assert_close(ent.double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    assert grad.dtype == torch.float16
    assert_close(grad, r_grad)


def test_launcher_contract():
    """Direct launcher calls: output shapes and dtypes, the saved lse, ignored rows, entropy (0,) unless asked."""
    from bond_kernels.ops import triton as tk
    from bond_kernels.ops.token_logprobs import full_lse

    x, y = _case(12, 777, torch.bfloat16)
    logp, lse, ent = tk.token_logprobs_fwd(x, y, 0.7, 0.0, IGNORE, False)
    # the split form: (row max of the logits, ln Σ exp((x − max)/T)), see the launcher contract
    assert logp.shape == (12,) and lse.shape == (2, 12) and ent.shape == (0,)
    assert logp.dtype == lse.dtype == ent.dtype == torch.float32
    keep = y != IGNORE
    torch.testing.assert_close(lse[0][keep], x.float().amax(-1)[keep], atol=0, rtol=0)
    torch.testing.assert_close(
        full_lse(lse, 0.7, 0.0)[keep].double(),
        torch.logsumexp(x.double() / 0.7, -1)[keep],
        atol=FP32_OUT_ATOL,
        rtol=0,
    )
    assert torch.all(lse[:, ~keep] == 0) and torch.all(logp[~keep] == 0)
    logp2, lse2, ent2 = tk.token_logprobs_fwd(x, y, 0.7, 0.0, IGNORE, True)
    assert ent2.shape == (12,)
    assert torch.equal(logp, logp2) and torch.equal(lse, lse2)  # entropy costs no accuracy on the rest


def test_all_ignored():
    x, _ = _case(6, 300, torch.bfloat16)
    y = torch.full((6,), IGNORE)
    xt = x.clone().requires_grad_(True)
    logp, ent = bk.token_logprobs(xt, y, return_entropy=True, backend="triton")
    (grad,) = torch.autograd.grad((logp * torch.randn(6)).sum() + (ent * torch.randn(6)).sum(), xt)
    assert torch.all(logp == 0) and torch.all(ent == 0) and torch.all(grad == 0)
    lp, gr = bk.token_logprobs_and_grad(x, y, torch.randn(6), backend="triton")
    assert torch.all(lp == 0) and torch.all(gr == 0)


@pytest.mark.parametrize("softcap", [None, 8.0])
def test_neg_inf_logits(softcap):
    """Masked vocabulary (−inf entries), a label on a −inf entry, and an ignored all −inf row."""
    n, v = 6, 5000
    x, y = _case(n, v, torch.float32, ignore_frac=0.0)
    x[:, 1000:3500] = float("-inf")  # spans a block boundary
    x[1, :] = float("-inf")
    y[1] = IGNORE
    y[2] = 0
    x[2, :5] = float("-inf")  # label on a −inf entry: logp = −inf without a softcap
    g, g_ent = torch.randn(n), torch.randn(n)
    xt = x.clone().requires_grad_(True)
    logp, ent = bk.token_logprobs(xt, y, return_entropy=True, softcap=softcap, backend="triton")
    (grad,) = torch.autograd.grad((logp * g).sum() + (ent * g_ent).sum(), xt)
    r_logp, r_ent, r_grad = _reference(x, y, g, g_ent, 1.0, softcap, True)
    torch.testing.assert_close(logp.double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    torch.testing.assert_close(ent.double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    assert torch.isfinite(grad).all()
    assert_close(grad, r_grad)
    assert logp[1] == 0 and ent[1] == 0 and torch.all(grad[1] == 0)


def test_three_d_non_contiguous_no_copy():
    """logits[:, :-1] of a (B, T+1, V) buffer is read in place; labels int32 through the launcher."""
    from bond_kernels.ops import triton as tk

    b, t, v = 3, 7, 2100
    full = (torch.randn(b, t + 1, v) * 3).to(torch.bfloat16)
    x = full[:, :-1]
    assert not x.is_contiguous()
    y = torch.randint(0, v, (b, t))
    y[0, 2] = IGNORE
    g, g_ent = torch.randn(b, t), torch.randn(b, t)
    logp, lse, ent = tk.token_logprobs_fwd(x, y.reshape(-1).to(torch.int32), 0.8, 0.0, IGNORE, True)
    r_logp, r_ent, r_grad = _reference(x, y, g, g_ent, 0.8, None, True)
    torch.testing.assert_close(logp.view(b, t).double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    torch.testing.assert_close(ent.view(b, t).double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    grad = tk.token_logprobs_bwd(
        x, y.reshape(-1), lse, ent, g.reshape(-1), g_ent.reshape(-1), 0.8, 0.0, IGNORE, False
    )
    assert grad.shape == x.shape and grad.dtype == torch.bfloat16
    assert_close(grad, r_grad)

    # The same through the functional API, with autograd and int32 labels.
    xs = full.detach().clone().requires_grad_(True)
    view = xs[:, :-1]
    lp, en = bk.token_logprobs(
        view, y.to(torch.int32), temperature=0.8, return_entropy=True, backend="triton"
    )
    (gfull,) = torch.autograd.grad((lp * g).sum() + (en * g_ent).sum(), xs)
    assert_close(gfull[:, :-1], r_grad)
    assert torch.all(gfull[:, -1] == 0)


def test_inplace_backward_overwrites_logits():
    x, y = _case(10, 3000, torch.bfloat16)
    g = torch.randn(10)
    leaf = x.clone().requires_grad_(True)
    h = leaf * 1.0  # a non-leaf activation whose buffer the backward may destroy
    logp = bk.token_logprobs(h, y, inplace=True, temperature=1.1, backend="triton")
    (grad,) = torch.autograd.grad((logp * g).sum(), leaf)
    r_logp, _, r_grad = _reference(x, y, g, None, 1.1)
    torch.testing.assert_close(logp.detach().double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    assert_close(grad, r_grad)
    assert_close(h.detach(), r_grad, torch.bfloat16)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("dtype", DTYPES)
# single-pass, its limit, two sweeps; two sweeps over whole blocks only (24576 = 6 × 4096) with 8 rows on 3 persistent
# programs (the interpreter's grid, _config.two_sweep_programs), an uneven split with ignored rows among them
@pytest.mark.parametrize("n,v", [(13, 999), (9, 16384), (4, 20000), (8, 24576)])
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.6, 10.0)])
def test_fwd_bwd_path(n, v, dtype, temperature, softcap):
    x, y = _case(n, v, dtype)
    g = torch.randn(n)
    logp, grad = bk.token_logprobs_and_grad(
        x, y, g, temperature=temperature, softcap=softcap, backend="triton"
    )
    r_logp, _, r_grad = _reference(x, y, g, None, temperature, softcap)
    torch.testing.assert_close(logp.double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close(grad, r_grad)

    xi = x.clone()
    logp_i, grad_i = bk.token_logprobs_and_grad(
        xi, y, g, temperature=temperature, softcap=softcap, backend="triton", inplace=True
    )
    assert grad_i.data_ptr() == xi.data_ptr()
    assert torch.equal(logp_i, logp) and torch.equal(grad_i, grad)  # in place changes nothing but the buffer


def test_out_of_range_label_gives_nan_row():
    """No host sync: an out-of-range label (not ignore_index) poisons its own row only."""
    from bond_kernels.ops import triton as tk

    n, v = 5, 600
    x, y = _case(n, v, torch.float32, ignore_frac=0.0)
    y[1], y[3] = v, -1
    g = torch.randn(n)
    logp, lse, ent = tk.token_logprobs_fwd(x, y, 1.0, 0.0, IGNORE, True)
    bad = torch.tensor([False, True, False, True, False])
    assert torch.isnan(logp[bad]).all() and torch.isfinite(logp[~bad]).all()
    grad = tk.token_logprobs_bwd(x, y, lse, ent, g, torch.empty(0), 1.0, 0.0, IGNORE, False)
    assert torch.isnan(grad[bad]).all() and torch.isfinite(grad[~bad]).all()
    lp2, gr2 = tk.token_logprobs_fwd_bwd(x, y, g, 1.0, 0.0, IGNORE, False)
    assert torch.isnan(lp2[bad]).all() and torch.isnan(gr2[bad]).all()
    assert torch.isfinite(lp2[~bad]).all() and torch.isfinite(gr2[~bad]).all()
    yok = y.clone()
    yok[bad] = IGNORE
    r_logp, _, r_grad = _reference(x, yok, g, None)
    torch.testing.assert_close(logp[~bad].double(), r_logp[~bad], atol=FP32_OUT_ATOL, rtol=0)
    assert_close(grad[~bad], r_grad[~bad])


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sequence_logprobs_and_grads(layout):
    b, t, v = 3, 6, 1500
    x, y = _case(b * t, v, torch.bfloat16)
    coef = torch.randn(b)
    if layout == "padded":
        x3, y3, cu = x.view(b, t, v), y.view(b, t), None
    else:
        x3, y3, cu = x, y, torch.tensor([0, 4, 4, b * t])  # includes an empty sequence
    nseq = b
    # Sequence sums through autograd.
    xt = x3.clone().requires_grad_(True)
    seq = bk.sequence_logprobs(xt, y3, cu_seqlens=cu, temperature=0.9, backend="triton")
    (grad,) = torch.autograd.grad((seq * coef).sum(), xt)
    xd = x3.double().requires_grad_(True)
    r_seq = ref.sequence_logprobs(xd, y3, cu_seqlens=cu, temperature=0.9, ignore_index=IGNORE)
    (r_grad,) = torch.autograd.grad((r_seq * coef.double()).sum(), xd)
    assert seq.shape == (nseq,) and seq.dtype == torch.float32
    torch.testing.assert_close(seq.double(), r_seq.detach(), atol=FP32_OUT_ATOL * t, rtol=0)
    assert_close(grad, r_grad)
    # The gradient-in-forward path with the same per-sequence coefficients.
    seq2, grad2 = bk.sequence_logprobs_and_grad(
        x3, y3, coef, cu_seqlens=cu, temperature=0.9, backend="triton"
    )
    torch.testing.assert_close(seq2.double(), r_seq.detach(), atol=FP32_OUT_ATOL * t, rtol=0)
    assert_close(grad2, r_grad)


def test_deterministic():
    x, y = _case(8, 5000, torch.bfloat16)
    g = torch.randn(8)
    runs = []
    for _ in range(2):
        xt = x.clone().requires_grad_(True)
        logp, ent = bk.token_logprobs(xt, y, return_entropy=True, backend="triton")
        (grad,) = torch.autograd.grad((logp * g).sum() + ent.sum(), xt)
        runs.append((logp, ent, grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_bad_input_to_launchers():
    from bond_kernels.ops import triton as tk

    x = torch.randn(4, 64)
    y = torch.randint(0, 64, (4,))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        tk.token_logprobs_fwd(torch.randn(64, 4).t(), y, 1.0, 0.0, IGNORE, False)
    with pytest.raises(ValueError, match="labels must be"):
        tk.token_logprobs_fwd(x, y[:3], 1.0, 0.0, IGNORE, False)
    with pytest.raises(TypeError, match="logits must be"):
        tk.token_logprobs_fwd(x.to(torch.int32), y, 1.0, 0.0, IGNORE, False)
    with pytest.raises(ValueError, match="logits must be"):
        tk.token_logprobs_fwd(x.view(1, 1, 4, 64), y, 1.0, 0.0, IGNORE, False)
    with pytest.raises(ValueError, match="grad_logp must have"):
        tk.token_logprobs_fwd_bwd(x, y, torch.randn(3), 1.0, 0.0, IGNORE, False)


def test_compile_fullgraph_no_graph_break():
    """torch.compile(fullgraph=True) traces the functional call and its backward through the custom ops."""
    x, y = _case(6, 700, torch.float32)
    g = torch.randn(6)

    def f(logits, labels):
        logp, ent = bk.token_logprobs(logits, labels, temperature=0.9, return_entropy=True, backend="triton")
        return logp, ent

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    xt = x.clone().requires_grad_(True)
    logp, ent = cf(xt, y)
    (grad,) = torch.autograd.grad((logp * g).sum() + ent.sum(), xt)
    r_logp, r_ent, r_grad = _reference(x, y, g, torch.ones(6), 0.9, None, True)
    torch.testing.assert_close(logp.detach().double(), r_logp, atol=FP32_OUT_ATOL, rtol=0)
    torch.testing.assert_close(ent.detach().double(), r_ent, atol=FP32_OUT_ATOL, rtol=0)
    assert_close(grad, r_grad)


def test_launch_config_helpers():
    from bond_kernels.ops.triton import _config

    assert _config.block_size(1) == 16 and _config.block_size(1271) == 2048
    assert _config.block_size(20000) == _config.MAX_BLOCK
    assert _config.block_size(9000, cap=_config.SINGLE_PASS_MAX) == 16384
    assert _config.single_pass(_config.SINGLE_PASS_MAX) and not _config.single_pass(
        _config.SINGLE_PASS_MAX + 1
    )
    assert [_config.num_warps(b) for b in (16, 1024, 4096, 16384)] == [4, 4, 8, 16]
    with _config.forced(block=8192, warps=32):
        assert _config.block_size(20000) == 8192 and _config.num_warps(16) == 32
        assert (
            _config.block_size(9000, cap=_config.SINGLE_PASS_MAX) == 16384
        )  # single-pass rows are not forced
    assert _config.block_size(20000) == _config.MAX_BLOCK and _config.num_warps(4096) == 8
    assert _config.num_stages() == _config.NUM_STAGES
    with _config.forced(stages=2, programs=5):
        assert _config.num_stages() == 2
        assert _config.two_sweep_programs(100, 1 << 20, torch.device("cpu")) == 5
        assert _config.two_sweep_programs(4, 1 << 20, torch.device("cpu")) == 4  # never more than rows
    # on CPU (the interpreter) 3 persistent programs, so the tests run several rows per program
    assert _config.two_sweep_programs(100, 1 << 20, torch.device("cpu")) == 3
    assert _config.two_sweep_programs(2, 1 << 20, torch.device("cpu")) == 2


def test_fast_tanh_is_opt_in_and_cuda_only(monkeypatch):
    """The one-instruction tanh is PTX with ~2^-11 relative error: only with BOND_KERNELS_FAST_TANH=1, and
    never for CPU tensors (the interpreter runs the exp2 formula)."""
    from bond_kernels.ops.triton import _config

    monkeypatch.delenv("BOND_KERNELS_FAST_TANH", raising=False)
    assert not _config.fast_tanh(torch.device("cuda", 0))
    monkeypatch.setenv("BOND_KERNELS_FAST_TANH", "1")
    assert _config.fast_tanh(torch.device("cuda", 0))
    assert not _config.fast_tanh(torch.device("cpu"))


def test_autotune_switch_wraps_kernels():
    """BOND_KERNELS_AUTOTUNE=1 (read at import) wraps the three kernels in triton.autotune; off by default."""
    import os
    import subprocess
    import sys

    code = (
        "import bond_kernels.ops.triton.token_logprobs as t;"
        "print(type(t._FWD).__name__, type(t._BWD).__name__, type(t._FWD_BWD).__name__)"
    )
    for flag in ("1", "0"):
        env = dict(os.environ, BOND_KERNELS_AUTOTUNE=flag)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        names = out.stdout.split()
        assert len(names) == 3, out.stdout + out.stderr
        # the plain kernels are JITFunction (InterpretedFunction under TRITON_INTERPRET=1)
        assert all((name == "Autotuner") == (flag == "1") for name in names), names


def test_every_launch_pins_fp_fusion(monkeypatch):
    """Every Triton launch passes ``_config.LAUNCH_OPTIONS`` (FMA on, explicitly: triton 3.9 warns when it
    is left unset and 3.10 turns it off by default).  Each kernel's ``run`` is wrapped to record the launch
    keywords, and each launcher runs once on small random inputs."""
    import importlib

    # import_module: the package re-exports functions under some of these module names
    lt, rq, tj, tk, lj = (
        importlib.import_module(f"bond_kernels.ops.triton.{m}")
        for m in (
            "linear_token_logprobs",
            "reward_quantiles",
            "token_jeffreys",
            "token_logprobs",
            "linear_token_jeffreys",
        )
    )

    kernels = {
        "fwd": tk._FWD,
        "bwd": tk._BWD,
        "fwd_bwd": tk._FWD_BWD,
        "fwd_bwd_2": tk._FWD_BWD_2,
        "jeffreys_fwd": tj._token_jeffreys_fwd_kernel,
        "jeffreys_bwd": tj._token_jeffreys_bwd_kernel,
        "quantiles": rq._reward_quantiles_kernel,
        "fixup": lt._linear_fixup_kernel,
        "distill_fold": lj._jeffreys_tile_fold_kernel,
        "distill_grad": lj._jeffreys_tile_grad_kernel,
    }
    seen = {}
    for name, kernel in kernels.items():

        def record(*args, _name=name, _run=kernel.run, **kwargs):
            seen[_name] = kwargs.get("enable_fp_fusion")
            return _run(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", record)

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 40, generator=gen)
    y = torch.randint(0, 40, (3,), generator=gen)
    g = torch.randn(3, generator=gen)
    logp, lse, ent = tk.token_logprobs_fwd(x, y, 1.0, None, -100, True)
    tk.token_logprobs_bwd(x, y, lse, ent, g, g, 1.0, None, -100, False)
    tk.token_logprobs_fwd_bwd(x, y, g, 1.0, None, -100, False)
    tk.token_logprobs_fwd_bwd(torch.randn(3, 16400, generator=gen), y, g, 1.0, None, -100, False)
    a = torch.randn(3, 40, generator=gen)
    no_ignore = torch.empty(0, dtype=torch.bool)
    _, lp, lq, kl = tj.token_jeffreys_fwd(x, a, 0.5, 1.0, no_ignore)
    tj.token_jeffreys_bwd(x, a, lp, lq, kl, g, 0.5, 1.0, no_ignore)
    rq.reward_quantiles(torch.randn(2, 3, generator=gen), torch.randn(2, 5, generator=gen), no_ignore, 1, 0.0)
    d = torch.randn(3, 4, generator=gen)
    lt.fixup_column0_triton(d, x[:, 0], torch.ones(3, dtype=torch.bool), lse, ent, g, g, 1.0, None)
    state = torch.zeros(7, 3)
    state[0] = state[4] = float("-inf")
    lj.jeffreys_tile_fold(state, x, a, 1.0, 0.0, 0.0, True)
    lj.jeffreys_tile_grad(x, a, g, g, g, g, 1.0, 0.0, 0.0, 0.5, False)
    assert seen == {name: True for name in kernels}, seen
