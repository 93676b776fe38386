"""``bond_kernels.integrations.trl.JBondTrainer`` (a trl 1.16 ``GRPOTrainer`` running J-BOND) on CPU, with tiny
models built in code, a word-level tokenizer and a reward counting the token ``w0`` (issue 19, item 2).

Every run is a real ``trainer.train()``.  Spies on ``generate`` record what the policy and the anchor sampled;
from those samples alone the step's gradient is recomputed independently: plain logits of fresh copies of the
models, ``log_softmax``, the reward function on the decoded text, the better anchor sample picked here, and
``bond_kernels.reference.jbond_loss``.  The anchor is perturbed away from the policy first, so a step that
sampled, or scored, the anchor's rows with the policy would give another gradient.
"""

import copy
import math
import os
import time

import pytest
import torch
from test_integrations_trl_verl import _peer

import bond_kernels.reference as ref

VOCAB = 24  # 3 special tokens + 21 words: a random model says w0 about once per 24 tokens
PAD, EOS, UNK = 0, 1, 2
TARGET = "w0"
# The backbone's backward is the same code in the trainer and in the recomputation; what differs is the fused
# head against plain logits (sums in another order, ~1e-6 relative).  Bound: a fraction of each parameter's
# max |g| (entries that are sums of cancelling terms are small), as test_trl_trainer_step.py does.
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def trl():
    _peer("trl.trainer.grpo_trainer")
    return _peer("trl")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def _model(seed=1):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def count_target(completions, **kwargs):
    return [float(c.split().count(TARGET)) for c in completions]


def _dataset(n):
    from datasets import Dataset

    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 5, (n,), generator=g).tolist()  # different lengths: left-padded prompts
    words = [" ".join(f"w{int(i)}" for i in torch.randint(1, VOCAB - 3, (k,), generator=g)) for k in lengths]
    return Dataset.from_dict({"prompt": words})


def _config(trl, tmp_path, **over):
    from bond_kernels.integrations.trl import JBondConfig

    kw = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=6,
        max_completion_length=6,
        temperature=0.9,
        jbond_beta=0.5,
        jbond_gamma=0.5,
        anchor_eta=0.25,
        learning_rate=1e-2,
        use_cpu=True,
        bf16=False,
        max_grad_norm=0.0,  # no clipping: the raw gradients
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    kw.update(over)
    return JBondConfig(**kw)


class Spy:
    """Wraps a model's ``generate``: records (prompt ids, attention mask, output); ``fixed`` samples each row
    alone from a seed of its prompt's tokens, so the samples do not depend on how prompts are batched."""

    def __init__(self, model, tag, fixed=False):
        self.inner, self.tag, self.fixed, self.calls = model.generate, tag, fixed, []
        model.generate = self

    def __call__(self, input_ids, attention_mask, **kwargs):
        if not self.fixed:
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        else:
            rows, seen = [], {}
            for ids, mask in zip(input_ids, attention_mask):
                p = ids[mask.bool()]
                key = tuple(p.tolist())
                seen[key] = seen.get(key, 0) + 1
                torch.manual_seed(sum((i + 7) * 131**k for k, i in enumerate(key)) % 2**31 + 97 * seen[key])
                o = self.inner(input_ids=p[None], attention_mask=torch.ones_like(p)[None], **kwargs)[0]
                rows.append(torch.cat([ids[: len(ids) - len(p)], o]))
            width = max(len(r) for r in rows)
            out = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=PAD) for r in rows])
        self.calls.append((input_ids.clone(), attention_mask.clone(), out.clone()))
        return out


class Record:
    """Callback: the first step's gradients; the anchor just before and after each EMA move."""

    def __init__(self, trainer_ref):
        from transformers import TrainerCallback

        rec = self

        class CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
                if rec.grads is None:
                    rec.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

            def on_optimizer_step(self, args, state, control, **kw):  # runs before the trainer's EMA callback
                rec.before = {k: v.clone() for k, v in trainer_ref[0].anchor_model.state_dict().items()}

            def on_step_end(self, args, state, control, model=None, **kw):
                t = trainer_ref[0]
                policy = dict(t.model.state_dict())
                ok = all(
                    torch.equal(a, torch.lerp(rec.before[k], policy[k], t.args.anchor_eta))
                    if a.is_floating_point()
                    else torch.equal(a, policy[k])
                    for k, a in t.anchor_model.state_dict().items()
                )
                grads = [p.grad for p in t.anchor_model.parameters()]
                rec.ema_ok.append(ok and all(g is None for g in grads))
                rec.ema_ok.append(not any(p.requires_grad for p in t.anchor_model.parameters()))

        self.callback, self.grads, self.before, self.ema_ok = CB(), None, None, []


