"""bond_kernels: fused kernels for Best-of-N Distillation (BOND / J-BOND) and large-vocabulary log-probs."""

__version__ = "0.1.0"

# _env first: it checks every BOND_KERNELS_* variable before anything (torch included) is imported.
from . import _env, functional, reference  # noqa: F401  (_env: imported for its check)
from ._info import info
from .distillation import linear_token_jeffreys
from .functional import (
    best_of_n_indices,
    bon_log_prob,
    bond_loss,
    jbond_loss,
    linear_token_logprobs,
    reward_quantiles,
    sequence_logprobs,
    sequence_logprobs_and_grad,
    token_jeffreys,
    token_logprobs,
    token_logprobs_and_grad,
)
from .modules import BondLoss, EMAAnchor, JBondLoss, TokenJeffreys, TokenLogprobs
from .reference import BondOutput, JBondOutput

__all__ = [
    "BondLoss",
    "BondOutput",
    "EMAAnchor",
    "JBondLoss",
    "JBondOutput",
    "TokenJeffreys",
    "TokenLogprobs",
    "best_of_n_indices",
    "bon_log_prob",
    "bond_loss",
    "functional",
    "info",
    "jbond_loss",
    "linear_token_jeffreys",
    "linear_token_logprobs",
    "reference",
    "reward_quantiles",
    "sequence_logprobs",
    "sequence_logprobs_and_grad",
    "token_jeffreys",
    "token_logprobs",
    "token_logprobs_and_grad",
]
