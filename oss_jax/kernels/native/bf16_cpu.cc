// bf16 matrix products at small batch on the CPU: gpt-oss's attention projections and unembedding,
// as XLA FFI custom calls.
//
//   nn: y[R, O] = x[R, I] @ w[I, O]        (q, k, v and o: Attention keeps its weights inputs first)
//   nt: y[R, O] = x[R, I] @ w[O, I].T      (the unembedding: one row of w per vocabulary entry)
//
// x and y float32, w bfloat16 read in place. oss_jax/kernels/linear.py calls them for few rows (a
// decode step) and leaves larger products to XLA.
//
// Why a kernel: gpt-oss keeps everything but its experts in bf16, and at batch 1 every weight is used
// once per token, so the speed limit is how fast the weight bytes stream in from RAM (gpt-oss-20b
// reads 1.3 GB of attention weights and 1.2 GB of unembedding per token). XLA's CPU backend multiplies
// a bf16 matrix by first writing a float32 copy of it to memory and then reading that copy: three
// times the bytes moved. Here each weight becomes a float32 inside a register, for free: a bf16 is
// the upper 16 bits of a float32, so the conversion is a 16-bit shift.
//
// The two layouts read memory differently:
// - nt: an output is the dot product of x with one contiguous row of w. Tiles of kRows rows of w by
//   kGroup rows of x keep kRows x kGroup sums in registers, each in kLanes independent lanes, added
//   together once at the end (as in mxfp4_cpu.cc).
// - nn: an output column is spread over all rows of w. Reading down a column would jump a whole row
//   of w at every step; instead threads take blocks of kBlock whole rows (one contiguous stretch of
//   memory each), and walk them four rows at a time, adding x[r, i] * w[i, :] into the block's own
//   partial sums (R x O floats, in the cache). The partials are then added in block order, so the
//   result does not depend on which thread ran which block.

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using oss_jax::fvec, oss_jax::kLanes, oss_jax::load, oss_jax::store;

