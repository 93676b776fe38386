"""``nn.Module`` wrappers: they hold configuration only and call :mod:`bond_kernels.functional`."""

import numbers

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = ()

from . import functional as F
from .reference.losses import LOG16

__all__ = ["BondLoss", "EMAAnchor", "JBondLoss", "TokenJeffreys", "TokenLogprobs"]


class TokenLogprobs(nn.Module):
    """``forward(logits, labels)`` -> :func:`bond_kernels.token_logprobs` with the stored options."""

    def __init__(
        self, *, temperature=1.0, softcap=None, ignore_index=-100, return_entropy=False, backend="auto"
    ):
        super().__init__()
        self.temperature, self.softcap, self.ignore_index = temperature, softcap, ignore_index
        self.return_entropy, self.backend = return_entropy, backend

    def forward(self, logits, labels):
        return F.token_logprobs(
            logits,
            labels,
            temperature=self.temperature,
            softcap=self.softcap,
            ignore_index=self.ignore_index,
            return_entropy=self.return_entropy,
            backend=self.backend,
        )

    def extra_repr(self):
        return f"temperature={self.temperature}, softcap={self.softcap}, ignore_index={self.ignore_index}, backend={self.backend!r}"


class BondLoss(nn.Module):
    """``forward(policy_logp, policy_ref_logp, policy_rewards, ref_rewards, bon_logp, ref_mask=None)`` ->
    :class:`BondOutput`, the loss of :func:`bond_kernels.bond_loss` with the stored options."""

    def __init__(self, n, *, beta=0.5, baseline="loo", smoothing="self", correction=False):
        super().__init__()
        self.n, self.beta, self.baseline, self.smoothing, self.correction = (
            n,
            beta,
            baseline,
            smoothing,
            correction,
        )

    def forward(self, policy_logp, policy_ref_logp, policy_rewards, ref_rewards, bon_logp, ref_mask=None):
        return F.bond_loss(
            policy_logp,
            policy_ref_logp,
            policy_rewards,
            ref_rewards,
            bon_logp,
            n=self.n,
            beta=self.beta,
            baseline=self.baseline,
            smoothing=self.smoothing,
            correction=self.correction,
            ref_mask=ref_mask,
        )

    def extra_repr(self):
        return f"n={self.n}, beta={self.beta}, baseline={self.baseline!r}, smoothing={self.smoothing!r}, correction={self.correction}"


class JBondLoss(nn.Module):
    """``forward(policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp)`` ->
    :class:`JBondOutput`, the loss of :func:`bond_kernels.jbond_loss` with the stored options."""

    def __init__(self, *, beta=0.5, gamma=0.0, penalty=LOG16, strict=True):
        super().__init__()
        self.beta, self.gamma, self.penalty, self.strict = beta, gamma, penalty, strict

    def forward(self, policy_logp, anchor_logp, policy_rewards, anchor_rewards, best_anchor_logp):
        return F.jbond_loss(
            policy_logp,
            anchor_logp,
            policy_rewards,
            anchor_rewards,
            best_anchor_logp,
            beta=self.beta,
            gamma=self.gamma,
            penalty=self.penalty,
            strict=self.strict,
        )

    def extra_repr(self):
        return f"beta={self.beta}, gamma={self.gamma}, penalty={self.penalty:.4f}, strict={self.strict}"


class TokenJeffreys(nn.Module):
    """``forward(policy_logits, anchor_logits, ignore_mask=None)`` -> :func:`bond_kernels.token_jeffreys`."""

    def __init__(self, *, beta=0.5, temperature=1.0, backend="auto"):
        super().__init__()
        self.beta, self.temperature, self.backend = beta, temperature, backend

    def forward(self, policy_logits, anchor_logits, ignore_mask=None):
        return F.token_jeffreys(
            policy_logits,
            anchor_logits,
            beta=self.beta,
            temperature=self.temperature,
            ignore_mask=ignore_mask,
            backend=self.backend,
        )

    def extra_repr(self):
        return f"beta={self.beta}, temperature={self.temperature}, backend={self.backend!r}"


