"""benchmarks/gpu_check.sh's dry run on the CPU (``GPU_CHECK_DRY_RUN=1``): what the rare GPU session relies on.

The script runs every stage at tiny shapes with the Triton kernels interpreted (the child's environment
gets ``TRITON_INTERPRET=1``; this process need not have it), plus its two self-test stages: ``starved``
(budget 0: must be skipped, never run) and ``overrun`` (starts children that ignore SIGTERM or leave the
process group, then sleeps past its 3 s: it and all of them must be killed, and the stages after it must
still run).  The tests read what it wrote under a temporary ``$OUT``: summary.md (every stage with its
status), the benchmark rows, the sweep's launch configurations, the pids of the overrun stage.  A second,
short run shows a stage skipped because the global budget is gone.  About a minute on 2 cores.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = [
    "setup",
    "build",
    "token",
    "token-vocabs",
    "sweep",
    "starved",
    "overrun",
    "gpu-tests",
    "compile",
    "linear",
    "distill",
    "bond",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (
            shutil.which("bash")
            and shutil.which("timeout")
            and shutil.which("setsid")
            and os.path.isdir("/proc")
        ),
        reason="gpu_check.sh needs bash, coreutils timeout, setsid and /proc (Linux)",
    ),
]


def _run(out, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    env.update(
        GPU_CHECK_DRY_RUN="1",
        OUT=str(out),
        PYTHON=sys.executable,
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        TRITON_INTERPRET="1",
    )
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=400
    )


def _summary(out):
    """{stage: {"status", "budget", "limit", "used", "rows", "note"}} from summary.md's table."""
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] in STAGES:
            rows[cells[0]] = dict(zip(["status", "budget", "limit", "used", "rows", "note"], cells[1:]))
    return rows


def _alive(pid):
    """Whether ``pid`` is a live process (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _procs_with_env(marker):
    """pids of live processes whose environment holds the line ``marker``."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if marker.encode() in f.read().split(b"\0") and _alive(int(d)):
                    found.append(int(d))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    # --vocab through the token-vocabs stage's own variable: it must reach that script and no other (the
    # linear and bond scripts reject --vocab, so their stages would fail if it leaked)
    proc = _run(out, GPU_CHECK_ARGS_TOKEN_VOCABS="--vocab 160,48")
    return out, proc


def test_every_stage_reports_its_status(dry_run):
    out, proc = dry_run
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    summary = _summary(out)
    assert list(summary) == STAGES, (out / "summary.md").read_text()
    want = {s: "done" for s in STAGES}
    want.update(starved="skipped", overrun="killed", **{"gpu-tests": "collect-only"})
    got = {s: r["status"] for s, r in summary.items()}
    assert got == want, (out / "summary.md").read_text() + log
    assert "DRY RUN" in (out / "summary.md").read_text()


def test_starved_stage_is_skipped_and_never_runs(dry_run):
    out, _ = dry_run
    row = _summary(out)["starved"]
    assert row["budget"] == "0" and row["note"] == "budget 0", row
    assert not (out / "starved.ran").exists()


def test_overrunning_stage_is_killed_with_all_its_processes(dry_run):
    out, _ = dry_run
    row = _summary(out)["overrun"]
    assert row["limit"] == "3", row  # its own budget: no time carried over from the stages before it
    assert int(row["used"]) <= 4, row
    assert "0 still alive" in row["note"] or "no process left" in row["note"], row
    pids = [int(p) for p in (out / "overrun.pids").read_text().split()]
    # its shell, a plain child, one that ignores SIGTERM, one in its own session, a python child
    assert len(pids) == 5, pids
    assert [p for p in pids if _alive(p)] == []
    # and nothing that any stage started is still running (every stage process inherited OUT)
    assert _procs_with_env(f"OUT={out}") == []


def test_gpu_tests_are_collected_not_passed(dry_run):
    out, _ = dry_run
    note = _summary(out)["gpu-tests"]["note"]
    m = re.search(r"(\d+) gpu tests collected, none run", note)
    assert m and int(m.group(1)) > 0, note
    log = (out / "gpu_tests.log").read_text()
    assert " passed" not in log, log[-2000:]


def _rows(text):
    """Measured rows of a markdown results table: the cells of each row with a decimal number in it."""
    rows = []
    for line in text.splitlines():
        if re.match(r"^\|.*\| -?\d+\.\d+ \|", line):
            rows.append([c.strip() for c in line.split("<!--")[0].strip().strip("|").split("|")])
    return rows


def test_token_stages_wrote_their_rows(dry_run):
    out, _ = dry_run
    summary = _summary(out)
    for stage in ("token", "token-vocabs", "compile", "linear", "distill", "bond"):
        assert int(summary[stage]["rows"] or 0) > 0, (stage, summary[stage])
    rows = _rows((out / "results.md").read_text())
    token = {(r[0], r[1], r[2]) for r in rows if len(r) == 8}  # V, mode, provider
    for mode in ("fwd", "fwd+bwd", "fwd_bwd"):
        assert ("96", mode, "triton") in token, sorted(token)
    # token-vocabs: the V list given in GPU_CHECK_ARGS_TOKEN_VOCABS, its own default mode only
    assert {v for v, m, p in token if m == "fwd_bwd" and p == "triton"} == {"96", "160", "48"}, sorted(token)
    assert ("96", "fwd", "torch.compile") in token and ("96", "fwd+bwd", "torch.compile") in token
    # torch.compile rows come only from the compile stage
    assert int(summary["compile"]["rows"]) == 2, summary["compile"]
    assert not any(p == "torch.compile" and v != "96" for v, m, p in token)


def test_sweep_covers_the_pruned_configurations(dry_run):
    out, _ = dry_run
    rows = _rows((out / "sweep.md").read_text())
    configs = []
    for _v, _kernel, block, warps, stages, programs, *_ in rows:
        if (int(block), int(warps), stages, programs) not in configs:
            configs.append((int(block), int(warps), stages, programs))
    assert configs[0] == (4096, 8, "-", "-"), configs  # _config.py's default first
    plain = [c for c in configs if c[2:] == ("-", "-")]
    assert len(plain) == 14, configs
    assert all(4 <= b // (32 * w) <= 32 for b, w, *_ in plain), configs
    # then the pipeline depths (every kernel) and the two-sweep programs (fwd_bwd only)
    assert [c[2] for c in configs if c[2] != "-"] == ["2", "4", "5"], configs
    assert [c[3] for c in configs if c[3] != "-"] == ["66", "264", "528"], configs
    assert {k for _, k, *_ in rows} == {"fwd", "bwd", "fwd_bwd"}
    assert len(rows) == 3 * (14 + 3) + 3


def test_outputs_fit_what_the_device_returns(dry_run):
    out, _ = dry_run
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files), files  # flat
    assert len(files) <= 8, files  # the device returns at most 8 files
    assert {
        "env.txt",
        "build.log",
        "results.md",
        "sweep.md",
        "gpu_tests.log",
        "bench.log",
        "summary.md",
    } <= set(files)


def test_stage_is_skipped_when_the_global_budget_is_gone(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, GPU_CHECK_STAGES="overrun,bond", GPU_CHECK_BUDGET_S="6", GPU_CHECK_BUDGET_OVERRUN="4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = _summary(out)
    assert summary["overrun"]["status"] == "killed", summary
    assert summary["bond"]["status"] == "skipped", summary
    assert "global budget gone" in summary["bond"]["note"], summary
    assert summary["token"]["status"] == "skipped" and "not selected" in summary["token"]["note"], summary
    assert (out / "results.md").read_text() == ""
