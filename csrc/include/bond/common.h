// Shared definitions of the torch-free kernels: index type, status codes, row layouts, inlining macros.
//
// Every kernel in csrc/ takes raw pointers, sizes and strides and returns an int status (Status below).
// Offsets are int64_t everywhere: 16384 rows x 256000 vocabulary = 4.2e9 elements overflows int32.
#pragma once

#include <cstdint>

#if defined(__GNUC__) || defined(__clang__)
#define BOND_INLINE inline __attribute__((always_inline))
#define BOND_RESTRICT __restrict__
#else
#define BOND_INLINE inline
#define BOND_RESTRICT
#endif

namespace bond {

using index_t = int64_t;  // element offsets and counts; never int: N*V exceeds 2^31 at production sizes

// Status codes returned by every kernel (0 = success).  The torch bindings turn them into Python errors
// that name the argument (python/src/common.h).
enum Status : int {
  kOk = 0,
  kBadLabel = 1,      // a label outside [0, V) that is not ignore_index; the row's outputs are NaN
  kAllNegInfRow = 2,  // a row whose logits are all -inf at a position whose label is not ignored; outputs NaN
  kBadArgument = 3,   // a size, stride or pointer that violates the kernel's contract
  kUnsupported = 4,   // a dtype or ISA this build does not provide
};

// The CUDA launchers return kOk, kBadArgument, or the cudaError_t of the launch offset by kCudaErrorBase,
// so a CUDA error code never collides with a Status above.
constexpr int kCudaErrorBase = 1000;

inline const char* status_name(int status) {
  switch (status) {
    case kOk: return "ok";
    case kBadLabel: return "label out of range";
    case kAllNegInfRow: return "row of all -inf logits with a label that is not ignored";
    case kBadArgument: return "bad argument";
    case kUnsupported: return "unsupported";
    default: return status >= kCudaErrorBase ? "CUDA error (kCudaErrorBase + cudaError_t)" : "unknown status";
  }
}

// Element dtypes of logits-like inputs.  Values match nothing in torch on purpose: the binding maps them.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Where row r of an (N, V) or (B, T, V) tensor starts (the vocabulary stride is always 1):
//   2-D (N, V), row stride s:            Rows{N, 1, s, 0}
//   3-D (B, T, V), strides (sb, st, 1):   Rows{B*T, T, sb, st};  row r = b*T + t lives at b*sb + t*st
// so a slice such as logits[:, :-1] of a (B, T, V) tensor is read in place, without a copy.
struct Rows {
  index_t n_rows = 0;        // N = B*T
  index_t inner = 1;         // T (1 for a 2-D tensor)
  index_t stride_outer = 0;  // elements between consecutive b (the row stride of a 2-D tensor)
  index_t stride_inner = 0;  // elements between consecutive t

  static Rows matrix(index_t n, index_t row_stride) { return Rows{n, 1, row_stride, 0}; }
  static Rows batched(index_t b, index_t t, index_t stride_b, index_t stride_t) {
    return Rows{b * t, t > 0 ? t : 1, stride_b, stride_t};  // T = 0: no rows (inner 1 keeps offset() defined)
  }
  index_t offset(index_t r) const {
    return inner == 1 ? r * stride_outer : (r / inner) * stride_outer + (r % inner) * stride_inner;
  }
  bool valid() const { return n_rows >= 0 && inner >= 1 && (inner == 1 || n_rows % inner == 0); }
};

}  // namespace bond
