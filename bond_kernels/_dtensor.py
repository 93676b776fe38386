"""DTensor inputs of the token-level ops (tensor parallelism with ``torch.distributed.tensor``).

``token_logprobs``, ``sequence_logprobs``, ``token_jeffreys`` and ``linear_token_logprobs`` accept DTensors on
a 1-D device mesh, either

* sharded on the vocabulary: logits (policy and anchor logits) ``Shard`` on their last dimension, or the
  head's weight and bias ``Shard(0)`` with hidden ``Replicate()`` (what a ``ColwiseParallel`` lm_head with
  ``use_local_output=False`` holds and returns).  The op runs the vocabulary-parallel path
  (:mod:`bond_kernels.distributed`) on the local shards over the mesh's process group; or
* replicated (``Replicate()`` everywhere): the op runs on the local (full) tensors, on each rank.

The outputs are ``Replicate()`` DTensors, as ``loss_parallel``'s cross-entropy returns, and each input's
gradient is a DTensor with that input's placements (each rank its own shard's gradient).  The float inputs
of one call are all DTensors on the same mesh with the placements above; the integer and boolean inputs
(labels, cu_seqlens, ignore_mask), which carry no gradient, may be plain tensors or ``Replicate()``
DTensors, as ``loss_parallel`` takes its targets.  Either way they must be the same on every rank, and are
checked: the sharded path's metadata exchange compares their hashes; the replicated path does the same in
one small ``all_gather``.  The vocabulary must split evenly over the mesh (torch's ``Shard`` gives a shorter
last shard otherwise): the vocabulary-parallel path needs equal shards (pad the vocabulary, as Megatron does).

Every check here depends only on what every rank sees alike (types, placements, global shapes, the mesh),
so every rank raises together before any collective.
"""

import sys

import torch


def _cls():
    mod = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before torch imports it
    return None if mod is None else getattr(mod, "DTensor", None)


def any_dtensor(*xs):
    """Whether any of ``xs`` is a DTensor (no import, nothing but ``isinstance`` when none can be)."""
    cls = _cls()
    return cls is not None and any(isinstance(x, cls) for x in xs)


# op -> (float inputs, the first deciding the mode; integer/bool inputs; the vocabulary dim of each input
# sharded in the sharded mode, the others Replicate() there)
_SPECS = {
    "token_logprobs": (("logits",), ("labels",), {"logits": -1}),
    "sequence_logprobs": (("logits",), ("labels", "cu_seqlens"), {"logits": -1}),
    "token_jeffreys": (
        ("policy_logits", "anchor_logits"),
        ("ignore_mask",),
        {"policy_logits": -1, "anchor_logits": -1},
    ),
    "linear_token_logprobs": (("weight", "bias", "hidden"), ("labels",), {"weight": 0, "bias": 0}),
}


def dispatch(fn, args):
    """Call ``fn`` (a public op) on the local tensors of its DTensor arguments ``args`` (its ``locals()``
    on entry: every parameter by name) and wrap its outputs as ``Replicate()`` DTensors."""
    floats, aux, dims = _SPECS[fn.__name__]
    dt = unwrap(
        fn.__name__,
        {k: args[k] for k in floats},
        {k: args[k] for k in aux},
        args["process_group"],
        shard_dims=dims,
    )
    rest = {k: v for k, v in args.items() if k not in dt.local and k != "process_group"}
    return dt.wrap(fn(**dt.local, **rest, process_group=dt.group))


def _placement(p):
    return type(p).__name__ + (f"({p.dim})" if p.is_shard() else "()")


class Call:
    """The local tensors of one call and how to wrap its outputs."""

    def __init__(self, local, mesh, group, sharded):
        self.local, self.mesh, self.sharded = local, mesh, sharded
        self.group = group if sharded else None

    def wrap(self, out):
        """Each output tensor as a ``Replicate()`` DTensor on the mesh (autograd flows through)."""
        from torch.distributed.tensor import DTensor, Replicate

        def one(t):
            return DTensor.from_local(t, self.mesh, [Replicate()], run_check=False)

        return tuple(one(t) for t in out) if isinstance(out, tuple) else one(out)