def _train(trl, tmp_path, perturb=0.5, fixed=False, dataset=8, reward=count_target, **over):
    """Build and train; returns (trainer, initial policy copy, initial anchor copy, policy spy, anchor spy, rec)."""
    from bond_kernels.integrations.trl import JBondTrainer

    model = _model()
    holder = []
    rec = Record(holder)
    trainer = JBondTrainer(
        model=model,
        reward_funcs=reward,
        args=_config(trl, tmp_path, **over),
        train_dataset=_dataset(dataset),
        processing_class=_tokenizer(),
        callbacks=[rec.callback],
    )
    holder.append(trainer)
    torch.manual_seed(3)
    with torch.no_grad():  # the anchor differs from the policy
        for p in trainer.anchor_model.parameters():
            p.add_(perturb * torch.randn_like(p))
    policy0, anchor0 = copy.deepcopy(_model()), copy.deepcopy(_model())
    policy0.load_state_dict(model.state_dict())
    anchor0.load_state_dict(trainer.anchor_model.state_dict())
    spies = Spy(model, "policy", fixed), Spy(trainer.anchor_model, "anchor", fixed)
    trainer.train()
    return trainer, policy0, anchor0, spies[0], spies[1], rec


def _completion(out, width):
    """Completion token lists of a generate output: after the prompt, cut after the first EOS."""
    rows = []
    for c in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(c) if t == EOS), len(c))
        rows.append(c[:end])
    return rows


def _plain_logp(model, p_ids, p_mask, rows, temperature):
    """Sequence log-probs of the completions ``rows`` after the left-padded prompts, from the full logits."""
    width = max(1, max(len(r) for r in rows))
    c = torch.full((len(rows), width), PAD)
    cm = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        c[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        cm[i, : len(r)] = 1
    ids, mask = torch.cat([p_ids, c], 1), torch.cat([p_mask, cm], 1)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, -1)
    tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
    keep = torch.cat([torch.zeros_like(p_mask), cm], 1)[:, 1:].bool()
    return (tok * keep).sum(1)


def _recompute(policy_call, anchor_call, policy0, anchor0, args):
    """The step's gradient from its samples alone, through bond_kernels.reference.jbond_loss."""
    tok = _tokenizer()
    p_ids, p_mask, out = policy_call
    _, _, a_out = anchor_call
    width = p_ids.shape[1]
    y, ya = _completion(out, width), _completion(a_out, width)
    b = len(y)
    r = torch.tensor(count_target([tok.decode(t, skip_special_tokens=True) for t in y]))
    ra = torch.tensor(count_target([tok.decode(t, skip_special_tokens=True) for t in ya])).view(b, 2)
    best = [ya[2 * j + int(ra[j, 1] > ra[j, 0])] for j in range(b)]
    policy0.zero_grad()
    lp = _plain_logp(policy0, p_ids, p_mask, y, args.temperature)
    lb = _plain_logp(policy0, p_ids, p_mask, best, args.temperature)
    with torch.no_grad():
        la = _plain_logp(anchor0, p_ids, p_mask, y, args.temperature)
    out = ref.jbond_loss(
        lp,
        la,
        r,
        ra,
        lb,
        beta=args.jbond_beta,
        gamma=args.jbond_gamma,
        penalty=args.penalty,
        strict=args.strict,
    )
    out.loss.backward()
    return {n: p.grad for n, p in policy0.named_parameters()}, r, ra


def _assert_grads_close(got, want):
    assert got.keys() == want.keys()
    for n in want:
        scale = want[n].abs().max().item()
        assert scale > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=GRAD_REL_TOL * scale, msg=n)


