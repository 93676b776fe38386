"""The ``torch.library`` custom ops and their autograd, one module per op, over the backends' launchers.

Each backend (``cpu`` and ``cuda`` through ``bond_kernels._C``, ``triton`` through ``ops/triton``, ``torch``
through ``reference/launchers.py``) provides an op's launcher functions with the same signatures (the
contract in each op's module docstring); the custom ops take the backend's name as a string argument and
find the launchers with :func:`bond_kernels._backend.impl`, the registry.
"""
