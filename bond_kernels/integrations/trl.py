"""Drop-ins for TRL's per-token log-prob helpers (``trl.trainer.utils``), and :func:`patch` to swap them in.

::

    import bond_kernels.integrations.trl as bk_trl
    bk_trl.patch()      # before building the trainer; bk_trl.unpatch() restores TRL's own functions

Each function keeps TRL's signature (same names, order and defaults; ``backend`` is an extra keyword) and
TRL's semantics, and runs on :func:`bond_kernels.token_logprobs`: one read of the logits forward, one read
and one write backward, never a (..., V) fp32 copy.  Checked against TRL's own functions (trl 1.16.0) in
``tests/test_integrations_trl_verl.py``.  The fused LM head of TRL's GRPO, RLOO, DPO, KTO and SFT trainers,
``add_fused_lm_head``, is in ``integrations/trl_head.py`` (re-exported here, swapped in by :func:`patch`).

Conventions matched: ``logits`` (..., V) with any leading dims; ``index`` (...) — or (..., K) for
``selective_log_softmax``, K log-probs per position; ``temperature`` divides the logits (> 0, else
``ValueError``); ``row_mask`` (same shape as ``index``) zeroes the log-prob (and entropy) where it is 0, with
zero gradient there, and such rows are not read; entropies are in nats.  TRL has no ignore index: every
unmasked index must lie in [0, V) (checked on CPU tensors; -100 is an error, as in TRL).

Deliberate difference: results are **fp32** (fp64 for fp64 logits) whatever the logits' dtype.  TRL's own
Triton kernel (its path on CUDA/XPU for 1- to 3-D logits) also returns fp32; its eager fallback returns the
logits' dtype (bf16 log-probs for bf16 logits, which round a log-prob of -10 to a multiple of 0.0625).  Every
caller in TRL combines these tensors in arithmetic, where fp32 promotes as it does on TRL's GPU path.
``chunk_size`` of :func:`entropy_from_logits` is accepted and checked but has nothing to tune: the kernel
never holds more than a block of a row.
"""

import torch

from .. import _validate as V
from .. import functional as F
from . import _peers
from .trl_head import add_fused_lm_head

__all__ = [
    "add_fused_lm_head",
    "chunked_divergence_loss",
    "entropy_from_logits",
    "patch",
    "selective_log_softmax",
    "selective_log_softmax_and_entropy",
    "unpatch",
]


def _labels(index, keep):
    """The kernels' labels: ``index`` where the row is kept, the skip sentinel elsewhere."""
    if keep is None:
        return index
    return torch.where(keep, index, torch.full_like(index, _peers.SKIP))


def selective_log_softmax(logits, index, temperature=1.0, row_mask=None, *, backend="auto"):
    """``log_softmax(logits / temperature, -1).gather(-1, index)``, TRL's ``selective_log_softmax``.

    logits: (..., V) fp32/bf16/fp16/fp64; index: (...) int (one label per position) or (..., K) int (K labels
    per position, e.g. top-K); row_mask: None or index's shape, bool/int, 0 = skipped (log-prob 0).
    Returns index's shape, fp32 (fp64 for fp64 logits); differentiable with respect to ``logits``.
    """
    _peers.logits_arg(logits)
    multi = _peers.index_arg(index, logits, "index", allow_k=True)
    temperature = V.temperature(temperature)
    keep = _peers.mask_arg(row_mask, index)
    vocab = logits.shape[-1]
    _peers.check_index_range(index, vocab, "index", keep)
    if not multi:
        return F.token_logprobs(
            logits, _labels(index, keep), temperature=temperature, ignore_index=_peers.SKIP, backend=backend
        )
    if index.shape[-1] == 0:
        return logits.new_zeros(index.shape, dtype=_peers.fp32_or_fp64(logits)) + logits.sum() * 0
    out = _MultiIndexLogprobs.apply(
        logits, index, None if keep is None else keep.any(-1), temperature, backend
    )
    return out if keep is None else out.masked_fill(~keep, 0.0)


