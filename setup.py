"""Build bond_kernels._C: the C++/OpenMP CPU kernels always, the CUDA kernels only where they can be built.

CUDA sources (csrc/cuda/*.cu + python/src/cuda_ops.cpp, compiled with -DBOND_WITH_CUDA) are added when torch
is a CUDA build (torch.version.cuda) AND a CUDA toolkit with nvcc is found; BOND_KERNELS_BUILD_CUDA=0/1 forces
the choice (1 fails loudly if it cannot be met).  Install with ``pip install --no-build-isolation -e .``
(build isolation would fetch a different torch).  The CPU build never needs a GPU or nvcc.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


# The build-time variables and what they accept (the run-time ones are bond_kernels/_env.py's); checked before
# anything is imported or built, so a typo is an error, not a silent default.
SANITIZERS = ("address", "undefined", "leak", "thread")


def _check_build_env():
    force = os.environ.get("BOND_KERNELS_BUILD_CUDA", "")
    if force.strip() not in ("", "0", "1"):
        sys.exit(f"BOND_KERNELS_BUILD_CUDA must be one of 0, 1 (or unset), got {force!r}")
    sanitize = os.environ.get("BOND_KERNELS_SANITIZE", "").strip()
    if sanitize and not set(sanitize.split(",")) <= set(SANITIZERS):
        sys.exit(
            f"BOND_KERNELS_SANITIZE must be a comma-separated list of {', '.join(SANITIZERS)} (or unset), "
            f"got {sanitize!r}"
        )


def _cuda_wanted():
    """(build_cuda, reason) from the environment variable, torch's build and the toolkit on this machine."""
    import torch
    from torch.utils import cpp_extension

    force = os.environ.get("BOND_KERNELS_BUILD_CUDA", "").strip()
    home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    have_nvcc = bool(nvcc) and (os.path.exists(nvcc) or shutil.which(nvcc) is not None)
    if force == "0":
        return False, "BOND_KERNELS_BUILD_CUDA=0"
    if force == "1":
        if not torch.version.cuda:
            sys.exit("BOND_KERNELS_BUILD_CUDA=1 but torch is a CPU-only build (torch.version.cuda is None)")
        if not have_nvcc:
            sys.exit("BOND_KERNELS_BUILD_CUDA=1 but no CUDA toolkit with nvcc was found (set CUDA_HOME)")
        return True, "BOND_KERNELS_BUILD_CUDA=1"
    if not torch.version.cuda:
        return False, "torch is a CPU-only build"
    if not have_nvcc:
        return False, "no CUDA toolkit with nvcc (CUDA_HOME unset or without bin/nvcc)"
    return True, f"torch {torch.version.cuda} and nvcc at {nvcc}"


def _extensions():
    _check_build_env()
    from torch.utils import cpp_extension

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    glue = [
        p
        for p in _rel(glob.glob(os.path.join(ROOT, "python", "src", "*.cpp")))
        if not p.endswith("cuda_ops.cpp")
    ]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "python", "src")]
    # -O3 for the auto-vectorised row loops; -ffp-contract=fast lets the AVX2/AVX-512 clones use FMA in the exp
    # polynomial (ISO C++ mode would forbid contraction); -fno-math-errno keeps std::log inline;
    # -fno-trapping-math lets GCC if-convert the exp's range selects (without it the AVX2 loops stay scalar:
    # one core, 16 x 32000 fp32 rows, AVX2 forward 3.5 -> 0.8 ns/element); -g0 halves the build time.
    # No -march: the ISA is chosen at run time (csrc/include/bond/isa.h), so the wheel runs on any x86-64.
    cxx_flags = [
        "-O3",
        "-g0",
        "-fopenmp",
        "-ffp-contract=fast",
        "-fno-math-errno",
        "-fno-trapping-math",
        "-fvisibility=hidden",
    ]
    link_flags = ["-fopenmp"]
    # BOND_KERNELS_SANITIZE=address,undefined (make test-asan): instrumented build for the sanitizer job.
    # Still -O3, so the loops vectorise and sum in the same order as the shipped build (at -O1 the scalar
    # sums drift past the parity tests' 3e-5 tolerance: a build artefact, not a bug); -g for the reports;
    # -fno-sanitize-recover makes any UB report fatal, so a run that passes had none.  float-cast-overflow is
    # not part of GCC's "undefined": asked for explicitly.
    sanitize = os.environ.get("BOND_KERNELS_SANITIZE", "").strip()
    if sanitize:
        san = [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all"]
        if "undefined" in sanitize.split(","):
            san.append("-fsanitize=float-cast-overflow")
        cxx_flags = [f for f in cxx_flags if f != "-g0"] + ["-g"] + san
        link_flags = link_flags + san
    if sys.platform == "darwin":  # Apple clang has no -fopenmp; the kernels then run single-threaded
        cxx_flags = [f for f in cxx_flags if f != "-fopenmp"]
        link_flags = []

    build_cuda, reason = _cuda_wanted()
    print(f"bond_kernels: building the CUDA kernels: {'yes' if build_cuda else 'no'} ({reason})")
    if not build_cuda:
        return [
            cpp_extension.CppExtension(
                "bond_kernels._C",
                cpu_sources + glue,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        ]
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_glue = _rel(glob.glob(os.path.join(ROOT, "python", "src", "cuda_ops.cpp")))
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    # No --use_fast_math: the sequence-level kernels rely on accurate expm1/log1p near 0 (C_N, docs/math.md §6).
    nvcc_flags = ["-O3", "-DBOND_WITH_CUDA", "-lineinfo", "--expt-relaxed-constexpr"]
    if not archs:
        nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    return [
        cpp_extension.CUDAExtension(
            "bond_kernels._C",
            cpu_sources + glue + cuda_glue + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("BOND_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + ["-DBOND_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    # ninja builds the sources in parallel (and is required for a fast build; pip install ninja).
    return BuildExtension.with_options(use_ninja=True)


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
