// A grouped matrix product with gpt-oss's packed MXFP4 experts, for many rows at once (a prefill): an XLA FFI
// custom call.
//
//   rows sorted by expert, sizes[e] rows of expert e, one after another (rows past the last group: 0):
//   NT:  y[p, :] = x[p, :] @ decode(blocks[e], scales[e]).T     x [P, I] -> y [P, O]   (the forward product)
//   NN:  y[p, :] = x[p, :] @ decode(blocks[e], scales[e])       x [P, O] -> y [P, I]   (its gradient for x)
//
// blocks [E, O, I/32, 16] and scales [E, O, I/32] as in oss_jax/mxfp4.py (mxfp4_cpu.cc's header says how).
//
// Why a kernel: with a few rows (a decode step) the product streams the packed weights once (mxfp4_cpu.cc);
// with many, it is arithmetic-bound, and XLA's matrix product is fast but needs a whole float32 copy of
// the expert for every fixed-size tile of rows (kernels/experts.py's "sorted" loop): the copy costs, the
// tiles are padded, and each tile is a separate call. Here each expert's weights are decoded once per call,
// 256 x 16 at a time into a small "panel" that stays in the L1 cache, and every row of that expert then
// meets the panel: the classic blocked matrix product (as in BLAS libraries), with the decode folded in.
//
// 1. Panel: 16 columns of W (16 output rows of the expert for NT, 16 inputs for NN) by 256 steps of the
//    sum, decoded exactly as mxfp4.decode does by mxfp4_cpu.cc's decoders (mxfp4_decode.h), into registers
//    of consecutive inputs; NT's panel wants them across, so they are transposed on the way (8 x 8 with
//    AVX2), and x's rows are put in the nibbles' order once per call. 16 floats are one to four registers.
// 2. Micro-tile: 6 rows of x by the panel's 16 columns, 6 x 16 sums in registers (12 with AVX2); per step
//    of the sum, the panel's 16 weights are loaded once and each of the 6 inputs is broadcast and
//    multiplied into them (fused multiply-adds). The next 256 steps add to the same outputs.
// 3. Threads take (expert, panel) pairs in turn: outputs are disjoint, and each output's sum runs in the
//    same order whichever thread computes it.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "mxfp4_decode.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && !defined(__AVX512F__)
#include <immintrin.h>
#endif

// x * w + acc as one fused multiply-add: C++ compilers otherwise keep the two roundings in ISO mode.
#if defined(__clang__)
#pragma clang fp contract(fast)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=fast")
#endif

namespace ffi = xla::ffi;
using oss_jax::fvec, oss_jax::kLanes, oss_jax::load;
using namespace oss_jax::mxfp4;  // kBlock, kBytes, kVecs and the decoders (mxfp4_decode.h)

