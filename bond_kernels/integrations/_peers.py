"""What the TRL and verl drop-ins share: argument checks named after the peer's arguments, and the
patcher that swaps our functions into an installed peer (as Liger's ``apply_liger_kernel_to_*`` does).

The peers themselves are imported only by :meth:`Patcher.patch`, never at import time of this package.
"""

import importlib
import sys

import torch

from .. import _validate as V

# Label given to positions a row mask skips: the kernels treat it as their ignore_index (log-prob 0, entropy
# 0, zero gradient, the row is never read).  A peer without an ignore index (TRL) must keep -100 an error,
# so the sentinel is a value no vocabulary index takes; -2**31 still fits in 32 bits, so the Triton kernels
# see the same argument type as for -100 and compile nothing new.
SKIP = -(2**31)


def logits_arg(logits, name="logits"):
    V.float_tensor(logits, name)
    if logits.shape[-1] == 0:
        raise ValueError(
            f"{name} must have a non-empty vocabulary (last) dimension, got {V.describe(logits)}"
        )
    return logits


def index_arg(index, logits, name, *, allow_k=False):
    """``index`` (...) int, or (..., K) when ``allow_k``; returns True for the (..., K) form."""
    V.tensor(index, name)
    if index.dtype not in V.LABEL_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {V.describe(index)}")
    lead = tuple(logits.shape[:-1])
    if tuple(index.shape) == lead:
        multi = False
    elif allow_k and index.dim() == logits.dim() and tuple(index.shape[:-1]) == lead:
        multi = True
    else:
        want = f"{lead} or {lead + ('K',)}" if allow_k else f"{lead}"
        raise ValueError(
            f"{name} must have shape {want} (the logits' leading shape), got {V.describe(index)}"
        )
    V.same_device(logits, index, "logits", name)
    return multi


def mask_arg(row_mask, index, name="row_mask"):
    if row_mask is None:
        return None
    V.tensor(row_mask, name)
    if row_mask.is_floating_point() or row_mask.is_complex():
        raise TypeError(f"{name} must be a bool or integer tensor, got {V.describe(row_mask)}")
    if tuple(row_mask.shape) != tuple(index.shape):
        raise ValueError(
            f"{name} must have the index's shape {tuple(index.shape)}, got {V.describe(row_mask)}"
        )
    V.same_device(index, row_mask, "index", name)
    return row_mask != 0


def check_index_range(index, vocab, name, keep=None, *, ignore_index=None):
    """Raise if an index outside [0, vocab) would be read (where reading costs no device sync: CPU, outside
    torch.compile tracing).  On the GPU the kernels write NaN to such a row instead (no host sync)."""
    if not V.free_to_read(index) or index.numel() == 0:
        return
    bad = (index < 0) | (index >= vocab)
    if ignore_index is not None:
        bad &= index != ignore_index
    if keep is not None:
        bad &= keep
    if bool(bad.any()):
        allowed = f" or equal {ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"{name} must lie in [0, {vocab}){allowed}, got {int(index[bad].flatten()[0])} "
            f"({int(bad.sum())} position(s) out of range, {V.describe(index)})"
        )


def positive_int(x, name):
    if isinstance(x, bool) or not isinstance(x, int) or x < 1:
        raise ValueError(f"{name} must be an int >= 1, got {x!r}")
    return x


class Patcher:
    """Swaps ``replacements`` (attribute name → our function) into the peer's ``module`` and into every
    already-imported module of the peer's package that bound the same function with ``from ... import``.

    Modules of the package imported after :meth:`patch` read the name from ``module`` and so get ours too.
    :meth:`unpatch` puts the original back everywhere ours was found.  Both are idempotent.  Only the peer's
    own package is touched, never user modules (they hold whatever they imported).
    """

    def __init__(self, package, module, replacements, install_hint):
        self.package = package
        self.module = module
        self.replacements = dict(replacements)
        self.install_hint = install_hint
        self.originals = {}

    def _defining_module(self):
        try:
            return importlib.import_module(self.module)
        except ImportError as e:
            raise ImportError(
                f"bond_kernels.integrations.{self.package}.patch() needs {self.package} installed "
                f"({self.install_hint}); importing {self.module} failed: {e}"
            ) from e

    def _package_modules(self):
        prefix = self.package + "."
        for name, mod in list(sys.modules.items()):
            # The namespace, not getattr(): a lazy module (TRL's top level) would import on attribute access.
            space = (
                getattr(mod, "__dict__", None) if (name == self.package or name.startswith(prefix)) else None
            )
            if isinstance(space, dict):
                yield mod, space

    def patch(self):
        """Returns the names patched (those the installed version defines)."""
        defining = self._defining_module()
        for attr, ours in self.replacements.items():
            current = vars(defining).get(attr)
            if current is None or current is ours:
                continue
            self.originals[attr] = current
        for mod, space in self._package_modules():
            for attr, original in self.originals.items():
                if space.get(attr) is original:
                    setattr(mod, attr, self.replacements[attr])
        return sorted(self.originals)

    def unpatch(self):
        for mod, space in self._package_modules():
            for attr, original in self.originals.items():
                if space.get(attr) is self.replacements[attr]:
                    setattr(mod, attr, original)
        self.originals.clear()


def fp32_or_fp64(logits: torch.Tensor) -> torch.dtype:
    """The dtype our results come in: fp32, or fp64 for fp64 logits (the reference keeps fp64)."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32
