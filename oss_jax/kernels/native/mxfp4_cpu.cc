// MXFP4 matrix products on the CPU for gpt-oss's packed experts: an XLA FFI custom call.
//
//   y[R, O] = x[R, I] @ decode(blocks[e], scales[e]).T       (x, y float32; e an int32 scalar)
//
// for expert e of weights stored as in oss_jax/mxfp4.py (the reference):
//   blocks [E, O, I/32, 16] uint8: two 4-bit E2M1 codes per byte, the even element in the low nibble
//   scales [E, O, I/32]     uint8: one E8M0 byte s per block of 32 weights, worth 2^(s - 127)
// oss_jax/kernels/native/__init__.py compiles this file on first use and registers it with JAX.
//
// How a llama.cpp-class kernel reads 4-bit weights (and what XLA does not do):
//
// 1. Never expand the weights in memory. One output row of one block is 16 bytes of codes and one
//    scale byte for 32 weights (4.25 bits each). At batch 1 every byte is used once, so the speed
//    limit is how fast those bytes stream in from RAM, if decoding keeps up with it.
// 2. Decoding is a table look-up: a code has 16 possible values (kFp4). One look-up per weight
//    from memory is slow; the whole table fits in one 512-bit register (16 floats; two 256-bit
//    ones), and a register shuffle (x86 vpermps) then decodes a register of weights in one or two
//    instructions. GCC's vector extension __builtin_shuffle compiles to that shuffle on x86; other
//    compilers and targets get the same values from a few integer operations (decode_arith). The
//    decoders are in mxfp4_decode.h, shared with mxfp4_grouped_cpu.cc.
//    (llama.cpp also rounds the activations to int8, and looks up integer weights with a byte
//    shuffle, x86 pshufb or ARM tbl; this kernel keeps x in float32, as the XLA path does.)
// 3. The scale is a power of two shared by 32 weights: one multiply of the decoded block (two
//    registers) by 2^(s - 127), exact, so the block equals mxfp4.decode's bit for bit. The input
//    rows of a group then share the scaled block.
// 4. Accumulate in float32, in independent SIMD lanes (a register per output row and input row);
//    add the lanes together once, at the end of the row.
// 5. The low nibbles hold the even inputs and the high nibbles the odd ones: rather than
//    re-interleave the decoded weights, split x once into its even and odd halves (xe, xo).
// 6. Work in tiles of kRows output rows by kGroup input rows, their sums in registers: each
//    decoded block serves kGroup input rows and each load of x serves kRows weight rows (without
//    tiling, R = 8 rows of x streamed from the L2 cache for every output row cost as much as 8
//    separate products). Output rows are independent: threads claim chunks of them in turn.
// 7. With one input row (a decode step, where this kernel's speed is the token rate) the decoded block
//    meets x only once, so rather than scaling the 32 weights, scale their sum: one multiply per block
//    instead of two. The same sum up to float32 rounding; only scale bytes 0 and 1, whose weights can be
//    too small for a normal float, keep the exact per-weight path.
// 8. At one input row on x86 with AVX2 but not AVX-512, decoding is the bottleneck, not memory: three
//    register shuffles per 8 weights (two table halves and a blend; AVX-512 holds the table in one
//    register). There the table holds *twice* each value, the integers 0, 1, 2, 3, 4, 6, 8, 12 and their
//    negatives, one byte each: a byte shuffle (pshufb) decodes all 16 low nibbles of a block at once,
//    another the 16 high ones. Twice the value is exact, and so is the rest if x is made of integers too:
//    x is written once per call as int16 per block, with a second int16 for what that rounds away
//    (Int16Row, below), and a block's 32 products are integer multiply-adds (vpmaddwd), exact, turned
//    into one float per lane and scaled once by the block's scales. The same sum as 7. up to float32
//    rounding. (llama.cpp rounds x to int8 and keeps only that: 2x fewer multiply-adds, x kept to 2^-8.)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "mxfp4_decode.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && !defined(__AVX512F__)
#define OSS_JAX_ONE_ROW_AVX2 1  // point 8; with AVX-512, one vpermps already decodes 16 weights from the table
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;
using oss_jax::fvec, oss_jax::ivec, oss_jax::kLanes, oss_jax::load;

