"""Student-teacher divergence from hidden states and LM heads, in vocabulary tiles (the engine and its autograd).

Spec: :mod:`bond_kernels.reference.linear_token_jeffreys` (the math of both conventions and their gradients).
Neither model's (N, V) logits ever exist: the vocabulary is visited in tiles of ``C`` columns, each the two
matmuls ``h_s·W_s[c]ᵀ`` and ``h_t·W_t[c]ᵀ`` (cuBLAS on a GPU, the CPU BLAS here) followed by O(N·C) elementwise
work in fp32.

Forward, ``divergence="jeffreys"`` (and TRL's ``"gjsd"`` at β ∈ {0, 1}, which are KL(t‖s) and KL(s‖t)): one
pass.  Per row and tile it folds online statistics of both distributions: the running maxes ``m_s, m_t``, the
sums ``Σ e^{z−m_s}`` and ``Σ e^{a−m_t}`` and the cross terms ``Σ e^{z−m_s}·(z−a)`` and ``Σ e^{a−m_t}·(a−z)``,
rescaled when a max grows; at the end ``KL(s‖t) = Σ s·(z−a) − (lse_s − lse_t)`` and symmetrically.
``divergence="gjsd"`` with 0 < β < 1 needs ``log m = logaddexp(log s + log(1−β), log t + log β)`` per entry,
so it takes two passes: the log-sum-exps first, then the divergence (the matmuls run twice).  The fold of
one tile is the backend's (:class:`TileOps`, through the registry): on ``triton`` one kernel reads the two
matmul outputs once and updates the (7, N) state in place (``ops/triton/linear_token_jeffreys.py``); on
``cpu`` one C++ kernel does the same over the fp32 tiles (``csrc/cpu/linear_token_jeffreys.cpp``); ``torch``
folds with torch ops (about ten elementwise passes over fp32 tiles).  The second pass over a tile is one C++
sweep on ``cpu`` and torch ops elsewhere.

Backward: the tiles are recomputed and the per-entry gradient ``dz`` (reference docstring) becomes
``dx = g·dz/T·(1 − tanh²)`` (the last factor with a softcap), then ``grad_h += dx·W_s[c]``,
``grad_W_s[c] = dxᵀ·h_s`` (each tile of grad_W written once) and ``grad_b_s[c] = Σ_rows dx``.  With the
``cpu`` or ``triton`` backend a tile's ``dx`` (both conventions, caps included) is one kernel over the two
raw matmul outputs; ``torch`` computes it with torch ops (the Jeffreys ``dz`` through the token_jeffreys
backward's torch contract, ``reference/launchers.py``).  On ``cpu`` the caps and 1/T are applied by the
kernels (fold, second pass, gradient alike), and each pass writes its matmul outputs and the tile's ``dx``
into buffers reused across tiles (``Head.scratch``).

Memory beyond the inputs and gradients: two fp32 (N, C) tiles and a few temporaries of that size, with C
chosen so that one tile is ``tile_bytes`` (64 MiB on CUDA, 16 MiB on CPU), plus O(N) statistics.  Ignored rows
are computed (no host sync to compact them) and their outputs and gradients zeroed with ``where`` (a NaN in
an ignored row's hidden state does not leak into the weight gradient).
"""

import math
from typing import NamedTuple

import torch

from .. import _backend

GPU_TILE_BYTES = 64 << 20
CPU_TILE_BYTES = 16 << 20
# Tiles of a multiple of 256 columns keep the matmul dimensions multiples of the MMA tile on a GPU.
VOCAB_MULTIPLE = 256


