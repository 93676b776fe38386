"""Integrations with model and trainer libraries.

``bond_kernels.integrations.transformers``: log-probs of a Hugging Face causal LM through the fused head.
``bond_kernels.integrations.trl`` / ``.verl``: drop-ins with TRL's and verl's signatures, and ``patch()``;
J-BOND as ``trl.JBondConfig`` / ``trl.JBondTrainer`` (``.trl_jbond``, imports trl when used) and as verl's
``"jbond"`` policy loss with ``verl.jbond_advantages`` (``.verl_jbond``).
"""
