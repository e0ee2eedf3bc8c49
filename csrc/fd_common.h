// Shared by host and device code: the FD_HD qualifier and the scalar primitives that the generic
// math of philox.h and step_math.h is written against. No torch, no CPU-only includes.
//
// The generic functions in philox.h / step_math.h take a float type F (float, double or a SIMD
// vector) and a uint32 type U (uint32_t or a SIMD vector) and use only:
//   F: + - * /, F(constant), fd_sqrt, fd_vmax, fd_vmin, fd_lt (-> U mask)
//   U: & | ^ ~ + - << >>, U(constant), fd_bits(F), fd_from_bits(U), fd_i2f(U), fd_f2i(F)
// A mask is a U holding all-ones or all-zeros bits per lane. This file defines them for the
// scalar types; the CPU kernel defines the same names for its vector types, so every SIMD level
// evaluates bit-identical IEEE operations in the same order.
#pragma once

#include <math.h>    // sqrtf/sqrt (host; nvcc provides the device versions)
#include <stdint.h>
#include <string.h>  // memcpy for bit casts in host code

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FD_HD __host__ __device__ __forceinline__
#else
#define FD_HD inline
#endif

namespace fd {

FD_HD uint32_t fd_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
#endif
}

FD_HD float fd_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
#endif
}

/// int32 (held in a uint32) to float.
FD_HD float fd_i2f(uint32_t u) { return static_cast<float>(static_cast<int32_t>(u)); }
/// float to int32 by truncation (held in a uint32); callers keep |x| < 2^31.
FD_HD uint32_t fd_f2i(float x) { return static_cast<uint32_t>(static_cast<int32_t>(x)); }
/// all-ones where a < b (false for NaN), else zero.
FD_HD uint32_t fd_lt(float a, float b) { return a < b ? 0xFFFFFFFFu : 0u; }

FD_HD float fd_sqrt(float x) { return sqrtf(x); }
FD_HD double fd_sqrt(double x) { return sqrt(x); }

// max/min with the semantics of x86 maxps/minps: the second operand is returned when either is
// NaN. Put the value that may be NaN second so that NaN propagates, like torch.maximum/minimum.
FD_HD float fd_vmax(float a, float b) { return a > b ? a : b; }
FD_HD double fd_vmax(double a, double b) { return a > b ? a : b; }
FD_HD float fd_vmin(float a, float b) { return a < b ? a : b; }
FD_HD double fd_vmin(double a, double b) { return a < b ? a : b; }

}  // namespace fd
