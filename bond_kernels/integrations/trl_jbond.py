"""J-BOND on TRL: :class:`JBondConfig` and :class:`JBondTrainer`, a ``trl.GRPOTrainer`` with J-BOND's sampling,
reward and loss.  Import it as ``bond_kernels.integrations.trl.JBondTrainer`` (this module needs trl 1.16).

::

    from bond_kernels.integrations.trl import JBondConfig, JBondTrainer

    args = JBondConfig(output_dir="out", per_device_train_batch_size=6, max_completion_length=32)
    trainer = JBondTrainer(model=model, reward_funcs=my_reward, args=args, train_dataset=prompts)
    trainer.train()

Per prompt and optimiser step (the paper's Algorithm 2):

1. GRPO's sampler repeats each prompt ``num_generations = 3`` times, consecutively, and gives each process whole
   groups.  For each group the trainer samples **one** completion ``y`` from the policy and **two** ``y'_1,
   y'_2`` from the anchor (``trainer.anchor_model``), all with Hugging Face ``generate`` and the trainer's
   generation config, and scores the three with the reward functions (TRL's own reward path: weights,
   extra dataset columns, reward models).
2. ``bond_kernels.jbond_loss`` over the *global* batch (every process's prompts, gathered): the J-BOND reward
   ``r_J = −penalty`` when ``r(y) < min(r(y'_1), r(y'_2))`` (``<=`` with ``strict=False``), the return
   ``R = r_J − (log π(y) − log π_anchor(y))`` with the leave-one-out baseline over all prompts of the step, the
   forward term ``−log π(y'_best)`` on the better anchor sample (ties to the first), and the γ term that lowers
   ``KL(π‖π_anchor)``.  Sequence log-probs come from :func:`bond_kernels.integrations.transformers.sequence_logprobs`
   (the fused head: the logits are never formed).  Each micro-batch holds whole prompts; its rows of the global
   loss carry the gradient, and the loss is scaled so that gradient accumulation and data parallelism give the
   gradient of the one global mean.
3. After each optimiser step the anchor moves: ``θ_anchor ← (1 − η)·θ_anchor + η·θ`` (:class:`bond_kernels.EMAAnchor`,
   one fused lerp over every parameter and buffer).

Config: ``jbond_beta`` (β, the backward term's weight; ``1 − β`` goes to the forward term), ``jbond_gamma``
(γ ≥ 0), ``anchor_eta`` (η in (0, 1]), ``penalty`` (log 16) and ``strict``.  GRPO's own ``beta`` must stay 0
(no reference model is loaded; the γ term is J-BOND's KL regulariser).  ``num_iterations`` must be 1 (J-BOND is
on-policy) and ``steps_per_generation`` equal to ``gradient_accumulation_steps`` (one generation batch per step).

The anchor starts as a copy of the policy (or ``anchor_model=``, same architecture) and is written to
``anchor_model.pt`` in every checkpoint; ``train(resume_from_checkpoint=...)`` restores it.

Not supported (refused with a ``ValueError`` naming the argument): vLLM and transformers' continuous batching
(the two anchor samples need a second model in the generation engine), PEFT (the anchor would need its own
adapter), tools, ``rollout_func`` and environments.  DeepSpeed ZeRO-3 / FSDP shard the policy's parameters;
the EMA update and the anchor's generation assume each process holds full parameters (plain DDP).

Logged per step (``jbond/`` prefix): ``reward`` (mean task reward of the policy samples), ``anchor_reward``,
``quantile`` (mean fraction of the two anchor samples the policy sample beats or ties), ``jbond_reward`` (mean
``r_J``), ``penalised_frac``, ``kl_to_anchor`` (mean ``log π(y) − log π_anchor(y)``) and ``forward_ce`` (mean
``−log π(y'_best)``).
"""

import copy
import dataclasses
import math
import os

import torch

try:
    import trl
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"JBondConfig / JBondTrainer need trl 1.16 (pip install trl): {exc}") from exc
from transformers import TrainerCallback
from trl.data_utils import is_conversational
from trl.models import unwrap_model_for_generation

