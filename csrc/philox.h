// Philox4x32-10 and Box–Muller: the noise of fastdiff, for host and device code.
//
// Reproduces fastdiff/rng.py. Element j of sample b at plan row `row` and noise stream `stream`:
//   key     = (seed & 0xFFFFFFFF, seed >> 32)
//   counter = (g & 0xFFFFFFFF, g >> 32, row, stream)      with g = j / 4
//   u0..u3  = philox4x32_10(counter, key)
//   f(u)    = ((u >> 9) * 2 + 1) * 2^-24                   exact float in (0, 1)
//   n0, n1  = sqrt(-2 ln f(u0)) * (cos, sin)(f(u1) * float(2π))
//   n2, n3  = sqrt(-2 ln f(u2)) * (cos, sin)(f(u3) * float(2π))
//   z       = n[j % 4]
// The uint32 words are bit-identical to rng.philox_bits; the normals agree with rng.philox_normal
// to float rounding (log and sincos below are Cephes-style polynomials, ~1 ulp, written against
// the primitives of fd_common.h so that scalar and SIMD code give identical bits).
//
// Generic code: U is uint32_t or a SIMD uint32 vector, F is float or a SIMD float vector.
#pragma once

#include "fd_common.h"

namespace fd {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
constexpr float TWO_PI_F = 6.283185307179586f;  // float(2π), as torch rounds the Python scalar
constexpr uint32_t STREAM_MAIN = 0;              // solver noise z
constexpr uint32_t STREAM_KNOWN = 1;             // known-region noise z2

/// 32x32 -> 64-bit product of a constant and a word: high and low halves.
FD_HD void fd_mulhilo(uint32_t m, uint32_t a, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(m, a);
  lo = m * a;
#else
  uint64_t p = static_cast<uint64_t>(m) * a;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
#endif
}

/// Philox4x32-10 in place on counter words c0..c3 with key k0, k1.
template <class U>
FD_HD void fd_philox4x32_10(U& c0, U& c1, U& c2, U& c3, U k0, U k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 = k0 + U(PHILOX_W0);
      k1 = k1 + U(PHILOX_W1);
    }
    U hi0, lo0, hi1, lo1;
    fd_mulhilo(PHILOX_M0, c0, hi0, lo0);
    fd_mulhilo(PHILOX_M1, c2, hi1, lo1);
    U n0 = hi1 ^ c1 ^ k0;
    U n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
}

/// Map uint32 words to exact floats in (0, 1): ((u >> 9) * 2 + 1) * 2^-24.
template <class F, class U>
FD_HD F fd_uniform01(U u) {
  return fd_i2f(((u >> 9) << 1) | U(1u)) * F(5.9604644775390625e-08f);
}

/// Natural log for normal positive finite x (Cephes logf).
template <class F>
FD_HD F fd_log(F x) {
  using U = decltype(fd_bits(x));
  U b = fd_bits(x);
  // x = m * 2^e with m in [0.5, 1)
  U e = (b >> 23) - U(126u);
  F m = fd_from_bits((b & U(0x807FFFFFu)) | U(0x3F000000u));
  // if m < sqrt(1/2): e -= 1, m = 2m - 1 else m = m - 1  (keeps m - 1 small)
  U lt = fd_lt(m, F(0.707106781186547524f));
  e = e + lt;  // lt is all-ones (-1) or 0
  F m2 = fd_from_bits(fd_bits(m) & lt);  // m where lt, else 0
  F t = (m + m2) - F(1.0f);
  F fe = fd_i2f(e);
  F z = t * t;
  F y = F(7.0376836292e-2f);
  y = y * t + F(-1.1514610310e-1f);
  y = y * t + F(1.1676998740e-1f);
  y = y * t + F(-1.2420140846e-1f);
  y = y * t + F(1.4249322787e-1f);
  y = y * t + F(-1.6668057665e-1f);
  y = y * t + F(2.0000714765e-1f);
  y = y * t + F(-2.4999993993e-1f);
  y = y * t + F(3.3333331174e-1f);
  y = y * t * z;
  y = y + F(-2.12194440e-4f) * fe;
  y = y - F(0.5f) * z;
  F r = t + y;
  return r + F(0.693359375f) * fe;
}

/// sin and cos of x for 0 <= x < 2^15 (Cephes sinf/cosf; fastdiff uses x in (0, 2π)).
template <class F>
FD_HD void fd_sincos(F x, F& s, F& c) {
  using U = decltype(fd_bits(x));
  // octant j (rounded up to even) and x reduced to [-π/4, π/4] by a 3-part Cody-Waite split
  U j = fd_f2i(x * F(1.27323954473516f));
  j = (j + U(1u)) & U(~1u);
  F y = fd_i2f(j);
  x = ((x - y * F(0.78515625f)) - y * F(2.4187564849853515625e-4f)) - y * F(3.77489497744594108e-8f);
  U sign_s = (j & U(4u)) << 29;
  U sign_c = (~(j - U(2u)) & U(4u)) << 29;
  U use_sin_poly = U(0u) - ((j & U(2u)) >> 1);  // all-ones where the roles of sin and cos swap
  F z = x * x;
  F pc = F(2.443315711809948e-5f);
  pc = pc * z + F(-1.388731625493765e-3f);
  pc = pc * z + F(4.166664568298827e-2f);
  pc = pc * z * z - F(0.5f) * z + F(1.0f);
  F ps = F(-1.9515295891e-4f);
  ps = ps * z + F(8.3321608736e-3f);
  ps = ps * z + F(-1.6666654611e-1f);
  ps = ps * z * x + x;
  U bc = fd_bits(pc), bs = fd_bits(ps);
  U sin_b = (bc & use_sin_poly) | (bs & ~use_sin_poly);
  U cos_b = (bs & use_sin_poly) | (bc & ~use_sin_poly);
  s = fd_from_bits(sin_b ^ sign_s);
  c = fd_from_bits(cos_b ^ sign_c);
}

/// Two standard normals from two uint32 words (float arithmetic, as rng.box_muller).
template <class F, class U>
FD_HD void fd_box_muller(U u0, U u1, F& n0, F& n1) {
  F r = fd_sqrt(F(-2.0f) * fd_log(fd_uniform01<F>(u0)));
  F theta = fd_uniform01<F>(u1) * F(TWO_PI_F);
  F s, c;
  fd_sincos(theta, s, c);
  n0 = r * c;
  n1 = r * s;
}

/// The four uint32 words of group g (elements 4g..4g+3) of one sample.
FD_HD void fd_philox_group_bits(uint64_t seed, uint64_t g, uint32_t row, uint32_t stream, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(g), c1 = static_cast<uint32_t>(g >> 32), c2 = row, c3 = stream;
  fd_philox4x32_10<uint32_t>(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

/// The four normals of group g (elements 4g..4g+3) of one sample.
FD_HD void fd_philox_group_normals(uint64_t seed, uint64_t g, uint32_t row, uint32_t stream, float out[4]) {
  uint32_t u[4];
  fd_philox_group_bits(seed, g, row, stream, u);
  fd_box_muller<float, uint32_t>(u[0], u[1], out[0], out[1]);
  fd_box_muller<float, uint32_t>(u[2], u[3], out[2], out[3]);
}

/// The normal of element j of one sample (computes its whole group; prefer groups in loops).
FD_HD float fd_philox_normal(uint64_t seed, uint64_t j, uint32_t row, uint32_t stream) {
  float n[4];
  fd_philox_group_normals(seed, j >> 2, row, stream, n);
  return n[j & 3];
}

}  // namespace fd
