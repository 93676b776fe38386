// Public interface of the torch-free CPU kernels (csrc/cpu/).  Raw pointers + sizes + strides in, an int
// Status out.  Every kernel is OpenMP-parallel over rows, computes in fp32 whatever the input dtype, and is
// deterministic: a row's result depends only on that row (no cross-thread reduction), so the thread count
// never changes a bit of the output.
//
// Each op's parameter structs and math live in its own header (included below); this file declares the CPU
// entry points.  `num_threads <= 0` in a struct means the OpenMP default; the torch binding passes
// at::get_num_threads() so torch.set_num_threads() applies.
#pragma once

#include <cstddef>

#include "bond/bond_sequence.h"
#include "bond/common.h"
#include "bond/linear_token_jeffreys.h"
#include "bond/reward_quantiles.h"
#include "bond/token_jeffreys.h"
#include "bond/token_logprobs.h"

namespace bond {
namespace cpu {

// ---------------------------------------------------------------------------------------------------------
// Instruction-set dispatch.  The row kernels are compiled three times (baseline x86-64, AVX2+FMA, AVX-512)
// and picked at run time from cpuid, so the library runs on any x86-64 and never needs -march=native.
// BOND_KERNELS_CPU_ISA=generic|avx2|avx512 caps the choice (read once); set_isa() overrides it.
// ---------------------------------------------------------------------------------------------------------
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa best_isa();                                 // the widest ISA this CPU (and this build) supports
Isa active_isa();                               // what the kernels use now
int set_isa(Isa isa);                           // kUnsupported if the CPU lacks it; kOk otherwise
const char* isa_name(Isa isa);                  // "generic", "avx2", "avx512"
int isa_from_name(const char* name, Isa* out);  // kBadArgument for an unknown name

// ---------------------------------------------------------------------------------------------------------
// Memory.  A large output that is about to be written for the first time (the (N, V) gradient) costs one
// page fault per 4 KiB page on Linux, and on a small VM those faults, not the arithmetic, dominate the
// backward.  advise_huge_pages() asks the kernel for transparent huge pages (madvise MADV_HUGEPAGE) on the
// 2 MiB-aligned interior of [ptr, ptr + nbytes): 512x fewer faults.  Advice only: it changes no byte, is
// skipped below 8 MiB, off Linux, and with BOND_KERNELS_HUGE_PAGES=0 (read once), and its errors are ignored.
// Returns the number of bytes advised (0 when skipped).
// ---------------------------------------------------------------------------------------------------------
std::size_t advise_huge_pages(void* ptr, std::size_t nbytes);

// ---------------------------------------------------------------------------------------------------------
// Kernels.
// ---------------------------------------------------------------------------------------------------------

// token_logprobs (bond/token_logprobs.h).  kBadLabel: some label outside [0, V) (its outputs are NaN);
// kAllNegInfRow (forward and fused forward+backward): some non-ignored row is all -inf without a softcap (NaN
// outputs).  Other rows are still computed.  kBadArgument: a size, stride, pointer or scalar off contract.
int token_logprobs_fwd(const TokenLogprobsFwdParams& p);
int token_logprobs_bwd(const TokenLogprobsBwdParams& p);
int token_logprobs_fwd_bwd(const TokenLogprobsFwdBwdParams& p);

// token_jeffreys (bond/token_jeffreys.h).
int token_jeffreys_fwd(const TokenJeffreysFwdParams& p);
int token_jeffreys_bwd(const TokenJeffreysBwdParams& p);

// The tiled divergence's fold of one vocabulary tile into its (7, N) row state (bond/linear_token_jeffreys.h).
int linear_jeffreys_tile_fold(const JeffreysTileFoldParams& p);
// Its backward's gradient of one tile (both conventions) and the generalised JSD's second pass over one tile.
int linear_jeffreys_tile_grad(const JeffreysTileGradParams& p);
int linear_jeffreys_tile_gjsd(const JeffreysTileGjsdParams& p);

// reward_quantiles (bond/reward_quantiles.h).
int reward_quantiles(const RewardQuantilesParams& p);

// Sequence-level BOND / J-BOND (bond/bond_sequence.h): OpenMP over prompts; batch sums in a fixed order, so
// results are bitwise reproducible.
int bond_sequence(const BondSequenceArgs& args);
int jbond_sequence(const JBondSequenceArgs& args);

}  // namespace cpu
}  // namespace bond
