"""Kernels behind a common interface, and the ``torch.library`` custom ops that wrap them.

Each backend (``cpu`` and ``cuda`` through ``bond_kernels._C``, ``triton`` through ``ops/triton``) provides
the same launcher functions with the same signatures; the custom ops take the backend's name as a string
argument and look the launcher up with :func:`kernels`.
"""

from ._dispatch import kernels

__all__ = ["kernels"]
