"""``bond-kernels demo --trainer trl`` (issue 19, item 4): the demo's toy task through ``JBondTrainer``, with the
same table, plot and metrics as the default loop, on a shrunken run."""

import json
import math
import os

import pytest
import torch
from test_demo import SMALL
from test_integrations_trl_verl import _peer

from bond_kernels import cli, demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_demo_runs_on_the_trl_trainer(tmp_path, capsys, monkeypatch):
    _peer("trl.trainer.grpo_trainer")
    import bond_kernels.integrations.trl_jbond as jb

    steps = []
    update = jb.EMAAnchor.update

    def spy(self, policy):  # the trainer's EMA step ran, once per optimiser step
        steps.append(1)
        return update(self, policy)

    monkeypatch.setattr(jb.EMAAnchor, "update", spy)
    threads = torch.get_num_threads()
    try:
        rc = cli.main(["demo", "--trainer", "trl", "--out", str(tmp_path), "--seed", "3", *SMALL])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0 and len(steps) == 6
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["config"]["trainer"] == "trl"
    for row in (m["reference"], m["policy"], *(m["best_of_n"][str(n)] for n in demo.BON_SIZES)):
        assert math.isfinite(row["reward"]) and 0.0 <= row["quantile"] <= 1.0
    assert [p["step"] for p in m["trajectory"]] == [0, 2, 4, 6]
    assert [h["step"] for h in m["history"]] == [1, 2, 3, 4, 5, 6]
    assert m["training"]["tokens"] == 6 * 3 * 8 * 12 and m["training"]["tokens_per_s"] > 0
    printed = capsys.readouterr().out
    assert "J-BOND policy (6 steps)" in printed and "Best-of-8 of π_ref" in printed


def test_demo_rejects_an_unknown_trainer(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--trainer", "nope", "--out", str(tmp_path)])
