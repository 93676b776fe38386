"""The ``torch`` backend's launchers: each op's launcher contract (``ops/<op>.py``) in plain torch.

They are built on the reference functions of this package (the spec) and serve where a launcher, not the
public function, is what is called: the linear head's vocabulary tiles and the vocabulary-parallel ops
(``token_logprobs_*``), the tiled student-teacher divergence (``token_jeffreys_bwd``) and the timing of
``auto`` (``reward_quantiles``).  ``bond_kernels._backend`` registers this module as every op's ``torch``
implementation.  The log-sum-exps are returned whole, (N,) (``torch`` is not in ``ops.token_logprobs.SPLIT_LSE``).
Math in fp32, fp64 for fp64 inputs.
"""

import torch

from .._validate import BASELINES, Smoothing
from ._common import compute_dtype, transform_logits
from .jeffreys import token_jeffreys
from .losses import bond_loss, jbond_loss
from .quantiles import reward_quantiles as _reward_quantiles
from .token_logprobs import token_logprobs

# The kernels' ``mode`` and ``baseline`` arguments as the reference spells them.
_SMOOTHING = {Smoothing.NONE: "none", Smoothing.SELF: "self"}
_BASELINE = {code: name for name, code in BASELINES.items()}


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=like.dtype, device=like.device)


# --------------------------------------------------------------------------------------------------------
# token_logprobs (contract: ops/token_logprobs.py)
# --------------------------------------------------------------------------------------------------------
def token_logprobs_fwd(logits, labels, temperature, softcap, ignore_index, return_entropy):
    """``(logp, lse, entropy)``: the reference's log-probs and entropies, and the whole log-sum-exp of z."""
    rows = logits.reshape(-1, logits.shape[-1])
    out = token_logprobs(
        rows,
        labels,
        temperature=temperature,
        softcap=softcap,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
    )
    logp, ent = out if return_entropy else (out, None)
    z = transform_logits(rows.to(compute_dtype(rows)), temperature, softcap)
    keep = labels != ignore_index
    lse = torch.where(keep, torch.logsumexp(z, dim=-1), _zero(z))
    return logp, lse, ent if return_entropy else z.new_empty(0)


def token_logprobs_bwd(
    logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, softcap, ignore_index, inplace
):
    """d/d logits given the rows' (possibly global) ``lse`` and ``entropy``; in the logits' dtype::

    dz_v = g·(1[v = y] − p_v) − g_H·p_v·(log p_v + H),  p_v = exp(z_v − lse),  dx = dz/T·(1 − tanh²(x/c))
    """
    rows = logits.reshape(-1, logits.shape[-1])
    x = rows.to(compute_dtype(rows))
    z = transform_logits(x, temperature, softcap)
    keep = labels != ignore_index
    zero = _zero(z)
    lse = lse.to(z.dtype)
    g = torch.where(keep, grad_logp.to(z.dtype), zero)
    p = torch.exp(z - lse.unsqueeze(-1))
    dz = -g.unsqueeze(-1) * p
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    dz.scatter_add_(-1, safe.unsqueeze(-1), g.unsqueeze(-1))
    if grad_entropy.numel():
        ge = torch.where(keep, grad_entropy.to(z.dtype), zero)
        logp_v = torch.where(p > 0, z - lse.unsqueeze(-1), zero)
        dz = dz - ge.unsqueeze(-1) * p * (logp_v + entropy.to(z.dtype).unsqueeze(-1))
    dx = torch.where(keep.unsqueeze(-1), dz, zero) * _transform_slope(x, temperature, softcap)
    if inplace:
        logits.copy_(dx.view(logits.shape))
        return logits
    return dx.to(logits.dtype).view(logits.shape)


def token_logprobs_fwd_bwd(logits, labels, grad_logp, temperature, softcap, ignore_index, inplace):
    """``(logp, grad)`` for a known upstream ``grad_logp``: the forward, then the backward."""
    logp, lse, _ = token_logprobs_fwd(logits, labels, temperature, softcap, ignore_index, False)
    empty = lse.new_empty(0)
    grad = token_logprobs_bwd(
        logits, labels, lse, empty, grad_logp, empty, temperature, softcap, ignore_index, inplace
    )
    return logp, grad


def token_logprobs_fixup_column0(d, x0, out, lse, ent, g, g_ent, temperature, softcap):
    """Overwrite ``d[i, 0]`` for the rows ``out`` with their gradient without the one-hot term.

    For tiles of the vocabulary (the linear head, a vocabulary shard): a row whose label lies outside the
    tile is given the local label 0, so the backward put a spurious one-hot at column 0.  d (n, v) the
    tile's gradient; x0 (n,) the tile's column-0 logits saved before an in-place backward; out (n,) bool;
    lse, ent (n,) the rows' global statistics (``ent`` empty when unused); g, g_ent (n,) upstream::

        dz0 = −g·p0 − g_ent·p0·(log p0 + H),   p0 = exp(z0 − lse),   dx0 = dz0/T·(1 − tanh²(x0/c))

    Computed in fp32 from x0, not as ``g(1 − p0) − g`` from the tile (bf16 would lose ~2⁻⁹·g).
    """
    x0 = x0.to(lse.dtype)
    z0 = transform_logits(x0, temperature, softcap)
    p0 = torch.exp(z0 - lse)
    dz0 = -g.to(lse.dtype) * p0
    if g_ent is not None and g_ent.numel():
        logp0 = torch.where(p0 > 0, z0 - lse, _zero(lse))
        dz0 = dz0 - g_ent.to(lse.dtype) * p0 * (logp0 + ent.to(lse.dtype))
    dx0 = dz0 * _transform_slope(x0, temperature, softcap)
    col = d[:, 0]
    col.copy_(torch.where(out, dx0.to(d.dtype), col))


