// Decoding MXFP4 blocks into SIMD registers of floats: shared by mxfp4_cpu.cc (one to a few rows of x, where
// its points 2-5 explain these) and mxfp4_grouped_cpu.cc (many rows).

#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

namespace oss_jax::mxfp4 {

constexpr int64_t kBlock = 32;  // weights per scale byte
constexpr int64_t kBytes = 16;  // bytes of codes per block

// A block's 16 low-nibble codes (its even inputs), or its 16 high ones, fill kVecs registers of kLanes
// floats (common.h: 16 lanes with AVX-512, 8 with AVX, else 4).
constexpr int kVecs = 16 / kLanes;

// The value of each E2M1 code: bit 3 is the sign, bits 0-2 pick 0, 0.5, 1, 1.5, 2, 3, 4 or 6.
alignas(64) constexpr float kFp4[16] = {+0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                        -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// Multiply a decoded block by its scale 2^(s - 127). An E8M0 byte is exactly a float32 exponent
// field (bias 127 in both formats): the float with bits s << 23. s = 255 (NaN in the OCP spec, never
// in real weights) gives infinity, as mxfp4.decode does. s = 0 (2^-127) has no such float: it is
// below the smallest normal one, and XLA's threads treat such "subnormal" operands as zero. So that
// case is two multiplies, by 2^-126 and 1/2: weights of 2^-126 and above survive, the smaller ones
// flush to zero, exactly as in XLA's decode.
inline void apply_scale(uint8_t s, fvec& even, fvec& odd) {
  const uint32_t bits = uint32_t(s) << 23;
  float scale = 0x1p-126f;
  if (s != 0) std::memcpy(&scale, &bits, sizeof scale);
  even *= scale;
  odd *= scale;
  if (s == 0) {
    even *= 0.5f;
    odd *= 0.5f;
  }
}

// kLanes bytes of codes, widened to one lane each: lane j holds byte j (codes of inputs 2j, 2j+1).
inline ivec widen(const uint8_t* q) {
  ivec b;
  for (int j = 0; j < kLanes; ++j) b[j] = q[j];
  return b;
}

// Decode the codes of kLanes bytes (one register's worth) to E2M1 values (unscaled): the low
// nibbles (even inputs) and the high nibbles (odd inputs).
//
// Portable: the values computed, not looked up. Twice an E2M1 magnitude m = 0..7 is the integer
// 0, 1, 2, 3, 4, 6, 8, 12, i.e. m, plus m - 4 above 4, plus 2 (m - 6) above 6. A comparison of
// vectors gives -1 (all bits set) or 0 per lane, so `(m > 4) & (m - 4)` is "m - 4 where m > 4,
// else 0". The sign bit negates: (v ^ -1) - (-1) = -v.
inline fvec fp4_values(ivec code) {
  const ivec m = code & 7;
  const ivec twice = m + ((m > 4) & (m - 4)) + ((m > 6) & ((m - 6) * 2));
  const ivec neg = -(code >> 3);  // -1 where the sign bit is set
  return __builtin_convertvector((twice ^ neg) - neg, fvec) * 0.5f;
}
inline void decode_arith(const uint8_t* q, fvec& even, fvec& odd) {
  const ivec b = widen(q);
  even = fp4_values(b & 15);
  odd = fp4_values(b >> 4);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX2__)
// Faster, with GCC on x86: the table in registers. __builtin_shuffle(table, idx)[j] = table[idx[j]],
// one vpermps; with 8 lanes the 16-entry table is two registers, and __builtin_shuffle(lo, hi, idx)
// indexes both (two vpermps and a blend). GCC 12 turns a float shuffle into lane-by-lane loads on
// ARM, so there (and with other compilers) the table is the computed one above.
inline fvec lookup(ivec code) {
  if constexpr (kLanes == 16) {
    return __builtin_shuffle(load(kFp4), code);
  } else {
    return __builtin_shuffle(load(kFp4), load(kFp4 + 8), code);
  }
}
inline void decode_lut(const uint8_t* q, fvec& even, fvec& odd) {
  const ivec b = widen(q);
  even = lookup(b & 15);
  odd = lookup(b >> 4);
}
#else
inline void decode_lut(const uint8_t* q, fvec& even, fvec& odd) { decode_arith(q, even, odd); }
#endif

}  // namespace oss_jax::mxfp4