def _unwrapped(module):
    """The module inside DistributedDataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    for _ in range(16):
        if isinstance(module, DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            break
    return module


class EMAAnchor:
    """Exponential-moving-average anchor: ``θ_anchor ← (1 − η)·θ_anchor + η·θ_policy`` (J-BOND step 6).

    ``EMAAnchor(anchor_module, eta=0.02).update(policy_module)`` moves every floating parameter and buffer of
    the anchor with one fused multi-tensor lerp (``torch._foreach_lerp_``, a handful of kernel launches for
    the whole model), never a Python loop of per-tensor kernels.  Integer buffers are copied.  The anchor
    and policy must have the same architecture (same parameter and buffer names and shapes); a module
    wrapped by ``torch.compile`` or ``DistributedDataParallel`` is unwrapped (under DDP every rank holds the
    same policy, and updates its own full anchor).  FSDP2-sharded models (``fully_shard``: DTensor
    parameters) are averaged shard by shard, each rank its own local shards, nothing gathered; the anchor
    must then be sharded exactly as the policy (same meshes and placements), and a parameter set that does
    not line up (a DTensor against a plain tensor, FSDP1's flattened names against an unwrapped anchor)
    raises a ``ValueError`` naming the parameter.  The policy may live on another device (an anchor offloaded
    to the CPU): its tensors are copied over.  The anchor module is taken over: its parameters stop
    requiring grad, so pass a copy of the policy (``copy.deepcopy(policy)``), never the policy itself.
    """

    def __init__(self, anchor_module: nn.Module, eta: float = 0.02):
        if isinstance(eta, torch.Tensor) and eta.numel() == 1:
            eta = eta.item()
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not (0.0 <= eta <= 1.0):
            raise ValueError(f"eta must be a number in [0, 1], got {eta!r}")
        if not isinstance(anchor_module, nn.Module):
            raise TypeError(f"anchor_module must be an nn.Module, got {type(anchor_module).__name__}")
        self.anchor = anchor_module
        self.eta = float(eta)
        for p in self.anchor.parameters():
            p.requires_grad_(False)

    def _pairs(self, policy_module):
        """[(anchor tensor, policy tensor, name)], every name, shape and sharding checked before anything
        moves; DTensors (FSDP2) are replaced by their local shards."""
        anchor, policy = _unwrapped(self.anchor), _unwrapped(policy_module)
        mine = dict(anchor.named_parameters())
        mine.update(dict(anchor.named_buffers()))
        theirs = dict(policy.named_parameters())
        theirs.update(dict(policy.named_buffers()))
        if mine.keys() != theirs.keys():
            only_policy, only_anchor = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
            hint = ""
            if any("_fsdp_wrapped_module" in n or "_flat_param" in n for n in only_policy + only_anchor):
                hint = (
                    "; FSDP1 renames and flattens the parameters of the modules it wraps: wrap the anchor "
                    "exactly as the policy, or shard both with FSDP2's fully_shard (names kept)"
                )
            raise ValueError(
                f"policy_module must have the anchor's parameters and buffers; only the policy's: "
                f"{only_policy[:5]}, only the anchor's: {only_anchor[:5]}{hint}"
            )
        pairs = []
        for name, a in mine.items():
            p = theirs[name]
            if a.shape != p.shape:
                raise ValueError(
                    f"policy_module.{name} has shape {tuple(p.shape)}, the anchor's has {tuple(a.shape)}"
                )
            if p.device.type == "meta":
                raise ValueError(f"policy_module.{name} is on the meta device: it holds no values to average")
            a_sharded, p_sharded = isinstance(a, DTensor), isinstance(p, DTensor)
            if a_sharded != p_sharded:
                kinds = ("a DTensor", "a plain tensor")
                raise ValueError(
                    f"policy_module.{name} is {kinds[not p_sharded]}, the anchor's is {kinds[not a_sharded]}: "
                    "shard the anchor exactly as the policy (fully_shard on the same modules) or neither; "
                    "under FSDP2 call update() after the optimizer step, when the parameters are sharded"
                )
            if a_sharded:
                if a.device_mesh != p.device_mesh or tuple(a.placements) != tuple(p.placements):
                    raise ValueError(
                        f"policy_module.{name} is sharded as {tuple(p.placements)} on {p.device_mesh}, the "
                        f"anchor's as {tuple(a.placements)} on {a.device_mesh}: shard both the same way"
                    )
                a, p = a.to_local(), p.to_local()  # this rank's shards, averaged in place: nothing gathered
                if a.shape != p.shape:
                    raise ValueError(
                        f"policy_module.{name} holds a local shard of shape {tuple(p.shape)}, the anchor's "
                        f"{tuple(a.shape)}: shard both the same way"
                    )
            pairs.append((a, p, name))
        return pairs

    @torch.no_grad()
    def update(self, policy_module: nn.Module):
        """Move the anchor towards ``policy_module`` by ``eta``; returns the anchor module."""
        if not isinstance(policy_module, nn.Module):
            raise TypeError(
                f"policy_module must be an nn.Module with the anchor's parameters, got {type(policy_module).__name__}"
            )
        groups = {}
        for a, p, _ in self._pairs(policy_module):
            if a.is_floating_point():
                groups.setdefault((a.device, a.dtype), ([], []))
                groups[(a.device, a.dtype)][0].append(a)
                groups[(a.device, a.dtype)][1].append(p.detach().to(device=a.device, dtype=a.dtype))
            else:
                a.copy_(p)
        for anchors, policies in groups.values():
            torch._foreach_lerp_(anchors, policies, self.eta)
        return self.anchor
