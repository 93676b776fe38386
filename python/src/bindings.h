// Declarations shared by the files of python/src/ (the torch-facing glue that becomes bond_kernels._C).
//
// module.cpp holds the one PYBIND11_MODULE(_C, m).  It binds the CPU launchers declared below into the
// submodule `_C.cpu` with the names and argument order of the launcher contracts in
// bond_kernels/ops/{token_logprobs,token_jeffreys,reward_quantiles}.py, then calls
//   register_bond_sequence_cpu(cpu)   (defined in bond_sequence.cpp), and, when built with nvcc,
//   register_cuda_ops(cuda)           (defined in cuda_ops.cpp; only under BOND_WITH_CUDA).
// Both take the submodule by reference and add their functions with cpu.def(...) / cuda.def(...).
#pragma once

// pybind11 plus the at::Tensor <-> torch.Tensor casters, which every file that def()s a launcher needs.
#include <torch/csrc/utils/pybind.h>

#include "launchers.h"  // the CPU launchers module.cpp binds

// Defined in python/src/bond_sequence.cpp: adds `bond_sequence` (and helpers) to _C.cpu.
void register_bond_sequence_cpu(pybind11::module_& cpu);

#ifdef BOND_WITH_CUDA
// Defined in python/src/cuda_ops.cpp: adds the CUDA launchers to _C.cuda.
void register_cuda_ops(pybind11::module_& cuda);
#endif
