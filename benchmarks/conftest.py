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


def pytest_terminal_summary(terminalreporter):
    if _deselected:
        terminalreporter.write_line(
            f"bond_kernels: deselected {len(_deselected)} benchmark(s) marked gpu (no CUDA device)"
        )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["card"] = C.card()
