"""``bond-kernels demo``: J-BOND (docs/math.md §8, the paper's Algorithm 2) on a tiny Llama.

What runs, in order:

1. A synthetic language: a sparse random Markov chain over ``vocab - 1`` content tokens (token 0 is BOS).
   Each token has a few likely successors plus a little uniform mass, so text has real structure
   (about 1.3 nats per token against ``log 31 = 3.4`` for uniform text).
2. The reference policy π_ref: a Llama built from a ``LlamaConfig`` in code (no download), trained briefly by
   maximum likelihood on that language.
3. The reward, programmatic: ``r(y) = #target tokens in y + 0.1 · mean_t w[y_t]`` with a rare *target* token
   (stationary frequency about 4 %) and fixed per-token weights ``w ~ U(0, 1)``.  The second term breaks the
   ties between responses with equally many targets, so quantiles behave as for continuous rewards.
4. J-BOND: per step and prompt one policy sample and two anchor samples, the rewards of all three,
   ``bk.sequence_logprobs`` for ``log π(y)``, ``log π(y'_best)`` (with gradient) and ``log π_anchor(y)``,
   ``bk.jbond_loss``, Adam, then ``bk.EMAAnchor(anchor, eta).update(policy)``.
5. Evaluation by sampling on held-out prompts: reward and reward quantile (against k reference samples per
   prompt) of the policy, of π_ref and of Best-of-2/4/8 of π_ref; ``KL(π‖π_ref)`` as the mean of
   ``log π − log π_ref`` over policy samples.  A table, a PNG (quantile against KL with the exact Best-of-N
   curve) and a JSON of every number go to ``--out``.

Quantiles are mid-rank, ``(p_le + p_lt) / 2`` from ``bk.reward_quantiles``: equal to ``p_le`` when there are no
ties, and exactly 1/2 in expectation for π_ref even with ties, so the Best-of-N reference values
``N / (N + 1)`` apply.

The pieces live in ``bond_kernels._demo``: ``language`` (the chain and the reward), ``model`` (the Llama, the
sampler, the log-probs, the pretraining), ``evaluate`` (quantiles, Best-of-N, KL), ``report`` (table, plot,
JSON), ``train`` (the run itself).  This module holds the command (flags, their checks) and re-exports the
pieces under their old names.
"""

import argparse
import os

import torch

from . import _backend, _demo
from ._demo import deps
from ._demo.evaluate import BON_CURVE_MAX, BON_SIZES, Evaluator, bon_curve, mid_quantile
from ._demo.language import Grammar
from ._demo.model import (
    LOGPROB_PATHS,
    build_model,
    logprob_path,
    next_token_entropy,
    pretrain_reference,
    response_labels,
    sample,
    seq_logp,
)
from ._demo.report import format_table, write_plot
from ._demo.train import resolve_device, run_jbond

# Private names the tests reach as demo.<name>; the same objects (``_path`` is the dict logprob_path reads).
_path = _demo.model._path
_json_safe = _demo.report._json_safe

__all__ = [
    "BON_CURVE_MAX",
    "BON_SIZES",
    "LOGPROB_PATHS",
    "Evaluator",
    "Grammar",
    "add_arguments",
    "bon_curve",
    "build_model",
    "format_table",
    "logprob_path",
    "mid_quantile",
    "next_token_entropy",
    "pretrain_reference",
    "response_labels",
    "run",
    "sample",
    "seq_logp",
    "write_plot",
]


def add_arguments(parser: argparse.ArgumentParser):
    """Flags of ``bond-kernels demo``; sets ``func=run``."""
    a = parser.add_argument
    a("--steps", type=int, default=150, help="J-BOND steps (default 150)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when available")
    a("--seed", type=int, default=0, help="seed of the language, the models and the sampling")
    a("--out", default="demo_out", help="folder for demo.png and metrics.json (default ./demo_out)")
    a("--batch-size", type=int, default=64, help="prompts per J-BOND step")
    a("--lr", type=float, default=5e-4, help="Adam learning rate of J-BOND")
    a("--beta", type=float, default=0.5, help="Jeffreys weight β (0 = forward KL only, 1 = backward only)")
    a("--gamma", type=float, default=0.0, help="extra KL-to-anchor regularisation γ")
    a("--eta", type=float, default=0.02, help="EMA anchor step η")
    a("--backend", choices=_backend.BACKENDS, default="auto", help="bond_kernels backend for the log-probs")
    a(
        "--logprobs",
        choices=LOGPROB_PATHS,
        default="auto",
        help="fused = integrations.transformers (no logits), logits = model logits + bk.sequence_logprobs",
    )
    a("--vocab", type=int, default=32, help="vocabulary size of the synthetic language")
    a("--prompt-len", type=int, default=4, help="prompt tokens, BOS included")
    a("--response-len", type=int, default=12, help="response tokens")
    a("--pretrain-steps", type=int, default=300, help="maximum-likelihood steps of the reference")
    a("--eval-prompts", type=int, default=128, help="held-out prompts of the evaluation")
    a("--eval-k", type=int, default=32, help="reference samples per prompt for the quantiles")
    a("--eval-samples", type=int, default=8, help="policy samples per prompt in the final evaluation")
    a("--eval-every", type=int, default=0, help="steps between trajectory points (0 = steps / 15)")
    a(
        "--threads",
        type=int,
        default=1,
        help="CPU threads torch may use, at most the cores this process may run on (default 1: at hidden size "
        "64 a second thread gains nothing, and on a shared machine spinning OpenMP threads slowed a step 25x)",
    )
    a("--quiet", action="store_true", help="no progress bars")
    a(
        "--trainer",
        choices=("loop", "trl"),
        default="loop",
        help="loop = the demo's own J-BOND loop; trl = bond_kernels.integrations.trl.JBondTrainer (needs trl)",
    )
    parser.set_defaults(func=run)
    return parser


