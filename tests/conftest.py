"""Shared test fixtures: seeding, the device helper, the tolerance table, and marker routing.

Markers (pyproject.toml): ``gpu`` tests need CUDA; ``interpret`` tests need ``TRITON_INTERPRET=1`` in the
environment of the whole pytest process.  Where the environment cannot run them they are deselected, and
the run says so in its summary (a run left with no test at all exits with pytest's code 5, which the CI
and the GPU script treat as a failure).
"""

import gc
import os
import zlib

# Inductor's on-disk FX graph cache (shared by every checkout on a machine, /tmp/torchinductor_<user>) keys a
# graph by its code and inputs, not by the fake implementations of our custom ops: after a change to an op's
# output shapes a cached graph from another checkout fails ("mismatch in length of strides and shape").  The
# compile tests are few and small: compile afresh.
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances for a result stored in ``dtype`` against a float64 ground truth computed from the same inputs.
# rtol is a few roundings of the storage dtype (bf16 keeps 8 mantissa bits: half an ulp is 2^-9 ≈ 2e-3;
# fp16 2^-12; fp32 2^-25, plus fp32 accumulation over V ≤ 256k terms).  atol is a FRACTION of max|expected|,
# so a kernel that writes zeros where the truth is small but nonzero still fails.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-12),
    torch.float32: dict(rtol=1e-4, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=8e-3, atol=1e-5),
}

# fp32 outputs (log-probs, entropies) computed in fp32 from inputs of any dtype, against float64 on the
# same inputs: the GPU target is 1e-4 (docs/performance.md); small test rows stay well inside it.
FP32_OUT_ATOL = 3e-5


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, scale=None, **override):
    """``actual`` ≈ ``expected`` with the tolerance of ``dtype`` (default: ``actual``'s dtype); see ``TOL``.

    ``scale`` (default max|expected|) is what atol is a fraction of; pass the upstream gradient's size where
    the truth can be exactly 0 (a one-column vocabulary).
    """
    tol = dict(TOL[dtype or actual.dtype])
    tol.update(override)
    exp = expected.to(torch.float64)
    if scale is None:
        finite = exp[torch.isfinite(exp)]
        scale = finite.abs().max().item() if finite.numel() else 1.0
    torch.testing.assert_close(
        actual.to(torch.float64), exp, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30), equal_nan=True
    )


def cuda_device() -> torch.device:
    """The CUDA device for ``gpu`` tests; fails loudly (never skips) when there is none."""
    if not torch.cuda.is_available():
        pytest.fail("this test is marked gpu and needs a CUDA device (deselect with -m 'not gpu')")
    return torch.device("cuda")


@pytest.fixture
def device() -> torch.device:
    return cuda_device()


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    # benchmarks/gpu_check.sh runs the gpu tests in 4 pytest-xdist workers on ONE GPU, and each worker's
    # caching allocator keeps the peak of the largest test it ran (17 GB for the 2^32-element test) unless
    # it is handed back: without this, four workers' leftover caches add up instead of each test's peak.
    yield
    if "gpu" in request.keywords and torch.cuda.is_initialized():
        gc.collect()  # a failed test's traceback can still hold its tensors
        torch.cuda.empty_cache()


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh but reproducible data per test: the seed is a hash of the test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


_deselected = {}


def pytest_configure(config):
    # pytest-xdist's marker, registered here too so a run without xdist does not warn about it.  Tests that
    # allocate more than ~8 GB share the group "gpu_bigmem": with --dist loadgroup (gpu_check.sh) they run
    # one after another in one worker, so at most one of them is on the GPU at a time.
    config.addinivalue_line("markers", "xdist_group(name): run the group's tests in one xdist worker")


@pytest.hookimpl(trylast=True)  # after -m has filtered: only count what the marker expression kept
def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    has_cuda = torch.cuda.is_available()
    keep, drop = [], []
    for item in items:
        if "interpret" in item.keywords and not interpreting:
            _deselected["interpret (TRITON_INTERPRET=1 is not set)"] = (
                _deselected.get("interpret (TRITON_INTERPRET=1 is not set)", 0) + 1
            )
            drop.append(item)
        elif "gpu" in item.keywords and not has_cuda:
            _deselected["gpu (no CUDA device)"] = _deselected.get("gpu (no CUDA device)", 0) + 1
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    for why, count in _deselected.items():
        terminalreporter.write_line(f"bond_kernels: deselected {count} test(s) marked {why}")


@pytest.fixture
def quantile_launches(monkeypatch):
    """A fresh measured-``auto`` state and the list of backends each reward_quantiles launch ran on."""
    from bond_kernels import _backend
    from bond_kernels.ops import reward_quantiles as rq_op

    monkeypatch.setattr(_backend, "_MEASURED_CHOICE", {})
    monkeypatch.delenv("BOND_KERNELS_BACKEND", raising=False)
    monkeypatch.delenv("BOND_KERNELS_AUTO_MEASURE", raising=False)
    launched = []
    real = rq_op.reward_quantiles

    def counting(*args):
        launched.append(args[-1])  # the backend name, the op's last argument
        return real(*args)

    monkeypatch.setattr(rq_op, "reward_quantiles", counting)
    return launched