namespace {

constexpr int kRows = 4;           // nt: rows of w in a tile; each load of x serves all of them
constexpr int kGroup = 4;          // nt: rows of x in a tile; each load of w serves all of them
constexpr int64_t kChunk = 64;     // nt: output rows a thread claims at a time
constexpr int64_t kBlock = 256;    // nn: rows of w in a block (one thread's contiguous stretch of memory)

typedef uint16_t hvec __attribute__((vector_size(2 * kLanes)));
typedef uint32_t uvec __attribute__((vector_size(4 * kLanes)));

// kLanes bf16 values as floats: widen each to 32 bits and shift it into the upper half.
inline fvec load_bf16(const uint16_t* p) {
  hvec h;
  std::memcpy(&h, p, sizeof h);
  const uvec u = __builtin_convertvector(h, uvec) << 16;
  fvec f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float bf16(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// nt, one tile: y[g, t] = x[g] . w[t] for T rows of w and G rows of x (rows I apart; y rows O apart).
template <int T, int G>
void nt_tile(const float* x, const uint16_t* w, int64_t I, float* y, int64_t O) {
  fvec acc[T][G] = {};
  const int64_t full = I - I % kLanes;
  for (int64_t i = 0; i < full; i += kLanes) {
    fvec wv[T];
    for (int t = 0; t < T; ++t) wv[t] = load_bf16(w + t * I + i);
    for (int g = 0; g < G; ++g) {
      const fvec xv = load(x + g * I + i);
      for (int t = 0; t < T; ++t) acc[t][g] += wv[t] * xv;
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int g = 0; g < G; ++g) {
      float sum = oss_jax::lane_sum(acc[t][g]);
      for (int64_t i = full; i < I; ++i) sum += bf16(w[t * I + i]) * x[g * I + i];  // I not a multiple of kLanes
      y[g * O + t] = sum;
    }
  }
}

// nt: y[:, o] for output rows o in [o0, o1): tiles of kRows rows of w (single rows at the end) by up
// to kGroup rows of x.
void nt_rows(const float* x, int64_t R, const uint16_t* w, int64_t I, float* y, int64_t O, int64_t o0, int64_t o1) {
  using Tile = void (*)(const float*, const uint16_t*, int64_t, float*, int64_t);
  static constexpr Tile kTiles[2][kGroup + 1] = {
      {nullptr, nt_tile<1, 1>, nt_tile<1, 2>, nt_tile<1, 3>, nt_tile<1, 4>},
      {nullptr, nt_tile<kRows, 1>, nt_tile<kRows, 2>, nt_tile<kRows, 3>, nt_tile<kRows, 4>}};
  for (int64_t o = o0; o < o1;) {
    const bool full = o + kRows <= o1;
    for (int64_t r = 0; r < R; r += kGroup) {
      const int64_t G = std::min<int64_t>(kGroup, R - r);
      kTiles[full][G](x + r * I, w + o * I, I, y + r * O + o, O);
    }
    o += full ? kRows : 1;
  }
}

// nn, one block of rows [i0, i1) of w: part (R x O, its own partial sums) = x[:, i0:i1] @ w[i0:i1, :].
void nn_block(const float* x, int64_t R, const uint16_t* w, int64_t I, float* part, int64_t O, int64_t i0,
              int64_t i1) {
  std::memset(part, 0, R * O * sizeof(float));
  const int64_t vend = O / kLanes * kLanes;
  int64_t i = i0;
  for (; i + 4 <= i1; i += 4) {
    const uint16_t* wi = w + i * O;
    for (int64_t o = 0; o < vend; o += kLanes) {
      const fvec w0 = load_bf16(wi + o), w1 = load_bf16(wi + O + o), w2 = load_bf16(wi + 2 * O + o),
                 w3 = load_bf16(wi + 3 * O + o);
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * I + i;
        fvec acc = load(part + r * O + o);
        acc += xr[0] * w0;
        acc += xr[1] * w1;
        acc += xr[2] * w2;
        acc += xr[3] * w3;
        store(part + r * O + o, acc);
      }
    }
    for (int64_t o = vend; o < O; ++o) {
      for (int64_t r = 0; r < R; ++r) {
        const float* xr = x + r * I + i;
        float& acc = part[r * O + o];
        for (int k = 0; k < 4; ++k) acc += xr[k] * bf16(wi[k * O + o]);
      }
    }
  }
  for (; i < i1; ++i) {
    for (int64_t o = 0; o < O; ++o) {
      for (int64_t r = 0; r < R; ++r) part[r * O + o] += x[r * I + i] * bf16(w[i * O + o]);
    }
  }
}

template <bool kTransposed>
ffi::Error Matmul(ffi::Buffer<ffi::F32, 2> x, ffi::Buffer<ffi::BF16, 2> w, ffi::ResultBuffer<ffi::F32, 2> y,
                  ffi::ThreadPool pool) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t R = xd[0], I = xd[1], O = kTransposed ? wd[0] : wd[1];
  if ((kTransposed ? wd[1] : wd[0]) != I) {
    return ffi::Error::InvalidArgument(kTransposed ? "bf16_cpu: x [R, I] and w [O, I] do not match"
                                                   : "bf16_cpu: x [R, I] and w [I, O] do not match");
  }
  const float* xp = x.typed_data();
  const uint16_t* wp = w.typed_data();
  float* yp = y->typed_data();
  if constexpr (kTransposed) {
    oss_jax::parallel_chunks(pool, O, kChunk, I * R, [&](int64_t o0, int64_t o1) {
      nt_rows(xp, R, wp, I, yp, O, o0, o1);
    });
  } else {
    const int64_t blocks = (I + kBlock - 1) / kBlock;
    std::vector<float> parts(blocks * R * O);
    oss_jax::parallel_chunks(pool, blocks, 1, kBlock * O * R, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        nn_block(xp, R, wp, I, parts.data() + c * R * O, O, c * kBlock, std::min(I, (c + 1) * kBlock));
      }
    });
    std::memcpy(yp, parts.data(), R * O * sizeof(float));
    for (int64_t c = 1; c < blocks; ++c) {  // in block order: the same sums whichever thread ran a block
      const float* part = parts.data() + c * R * O;
      for (int64_t j = 0; j < R * O; ++j) yp[j] += part[j];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

#define OSS_JAX_BF16_BINDING                         \
  ffi::Ffi::Bind()                                   \
      .Arg<ffi::Buffer<ffi::F32, 2>>()  /* x */      \
      .Arg<ffi::Buffer<ffi::BF16, 2>>() /* w */      \
      .Ret<ffi::Buffer<ffi::F32, 2>>()  /* y */      \
      .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxBf16MatmulNN, Matmul<false>, OSS_JAX_BF16_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(OssJaxBf16MatmulNT, Matmul<true>, OSS_JAX_BF16_BINDING);
