"""Drop-ins for TRL's per-token log-prob helpers (``trl.trainer.utils``), and :func:`patch` to swap them in.

::

    import bond_kernels.integrations.trl as bk_trl
    bk_trl.patch()      # before building the trainer; bk_trl.unpatch() restores TRL's own functions

Each function keeps TRL's signature (same names, order and defaults; ``backend`` is an extra keyword) and
TRL's semantics, and runs on :func:`bond_kernels.token_logprobs`: one read of the logits forward, one read
and one write backward, never a (..., V) fp32 copy.  Checked against TRL's own functions (trl 1.16.0) in
``tests/test_integrations_trl_verl.py``.

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

__all__ = [
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
    temperature = V.positive_float(temperature, "temperature")
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
    temperature = V.positive_float(temperature, "temperature")
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
# Reserved for the drop-in distillation loss with TRL's signature (issue 13, item 2).  When it lands, add it
# to __all__ and, if it replaces a function TRL defines, to _PATCHER's replacements below.


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
    },
    install_hint="pip install trl",
)


def patch():
    """Swap our functions into the installed TRL: ``trl.trainer.utils`` and every imported ``trl.*`` module
    that bound them by name (e.g. ``trl.experimental.orpo.orpo_trainer.selective_log_softmax``).  Modules
    imported later read them from ``trl.trainer.utils`` and get ours.  Idempotent; raises ``ImportError``
    (naming ``pip install trl``) when TRL is missing.  Returns the names patched.

    Call it before the trainer is built: code outside TRL that already did ``from trl.trainer.utils import
    selective_log_softmax`` keeps the function it imported.
    """
    return _PATCHER.patch()


def unpatch():
    """Put TRL's own functions back wherever :func:`patch` (or a module imported after it) left ours."""
    _PATCHER.unpatch()