# ------------------------------------------------------------------------------------------------ one step
def test_step_gradient_anchor_samples_and_ema(trl, tmp_path):
    trainer, policy0, anchor0, spy_p, spy_a, rec = _train(trl, tmp_path, max_steps=2)
    args = trainer.args
    # per step: one policy call with one row per prompt, one anchor call with two rows per prompt
    assert len(spy_p.calls) == len(spy_a.calls) == 2
    b = spy_p.calls[0][0].shape[0]
    assert b == args.per_device_train_batch_size // 3 == 2
    assert spy_a.calls[0][0].shape[0] == 2 * b
    assert torch.equal(spy_a.calls[0][0], spy_p.calls[0][0].repeat_interleave(2, 0))
    # the anchor copy runs its own weights (a copy of a TRL-patched model would run the policy's forward)
    ids = spy_p.calls[0][2]
    with torch.no_grad():
        diff = (anchor0(input_ids=ids).logits - policy0(input_ids=ids).logits).abs().max()
        assert diff > 0.1
    # the trainer's anchor object runs its own weights now (its forward is not the policy's)
    fresh = _model()
    fresh.load_state_dict(trainer.anchor_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(trainer.anchor_model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert (fresh(input_ids=ids).logits - trainer.model(input_ids=ids).logits).abs().max() > 0.1
    # the gradient of step 1, recomputed from its samples through the reference
    want, r, ra = _recompute(spy_p.calls[0], spy_a.calls[0], policy0, anchor0, args)
    _assert_grads_close(rec.grads, want)
    # a reward table where the J-BOND reward matters: some sample penalised or the batch not constant
    # after each step: anchor == lerp(anchor before, policy after, eta) exactly; no gradient on the anchor
    assert rec.ema_ok == [True] * 4
    # logged per step
    logged = trainer.state.log_history[0]
    for key in ("reward", "quantile", "penalised_frac", "kl_to_anchor", "forward_ce", "jbond_reward"):
        assert math.isfinite(logged[f"jbond/{key}"]), key
    assert logged["jbond/reward"] == pytest.approx(r.mean().item())
    assert logged["jbond/anchor_reward"] == pytest.approx(ra.mean().item())


def test_anchor_copied_from_a_trl_patched_model_runs_its_own_weights(trl, tmp_path):
    # trl's add_fused_lm_head binds the model's original forward in a closure: a deepcopy keeps calling the
    # *original* model's forward.  The trainer drops that instance forward from the anchor it is given.
    from bond_kernels.integrations.trl import JBondTrainer

    patched = _model()
    trl.trainer.utils.add_fused_lm_head(patched)
    anchor = copy.deepcopy(patched)
    with torch.no_grad():
        for p in anchor.parameters():
            p.mul_(1.5)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(anchor(input_ids=ids).logits, patched(input_ids=ids).logits)  # the trap itself
    trainer = JBondTrainer(
        model=_model(),
        reward_funcs=count_target,
        args=_config(trl, tmp_path),
        train_dataset=_dataset(4),
        processing_class=_tokenizer(),
        anchor_model=anchor,
    )
    fresh = _model()
    fresh.load_state_dict(trainer.anchor_model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(trainer.anchor_model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        assert (fresh(input_ids=ids).logits - patched(input_ids=ids).logits).abs().max() > 0.1


def test_gradient_accumulation_matches_one_micro_batch(trl, tmp_path):
    one = _train(trl, tmp_path / "a", per_device_train_batch_size=6, gradient_accumulation_steps=1)
    two = _train(trl, tmp_path / "b", per_device_train_batch_size=3, gradient_accumulation_steps=2)
    for s1, s2 in ((one[3], two[3]), (one[4], two[4])):  # the same samples
        assert len(s1.calls) == len(s2.calls) == 1
        for a, b in zip(s1.calls[0], s2.calls[0]):
            assert torch.equal(a, b)
    assert two[5].grads.keys() == one[5].grads.keys()
    _assert_grads_close(two[5].grads, one[5].grads)


# ------------------------------------------------------------------------------------------------ learning
def test_short_run_raises_reward(trl, tmp_path):
    # a fast anchor (eta 0.5) and more weight on the forward term: the iterated Best-of-2 climbs within 20 steps
    trainer = _train(
        trl,
        tmp_path,
        perturb=0.0,
        max_steps=20,
        dataset=16,
        per_device_train_batch_size=12,
        learning_rate=5e-2,
        lr_scheduler_type="constant",
        anchor_eta=0.5,
        jbond_beta=0.3,
        jbond_gamma=0.0,
    )[0]
    rewards = [h["jbond/reward"] for h in trainer.state.log_history if "jbond/reward" in h]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 1.0, rewards


# ------------------------------------------------------------------------------------------------ 2 processes
def _worker(rank, world, port, tmp, conn_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
    import pathlib

    trl_mod = _peer("trl")
    trainer, _, _, spy_p, spy_a, rec = _train(
        trl_mod, pathlib.Path(tmp) / str(rank), fixed=True, ddp_timeout=120
    )
    torch.save(
        {
            "grads": rec.grads,
            "policy": spy_p.calls,
            "anchor": spy_a.calls,
            "world": trainer.accelerator.num_processes,
        },
        os.path.join(conn_dir, f"rank{rank}.pt"),
    )


def test_two_processes_match_one(trl, tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.spawn(_worker, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2, join=False)
    end = time.monotonic() + 300.0  # the workers' gloo timeout is 120 s (ddp_timeout)
    while not ctx.join(timeout=1.0):
        if time.monotonic() > end:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("the 2 JBondTrainer workers did not finish in 300 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    # one process with the whole batch (the same prompts, each sampled from its own seed)
    one = _train(trl, tmp_path / "single", fixed=True, per_device_train_batch_size=12)

    def prompts(calls):
        return [tuple(r[k.bool()].tolist()) for p, k, _ in calls for r, k in zip(p, k)]

    halves = [prompts(r["policy"]) for r in ranks]
    assert len(halves[0]) == len(halves[1]) == 2 and not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == sorted(prompts(one[3].calls))
    for r in ranks:  # after the all-reduce, every rank holds the global gradient
        _assert_grads_close(r["grads"], one[5].grads)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "over,match",
    [
        (dict(num_generations=4), "num_generations must be 3"),
        (dict(per_device_train_batch_size=4), "per_device_train_batch_size"),
        (dict(num_iterations=2), "num_iterations must be 1"),
        (dict(anchor_eta=0.0), "anchor_eta"),
        (dict(anchor_eta=1.5), "anchor_eta"),
        (dict(jbond_beta=-0.1), "jbond_beta"),
        (dict(jbond_beta=1.01), "jbond_beta"),
        (dict(jbond_gamma=-1.0), "jbond_gamma"),
        (dict(jbond_gamma=float("nan")), "jbond_gamma"),
        (dict(penalty=-1.0), "penalty"),
        (dict(beta=0.04), "beta"),
        (dict(use_vllm=True), "use_vllm"),
        (dict(steps_per_generation=2), "steps_per_generation"),
    ],
)
def test_bad_config(trl, tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        _config(trl, tmp_path, **over)


def test_bad_trainer_arguments(trl, tmp_path):
    from bond_kernels.integrations.trl import JBondTrainer

    kw = dict(reward_funcs=count_target, train_dataset=_dataset(4), processing_class=_tokenizer())
    with pytest.raises(TypeError, match="args must be a JBondConfig"):
        JBondTrainer(
            model=_model(),
            args=trl.GRPOConfig(output_dir=str(tmp_path), num_generations=2, use_cpu=True),
            **kw,
        )
    with pytest.raises(ValueError, match="peft_config"):
        JBondTrainer(model=_model(), args=_config(trl, tmp_path), peft_config=object(), **kw)
    with pytest.raises(ValueError, match="tools"):
        JBondTrainer(model=_model(), args=_config(trl, tmp_path), tools=[len], **kw)


def test_nan_reward_is_an_error(trl, tmp_path):
    def nan_reward(completions, **kwargs):
        return [float("nan") if i == 4 else 1.0 for i, _ in enumerate(completions)]

    with pytest.raises(ValueError, match="reward_funcs: 'nan_reward' returned NaN"):
        _train(trl, tmp_path, reward=nan_reward)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_anchor_saved_and_restored_on_resume(trl, tmp_path):
    out = tmp_path / "run"
    first = _train(trl, out, save_strategy="steps", save_steps=1)[0]
    path = out / "checkpoint-1" / "anchor_model.pt"
    saved = torch.load(path, weights_only=True)
    for k, v in first.anchor_model.state_dict().items():
        assert torch.equal(saved[k], v), k
    # resume: a new trainer (its anchor a fresh copy of another policy) continues with the saved anchor
    from bond_kernels.integrations.trl import JBondTrainer

    holder = []
    rec = Record(holder)
    trainer = JBondTrainer(
        model=_model(seed=9),
        reward_funcs=count_target,
        args=_config(trl, out, max_steps=2, save_strategy="no"),
        train_dataset=_dataset(8),
        processing_class=_tokenizer(),
        callbacks=[rec.callback],
    )
    holder.append(trainer)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    for k, v in saved.items():  # the anchor just before step 2's EMA move is the saved one
        assert torch.equal(rec.before[k], v), k
    assert rec.ema_ok == [True, True]
    # a checkpoint without the anchor cannot be resumed silently
    path.unlink()
    with pytest.raises(ValueError, match="resume_from_checkpoint: .* holds no anchor_model.pt"):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-1"))
