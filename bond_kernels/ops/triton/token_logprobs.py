"""Triton launchers for per-token log-probs: forward, backward and the gradient in forward.

Launcher contract: ``bond_kernels/ops/token_logprobs.py`` (shared with the cpu and cuda backends); the
registry (``_backend``) names this module as the ``triton`` implementation of ``token_logprobs``.  The
kernels are in ``token_logprobs_kernels.py`` (helpers, forward, backward, one-pass gradient in forward) and
``token_logprobs_two_sweep.py`` (the persistent two-sweep gradient in forward); their math, memory traffic
and indexing are described there.  Here: the launch configuration (one named helper per choice, in
``_config``), the optional autotuning wrappers (``BOND_KERNELS_AUTOTUNE=1``), and the shape checks.  No
launcher synchronises with the device.
"""

import torch
import triton

from . import _config
from .token_logprobs_kernels import (
    _token_logprobs_bwd_kernel,
    _token_logprobs_fwd_bwd_kernel,
    _token_logprobs_fwd_kernel,
)
from .token_logprobs_two_sweep import _token_logprobs_fwd_bwd_two_sweep_kernel

_LOG2E = 1.4426950408889634

# The forward's saved log-sum-exp: split, (2, N) = (row max of the capped logits w, ln Σ exp((w − max)/T)),
# so the backward's log p never rounds |x|/T (the contract in ops/token_logprobs.py, whose SPLIT_LSE names
# "triton"); the backward also reads a whole (N,) one (the linear head passes a global, whole lse).
SPLIT_LSE = True


# Reproducible by default; BOND_KERNELS_AUTOTUNE=1 tunes BLOCK × warps per V (restoring buffers the
# in-place variants overwrite, so tuning never corrupts the logits).
if _config.autotune_enabled():
    _FWD = triton.autotune(
        _config.streaming_configs(), key=["V", "HAS_SOFTCAP", "RETURN_ENTROPY", "NUM_STAGES"]
    )(_token_logprobs_fwd_kernel)
    _BWD = triton.autotune(
        _config.streaming_configs(),
        key=["V", "HAS_SOFTCAP", "HAS_GRAD_ENTROPY", "NUM_STAGES"],
        restore_value=["grad_ptr"],
    )(_token_logprobs_bwd_kernel)
    _FWD_BWD = triton.autotune(
        _config.warp_configs(), key=["V", "HAS_SOFTCAP", "BLOCK"], restore_value=["logits_ptr", "grad_ptr"]
    )(_token_logprobs_fwd_bwd_kernel)
    _FWD_BWD_2 = triton.autotune(
        _config.warp_configs(),
        key=["V", "HAS_SOFTCAP", "BLOCK", "NUM_STAGES"],
        restore_value=["logits_ptr", "grad_ptr"],
    )(_token_logprobs_fwd_bwd_two_sweep_kernel)
else:
    _FWD, _BWD, _FWD_BWD, _FWD_BWD_2 = (
        _token_logprobs_fwd_kernel,
        _token_logprobs_bwd_kernel,
        _token_logprobs_fwd_bwd_kernel,
        _token_logprobs_fwd_bwd_two_sweep_kernel,
    )


# launchers
# --------------------------------------------------------------------------------------------------------
def _layout(logits: torch.Tensor, labels: torch.Tensor):
    """(N, T, V, stride_b, stride_t) of a (N, V) or (B, T, V) view; shape checks only (no host sync)."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        got = f"dtype {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise TypeError(f"logits must be an fp32, bf16 or fp16 tensor, got {got}")
    if logits.dim() == 2:
        n, v = logits.shape
        t, stride_b, stride_t = 1, logits.stride(0), 0
    elif logits.dim() == 3:
        b, t, v = logits.shape
        n, stride_b, stride_t = b * t, logits.stride(0), logits.stride(1)
    else:
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    if v > 1 and logits.stride(-1) != 1:  # a size-1 dimension may carry any stride
        raise ValueError(
            f"logits must have a contiguous last dimension, got strides {tuple(logits.stride())}"
        )
    if v == 0:
        raise ValueError(
            f"logits must have a non-empty vocabulary (last) dimension, got shape {tuple(logits.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32) or labels.dim() != 1 or labels.numel() != n:
        raise ValueError(
            f"labels must be ({n},) int64 (or int32) for logits of shape {tuple(logits.shape)}, "
            f"got shape {tuple(labels.shape)}, dtype {labels.dtype}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels must be on the logits' device {logits.device}, got {labels.device}")
    return n, max(t, 1), v, stride_b, stride_t


def _row_vector(x: torch.Tensor, n: int, name: str) -> torch.Tensor:
    if x.numel() != n:
        raise ValueError(f"{name} must have {n} elements (one per row), got shape {tuple(x.shape)}")
    return x.reshape(n).float().contiguous()  # a no-op for the (N,) fp32 tensors the custom ops pass


def _grad_strides(grad: torch.Tensor):
    return (grad.stride(0), 0) if grad.dim() == 2 else (grad.stride(0), grad.stride(1))


def _scalars(temperature: float, softcap: float, device: torch.device) -> dict:
    """The scalar kernel arguments and the softcap's constexprs, by keyword."""
    temperature = float(temperature)
    softcap = float(softcap or 0.0)
    has_softcap = softcap != 0.0
    return dict(
        # with a softcap the kernels subtract in tanh units (see _capped): the scale carries the softcap
        scale=_LOG2E / temperature * (softcap if has_softcap else 1.0),
        inv_temp=1.0 / temperature,
        softcap=softcap,
        inv_softcap=(1.0 / softcap if has_softcap else 0.0),
        HAS_SOFTCAP=has_softcap,
        # only with a softcap: without one the flag would compile a second, identical variant
        FAST_TANH=has_softcap and _config.fast_tanh(device),
    )