class _MultiIndexLogprobs(torch.autograd.Function):
    """K log-probs per row from one sweep of the logits forward and one read + one write backward.

    The kernel gives ``log p(first) = z_0 - lse``; the others are ``z_k - lse`` with ``z = logits / T``
    gathered in fp32 (fp64).  The backward is the kernel's gradient-in-forward sweep with the row's summed
    upstream gradient, ``-Σg · p`` (+ ``Σg`` at the first label), after which the K gathered columns are
    overwritten with their exact value ``(Σ_{j: y_j = y} g_j - Σg · p_y) / T``: adding a separate correction
    to the kernel's rounded gradient would cancel (fp16/bf16 lose the small result to the large terms).
    """

    @staticmethod
    def forward(ctx, logits, index, row_keep, temperature, backend):
        labels = _labels(index[..., 0], row_keep)
        logp0 = F.token_logprobs(
            logits, labels, temperature=temperature, ignore_index=_peers.SKIP, backend=backend
        )
        z = logits.gather(-1, index.to(torch.int64)).to(logp0.dtype) / temperature
        lse = z[..., 0] - logp0
        if row_keep is not None:  # skipped rows have no lse: keep exp(z - lse) finite there
            lse = torch.where(row_keep, lse, z[..., 0])
        ctx.save_for_backward(logits, index, labels, z, lse, row_keep)
        ctx.options = (temperature, backend)
        out = z - lse.unsqueeze(-1)
        return out if row_keep is None else out.masked_fill(~row_keep.unsqueeze(-1), 0.0)

    @staticmethod
    def backward(ctx, grad_out):
        logits, index, labels, z, lse, row_keep = ctx.saved_tensors
        temperature, backend = ctx.options
        g = grad_out.to(z.dtype)
        g_sum = g.sum(-1)
        _, grad = F.token_logprobs_and_grad(
            logits, labels, g_sum, temperature=temperature, ignore_index=_peers.SKIP, backend=backend
        )
        same = (index.unsqueeze(-1) == index.unsqueeze(-2)).to(g.dtype)  # (..., K, K): repeated labels
        exact = (same @ g.unsqueeze(-1)).squeeze(-1) - g_sum.unsqueeze(-1) * torch.exp(z - lse.unsqueeze(-1))
        exact = exact / temperature
        if row_keep is not None:
            exact = exact.masked_fill(~row_keep.unsqueeze(-1), 0.0)
        grad.scatter_(-1, index.to(torch.int64), exact.to(grad.dtype))
        return grad, None, None, None, None


def entropy_from_logits(logits, chunk_size=128, *, backend="auto"):
    """Shannon entropy (nats) of ``softmax(logits, -1)`` per row, TRL's ``entropy_from_logits``.

    logits: (..., V); chunk_size: an int >= 1 (TRL's memory knob; nothing to tune here).
    Returns ``logits.shape[:-1]``, fp32 (fp64 for fp64 logits); differentiable.
    """
    _peers.logits_arg(logits)
    _peers.positive_int(chunk_size, "chunk_size")
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = F.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    return entropy


def selective_log_softmax_and_entropy(
    logits, index, entropy_requires_grad=True, temperature=1.0, row_mask=None, *, backend="auto"
):
    """Log-probs of ``index`` and entropies of ``softmax(logits / temperature)`` in one sweep, TRL's
    ``selective_log_softmax_and_entropy``.

    logits: (..., V); index: (...) int; row_mask: None or index's shape (0 = skipped: both outputs 0).
    entropy_requires_grad: False returns the entropy detached (no gradient flows through it).
    Returns ``(logprobs, entropy)``, index's shape each, fp32 (fp64 for fp64 logits).
    """
    _peers.logits_arg(logits)
    _peers.index_arg(index, logits, "index")
    entropy_requires_grad = V.boolean(entropy_requires_grad, "entropy_requires_grad")
    temperature = V.temperature(temperature)
    keep = _peers.mask_arg(row_mask, index)
    _peers.check_index_range(index, logits.shape[-1], "index", keep)
    logp, entropy = F.token_logprobs(
        logits,
        _labels(index, keep),
        temperature=temperature,
        ignore_index=_peers.SKIP,
        return_entropy=True,
        backend=backend,
    )
    return logp, entropy if entropy_requires_grad else entropy.detach()


# --------------------------------------------------------------------------------------------------------
# distillation loss
# --------------------------------------------------------------------------------------------------------
# TRL's DistillationTrainer computes its loss in trl.trainer.distillation_trainer._chunked_divergence_loss
# (chunked, Triton tiles on a GPU); ours has its signature and conventions and runs linear_token_jeffreys.


