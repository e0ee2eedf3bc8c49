// Just enough of CUDA to compile cuda_step.cu as plain C++ and run its kernels on the CPU
// (tests only: `g++ -DFD_CUDA_EMU -x c++ csrc/cuda_step.cu`). A launch runs every thread of every
// block one after another, in order, with blockIdx/threadIdx/blockDim/gridDim set as on a GPU, so
// the kernel's own indexing (grid-stride loop, chunks, tails) is what the test exercises.
// Threads never run concurrently: __syncthreads() is a no-op, which is exact for a kernel whose
// shared memory is written by thread 0 before the barrier and only read after it.
// 16-byte loads and stores check their alignment (fd_emu::check_aligned16) and throw where the
// device would fault.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for host compilers; nvcc compiles cuda_step.cu for real"
#endif

#include <stdint.h>
#include <string.h>

#include <stdexcept>

#include "step_math.h"

#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 blockIdx, threadIdx, blockDim, gridDim;

inline void __syncthreads() {}

struct uint4 {
  unsigned x, y, z, w;
};

// Storage types with the host helpers of step_math.h (round to nearest even, like the device).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) { return fd::fd_half_to_float(h.bits); }
inline __half __float2half_rn(float f) { return __half{fd::fd_float_to_half(f)}; }
inline float __bfloat162float(__nv_bfloat16 h) { return fd::fd_bf16_to_float(h.bits); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{fd::fd_float_to_bf16(f)}; }

// Runtime API: streams are ignored, errors never happen, the "device" has 2 SMs.
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 2;
  return cudaSuccess;
}
// Versions (csrc/cuda_info.cu): an emulated toolkit 13.0 whose driver supports it, one device.
#define CUDART_VERSION 13000
inline const char* cudaGetErrorName(cudaError_t) { return "cudaSuccess"; }
inline cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaDriverGetVersion(int* v) {
  *v = CUDART_VERSION;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

/// 4 blocks of 256 threads per SM: what a 64-register kernel gets on sm_80 / sm_90.
template <class K>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, K, int, size_t) {
  *n = 4;
  return cudaSuccess;
}

/// 16-byte loads and stores made so far (every launch adds to it): tests read it through ctypes
/// (an exported C symbol, so no binding is needed) to see which operands took the vector path.
/// An inline variable: every emulated source including this header (cuda_step.cu, cuda_info.cu) shares one.
extern "C" {
__attribute__((visibility("default"))) inline long long fd_emu_vec16_accesses = 0;
}

namespace fd_emu {

/// A 128-bit load or store must be 16-byte aligned: on the device a misaligned one faults
/// (cudaErrorMisalignedAddress); here it throws, so tests see the kernel's alignment decisions.
inline void check_aligned16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) & 15u)
    throw std::runtime_error("misaligned address: a 16-byte access not on a 16-byte boundary (emulated fault)");
  ++fd_emu_vec16_accesses;
}

/// `FD_LAUNCH(k, grid, block, stream)(args...)`: run k(args...) for every block and thread.
template <class K>
struct Launch {
  dim3 grid, block;
  K kernel;
  template <class... A>
  void operator()(const A&... args) const {
    gridDim = grid;
    blockDim = block;
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx)
          for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
              for (unsigned tx = 0; tx < block.x; ++tx) {
                blockIdx = dim3(bx, by, bz);
                threadIdx = dim3(tx, ty, tz);
                kernel(args...);
              }
  }
};

template <class K>
Launch<K> launch(dim3 grid, dim3 block, K kernel) {
  return Launch<K>{grid, block, kernel};
}

}  // namespace fd_emu

#define FD_LAUNCH(kernel, grid, block, stream) ((void)(stream), ::fd_emu::launch(dim3(grid), dim3(block), kernel))
