"""``bond-kernels demo`` (the main job): the pieces (language, reward, sampler, log-probs) and a shrunken run."""

import json
import math
import os
import re

import pytest
import torch

from bond_kernels import cli, demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small enough for CI (about 10 s on 2 shared cores), large enough that every stage runs: the reference
# is pretrained, J-BOND takes steps, the trajectory gets several points, Best-of-8 has whole groups.
SMALL = (
    "--steps 6 --pretrain-steps 30 --batch-size 8 --eval-prompts 16 --eval-k 8 --eval-samples 2 --eval-every 2 --quiet"
).split()


@pytest.fixture(autouse=True)
def one_thread():
    # The models are tiny: on a shared 2-core machine two spinning OpenMP threads per process made these
    # tests 6x slower (48 s against 8 s); the demo itself runs on one thread by default for the same reason.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["demo", "--out", str(out), "--seed", "3", *SMALL])
    assert rc == 0
    png, js = out / "demo.png", out / "metrics.json"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = json.loads(js.read_text())
    for row in (m["reference"], m["policy"], *(m["best_of_n"][str(n)] for n in demo.BON_SIZES)):
        assert _finite(row["reward"]) and 0.0 <= row["quantile"] <= 1.0
    assert _finite(m["policy"]["kl_to_ref"]) and _finite(m["policy"]["kl_to_ref_stderr"])
    t = m["training"]
    assert t["tokens"] == 6 * 3 * 8 * 12 and _finite(t["tokens_per_s"]) and t["tokens_per_s"] > 0
    assert m["backend"]["ran"] in ("cpu", "torch", "triton", "cuda")
    assert m["backend"]["token_logprobs"] in ("cpu", "torch", "triton", "cuda")
    assert m["backend"]["logprob_path"] in ("integrations.transformers", "logits")
    assert m["versions"]["torch"] == torch.__version__ and m["date"]
    assert [p["step"] for p in m["trajectory"]] == [0, 2, 4, 6]
    assert len(m["history"]) == 6 and all(_finite(h["kl_to_ref"]) for h in m["history"])
    # Best-of-N of the reference: the reward can only go up with N (same pool, nested maxima in expectation
    # and here exactly, since Best-of-2n of a group is the max of two Best-of-n winners).
    rewards = [m["reference"]["reward"]] + [m["best_of_n"][str(n)]["reward"] for n in demo.BON_SIZES]
    assert rewards == sorted(rewards)
    printed = capsys.readouterr().out
    assert "Best-of-8 of π_ref" in printed and "J-BOND policy (6 steps)" in printed and "tokens/s" in printed