namespace {

using namespace oss_jax::mxfp4;  // kBlock, kBytes, kVecs and the decoders (mxfp4_decode.h)

constexpr int kRows = 4;        // output rows of a tile: each load of x serves all of them
constexpr int kGroup = 4;       // input rows of a tile: each decoded block serves all of them
constexpr int64_t kChunk = 64;  // output rows a thread claims at a time


#if defined(OSS_JAX_ONE_ROW_AVX2)
// One input row on x86 with AVX2: see 8. x is held as integers, per block of 32 inputs b:
//   x[i] = d[b] * (hi[i] + lo[i] / 32768),  d[b] = max |x in b| / 32767,  hi, lo int16
// hi alone would round x to 2^-16 of its block's largest input; lo carries that rounding error, so what
// is left (2^-31 of the largest input) is far below float32's own rounding. A block's products are then
// integer multiply-adds (vpmaddwd: 16 pairs of int16 into 8 int32 sums) of the twice-values with hi and
// with lo, exact in int32, converted to floats once per block and scaled by d[b] * 2^(s - 127) / 2.
struct Int16Row {
  std::vector<int16_t> q;  // per block 64 values: hi of the 16 even inputs, of the 16 odd, then lo of each
  std::vector<float> d;    // per block; NaN where an input is not finite (the exact path gives inf or NaN)
  explicit Int16Row(const float* x, int64_t nb) : q(nb * 64), d(nb) {
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + b * kBlock;
      float m = 0.0f;
      for (int i = 0; i < kBlock; ++i) m = std::max(m, std::fabs(xb[i]));
      d[b] = std::isfinite(m) ? m / 32767.0f : NAN;
      for (int i = 0; i < kBlock; ++i) {
        const float v = d[b] > 0.0f ? xb[i] / d[b] : 0.0f;  // |v| <= 32767 (up to rounding)
        const float h = std::nearbyint(v);
        const int64_t at = b * 64 + (i % 2) * 16 + i / 2;  // even inputs, then odd: the nibbles' order (5.)
        q[at] = int16_t(h);
        q[at + 32] = int16_t(std::nearbyint((v - h) * 32768.0f));  // |v - h| <= 1/2: |lo| <= 16384
      }
    }
  }
};

// A row's scales d[b] * 2^(s[b] - 127) / 2 (the "/ 2" undoes the twice-values), 8 blocks at a time. Blocks
// the integer path must not take get 0 and are listed in `exact`: scale byte 0 or 1 (weights that may be
// subnormal) or 255 (infinity), an input that is not finite, or a scale below float32's normal range.
// Returns how many there are.
inline int64_t row_scales(const uint8_t* s, int64_t nb, const float* d, float* scale, int64_t* exact) {
  int64_t n = 0;
  auto one = [&](int64_t b) {
    const uint32_t bits = uint32_t(s[b] - 1) << 23;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    scale[b] = f * d[b];
    if (s[b] < 2 || s[b] == 255 || !(scale[b] >= 0x1p-126f || d[b] == 0.0f)) {
      scale[b] = 0.0f;
      exact[n++] = b;
    }
  };
  int64_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const __m256i byte = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + b)));
    const __m256i bits = _mm256_slli_epi32(_mm256_sub_epi32(byte, _mm256_set1_epi32(1)), 23);
    const __m256 dv = _mm256_loadu_ps(d + b), f = _mm256_mul_ps(_mm256_castsi256_ps(bits), dv);
    const __m256i bad_byte = _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), byte),
                                             _mm256_cmpeq_epi32(byte, _mm256_set1_epi32(255)));
    const __m256 good_scale = _mm256_or_ps(_mm256_cmp_ps(f, _mm256_set1_ps(0x1p-126f), _CMP_GE_OQ),
                                           _mm256_cmp_ps(dv, _mm256_setzero_ps(), _CMP_EQ_OQ));
    _mm256_storeu_ps(scale + b, f);
    if (_mm256_movemask_ps(_mm256_andnot_ps(_mm256_castsi256_ps(bad_byte), good_scale)) != 0xFF) {
      for (int64_t j = b; j < b + 8; ++j) one(j);  // rare: sort these 8 out one by one
    }
  }
  for (; b < nb; ++b) one(b);
  return n;
}

