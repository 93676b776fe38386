"""Guarded loading of the compiled extension ``bond_kernels._C`` (C++ CPU kernels, CUDA kernels if built)."""

import functools

import torch  # noqa: F401  (must be imported first: _C links against libc10/libtorch)


@functools.lru_cache(maxsize=None)
def load():
    """Return ``(module or None, reason)``; never raises."""
    try:
        from . import _C
    except ImportError as exc:  # not built, or built against another torch
        return None, f"bond_kernels._C could not be imported ({exc}); build it with `pip install --no-build-isolation -e .`"
    return _C, "ok"


def has_cpu() -> bool:
    mod, _ = load()
    return mod is not None and hasattr(mod, "cpu")


def has_cuda() -> bool:
    mod, _ = load()
    return mod is not None and hasattr(mod, "cuda")


def require():
    """The ``_C`` module, or an ImportError that says why it is missing."""
    mod, reason = load()
    if mod is None:
        raise ImportError(reason)
    return mod