def test_demo_rejects_bad_flags(tmp_path):
    with pytest.raises(SystemExit, match=r"--steps must lie in \[1, "):
        cli.main(["demo", "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(SystemExit, match=r"--batch-size must lie in \[2, 1024\]"):
        cli.main(["demo", "--out", str(tmp_path), "--batch-size", "1"])
    # Each is rejected in one line before any training (they used to end in a traceback, some only after
    # pretraining; --vocab 200000 tried to allocate a 320 GB matrix).
    bad = {
        ("--eta", "2"): "--eta must lie in",
        ("--eta", "nan"): "--eta must lie in",
        ("--beta", "-0.1"): "--beta must lie in",
        ("--gamma", "-1"): "--gamma must lie in",
        ("--gamma", "inf"): "--gamma must lie in",
        ("--lr", "nan"): "--lr must lie in",
        ("--lr", "-1"): "--lr must lie in",
        ("--vocab", "4"): "--vocab must lie in",
        ("--vocab", "200000"): "--vocab must lie in",
        ("--seed", str(2**64)): "--seed must lie in",
        ("--backend", "triton"): "--backend triton cannot run on cpu",
    }
    for (flag, value), message in bad.items():
        if flag == "--backend" and torch.cuda.is_available():
            continue  # a CUDA machine can run it
        with pytest.raises(SystemExit, match=message):
            cli.main(["demo", "--out", str(tmp_path), "--device", "cpu", flag, value])
    # --out is checked first (the files are written only at the end of the run)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(SystemExit, match="--out must be a folder"):
        cli.main(["demo", "--out", str(afile)])
    with pytest.raises(SystemExit, match="--out .* is not a writable folder"):
        cli.main(["demo", "--out", str(afile / "sub")])
    with pytest.raises(SystemExit, match="--out must name a folder"):
        cli.main(["demo", "--out", ""])


def test_metrics_json_has_no_nan():
    m = {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 2}}
    assert demo._json_safe(m) == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    json.dumps(demo._json_safe(m), allow_nan=False)


def test_reward_counts_targets_and_breaks_ties():
    g = demo.Grammar(32, seed=0)
    assert 1 <= g.target < 32 and abs(g.target_freq - 0.04) < 0.02
    other = next(t for t in range(1, 32) if t != g.target)
    none = torch.full((12,), other)
    two = none.clone()
    two[[3, 7]] = g.target
    r = g.reward(torch.stack([none, two]))
    w = g.weights
    assert torch.allclose(r[0], 0.1 * w[other])
    assert torch.allclose(r[1], 2 + 0.1 * (10 * w[other] + 2 * w[g.target]) / 12)
    # Random responses with the same number of targets almost never tie: the quantiles see a continuum.
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(1, 32, (512, 12), generator=gen)
    rewards = g.reward(y)
    assert rewards.unique().numel() > 500


def test_reference_is_trained_and_not_uniform():
    torch.manual_seed(0)
    g = demo.Grammar(32, seed=0)
    gen = torch.Generator().manual_seed(0)
    model = demo.build_model(32)
    before = demo.next_token_entropy(model, g, count=64, length=16, generator=gen, device="cpu")
    demo.pretrain_reference(
        model,
        g,
        steps=60,
        batch=64,
        length=16,
        lr=3e-3,
        generator=gen,
        device="cpu",
        progress=lambda it, **kw: _Quiet(it),
    )
    after = demo.next_token_entropy(model, g, count=64, length=16, generator=gen, device="cpu")
    # Untrained: close to uniform (log 32 = 3.47).  Trained: well below it, towards the language's own
    # entropy rate (about 1.3 nats), which a uniform reference could never reach.
    assert before > 0.9 * math.log(32)
    assert after < 0.6 * math.log(32) and after > g.entropy_rate - 0.2


class _Quiet:
    def __init__(self, it):
        self.it = it

    def __iter__(self):
        return iter(self.it)

    def set_postfix(self, **kw):
        pass


def _naive_sample(model, prompts, length):
    """Full forward per token (no KV cache): the sampler's oracle."""
    x = prompts
    for _ in range(length):
        probs = torch.softmax(model(input_ids=x).logits[:, -1].float(), dim=-1)
        x = torch.cat([x, torch.multinomial(probs, 1)], dim=1)
    return x


@torch.no_grad()
def test_sampler_uses_the_cache_correctly():
    torch.manual_seed(0)
    model = demo.build_model(40).eval()
    g = demo.Grammar(40, seed=2)
    prompts = g.sample(64, 4, torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    fast = demo.sample(model, prompts, 10)
    torch.manual_seed(7)
    slow = _naive_sample(model, prompts, 10)
    assert fast.shape == (64, 14) and fast.dtype == torch.int64
    assert torch.equal(fast[:, :4], prompts)
    assert int(fast.min()) >= 0 and int(fast.max()) < 40
    # Same RNG stream, same probabilities up to rounding: the draws agree (a wrong cache position or an
    # off-by-one would change the distribution and the draws).
    assert (fast == slow).float().mean() > 0.99
    # chunked sampling gives the same shapes and keeps the prompts
    chunked = demo.sample(model, prompts, 3, chunk=16)
    assert chunked.shape == (64, 7) and torch.equal(chunked[:, :4], prompts)


def test_auto_path_is_the_fused_head(monkeypatch):
    # "auto" means the fused head whenever the integration imports; a wrong relative import in the demo's
    # modules once turned it silently into the logits path (same numbers to ~1e-6, a different op measured).
    monkeypatch.setitem(demo._path, "use", "auto")
    assert demo.logprob_path() == "integrations.transformers"


@pytest.mark.parametrize("path", ["logits", "auto"])
def test_sequence_logprobs_matches_log_softmax(path, monkeypatch):
    monkeypatch.setitem(demo._path, "use", path)
    torch.manual_seed(0)
    model = demo.build_model(48)
    x = torch.randint(0, 48, (5, 11))
    p_len = 4
    lp = demo.seq_logp(model, x, p_len)
    logits = model(input_ids=x).logits.double()
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, x[:, 1:, None]).squeeze(-1)[:, p_len - 1 :].sum(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-4, atol=1e-4)
    # gradients reach the parameters the same way, with a random upstream gradient
    up = torch.randn(5, dtype=torch.float64)
    (g1,) = torch.autograd.grad((lp.double() * up).sum(), model.lm_head.weight)
    (g2,) = torch.autograd.grad((ref * up).sum(), model.lm_head.weight)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_bon_curve_is_exact_best_of_n():
    curve = demo.bon_curve(8)
    assert curve[0] == (0.0, 0.5)
    kl, q = curve[1]
    assert kl == pytest.approx(math.log(2) - 0.5) and q == pytest.approx(2 / 3)
    assert all(a[0] < b[0] and a[1] < b[1] for a, b in zip(curve, curve[1:]))


def _demo_parser():
    import argparse

    return demo.add_arguments(argparse.ArgumentParser(prog="bond-kernels demo"))


def test_every_numeric_flag_has_a_checked_range():
    # The audit of issue 22: every int or float flag is bounded, so a new one cannot slip in unchecked.
    checked = set(demo.SIZE_FLAGS) | set(demo.REAL_FLAGS) | {"threads", "seed", "beta", "eta"}
    numeric = {a.dest for a in _demo_parser()._actions if a.type in (int, float)}
    assert numeric and numeric <= checked, numeric - checked


def test_out_of_range_flags_are_refused_by_name(tmp_path, monkeypatch):
    # Just outside each range, refused before anything is built (run_jbond would record the call).
    called = []
    monkeypatch.setattr(demo, "run_jbond", lambda args: called.append(args) or 0)
    cases = []
    for name, (lo, hi, _) in demo.SIZE_FLAGS.items():
        cases += [(name, lo - 1, f"[{lo}, {hi}]"), (name, hi + 1, f"[{lo}, {hi}]")]
    cores = demo.usable_cores()
    cases += [("threads", 0, f"[1, {cores}]"), ("threads", cores + 1, f"[1, {cores}]")]
    cases += [("lr", 1.5, "(0, 1]"), ("lr", 0.0, "(0, 1]"), ("gamma", 1000.5, "[0, 1000]")]
    for name, value, accepted in cases:
        flag = "--" + name.replace("_", "-")
        with pytest.raises(SystemExit) as exc:
            cli.main(["demo", "--out", str(tmp_path), "--device", "cpu", flag, str(value)])
        message = str(exc.value.code)
        assert message.startswith(f"{flag} must lie in {accepted}") and message.endswith(f"got {value}"), (
            message
        )
    # the bounds themselves are accepted
    for name, (lo, hi, _) in demo.SIZE_FLAGS.items():
        for value in (lo, hi):
            flag = "--" + name.replace("_", "-")
            assert cli.main(["demo", "--out", str(tmp_path), "--device", "cpu", flag, str(value)]) == 0
    assert len(called) == 2 * len(demo.SIZE_FLAGS)


class _TinyLM(torch.nn.Module):
    """A bigram model with the transformers call convention (``model(input_ids=x).logits``)."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table(input_ids)})()


def test_pretraining_runs_for_every_short_length():
    # --pretrain-steps 10 died in OneCycleLR (ZeroDivisionError: its warm-up lasted 0.1 * 10 - 1 = 0 steps).
    g = demo.Grammar(8, seed=0)
    gen = torch.Generator().manual_seed(0)
    for steps in range(0, 41):
        model = _TinyLM(8)
        before = model.table.weight.detach().clone()
        nll = demo.pretrain_reference(
            model,
            g,
            steps=steps,
            batch=4,
            length=5,
            lr=1e-2,
            generator=gen,
            device="cpu",
            progress=lambda it, **kw: _Quiet(it),
        )
        assert (steps == 0 and math.isnan(nll)) or (steps > 0 and math.isfinite(nll)), (steps, nll)
        assert torch.equal(before, model.table.weight) == (steps == 0)


def test_smallest_flags_and_a_short_pretraining_run(tmp_path, capsys):
    # Every size flag at its lowest accepted value, and the pretraining length that used to crash.
    out = tmp_path / "tiny"
    argv = "--steps 1 --pretrain-steps 10 --batch-size 2 --eval-prompts 1 --eval-k 1 --eval-samples 1"
    argv += " --vocab 8 --prompt-len 2 --response-len 1 --quiet --device cpu"
    assert cli.main(["demo", "--out", str(out), *argv.split()]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["pretrain_steps"] == 10 and math.isfinite(m["reference_model"]["final_nll"])
    assert m["policy"]["kl_to_ref_stderr"] is None  # one sample: no spread (NaN, null in the JSON)
    assert "J-BOND policy (1 steps)" in capsys.readouterr().out


def test_a_diverging_run_stops_with_a_message():
    model = torch.nn.Linear(2, 2)
    demo._demo.train._check_finite(model, torch.tensor(1.0), 3)  # finite: returns
    with pytest.raises(SystemExit, match="J-BOND diverged at step 3: the loss .* lower --lr"):
        demo._demo.train._check_finite(model, torch.tensor(float("nan")), 3)
    with torch.no_grad():
        model.weight[0, 1] = float("inf")
    with pytest.raises(SystemExit, match="diverged at step 4: the policy's weights"):
        demo._demo.train._check_finite(model, torch.tensor(1.0), 4)


def test_help_explains_threads(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "see below" not in text  # nothing below ever explained it
    threads = text[text.rindex("--threads THREADS") :]
    threads = threads[: threads.index("--quiet")]
    for words in (
        "CPU threads torch may use",
        "at most the cores",
        "default 1",
        "a second thread gains nothing",
    ):
        assert words in threads, threads


# --------------------------------------------------------------------------------------------------------
# README's demo transcript is what the report code prints: its numbers, put back through format_table and
# format_written, give the transcript line for line.  It went stale once (no `reference:` line, an old
# `wrote` line); a change to the printed lines now fails here until README is rerun.
# --------------------------------------------------------------------------------------------------------
ROW = re.compile(
    r"^(π_ref \(reference\)|Best-of-(\d+) of π_ref|J-BOND policy \((\d+) steps\)) +([\d.]+) +([\d.]+) +"
)
TRAINING = re.compile(
    r"^training: (\d+) tokens/s \((\d+) response tokens sampled in ([\d.]+) s; ([\d.]+) steps/s\)$"
)
BACKEND = re.compile(
    r"^backend: (\w+) -> '(\w+)' on (\w+) \(log-prob path: ([\w.]+); token_logprobs resolves to '(\w+)'\)$"
)
REFERENCE = re.compile(
    r"^reference: next-token entropy ([\d.]+) nats \(uniform [\d.]+, the language's own ([\d.]+)\); target token (\d+) at ([\d.]+)$"
)
WROTE = re.compile(r"^wrote (\S+) and (\S+) \(([\d.]+) s in all\)$")


def _readme_transcript():
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## What the demo shows") :]
    section = section[: section.index("\n## ", 1)]
    stamp, block = section.split("\n```\n", 2)[:2]
    return stamp, block.rstrip("\n").split("\n")


def test_readme_transcript_is_what_the_demo_prints():
    stamp, lines = _readme_transcript()
    # stamped: the CPU and the date of the run
    assert re.search(r"\d{4}-\d{2}-\d{2}", stamp) and "CPU" in stamp, stamp
    defaults = _demo_parser().parse_args([])
    m = {"best_of_n": {}, "config": {"vocab": defaults.vocab}, "training": {}, "reference_model": {}}
    for line in lines:
        row = ROW.match(line)
        if row and row.group(1).startswith("π_ref"):
            m["reference"] = {"reward": float(row.group(4)), "quantile": float(row.group(5))}
        elif row and row.group(2):
            n = int(row.group(2))
            m["best_of_n"][str(n)] = {
                "reward": float(row.group(4)),
                "quantile": float(row.group(5)),
                "kl_closed_form": math.log(n) - (n - 1) / n,
            }
        elif row:
            kl, stderr = re.search(r"([\d.]+) ± ([\d.]+) \(sampled\)$", line).groups()
            m["config"]["steps"] = int(row.group(3))
            m["policy"] = {
                "reward": float(row.group(4)),
                "quantile": float(row.group(5)),
                "kl_to_ref": float(kl),
                "kl_to_ref_stderr": float(stderr),
            }
        elif TRAINING.match(line):
            rate, tokens, seconds, steps_per_s = TRAINING.match(line).groups()
            m["training"] = {
                "tokens_per_s": float(rate),
                "tokens": int(tokens),
                "seconds": float(seconds),
                "steps_per_s": float(steps_per_s),
            }
        elif BACKEND.match(line):
            op, ran, device, path, token = BACKEND.match(line).groups()
            m["backend"] = {"op": op, "ran": ran, "logprob_path": path, "token_logprobs": token}
            m["device"] = device
        elif REFERENCE.match(line):
            entropy, rate, target, freq = REFERENCE.match(line).groups()
            m["reference_model"] = {
                "next_token_entropy": float(entropy),
                "language_entropy_rate": float(rate),
                "target_token": int(target),
                "target_freq": float(freq),
            }
    assert lines[-1].startswith("wrote "), lines[-1]
    png, js, seconds = WROTE.match(lines[-1]).groups()
    # the run was the default one: its step count and the tokens it sampled follow from the defaults
    assert m["config"]["steps"] == defaults.steps
    assert m["training"]["tokens"] == 3 * defaults.batch_size * defaults.response_len * defaults.steps
    assert os.path.basename(png) == "demo.png" and js == os.path.join(os.path.dirname(png), "metrics.json")
    printed = demo.format_table(m).split("\n") + [demo._demo.report.format_written(png, js, float(seconds))]
    assert printed == lines
