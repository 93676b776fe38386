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


# The logits transform z = c·tanh(x/c)/T runs in fp32 in every kernel, which multiply by 1/T and 1/c: T and c
# are usable when they and their reciprocals are normal fp32 numbers, [2^-126, 2^126] (1e-50 rounds to 0 in
# fp32 and 1e39 to inf; 1e-40 is subnormal and 1/1e-40 overflows).  And c/T, the largest |z| a softcap
# allows, must be finite too.
FP32_SCALAR_RANGE = (2.0**-126, 2.0**126)
_RANGE_TEXT = "[2^-126, 2^126] (about [1.2e-38, 8.5e37]: it and its reciprocal must be normal fp32 numbers)"


def fp32_scalar(x, name: str) -> float:
    """A finite number > 0 that the fp32 kernels can use as a temperature or softcap (FP32_SCALAR_RANGE)."""
    x = positive_float(x, name)
    lo, hi = FP32_SCALAR_RANGE
    if not lo <= x <= hi:
        raise ValueError(f"{name} must lie in {_RANGE_TEXT}, got {x!r}")
    return x


def temperature(x, name: str = "temperature") -> float:
    return fp32_scalar(x, name)


def softcap_value(x, temperature: float = 1.0) -> float:
    """``None`` (or 0) disables the softcap; otherwise a number in FP32_SCALAR_RANGE, and softcap/temperature
    (the cap of |z|) at most 2^126.  Nothing else means "off": 1e-50 is not rounded to 0."""
    if x is None or (isinstance(x, numbers.Real) and not isinstance(x, bool) and x == 0):
        return 0.0
    c = fp32_scalar(x, "softcap")
    if c / temperature > FP32_SCALAR_RANGE[1]:
        raise ValueError(
            f"softcap / temperature must be at most 2^126 (|z| = |softcap·tanh(x/softcap)/temperature| reaches "
            f"it, and the fp32 kernels must represent it), got softcap={x!r}, temperature={temperature!r}"
        )
    return c


def transform_scalars(temperature_, softcap):
    """``(temperature, softcap)`` of the logits transform, validated together (softcap 0.0 = off)."""
    t = temperature(temperature_)
    return t, softcap_value(softcap, t)


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


def writable_once(x: torch.Tensor, name: str, flag: str = "inplace=True"):
    """Raise unless ``x`` can receive its gradient in place: every element has its own memory (an expanded,
    stride-0 or self-overlapping view would get several gradient values per element: the kernels silently
    kept one, the torch backend refused the copy), and the last dimension is contiguous (the kernels write
    rows).  Reads strides only."""
    if x.numel() <= 1:
        return  # no two elements
    dims = sorted((st, sz) for st, sz in zip(x.stride(), x.shape) if sz > 1)
    disjoint = all(st > 0 for st, _ in dims) and (
        _strides_disjoint(dims) or ((x.stride(-1) == 1 or x.shape[-1] == 1) and _rows_disjoint(x))
    )
    if not disjoint:
        raise ValueError(
            f"{name} must not be an expanded or self-overlapping view with {flag} (several of its elements "
            f"share memory, and each would be overwritten by a different gradient value), got {describe(x)}, "
            f"strides {tuple(x.stride())}; pass {name}.contiguous() (a copy) or use {flag.split('=')[0]}=False"
        )
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(
            f"{name} must have a contiguous last dimension with {flag} (the gradient is written in its place, "
            f"row by row), got {describe(x)}, strides {tuple(x.stride())}; pass {name}.contiguous() (a copy) "
            f"or use {flag.split('=')[0]}=False"
        )


def _strides_disjoint(dims) -> bool:
    """Sufficient: sorted by stride, each stride exceeds the span of all smaller dimensions."""
    span = 0
    for st, sz in dims:
        if st <= span:
            return False
        span += st * (sz - 1)
    return True


def _rows_disjoint(x: torch.Tensor) -> bool:
    """Exact for last-dimension-contiguous views: rows of length V starting at the row offsets never meet."""
    v = x.shape[-1]
    lead = x.shape[:-1]
    offsets = torch.zeros((), dtype=torch.int64)
    for size, st in zip(lead, x.stride()[:-1]):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * st).reshape(-1)
    starts = torch.sort(offsets.reshape(-1)).values
    return starts.numel() < 2 or bool(((starts[1:] - starts[:-1]) >= v).all())


def check_finite(x: torch.Tensor, name: str, what: str):
    """Host-synchronising check that ``x`` has no NaN or ±inf (``what`` says why it must be finite)."""
    if not has_data(x) or not x.is_floating_point():
        return
    bad = ~torch.isfinite(x.detach())
    if bool(bad.any()):
        pos = tuple(bad.nonzero()[0].tolist())
        value = x.detach()[pos].item()
        raise ValueError(
            f"{name} must be finite ({what}), got {value} at position {pos} ({int(bad.sum())} non-finite "
            f"value(s), {describe(x)})"
        )


def _position(shape, flat_index: int):
    pos = []
    for size in reversed(tuple(shape)):
        pos.append(flat_index % size if size else 0)
        flat_index //= size if size else 1
    return tuple(reversed(pos))


def explain_nan_rows(out: torch.Tensor, named, *, softcap: float = 0.0, which: str = "that is not ignored"):
    """After a computation whose per-row result ``out`` (...) is NaN exactly where a row has no distribution,
    raise a ValueError that names the cause; do nothing when no row is NaN.  Reads values (synchronises):
    call it where ``free_to_read`` or with ``validate=True``.

    named: ``[(name, x)]``, tensors of shape ``out.shape + (V,)`` whose rows are examined in order.  Causes,
    in that order: NaN in a row; +inf without a softcap (exp(inf − inf) is NaN; a softcap maps +inf to c);
    a row of all -inf without a softcap (no finite entry, no distribution).
    """
    if not has_data(out):
        return
    bad = torch.isnan(out.detach()).reshape(-1)
    if not bool(bad.any()):
        return
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0])
    where = _position(out.shape, first)
    for name, x in named:
        row = x.detach().reshape(-1, x.shape[-1])[first]
        nan_at = torch.isnan(row).nonzero()
        if nan_at.numel():
            raise ValueError(
                f"{name} must not contain NaN in a row {which} (NaN has no probability), got NaN at position "
                f"{where + (int(nan_at[0, 0]),)} ({count} row(s) affected, {describe(x)})"
            )
        if not softcap:
            inf_at = torch.isposinf(row).nonzero()
            if inf_at.numel():
                raise ValueError(
                    f"{name} must not contain +inf in a row {which} without a softcap (exp(+inf − +inf) is "
                    f"NaN; mask entries with -inf, or set a softcap, which maps +inf to softcap), got +inf at "
                    f"position {where + (int(inf_at[0, 0]),)} ({count} row(s) affected, {describe(x)})"
                )
            if bool(torch.isneginf(row).all()):
                raise ValueError(
                    f"{name} must have a finite entry in every row {which}, got {count} row(s) without a "
                    f"distribution, the first (all -inf) at position {where} ({describe(x)})"
                )
    names = " and ".join(n for n, _ in named)
    raise ValueError(
        f"{names} give NaN in the row at position {where} ({count} row(s)) although every entry is finite "
        f"or -inf: the fp32 computation overflowed (check temperature and softcap)"
    )
