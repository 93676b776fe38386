"""README code blocks marked ``# runs as written`` run as written (in a fresh interpreter, on CPU)."""

import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCKS = [
    b for b in re.findall(r"```python\n(.*?)```", open(README).read(), re.S) if "# runs as written" in b
]


def test_there_are_marked_blocks():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_block_runs(index):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", BLOCKS[index]], env=env, capture_output=True, text=True)
    assert run.returncode == 0, BLOCKS[index] + "\n" + run.stderr[-3000:]
