"""Input checks shared by the functional API.  Every error names the argument, what it got and what it expects.

Checks here look at shapes, dtypes, devices and Python scalars only (no host sync), except those behind
``validate=True`` (``check_labels_in_range``, ``check_no_nan``), which read values and therefore synchronise.
"""

import enum
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


# --------------------------------------------------------------------------------------------------------
# Typed options: each is checked once, here, and passed down in this form.
# --------------------------------------------------------------------------------------------------------
class Smoothing(enum.IntEnum):
    """How the reward quantiles are smoothed (the kernels' ``mode`` argument).

    NONE: counts over the k samples; SELF: the candidate counts as one more sample that ties with it;
    EPS: ``p_le`` clamped to at least ε."""

    NONE = 0
    SELF = 1
    EPS = 2


class Baseline(enum.IntEnum):
    """The baseline subtracted from the BOND returns (the kernels' ``baseline`` argument)."""

    LOO = 0
    MEAN = 1
    NONE = 2


BASELINES = {"loo": Baseline.LOO, "mean": Baseline.MEAN, "none": Baseline.NONE}


def smoothing(x) -> tuple:
    """``(Smoothing, eps)`` from ``"none"`` (or None), ``"self"`` or a float ε in (0, 1]."""
    if x is None or x == "none":
        return Smoothing.NONE, 0.0
    if x == "self":
        return Smoothing.SELF, 0.0
    if isinstance(x, numbers.Real) and not isinstance(x, bool) and 0.0 < x <= 1.0:
        return Smoothing.EPS, float(x)
    raise ValueError(f"smoothing must be 'none', 'self' or a float in (0, 1], got {x!r}")


def non_negative(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or x < 0 or not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    return float(x)


# --------------------------------------------------------------------------------------------------------
# Argument checks of the public functions (shapes, dtypes, devices, scalars; no host sync unless named)
# --------------------------------------------------------------------------------------------------------
def token_args(logits, labels, temperature_, softcap, ignore_index, inplace=False):
    """Checks of ``token_logprobs``-like calls; returns ``(temperature, softcap, ignore_index)`` (softcap 0.0
    is off)."""
    float_tensor(logits, "logits")
    label_tensor(labels, logits)
    if logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty vocabulary (last) dimension, got {describe(logits)}")
    if inplace:
        writable_once(logits, "logits")
    t, c = transform_scalars(temperature_, softcap)
    return t, c, integer(ignore_index, "ignore_index")


def sequence_layout(logits, cu_seqlens, validate=False):
    """``cu_seqlens`` checked against the logits (None for padded (B, T, V) logits)."""
    if cu_seqlens is None:
        if logits.dim() != 3:
            raise ValueError(
                f"logits must be (B, T, V) for padded sequences (or pass cu_seqlens), got {describe(logits)}"
            )
        return None
    tensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32/int64 tensor of B+1 offsets, got {describe(cu_seqlens)}"
        )
    if logits.dim() != 2:
        raise ValueError(f"logits must be (total, V) with cu_seqlens, got {describe(logits)}")
    same_device(logits, cu_seqlens, "logits", "cu_seqlens")
    # Offsets outside [0, total] index out of bounds (or silently drop rows): check them where reading B+1
    # integers costs no device sync (CPU, outside torch.compile tracing), and everywhere with validate=True.
    if validate or free_to_read(cu_seqlens):
        check_cu_seqlens(cu_seqlens, logits.shape[0])
    return cu_seqlens


def linear_args(hidden, weight, labels, bias, temperature_, softcap, ignore_index):
    """Checks of ``linear_token_logprobs``; returns ``(temperature, softcap, ignore_index)``."""
    float_tensor(hidden, "hidden")
    float_tensor(weight, "weight")
    h = hidden.shape[-1]
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H) = (vocabulary, hidden size), got {describe(weight)}")
    if weight.shape[1] != h:
        raise ValueError(
            f"weight must have hidden's size H = {h} as its second dimension (weight is (V, H)), got {describe(weight)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must hold at least one vocabulary row, got {describe(weight)}")
    if h == 0:
        raise ValueError(f"hidden must have a non-empty hidden (last) dimension H, got {describe(hidden)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {describe(weight)}")
    same_device(hidden, weight, "hidden", "weight")
    if bias is not None:
        float_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(
                f"bias must have shape ({weight.shape[0]},), one entry per weight row, got {describe(bias)}"
            )
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {describe(bias)}")
        same_device(hidden, bias, "hidden", "bias")
    tensor(labels, "labels")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {describe(labels)}"
        )
    same_device(hidden, labels, "hidden", "labels")
    t, c = transform_scalars(temperature_, softcap)
    return t, c, integer(ignore_index, "ignore_index")


