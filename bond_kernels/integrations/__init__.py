"""Integrations with model libraries (``bond_kernels.integrations.transformers``)."""