from .. import objectives
from ..modules import EMAAnchor
from ..reference.losses import LOG16
from .transformers import sequence_logprobs

__all__ = ["JBondConfig", "JBondTrainer"]

ANCHOR_FILE = "anchor_model.pt"
GROUP = 3  # one policy sample and two anchor samples per prompt


@dataclasses.dataclass
class JBondConfig(trl.GRPOConfig):
    """``trl.GRPOConfig`` with J-BOND's parameters (see the module docstring).

    jbond_beta: β in [0, 1]; jbond_gamma: γ ≥ 0; anchor_eta: η in (0, 1]; penalty: the J-BOND penalty ≥ 0
    (log 16); strict: ``r(y) < min`` (True) or ``<=`` (False).  ``num_generations`` defaults to (and must be) 3;
    ``per_device_train_batch_size`` counts completions, as in GRPO, and must be a multiple of 3.
    """

    num_generations: int | None = dataclasses.field(
        default=GROUP, metadata={"help": "Completions per prompt: 1 policy + 2 anchor samples; must be 3."}
    )
    jbond_beta: float = dataclasses.field(
        default=0.5, metadata={"help": "Weight β in [0, 1] of the backward term."}
    )
    jbond_gamma: float = dataclasses.field(
        default=0.0, metadata={"help": "Weight γ >= 0 of the KL-to-anchor term."}
    )
    anchor_eta: float = dataclasses.field(
        default=0.02, metadata={"help": "EMA rate η in (0, 1] of the anchor."}
    )
    penalty: float = dataclasses.field(default=LOG16, metadata={"help": "J-BOND penalty (log 16)."})
    strict: bool = dataclasses.field(
        default=True, metadata={"help": "Penalise r(y) < min (True) or <= (False)."}
    )

    def __post_init__(self):
        _check_config(self)
        super().__post_init__()
        if self.steps_per_generation != self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation (or generation_batch_size) must give one generation batch per optimiser "
                f"step for J-BOND: steps_per_generation must equal gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}), got {self.steps_per_generation}"
            )


