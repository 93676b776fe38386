"""``bond-kernels demo --trainer trl``: the same J-BOND steps run by
:class:`bond_kernels.integrations.trl.JBondTrainer` (trl's GRPOTrainer) instead of the demo's own loop.

The language's token ids become words ``t0 .. t{V-1}`` of a word-level tokenizer (``t0`` is BOS and the pad
token; an end-of-sequence token outside the model's vocabulary is never sampled, so every response runs to
``--response-len`` tokens, as in the loop).  The prompts are drawn from the language up front, one batch per
step; the reward is the language's, read from TRL's ``completion_ids``.  Same optimiser (Adam, constant
learning rate, no clipping), same β, γ, η; the trajectory points are taken by a callback after the steps.
"""

import time

import torch


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    words["<eos>"] = vocab  # outside the model's vocabulary: never sampled
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="<eos>", unk_token="t0")


def train_with_trl(args, policy, grammar, generator, checkpoint, every, device):
    """Train ``policy`` in place with JBondTrainer for ``args.steps`` steps; returns (history, seconds, tokens).

    ``checkpoint(step)`` is called after every ``every``-th step and the last, outside the timed training.
    """
    import tempfile

    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from ..integrations.trl import JBondConfig, JBondTrainer

    b, p_len = args.batch_size, args.prompt_len
    prompts = grammar.sample(b * args.steps, p_len, generator)
    texts = [" ".join(f"t{int(t)}" for t in row) for row in prompts]

    def language_reward(completions, completion_ids, **kwargs):
        return grammar.reward(torch.tensor(completion_ids, dtype=torch.int64)).tolist()

    spent = {"eval": 0.0}

    class Trajectory(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step == args.steps:
                t0 = time.perf_counter()
                checkpoint(state.global_step)
                spent["eval"] += time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as out:
        config = JBondConfig(
            output_dir=out,
            max_steps=args.steps,
            per_device_train_batch_size=3 * b,
            max_completion_length=args.response_len,
            temperature=1.0,
            top_k=0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            adam_beta1=0.9,
            adam_beta2=0.999,
            weight_decay=0.0,
            max_grad_norm=0.0,
            jbond_beta=args.beta,
            jbond_gamma=args.gamma,
            anchor_eta=args.eta,
            use_cpu=device.type == "cpu",
            bf16=False,
            gradient_checkpointing=False,
            shuffle_dataset=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=args.quiet,
            seed=args.seed,
        )
        trainer = JBondTrainer(
            model=policy,
            reward_funcs=language_reward,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": texts}),
            processing_class=_tokenizer(args.vocab),
            callbacks=[Trajectory()],
        )
        if args.quiet:
            trainer.remove_callback(PrinterCallback)  # the per-step log dicts
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0 - spent["eval"]
    history = []
    for h in trainer.state.log_history:
        if "jbond/reward" in h:
            history.append(
                {
                    "step": h["step"],
                    "reward": h["jbond/reward"],
                    "jbond_reward": h["jbond/jbond_reward"],
                    "kl_to_anchor": h["jbond/kl_to_anchor"],
                    "forward_ce": h["jbond/forward_ce"],
                    "quantile_vs_anchor": h["jbond/quantile"],
                }
            )
    return history, seconds, 3 * b * args.response_len * args.steps