def chunked_divergence_loss(
    student_hidden_states,
    teacher_hidden_states,
    student_lm_head_weight,
    teacher_lm_head_weight,
    completion_mask,
    beta,
    num_items_in_batch=None,
    student_lm_head_bias=None,
    teacher_lm_head_bias=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_final_logit_softcapping=None,
    teacher_final_logit_softcapping=None,
    temperature=1.0,
):
    """TRL's DistillationTrainer loss (``trl.trainer.distillation_trainer._chunked_divergence_loss``'s signature
    and conventions) through :func:`bond_kernels.linear_token_jeffreys` with ``divergence="gjsd"``.

    student/teacher hidden states (B, K, H_s) / (B, K, H_t) aligned to the completion tokens, the two LM head
    weights (V, H) (+ biases), completion_mask (B, K) (1 = in the loss), beta (0 forward KL(t‖s), 1 reverse
    KL(s‖t), else the generalised JSD), logit scales (multiplying the logits, before the softcaps), softcaps and
    temperature.  Returns ``(loss, entropy_sum, n_valid)``: the divergence summed over valid tokens divided by
    ``num_items_in_batch`` (or by the valid count, at least 1), the student's entropy summed over valid tokens
    (no gradient), and the valid count.  Neither model's logits are materialised; the teacher receives no
    gradient (pass detached tensors or a frozen teacher head).
    """
    import torch

    from .. import linear_token_jeffreys

    def plain(t):
        # FSDP2 shards lm_head.weight as a DTensor: one gather for the whole call, in the hidden dtype
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    w_s, w_t = plain(student_lm_head_weight), plain(teacher_lm_head_weight)
    b_s = None if student_lm_head_bias is None else plain(student_lm_head_bias)
    b_t = None if teacher_lm_head_bias is None else plain(teacher_lm_head_bias)
    w_s, w_t = w_s.to(student_hidden_states.dtype), w_t.to(teacher_hidden_states.dtype)
    h_s, h_t = student_hidden_states, teacher_hidden_states
    # a logit scale s multiplies h·Wᵀ + b: fold it into the hidden state (N·H values) and the bias (V),
    # never into a copy of the (V, H) weight
    if student_logit_scale != 1.0:
        h_s = h_s * student_logit_scale
        b_s = None if b_s is None else b_s * student_logit_scale
    if teacher_logit_scale != 1.0:
        h_t = h_t * teacher_logit_scale
        b_t = None if b_t is None else b_t * teacher_logit_scale
    valid = completion_mask != 0
    div, ent = linear_token_jeffreys(
        h_s,
        w_s,
        h_t.detach(),
        w_t.detach(),
        bias=b_s,
        teacher_bias=None if b_t is None else b_t.detach(),
        beta=float(beta),
        divergence="gjsd",
        temperature=float(temperature),
        softcap=student_final_logit_softcapping,
        teacher_softcap=teacher_final_logit_softcapping,
        ignore_mask=~valid,
        return_entropy=True,
    )
    n_valid = valid.sum()
    loss = div.sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, ent.sum(), n_valid


# --------------------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------------------
_PATCHER = _peers.Patcher(
    "trl",
    "trl.trainer.utils",
    {
        "selective_log_softmax": selective_log_softmax,
        "entropy_from_logits": entropy_from_logits,
        "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
        # the fused head of the GRPO, RLOO, DPO, KTO and SFT trainers (integrations/trl_head.py)
        "add_fused_lm_head": add_fused_lm_head,
    },
    install_hint="pip install trl",
)
# The DistillationTrainer's loss lives in its own module (importing it imports the trainer stack).
_LOSS_PATCHER = _peers.Patcher(
    "trl",
    "trl.trainer.distillation_trainer",
    {"_chunked_divergence_loss": chunked_divergence_loss},
    install_hint="pip install trl",
)


def patch():
    """Swap our functions into the installed TRL: ``trl.trainer.utils`` (and the DistillationTrainer's
    ``_chunked_divergence_loss`` in ``trl.trainer.distillation_trainer``) and every imported ``trl.*`` module
    that bound them by name (e.g. ``trl.experimental.orpo.orpo_trainer.selective_log_softmax``, or
    ``add_fused_lm_head`` in ``trl.trainer.grpo_trainer``, ``rloo_trainer``, ``dpo_trainer``, ``kto_trainer``,
    ``sft_trainer`` and ``trl.experimental.async_grpo``: the trainers' fused head then runs ours).  Modules
    imported later read them from ``trl.trainer.utils`` and get ours.  Idempotent; raises ``ImportError``
    (naming ``pip install trl``) when TRL is missing.  Returns the names patched.

    Call it before the trainer is built (the trainer patches its model's forward in ``__init__``; a model
    patched before keeps that forward): code outside TRL that already did ``from trl.trainer.utils import
    selective_log_softmax`` keeps the function it imported.
    """
    return _PATCHER.patch() + _LOSS_PATCHER.patch()


def unpatch():
    """Put TRL's own functions back wherever :func:`patch` (or a module imported after it) left ours."""
    _PATCHER.unpatch()
    _LOSS_PATCHER.unpatch()


def __getattr__(name):
    """``JBondConfig`` / ``JBondTrainer`` live in :mod:`.trl_jbond`, imported (with trl) on first use."""
    if name in ("JBondConfig", "JBondTrainer"):
        from . import trl_jbond

        return getattr(trl_jbond, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