# Upper bounds of the size flags: each keeps the run's memory within a few GB with the other flags at their
# defaults (the evaluation samples eval_prompts * (eval_k + 64) responses; a J-BOND step back-propagates
# through 2 * batch_size sequences), and far below the sizes whose tensors cannot even be allocated (a
# --batch-size of 10^30 used to die in torch.empty).  name -> (lowest, highest, why the lowest)
SIZE_FLAGS = {
    "steps": (1, 10**7, ""),
    "batch_size": (2, 1024, " (the baseline is a leave-one-out mean)"),
    "eval_prompts": (1, 1024, ""),
    "eval_k": (1, 256, ""),
    "eval_samples": (1, 64, ""),
    "prompt_len": (2, 256, " (BOS and one token)"),
    "response_len": (1, 256, ""),
    "pretrain_steps": (0, 10**7, ""),
    "eval_every": (0, 10**7, ""),
    "vocab": (8, 4096, ""),  # a dense (vocab x vocab) fp64 transition matrix: 4096 tokens is 134 MB
}
# Adam's step is about lr per parameter: above 1 the tiny model's logits overflow within a few steps.
REAL_FLAGS = {"lr": (0.0, 1.0, "(0, 1]"), "gamma": (0.0, 1000.0, "[0, 1000]")}


def usable_cores():
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _check_args(args):
    for name, (lo, hi, why) in SIZE_FLAGS.items():
        value = getattr(args, name)
        if not lo <= value <= hi:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag} must lie in [{lo}, {hi}]{why}, got {value}")
    cores = usable_cores()
    if not 1 <= args.threads <= cores:  # 10^5 threads crashed OpenMP (a segmentation fault)
        raise SystemExit(
            f"--threads must lie in [1, {cores}] (the cores this process may use), got {args.threads}"
        )
    for name, lo, hi in (("beta", 0.0, 1.0), ("eta", 0.0, 1.0)):
        value = getattr(args, name)
        if not (lo <= value <= hi):  # NaN fails too
            raise SystemExit(f"--{name} must lie in [{lo:g}, {hi:g}], got {value}")
    if not 0.0 <= args.gamma <= REAL_FLAGS["gamma"][1]:
        raise SystemExit(f"--gamma must lie in {REAL_FLAGS['gamma'][2]}, got {args.gamma}")
    if not 0.0 < args.lr <= REAL_FLAGS["lr"][1]:
        raise SystemExit(f"--lr must lie in {REAL_FLAGS['lr'][2]}, got {args.lr}")
    if not 0 <= args.seed < 2**63:
        raise SystemExit(f"--seed must lie in [0, 2^63), got {args.seed}")
    if args.logprobs == "fused" and _demo.model._integration() is None:
        raise SystemExit("--logprobs fused: bond_kernels.integrations.transformers does not import here")
    if args.backend != "auto":
        dev = resolve_device(args.device).type
        ok, reason = _backend.availability(args.backend, dev)
        if not ok:
            raise SystemExit(f"--backend {args.backend} cannot run on {dev}: {reason}")
    _check_out(args.out)


def _check_out(out):
    """Fail before any training if --out cannot hold the results (the files are written at the end)."""
    if not out:
        raise SystemExit("--out must name a folder, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"--out must be a folder, got the existing file {out!r}")
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".bond_kernels_write_test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise SystemExit(f"--out {out!r} is not a writable folder: {exc.strerror or exc}") from None


def run(args):
    """Run the demo; returns the process exit code.

    First of all, before the flags' checks (``--out`` is created by them) and anything is built: every optional
    package the demo needs is looked up, and a missing one ends the command with one message (status 1).
    """
    deps.check()
    _check_args(args)
    # One thread by default: at hidden size 64 a second core gains nothing, and on a shared 2-core machine
    # two spinning OpenMP threads per process made a step 25x slower under load (11 vs 0.44 steps/s,
    # measured 2026-11-26).  Restored afterwards so that callers such as pytest keep their setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run_jbond(args)
    finally:
        torch.set_num_threads(threads)
