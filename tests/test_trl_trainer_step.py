"""One real TRL ``DistillationTrainer`` step (trl 1.16.0, on CPU) with ``bond_kernels.integrations.trl.patch()``
off and on, from identical states: the same loss, logged entropy and student gradients, no teacher gradient
(issue 13, item 4).

Each run builds, from the same seeds, a tiny student and teacher in code (no download), a whitespace word-level
tokenizer and a dataset of prompts of different lengths, then ``trainer.train()`` with ``max_steps=1``: TRL
itself tokenizes and left-pads the prompts, the student samples the completions (an EOS bias ends some early,
so the completion mask has padded positions), and ``compute_loss`` runs the student and teacher backbones and
``_chunked_divergence_loss`` (TRL's torch path, or ours after ``patch()``) before the optimizer step.  The
gradients are read just before that step (``on_pre_optimizer_step``), with clipping off so they are the raw
ones.  A spy on ``bond_kernels.linear_token_jeffreys`` proves the patched run went through our kernel and the
unpatched one did not.
"""

import pytest
import torch
from test_integrations_trl_verl import _peer

import bond_kernels
import bond_kernels.integrations.trl as bk_trl

# 3 special tokens + words; 389 is prime, so no vocabulary tile of ours divides it evenly.
VOCAB = 389
PAD, EOS, UNK = 0, 1, 2

# (id, beta, temperature, model family, gradient accumulation steps).  Beta 0 / 0.5 / 1 are TRL's three branches
# (forward KL, generalised JSD, reverse KL); temperatures != 1 divide the logits in the loss (and in sampling).
# Llama: untied heads, the teacher wider than the student (48 vs 64, TRL allows it).  Gemma2: tied embeddings
# (the head's gradient adds to the embedding's) and final-logit softcaps, different for student and teacher.
# Two accumulation steps: two micro-batches whose loss TRL divides by the tokens of both (num_items_in_batch).
CASES = [
    ("jsd", 0.5, 1.0, "llama", 1),
    ("forward-kl-T0.7", 0.0, 0.7, "llama", 1),
    ("reverse-kl-T1.3-accum2", 1.0, 1.3, "llama", 2),
    ("jsd-gemma2-softcaps", 0.5, 0.9, "gemma2", 1),
]

# Loss: fp32, a sum of 12-26 token divergences of 389 terms each, summed in another order by our kernel than
# by TRL's torch path; measured up to 1.2e-6 relative (the losses are small, 5e-3 .. 5e-2: differences of nearly
# equal distributions), so rtol 1e-5 leaves 8x and is far below any real error (a wrong temperature, mask or
# normaliser moves the loss by > 1%).  The logged entropy (our entropy sum / TRL's valid count) likewise.
LOSS_TOL = dict(rtol=1e-5, atol=1e-7)
# Gradients: the backbones' backward is the same code in both runs, so every difference comes from the loss's
# gradient with respect to the hidden states and the head (test_trl_distillation.py holds those to rtol 1e-4),
# propagated linearly.  An elementwise rtol would fail on entries that are sums of cancelling terms (q/k
# projections: max |g| ~ 2e-6 against ~ 5e-4 for the head), so the bound is a fraction of each parameter's
# max |g|, as conftest's TOL does: measured up to 2.6e-6 of it; 1e-4 leaves 40x.
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def trl():
    _peer("trl.trainer.distillation_trainer")  # skips (fails under CI) like the other peer tests
    return _peer("trl")


@pytest.fixture
def leave_trl_unpatched(trl):
    """Whatever happens in the test, TRL's own loss is back in place afterwards."""
    module = _peer("trl.trainer.distillation_trainer")
    original = module._chunked_divergence_loss
    try:
        yield
    finally:
        bk_trl.unpatch()
    assert module._chunked_divergence_loss is original


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": UNK, **{f"w{i}": i + 3 for i in range(VOCAB - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def _model(family, seed, hidden, softcap=None):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=None,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=softcap)
        cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(seed)
    return cls(config).float()


