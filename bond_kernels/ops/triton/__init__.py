"""Triton kernels and their launchers (same launcher contract as the other backends; see ``ops/*.py``).

Importing this package imports triton; it is only imported when the ``triton`` backend is chosen.
"""

from .reward_quantiles import reward_quantiles
from .token_jeffreys import token_jeffreys_bwd, token_jeffreys_fwd
from .token_logprobs import token_logprobs_bwd, token_logprobs_fwd, token_logprobs_fwd_bwd

__all__ = [
    "reward_quantiles",
    "token_jeffreys_bwd",
    "token_jeffreys_fwd",
    "token_logprobs_bwd",
    "token_logprobs_fwd",
    "token_logprobs_fwd_bwd",
]
