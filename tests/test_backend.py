"""Backend selection (the one place it happens), bk.info() and the `bond-kernels info` command."""

import logging

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _backend


def test_explicit_torch_backend_always_available():
    assert _backend.resolve("token_logprobs", "torch", torch.device("cpu")) == "torch"


def test_auto_on_cpu_prefers_cpu_kernels_when_built():
    name = _backend.resolve("token_logprobs", "auto", torch.device("cpu"))
    ok, _ = _backend.availability("cpu", "cpu")
    assert name == ("cpu" if ok else "torch")


def test_env_var_overrides_auto(monkeypatch):
    monkeypatch.setenv("BOND_KERNELS_BACKEND", "torch")
    assert _backend.resolve("token_logprobs", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("BOND_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="BOND_KERNELS_BACKEND"):
        _backend.resolve("token_logprobs", "auto", torch.device("cpu"))


def test_explicit_unavailable_backend_raises_with_reason():
    with pytest.raises(RuntimeError, match="'cuda' is unavailable: the cuda backend takes CUDA tensors"):
        _backend.resolve("reward_quantiles", "cuda", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="does not implement"):
        _backend.resolve("token_logprobs", "cuda", torch.device("cpu"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve("token_logprobs", "tpu", torch.device("cpu"))


def test_auto_fallback_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(_backend, "availability", lambda name, dev: (name == "torch", f"{name} switched off"))
    monkeypatch.setattr(_backend, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="bond_kernels"):
        for _ in range(3):
            assert _backend.resolve("token_logprobs", "auto", torch.device("cpu")) == "torch"
    messages = [r.getMessage() for r in caplog.records if "falls back" in r.getMessage()]
    assert len(messages) == 1 and "cpu switched off" in messages[0]


def test_auto_results_match_reference():
    torch.manual_seed(0)
    x = torch.randn(5, 9, 301)
    y = torch.randint(0, 301, (5, 9))
    got = bk.token_logprobs(x, y)
    want = bk.reference.token_logprobs(x, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_fp64_stays_fp64_on_auto():
    x = torch.randn(3, 17, dtype=torch.float64)
    y = torch.randint(0, 17, (3,))
    assert bk.token_logprobs(x, y).dtype == torch.float64


def test_info_reports_every_backend():
    data = bk.info(as_dict=True)
    assert set(data["backends"]) == {"triton", "cuda", "cpu", "torch"}
    assert data["backends"]["torch"]["cpu"]["available"] is True
    assert not data["backends"]["cuda"]["cpu"]["available"] and data["backends"]["cuda"]["cpu"]["reason"]
    text = bk.info()
    assert "torch" in text and "auto picks" in text


def test_cli_info(capsys):
    from bond_kernels.cli import main

    assert main(["info"]) == 0
    assert "backends" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# auto by measurement (reward_quantiles on CUDA: the CUDA C++ and Triton kernels).  The machinery is the
# same on every device; here it runs on CPU with two CPU-available candidates whose speeds we control.
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def timed_cpu(monkeypatch):
    """reward_quantiles on CPU measured between 'cpu' and 'torch'; returns (calls, set_slow)."""
    if not _backend.availability("cpu", "cpu")[0]:
        pytest.fail("the cpu backend must be built for this test")
    monkeypatch.setattr(_backend, "MEASURED", {("reward_quantiles", "cpu"): ("cpu", "torch")})
    monkeypatch.setattr(_backend, "_MEASURED_CHOICE", {})
    monkeypatch.delenv("BOND_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("BOND_KERNELS_AUTO_MEASURE", raising=False)
    calls = []
    slow = {"name": "cpu"}

    def run(name):
        calls.append(name)
        if name == slow["name"]:
            import time

            time.sleep(0.004)

    return calls, slow, run


def test_auto_keeps_the_measured_faster(timed_cpu):
    calls, slow, run = timed_cpu
    dev = torch.device("cpu")
    # 'cpu' comes first in the static order but is made slower: the measurement picks 'torch'
    assert _backend.measured("reward_quantiles", "auto", dev, ("b", 1), run) == "torch"
    assert (
        calls.count("cpu") == 1 + _backend.MEASURE_ROUNDS
        and calls.count("torch") == 1 + _backend.MEASURE_ROUNDS
    )
    calls.clear()
    slow["name"] = "torch"  # the memo serves the bucket: no second timing
    assert _backend.measured("reward_quantiles", "auto", dev, ("b", 1), run) == "torch"
    assert calls == []
    # a new bucket is measured afresh
    assert _backend.measured("reward_quantiles", None, dev, ("b", 2), run) == "cpu"
    assert calls


def test_explicit_and_forced_backends_are_not_measured(timed_cpu, monkeypatch):
    calls, _, run = timed_cpu
    dev = torch.device("cpu")
    assert _backend.measured("reward_quantiles", "cpu", dev, ("k",), run) == "cpu"
    monkeypatch.setenv("BOND_KERNELS_BACKEND", "cpu")
    assert _backend.measured("reward_quantiles", "auto", dev, ("k",), run) == "cpu"
    assert calls == []


@pytest.mark.parametrize("why", ["env", "compiling"])
def test_no_timing_where_not_allowed(timed_cpu, monkeypatch, why):
    """Inside torch.compile tracing (or CUDA-graph capture), or with BOND_KERNELS_AUTO_MEASURE=0, auto
    takes the static order (or an earlier measurement) and runs nothing extra."""
    calls, _, run = timed_cpu
    if why == "env":
        monkeypatch.setenv("BOND_KERNELS_AUTO_MEASURE", "0")
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dev = torch.device("cpu")
    assert _backend.measured("reward_quantiles", "auto", dev, ("c",), run) == "cpu"
    assert calls == []
    _backend._MEASURED_CHOICE[("reward_quantiles", "cpu", ("c",))] = "torch"
    assert _backend.measured("reward_quantiles", "auto", dev, ("c",), run) == "torch"


def test_reward_quantiles_auto_goes_through_the_measurement(monkeypatch):
    """The functional API hands measured() a runner of the real op and a (B, n, k, mask) bucket."""
    seen = []
    real = _backend.measured

    def spy(op, backend, device, key, run):
        seen.append((op, key))
        return real(op, backend, device, key, run)

    monkeypatch.setattr(_backend, "measured", spy)
    g = torch.Generator().manual_seed(0)
    r, k = torch.randn(5, 3, generator=g), torch.randn(5, 9, generator=g)
    got = bk.reward_quantiles(r, k, smoothing="self")
    want = bk.reference.reward_quantiles(r, k, smoothing="self")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert seen == [("reward_quantiles", (8, 4, 16, False))]


@pytest.mark.skipif(not _backend.availability("cpu", "cpu")[0], reason="bond_kernels._C is not built")
def test_torch_launchers_match_the_cpu_launchers():
    # reference/launchers.py is every op's launcher contract in torch (the registry's "torch" entries):
    # each launcher against the C++ one on the same random inputs (ignored rows, masks, every mode).
    from bond_kernels.ops.token_logprobs import full_lse

    t, c = (_backend.impl("token_logprobs", b) for b in ("torch", "cpu"))
    x, y = torch.randn(6, 97) * 3, torch.randint(0, 97, (6,))
    y[2] = -100
    g, ge = torch.randn(6), torch.randn(6)
    for temperature, softcap in ((1.0, 0.0), (0.7, 5.0)):
        lp_t, lse_t, ent_t = t.token_logprobs_fwd(x, y, temperature, softcap, -100, True)
        lp_c, lse_c, ent_c = c.token_logprobs_fwd(x, y, temperature, softcap, -100, True)
        torch.testing.assert_close(lp_t, lp_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ent_t, ent_c, rtol=1e-5, atol=1e-5)
        lse_c = torch.where(y != -100, full_lse(lse_c, temperature, softcap), torch.zeros(()))
        torch.testing.assert_close(lse_t, lse_c, rtol=1e-5, atol=1e-5)
        args = (lse_t, ent_t, g, ge, temperature, softcap, -100, False)
        torch.testing.assert_close(
            t.token_logprobs_bwd(x, y, *args), c.token_logprobs_bwd(x, y, *args), rtol=1e-5, atol=1e-6
        )
        lp_t, d_t = t.token_logprobs_fwd_bwd(x, y, g, temperature, softcap, -100, False)
        lp_c, d_c = c.token_logprobs_fwd_bwd(x, y, g, temperature, softcap, -100, False)
        torch.testing.assert_close(lp_t, lp_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(d_t, d_c, rtol=1e-5, atol=1e-6)

    t, c = (_backend.impl("token_jeffreys", b) for b in ("torch", "cpu"))
    p, q, mask = torch.randn(5, 64), torch.randn(5, 64), torch.tensor([0, 1, 0, 0, 0], dtype=torch.bool)
    div_t, lp_t, lq_t, kl_t = t.token_jeffreys_fwd(p, q, 0.3, 0.8, mask)
    div_c, lp_c, lq_c, kl_c = c.token_jeffreys_fwd(p, q, 0.3, 0.8, mask)
    torch.testing.assert_close(div_t, div_c, rtol=1e-5, atol=1e-6)
    keep = ~mask
    torch.testing.assert_close(kl_t[keep], kl_c[keep], rtol=1e-5, atol=1e-6)
    gd = torch.randn(5)
    torch.testing.assert_close(
        t.token_jeffreys_bwd(p, q, lp_t, lq_t, kl_t, gd, 0.3, 0.8, mask),
        c.token_jeffreys_bwd(p, q, lp_c, lq_c, kl_c, gd, 0.3, 0.8, mask),
        rtol=1e-5,
        atol=1e-6,
    )

    t, c = (_backend.impl("reward_quantiles", b) for b in ("torch", "cpu"))
    r, refs = torch.randn(3, 4), torch.randn(3, 9)
    ref_mask = torch.rand(3, 9) > 0.3
    ref_mask[:, 0] = True
    for mode, eps in ((0, 0.0), (1, 0.0), (2, 0.2)):
        for m in (torch.empty(0, dtype=torch.bool), ref_mask):
            for a, b in zip(
                t.reward_quantiles(r, refs, m, mode, eps), c.reward_quantiles(r, refs, m, mode, eps)
            ):
                torch.testing.assert_close(a, b)

    t, c = (_backend.impl("bond_sequence", b) for b in ("torch", "cpu"))
    lp, rl, bl = torch.randn(4, 2) - 20, torch.randn(4, 2) - 20, torch.randn(4, 1) - 20
    pr, rr = torch.randn(4, 2), torch.randn(4, 6)
    for mode, eps, correction, baseline in ((1, 0.0, True, 0), (2, 0.1, False, 1), (0, 0.0, False, 2)):
        args = (
            lp,
            rl,
            pr,
            rr,
            torch.empty(0, dtype=torch.bool),
            bl,
            4.0,
            0.5,
            mode,
            eps,
            correction,
            baseline,
        )
        for a, b in zip(t.bond_sequence(*args), c.bond_sequence(*args)):
            torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)
    args = (torch.randn(4) - 20, torch.randn(4) - 20, torch.randn(4), torch.randn(4, 2), torch.randn(4) - 20)
    for a, b in zip(
        t.jbond_sequence(*args, 0.5, 0.1, 2.77, True), c.jbond_sequence(*args, 0.5, 0.1, 2.77, True)
    ):
        torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)
