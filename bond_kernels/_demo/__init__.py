"""The pieces of ``bond-kernels demo`` (``bond_kernels.demo`` is the command and describes the run)."""
