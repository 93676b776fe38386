"""The ``BOND_KERNELS_*`` environment variables bond_kernels reads at run time: one table, one reader, one error.

Every variable is checked when the package is imported (``check_all`` runs as this module is imported, first
thing in ``bond_kernels/__init__.py`` and before torch is), and again each time the code reads it, so a value
set later is caught where it would act.  A value outside the accepted ones raises ``ValueError`` naming the
variable, the value and the accepted values; unset or empty means the default.  Values are compared exactly
(no stripping): the C++ extension reads ``BOND_KERNELS_CPU_ISA`` and ``BOND_KERNELS_HUGE_PAGES`` itself with
``getenv`` and exact comparisons, and checking them here first, at import, is what keeps a bogus value from
being ignored there.

Build-time variables (``BOND_KERNELS_BUILD_CUDA``, ``BOND_KERNELS_SANITIZE``) are setup.py's, checked there.

Imports nothing of ours and not torch: the Triton kernel layer and the package's first line may use it.
"""

import os

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
ISAS = ("generic", "avx2", "avx512")
SWITCH = ("0", "1")
LINEAR_TILE = "BOND_KERNELS_LINEAR_TILE"

# name -> (accepted values, value when unset or empty, what it does); LINEAR_TILE has its own syntax.
VARIABLES = {
    "BOND_KERNELS_BACKEND": (BACKENDS, "auto", "the backend of calls made with backend='auto' (or None)"),
    "BOND_KERNELS_CPU_ISA": (ISAS, "", "caps the instruction set of the cpu kernels (unset: the CPU's best)"),
    "BOND_KERNELS_HUGE_PAGES": (SWITCH, "1", "0 stops the huge-page advice for large cpu gradient buffers"),
    "BOND_KERNELS_AUTO_MEASURE": (SWITCH, "1", "0 stops auto from timing the two GPU quantile kernels"),
    "BOND_KERNELS_AUTOTUNE": (SWITCH, "0", "1 wraps the Triton token kernels in triton.autotune (at import)"),
    "BOND_KERNELS_FAST_TANH": (SWITCH, "0", "1 uses the one-instruction tanh.approx for softcaps on CUDA"),
    LINEAR_TILE: (None, "", "'rows,vocab' fixes the fused linear head's tile (0 = automatic)"),
}


def get(name):
    """The value of variable ``name`` (a key of ``VARIABLES``), its default when unset or empty."""
    accepted, default, _ = VARIABLES[name]
    value = os.environ.get(name, "")
    if value == "":
        return default
    if accepted is not None and value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(accepted)} (or unset), got {value!r}")
    return value


def switch(name) -> bool:
    """A ``0``/``1`` variable as a bool."""
    return get(name) == "1"


def linear_tile():
    """``BOND_KERNELS_LINEAR_TILE="rows,vocab"`` as ``(rows, vocab)``; ``(0, 0)`` (automatic) when unset."""
    spec = os.environ.get(LINEAR_TILE, "").strip()
    if not spec:
        return 0, 0
    try:
        rows, vocab = (int(s) for s in spec.split(","))
    except ValueError:
        raise ValueError(
            f"{LINEAR_TILE} must be 'rows,vocab' (integers, 0 = automatic), got {spec!r}"
        ) from None
    if rows < 0 or vocab < 0:
        raise ValueError(f"{LINEAR_TILE} must hold non-negative integers, got {spec!r}")
    return rows, vocab


def check_all():
    """Raise the first variable's error, if any holds a value it does not accept."""
    for name in VARIABLES:
        linear_tile() if name == LINEAR_TILE else get(name)


check_all()