def _transform_slope(x, temperature, softcap):
    """dz/dx of ``z = c·tanh(x/c)/T``: ``(1 − tanh²(x/c))/T`` (``1/T`` without a softcap)."""
    if not softcap:
        return 1.0 / temperature
    t = torch.tanh(x / softcap)
    return (1.0 - t * t) / temperature


# --------------------------------------------------------------------------------------------------------
# token_jeffreys (contract: ops/token_jeffreys.py)
# --------------------------------------------------------------------------------------------------------
def _rows_lse(x, temperature):
    return torch.logsumexp(x.to(compute_dtype(x)) / temperature, dim=-1)


def token_jeffreys_fwd(policy, anchor, beta, temperature, ignore_mask):
    """``(div, lse_p, lse_q, kl_pq)`` (N,) each: the reference's divergence and the rows' statistics."""
    mask = ignore_mask if ignore_mask.numel() else None
    div = token_jeffreys(policy, anchor, beta=beta, temperature=temperature, ignore_mask=mask)
    lse_p, lse_q = _rows_lse(policy, temperature), _rows_lse(anchor, temperature)
    kl_pq = token_jeffreys(policy, anchor, beta=1.0, temperature=temperature, ignore_mask=mask)
    return div, lse_p, lse_q, kl_pq


def token_jeffreys_bwd(policy, anchor, lse_p, lse_q, kl_pq, grad_div, beta, temperature, ignore_mask):
    """d/d policy in the policy's dtype, from the rows' statistics (so a column slice of the rows is exact)::

    dz_v = g·[β·p_v·(log p_v − log q_v − KL(p‖q)) + (1−β)·(p_v − q_v)] / T
    """
    dt = compute_dtype(policy, anchor)
    log_p = policy.to(dt) / temperature - lse_p.to(dt).unsqueeze(-1)
    log_q = anchor.to(dt) / temperature - lse_q.to(dt).unsqueeze(-1)
    p, q = log_p.exp(), log_q.exp()
    zero = torch.zeros((), dtype=dt, device=policy.device)
    dz = torch.zeros_like(p)
    if beta > 0:  # a zero weight drops its term (an infinite KL times 0 is 0, not NaN)
        dz = dz + beta * torch.where(p > 0, p * (log_p - log_q - kl_pq.to(dt).unsqueeze(-1)), zero)
    if beta < 1:
        dz = dz + (1.0 - beta) * (p - q)
    coef = grad_div.to(dt)
    if ignore_mask.numel():
        coef = torch.where(ignore_mask, zero, coef)
    return (dz * (coef / temperature).unsqueeze(-1)).to(policy.dtype)


# --------------------------------------------------------------------------------------------------------
# reward_quantiles and the sequence-level math (contracts: ops/reward_quantiles.py, ops/bond_sequence.py)
# --------------------------------------------------------------------------------------------------------
def _smoothing(mode, eps):
    return _SMOOTHING.get(int(mode), float(eps))


def reward_quantiles(rewards, ref_rewards, ref_mask, mode, eps):
    mask = ref_mask if ref_mask.numel() else None
    p_le, p_lt = _reward_quantiles(rewards, ref_rewards, ref_mask=mask, smoothing=_smoothing(mode, eps))
    return p_le.float(), p_lt.float()


def bond_sequence(
    policy_logp,
    policy_ref_logp,
    policy_rewards,
    ref_rewards,
    ref_mask,
    bon_logp,
    n,
    beta,
    mode,
    eps,
    correction,
    baseline,
):
    out = bond_loss(
        policy_logp,
        policy_ref_logp,
        policy_rewards,
        ref_rewards,
        bon_logp,
        n=n,
        beta=beta,
        baseline=_BASELINE[int(baseline)],
        smoothing=_smoothing(mode, eps),
        correction=bool(correction),
        ref_mask=ref_mask if ref_mask.numel() else None,
    )
    stats = torch.stack([out.backward_kl, out.forward_ce, out.mean_quantile, out.kl_to_ref]).float()
    return out.p_le, out.bon_logp_target, out.policy_coef, out.bon_coef, stats


def jbond_sequence(
    policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp, beta, gamma, penalty, strict
):
    out = jbond_loss(
        policy_logp,
        anchor_logp,
        policy_rewards,
        anchor_rewards,
        best_anchor_logp,
        beta=beta,
        gamma=gamma,
        penalty=penalty,
        strict=bool(strict),
    )
    stats = torch.stack([out.reward_mean, out.penalised_frac, out.kl_to_anchor, out.forward_ce]).float()
    return out.jbond_reward, out.policy_coef, out.best_coef, stats
