"""The demo's model: a tiny Llama built in code, an exact KV-cache sampler, sequence log-probs (through the
fused head of ``bond_kernels.integrations.transformers`` or the model's logits) and the reference's
maximum-likelihood pretraining.  transformers is imported inside the functions that need it, so importing
this module needs only torch."""

import os

import torch

import bond_kernels as bk

from .language import Grammar


def build_model(vocab, *, hidden=64, layers=2, heads=4, max_len=64):
    """A tiny ``LlamaForCausalLM`` from a config built here (nothing is downloaded)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_len,
        bos_token_id=Grammar.bos,
        eos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _cache_kw(model):
    """transformers 5.x names the KV cache argument ``cache``; 4.x calls it ``past_key_values``."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    for name in ("cache", "past_key_values"):
        value = out.get(name) if hasattr(out, "get") else None
        if value is not None:
            return value
    raise RuntimeError("the model returned no KV cache although use_cache=True")


@torch.no_grad()
def sample(model, prompts, length, *, chunk=4096):
    """Append ``length`` tokens drawn exactly from ``model`` (temperature 1, no top-k) to ``prompts`` (B, P).

    All prompts have the same length and all responses run to ``length``: no padding, no attention mask.
    The KV cache makes each new token one forward over a single position.  Returns (B, P + length) int64.
    """
    if prompts.shape[0] > chunk:  # bounds the activations of the big evaluation batches
        return torch.cat([sample(model, p, length, chunk=chunk) for p in prompts.split(chunk)])
    kw = _cache_kw(model)
    out = model(input_ids=prompts, use_cache=True)
    tokens = [prompts]
    for t in range(length):
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        nxt = torch.multinomial(probs, 1)
        tokens.append(nxt)
        if t + 1 < length:
            out = model(input_ids=nxt, use_cache=True, **{kw: _cache_of(out)})
    return torch.cat(tokens, dim=1)


def response_labels(input_ids, prompt_len):
    """Labels in the transformers convention (same shape as ``input_ids``): -100 on the prompt."""
    labels = input_ids.clone()
    labels[:, :prompt_len] = -100
    return labels


def _integration():
    try:
        from ..integrations import transformers as integ

        return integ.sequence_logprobs
    except ImportError:  # not importable here: the logits path below serves
        return None


# "auto": the fused-head integration when it imports, else the logits path; "fused" / "logits" force one.
LOGPROB_PATHS = ("auto", "fused", "logits")
_path = {"use": "auto"}


def logprob_path():
    """``"integrations.transformers"`` (fused head, no logits) or ``"logits"``: what :func:`_sequence_logprobs` runs."""
    if _path["use"] == "logits":
        return "logits"
    if _integration() is not None:
        return "integrations.transformers"
    if _path["use"] == "fused":
        raise RuntimeError("--logprobs fused: bond_kernels.integrations.transformers does not import here")
    return "logits"


def _sequence_logprobs(model, input_ids, attention_mask, labels, *, backend="auto"):
    """``log π(y)`` (B,) fp32 of the non-ignored labels, labels in the transformers convention.

    The one place the demo turns a model and token ids into sequence log-probs.  Through
    ``bond_kernels.integrations.transformers`` it runs the backbone and the fused linear head (no (B, T, V)
    logits); on the logits path the model's logits go through ``bk.sequence_logprobs``.  Either way
    ``logits[:, t]`` scores token ``t + 1``, so the labels are shifted by one.
    """
    if logprob_path() == "integrations.transformers":
        return _integration()(model, input_ids, attention_mask, labels, backend=backend).sequence_logprobs
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return bk.sequence_logprobs(logits[:, :-1], labels[:, 1:], backend=backend)


def seq_logp(model, input_ids, prompt_len, *, backend="auto"):
    mask = torch.ones_like(input_ids)
    return _sequence_logprobs(model, input_ids, mask, response_labels(input_ids, prompt_len), backend=backend)


# --------------------------------------------------------------------------------------------------------
# the reference policy
# --------------------------------------------------------------------------------------------------------
# Warm-up share of the one-cycle schedule, and the shortest run that gets one.
WARMUP_SHARE, SHORTEST_SCHEDULE = 0.1, 20


def pretrain_schedule(opt, lr, steps):
    """The reference's learning-rate schedule: one cycle (warm-up over the first tenth, then cosine decay) for
    runs of at least 20 steps, else None (a constant ``lr``).

    OneCycleLR's warm-up ends at step ``WARMUP_SHARE * steps - 1`` and it divides by that length: 10 steps
    made it 0 (ZeroDivisionError), and any run under 20 steps has a warm-up shorter than one step.
    """
    if steps < SHORTEST_SCHEDULE:
        return None
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=WARMUP_SHARE)


def pretrain_reference(model, grammar, *, steps, batch, length, lr, generator, device, progress):
    """Maximum likelihood on fresh chain samples; returns the final mean next-token cross-entropy (nats)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = pretrain_schedule(opt, lr, steps)
    model.train()
    loss_value = float("nan")
    bar = progress(range(steps), desc="pretrain π_ref", leave=False)
    for _ in bar:
        x = grammar.sample(batch, length, generator).to(device)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        loss_value = float(loss.detach())
        bar.set_postfix(nll=f"{loss_value:.3f}")
    model.eval()
    return loss_value


@torch.no_grad()
def next_token_entropy(model, grammar, *, count, length, generator, device):
    """Mean entropy (nats) of the model's next-token distribution on chain text; uniform is ``log V``."""
    x = grammar.sample(count, length, generator).to(device)
    logp = torch.log_softmax(model(input_ids=x).logits.float(), dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())
