"""``bk.info()``: versions and which backends can run here, with the reason when one cannot."""

import platform

import torch

from . import _backend, _ext


def info(as_dict: bool = False):
    """Return (and with ``as_dict=False`` also format) versions and backend availability."""
    from . import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:
        triton_version = f"unavailable ({type(exc).__name__})"
    mod, reason = _ext.load()
    data = {
        "bond_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": "bond_kernels._C loaded" if mod is not None else reason,
        "backends": {
            name: {dev: {"available": ok, "reason": why} for dev, (ok, why) in devs.items()}
            for name, devs in _backend.table().items()
        },
        "default_backend": {
            dev: _backend.resolve("token_logprobs", "auto", torch.device(dev))
            for dev in (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
        },
    }
    if as_dict:
        return data
    lines = [
        f"{k:>14}: {data[k]}"
        for k in ("bond_kernels", "python", "torch", "torch_cuda", "triton", "cuda_device", "extension")
    ]
    lines.append("      backends:")
    for name, devs in data["backends"].items():
        for dev, st in devs.items():
            mark = "yes" if st["available"] else "no "
            lines.append(f"    {name:>7} on {dev:<4}  {mark}  {'' if st['available'] else st['reason']}")
    lines.append(f"  auto picks: {data['default_backend']}")
    return "\n".join(lines)
