"""Input checks shared by the functional API.  Every error names the argument, what it got and what it expects.

Checks here look at shapes, dtypes, devices and Python scalars only (no host sync), except those behind
``validate=True`` (``check_labels_in_range``, ``check_no_nan``), which read values and therefore synchronise.
"""

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LABEL_DTYPES = (torch.int64, torch.int32)


def describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str, *, min_dim: int = 1) -> torch.Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float tensor (fp32, bf16, fp16 or fp64), got {describe(x)}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got {describe(x)}")
    return x


def label_tensor(labels, logits: torch.Tensor, name: str = "labels") -> torch.Tensor:
    tensor(labels, name)
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {describe(labels)}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{name} must have the logits' leading shape {tuple(logits.shape[:-1])}, got {describe(labels)}"
        )
    same_device(logits, labels, "logits", name)
    return labels


def same_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str):
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on {name_a}'s device {a.device}, got {describe(b)}")


def positive_float(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return float(x)


def softcap_value(x) -> float:
    """``None`` (or 0) disables the softcap; otherwise a finite number > 0."""
    if x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool) and x == 0):
        return 0.0
    return positive_float(x, "softcap")


def integer(x, name: str) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {x!r}")
    if not -(2**63) <= int(x) < 2**63:
        raise ValueError(f"{name} must fit in int64 (the labels' type), got {x!r}")
    return int(x)


def unit_interval(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not (0.0 <= x <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {x!r}")
    return float(x)


def best_of(n, name: str = "n") -> float:
    if isinstance(n, bool) or not isinstance(n, numbers.Real) or not math.isfinite(n) or n < 1:
        raise ValueError(f"{name} must be a number >= 1 (Best-of-N with N >= 1), got {n!r}")
    return n


def free_to_read(x: torch.Tensor) -> bool:
    """True where reading ``x``'s values costs no device synchronisation: a CPU tensor, outside
    torch.compile tracing.  Checks that read values run there always, elsewhere only with validate=True."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def has_data(x: torch.Tensor) -> bool:
    """False for tensors whose values cannot be read (``meta``): value checks skip them, shape checks do not."""
    return x.device.type != "meta"


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels"):
    """Host-synchronising check that every non-ignored label lies in [0, vocab)."""
    if not has_data(labels):
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = labels[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}, got {value} "
            f"({int(bad.sum())} position(s) out of range)"
        )


def check_no_nan(x: torch.Tensor, name: str):
    if has_data(x) and x.is_floating_point() and bool(torch.isnan(x).any()):
        raise ValueError(
            f"{name} must not contain NaN, got {int(torch.isnan(x).sum())} NaN value(s) ({describe(x)})"
        )


def check_rows_nonempty(mask: torch.Tensor, name: str = "ref_mask"):
    """Host-synchronising check that every row of a (B, k) bool mask keeps at least one sample."""
    if not has_data(mask):
        return
    empty = ~mask.any(-1)
    if bool(empty.any()):
        row = int(empty.nonzero()[0, 0])
        raise ValueError(
            f"{name} leaves prompt {row} with no valid reference sample ({int(empty.sum())} such row(s), "
            f"{describe(mask)}); each row needs at least one True entry"
        )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, name: str = "cu_seqlens"):
    """Host-synchronising check of packed offsets: ``cu[0] = 0``, non-decreasing, ``cu[-1] = total`` rows."""
    if not has_data(cu_seqlens):
        return
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    first, last = int(cu[0]), int(cu[-1])
    steps = cu[1:] - cu[:-1]
    if first != 0 or last != total or bool((steps < 0).any()):
        bad = f", offset {int((steps < 0).nonzero()[0, 0]) + 1} decreases" if bool((steps < 0).any()) else ""
        raise ValueError(
            f"{name} must be non-decreasing offsets from 0 to the number of rows {total} "
            f"(cu[0] = 0, cu[-1] = {total}), got cu[0] = {first}, cu[-1] = {last}{bad} ({describe(cu_seqlens)})"
        )


def boolean(x, name: str) -> bool:
    """True/False (0 and 1 accepted); a string such as "False" is truthy and is rejected, not guessed."""
    if not (isinstance(x, (bool, numbers.Integral)) and x in (0, 1)):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return bool(x)
