"""Map a backend name to the module holding its launchers.

Every backend module exposes the same functions (shapes in ``ops/token_logprobs.py`` and friends):
``token_logprobs_fwd``, ``token_logprobs_bwd``, ``token_logprobs_fwd_bwd``, ``token_jeffreys_fwd``,
``token_jeffreys_bwd``, ``reward_quantiles``, ``bond_sequence``.
"""

from .. import _ext


def kernels(backend: str):
    if backend == "cpu":
        return _ext.require().cpu  # the C++/OpenMP kernels (python/src registers them as _C.cpu)
    if backend == "cuda":
        return _ext.require().cuda  # the CUDA C++ kernels (_C.cuda, present when built with nvcc)
    if backend == "triton":
        from . import triton as triton_kernels

        return triton_kernels
    raise ValueError(f"no kernel module for backend {backend!r}")
