"""The training wrappers around a model: which module to call, which model is inside, and misuse checks.

A model is trained as it was wrapped: ``DistributedDataParallel`` (``.module`` inside; its forward prepares
the gradient all-reduce), ``torch.compile`` (``OptimizedModule``, ``._orig_mod`` inside), a PEFT model
(``get_base_model()`` inside; duck-typed, so peft need not be installed) and FSDP2 (``fully_shard`` changes
the module's class in place and adds forward hooks: nothing to unwrap).  :func:`unwrap` peels these off;
the caller runs the computation through the outermost one so that every wrapper's forward and hooks run.
"""

import gc
import weakref

import torch
from torch.nn.parallel import DistributedDataParallel

# Modules already scanned for a DistributedDataParallel that owns them (see ddp_owner).
_NOT_OWNED = weakref.WeakKeyDictionary()
# Wrappers the fused head cannot run through, with what to use instead.
_UNSUPPORTED = {
    "FullyShardedDataParallel": "FSDP1 is not supported: shard with FSDP2 (torch.distributed.fsdp.fully_shard)",
    "DataParallel": "DataParallel is not supported: use DistributedDataParallel",
}


def _is_peft(model):
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def unwrap(model, what="model"):
    """``(outer, inner)``: the module to call (``model`` itself) and the model inside its wrappers."""
    inner = model
    for _ in range(16):  # a wrapper of a wrapper ...; never a cycle
        if isinstance(inner, DistributedDataParallel):
            inner = inner.module
        elif isinstance(getattr(inner, "_orig_mod", None), torch.nn.Module):
            inner = inner._orig_mod
        elif _is_peft(inner):
            config = getattr(inner, "active_peft_config", None)
            if getattr(config, "is_prompt_learning", False):
                raise TypeError(
                    f"{what}: a PEFT prompt-learning adapter ({type(config).__name__}) adds virtual tokens to "
                    "the input, which the fused head cannot line up with the labels; use a LoRA-type adapter"
                )
            inner = inner.get_base_model()
        else:
            break
    name = type(inner).__name__
    if name in _UNSUPPORTED:
        raise TypeError(f"{what}: got {name}; {_UNSUPPORTED[name]}")
    return model, inner


def ddp_owner(module):
    """The ``DistributedDataParallel`` that wraps ``module`` (its ``.module``), or None.

    DDP marks neither the module nor its parameters, so this looks for a DDP object that refers to the
    module (the garbage collector's referrer scan, up the chain module, ``_modules`` dict, instance dict).  Only while a process group is initialised, and once per module object: a module
    found unowned is not scanned again (a DDP built around it later is not seen).
    """
    if module in _NOT_OWNED or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    # module <- the parent's ``_modules`` dict <- the parent's ``__dict__`` (or the parent itself, where the
    # interpreter keeps attributes inline) <- the parent: at most three referrer scans, each of the few
    # dicts that can be a parent module's, never of every object.
    level = [module]
    for _ in range(3):
        refs = gc.get_referrers(*level)
        for ref in refs:
            if isinstance(ref, DistributedDataParallel) and ref.module is module:
                return ref
        if level[0] is module:  # the ``_modules`` dicts that hold the module as a child
            level = [r for r in refs if isinstance(r, dict) and any(v is module for v in r.values())]
        else:  # the instance dicts of modules whose ``_modules`` is one of those
            ids = {id(d) for d in level}
            level = [r for r in refs if isinstance(r, dict) and id(r.get("_modules")) in ids]
        if not level:
            break
    _NOT_OWNED[module] = True
    return None


def fsdp_sharded_owner(model, tensor):
    """The name of the FSDP2 module under ``model`` whose still-sharded parameter ``tensor`` is, or None.

    Inside a forward FSDP2 has replaced the parameters of every module whose forward has begun by their
    gathered copies; a parameter that is still the sharded one belongs to a module sharded on its own whose
    forward did not run (``fully_shard(model.lm_head)``, or a tied input embedding sharded on its own).
    """
    for name, mod in model.named_modules():
        get_state = getattr(mod, "_get_fsdp_state", None)
        if not callable(get_state):
            continue
        group = getattr(get_state(), "_fsdp_param_group", None)
        for param in getattr(group, "fsdp_params", None) or ():
            if getattr(param, "sharded_param", None) is tensor:
                return name or type(model).__name__
    return None
