// What the native kernels share: SIMD registers of floats, and splitting work over XLA's threads.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace oss_jax {

// A SIMD register of floats (GCC and Clang vector extensions: arithmetic is per lane, and a scalar
// operand meets every lane): 16 lanes with AVX-512's 512-bit registers, 8 with AVX's 256 bits, else 4
// (128 bits: ARM NEON, SSE). -O3 -march=native picks the widest the machine has.
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float fvec __attribute__((vector_size(4 * kLanes)));
typedef int32_t ivec __attribute__((vector_size(4 * kLanes)));

inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, fvec v) { std::memcpy(p, &v, sizeof v); }

inline float lane_sum(fvec v) {
  float sum = 0.0f;
  for (int j = 0; j < kLanes; ++j) sum += v[j];
  return sum;
}

// Run body(begin, end) over [0, n) in chunks of `chunk` items, claimed in turn by this thread and by
// tasks on XLA's own CPU thread pool (no thread started per call). A task that starts late, or never,
// finds nothing left to claim: this thread waits only for chunks in progress, never for a task to be
// scheduled. The tasks share the counters through a shared_ptr, as they may start after this call
// returns (they then claim nothing and never call body). `work` (multiply-adds per item) keeps small
// calls on this thread: each task gets at least ~64k multiply-adds.
template <class Body>
void parallel_chunks(xla::ffi::ThreadPool& pool, int64_t n, int64_t chunk, int64_t work, const Body& body) {
  struct Claims {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto claims = std::make_shared<Claims>();
  auto run = [n, chunk, &body](Claims& c) {
    for (int64_t begin; (begin = c.next.fetch_add(chunk)) < n;) {
      const int64_t end = std::min(begin + chunk, n);
      body(begin, end);
      c.done.fetch_add(end - begin);
    }
  };
  // One task fewer than the pool has threads (this thread is the last worker; XLA sizes the pool to
  // the cores), and none beyond the chunks.
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t tasks = std::min<int64_t>({pool.num_threads() - 1, chunks - 1, n * work / 65536});
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([claims, run] { run(*claims); });
  }
  run(*claims);
  while (claims->done.load() < n) std::this_thread::yield();
}

}  // namespace oss_jax