namespace {

constexpr int kPanel = 16;        // columns of y per panel
constexpr int kPanelVecs = kPanel / kLanes;
constexpr int64_t kDepth = 256;   // steps of the sum per panel: 256 x 16 floats = 16 KB
constexpr int kRows = 6;          // rows of x per micro-tile

// NT panel: B[k][j] = W[o0 + j, k0 + k'] for k < depth (a multiple of 32) and j < cols, other columns 0, where
// k' puts each block's even inputs first, then its odd ones (the nibbles' order, mxfp4_cpu.cc 5.: x's rows are
// reordered alike). Each row's block is decoded by mxfp4_decode.h into registers of kLanes consecutive k;
// the panel wants them across: with AVX2, 8 rows' registers are transposed (8 x 8) and stored whole.
void panel_nt(const uint8_t* q, const uint8_t* s, int64_t nb, int64_t o0, int cols, int64_t k0, int64_t depth,
              float* B) {
  for (int64_t b = k0 / kBlock; b < (k0 + depth) / kBlock; ++b) {
    float* at = B + (b * kBlock - k0) * kPanel;  // the block's 32 steps
    for (int j0 = 0; j0 < kPanel; j0 += 8) {
      fvec v[8][2 * kVecs] = {};  // row j0 + r: even inputs 0-15, odd inputs 0-15, kLanes at a time
      for (int r = 0; r < 8 && j0 + r < cols; ++r) {
        const int64_t block = (o0 + j0 + r) * nb + b;
        for (int h = 0; h < kVecs; ++h) {
          decode_lut(q + block * kBytes + h * kLanes, v[r][h], v[r][kVecs + h]);
          apply_scale(s[block], v[r][h], v[r][kVecs + h]);
        }
      }
#if defined(__AVX2__) && !defined(__AVX512F__)  // kLanes = 8: four 8 x 8 transposes
      for (int g = 0; g < 2 * kVecs; ++g) {
        __m256 t[8], u[8];
        for (int r = 0; r < 8; r += 2) {
          t[r] = _mm256_unpacklo_ps(__m256(v[r][g]), __m256(v[r + 1][g]));
          t[r + 1] = _mm256_unpackhi_ps(__m256(v[r][g]), __m256(v[r + 1][g]));
        }
        for (int r = 0; r < 8; r += 4) {
          for (int i = 0; i < 2; ++i) {
            u[r + i] = _mm256_shuffle_ps(t[r + i], t[r + 2 + i], _MM_SHUFFLE(1, 0, 1, 0));
            u[r + 2 + i] = _mm256_shuffle_ps(t[r + i], t[r + 2 + i], _MM_SHUFFLE(3, 2, 3, 2));
          }
        }
        // u[0]: k 0, 4 (rows 0-3 in each half); u[2]: k 1, 5; u[1]: k 2, 6; u[3]: k 3, 7; u[4..7] rows 4-7
        const int order[4] = {0, 2, 1, 3};
        for (int i = 0; i < 4; ++i) {
          const __m256 lo = u[order[i]], hi = u[4 + order[i]];
          _mm256_storeu_ps(at + (g * 8 + i) * kPanel + j0, _mm256_permute2f128_ps(lo, hi, 0x20));
          _mm256_storeu_ps(at + (g * 8 + 4 + i) * kPanel + j0, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
      }
#else
      for (int r = 0; r < 8; ++r) {
        for (int h = 0; h < 2 * kVecs; ++h) {
          for (int l = 0; l < kLanes; ++l) at[(h * kLanes + l) * kPanel + j0 + r] = v[r][h][l];
        }
      }
#endif
    }
  }
}

// NN panel: B[k][j] = W[k0 + k, i0 + j] for k < depth and j < 16 (i0 a multiple of 16: half a block).
void panel_nn(const uint8_t* q, const uint8_t* s, int64_t nb, int64_t i0, int64_t k0, int64_t depth, float* B) {
  const int64_t b = i0 / kBlock, half = (i0 % kBlock) / kPanel;
  float even[kBlock / 2], odd[kBlock / 2];  // the block's inputs 2t and 2t + 1, decoded as panel_nt does
  for (int64_t k = 0; k < depth; ++k) {
    const int64_t block = (k0 + k) * nb + b;
    for (int v = 0; v < kVecs; ++v) {
      fvec e, o;
      decode_lut(q + block * kBytes + v * kLanes, e, o);
      apply_scale(s[block], e, o);
      oss_jax::store(even + v * kLanes, e);
      oss_jax::store(odd + v * kLanes, o);
    }
    for (int t = 0; t < 8; ++t) {  // inputs i0 + 2t and i0 + 2t + 1: byte 8 * half + t of the block
      B[k * kPanel + 2 * t] = even[8 * half + t];
      B[k * kPanel + 2 * t + 1] = odd[8 * half + t];
    }
  }
}

// c[m, j] (+)= sum_k a[m, k] B[k][j] for M rows (2.): a's rows lda apart, c's ldc apart, j < cols.
template <int M>
void micro(const float* a, int64_t lda, const float* B, int64_t depth, float* c, int64_t ldc, int cols, bool add) {
  fvec acc[M][kPanelVecs] = {};
  for (int64_t k = 0; k < depth; ++k) {
    fvec w[kPanelVecs];
    for (int v = 0; v < kPanelVecs; ++v) w[v] = load(B + k * kPanel + v * kLanes);
    for (int m = 0; m < M; ++m) {
      const float am = a[m * lda + k];
      for (int v = 0; v < kPanelVecs; ++v) acc[m][v] += am * w[v];
    }
  }
  for (int m = 0; m < M; ++m) {
    float out[kPanel];
    for (int v = 0; v < kPanelVecs; ++v) oss_jax::store(out + v * kLanes, acc[m][v]);
    for (int j = 0; j < cols; ++j) c[m * ldc + j] = (add ? c[m * ldc + j] : 0.0f) + out[j];
  }
}

template <bool kNT>
ffi::Error Grouped(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::U8, 4> blocks, ffi::Buffer<ffi::U8, 3> scales,
                   ffi::Buffer<ffi::S32, 1> sizes, ffi::ResultBuffer<ffi::F32, 2> y, ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), bd = blocks.dimensions(), sd = scales.dimensions();
  const int64_t P = xd[0], K = xd[1], E = bd[0], O = bd[1], nb = bd[2], I = nb * kBlock;
  if (bd[3] != kBytes || sd[0] != E || sd[1] != O || sd[2] != nb || sizes.dimensions()[0] != E ||
      K != (kNT ? I : O)) {
    return ffi::Error::InvalidArgument("mxfp4_grouped_cpu: x [P, I or O], blocks [E, O, I/32, 16], scales "
                                       "[E, O, I/32] and sizes [E] do not match");
  }
  const int64_t N = kNT ? O : I;  // columns of y
  std::vector<int64_t> start(E + 1, 0);  // expert e's rows: [start[e], start[e + 1])
  for (int64_t e = 0; e < E; ++e) start[e + 1] = std::min(P, start[e] + std::max<int64_t>(0, sizes.typed_data()[e]));
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  std::fill(yp + start[E] * N, yp + P * N, 0.0f);  // rows in no group
  // NT: x's rows in the panel's order, per block the 16 even inputs then the 16 odd ones (panel_nt).
  std::vector<float> xs(kNT ? start[E] * K : 0);
  if constexpr (kNT) {
    for (int64_t i = 0; i < start[E] * K; i += kBlock) {
      for (int t = 0; t < kBlock / 2; ++t) {
        xs[i + t] = xp[i + 2 * t];
        xs[i + kBlock / 2 + t] = xp[i + 2 * t + 1];
      }
    }
  }
  const float* a = kNT ? xs.data() : xp;
  const int64_t panels = (N + kPanel - 1) / kPanel;
  using Micro = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int, bool);
  static constexpr Micro kMicro[kRows + 1] = {nullptr, micro<1>, micro<2>, micro<3>, micro<4>, micro<5>, micro<6>};
  const int64_t work = std::max<int64_t>(1, start[E] / E) * K * kPanel;  // multiply-adds per (expert, panel)
  oss_jax::parallel_chunks(pool, E * panels, 1, work, [&](int64_t w0, int64_t w1) {
    std::vector<float> B(kDepth * kPanel);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t e = w / panels, n0 = (w % panels) * kPanel;
      const int64_t r0 = start[e], r1 = start[e + 1];
      if (r0 == r1) continue;  // an expert without rows is not read
      const int cols = int(std::min<int64_t>(kPanel, N - n0));
      const uint8_t* q = blocks.typed_data() + e * O * nb * kBytes;
      const uint8_t* s = scales.typed_data() + e * O * nb;
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K - k0);
        if constexpr (kNT) {
          panel_nt(q, s, nb, n0, cols, k0, depth, B.data());
        } else {
          panel_nn(q, s, nb, n0, k0, depth, B.data());
        }
        for (int64_t r = r0; r < r1; r += kRows) {
          const int M = int(std::min<int64_t>(kRows, r1 - r));
          kMicro[M](a + r * K + k0, K, B.data(), depth, yp + r * N + n0, N, cols, k0 > 0);
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define OSS_JAX_GROUPED_BINDING                        \
  ffi::Ffi::Bind()                                     \
      .Arg<ffi::Buffer<ffi::F32, 2>>() /* x */         \
      .Arg<ffi::Buffer<ffi::U8, 4>>()  /* blocks */    \
      .Arg<ffi::Buffer<ffi::U8, 3>>()  /* scales */    \
      .Arg<ffi::Buffer<ffi::S32, 1>>() /* sizes */     \
      .Ret<ffi::Buffer<ffi::F32, 2>>() /* y */         \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxMxfp4GroupedNT, Grouped<true>, OSS_JAX_GROUPED_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxMxfp4GroupedNN, Grouped<false>, OSS_JAX_GROUPED_BINDING);
