// A minimal CUDA execution model on the host, for testing device code on machines without a GPU: every CUDA
// thread of a block is an OS thread; __syncthreads is a block barrier; __shfl_xor_sync exchanges through a
// per-warp slot array between two warp barriers; __shared__ variables are function statics (blocks run one
// after another, so one copy per kernel instantiation is exactly one block's shared memory). Intrinsics map
// to their accurate libm counterparts. Slow, and blind to the memory model; it checks arithmetic and indexing.
#pragma once

#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define CUDA_KERNEL_ASSERT(cond) assert(cond)

struct float4 {
  float x, y, z, w;
};

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fmul_rn(float a, float b) { return a * b; }  // x86 without -mfma: products are rounded anyway

namespace emu {
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline double warp_slots[32][32];

// Runs kernel() as `blocks` blocks of `threads` threads, block after block.
template <class Kernel>
void launch(unsigned blocks, unsigned threads, Kernel kernel) {
  assert(threads % 32 == 0 && threads <= 1024);
  for (unsigned b = 0; b < blocks; ++b) {
    block_barrier = std::make_unique<std::barrier<>>(threads);
    warp_barriers.clear();
    for (unsigned w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([=] {
        threadIdx.x = t;
        blockIdx.x = b;
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_xor_sync(unsigned /*mask*/, T v, int off) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  emu::warp_slots[warp][lane] = static_cast<double>(v);  // float and double round-trip exactly
  emu::warp_barriers[warp]->arrive_and_wait();
  const T r = static_cast<T>(emu::warp_slots[warp][lane ^ static_cast<unsigned>(off)]);
  emu::warp_barriers[warp]->arrive_and_wait();
  return r;
}