// y = x . row for one output row: nb blocks of codes q and scale bytes s; `scale` and `exact` scratch of nb.
inline float one_row_avx2(const uint8_t* q, const uint8_t* s, int64_t nb, const Int16Row& x, const float* xe,
                          const float* xo, float* scale, int64_t* exact) {
  const __m128i twice = _mm_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
  const __m128i nibble = _mm_set1_epi8(15);
  const int64_t n_exact = row_scales(s, nb, x.d.data(), scale, exact);
  __m256 acc_hi = _mm256_setzero_ps(), acc_lo = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {  // every block; those in `exact` have scale 0 here
    const __m128i codes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * kBytes));
    const __m256i w_even = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(twice, _mm_and_si128(codes, nibble)));
    const __m256i w_odd = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(twice, _mm_and_si128(_mm_srli_epi16(codes, 4), nibble)));
    const __m256i* xq = reinterpret_cast<const __m256i*>(x.q.data() + b * 64);
    const __m256i hi = _mm256_add_epi32(_mm256_madd_epi16(w_even, _mm256_loadu_si256(xq)),
                                        _mm256_madd_epi16(w_odd, _mm256_loadu_si256(xq + 1)));
    const __m256i lo = _mm256_add_epi32(_mm256_madd_epi16(w_even, _mm256_loadu_si256(xq + 2)),
                                        _mm256_madd_epi16(w_odd, _mm256_loadu_si256(xq + 3)));
    const __m256 scale8 = _mm256_broadcast_ss(scale + b);
    acc_hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), scale8, acc_hi);  // |hi sums| < 2^21: exact as floats
    acc_lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), scale8, acc_lo);
  }
  fvec rest = {};  // the blocks of `exact`, on the per-weight path of 7.
  for (int64_t j = 0; j < n_exact; ++j) {
    const int64_t b = exact[j];
    for (int v = 0; v < kVecs; ++v) {
      fvec even, odd;
      decode_lut(q + b * kBytes + v * kLanes, even, odd);
      apply_scale(s[b], even, odd);
      rest += even * load(xe + b * kBlock / 2 + v * kLanes);
      rest += odd * load(xo + b * kBlock / 2 + v * kLanes);
    }
  }
  // Without AVX-512, fvec is 8 floats: one __m256.
  return oss_jax::lane_sum(fvec(acc_hi)) + oss_jax::lane_sum(fvec(acc_lo)) * (1.0f / 32768.0f) +
         oss_jax::lane_sum(rest);
}
#endif

// One tile of y: T output rows (from o) times G input rows (from r), T x G sums kept in registers.
// Each block of each of the T weight rows is decoded once and meets all G input rows; each load of
// x meets all T weight rows. xe, xo: x's even and odd halves, rows `half` = I/2 floats apart.
template <bool kLut, int T, int G>
void tile(const uint8_t* q, const uint8_t* s, int64_t nb, const float* xe, const float* xo, int64_t half,
          float* y, int64_t O) {
  fvec acc[T][G] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int v = 0; v < kVecs; ++v) {  // the block's 16 bytes, kLanes at a time
      const int64_t at = b * kBytes + v * kLanes;
      fvec even[T], odd[T];
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) {
        if constexpr (kLut) {
          decode_lut(q + t * nb * kBytes + at, even[t], odd[t]);
        } else {
          decode_arith(q + t * nb * kBytes + at, even[t], odd[t]);
        }
        if constexpr (G > 1) apply_scale(s[t * nb + b], even[t], odd[t]);
      }
      if constexpr (G == 1) {  // one input row (a decode step): see 7.
        const fvec x_even = load(xe + at), x_odd = load(xo + at);
        for (int t = 0; t < T; ++t) {
          const uint8_t sc = s[t * nb + b];
          if (sc >= 2) {  // every weight of the block a normal float: scale the block's sum
            const uint32_t bits = uint32_t(sc) << 23;
            float scale;
            std::memcpy(&scale, &bits, sizeof scale);
            fvec sum = even[t] * x_even;
            sum += odd[t] * x_odd;
            acc[t][0] += sum * scale;
          } else {  // 2^-127 or 2^-126: weights may be subnormal, flushed to zero as in XLA's decode
            apply_scale(sc, even[t], odd[t]);
            acc[t][0] += even[t] * x_even;
            acc[t][0] += odd[t] * x_odd;
          }
        }
        continue;
      }
      for (int g = 0; g < G; ++g) {  // the products with input row g, for each weight row
        const fvec x_even = load(xe + g * half + at), x_odd = load(xo + g * half + at);
        for (int t = 0; t < T; ++t) {
          acc[t][g] += even[t] * x_even;
          acc[t][g] += odd[t] * x_odd;
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < G; ++g) {
      y[g * O + t] = oss_jax::lane_sum(acc[t][g]);
    }
  }
}

