"""Integrations with model and trainer libraries.

``bond_kernels.integrations.transformers``: log-probs of a Hugging Face causal LM through the fused head.
``bond_kernels.integrations.trl`` / ``.verl``: drop-ins with TRL's and verl's signatures, and ``patch()``.
"""
