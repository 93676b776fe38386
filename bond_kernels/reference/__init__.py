"""Pure-PyTorch reference implementations: the spec, the ``torch`` backend and the test oracle.

Every function computes in fp32 (fp64 when given fp64) and states its math in its docstring.
"""

from .anchor import ema_update
from .bon import best_of_n_indices, bon_log_prob, log_c_n
from .jeffreys import token_jeffreys
from .linear_token_logprobs import EXTRAS, linear_token_extras, linear_token_logprobs
from .losses import BondOutput, JBondOutput, bond_loss, jbond_loss
from .quantiles import reward_quantiles
from .token_logprobs import sequence_logprobs, token_logprobs

__all__ = [
    "EXTRAS",
    "BondOutput",
    "JBondOutput",
    "best_of_n_indices",
    "bon_log_prob",
    "bond_loss",
    "ema_update",
    "jbond_loss",
    "linear_token_extras",
    "linear_token_logprobs",
    "log_c_n",
    "reward_quantiles",
    "sequence_logprobs",
    "token_jeffreys",
    "token_logprobs",
]
