"""The one place where a backend is chosen (docs/design.md, "Backends").

``auto`` (the default, overridable with the environment variable ``BOND_KERNELS_BACKEND``) never raises:
CUDA tensors get ``triton`` (else ``cuda``, else ``torch``); CPU tensors get ``cpu`` (else ``torch``).  When
it has to fall back it says so once through ``logging``.  An explicit backend that cannot serve the call
raises ``RuntimeError`` with the reason.  Where an op has two GPU kernels (``MEASURED``), ``auto`` times
both on the first call of each shape bucket and keeps the faster (``measured``).

Three parts: the registry (``_REGISTRY``, ``impl``: which object implements an op on a backend, the only
such map in the package), the policy (``resolve`` and ``choose``: which backend serves a call, decided here
once, including fp64 inputs and the environment variable), and ``measured`` (the timed choice).
"""

import importlib
import importlib.util
import logging
import os

import torch

from . import _env, _ext

logger = logging.getLogger("bond_kernels")

BACKENDS = _env.BACKENDS

# The registry: the one map from an op and a backend to its implementation (``impl``).  Each entry names
# where the implementation lives, loaded on first use (triton and the compiled extension are imported only
# when asked for): ``_C.cpu`` / ``_C.cuda`` are the compiled submodules of ``bond_kernels._C``; any other
# entry is ``module`` or ``module:attribute``.  An implementation provides the op's launcher contract, the
# functions documented in ``ops/<op>.py`` under the same names (``token_logprobs_fwd``, ...).  The ``torch``
# implementations are that contract in plain torch on top of the reference (``reference/launchers.py``);
# the public API's own ``torch`` path calls the reference functions themselves (the spec, with autograd).
_REGISTRY = {
    "token_logprobs": {
        "triton": "bond_kernels.ops.triton.token_logprobs",
        "cpu": "_C.cpu",
        "torch": "bond_kernels.reference.launchers",
    },
    "linear_token_logprobs": {
        "triton": "bond_kernels.ops.linear_engine:TRITON",
        "cpu": "bond_kernels.ops.linear_engine:CPU",
        "torch": "bond_kernels.ops.linear_engine:TORCH",
    },
    # The fused head's optional extra statistics (ops/linear_extras.py): a per-tile fold, torch ops on the tile
    # for every backend that runs the linear engine (the tile is a torch tensor on every device).
    "linear_token_extras": {
        "triton": "bond_kernels.ops.linear_extras:TORCH_FOLD",
        "cpu": "bond_kernels.ops.linear_extras:TORCH_FOLD",
        "torch": "bond_kernels.ops.linear_extras:TORCH_FOLD",
    },
    "reward_quantiles": {
        "cuda": "_C.cuda",
        "triton": "bond_kernels.ops.triton.reward_quantiles",
        "cpu": "_C.cpu",
        "torch": "bond_kernels.reference.launchers",
    },
    "bond_sequence": {"cuda": "_C.cuda", "cpu": "_C.cpu", "torch": "bond_kernels.reference.launchers"},
    "token_jeffreys": {
        "triton": "bond_kernels.ops.triton.token_jeffreys",
        "cpu": "_C.cpu",
        "torch": "bond_kernels.reference.launchers",
    },
    # The tiled student-teacher divergence: its matmuls run in torch on every backend; the backend gives the
    # per-tile fold of the forward's statistics and the tile's Jeffreys gradient (ops/linear_token_jeffreys.py).
    "linear_token_jeffreys": {
        "triton": "bond_kernels.ops.linear_token_jeffreys:TRITON",
        "cpu": "bond_kernels.ops.linear_token_jeffreys:CPU",
        "torch": "bond_kernels.ops.linear_token_jeffreys:TORCH",
    },
}

# Which backends implement which op (derived from the registry, for messages, ``bk.info()`` and tests).
OPS = {op: tuple(entries) for op, entries in _REGISTRY.items()}
_IMPLS = {}  # memo of loaded implementations (a dict rather than lru_cache: torch.compile reads it)


def impl(op: str, backend: str):
    """The implementation of ``op`` on ``backend`` (an object with the op's launcher contract).

    Raises ``ValueError`` for an unknown op or backend name and ``RuntimeError`` with the reason when the
    backend does not implement the op or its implementation cannot be loaded: there is no fall-back here
    (``resolve`` decides which backend runs; this only finds it)."""
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {tuple(_REGISTRY)}, got {op!r}")
    key = (op, backend)
    if key in _IMPLS:
        return _IMPLS[key]
    where = _REGISTRY[op].get(backend)
    if where is None:
        if backend not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
        raise RuntimeError(f"{op}: backend {backend!r} does not implement this op (it has {OPS[op]})")
    found = _load(where, op, backend)
    _IMPLS[key] = found
    return found