def tile_columns(n_rows: int, vocab: int, device: torch.device, tile_bytes=None) -> int:
    """Columns per vocabulary tile: one fp32 (n_rows, C) tile of ``tile_bytes``, a multiple of 256, ≤ vocab."""
    if tile_bytes is None:
        tile_bytes = GPU_TILE_BYTES if device.type == "cuda" else CPU_TILE_BYTES
    c = int(tile_bytes) // (4 * max(int(n_rows), 1))
    c = max(VOCAB_MULTIPLE, c // VOCAB_MULTIPLE * VOCAB_MULTIPLE)
    return max(1, min(c, int(vocab)))


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    # Tensor cores take bf16/fp16 on a GPU; CPU BLAS runs half types far slower than fp32, so fp32 there.
    return x.dtype if x.is_cuda else torch.float32


class Head:
    """One model's LM head and its logit transform: z = cap(h·Wᵀ + b)/T over a column range."""

    def __init__(self, hidden, weight, bias, softcap, temperature):
        dt = _matmul_dtype(hidden)
        self.hidden = hidden.to(dt)
        self.weight, self.bias = weight, bias
        self.dt, self.softcap, self.temperature = dt, softcap, temperature
        self._scratch = {}

    def scratch(self, key, cols):
        """A reusable contiguous (N, cols) buffer of the matmul dtype, one per ``key`` for every tile of a pass
        (the CPU kernels' tiles: one allocation instead of one per tile, so no fresh pages to fault in)."""
        n = self.hidden.shape[0]
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n * cols:
            buf = self._scratch[key] = torch.empty(n * cols, dtype=self.dt, device=self.hidden.device)
        return buf[: n * cols].view(n, cols)

    def matmul(self, c0, c1, reuse=False):
        """The raw logits h·Wᵀ + b of columns [c0, c1) in the matmul dtype (N, C); with ``reuse`` written into
        this head's scratch buffer (valid until the next such call)."""
        w = self.weight[c0:c1].to(self.dt)
        out = self.scratch("logits", c1 - c0) if reuse else None
        if self.bias is None:
            return torch.mm(self.hidden, w.T, out=out)
        return torch.addmm(self.bias[c0:c1].to(self.dt), self.hidden, w.T, out=out)

    def raw(self, c0, c1):
        return self.matmul(c0, c1).float()

    def capped(self, x):
        """(cap(x), tanh(x/c) or None)."""
        if not self.softcap:
            return x, None
        t = torch.tanh(x / self.softcap)
        return self.softcap * t, t

    def logits(self, c0, c1):
        """Transformed logits z (N, C) fp32, and tanh(x/c) for the softcap's derivative (or None)."""
        capped, t = self.capped(self.raw(c0, c1))
        return capped / self.temperature, t


def _tiles(vocab, cols):
    return [(c0, min(c0 + cols, vocab)) for c0 in range(0, vocab, cols)]


def _fold(state, z, entropy=True):
    """Online log-sum-exp: fold tile z (N, C) into (m, s, a), a = Σ e^{z−m}·(z − m) (for the entropy, relative
    to the max so large logits do not cancel; left as it is with ``entropy=False``, the teacher's case);
    returns the new state, e = exp(z − m_new) and the rescale."""
    m, s, a = state
    m_new = torch.maximum(m, z.amax(1))
    m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    alpha = torch.exp(m - m_safe)
    d = z - m_safe[:, None]
    e = torch.exp(d)
    if entropy:
        shift = torch.where(s > 0, (m - m_safe) * s, torch.zeros_like(s))
        a = alpha * (a + shift) + _cross(e, d)
    return (m_new, s * alpha + e.sum(1), a), e, alpha


def _lse_entropy(state):
    """(lse, entropy) of a folded state: lse = m + log s, H = log s − a/s."""
    m, s, a = state
    return m + torch.log(s), torch.log(s) - a / s


def _cross(e, d):
    return torch.where(e > 0, e * d, torch.zeros((), device=e.device)).sum(1)


def _merge(states, group):
    """Combine per-rank folded states (m, s, a) of a vocabulary-parallel group (identity without a group)."""
    if group is None:
        return states
    import torch.distributed as dist

    world = dist.get_world_size(group)
    # one collective for every statistic: (k, N) per rank
    mine = torch.cat([torch.stack(st) for st in states]).contiguous()
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    every = torch.stack(gathered)  # (world, k, N)
    out, row = [], 0
    for st in states:
        ms, ss, as_ = every[:, row], every[:, row + 1], every[:, row + 2]
        cross = [every[:, row + 3 + i] for i in range(len(st) - 3)]
        row += len(st)
        m_new = ms.amax(0)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        scale = torch.exp(ms - m_safe)
        shift = torch.where(ss > 0, (ms - m_safe) * ss, torch.zeros_like(ss))
        merged = [m_new, (ss * scale).sum(0), (scale * (as_ + shift)).sum(0)]
        merged += [(scale * c).sum(0) for c in cross]
        out.append(tuple(merged))
    return out


def _new_state(n, device):
    """The running statistics of both rows, (7, N) fp32: m_s, s_s, a_s, c_s, m_t, s_t, c_t (see ``_fold``
    and the Triton fold's docstring; the maxes start at −inf, the sums at 0)."""
    state = torch.zeros(7, n, device=device)
    state[0] = state[4] = -math.inf
    return state


def torch_tile_fold(state, student: "Head", teacher: "Head", c0, c1, with_cross):
    """Fold columns [c0, c1) of both models into ``state`` in place, with torch ops (cpu and torch)."""
    z, _ = student.logits(c0, c1)
    a, _ = teacher.logits(c0, c1)
    (m_s, s_s, a_s), e_s, alpha_s = _fold((state[0], state[1], state[2]), z)
    (m_t, s_t, _), e_t, alpha_t = _fold((state[4], state[5], state[2]), a, entropy=False)
    if with_cross:
        d = z - a
        state[3] = state[3] * alpha_s + _cross(e_s, d)
        state[6] = state[6] * alpha_t - _cross(e_t, d)
    state[0], state[1], state[2], state[4], state[5] = m_s, s_s, a_s, m_t, s_t


def _cap(head):
    return float(head.softcap or 0.0)


def cpu_tile_fold(state, student: "Head", teacher: "Head", c0, c1, with_cross):
    """The same fold as one C++ kernel over the two fp32 matmul outputs (``csrc/cpu/linear_token_jeffreys.cpp``,
    through the registry's ``_C.cpu``): two reads of each tile row instead of ~ten torch passes.

    The softcaps and the temperature are applied by the kernel, with the same tanh, product by 1/T and exp as
    the cpu tile gradient and second pass (``cpu_tile_grad``, ``cpu_tile_gjsd``): the statistics come from
    the logits the backward recomputes (a point mass, V = 1, gives exactly p = 1 and a zero gradient at T = 1
    without softcaps; ~1e-7 residuals otherwise, see the kernel's header)."""
    xs, xt = student.matmul(c0, c1, reuse=True), teacher.matmul(c0, c1, reuse=True)
    _backend.impl("token_jeffreys", "cpu").linear_jeffreys_tile_fold(
        state, xs, xt, student.temperature, _cap(student), _cap(teacher), with_cross
    )


def triton_tile_fold(state, student: "Head", teacher: "Head", c0, c1, with_cross):
    """The same fold as one Triton kernel over the two matmul outputs (``ops/triton/linear_token_jeffreys.py``)."""
    from .triton.linear_token_jeffreys import jeffreys_tile_fold

    xs, xt = student.matmul(c0, c1), teacher.matmul(c0, c1)
    jeffreys_tile_fold(state, xs, xt, student.temperature, student.softcap, teacher.softcap, with_cross)


def torch_tile_grad(tiles, student, teacher, c0, c1, grad):
    """The student's gradient on columns [c0, c1) in the matmul dtype: torch ops, with the backend's
    token_jeffreys backward for the Jeffreys ``dz`` (cpu: one C++ kernel)."""
    xs, tanh = student.capped(student.raw(c0, c1))
    xt, _ = teacher.capped(teacher.raw(c0, c1))
    if grad.mode == "gjsd":
        dx = _dz_gjsd(xs, xt, grad.lse_s, grad.lse_t, grad.aux, grad.beta, grad.coef, student.temperature)
    else:
        dx = tiles.token_jeffreys_bwd(
            xs, xt, grad.lse_s, grad.lse_t, grad.aux, grad.coef, grad.beta, student.temperature, grad.no_mask
        )
    if tanh is not None:
        dx = dx * (1.0 - tanh * tanh)
    return torch.where(grad.keep[:, None], dx, torch.zeros((), device=dx.device)).to(student.dt)


def cpu_tile_grad(tiles, student, teacher, c0, c1, grad):
    """The same gradient as one C++ kernel over the two fp32 matmul outputs (both conventions), written into
    the student's gradient buffer (one allocation for every tile: no first-touch page faults per tile)."""
    return _backend.impl("token_jeffreys", "cpu").linear_jeffreys_tile_grad(
        student.matmul(c0, c1, reuse=True),
        teacher.matmul(c0, c1, reuse=True),
        grad.lse_s,
        grad.lse_t,
        grad.aux,
        grad.coef,
        student.temperature,
        _cap(student),
        _cap(teacher),
        grad.beta,
        grad.mode == "gjsd",
        out=student.scratch("grad", c1 - c0),
    )


def triton_tile_grad(tiles, student, teacher, c0, c1, grad):
    """The same gradient as one Triton kernel over the two matmul outputs."""
    from .triton.linear_token_jeffreys import jeffreys_tile_grad

    return jeffreys_tile_grad(
        student.matmul(c0, c1),
        teacher.matmul(c0, c1),
        grad.lse_s,
        grad.lse_t,
        grad.aux,
        grad.coef,
        student.temperature,
        student.softcap,
        teacher.softcap,
        grad.beta,
        grad.mode == "gjsd",
    )


class TileOps:
    """What one backend gives the tiled divergence: ``fold`` (the forward's per-tile statistics), ``grad``
    (the student's gradient of one tile) and ``gjsd`` (the generalised JSD's second pass over one tile).  The
    registry (``_backend.impl("linear_token_jeffreys", name)``) hands these out."""

    def __init__(self, backend, fold, grad, gjsd):
        self.backend, self.fold, self._grad, self.gjsd = backend, fold, grad, gjsd

    def token_jeffreys_bwd(self, *args):
        return _backend.impl("token_jeffreys", self.backend).token_jeffreys_bwd(*args)

    def grad(self, student, teacher, c0, c1, grad):
        return self._grad(self, student, teacher, c0, c1, grad)


def _merged(state, group):
    """``state`` after combining every rank's (identity without a group): the student's (m, s, a, c) and the
    teacher's (m, s, c)."""
    if group is None:
        return state
    (m_s, s_s, a_s, c_s), (m_t, s_t, _, c_t) = _merge(
        [
            (state[0], state[1], state[2], state[3]),
            (state[4], state[5], torch.zeros_like(state[5]), state[6]),
        ],
        group,
    )
    return torch.stack([m_s, s_s, a_s, c_s, m_t, s_t, c_t])


def jeffreys_stats(student: Head, teacher: Head, n, vocab, cols, tiles, group=None):
    """One pass: (lse_s, lse_t, KL(s‖t), KL(t‖s), H(s)), fp32 (N,) each (over every rank's vocabulary)."""
    state = _new_state(n, student.hidden.device)
    for c0, c1 in _tiles(vocab, cols):
        tiles.fold(state, student, teacher, c0, c1, True)
    # the cross sums are relative to their distribution's max, so they merge like the sums
    m_s, s_s, a_s, c_s, m_t, s_t, c_t = _merged(state, group).unbind(0)
    log_s, log_t = torch.log(s_s), torch.log(s_t)
    # Δ = lse_s − lse_t from the maxes and the log-sums apart: each lse may be large while Δ is small.
    delta = (m_s - m_t) + (log_s - log_t)
    ent = _lse_entropy((m_s, s_s, a_s))[1]
    return m_s + log_s, m_t + log_t, c_s / s_s - delta, c_t / s_t + delta, ent


def lse_pass(student: Head, teacher: Head, n, vocab, cols, tiles, group=None):
    """(lse_s, lse_t, H(s)), fp32 (N,) each."""
    state = _new_state(n, student.hidden.device)
    for c0, c1 in _tiles(vocab, cols):
        tiles.fold(state, student, teacher, c0, c1, False)
    m_s, s_s, a_s, _, m_t, s_t, _ = _merged(state, group).unbind(0)
    lse_s, ent = _lse_entropy((m_s, s_s, a_s))
    return lse_s, m_t + torch.log(s_t), ent


def _plogp(p, logp, logq):
    return (p * torch.where(p > 0, logp - logq, torch.zeros((), device=p.device))).sum(1)


def _all_reduce(x, group):
    if group is not None:
        import torch.distributed as dist

        dist.all_reduce(x, group=group)
    return x


def torch_tile_gjsd(kl, student: Head, teacher: Head, c0, c1, lse_s, lse_t, beta):
    """Add columns [c0, c1)'s KL(t‖m) and KL(s‖m) partial sums into ``kl`` (2, N), with torch ops."""
    log_s = student.logits(c0, c1)[0] - lse_s[:, None]
    log_t = teacher.logits(c0, c1)[0] - lse_t[:, None]
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    kl[0] += _plogp(log_t.exp(), log_t, log_m)
    kl[1] += _plogp(log_s.exp(), log_s, log_m)


def cpu_tile_gjsd(kl, student: Head, teacher: Head, c0, c1, lse_s, lse_t, beta):
    """The same sums as one C++ sweep over the two fp32 matmul outputs (caps and temperature as the fold's)."""
    _backend.impl("token_jeffreys", "cpu").linear_jeffreys_tile_gjsd(
        kl,
        student.matmul(c0, c1, reuse=True),
        teacher.matmul(c0, c1, reuse=True),
        lse_s,
        lse_t,
        student.temperature,
        _cap(student),
        _cap(teacher),
        beta,
    )


def gjsd_pass(student: Head, teacher: Head, lse_s, lse_t, beta, n, vocab, cols, group=None, tiles=None):
    """Second pass of the generalised JSD: (D, KL(s‖m)), fp32 (N,) each (``tiles``: the backend's
    :class:`TileOps`, torch ops by default)."""
    tiles = TORCH if tiles is None else tiles
    kl = torch.zeros(2, n, device=student.hidden.device)
    for c0, c1 in _tiles(vocab, cols):
        tiles.gjsd(kl, student, teacher, c0, c1, lse_s, lse_t, beta)
    kl_tm, kl_sm = _all_reduce(kl, group).unbind(0)
    return beta * kl_tm + (1.0 - beta) * kl_sm, kl_sm


CPU = TileOps("cpu", cpu_tile_fold, cpu_tile_grad, cpu_tile_gjsd)
TORCH = TileOps("torch", torch_tile_fold, torch_tile_grad, torch_tile_gjsd)
TRITON = TileOps("triton", triton_tile_fold, triton_tile_grad, torch_tile_gjsd)


def _dz_gjsd(xs, xt, lse_s, lse_t, kl_sm, beta, coef, temperature):
    """Gradient of Σ coef·D (generalised JSD, 0 < β < 1) with respect to the capped student logits."""
    log_s = xs / temperature - lse_s[:, None]
    log_t = xt / temperature - lse_t[:, None]
    log_m = torch.logaddexp(log_s + math.log1p(-beta), log_t + math.log(beta))
    s = log_s.exp()
    zero = torch.zeros((), device=xs.device)
    dz = (1.0 - beta) * torch.where(s > 0, s * (log_s - log_m - kl_sm[:, None]), zero)
    return dz * (coef / temperature)[:, None]


class _TileGrad(NamedTuple):
    """What a tile's gradient needs besides the tiles: the mode ("jeffreys", "kl" or "gjsd"), its β, the
    rows' statistics (aux: KL(s‖t), or KL(s‖m) for "gjsd"), coef = the upstream gradient (0 on ignored
    rows), keep, and an empty mask for the token_jeffreys launcher."""

    mode: str
    beta: float
    lse_s: torch.Tensor
    lse_t: torch.Tensor
    aux: torch.Tensor
    coef: torch.Tensor
    keep: torch.Tensor
    no_mask: torch.Tensor


class LinearTokenJeffreys(torch.autograd.Function):
    """(h_s, W_s, b_s, h_t, W_t, b_t, keep, options) → (divergence, student entropy), (N,) fp32 each;
    gradients for the student through the divergence (the entropy is not differentiated)."""

    @staticmethod
    def forward(
        ctx,
        h_s,
        w_s,
        b_s,
        h_t,
        w_t,
        b_t,
        keep,
        beta,
        divergence,
        temperature,
        cap_s,
        cap_t,
        backend,
        cols,
        group,
    ):
        n, vocab = h_s.shape[0], w_s.shape[0]
        student = Head(h_s, w_s, b_s, cap_s, temperature)
        teacher = Head(h_t, w_t, b_t, cap_t, temperature)
        tiles = _backend.impl("linear_token_jeffreys", backend)
        mode = divergence if (divergence == "jeffreys" or 0.0 < beta < 1.0) else "kl"
        if mode == "gjsd":
            lse_s, lse_t, ent = lse_pass(student, teacher, n, vocab, cols, tiles, group)
            div, aux = gjsd_pass(student, teacher, lse_s, lse_t, beta, n, vocab, cols, group, tiles)
            jeffreys_beta = None
        else:
            lse_s, lse_t, kl_st, kl_ts, ent = jeffreys_stats(student, teacher, n, vocab, cols, tiles, group)
            # "kl": TRL's β = 0 is KL(t‖s), β = 1 is KL(s‖t): Jeffreys with β 0 and 1.
            jeffreys_beta = beta if mode == "jeffreys" else (1.0 if beta == 1.0 else 0.0)
            div, aux = jeffreys_beta * kl_st + (1.0 - jeffreys_beta) * kl_ts, kl_st
        zero = torch.zeros((), device=div.device)
        div = torch.where(keep, div, zero)
        ent = torch.where(keep, ent, zero)
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, keep, lse_s, lse_t, aux)
        ctx.opts = (mode, beta, jeffreys_beta, temperature, cap_s, cap_t, backend, cols, group)
        ctx.mark_non_differentiable(ent)  # the student's entropy is a diagnostic, as in TRL's chunked loss
        return div, ent

    @staticmethod
    def backward(ctx, grad_div, _grad_ent):
        h_s, w_s, b_s, h_t, w_t, b_t, keep, lse_s, lse_t, aux = ctx.saved_tensors
        mode, beta, jeffreys_beta, temperature, cap_s, cap_t, backend, cols, group = ctx.opts
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        vocab = w_s.shape[0]
        student = Head(h_s, w_s, b_s, cap_s, temperature)
        teacher = Head(h_t, w_t, b_t, cap_t, temperature)
        if grad_div is None:  # only the entropy was used
            return (None,) * 15
        coef = torch.where(keep, grad_div.float(), torch.zeros((), device=grad_div.device)).contiguous()
        grad_h = torch.zeros(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
        grad_w = torch.empty_like(w_s) if need_w else None
        grad_b = torch.empty_like(b_s) if (need_b and b_s is not None) else None
        tiles = _backend.impl("linear_token_jeffreys", backend)
        grad = _TileGrad(
            mode,
            beta if mode == "gjsd" else jeffreys_beta,
            lse_s,
            lse_t,
            aux,
            coef,
            keep,
            torch.empty(0, dtype=torch.bool, device=h_s.device),
        )
        for c0, c1 in _tiles(vocab, cols):
            dx = tiles.grad(student, teacher, c0, c1, grad)  # (N, C) in the matmul dtype
            if grad_b is not None:
                grad_b[c0:c1] = dx.sum(0, dtype=torch.float32).to(b_s.dtype)
            if grad_h is not None:
                grad_h.addmm_(dx, w_s[c0:c1].to(student.dt))
            if grad_w is not None and grad_w.dtype == dx.dtype and grad_w.is_contiguous():
                torch.mm(dx.T, student.hidden, out=grad_w[c0:c1])  # in place: no (C, H) temporary
            elif grad_w is not None:
                grad_w[c0:c1] = (dx.T @ student.hidden).to(w_s.dtype)
        if grad_h is not None:
            # vocabulary-parallel: every rank holds its shard's part of grad_hidden (all ranks take part:
            # needs_input_grad is the same on every rank, the functional layer checks it)
            grad_h = _all_reduce(grad_h, group).to(h_s.dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 12
