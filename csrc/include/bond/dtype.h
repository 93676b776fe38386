// Load/store helpers for fp32, bf16 and fp16 elements, written so that GCC/Clang auto-vectorise them.
//
// bf16 and fp16 are stored as uint16_t bit patterns (torch's at::BFloat16 / at::Half have this layout).  The
// conversions below are branch-free bit manipulation (selects, no table lookups, no libcalls), so a loop that
// loads fp16, computes in fp32 and stores fp16 vectorises on plain SSE2/AVX2 without F16C intrinsics.
#pragma once

#include <cstdint>
#include <cstring>

#include "bond/common.h"

namespace bond {

struct bf16_t {};  // tag types: the storage is uint16_t
struct fp16_t {};

BOND_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
BOND_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
BOND_INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN stays a (quiet) NaN instead of rounding into inf.
BOND_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(is_nan ? ((u >> 16) | 0x0040u) : rounded);
}

// fp16 -> fp32, exact for normals, subnormals, zeros, inf and NaN.  Normal/inf/NaN: shift the exponent and
// mantissa into place and rescale by 2^-112 (the bias difference 127 - 15), which maps exponent 31 to 255
// because the shifted exponent field is first offset by 0xE0 (= 224 = 255 - 31).  Subnormals (exponent field
// 0): the float with exponent 2^-1 and mantissa m is 0.5 + m * 2^-24; subtracting 0.5 leaves m * 2^-24,
// exactly the subnormal's value.
BOND_INLINE float fp16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;  // drops the sign bit
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? f32_bits(denormalized) : f32_bits(normalized);
  return f32_from_bits(sign | magnitude);
}

// fp32 -> fp16, round to nearest even, overflow to inf, NaN to a quiet NaN, subnormal results rounded
// correctly.  Trick: scaling |f| by 2^112 then 2^-110 saturates values past fp16's range to inf and lets an
// fp32 addition of a power of two (chosen from f's exponent) do the rounding of the 13 dropped mantissa bits.
BOND_INLINE uint16_t f32_to_fp16(float f) {
  const float abs_f = f32_from_bits(f32_bits(f) & 0x7FFFFFFFu);
  float base = (abs_f * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;  // below fp16's normal range: round at the subnormal grid
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// Io<T>: the storage type of elements of dtype T and their fp32 load / store.
template <class T>
struct Io;

template <>
struct Io<float> {
  using storage = float;
  static constexpr DType dtype = DType::kFloat32;
  static BOND_INLINE float load(const storage* p, index_t i) { return p[i]; }
  static BOND_INLINE void store(storage* p, index_t i, float v) { p[i] = v; }
};

template <>
struct Io<bf16_t> {
  using storage = uint16_t;
  static constexpr DType dtype = DType::kBFloat16;
  static BOND_INLINE float load(const storage* p, index_t i) { return bf16_to_f32(p[i]); }
  static BOND_INLINE void store(storage* p, index_t i, float v) { p[i] = f32_to_bf16(v); }
};

template <>
struct Io<fp16_t> {
  using storage = uint16_t;
  static constexpr DType dtype = DType::kFloat16;
  static BOND_INLINE float load(const storage* p, index_t i) { return fp16_to_f32(p[i]); }
  static BOND_INLINE void store(storage* p, index_t i, float v) { p[i] = f32_to_fp16(v); }
};

inline int dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// Widen n 16-bit (or fp32) elements to fp32.  token_logprobs widens a 16-bit row block by block into an L1
// buffer for its exp sweep and runs the fp32 loop over it: with the conversion inside the exp loop, GCC sizes
// the vectors by the 16-bit lanes and ran the polynomial as two 256-bit halves in the AVX-512 clone
// (measured, one thread, 4 x 32000 bf16 in cache: 0.39 -> 0.36 ns/element; the AVX2 clone is unchanged).
// The max sweep keeps its direct loads: widening it too cost the AVX2 clone 0.39 -> 0.45 ns/element.
template <class T>
BOND_INLINE void widen_to_f32(const typename Io<T>::storage* BOND_RESTRICT x, index_t n, float* BOND_RESTRICT out) {
#pragma omp simd
  for (index_t i = 0; i < n; ++i) out[i] = Io<T>::load(x, i);
}

}  // namespace bond