def _load(where: str, op: str, backend: str):
    if where.startswith("_C."):
        mod, reason = _ext.load()
        if mod is None:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
        sub = getattr(mod, where[3:], None)
        if sub is None:
            raise RuntimeError(
                f"{op}: backend {backend!r} is unavailable: bond_kernels._C was built without {where[3:]} "
                "kernels" + (" (no nvcc or a CPU-only torch at build time)" if where == "_C.cuda" else "")
            )
        return sub
    module, _, attr = where.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {exc}") from exc
    return getattr(loaded, attr) if attr else loaded


# Preference order of ``auto`` per device type.
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}
# Per-op overrides of the ``auto`` order.  For reward_quantiles on CUDA this is only the fallback order:
# ``auto`` times both kernels (``measured``) and keeps the faster.
_AUTO_ORDER_OP = {
    ("reward_quantiles", "cuda"): ("cuda", "triton", "torch"),
    ("bond_sequence", "cuda"): ("cuda", "torch"),
}

# Ops whose ``auto`` choice on a device type is settled by timing the candidates on the caller's own inputs,
# once per shape bucket.  reward_quantiles has two GPU kernels (CUDA C++, Triton) that give bit-identical
# results; which is faster depends on the card and on (B, n, k), so it is measured where it runs.
MEASURED = {("reward_quantiles", "cuda"): ("cuda", "triton")}
# Timed calls per candidate after one warm-up call (which also compiles a Triton kernel): medians of 5.
MEASURE_ROUNDS = 5
_MEASURED_CHOICE = {}  # {(op, device, key): backend name}


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


def requested(backend) -> str:
    """What a call asks for: ``backend``, or for ``auto``/None the environment's ``BOND_KERNELS_BACKEND``."""
    if backend is None:
        backend = "auto"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = _env.get("BOND_KERNELS_BACKEND")
    return backend


def resolve(op: str, backend, device: torch.device) -> str:
    """Pick the backend that runs ``op`` on tensors on ``device``.  The only place this is decided."""
    backend = requested(backend)
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


def choose(op: str, backend, device: torch.device, *, needs_reference=None, env_may_defer=False) -> str:
    """The backend that runs one call of ``op`` on tensors on ``device``: ``resolve`` plus the call's own
    constraints.  Every public function picks its backend through here.

    needs_reference: None, or why only the reference computes this call exactly (fp64 inputs, integer
        rewards), worded to follow ``backend '<name>'``.  ``auto`` then gives ``torch``; an explicit other
        backend raises ``TypeError`` with that reason.
    env_may_defer: for ops without a ``backend`` argument (the sequence losses): a ``BOND_KERNELS_BACKEND``
        that names a backend without this op (``triton`` has no sequence kernel) leaves the call to the
        reference instead of refusing the whole loss.
    """
    wanted = requested(backend)
    if needs_reference is not None:
        if backend in (None, "auto") or wanted == "torch":
            return "torch"
        raise TypeError(f"backend {wanted!r} {needs_reference}")
    if env_may_defer and backend in (None, "auto") and wanted != "auto" and wanted not in OPS[op]:
        return "torch"
    return resolve(op, backend, device)


FP64_NEEDS_REFERENCE = "takes fp32, bf16 or fp16 inputs; fp64 runs on backend='torch', got fp64"


def fp64_reason(*tensors):
    """``needs_reference`` for float tensors: fp64 keeps fp64 end to end, which only the reference does."""
    return FP64_NEEDS_REFERENCE if any(t.dtype == torch.float64 for t in tensors) else None


def _median_ms(fn, device: torch.device, rounds: int) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on the current stream for CUDA, else perf_counter."""
    times = []
    if device.type == "cuda":
        for _ in range(rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        import time

        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def measuring_allowed() -> bool:
    """No timing inside CUDA-graph capture or torch.compile tracing, or with BOND_KERNELS_AUTO_MEASURE=0."""
    if not _env.switch("BOND_KERNELS_AUTO_MEASURE"):
        return False
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def measured(op: str, backend, device: torch.device, key, run) -> str:
    """``resolve(op, backend, device)``, except that ``auto`` on an op of ``MEASURED`` times the available
    candidates on this call's inputs (``run(name)`` runs the op with backend ``name``) the first time a
    shape bucket ``key`` is seen, and keeps the faster for that bucket.  Where timing is not allowed
    (``measuring_allowed``) an earlier measurement still serves; else the ``resolve`` order does."""
    name = resolve(op, backend, device)
    candidates = MEASURED.get((op, device.type))
    if requested(backend) != "auto" or candidates is None:
        return name
    memo_key = (op, str(device), key)
    if memo_key in _MEASURED_CHOICE:
        return _MEASURED_CHOICE[memo_key]
    live = [c for c in candidates if availability(c, device.type)[0]]
    if len(live) < 2 or not measuring_allowed():
        return name
    times = {}
    for cand in live:
        run(cand)  # warm-up: compiles, fills caches
        times[cand] = _median_ms(lambda c=cand: run(c), device, MEASURE_ROUNDS)
    best = min(live, key=lambda c: times[c])
    _MEASURED_CHOICE[memo_key] = best
    logger.debug("bond_kernels: %s on %s, bucket %s: %s (ms %s)", op, device, key, best, times)
    return best


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
