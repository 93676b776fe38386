"""Guarded loading of the compiled extension ``bond_kernels._C`` (C++ CPU kernels, CUDA kernels if built)."""

import torch  # noqa: F401  (must be imported first: _C links against libc10/libtorch)

from . import _env

# Memo of ``load()``.  A plain dict, not functools.lru_cache: torch.compile reads a dict without tracing
# into (and warning about) a cache wrapper.
_LOADED = {}


def load():
    """Return ``(module or None, reason)``.  Raises only the ValueError of a bogus ``BOND_KERNELS_CPU_ISA`` or
    ``BOND_KERNELS_HUGE_PAGES`` (see ``_env``): the extension reads those two itself, with ``getenv``, and
    would ignore a value it does not know, so they are checked again here, where it is first loaded, in case
    they were set after ``import bond_kernels``."""
    result = _LOADED.get("_C")
    if result is None:
        _env.get("BOND_KERNELS_CPU_ISA")
        _env.get("BOND_KERNELS_HUGE_PAGES")
        try:
            from . import _C

            if hasattr(_C, "cpu"):
                _C.cpu._isa()  # the extension's one read of BOND_KERNELS_CPU_ISA: now, just checked
            result = (_C, "ok")
        except ImportError as exc:  # not built, or built against another torch
            result = (
                None,
                f"bond_kernels._C could not be imported ({exc}); build it with `pip install --no-build-isolation -e .`",
            )
        _LOADED["_C"] = result
    return result


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