def _number(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_config(cfg):
    if cfg.num_generations != GROUP:
        raise ValueError(
            f"num_generations must be 3 for J-BOND (one policy sample and two anchor samples per prompt), got "
            f"{cfg.num_generations!r}"
        )
    if not isinstance(cfg.per_device_train_batch_size, int) or cfg.per_device_train_batch_size % GROUP:
        raise ValueError(
            f"per_device_train_batch_size counts completions and must be a multiple of 3 so that no prompt's "
            f"group of 3 is split across processes or micro-batches, got {cfg.per_device_train_batch_size!r}"
        )
    if cfg.num_iterations != 1:
        raise ValueError(f"num_iterations must be 1 (J-BOND is on-policy), got {cfg.num_iterations!r}")
    beta = _number(cfg.jbond_beta, "jbond_beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jbond_beta must lie in [0, 1], got {cfg.jbond_beta!r}")
    if not _number(cfg.jbond_gamma, "jbond_gamma") >= 0.0:
        raise ValueError(f"jbond_gamma must be >= 0, got {cfg.jbond_gamma!r}")
    eta = _number(cfg.anchor_eta, "anchor_eta")
    if not 0.0 < eta <= 1.0:
        raise ValueError(f"anchor_eta must lie in (0, 1], got {cfg.anchor_eta!r}")
    if not _number(cfg.penalty, "penalty") >= 0.0:
        raise ValueError(f"penalty must be >= 0, got {cfg.penalty!r}")
    if not isinstance(cfg.strict, bool):
        raise ValueError(f"strict must be a bool, got {cfg.strict!r}")
    if cfg.beta != 0.0:
        raise ValueError(
            f"beta (GRPO's KL coefficient) must be 0 for J-BOND, whose KL term is jbond_gamma (towards the EMA "
            f"anchor), got {cfg.beta!r}"
        )
    if cfg.use_vllm:
        raise ValueError(
            "use_vllm must be False: JBondTrainer samples the policy and the anchor with transformers' generate "
            "(vLLM would need the anchor's weights in a second engine)"
        )
    if cfg.use_transformers_continuous_batching or cfg.use_transformers_paged:
        raise ValueError(
            "use_transformers_continuous_batching must be False: JBondTrainer uses plain generate"
        )


class _AnchorStep(TrainerCallback):
    """Moves the anchor after every optimiser step (before the gradients are zeroed)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._ema.update(self.trainer.model)


def _pad(rows, value, side, device):
    """(n, L) tensor of the int lists ``rows``, padded with ``value`` on ``side``; and the 0/1 mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def _sequences(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """input_ids, attention_mask, labels (-100 off the completion) and position_ids of prompt + completion."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    mask = torch.cat([prompt_mask, completion_mask], 1)
    labels = torch.cat(
        [torch.full_like(prompt_ids, -100), completion_ids.masked_fill(completion_mask == 0, -100)], 1
    )
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return ids, mask, labels, positions


class JBondTrainer(trl.GRPOTrainer):
    """``trl.GRPOTrainer`` running J-BOND (see the module docstring).

    model, reward_funcs, args (a :class:`JBondConfig`) positionally or by name; train_dataset, processing_class,
    callbacks, ... by name, as in GRPOTrainer; anchor_model: the anchor's initial weights (same architecture as
    the policy), default a copy of the policy.  ``trainer.anchor_model`` is the anchor (no gradient, eval mode).
    Evaluation (``eval_dataset``) runs the same sampling and returns the J-BOND loss; it is not tested here.
    """

    _tag_names = ["trl", "jbond", "bond_kernels"]
    loss_is_scaled_for_ga = True  # compute_loss returns the micro-batch's share (see there)

    def __init__(self, model, reward_funcs=None, args=None, *, anchor_model=None, **kwargs):
        if not isinstance(args, JBondConfig):
            raise TypeError(f"args must be a JBondConfig, got {type(args).__name__}")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name} is not supported by JBondTrainer, got {type(kwargs[name]).__name__}"
                )
        if kwargs.get("peft_config") is not None or _is_peft(model):
            raise ValueError(
                "peft_config / a PEFT model is not supported by JBondTrainer: the anchor is a full EMA copy of the "
                "policy's weights and has no adapter of its own; merge the adapter or train the full model"
            )
        if anchor_model is not None and not isinstance(anchor_model, torch.nn.Module):
            raise TypeError(
                f"anchor_model must be a torch.nn.Module or None, got {type(anchor_model).__name__}"
            )
        # Copy before GRPOTrainer wraps the policy's forward (add_fused_lm_head): a copy taken after it would
        # keep a closure over the *policy's* original forward and generate from the policy's weights.
        if anchor_model is None and isinstance(model, torch.nn.Module):
            anchor_model = copy.deepcopy(model)
        super().__init__(model, reward_funcs, args, **kwargs)
        if anchor_model is None:
            anchor_model = copy.deepcopy(self.model)
        # whichever way it was built, the anchor runs its own class's forward on its own weights
        anchor_model.__dict__.pop("forward", None)
        self.anchor_model = anchor_model.to(self.accelerator.device).eval()
        self._ema = EMAAnchor(self.anchor_model, eta=args.anchor_eta)
        self._ema._pairs(self.model)  # same parameter names and shapes, checked before any step
        self._jbond = None  # the step's global tensors (see _generate_and_score_completions)
        self.add_callback(_AnchorStep(self))

    # ---------------------------------------------------------------------------------------------- sampling
    def _sample(self, model, prompt_ids, prompt_mask):
        """Completion token lists (cut after the first EOS) sampled from ``model``."""
        with torch.no_grad():
            out = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.generation_config
            )
        completion = out[:, prompt_ids.shape[1] :].tolist()
        eos = set(self.eos_token_ids)
        rows = []
        for c in completion:
            end = next((i + 1 for i, t in enumerate(c) if t in eos), len(c))
            rows.append(c[:end])
        return rows

    def _logp(self, model, prompt_ids, prompt_mask, rows):
        ids, mask = _pad(rows, self._tokenizer.pad_token_id, "right", prompt_ids.device)
        ids, mask, labels, pos = _sequences(prompt_ids, prompt_mask, ids, mask)
        return sequence_logprobs(
            model, ids, mask, labels, temperature=self.temperature, position_ids=pos
        ).sequence_logprobs

    def _generate_and_score_completions(self, inputs):
        device = self.accelerator.device
        mode = "train" if self.model.training else "eval"
        if len(inputs) % GROUP:
            raise ValueError(
                f"the local batch must hold whole groups of 3 completions, got {len(inputs)} rows"
            )
        prompts = [x["prompt"] for x in inputs[::GROUP]]
        if any(
            x["prompt"] != p for j, p in enumerate(prompts) for x in inputs[GROUP * j : GROUP * j + GROUP]
        ):
            raise ValueError(
                "a prompt's group of 3 completions was split: the sampler must repeat each prompt 3 times"
            )
        prompt_lists, _, _ = self._tokenize_prompts(prompts)
        p_ids, p_mask = _pad(prompt_lists, self._tokenizer.pad_token_id, "left", device)
        b = len(prompts)
        policy = self.accelerator.unwrap_model(self.model_wrapped)
        with unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation
        ) as gen_model:
            y = self._sample(gen_model, p_ids, p_mask)
        pa_ids, pa_mask = p_ids.repeat_interleave(2, 0), p_mask.repeat_interleave(2, 0)
        y_anchor = self._sample(self.anchor_model, pa_ids, pa_mask)
        rows = [r for j in range(b) for r in (y[j], y_anchor[2 * j], y_anchor[2 * j + 1])]
        texts = self.processing_class.batch_decode(rows, skip_special_tokens=True)
        conversational = is_conversational({"prompt": prompts[0]})
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        rewards = self._rewards(inputs, [x["prompt"] for x in inputs], completions, rows)  # (B_global, 3)
        n_before = self.accelerator.process_index * b
        local = rewards[n_before : n_before + b]
        second = local[:, 2] > local[:, 1]  # ties go to the first anchor sample
        y_best = [y_anchor[2 * j + int(second[j])] for j in range(b)]
        with torch.no_grad():
            pol = self._logp(policy, p_ids, p_mask, y)
            best = self._logp(policy, p_ids, p_mask, y_best)
            anc = self._logp(self.anchor_model, p_ids, p_mask, y)
        gathered = self.accelerator.gather(torch.stack([pol, best, anc]).T.contiguous())  # (B_global, 3)
        g = dict(
            policy_logp=gathered[:, 0],
            best_logp=gathered[:, 1],
            anchor_logp=gathered[:, 2],
            policy_rewards=rewards[:, 0].contiguous(),
            anchor_rewards=rewards[:, 1:].contiguous(),
        )
        self._jbond = g
        self._log_step(mode, self._loss(g, g["policy_logp"], g["best_logp"]), g)
        self.state.num_input_tokens_seen += int(
            self.accelerator.gather(
                torch.tensor([int(p_mask.sum()) * GROUP + sum(len(r) for r in rows)], device=device)
            ).sum()
        )
        c_ids, c_mask = _pad(y, self._tokenizer.pad_token_id, "right", device)
        cb_ids, cb_mask = _pad(y_best, self._tokenizer.pad_token_id, "right", device)
        return {
            "prompt_ids": p_ids,
            "prompt_mask": p_mask,
            "completion_ids": c_ids,
            "completion_mask": c_mask,
            "best_ids": cb_ids,
            "best_mask": cb_mask,
            "row_index": torch.arange(n_before, n_before + b, device=device),
        }

    def _rewards(self, inputs, prompts, completions, rows):
        per_func = self._calculate_rewards(inputs, prompts, completions, rows)  # (N_global, F), gathered
        bad = torch.isnan(per_func)
        if bool(bad.any()):
            row, func = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"reward_funcs: {self.reward_func_names[func]!r} returned NaN (or None) for completion {row} of the "
                f"global batch; J-BOND needs a reward for every completion"
            )
        weights = self.reward_weights.to(per_func.device)
        return (per_func * weights.unsqueeze(0)).sum(1).view(-1, GROUP)

    def _loss(self, g, policy_logp, best_logp):
        a = self.args
        return objectives.jbond_loss(
            policy_logp,
            g["anchor_logp"],
            g["policy_rewards"],
            g["anchor_rewards"],
            best_logp,
            beta=a.jbond_beta,
            gamma=a.jbond_gamma,
            penalty=a.penalty,
            strict=a.strict,
        )

    def _log_step(self, mode, out, g):
        from .. import functional

        p_le, _ = functional.reward_quantiles(g["policy_rewards"].unsqueeze(1), g["anchor_rewards"])
        m = self._metrics[mode]
        m["jbond/reward"].append(g["policy_rewards"].mean().item())
        m["jbond/anchor_reward"].append(g["anchor_rewards"].mean().item())
        m["jbond/quantile"].append(p_le.mean().item())
        m["jbond/jbond_reward"].append(out.reward_mean.item())
        m["jbond/penalised_frac"].append(out.penalised_frac.item())
        m["jbond/kl_to_anchor"].append(out.kl_to_anchor.item())
        m["jbond/forward_ce"].append(out.forward_ce.item())

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % steps == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            b = batch["row_index"].shape[0]
            per = b // steps  # whole prompts per micro-batch (per_device_train_batch_size / 3)
            self._buffered_inputs = [
                {k: v[i * per : (i + 1) * per] for k, v in batch.items()} for i in range(steps)
            ]
        return self._buffered_inputs[self._step % steps]

    # ---------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("return_outputs must be False: JBondTrainer returns only the loss")
        p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        b = p_ids.shape[0]
        width = max(inputs["completion_ids"].shape[1], inputs["best_ids"].shape[1])

        def right(t):
            return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)

        c_ids = torch.cat([right(inputs["completion_ids"]), right(inputs["best_ids"])])
        c_mask = torch.cat([right(inputs["completion_mask"]), right(inputs["best_mask"])])
        ids, mask, labels, pos = _sequences(p_ids.repeat(2, 1), p_mask.repeat(2, 1), c_ids, c_mask)
        logp = self._fused_forward(model, ids, mask, labels, pos)
        g, idx = self._jbond, inputs["row_index"]
        policy_logp = torch.index_put(g["policy_logp"], (idx,), logp[:b])  # gradient only through our rows
        best_logp = torch.index_put(g["best_logp"], (idx,), logp[b:])
        loss = self._loss(g, policy_logp, best_logp).loss
        if not self.model.training:
            return loss.detach()
        # Each micro-batch's rows of the one global loss carry its gradient; DDP averages over processes, so
        # the gradients scaled by the process count sum to the global loss's.  The value returned is the loss
        # over the accumulation steps (loss_is_scaled_for_ga: the Trainer does not divide again).
        steps = self.current_gradient_accumulation_steps
        return loss.detach() / steps + self.accelerator.num_processes * (loss - loss.detach())

    def _fused_forward(self, model, ids, mask, labels, pos):
        """Sequence log-probs through the fused head, computed inside the wrapper's forward (DDP/FSDP2 hooks
        run: ``integrations.transformers.sequence_logprobs`` takes the model as the Trainer wrapped it)."""
        return sequence_logprobs(
            model, ids, mask, labels, temperature=self.temperature, position_ids=pos
        ).sequence_logprobs

    # ---------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.anchor_model.state_dict(), os.path.join(folder, ANCHOR_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, ANCHOR_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"resume_from_checkpoint: {checkpoint} holds no {ANCHOR_FILE} (not written by JBondTrainer); "
                f"the anchor cannot be restored"
            )
        state = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self.anchor_model.load_state_dict(state)


def _is_peft(model):
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