def unwrap(what, floats, aux, process_group, *, shard_dims):
    """Check the DTensors of one call and return its :class:`Call`.

    floats: ``{name: tensor or None}`` of the float inputs, the first one deciding the mode (sharded or
    replicated).  shard_dims: ``{name: dim}`` the vocabulary dimension of each input that is sharded in the
    sharded mode (the others must be ``Replicate()`` there).  aux: ``{name: tensor or None}`` integer or
    boolean inputs, plain or ``Replicate()``.
    """
    import torch.distributed as dist

    cls = _cls()
    given = {k: v for k, v in floats.items() if v is not None}
    plain = [k for k, v in given.items() if not isinstance(v, cls)]
    if plain:
        dts = [k for k in given if k not in plain] + [k for k, v in aux.items() if isinstance(v, cls)]
        raise TypeError(
            f"{what}: {', '.join(plain)} {'is a plain torch.Tensor' if len(plain) == 1 else 'are plain tensors'} "
            f"but {', '.join(dts)} {'is a DTensor' if len(dts) == 1 else 'are DTensors'}: pass every float input "
            "as a DTensor on the same 1-D mesh (for example DTensor.from_local(hidden, mesh, [Replicate()])), "
            "or none"
        )
    first = next(iter(given))
    mesh = given[first].device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"{first} must be a DTensor on a 1-D device mesh (the vocabulary-parallel group), got a mesh of "
            f"shape {tuple(mesh.shape)}: pass the tensor-parallel sub-mesh, e.g. mesh['tp']"
        )
    for name, x in given.items():
        if x.device_mesh != mesh:
            raise ValueError(
                f"{name} must be a DTensor on {first}'s device mesh {mesh}, got one on {x.device_mesh}"
            )
    sharded = given[first].placements[0].is_shard()
    world = mesh.size()
    for name, x in given.items():
        p = x.placements[0]
        dim = shard_dims.get(name)
        if sharded and dim is not None:
            want = f"Shard({dim % x.dim()})" if dim < 0 else f"Shard({dim})"
            ok = p.is_shard() and p.dim % x.dim() == dim % x.dim()
            if not ok:
                like = "" if name == first else f" (like {first})"
                raise ValueError(
                    f"{name} must be sharded on its vocabulary dimension, {want}{like}, or every float input "
                    f"Replicate(); got placements ({_placement(p)},) for shape {tuple(x.shape)}"
                )
            v = x.shape[dim]
            if v % world:
                chunk = -(-v // world)
                sizes = [max(0, min(chunk, v - r * chunk)) for r in range(world)]
                raise ValueError(
                    f"{name} must split its vocabulary of {v} evenly over the mesh's {world} ranks (the "
                    f"vocabulary-parallel path needs equal shards; {_placement(p)} gives local sizes {sizes}): "
                    f"pad the vocabulary to a multiple of {world}"
                )
        elif not p.is_replicate():
            need = "Replicate() (the tokens are replicated, the vocabulary is sharded)"
            if name == first:
                need = f"sharded on its vocabulary dimension (Shard({shard_dims[name] % x.dim()})) or Replicate()"
            elif not sharded:
                need = f"Replicate(), like {first}"
            raise ValueError(
                f"{name} must be {need}; got placements ({_placement(p)},) for shape {tuple(x.shape)}"
            )
    local = {k: (v.to_local() if v is not None else None) for k, v in floats.items()}
    for name, x in aux.items():
        if isinstance(x, cls):
            if x.device_mesh != mesh or not x.placements[0].is_replicate():
                raise ValueError(
                    f"{name} must be a plain tensor or a Replicate() DTensor on {first}'s mesh, got placements "
                    f"({', '.join(_placement(p) for p in x.placements)}) on {x.device_mesh}"
                )
            x = x.to_local()
        local[name] = x
    group = mesh.get_group()
    if process_group is not None:
        ranks = dist.get_process_group_ranks(group)
        try:
            theirs = f"a group of ranks {dist.get_process_group_ranks(process_group)}"
            same = dist.get_process_group_ranks(process_group) == ranks
        except (TypeError, ValueError, RuntimeError, KeyError, AttributeError):
            theirs, same = f"{process_group!r} (not a process group of this rank)", False
        if not same:
            raise ValueError(
                f"process_group must be None or the DTensors' mesh group (ranks {ranks}), with DTensor inputs "
                f"({first} is one), got {theirs}"
            )
    if not sharded:
        _same_everywhere(what, {k: local[k] for k in aux}, group, local[first])
    return Call(local, mesh, group, sharded)


def _same_everywhere(what, named, group, like):
    """The replicated path: raise on every rank unless each aux tensor is identical on every rank."""
    import torch.distributed as dist

    from ._shards import _hash, _meta_device

    parts, names = [], []
    for name, x in named.items():
        if isinstance(x, torch.Tensor):
            shape = torch.tensor([x.dim(), *x.shape], dtype=torch.int64, device=x.device)
            parts.append(torch.cat([_hash(shape), _hash(x.to(torch.int64))]).cpu())
        else:
            parts.append(torch.zeros(4, dtype=torch.float64))
        names.append(name)
    if not parts:
        return
    vec = torch.cat(parts).to(_meta_device(group, like))
    gathered = [torch.empty_like(vec) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, vec, group=group)
    for i, name in enumerate(names):
        if any(not torch.equal(g[4 * i : 4 * i + 4], gathered[0][4 * i : 4 * i + 4]) for g in gathered):
            raise ValueError(
                f"{what}: {name} must be identical on every rank of the mesh (the inputs are Replicate())"
            )