def head_args(hidden, weight, bias, name):
    """Checks of one model's (hidden, weight, bias) for the distillation ops; ``name`` is "" (student) or
    "teacher_"."""
    float_tensor(hidden, f"{name}hidden")
    float_tensor(weight, f"{name}weight")
    h = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(
            f"{name}weight must be (V, H) with {name}hidden's size H = {h} as its second dimension, "
            f"got {describe(weight)}"
        )
    if h == 0 or weight.shape[0] == 0:
        raise ValueError(
            f"{name}hidden and {name}weight must be non-empty (H ≥ 1, V ≥ 1), got {name}hidden "
            f"{describe(hidden)} and {name}weight {describe(weight)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name}weight must have {name}hidden's dtype {hidden.dtype}, got {describe(weight)}")
    same_device(hidden, weight, f"{name}hidden", f"{name}weight")
    if bias is not None:
        float_tensor(bias, f"{name}bias")
        if tuple(bias.shape) != (weight.shape[0],) or bias.dtype != weight.dtype:
            raise ValueError(
                f"{name}bias must be ({weight.shape[0]},) of {name}weight's dtype {weight.dtype}, "
                f"got {describe(bias)}"
            )
        same_device(hidden, bias, f"{name}hidden", f"{name}bias")


def jeffreys_args(policy_logits, anchor_logits, beta, temperature_, ignore_mask):
    """Checks of ``token_jeffreys``; returns ``(beta, temperature)``."""
    float_tensor(policy_logits, "policy_logits")
    float_tensor(anchor_logits, "anchor_logits")
    if tuple(anchor_logits.shape) != tuple(policy_logits.shape):
        raise ValueError(
            f"anchor_logits must have policy_logits' shape {tuple(policy_logits.shape)}, got {describe(anchor_logits)}"
        )
    same_device(policy_logits, anchor_logits, "policy_logits", "anchor_logits")
    if policy_logits.shape[-1] == 0:
        raise ValueError(
            f"policy_logits must have a non-empty vocabulary (last) dimension, got {describe(policy_logits)}"
        )
    row_mask(ignore_mask, policy_logits.shape[:-1], policy_logits)
    return unit_interval(beta, "beta"), temperature(temperature_)


def row_mask(mask, lead, like: torch.Tensor, name: str = "ignore_mask", what: str = "policy_logits"):
    """A (lead) bool mask on ``like``'s device, or None."""
    if mask is None:
        return None
    tensor(mask, name)
    if mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(lead)}, got {describe(mask)}")
    same_device(like, mask, what, name)
    return mask


def reward_tensor(x, name, *, dims=2):
    tensor(x, name)
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be a real-valued tensor, got {describe(x)}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got {describe(x)}")
    return x


def quantile_inputs(rewards, ref_rewards, ref_mask, validate, names=("rewards", "ref_rewards", "ref_mask")):
    """Checks of the reward-quantile inputs; ``validate`` adds the NaN and empty-row checks (one sync)."""
    r_name, k_name, m_name = names
    rewards = reward_tensor(rewards, r_name)
    ref_rewards = reward_tensor(ref_rewards, k_name)
    same_device(rewards, ref_rewards, r_name, k_name)
    if rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError(
            f"{k_name} must have one row per prompt like {r_name} (B = {rewards.shape[0]}), got {describe(ref_rewards)}"
        )
    if ref_rewards.shape[1] == 0:
        raise ValueError(
            f"{k_name} must hold at least one reference sample per prompt (k >= 1), got {describe(ref_rewards)}"
        )
    if ref_mask is not None:
        tensor(ref_mask, m_name)
        if ref_mask.dtype != torch.bool:
            raise TypeError(f"{m_name} must be a bool tensor, got {describe(ref_mask)}")
        if tuple(ref_mask.shape) != tuple(ref_rewards.shape):
            raise ValueError(
                f"{m_name} must have {k_name}'s shape {tuple(ref_rewards.shape)}, got {describe(ref_mask)}"
            )
        same_device(ref_rewards, ref_mask, k_name, m_name)
    if validate:
        check_no_nan(rewards, r_name)
        if ref_mask is None:
            check_no_nan(ref_rewards, k_name)
        else:
            check_no_nan(torch.where(ref_mask, ref_rewards, torch.zeros_like(ref_rewards)), k_name)
            check_rows_nonempty(ref_mask, m_name)
    return rewards, ref_rewards


def logp_tensor(x, name, shape=None, dims=None):
    float_tensor(x, name, min_dim=0)
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got {describe(x)}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {describe(x)}")
    return x


# Why validate=True rejects non-finite sequence log-probs in the losses (README, "Odd inputs").
LOGP_FINITE = (
    "a log-probability of a sampled sequence; -inf is an impossible sample and would make the loss and its "
    "gradient infinite or NaN"
)
