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
