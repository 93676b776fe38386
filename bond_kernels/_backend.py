"""The one place where a backend is chosen (DESIGN.md section 2).

``auto`` (the default, overridable with the environment variable ``BOND_KERNELS_BACKEND``) never raises:
CUDA tensors get ``triton`` (else ``cuda``, else ``torch``); CPU tensors get ``cpu`` (else ``torch``).  When
it has to fall back it says so once through ``logging``.  An explicit backend that cannot serve the call
raises ``RuntimeError`` with the reason.
"""

import importlib.util
import logging
import os

import torch

from . import _ext

logger = logging.getLogger("bond_kernels")

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

# Which backends implement which op.  The ``torch`` backend (the reference) implements everything.
OPS = {
    "token_logprobs": ("triton", "cpu", "torch"),
    "linear_token_logprobs": ("triton", "cpu", "torch"),
    "reward_quantiles": ("cuda", "triton", "cpu", "torch"),
    "bond_sequence": ("cuda", "cpu", "torch"),
    "token_jeffreys": ("triton", "cpu", "torch"),
}

# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# Per-op overrides of the ``auto`` order.  reward_quantiles prefers the CUDA C++ kernel until a GPU run
# shows the Triton one faster (BENCHMARKS.md, "GPU: BOND objective", owed).
_AUTO_ORDER_OP = {
    ("reward_quantiles", "cuda"): ("cuda", "triton", "torch"),
    ("bond_sequence", "cuda"): ("cuda", "torch"),
}


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TRITON_REASON = {}  # memo (a dict rather than lru_cache, so torch.compile does not trace a cache wrapper)


def _triton_import_reason():
    if "reason" not in _TRITON_REASON:
        _TRITON_REASON["reason"] = _find_triton_problem()
    return _TRITON_REASON["reason"]


def _find_triton_problem():
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must not break the package
        return f"triton failed to import: {exc}"
    return None


def availability(backend: str, device_type: str):
    """``(available, reason)`` for running ``backend`` on tensors of ``device_type``."""
    if backend == "torch":
        return True, "ok"
    if backend == "cpu":
        if device_type != "cpu":
            return False, f"the cpu backend takes CPU tensors, got {device_type} tensors"
        if not _ext.has_cpu():
            return False, _ext.load()[1] if _ext.load()[0] is None else "_C was built without CPU kernels"
        return True, "ok"
    if backend == "cuda":
        if device_type != "cuda":
            return False, f"the cuda backend takes CUDA tensors, got {device_type} tensors"
        if not _ext.has_cuda():
            mod, reason = _ext.load()
            return (
                False,
                reason
                if mod is None
                else "_C was built without CUDA kernels (no nvcc or CPU-only torch at build time)",
            )
        return True, "ok"
    if backend == "triton":
        reason = _triton_import_reason()
        if reason is not None:
            return False, reason
        if device_type == "cuda":
            return True, "ok"
        if device_type == "cpu" and interpreting():
            return True, "ok (TRITON_INTERPRET=1)"
        return (
            False,
            f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {device_type} tensors",
        )
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


_warned = set()


def _say_once(key, msg):
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def resolve(op: str, backend, device: torch.device) -> str:
    """Pick the backend that runs ``op`` on tensors on ``device``.  The only place this is decided."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("BOND_KERNELS_BACKEND", "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"BOND_KERNELS_BACKEND must be one of {BACKENDS}, got {backend!r}")
    supported = OPS[op]
    dev = device.type
    if backend != "auto":
        if backend not in supported:
            raise RuntimeError(f"{op}: backend {backend!r} does not implement this op (it has {supported})")
        ok, reason = availability(backend, dev)
        if not ok:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
        return backend
    order = _AUTO_ORDER_OP.get((op, dev), _AUTO_ORDER.get(dev, ("torch",)))
    skipped = []
    for name in order:
        if name not in supported:
            continue
        ok, reason = availability(name, dev)
        if ok:
            if skipped:
                _say_once(
                    (op, dev, name),
                    f"bond_kernels: {op} on {dev} falls back to {name!r} ({'; '.join(skipped)})",
                )
            return name
        skipped.append(f"{name}: {reason}")
    return "torch"


def table():
    """{backend: {device_type: (available, reason)}} for ``bk.info()``."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = {}
    for name in BACKENDS[1:]:
        out[name] = {}
        for dev in ("cpu", "cuda"):
            if dev == "cuda" and dev not in devices:
                out[name][dev] = (False, "no CUDA device visible to torch")
            else:
                out[name][dev] = availability(name, dev)
    return out