def _meta(v: int, tuned_block: bool):
    """Launch keywords: the pipeline depth, and BLOCK / num_warps unless the autotuner picks them."""
    meta = {"NUM_STAGES": _config.num_stages()}
    if _config.autotune_enabled() and tuned_block:
        return meta
    block = _config.block_size(v)
    return {**meta, "BLOCK": block, "num_warps": _config.num_warps(block)}


def token_logprobs_fwd(logits, labels, temperature, softcap, ignore_index, return_entropy):
    """logits (N, V) | (B, T, V) float, labels (N,) int → (logp, lse, entropy) fp32 (N,) [entropy (0,) unless asked]."""
    n, t, v, stride_b, stride_t = _layout(logits, labels)
    f32 = dict(dtype=torch.float32, device=logits.device)
    logp = torch.empty(n, **f32)
    lse = torch.empty((2, n) if SPLIT_LSE else (n,), **f32)
    ent = torch.empty(n if return_entropy else 0, **f32)
    if n == 0:
        return logp, lse, ent
    scalars = _scalars(temperature, softcap, logits.device)
    del scalars["inv_temp"]
    _FWD[(n,)](
        logits,
        labels,
        logp,
        lse,
        ent if return_entropy else logp,
        n,
        t,
        v,
        stride_b,
        stride_t,
        ignore_index=int(ignore_index),
        RETURN_ENTROPY=bool(return_entropy),
        SPLIT_LSE=SPLIT_LSE,
        **scalars,
        **_meta(v, True),
        **_config.LAUNCH_OPTIONS,
    )
    return logp, lse, ent


def token_logprobs_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, inplace
):
    """Gradient of ``Σ g·logp + g_H·H`` wrt logits, in the logits' dtype and shape (into ``logits`` if inplace)."""
    n, t, v, stride_b, stride_t = _layout(logits, labels)
    has_grad_ent = grad_entropy is not None and grad_entropy.numel() > 0
    if has_grad_ent and (entropy is None or entropy.numel() != n):
        raise ValueError("grad_entropy needs the entropy saved by the forward (return_entropy=True)")
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return grad
    split = lse.dim() == 2  # (2, N) split, or (N,) whole: see ops/token_logprobs.py
    if split and tuple(lse.shape) != (2, n):
        raise ValueError(f"lse must be ({n},) or (2, {n}), got shape {tuple(lse.shape)}")
    lse = lse.float().contiguous() if split else _row_vector(lse, n, "lse")
    grad_logp = _row_vector(grad_logp, n, "grad_logp")
    if has_grad_ent:
        entropy = _row_vector(entropy, n, "entropy")
        grad_entropy = _row_vector(grad_entropy, n, "grad_entropy")
    else:
        entropy = grad_entropy = grad_logp  # unused pointers
    g_stride_b, g_stride_t = _grad_strides(grad)
    _BWD[(n,)](
        logits,
        labels,
        lse,
        entropy,
        grad_logp,
        grad_entropy,
        grad,
        n,
        t,
        v,
        stride_b,
        stride_t,
        g_stride_b,
        g_stride_t,
        ignore_index=int(ignore_index),
        HAS_GRAD_ENTROPY=has_grad_ent,
        SPLIT_LSE=split,
        **_scalars(temperature, softcap, logits.device),
        **_meta(v, True),
        **_config.LAUNCH_OPTIONS,
    )
    return grad


def token_logprobs_fwd_bwd(logits, labels, grad_logp, temperature, softcap, ignore_index, inplace):
    """(logp fp32 (N,), d(Σ g·logp)/d logits in the logits' dtype and shape): one read of the row when it fits
    in registers (V ≤ ``_config.SINGLE_PASS_MAX``), else two sweeps with the second read served by L2."""
    n, t, v, stride_b, stride_t = _layout(logits, labels)
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n == 0:
        return logp, grad
    grad_logp = _row_vector(grad_logp, n, "grad_logp")
    g_stride_b, g_stride_t = _grad_strides(grad)
    args = (logits, labels, grad_logp, logp, grad)
    strides = (stride_b, stride_t, g_stride_b, g_stride_t)
    scalars = _scalars(temperature, softcap, logits.device)
    if _config.single_pass(v):
        block = _config.block_size(v, cap=_config.SINGLE_PASS_MAX)
        meta = {"BLOCK": block}
        if not _config.autotune_enabled():
            meta["num_warps"] = _config.num_warps(block)
        _FWD_BWD[(n,)](
            *args, t, v, *strides, ignore_index=int(ignore_index), **scalars, **meta, **_config.LAUNCH_OPTIONS
        )
    else:
        block = _config.block_size(v, cap=_config.TWO_SWEEP_BLOCK)
        meta = {"BLOCK": block, "NUM_STAGES": _config.num_stages(two_sweep=True)}
        if not _config.autotune_enabled():
            meta["num_warps"] = _config.num_warps(block)
        programs = _config.two_sweep_programs(n, v * logits.element_size(), logits.device)
        _FWD_BWD_2[(programs,)](
            *args,
            n,
            t,
            v,
            *strides,
            ignore_index=int(ignore_index),
            **scalars,
            **meta,
            **_config.LAUNCH_OPTIONS,
        )
    return logp, grad
