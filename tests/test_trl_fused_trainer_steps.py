"""One real TRL ``GRPOTrainer``, ``SFTTrainer`` and ``DPOTrainer`` step each (trl 1.16.0, CPU) with
``bond_kernels.integrations.trl.patch()`` off and on, from identical states: the same loss and the same
gradients of every parameter, and spies proving which fused head ran (issue 18, item 2).

Each trainer gives its model a fused LM head in ``__init__`` (``add_fused_lm_head``, bound by name in
``grpo_trainer``, ``sft_trainer`` and ``dpo_trainer``) and score it with ``model(..., labels=labels, fused_lm_head=True)``:
TRL's ``_ChunkedLogProbFunction`` unpatched, our ``linear_token_logprobs`` after ``patch()``.  The models are
tiny Llamas built in code with a whitespace word-level tokenizer (``test_trl_trainer_step.py``'s), no
download.  GRPO samples two completions for each of two prompts (an EOS bias ends some early: padded
completion positions), rewards them with a function of their tokens (unequal within each group, so the
advantages and the policy gradient are not zero), and takes one step; SFT takes one step of two accumulated
micro-batches of prompt/completion pairs (the prompt is masked out of the loss; TRL divides the summed loss
by the tokens of both micro-batches, ``num_items_in_batch``); DPO takes one step on preference pairs with a
reference model, and its logged ``logits/*`` and accuracy metrics read the head's ``mean_logits`` and
``is_top1``.  Gradients are read before the optimizer step, with clipping off.
"""

import pytest
import torch
from test_integrations_trl_verl import _peer
from test_trl_trainer_step import EOS, _model, _prompts, _tokenizer

import bond_kernels.functional
import bond_kernels.integrations.trl as bk_trl

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
# as in test_trl_trainer_step.py: a fraction of each parameter's max |g| (cancelling sums in q/k projections)
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def trl():
    for name in ("trl.trainer.grpo_trainer", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer"):
        _peer(name)
    return _peer("trl")


@pytest.fixture
def leave_trl_unpatched(trl):
    utils = _peer("trl.trainer.utils")
    original = utils.add_fused_lm_head
    try:
        yield
    finally:
        bk_trl.unpatch()
    assert utils.add_fused_lm_head is original
    for name in ("trl.trainer.grpo_trainer", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer"):
        assert _peer(name).add_fused_lm_head is original


def _reward(completions, **kwargs):
    # a function of the sampled words: unequal within a group of two, so the advantages are not all zero
    return [
        float(sum(int(w[1:]) % 7 for w in c.split() if w.startswith("w")) - len(c.split()))
        for c in completions
    ]


class _Spies:
    """Counts the calls into our op and into TRL's chunked function, passing through to the real ones."""

    def __init__(self, mp, trl_utils):
        self.ours, self.theirs = [], []
        real_ours = bond_kernels.functional.linear_token_logprobs
        real_theirs = trl_utils._ChunkedLogProbFunction

        def ours(*args, **kwargs):
            self.ours.append(args[0].shape[0])
            return real_ours(*args, **kwargs)

        class Theirs:
            @staticmethod
            def apply(*args):
                self.theirs.append(args[0].shape[0])
                return real_theirs.apply(*args)

        mp.setattr(bond_kernels.functional, "linear_token_logprobs", ours)
        mp.setattr(trl_utils, "_ChunkedLogProbFunction", Theirs)


def _train(trl, make_trainer, patched):
    from transformers import TrainerCallback

    class GradsBeforeStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {
                n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
            }

    grab = GradsBeforeStep()
    mp = pytest.MonkeyPatch()
    try:
        spies = _Spies(mp, _peer("trl.trainer.utils"))
        if patched:
            assert "add_fused_lm_head" in bk_trl.patch()
            assert _peer("trl.trainer.grpo_trainer").add_fused_lm_head is bk_trl.add_fused_lm_head
            assert _peer("trl.trainer.sft_trainer").add_fused_lm_head is bk_trl.add_fused_lm_head
        trainer = make_trainer([grab])
        result = trainer.train()
    finally:
        bk_trl.unpatch()
        mp.undo()
    return result.training_loss, grab.grads, trainer, spies


def _common(tmp_path):
    return dict(
        output_dir=str(tmp_path),
        max_steps=1,
        bf16=False,
        max_grad_norm=0.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )


def _compare_grads(ours, theirs, family="llama", hidden=32):
    params = dict(_model(family, 1, hidden).named_parameters())
    assert sorted(ours) == sorted(theirs) == sorted(params)
    nonzero = 0
    for name, g in theirs.items():
        scale = g.abs().max().item()
        nonzero += scale > 0
        torch.testing.assert_close(
            ours[name], g, rtol=GRAD_REL_TOL, atol=GRAD_REL_TOL * scale, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert nonzero == len(theirs), "a parameter without gradient: the comparison is vacuous there"


def test_grpo_step_same_with_and_without_patch(trl, leave_trl_unpatched, tmp_path):
    from datasets import Dataset

    def make(callbacks):
        args = trl.GRPOConfig(
            **_common(tmp_path),
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=6,
            temperature=0.9,
            generation_kwargs={"sequence_bias": {(EOS,): 3.0}},
        )
        return trl.GRPOTrainer(
            model=_model("llama", 1, 32),
            reward_funcs=_reward,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": _prompts(2)}),
            processing_class=_tokenizer(),
            callbacks=callbacks,
        )

    theirs = _train(trl, make, patched=False)
    ours = _train(trl, make, patched=True)
    assert theirs[3].ours == [] and theirs[3].theirs, "the unpatched run must be TRL's head alone"
    assert ours[3].theirs == [] and ours[3].ours, "the patched run must be ours alone"
    # the same samples, with padded completion positions
    a, b = ours[2]._buffered_inputs[0], theirs[2]._buffered_inputs[0]
    for key in ("prompt_ids", "completion_ids", "completion_mask", "advantages"):
        assert torch.equal(a[key], b[key]), key
    assert 0 < int(a["completion_mask"].sum()) < a["completion_mask"].numel()
    assert bool((a["advantages"] != 0).any())
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), **LOSS_TOL)
    _compare_grads(ours[1], theirs[1])


def test_sft_step_same_with_and_without_patch(trl, leave_trl_unpatched, tmp_path):
    from datasets import Dataset

    prompts = _prompts(4)
    completions = [" ".join(p.split()[::-1][:3]) for p in prompts]

    def make(callbacks):
        args = trl.SFTConfig(
            **_common(tmp_path),
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            completion_only_loss=True,
            max_length=24,
        )
        return trl.SFTTrainer(
            model=_model("llama", 1, 32),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts, "completion": completions}),
            processing_class=_tokenizer(),
            callbacks=callbacks,
        )

    theirs = _train(trl, make, patched=False)
    ours = _train(trl, make, patched=True)
    assert theirs[3].ours == [] and len(theirs[3].theirs) == 2
    assert ours[3].theirs == [] and len(ours[3].ours) == 2
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), **LOSS_TOL)
    log_ours, log_theirs = ours[2].state.log_history[0], theirs[2].state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        torch.testing.assert_close(
            torch.tensor(log_ours[key]), torch.tensor(log_theirs[key]), rtol=1e-5, atol=1e-6
        )
    _compare_grads(ours[1], theirs[1])


