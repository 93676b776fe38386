"""Drop-ins for verl's per-token helpers (``verl.utils.torch_functional``), and :func:`patch` to swap them in.

::

    import bond_kernels.integrations.verl as bk_verl
    bk_verl.patch()     # in every worker process, before its engine is built; bk_verl.unpatch() restores

Each function keeps verl's signature (same names, order and defaults; ``backend`` is an extra keyword) and
runs on :func:`bond_kernels.token_logprobs`.  Checked against verl's own functions (verl 0.9.1) in
``tests/test_integrations_trl_verl.py``.

Conventions matched: ``logits`` (..., V) with any leading dims (verl passes (total_nnz, V) packed rows or
(B, T, V)); ``labels`` the logits' leading shape; no temperature argument (verl divides the logits itself
before the call).  ``logprobs_from_logits`` follows verl's CUDA path, flash-attn's cross-entropy kernel:
fp32 log-probs, a label of -100 gives 0 with zero gradient, and ``inplace_backward=True`` (verl's default)
writes the gradient into the logits buffer, **destroying the logits** — verl passes False when the same
logits also feed the entropy, and so must any caller that reads them after the backward.  verl's CPU
fallback (``logprobs_from_logits_v2``) returns the logits' dtype and raises on -100; ours returns fp32 there
too.  ``entropy_from_logits`` returns fp32 (verl's returns the logits' dtype: bf16 entropies for bf16
logits); ``entropy_from_logits_with_chunking`` returns fp32, as verl's does.  fp64 logits give fp64.

verl binds ``verl_F.entropy_from_logits`` when an engine is constructed (and may wrap it in
``torch.compile``), so :func:`patch` must run before that.
"""

import torch

from .. import _validate as V
from .. import functional as F
from . import _peers

__all__ = [
    "entropy_from_logits",
    "entropy_from_logits_with_chunking",
    "logprobs_from_logits",
    "patch",
    "unpatch",
]

# flash-attn's cross_entropy_loss default, which verl's CUDA path inherits.
IGNORE_INDEX = -100


def logprobs_from_logits(logits, labels, inplace_backward=True, *, backend="auto"):
    """``log_softmax(logits, -1).gather(-1, labels)``, verl's ``logprobs_from_logits``.

    logits: (..., V) fp32/bf16/fp16/fp64; labels: (...) int, in [0, V) or -100 (log-prob 0, zero gradient).
    inplace_backward: the backward overwrites ``logits`` with its gradient (saves one (..., V) buffer).
    Returns labels' shape, fp32 (fp64 for fp64 logits).
    """
    _peers.logits_arg(logits)
    _peers.index_arg(labels, logits, "labels")
    inplace_backward = V.boolean(inplace_backward, "inplace_backward")
    _peers.check_index_range(labels, logits.shape[-1], "labels", ignore_index=IGNORE_INDEX)
    return F.token_logprobs(
        logits, labels, ignore_index=IGNORE_INDEX, inplace=inplace_backward, backend=backend
    )


def entropy_from_logits(logits, *, backend="auto"):
    """Shannon entropy (nats) of ``softmax(logits, -1)`` per row, verl's ``entropy_from_logits``.

    logits: (..., V).  Returns ``logits.shape[:-1]``, fp32 (fp64 for fp64 logits); differentiable.
    """
    _peers.logits_arg(logits)
    labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
    _, entropy = F.token_logprobs(logits, labels, return_entropy=True, backend=backend)
    return entropy


def entropy_from_logits_with_chunking(logits, chunk_size=2048, *, backend="auto"):
    """verl's ``entropy_from_logits_with_chunking``: the same entropy (``chunk_size`` is verl's memory knob,
    an int >= 1; the kernel has nothing to tune).  logits: (N, V) in verl, any (..., V) here."""
    _peers.positive_int(chunk_size, "chunk_size")
    return entropy_from_logits(logits, backend=backend)


_PATCHER = _peers.Patcher(
    "verl",
    "verl.utils.torch_functional",
    {
        "logprobs_from_logits": logprobs_from_logits,
        "entropy_from_logits": entropy_from_logits,
        "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
    },
    install_hint="pip install verl",
)


def patch():
    """Swap our functions into the installed verl: ``verl.utils.torch_functional`` and every imported
    ``verl.*`` module that bound them by name (e.g. ``verl.workers.engine.fsdp.transformer_impl``).  Modules
    imported later read them from ``verl.utils.torch_functional`` and get ours.  Idempotent; raises
    ``ImportError`` (naming ``pip install verl``) when verl is missing.  Returns the names patched.
    """
    return _PATCHER.patch()


def unpatch():
    """Put verl's own functions back wherever :func:`patch` (or a module imported after it) left ours."""
    _PATCHER.unpatch()


def __getattr__(name):
    """J-BOND's verl pieces live in :mod:`.verl_jbond` (imported on first use)."""
    if name in ("jbond_advantages", "jbond_policy_loss", "register_jbond_loss"):
        from . import verl_jbond

        return getattr(verl_jbond, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
