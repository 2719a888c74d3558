// A tiny CPU emulation of the CUDA features the histosurv kernels use, for testing their logic on
// machines without a GPU (tests/test_kernels_build.py). Not a general CUDA emulator:
//   * a kernel launch runs the grid's blocks one after another; each block's threads are OS threads,
//     __syncthreads is a barrier, __shfl_xor_sync exchanges through a per-warp buffer and barrier;
//   * __shared__ variables are function-local statics (blocks never overlap), dynamic shared memory
//     is one zero-filled buffer per launch (HS_DYNAMIC_SMEM);
//   * __half / __nv_bfloat16 are IEEE binary16 / bfloat16 with round-to-nearest-even conversions;
//   * the runtime API answers for a pretend device with kEmuSms SMs and 227 KB of shared memory.
// The kernel sources compile unchanged with g++ -x c++ -std=c++20 -DHS_CPU_EMULATION -I<this dir>.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) alignas(n)
#define __launch_bounds__(...)

// ---- vector and index types -------------------------------------------------------------------------
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct uint3 { unsigned x = 0, y = 0, z = 0; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline float __expf(float x) { return std::exp(x); }
using std::min;
using std::max;

// ---- half and bfloat16 --------------------------------------------------------------------------------
struct __half { uint16_t x; };
struct alignas(4) __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct alignas(4) __nv_bfloat162 { __nv_bfloat16 x, y; };

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.x, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float v) {
  const _Float16 f = static_cast<_Float16>(v);
  __half h;
  std::memcpy(&h.x, &f, 2);
  return h;
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t bits = uint32_t(b.x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  __nv_bfloat16 b;
  if (std::isnan(v)) {
    b.x = 0x7fc0;
  } else {
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
    b.x = static_cast<uint16_t>(bits >> 16);
  }
  return b;
}
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }

// ---- runtime API ------------------------------------------------------------------------------------
typedef enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 } cudaError_t;
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
constexpr int kEmuSms = 3;
constexpr size_t kMaxSmem = 227 * 1024;
inline cudaError_t last_error = cudaSuccess;

struct Block {  // what the threads of the running block share
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<float> exchange;  // [warps][32]
  std::vector<unsigned char> smem;
};
inline Block* current = nullptr;  // one block runs at a time

inline unsigned linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, Args... args) {
  const unsigned n = block.x * block.y * block.z;
  if (smem > kMaxSmem || n == 0 || n > 1024 || n % 32 != 0) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.bar = std::make_unique<std::barrier<>>(n);
        for (unsigned w = 0; w < n / 32; ++w) b.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
        b.exchange.assign(n, 0.f);
        b.smem.assign(smem + 16, 0);
        current = &b;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            blockIdx = {bx, by, bz};
            blockDim = block;
            gridDim = grid;
            kernel(args...);
            b.bar->arrive_and_drop();  // a finished thread no longer holds up __syncthreads
          });
        }
        for (auto& th : threads) th.join();
        current = nullptr;
      }
}

// HS_LAUNCH(kernel, grid, block, smem, stream)(args...) in emulation.
template <typename K> auto launcher(K kernel, dim3 grid, dim3 block, size_t smem) {
  return [=](auto... args) { launch(kernel, grid, block, smem, args...); };
}

inline unsigned char* dynamic_smem() {
  auto p = reinterpret_cast<uintptr_t>(current->smem.data());
  return reinterpret_cast<unsigned char*>((p + 15) & ~uintptr_t(15));
}
}  // namespace emu

inline void __syncthreads() { emu::current->bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
  const unsigned t = emu::linear_tid(), warp = t / 32, lane = t % 32;
  emu::Block& b = *emu::current;
  b.exchange[t] = v;
  b.warp_bar[warp]->arrive_and_wait();
  const float r = b.exchange[warp * 32 + (lane ^ unsigned(lane_mask))];
  b.warp_bar[warp]->arrive_and_wait();
  return r;
}

inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu::kEmuSms : static_cast<int>(emu::kMaxSmem);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error;
  emu::last_error = cudaSuccess;
  return e;
}
template <typename F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int value) {
  return value <= static_cast<int>(emu::kMaxSmem) ? cudaSuccess : cudaErrorInvalidValue;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
