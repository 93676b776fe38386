"""Every ``BOND_KERNELS_*`` environment variable: a bogus value is a ValueError naming the variable, the value and
the accepted values, at import (in a fresh interpreter) and where the code reads it; the accepted values work.
``BOND_KERNELS_CPU_ISA=bogus`` used to be ignored by the C++ extension, and the 0/1 switches took any other
value for their default."""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import bond_kernels as bk
from bond_kernels import _backend, _env, _ext

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_TIME = {"BOND_KERNELS_BUILD_CUDA", "BOND_KERNELS_SANITIZE"}  # setup.py's


def _python(code, **env_vars):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("BOND_KERNELS_") and k != "TRITON_INTERPRET"
    }
    env.update(env_vars)
    # cwd = the repository root: "-c" puts it first on sys.path, so this checkout's bond_kernels runs.
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_table_names_every_variable_the_code_reads():
    # Python, the C++ kernels and their glue: any BOND_KERNELS_ name in them is in the table (or setup.py's).
    files = [
        *(ROOT / "bond_kernels").rglob("*.py"),
        *(ROOT / "csrc").rglob("*.[ch]*"),
        *(ROOT / "python").rglob("*.[ch]*"),
    ]
    found = set()
    for path in files:
        found |= set(re.findall(r"BOND_KERNELS_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert "BOND_KERNELS_CPU_ISA" in found and "BOND_KERNELS_HUGE_PAGES" in found  # the walk sees the C++
    assert found - BUILD_TIME == set(_env.VARIABLES), found ^ set(_env.VARIABLES)
    assert set(re.findall(r"BOND_KERNELS_[A-Z0-9_]*[A-Z0-9]", (ROOT / "setup.py").read_text())) == BUILD_TIME


def _expected(name, value):
    accepted = _env.VARIABLES[name][0]
    if accepted is None:  # BOND_KERNELS_LINEAR_TILE
        return f"ValueError: {name} must be 'rows,vocab' (integers, 0 = automatic), got {value!r}"
    return f"ValueError: {name} must be one of {', '.join(accepted)} (or unset), got {value!r}"


@pytest.mark.parametrize("name", sorted(_env.VARIABLES))
def test_bogus_value_fails_at_import(name):
    # Before torch is imported: each of these takes a fraction of a second.
    run = _python("import bond_kernels", **{name: "bogus"})
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stderr.strip().splitlines()[-1] == _expected(name, "bogus"), run.stderr[-2000:]
    assert "import torch" not in run.stderr  # refused before torch was imported


@pytest.mark.parametrize("value", [" 1", "true", "2", "avx2 "])
def test_no_loose_spellings(value, monkeypatch):
    # Exact values only: the C++ extension compares exactly, so " avx2" or "true" would mean something else there.
    for name in ("BOND_KERNELS_HUGE_PAGES", "BOND_KERNELS_AUTOTUNE", "BOND_KERNELS_CPU_ISA"):
        monkeypatch.setenv(name, value)
        with pytest.raises(ValueError, match=re.escape(f"{name} must be one of")):
            _env.get(name)


def test_bogus_value_set_after_import_fails_where_it_is_read(monkeypatch):
    logits, labels = torch.randn(3, 7), torch.randint(0, 7, (3,))
    hidden, weight = torch.randn(3, 4), torch.randn(7, 4)
    reads = {
        "BOND_KERNELS_BACKEND": lambda: bk.token_logprobs(logits, labels),
        "BOND_KERNELS_AUTO_MEASURE": _backend.measuring_allowed,
        "BOND_KERNELS_LINEAR_TILE": lambda: bk.linear_token_logprobs(hidden, weight, labels),
        # the extension's own two, checked when it is first loaded (it reads them with getenv)
        "BOND_KERNELS_CPU_ISA": _ext.load,
        "BOND_KERNELS_HUGE_PAGES": _ext.load,
    }
    try:
        from bond_kernels.ops.triton import _config

        reads["BOND_KERNELS_AUTOTUNE"] = _config.autotune_enabled
        reads["BOND_KERNELS_FAST_TANH"] = lambda: _config.fast_tanh(torch.device("cuda"))
    except ImportError:  # no triton here: those two are read only by the Triton kernels
        pass
    for name, read in reads.items():
        monkeypatch.setattr(_ext, "_LOADED", {})  # as before the extension's first load
        monkeypatch.setenv(name, "bogus")
        with pytest.raises(ValueError) as exc:
            read()
            pytest.fail(f"{name}=bogus was not refused")
        assert f"ValueError: {exc.value}" == _expected(name, "bogus")
        monkeypatch.delenv(name)
    assert _ext.load()[0] is not None  # nothing bogus left: it loads


def test_accepted_values_take_effect():
    # Every variable at a non-default accepted value, in a fresh interpreter: the cpu kernels run capped at
    # generic, on the torch backend's fallback order left alone, and match the fp64 reference.
    code = (
        "import torch, bond_kernels as bk\n"
        "from bond_kernels import _C, _backend, _env\n"
        "x, y = torch.randn(5, 11, dtype=torch.float64), torch.randint(0, 11, (5,))\n"
        "ref = torch.log_softmax(x, -1).gather(-1, y[:, None]).squeeze(-1)\n"
        "got = bk.token_logprobs(x.float(), y, backend='cpu')\n"
        "torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)\n"
        "print(_C.cpu._isa(), _backend.requested(None), _backend.measuring_allowed(), _env.linear_tile(),"
        " _env.switch('BOND_KERNELS_AUTOTUNE'), _env.switch('BOND_KERNELS_FAST_TANH'))\n"
    )
    accepted = {
        "BOND_KERNELS_CPU_ISA": "generic",
        "BOND_KERNELS_HUGE_PAGES": "0",
        "BOND_KERNELS_BACKEND": "torch",
        "BOND_KERNELS_AUTO_MEASURE": "0",
        "BOND_KERNELS_LINEAR_TILE": "4,8",
        "BOND_KERNELS_AUTOTUNE": "1",
        "BOND_KERNELS_FAST_TANH": "1",
    }
    assert set(accepted) == set(_env.VARIABLES)
    run = _python(code, **accepted)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["generic", "torch", "False", "(4,", "8)", "True", "True"]


def test_empty_is_the_default(monkeypatch):
    for name, (_, default, _) in _env.VARIABLES.items():
        monkeypatch.setenv(name, "")
        assert (_env.linear_tile() == (0, 0)) if name == _env.LINEAR_TILE else (_env.get(name) == default)
    _env.check_all()
    assert _backend.requested(None) == "auto" and _backend.measuring_allowed()


@pytest.mark.parametrize(
    "name,value,message",
    [
        (
            "BOND_KERNELS_BUILD_CUDA",
            "yes",
            "BOND_KERNELS_BUILD_CUDA must be one of 0, 1 (or unset), got 'yes'",
        ),
        (
            "BOND_KERNELS_SANITIZE",
            "adress",
            "BOND_KERNELS_SANITIZE must be a comma-separated list of address, ",
        ),
    ],
)
def test_setup_refuses_bogus_build_variables(name, value, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOND_KERNELS_")}
    env[name] = value
    run = subprocess.run(
        [sys.executable, "setup.py", "--version"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 1 and run.stderr.strip().startswith(message), run.stdout + run.stderr[-2000:]
    assert "Traceback" not in run.stderr
