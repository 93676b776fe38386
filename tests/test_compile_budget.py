"""The compile budget (benchmarks/compile_budget.py): every Triton kernel variant the launchers choose at the
benchmark shapes compiles for sm_90 through Triton's own ptxas, with no GPU here, and meets the floors: no
spill, enough resident warps per SM, cp.async in every pipelined streaming loop.  Catches what the
interpreter cannot: type errors of the real compiler (a loop-carried variable changing shape), non-constexpr
globals, spills, and a pipeline that silently fell back to plain loads."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import compile_budget as cb  # noqa: E402


def _row(**over):
    row = dict(
        kernel="token fwd",
        case="c",
        dtype="bf16",
        flags="-",
        block=4096,
        stages=3,
        warps=8,
        regs=64,
        local=0,
        spill_ops=0,
        spill=0,
        stack=0,
        shared=16384,
        programs=4,
        inflight_kb=64,
        loads="LDGSTS.E.BYPASS.128×6",
        mufu="EX2×9",
        streaming=True,
    )
    row.update(over)
    return row


def test_occupancy_arithmetic():
    # 64 regs × 32 lanes = 2048 per warp; 8 warps = 16384 per program: 4 programs fill 65536 registers.
    assert cb.programs_per_sm(64, 8, 16384) == 4
    # 65 regs round up to 72 per lane (units of 256 per warp): 2304 per warp, 3 programs of 8 warps.
    assert cb.programs_per_sm(65, 8, 0) == 3
    # 128 regs at 16 warps is the whole register file: one program.
    assert cb.programs_per_sm(128, 16, 1024) == 1
    # shared memory bound: 100 KB + 1 KB reserved per program fits twice in 228 KB.
    assert cb.programs_per_sm(32, 4, 100 * 1024) == 2
    # warp bound: 64 warps per SM at most.
    assert cb.programs_per_sm(16, 32, 0) == 2


def test_the_check_fails_on_what_it_guards():
    assert cb.problems([_row()]) == []
    assert "spills" in cb.problems([_row(local=8)])[0]
    assert "spills" in cb.problems([_row(spill=16)])[0]
    assert cb.problems([_row(stack=8, spill_ops=4)]) == []  # a call's saved registers, not a spill
    assert "floor" in cb.problems([_row(programs=1)])[0]  # 8 warps per SM < 16
    assert "not pipelined" in cb.problems([_row(loads="LDG.E.128×2")])[0]
    assert "in flight" in cb.problems([_row(inflight_kb=16)])[0]
    # the persistent two-sweep kernel: one 8-warp program per SM is its design, not a failure
    assert cb.problems([_row(kernel="token fwd+bwd 2-sweep", programs=1, inflight_kb=32)]) == []
    # the one-pass kernel holds its row in registers: one load, no pipeline expected
    assert cb.problems([_row(kernel="token fwd+bwd 1-pass", loads="LDG.E.128×4", programs=2)]) == []
    assert (
        cb.problems([_row(kernel="quantiles", streaming=False, warps=4, programs=2, loads="LDG.E×4")]) == []
    )
    assert "floor" in cb.problems([_row(kernel="quantiles", streaming=False, warps=4, programs=1)])[0]


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_within_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "budget.md"
    run = subprocess.run(
        [sys.executable, os.path.join(BENCH, "compile_budget.py"), "--check", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr, run.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    kernels = {line.split(" | ")[0][2:] for line in rows}
    assert kernels == {
        "token fwd",
        "token bwd",
        "token fwd+bwd 1-pass",
        "token fwd+bwd 2-sweep",
        "jeffreys fwd",
        "jeffreys bwd",
        "quantiles",
        "linear fix-up",
        "distill tile fold",
        "distill tile grad",
    }, kernels
    assert len(rows) >= 70, len(rows)
    # the softcap's tanh: MUFU.TANH with FAST_TANH=1, none in the exp2 formula (the MUFU column)
    for line in rows:
        mufu = line.split(" | ")[-2]
        if "FAST_TANH=1" in line:
            assert "TANH" in mufu, line
        else:
            assert "TANH" not in mufu, line
