"""Benchmark fixtures: the copy-bandwidth ceiling measured once per session, the card in machine_info.

``gpu`` benchmarks are deselected where there is no CUDA device, and the run says so in its summary.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

_deselected = []


@pytest.fixture(scope="session")
def copy_bw() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured in this session."""
    return C.copy_bandwidth()


@pytest.hookimpl(trylast=True)  # after -m has filtered
def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    drop = [item for item in items if "gpu" in item.keywords]
    if drop:
        _deselected.extend(drop)
        config.hook.pytest_deselected(items=drop)
        items[:] = [item for item in items if "gpu" not in item.keywords]


# Columns of the accounting table printed after pytest-benchmark's timing table (from extra_info).
_SUMMARY_COLUMNS = (
    # cpu benchmark
    "median_ms",
    "GB/s",
    "ratio_vs_eager",
    "extra_mem_x_logits",
    "limit_ms",
    "frac_of_limit",
    "read_GBps",
    "write_fresh_GBps",
    # GPU token log-probs / BOND / linear head
    "ms",
    "gbps",
    "copy_frac",
    "peak_extra_x_logits",
    "max_abs_err_fp64",
    "tflops",
    "frac",
    "peak_gib",
)


def _cell(value):
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's timing tables
def pytest_terminal_summary(terminalreporter, config):
    if _deselected:
        terminalreporter.write_line(
            f"bond_kernels: deselected {len(_deselected)} benchmark(s) marked gpu (no CUDA device)"
        )
    session = getattr(config, "_benchmarksession", None)
    rows = [b for b in getattr(session, "benchmarks", []) if getattr(b, "extra_info", None)]
    if not rows:
        return
    cols = [c for c in _SUMMARY_COLUMNS if any(c in b.extra_info for b in rows)]
    terminalreporter.write_sep("-", f"bond_kernels accounting ({C.card()}, {C.today()})")
    width = max(len(b.name) for b in rows)
    terminalreporter.write_line(f"{'benchmark':<{width}}  " + "  ".join(f"{c:>18}" for c in cols))
    for b in rows:
        cells = (_cell(b.extra_info.get(c)) for c in cols)
        terminalreporter.write_line(f"{b.name:<{width}}  " + "  ".join(f"{c:>18}" for c in cells))


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["card"] = C.card()