def _prompts(n):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(2, 8, (n,), generator=g).tolist()  # different lengths: left-padded prompts
    return [" ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (k,), generator=g)) for k in lengths]


def _step(trl, tmp_path, beta, temperature, family, accum, patched):
    """One ``trainer.train()`` step from fixed seeds; returns (loss, logged entropy, student grads, batches,
    teacher, calls into linear_token_jeffreys)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class GradsBeforeStep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {
                n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None
            }

    calls = []
    ours = bond_kernels.linear_token_jeffreys

    def spy(*args, **kwargs):
        calls.append(kwargs.get("divergence"))
        return ours(*args, **kwargs)

    per_device = 4 // accum
    args = trl.DistillationConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        beta=beta,
        temperature=temperature,
        max_completion_length=8,
        # an EOS bias of +4 (~e^4/389 = 14% a token) ends some completions before 8 tokens: padded positions
        generation_kwargs={"sequence_bias": {(EOS,): 4.0}},
        gradient_checkpointing=True,  # TRL's default: the student's backbone is recomputed in backward
        bf16=False,  # TRL's default is bf16 mixed precision: compare fp32
        max_grad_norm=0.0,  # no clipping: the raw gradients
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )
    softcaps = (5.0, 8.0) if family == "gemma2" else (None, None)
    student = _model(family, 1, 48, softcaps[0])
    teacher = _model(family, 2, 64, softcaps[1])
    grab = GradsBeforeStep()
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(bond_kernels, "linear_token_jeffreys", spy)
        if patched:
            assert "_chunked_divergence_loss" in bk_trl.patch()
        trainer = trl.DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": _prompts(4)}),
            processing_class=_tokenizer(),
            callbacks=[grab],
        )
        result = trainer.train()
    finally:
        bk_trl.unpatch()
        mp.undo()
    logged = trainer.state.log_history[0]
    assert logged["loss"] == pytest.approx(result.training_loss, rel=1e-6)
    return result.training_loss, logged["entropy"], grab.grads, trainer._buffered_inputs, teacher, calls


@pytest.mark.parametrize("beta,temperature,family,accum", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_trainer_step_same_with_and_without_patch(
    trl, leave_trl_unpatched, tmp_path, beta, temperature, family, accum
):
    theirs = _step(trl, tmp_path, beta, temperature, family, accum, patched=False)
    ours = _step(trl, tmp_path, beta, temperature, family, accum, patched=True)

    # the unpatched run is TRL's own loss; the patched one ran ours, once per micro-batch
    assert theirs[5] == []
    assert ours[5] == ["gjsd"] * accum

    # the same batches (same student, same seed: the same samples), with padded prompt and completion positions
    assert len(ours[3]) == len(theirs[3]) == accum
    for a, b in zip(ours[3], theirs[3]):
        for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
            assert torch.equal(a[key], b[key]), key
    masks = torch.cat([b["completion_mask"].flatten() for b in ours[3]])
    assert 0 < int(masks.sum()) < masks.numel(), "no padded completion position: the mask path is untested"
    assert not bool(torch.cat([b["prompt_mask"].flatten() for b in ours[3]]).all())

    torch.testing.assert_close(torch.tensor(ours[0]), torch.tensor(theirs[0]), **LOSS_TOL)
    torch.testing.assert_close(torch.tensor(ours[1]), torch.tensor(theirs[1]), rtol=1e-5, atol=1e-5)

    # every student parameter has a gradient in both runs, and they agree
    student_params = dict(_model(family, 1, 48).named_parameters())
    assert sorted(ours[2]) == sorted(theirs[2]) == sorted(student_params)
    for name, g in theirs[2].items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(
            ours[2][name],
            g,
            rtol=GRAD_REL_TOL,
            atol=GRAD_REL_TOL * scale,
            msg=lambda m, name=name: f"{name}: {m}",
        )

    # the teacher asks for gradients (TRL leaves it trainable) and gets none, in either run
    for teacher in (ours[4], theirs[4]):
        assert any(p.requires_grad for p in teacher.parameters())
        assert all(p.grad is None for p in teacher.parameters())
