"""Triton kernels and their launchers (same launcher contract as the other backends; see ``ops/*.py``).

Importing this package imports triton; it is only imported when the ``triton`` backend is chosen.
"""
