"""CPU throughput of ``JBondTrainer`` against trl's own ``GRPOTrainer`` on the same model and batch, in one run.

Both trainers: the same tiny Llama (built in code: hidden 64, 2 layers, vocabulary 128, untied head), the same
prompts, ``num_generations = 3``, 8 prompts (24 completions) per step, 16 response tokens (the end-of-sequence
token lies outside the vocabulary, so every response has exactly 16), fp32, one thread, no gradient
checkpointing, GRPO's ``beta = 0`` (no reference model).  Per step GRPO samples 3 completions from the policy
and backpropagates through 3 sequences; J-BOND samples 1 from the policy and 2 from the anchor, scores 3
sequences without gradient (policy: y and y'_best, anchor: y), backpropagates through 2 and moves the anchor.
Tokens/s = response tokens sampled / ``train_runtime`` (steps after 2 warm-up steps; the runs alternate
GRPO, J-BOND, GRPO, J-BOND and the best of each pair is reported).

Run: ``python benchmarks/bench_trl_jbond.py`` (prints the CPU model, the date and the table of README.md).
"""

import os
import subprocess
import sys
import tempfile
import time

import torch

VOCAB, PROMPTS, RESPONSE, STEPS, WARMUP = 128, 8, 16, 8, 2


def _setup():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB)}
    words["<eos>"] = VOCAB  # never sampled: fixed-length responses
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", eos_token="<eos>", unk_token="w0"
    )
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return tokenizer, LlamaForCausalLM(config)


def _reward(completions, **kwargs):
    return [float(c.split().count("w7")) for c in completions]


def _run(kind, tokenizer, model, steps):
    import trl
    from datasets import Dataset

    from bond_kernels.integrations.trl import JBondConfig, JBondTrainer

    g = torch.Generator().manual_seed(1)
    prompts = [" ".join(f"w{int(i)}" for i in torch.randint(1, VOCAB, (4,), generator=g)) for _ in range(64)]
    common = dict(
        max_steps=steps,
        per_device_train_batch_size=3 * PROMPTS,
        num_generations=3,
        max_completion_length=RESPONSE,
        learning_rate=1e-4,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        if kind == "grpo":
            args = trl.GRPOConfig(output_dir=out, beta=0.0, **common)
            cls = trl.GRPOTrainer
        else:
            args = JBondConfig(output_dir=out, **common)
            cls = JBondTrainer
        trainer = cls(
            model=model,
            reward_funcs=_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
        )
        return trainer.train().metrics["train_runtime"]


def main():
    import copy

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(f"{name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}")
    tokenizer, model = _setup()
    rates = {"grpo": [], "jbond": []}
    tokens = STEPS * 3 * PROMPTS * RESPONSE
    for _ in range(2):
        for kind in ("grpo", "jbond"):
            warm = _run(kind, tokenizer, copy.deepcopy(model), WARMUP)
            total = _run(kind, tokenizer, copy.deepcopy(model), WARMUP + STEPS)
            rates[kind].append(tokens / max(total - warm, 1e-9))
    grpo, jbond = max(rates["grpo"]), max(rates["jbond"])
    print("| trainer | response tokens/s | relative |")
    print("|---|---|---|")
    print(f"| trl GRPOTrainer (beta 0) | {grpo:.0f} | 1.00 |")
    print(f"| JBondTrainer | {jbond:.0f} | {jbond / grpo:.2f} |")
    print(f"all runs: {rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