def test_dpo_step_same_with_and_without_patch(trl, leave_trl_unpatched, tmp_path):
    """DPO asks the head for mean_logits and is_top1 (its logits/* and accuracy metrics) and scores a
    reference model (its own fused head) under no_grad."""
    from datasets import Dataset

    prompts = _prompts(2)
    chosen = [" ".join(p.split()[:3]) for p in prompts]
    rejected = [" ".join(p.split()[::-1][:2]) for p in prompts]

    def make(callbacks):
        args = trl.DPOConfig(**_common(tmp_path), per_device_train_batch_size=2, max_length=24)
        return trl.DPOTrainer(
            model=_model("llama", 1, 32),
            ref_model=_model("llama", 2, 32),
            args=args,
            train_dataset=Dataset.from_dict({"prompt": prompts, "chosen": chosen, "rejected": rejected}),
            processing_class=_tokenizer(),
            callbacks=callbacks,
        )

    theirs = _train(trl, make, patched=False)
    ours = _train(trl, make, patched=True)
    assert theirs[3].ours == [] and len(theirs[3].theirs) == 2  # policy and reference
    assert ours[3].theirs == [] and len(ours[3].ours) == 2
    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), **LOSS_TOL)
    log_ours, log_theirs = ours[2].state.log_history[0], theirs[2].state.log_history[0]
    keys = [
        k
        for k in log_theirs
        if k.startswith(("logits/", "logps/", "rewards/", "mean_token_accuracy", "entropy"))
    ]
    assert any(k.startswith("logits/") for k in keys), sorted(log_theirs)
    for key in keys:
        torch.testing.assert_close(
            torch.tensor(log_ours[key]), torch.tensor(log_theirs[key]), rtol=1e-5, atol=1e-6, msg=key
        )
    _compare_grads(ours[1], theirs[1])
