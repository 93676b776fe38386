"""The demo's run: the J-BOND loop (the paper's Algorithm 2) between the reference's pretraining and the final
evaluation, and the metrics it writes."""

import copy
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

import bond_kernels as bk

from .. import _backend
from .evaluate import BON_SIZES, Evaluator
from .language import Grammar
from .model import _path, build_model, logprob_path, next_token_entropy, pretrain_reference, sample, seq_logp
from .report import _json_safe, _versions, format_table, format_written, write_plot


def resolve_device(name):
    """``--device``: auto = cuda when torch sees one; cuda without one exits with the reason."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    return torch.device(name)


def _check_finite(policy, loss, step):
    """End the run with a message naming the flags to lower once the loss or a weight is NaN or infinite
    (sampling from such a policy would otherwise fail later inside torch.multinomial)."""
    if bool(torch.isfinite(loss.detach())) and all(
        bool(torch.isfinite(p).all()) for p in policy.parameters()
    ):
        return
    what = "the loss" if not bool(torch.isfinite(loss.detach())) else "the policy's weights"
    raise SystemExit(
        f"J-BOND diverged at step {step}: {what} became NaN or infinite; lower --lr (or --gamma) and rerun"
    )


def run_jbond(args):
    """Steps 1-5 of ``bond_kernels.demo``: build, pretrain, J-BOND, evaluate, write ``--out``; returns 0.

    ``args`` are ``bond-kernels demo``'s flags, already checked (``bond_kernels.demo.run``); the optional
    dependencies (transformers, matplotlib, tqdm) are imported here or below, after that check.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tqdm.auto import tqdm

    device = resolve_device(args.device)
    _path["use"] = args.logprobs
    path = logprob_path()
    # The op that actually ran: the fused path calls linear_token_logprobs, the logits path token_logprobs.
    op = "linear_token_logprobs" if path == "integrations.transformers" else "token_logprobs"
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    progress = lambda it, **kw: tqdm(it, disable=args.quiet, dynamic_ncols=True, **kw)
    t_start = time.perf_counter()
    seq_len = args.prompt_len + args.response_len
    backend_name = _backend.resolve("token_logprobs", args.backend, device)
    backend_ran = _backend.resolve(op, args.backend, device)

    # 1-2. the language and the reference policy
    grammar = Grammar(args.vocab, args.seed)
    reference = build_model(args.vocab, max_len=max(64, seq_len)).to(device)
    ref_nll = pretrain_reference(
        reference,
        grammar,
        steps=args.pretrain_steps,
        batch=128,
        length=seq_len,
        lr=3e-3,
        generator=gen,
        device=device,
        progress=progress,
    )
    for p in reference.parameters():
        p.requires_grad_(False)
    entropy = next_token_entropy(reference, grammar, count=256, length=seq_len, generator=gen, device=device)
    policy = copy.deepcopy(reference)
    for p in policy.parameters():
        p.requires_grad_(True)
    anchor = copy.deepcopy(reference)
    ema = bk.EMAAnchor(anchor, eta=args.eta)
    policy.eval()  # Llama has no dropout; eval() keeps sampling and scoring identical

    # held-out evaluation prompts and the frozen reference's samples on them
    eval_prompts = grammar.sample(args.eval_prompts, args.prompt_len, gen).to(device)
    evaluator = Evaluator(
        reference,
        grammar,
        eval_prompts,
        k=args.eval_k,
        bon_pool=max(BON_SIZES) * 8,
        length=args.response_len,
        backend=args.backend,
    )
    every = args.eval_every or max(1, args.steps // 15)
    trajectory = []

    def checkpoint(step):
        point = evaluator.policy(policy, samples=2)
        point["step"] = step
        trajectory.append(point)

    checkpoint(0)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    p_len, b = args.prompt_len, args.batch_size
    train_seconds, train_tokens = 0.0, 0
    history = []
    bar = progress(range(1, args.steps + 1), desc="J-BOND")
    trainer = getattr(args, "trainer", "loop")
    if trainer == "trl":  # the same steps through JBondTrainer (trl's GRPOTrainer); the loop below is skipped
        from .trl_train import train_with_trl

        history, train_seconds, train_tokens = train_with_trl(
            args, policy, grammar, gen, checkpoint, every, device
        )
        bar = ()
    for step in bar:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        prompts = grammar.sample(b, p_len, gen).to(device)
        # 1. one policy sample and two anchor samples per prompt; score all three
        y = sample(policy, prompts, args.response_len)
        ya = sample(anchor, prompts.repeat(2, 1), args.response_len).view(2, b, seq_len)
        r_pol = grammar.reward(y[:, p_len:])
        r_anc = grammar.reward(ya[:, :, p_len:]).t().contiguous()  # (B, 2)
        # 2. y'_best: the better anchor sample, ties to the first
        second = (r_anc[:, 1] > r_anc[:, 0]).long()
        y_best = ya[second, torch.arange(b, device=device)]
        # policy log-probs with gradient on y and y'_best in one forward; anchor and π_ref without
        lp = seq_logp(policy, torch.cat([y, y_best]), p_len, backend=args.backend)
        with torch.no_grad():
            lp_anchor = seq_logp(anchor, y, p_len, backend=args.backend)
            lp_ref = seq_logp(reference, y, p_len, backend=args.backend)
        out = bk.jbond_loss(lp[:b], lp_anchor, r_pol, r_anc, lp[b:], beta=args.beta, gamma=args.gamma)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        _check_finite(policy, out.loss, step)
        ema.update(policy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        train_seconds += time.perf_counter() - t0
        train_tokens += 3 * b * args.response_len
        row = {
            "step": step,
            "reward": float(r_pol.mean()),
            "jbond_reward": float(out.reward_mean),
            "kl_to_ref": float((lp[:b].detach() - lp_ref).mean()),
            "kl_to_anchor": float(out.kl_to_anchor),
            "forward_ce": float(out.forward_ce),
        }
        history.append(row)
        bar.set_postfix(
            reward=f"{row['reward']:.3f}", r_J=f"{row['jbond_reward']:.3f}", KL_ref=f"{row['kl_to_ref']:.3f}"
        )
        if step % every == 0 or step == args.steps:
            checkpoint(step)

    # 5. final evaluation
    final = evaluator.policy(policy, samples=args.eval_samples)
    ref_n = evaluator.best_of(1)
    metrics = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "versions": _versions(),
        "backend": {
            "token_logprobs": backend_name,
            "requested": args.backend,
            "logprob_path": path,
            "op": op,
            "ran": backend_ran,
        },
        "config": {
            "trainer": trainer,
            "steps": args.steps,
            "seed": args.seed,
            "threads": args.threads,
            "batch_size": b,
            "lr": args.lr,
            "beta": args.beta,
            "gamma": args.gamma,
            "eta": args.eta,
            "vocab": args.vocab,
            "prompt_len": p_len,
            "response_len": args.response_len,
            "pretrain_steps": args.pretrain_steps,
            "eval_prompts": args.eval_prompts,
            "eval_k": args.eval_k,
            "eval_samples": args.eval_samples,
            "model": "LlamaForCausalLM hidden 64, 2 layers, 4 heads, intermediate 128",
            "reward": "count(target token) + 0.1 * mean_t w[y_t], w ~ U(0,1) per token",
            "quantile": "mid-rank (p_le + p_lt) / 2 against eval_k reference samples per prompt",
        },
        "reference_model": {
            "final_nll": ref_nll,
            "next_token_entropy": entropy,
            "language_entropy_rate": grammar.entropy_rate,
            "target_token": grammar.target,
            "target_freq": grammar.target_freq,
        },
        "reference": {"reward": ref_n[0], "quantile": ref_n[1], "samples": ref_n[2]},
        "best_of_n": {},
        "policy": final,
        "training": {
            "seconds": train_seconds,
            "tokens": train_tokens,
            "tokens_per_s": train_tokens / max(train_seconds, 1e-9),
            "steps_per_s": args.steps / max(train_seconds, 1e-9),
            "tokens_definition": "response tokens sampled (3 per prompt and step: 1 policy + 2 anchor)",
        },
        "trajectory": trajectory,
        "history": history,
    }
    for n in BON_SIZES:
        reward, quantile, count = evaluator.best_of(n)
        metrics["best_of_n"][str(n)] = {
            "reward": reward,
            "quantile": quantile,
            "samples": count,
            "kl_closed_form": math.log(n) - (n - 1) / n,
            "quantile_exact": n / (n + 1),
        }
    metrics["total_seconds"] = time.perf_counter() - t_start

    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "demo.png")
    write_plot(png, metrics)
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(_json_safe(metrics), f, indent=2, allow_nan=False)
    print(format_table(metrics))
    print(format_written(png, os.path.join(args.out, "metrics.json"), metrics["total_seconds"]))
    sys.stdout.flush()
    return 0
