"""The fused head's extra per-token statistics, folded tile by tile in the engine's forward pass.

``linear_token_logprobs(..., extras=(...))`` asks for some of ``log_sum_sq_probs``, ``mean_logits`` and
``is_top1`` (the spec: ``bond_kernels.reference.linear_token_extras``).  The engine (``ops/linear_engine.py``)
hands every logits tile it computes for the log-probs to :meth:`Extras.fold` before the token kernels run
on it, so the statistics cost no extra matmul: per tile, over ``z = softcap·tanh(x/softcap)/T``,

* ``q_k = logsumexp_v 2·z``  -> combined as ``logsumexp_k q_k``; ``log Σ p² = that − 2·lse``;
* ``s_k = Σ_v z``            -> summed, divided by V;
* ``(m_k, a_k)`` the tile's maximum and first argmax -> the earliest tile holding the overall maximum wins
  ties, so the result is the first argmax over the whole vocabulary, compared with the label.

The registry (``_backend._REGISTRY["linear_token_extras"]``) names the per-tile fold of each backend.  The
one here (:data:`TORCH_FOLD`) is torch ops on the tile, about six elementwise passes over it; it serves the
``cpu``, ``torch`` and ``triton`` backends alike (the tile is a torch tensor on every device).  None of the
statistics has a gradient (TRL's ``FusedCausalLMOutput`` contract).  Cost on a CPU: all three extras took a
forward + backward with entropy from 6101 to 6658 ms (+9 %) at N = 1024, H = 1024, V = 32000 fp32 (2-core AMD
EPYC under load, medians of 3, 2026-12-08); a C++ fold (one read of the tile) would win part of that back.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from .. import _backend
from ..reference.linear_token_logprobs import EXTRAS

# Bit of each extra in the custom op's ``extras`` mask.
BITS = {name: 1 << i for i, name in enumerate(EXTRAS)}


def mask_of(names) -> int:
    m = 0
    for name in names:
        m |= BITS[name]
    return m


def names_of(mask: int):
    return tuple(name for name in EXTRAS if mask & BITS[name])


def fold_tile_torch(x, v0, temperature, softcap, want_sq, want_mean, want_top1):
    """One tile's partial statistics: ``x`` (rows, w) raw logits of columns ``[v0, v0 + w)``.

    Returns ``(q, s, m, a)``, each (rows,) or None where not wanted: ``q = logsumexp 2z`` and ``s = Σ z``
    (fp64), ``m = max z`` (fp64) and ``a`` its first index (int64, global column).
    """
    z = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    q = s = m = a = None
    if want_sq:
        q = torch.logsumexp(2 * z, -1).double()
    if want_mean:
        s = z.sum(-1, dtype=torch.float64)
    if want_top1:
        mz, az = z.max(-1)  # the first index of tied maxima
        m, a = mz.double(), az + v0
    return q, s, m, a


@dataclass(frozen=True)
class TileFold:
    """A backend's per-tile fold of the extras (contract: :func:`fold_tile_torch`)."""

    name: str
    fold: Callable


TORCH_FOLD = TileFold("torch", fold_tile_torch)


class Extras:
    """Accumulates the extras of ``n`` rows over a vocabulary of ``v`` columns, tile by tile."""

    def __init__(self, mask, n, v, temperature, softcap, backend, device):
        self.names = names_of(mask)
        self.fold_fn = _backend.impl("linear_token_extras", backend).fold
        self.v, self.temperature, self.softcap = v, temperature, softcap
        f64 = dict(dtype=torch.float64, device=device)
        self.want = tuple(name in self.names for name in EXTRAS)
        self.q = torch.full((n,), float("-inf"), **f64) if self.want[0] else None
        self.s = torch.zeros(n, **f64) if self.want[1] else None
        self.m = torch.full((n,), float("-inf"), **f64) if self.want[2] else None
        self.a = torch.zeros(n, dtype=torch.int64, device=device) if self.want[2] else None

    def fold(self, x, r0, r1, v0):
        q, s, m, a = self.fold_fn(x, v0, self.temperature, self.softcap, *self.want)
        if q is not None:
            self.q[r0:r1] = torch.logaddexp(self.q[r0:r1], q)
        if s is not None:
            self.s[r0:r1] += s
        if m is not None:
            better = m > self.m[r0:r1]  # strict: an earlier tile keeps a tie
            self.m[r0:r1] = torch.where(better, m, self.m[r0:r1])
            self.a[r0:r1] = torch.where(better, a, self.a[r0:r1])

    @staticmethod
    def results(ex, lse, labels, ignore_index):
        """``(log_sum_sq_probs, mean_logits, is_top1)`` of ``ex`` (or None): fp32, fp32, bool (N,), empty
        where not asked; ignored rows 0 / False.  ``lse`` the whole-vocabulary log-sum-exp of z."""

        def empty(dtype=torch.float32):  # a fresh one each: a custom op's outputs must not alias
            return torch.empty(0, dtype=dtype, device=labels.device)

        if ex is None:
            return empty(), empty(), empty(torch.bool)
        keep = labels != ignore_index
        zero = torch.zeros((), dtype=torch.float64, device=labels.device)
        sq = torch.where(keep, ex.q - 2 * lse.double(), zero).float() if ex.q is not None else empty()
        mean = torch.where(keep, ex.s / ex.v, zero).float() if ex.s is not None else empty()
        top1 = (ex.a == labels) & keep if ex.a is not None else empty(torch.bool)
        return sq, mean, top1
