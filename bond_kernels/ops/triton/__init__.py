"""Triton kernels and their launchers (same launcher contract as the other backends; see ``ops/*.py``).

Importing this package imports triton; it is only imported when the ``triton`` backend is chosen.
"""

from .token_logprobs import token_logprobs_bwd, token_logprobs_fwd, token_logprobs_fwd_bwd

__all__ = [
    "token_logprobs_bwd",
    "token_logprobs_fwd",
    "token_logprobs_fwd_bwd",
]
