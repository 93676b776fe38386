"""Every ```python block of README.md runs as written, each in a fresh interpreter on CPU.

A block whose first line is ``# needs: NAME`` runs as one program after the block whose first line is
``# inputs: NAME ...`` (its preamble, earlier in the README); preambles run as part of the blocks that name
them.  Any other block runs alone.  The API tour used to be unrunnable: it used about 25 names it never
defined, and the same names with two shapes."""

import os
import re
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
PREAMBLE = re.compile(r"# inputs: ([\w-]+)")
NEEDS = re.compile(r"# needs: ([\w-]+)\s*$")
# CPU seconds (user + sys, this block's processes) above which a block is no longer a quick example.
CPU_LIMIT_S = 60


def _first_line(block):
    return block.split("\n", 1)[0]


def _preamble_name(block):
    match = PREAMBLE.match(_first_line(block))
    return match.group(1) if match else None


def _program(index):
    """The code block ``index`` runs: itself, after its preamble if it names one."""
    block = BLOCKS[index]
    needs = NEEDS.match(_first_line(block))
    if not needs:
        return block
    earlier = [b for b in BLOCKS[:index] if _preamble_name(b) == needs.group(1)]
    assert len(earlier) == 1, (
        f"block {index} needs preamble {needs.group(1)!r}: found {len(earlier)} before it"
    )
    return earlier[0] + block


def _heading(index):
    """The README heading a block sits under (for the test id)."""
    prose = re.sub(
        r"^```.*?^```", "", README[: README.index("```python\n" + BLOCKS[index])], flags=re.S | re.M
    )
    title = re.findall(r"^#+ (.+)$", prose, re.M)[-1]
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40]


RUN = [i for i, b in enumerate(BLOCKS) if _preamble_name(b) is None]


def test_every_python_block_is_seen():
    # The same count as a plain search: no python block escapes the pattern (an indented fence would).
    assert len(BLOCKS) == README.count("```python") >= 6
    assert all(b.strip() for b in BLOCKS)


def test_preambles_are_named_and_used():
    names = [_preamble_name(b) for b in BLOCKS if _preamble_name(b)]
    assert len(names) == len(set(names)), names
    used = {NEEDS.match(_first_line(BLOCKS[i])).group(1) for i in RUN if NEEDS.match(_first_line(BLOCKS[i]))}
    assert set(names) == used, (names, used)  # each preamble serves a block, each named one exists
    for i in RUN:
        _program(i)  # every "# needs:" resolves to one earlier preamble


@pytest.mark.parametrize("index", RUN, ids=[f"{i}-{_heading(i)}" for i in RUN])
def test_block_runs(index):
    env = {
        k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("BOND_KERNELS_")
    }
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    code = _program(index)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd = the repository root: "-c" puts it first on sys.path, so this checkout's bond_kernels runs.
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert run.returncode == 0, code + "\n" + run.stdout[-2000:] + run.stderr[-3000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < CPU_LIMIT_S, f"README block {index} took {cpu:.0f} s of CPU: keep the examples small"
    print(f"README block {index}: {cpu:.1f} s of CPU")