// y[:, o] for output rows o in [o0, o1): tiles of kRows output rows (single rows at the end) by up
// to kGroup input rows.
template <bool kLut>
void rows(const uint8_t* q, const uint8_t* s, int64_t nb, const float* xe, const float* xo, int64_t R, float* y,
          int64_t O, int64_t o0, int64_t o1) {
  using Tile = void (*)(const uint8_t*, const uint8_t*, int64_t, const float*, const float*, int64_t, float*, int64_t);
  static constexpr Tile kTiles[2][kGroup + 1] = {
      {nullptr, tile<kLut, 1, 1>, tile<kLut, 1, 2>, tile<kLut, 1, 3>, tile<kLut, 1, 4>},
      {nullptr, tile<kLut, kRows, 1>, tile<kLut, kRows, 2>, tile<kLut, kRows, 3>, tile<kLut, kRows, 4>}};
  const int64_t half = nb * kBytes;
  for (int64_t o = o0; o < o1;) {
    const bool full = o + kRows <= o1;
    for (int64_t r = 0; r < R; r += kGroup) {
      const int64_t G = std::min<int64_t>(kGroup, R - r);
      kTiles[full][G](q + o * nb * kBytes, s + o * nb, nb, xe + r * half, xo + r * half, half, y + r * O + o, O);
    }
    o += full ? kRows : 1;
  }
}

template <bool kLut>
ffi::Error Matmul(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::U8, 4> blocks, ffi::Buffer<ffi::U8, 3> scales,
                  ffi::BufferR0<ffi::S32> expert, ffi::ResultBuffer<ffi::F32, 2> y, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  const int64_t R = xd[0], I = xd[1], E = bd[0], O = bd[1], nb = bd[2];
  if (bd[3] != kBytes || sd[0] != E || sd[1] != O || sd[2] != nb || I != nb * kBlock || E < 1) {
    return ffi::Error::InvalidArgument("mxfp4_cpu: x [R, I], blocks [E, O, I/32, 16] and scales [E, O, I/32] "
                                       "do not match");
  }
  // Expert e's weights, read in place (no copy). Out-of-range indices clamp, as dynamic_slice does.
  const int64_t e = std::clamp<int64_t>(*expert.typed_data(), 0, E - 1);
  const uint8_t* q = blocks.typed_data() + e * O * nb * kBytes;
  const uint8_t* s = scales.typed_data() + e * O * nb;
  // x split once into even and odd inputs, the order the nibbles hold them in.
  const int64_t half = I / 2;
  std::vector<float> xe(R * half), xo(R * half);
  const float* xp = x.typed_data();
  for (int64_t i = 0; i < R * half; ++i) {
    xe[i] = xp[2 * i];
    xo[i] = xp[2 * i + 1];
  }
  float* yp = y->typed_data();
#if defined(OSS_JAX_ONE_ROW_AVX2)
  if (kLut && R == 1) {  // one input row: see 8. One output row at a time: faster here than tiles of kRows.
    const Int16Row xq(xp, nb);
    oss_jax::parallel_chunks(pool, O, kChunk, I, [&](int64_t o0, int64_t o1) {
      std::vector<float> scale(nb);
      std::vector<int64_t> exact(nb);
      for (int64_t o = o0; o < o1; ++o) {
        yp[o] = one_row_avx2(q + o * nb * kBytes, s + o * nb, nb, xq, xe.data(), xo.data(), scale.data(), exact.data());
      }
    });
    return ffi::Error::Success();
  }
#endif
  // Output rows are independent: chunks of kChunk of them, spread over XLA's threads (common.h).
  oss_jax::parallel_chunks(pool, O, kChunk, I * R, [&](int64_t o0, int64_t o1) {
    rows<kLut>(q, s, nb, xe.data(), xo.data(), R, yp, O, o0, o1);
  });
  return ffi::Error::Success();
}

}  // namespace

#define OSS_JAX_MXFP4_BINDING                          \
  ffi::Ffi::Bind()                                     \
      .Arg<ffi::Buffer<ffi::F32, 2>>() /* x */         \
      .Arg<ffi::Buffer<ffi::U8, 4>>()  /* blocks */    \
      .Arg<ffi::Buffer<ffi::U8, 3>>()  /* scales */    \
      .Arg<ffi::BufferR0<ffi::S32>>()  /* expert e */  \
      .Ret<ffi::Buffer<ffi::F32, 2>>() /* y */         \
      .Ctx<ffi::ThreadPool>()

// The SIMD width this library was built for (floats per register): kernels/native/__init__.py's max_rows.
extern "C" int OssJaxSimdLanes() { return kLanes; }

// The fastest decoder this compiler offers, and the portable one (tested equal to each other).
XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxMxfp4Matmul, Matmul<true>, OSS_JAX_MXFP4_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxMxfp4MatmulArith, Matmul<false>, OSS_JAX_MXFP4_BINDING);
