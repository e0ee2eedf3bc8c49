// The SIMD levels of the CPU kernel, written once: AVX2 + FMA + F16C (8 float / 4 double lanes) or
// AVX-512F (16 / 8 lanes), whichever the -m flags of the translation unit enable (setup.py compiles
// cpu_step_level.cpp once per level). Included inside an anonymous namespace (see cpu_kernel.h).
//
// The vectors are GCC vector extensions of the register width (Vec<T>), so the operators of
// fd_common.h's vector contract are written once for both levels: + - * / & | ^ ~ as GCC's own
// vector operators (what the intrinsics for them expand to), the rest through the intrinsics whose
// names differ only in the width prefix, written FD_MM(op). What really differs per level is in the
// two sections marked "level-specific": negation, how a lane condition is held and used (AVX-512
// mask registers, AVX2 blend vectors), three-input logic (vpternlogd), blends of 32-bit lanes
// (Philox's 64-bit products), the lane order of the general noise path's loads, the split of floats
// into bf16 packets (VF2) and the half-width register of the fp16 loads.
//
// Every operation is the IEEE operation the scalar level performs (no FMA: the build uses
// -ffp-contract=off), so results are bit-identical across levels.
#pragma once

#include "philox.h"
#include "step_math.h"

#if defined(__AVX512F__)
#define FD_SIMD_BITS 512
// setup.py's avx512bf16 level: vcvtne2ps2bf16 for bf16 stores, with vfpclassps (AVX512DQ) finding the
// packets it would round differently and vpermw (AVX512BW) putting its result in packet order
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define FD_SIMD_BF16 1
#endif
#define FD_MM(op) _mm512_##op
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FD_SIMD_BITS 256
#define FD_MM(op) _mm256_##op
#else
#error "cpu_vec_simd.h needs -mavx2 -mfma -mf16c or -mavx512f (setup.py's CPU_LEVELS)"
#endif

namespace fd {

constexpr int SIMD_BYTES = FD_SIMD_BITS / 8;

/// The GCC vector of N lanes of T (by default, one register).
template <class T, int N>
struct RawVec {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <class T, int N = SIMD_BYTES / sizeof(T)>
using raw_t = typename RawVec<T, N>::type;

/// Unaligned load and store of any vector (as the intrinsics' loadu/storeu: through a type of
/// alignment 1 that may alias anything).
template <class R>
inline R vload(const void* p) {
  typedef R U __attribute__((aligned(1), may_alias));
  return *static_cast<const U*>(p);
}
template <class R>
inline void vstore(void* p, R v) {
  typedef R U __attribute__((aligned(1), may_alias));
  *static_cast<U*>(p) = v;
}

using RegI = raw_t<long long>;  // the intrinsics' integer register (__m256i, __m512i), convertible by a cast

inline raw_t<float> splat(float c) { return FD_MM(set1_ps)(c); }
inline raw_t<double> splat(double c) { return FD_MM(set1_pd)(c); }
inline raw_t<uint32_t> splat(uint32_t c) { return (raw_t<uint32_t>)FD_MM(set1_epi32)(static_cast<int>(c)); }

// Shifts, max/min and (in the level-specific part) negation through the intrinsics: GCC's vector
// operators give the same instructions, but these builtins are opaque to its middle end as they were
// in the per-level headers this file replaces, which keeps GCC's inlining, unrolling and block-layout
// choices for the kernel's loops (and so their measured speed) what they were.
inline raw_t<uint32_t> shl(raw_t<uint32_t> a, int n) { return (raw_t<uint32_t>)FD_MM(slli_epi32)((RegI)a, n); }
inline raw_t<uint32_t> shr(raw_t<uint32_t> a, int n) { return (raw_t<uint32_t>)FD_MM(srli_epi32)((RegI)a, n); }
// maxps/minps: b when either is NaN, as fd_common.h's scalar fd_vmax/fd_vmin.
inline raw_t<float> vmax(raw_t<float> a, raw_t<float> b) { return FD_MM(max_ps)(a, b); }
inline raw_t<double> vmax(raw_t<double> a, raw_t<double> b) { return FD_MM(max_pd)(a, b); }
inline raw_t<float> vmin(raw_t<float> a, raw_t<float> b) { return FD_MM(min_ps)(a, b); }
inline raw_t<double> vmin(raw_t<double> a, raw_t<double> b) { return FD_MM(min_pd)(a, b); }
// ---- level-specific: negation (the sign bit flipped; AVX-512F has only the integer xor) -------------
#if FD_SIMD_BITS == 512
inline raw_t<float> neg(raw_t<float> a) { return (raw_t<float>)((raw_t<uint32_t>)a ^ 0x80000000u); }
inline raw_t<double> neg(raw_t<double> a) { return (raw_t<double>)((raw_t<uint64_t>)a ^ 0x8000000000000000u); }
#else
inline raw_t<float> neg(raw_t<float> a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
inline raw_t<double> neg(raw_t<double> a) { return _mm256_xor_pd(a, _mm256_set1_pd(-0.0)); }
#endif

/// One register of T (float, double or uint32_t) with the operators of fd_common.h's vector
/// contract; the friends are found by argument-dependent lookup from the generic code.
template <class T>
struct Vec {
  using R = raw_t<T>;
  R v;
  Vec() = default;
  Vec(R x) : v(x) {}
  Vec(T c) : v(splat(c)) {}

  friend Vec operator+(Vec a, Vec b) { return a.v + b.v; }
  friend Vec operator-(Vec a, Vec b) { return a.v - b.v; }
  friend Vec operator*(Vec a, Vec b) { return a.v * b.v; }
  friend Vec operator/(Vec a, Vec b) { return a.v / b.v; }
  friend Vec operator-(Vec a) { return neg(a.v); }  // the sign bit flipped, as scalar negation
  friend Vec operator&(Vec a, Vec b) { return a.v & b.v; }
  friend Vec operator|(Vec a, Vec b) { return a.v | b.v; }
  friend Vec operator^(Vec a, Vec b) { return a.v ^ b.v; }
  friend Vec operator~(Vec a) { return ~a.v; }
  friend Vec operator<<(Vec a, int n) { return shl(a.v, n); }
  friend Vec operator>>(Vec a, int n) { return shr(a.v, n); }  // logical
  friend Vec fd_vmax(Vec a, Vec b) { return vmax(a.v, b.v); }
  friend Vec fd_vmin(Vec a, Vec b) { return vmin(a.v, b.v); }
};

using VF = Vec<float>;
using VU = Vec<uint32_t>;
using VD = Vec<double>;
constexpr int VW = SIMD_BYTES / 4;  // float lanes
constexpr int VQ = VW / 2;          // 64-bit lanes: Philox groups per vector of the fast paths

/// 2 * VW bf16 elements as two float registers: e holds the even elements (2i), o the odd ones
/// (2i + 1). One register of 16-bit lanes is exactly such a packet, each 32-bit lane holding an
/// even element in its low half and the next odd one in its high half, so conversion needs no
/// lane crossing: bf16 -> float is a shift (even) or a mask (odd), float -> bf16 the reverse (see
/// LevelSimd::load_bf16). The arithmetic is per element, so the order the lanes hold them in
/// changes no result. The operators are VF's, applied to both halves.
struct VF2 {
  VF e, o;
  VF2() = default;
  VF2(VF a, VF b) : e(a), o(b) {}
  VF2(float c) : e(c), o(c) {}

  friend VF2 operator+(VF2 a, VF2 b) { return {a.e + b.e, a.o + b.o}; }
  friend VF2 operator-(VF2 a, VF2 b) { return {a.e - b.e, a.o - b.o}; }
  friend VF2 operator*(VF2 a, VF2 b) { return {a.e * b.e, a.o * b.o}; }
  friend VF2 operator/(VF2 a, VF2 b) { return {a.e / b.e, a.o / b.o}; }
  friend VF2 operator-(VF2 a) { return {-a.e, -a.o}; }
  friend VF2 fd_vmax(VF2 a, VF2 b) { return {fd_vmax(a.e, b.e), fd_vmax(a.o, b.o)}; }
  friend VF2 fd_vmin(VF2 a, VF2 b) { return {fd_vmin(a.e, b.e), fd_vmin(a.o, b.o)}; }
};

inline VU fd_bits(VF a) { return (VU::R)a.v; }
inline VF fd_from_bits(VU a) { return (VF::R)a.v; }
inline VF fd_i2f(VU a) { return FD_MM(cvtepi32_ps)((RegI)a.v); }
inline VU fd_f2i(VF a) { return (VU::R)FD_MM(cvttps_epi32)(a.v); }  // truncation
inline VU fd_lt(VF a, VF b) { return (VU::R)(a.v < b.v); }
inline VF fd_sqrt(VF a) { return FD_MM(sqrt_ps)(a.v); }

// Philox works on UR, the bare register of 32-bit words (GCC's own ^ and +): an array of VU
// wrappers would make GCC's size estimate of its round loops too large to unroll them.
using UR = raw_t<uint32_t>;
/// 64-bit lanes: the high word moved to the low word (psrlq 32) and back (psllq 32).
inline UR hi_to_lo(UR a) { return (UR)FD_MM(srli_epi64)((RegI)a, 32); }
inline UR lo_to_hi(UR a) { return (UR)FD_MM(slli_epi64)((RegI)a, 32); }
/// 64-bit lanes: the products of the low words of a and b (pmuludq).
inline UR mul_even(UR a, UR b) { return (UR)FD_MM(mul_epu32)((RegI)a, (RegI)b); }

// ---- level-specific: conditions, blends, ternary logic, fp16/bf16 -----------------------------------
// HalfI: the integer register of half the width (W 16-bit lanes); F16_ROUND: vcvtps2ph's rounding.
// Mask: a condition per 32-bit lane, made by cmp_mask (a compare, _CMP_* predicate P) or bit_mask
// (bit b of j) and used by dec_where (a - 1 where set), add_where (a + b where set), select (b where
// set, else a) and flip_sign (the sign bit flipped where set). blend_odd: the even 32-bit lanes of
// a, the odd ones of b. pack_lo32: the low words of the 64-bit lanes of a in the even lanes, those
// of b in the odd ones. split_even_odd: the 2 * VW floats of a then b, as a VF2 (even elements, odd
// elements). add_bf16_bias: x + 0x7FFF + bit 16 of x (bf16's round to nearest even, mod 2^32).
#if FD_SIMD_BITS == 512
using HalfI = __m256i;
constexpr int F16_ROUND = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
using Mask = __mmask16;
template <int P>
inline Mask cmp_mask(VF a, VF b) {
  return _mm512_cmp_ps_mask(a.v, b.v, P);
}
inline Mask bit_mask(VU j, int b) { return _mm512_test_epi32_mask((RegI)j.v, (RegI)VU(1u << b).v); }
inline Mask mask_xor(Mask a, Mask b) { return _kxor_mask16(a, b); }
inline VU dec_where(VU a, Mask m) {
  return (VU::R)_mm512_mask_sub_epi32((RegI)a.v, m, (RegI)a.v, (RegI)VU(1u).v);
}
inline VF add_where(VF a, Mask m, VF b) { return _mm512_mask_add_ps(a.v, m, a.v, b.v); }
inline VF select(Mask m, VF a, VF b) { return _mm512_mask_blend_ps(m, a.v, b.v); }
inline VU select(Mask m, VU a, VU b) { return (VU::R)_mm512_mask_blend_epi32(m, (RegI)a.v, (RegI)b.v); }
inline VF flip_sign(VF a, Mask m) {
  const RegI x = (RegI)a.v;
  return (VF::R)_mm512_mask_xor_epi32(x, m, x, (RegI)VU(0x80000000u).v);
}
inline UR blend_odd(UR a, UR b) { return (UR)_mm512_mask_blend_epi32(0xAAAA, (RegI)a, (RegI)b); }
inline UR pack_lo32(UR a, UR b) {
  return (UR)_mm512_mask_shuffle_epi32((RegI)a, 0xAAAA, (RegI)b, static_cast<_MM_PERM_ENUM>(0xA0));
}
inline VU and_or(VU a, VU b, VU c) {  // (a & b) | c
  return (VU::R)_mm512_ternarylogic_epi32((RegI)a.v, (RegI)b.v, (RegI)c.v, 0xEA);
}
inline UR xor3(UR a, UR b, UR c) { return (UR)_mm512_ternarylogic_epi32((RegI)a, (RegI)b, (RegI)c, 0x96); }
inline VU add_bf16_bias(VU x) {  // x + 0x7FFF + bit 16 of x: the +1 as a masked add
  const RegI r = (RegI)(x + VU(0x7FFFu)).v;
  return (VU::R)_mm512_mask_add_epi32(r, _mm512_test_epi32_mask((RegI)x.v, (RegI)VU(0x10000u).v), r, (RegI)VU(1u).v);
}
inline VF2 split_even_odd(VF a, VF b) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return {_mm512_permutex2var_ps(a.v, ev, b.v), _mm512_permutex2var_ps(a.v, od, b.v)};
}
inline UR load_lanes(const uint32_t* q) {
  const __m256i g = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  return (UR)_mm512_cvtepu32_epi64(_mm256_permutevar8x32_epi32(vload<HalfI>(q), g));
}
#else
// No mask registers: a Mask is a vector, all ones where set (cmp_mask) or set in the sign bit only
// (bit_mask). select of VF and flip_sign read the sign bit; dec_where, add_where and select of VU
// need all ones.
using HalfI = __m128i;
constexpr int F16_ROUND = _MM_FROUND_TO_NEAREST_INT;
using Mask = VU;
template <int P>
inline Mask cmp_mask(VF a, VF b) {
  return (VU::R)_mm256_cmp_ps(a.v, b.v, P);
}
inline Mask bit_mask(VU j, int b) { return j << (31 - b); }
inline Mask mask_xor(Mask a, Mask b) { return a ^ b; }
inline VU dec_where(VU a, Mask m) { return a + m; }
// (and, xor: the float-domain forms, as the operands are floats)
inline VF add_where(VF a, Mask m, VF b) { return a + VF(_mm256_and_ps(b.v, (__m256)m.v)); }
inline VF select(Mask m, VF a, VF b) { return _mm256_blendv_ps(a.v, b.v, (__m256)m.v); }
inline VU select(Mask m, VU a, VU b) { return (VU::R)_mm256_blendv_epi8((RegI)a.v, (RegI)b.v, (RegI)m.v); }
inline VF flip_sign(VF a, Mask m) {
  return _mm256_xor_ps(a.v, _mm256_and_ps((__m256)m.v, (__m256)VU(0x80000000u).v));
}
inline UR blend_odd(UR a, UR b) { return (UR)_mm256_blend_epi32((RegI)a, (RegI)b, 0xAA); }
inline UR pack_lo32(UR a, UR b) { return blend_odd(a, (UR)_mm256_shuffle_epi32((RegI)b, 0xA0)); }
inline VU and_or(VU a, VU b, VU c) { return (a & b) | c; }
inline UR xor3(UR a, UR b, UR c) { return (a ^ b) ^ c; }
inline VU add_bf16_bias(VU x) { return x + (((x >> 16) & VU(1u)) + VU(0x7FFFu)); }  // x + 0x7FFF + bit 16 of x
inline VF2 split_even_odd(VF a, VF b) {
  // shuffle_ps picks within 128-bit lanes (a0 a2 b0 b2 | a4 a6 b4 b6); permute4x64 orders the 64-bit pairs
  const __m256d ev = _mm256_castps_pd(_mm256_shuffle_ps(a.v, b.v, _MM_SHUFFLE(2, 0, 2, 0)));
  const __m256d od = _mm256_castps_pd(_mm256_shuffle_ps(a.v, b.v, _MM_SHUFFLE(3, 1, 3, 1)));
  return {_mm256_castpd_ps(_mm256_permute4x64_pd(ev, 0xD8)), _mm256_castpd_ps(_mm256_permute4x64_pd(od, 0xD8))};
}
inline UR load_lanes(const uint32_t* q) {
  return (UR)_mm256_cvtepu32_epi64(_mm_shuffle_epi32(vload<HalfI>(q), _MM_SHUFFLE(3, 1, 2, 0)));
}
#endif
// ---- end of the level-specific part --------------------------------------------------------------

/// The 32x32 -> 64-bit products of a constant and each lane: high and low words (philox.h's
/// fd_mulhilo, lane by lane).
inline void fd_mulhilo(uint32_t m, VU a, VU& hi, VU& lo) {
  const UR mm = splat(m);
  const UR even = mul_even(a.v, mm);           // lanes 0, 2, 4, ... -> 64-bit
  const UR odd = mul_even(hi_to_lo(a.v), mm);  // lanes 1, 3, 5, ... -> 64-bit
  hi = blend_odd(hi_to_lo(even), odd);
  lo = blend_odd(even, lo_to_hi(odd));
}

/// 64-bit lane i of a vector of groups holds group G(i) = i / 2 + (i % 2) * VQ / 2 of its VQ groups
/// (0 2 1 3 on AVX2, 0 4 1 5 2 6 3 7 on AVX-512): after Box-Muller on the pairs of words (32-bit
/// lane 2i: words 0, 1 of the group; lane 2i + 1: words 2, 3), unpacklo/unpackhi, which work
/// within 128-bit lanes, give the groups in element order.
constexpr uint32_t lane_group(int i) { return static_cast<uint32_t>(i / 2 + (i % 2) * VQ / 2); }

/// G(i) in the low word of each 64-bit lane i (the high word 0).
inline UR lane_groups() {
  UR r{};
  for (int i = 0; i < VQ; ++i) r[2 * i] = lane_group(i);
  return r;
}

/// fd_box_muller<VF, VU> on N vectors at once: the same IEEE float operations in the same order
/// (so the same bits), with
///   - the N vectors' three polynomial chains (log, cos, sin) advanced in lockstep, so that 3N
///     independent chains hide the latency of the Horner steps;
///   - the lane conditions as Masks (mask registers on AVX-512);
///   - two multiplications by powers of two done exactly on the exponent bits:
///     fd_uniform01(u) = float(v) * 2^-24 with v = ((u >> 9) << 1) | 1 = (u >> 8) | 1, so the log
///     reads the bits of float(v) with 24 taken off the exponent, and fd_uniform01(u1) * float(2π)
///     equals float(v1) * (float(2π) * 2^-24) (a power-of-two scale commutes with rounding when
///     nothing is subnormal); -2 * log f is log f (< 0, normal) with its sign flipped and its
///     exponent raised by one (one integer add of 0x80800000).
template <int N>
__attribute__((always_inline)) inline void fd_box_muller_n(const VU* u0, const VU* u1, VF* n0, VF* n1) {
  const VU one(1u);
  VF t[N], z[N], y[N], fe[N], th[N], x[N], zz[N], pc[N], ps[N];
  VU j[N];
  for (int v = 0; v < N; ++v) {
    // fd_log: f = m * 2^e with m in [0.5, 1); if m < sqrt(1/2): e -= 1, t = 2m - 1, else t = m - 1
    const VU bv = fd_bits(fd_i2f((u0[v] >> 8) | one));
    const VF m = fd_from_bits(and_or(bv, VU(0x007FFFFFu), VU(0x3F000000u)));
    const Mask lt = cmp_mask<_CMP_LT_OQ>(m, VF(0.707106781186547524f));
    fe[v] = fd_i2f(dec_where((bv >> 23) - VU(126u + 24u), lt));
    t[v] = add_where(m, lt, m) - VF(1.0f);
    // fd_sincos's argument
    th[v] = fd_i2f((u1[v] >> 8) | one) * VF(TWO_PI_F * 5.9604644775390625e-08f);
  }
  for (int v = 0; v < N; ++v) {
    z[v] = t[v] * t[v];
    y[v] = VF(7.0376836292e-2f) * t[v] + VF(-1.1514610310e-1f);
    // octant j (rounded up to even), x reduced to [-π/4, π/4]
    j[v] = (fd_f2i(th[v] * VF(1.27323954473516f)) + one) & VU(~1u);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF(1.1676998740e-1f);
    const VF yj = fd_i2f(j[v]);
    x[v] = ((th[v] - yj * VF(0.78515625f)) - yj * VF(2.4187564849853515625e-4f)) - yj * VF(3.77489497744594108e-8f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF(-1.2420140846e-1f);
    zz[v] = x[v] * x[v];
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF(1.4249322787e-1f);
    pc[v] = VF(2.443315711809948e-5f) * zz[v] + VF(-1.388731625493765e-3f);
    ps[v] = VF(-1.9515295891e-4f) * zz[v] + VF(8.3321608736e-3f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF(-1.6668057665e-1f);
    pc[v] = pc[v] * zz[v] + VF(4.166664568298827e-2f);
    ps[v] = ps[v] * zz[v] + VF(-1.6666654611e-1f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF(2.0000714765e-1f);
    pc[v] = pc[v] * zz[v] * zz[v] - VF(0.5f) * zz[v] + VF(1.0f);
    ps[v] = ps[v] * zz[v] * x[v] + x[v];
  }
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF(-2.4999993993e-1f);
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF(3.3333331174e-1f);
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] * z[v];
    y[v] = y[v] + VF(-2.12194440e-4f) * fe[v];
    y[v] = y[v] - VF(0.5f) * z[v];
    const VF lg = (t[v] + y[v]) + VF(0.693359375f) * fe[v];
    const VF r = fd_sqrt(fd_from_bits(fd_bits(lg) + VU(0x80800000u)));
    // j is even: where bit 1 is set the polynomials swap roles; sin's sign is bit 2 of j, cos's
    // is bit 2 of ~(j - 2), which for even j is bit 1 ^ bit 2
    const Mask k2 = bit_mask(j[v], 1), k4 = bit_mask(j[v], 2);
    const VF sn = flip_sign(select(k2, ps[v], pc[v]), k4);
    const VF cs = flip_sign(select(k2, pc[v], ps[v]), mask_xor(k2, k4));
    n0[v] = r * cs;
    n1[v] = r * sn;
  }
}

/// Philox4x32-10 on VQ groups held one per 64-bit lane (each counter word in the low half; the
/// high half is don't-care: pmuludq reads only low halves and xor moves no bit down), so one
/// pmuludq gives both halves of a product. The integer results equal fd_philox4x32_10's.
struct Philox64 {
  UR c0, c1, c2, c3;
};

/// Rounds 0..9 of K vectors of groups from their low counter words c0[v] (K independent chains,
/// interleaved so that their latencies overlap). The words that are the same in every lane
/// (c1 = g >> 32, c2 = row, c3 = stream and, in rounds 0-2, what follows from them) are folded into
/// scalars. k: a NoiseGen::Key (cpu_kernel.h).
template <int K, class NK>
__attribute__((always_inline)) inline void fd_philox64(Philox64 (&s)[K], const UR (&c0)[K], uint32_t ghi,
                                                       const NK& k) {
  const UR m0 = splat(PHILOX_M0), m1 = splat(PHILOX_M1);
  const uint64_t ps = static_cast<uint64_t>(PHILOX_M0) * (k.h1r ^ ghi ^ k.k0[0]);  // round 1, c0 * M0
  const UR cr0 = splat(k.stream ^ k.k1[0]);
  const UR cr1a = splat(k.l1r ^ k.k0[1]);
  const UR cr1b = splat(static_cast<uint32_t>(ps >> 32) ^ k.k1[1]);
  const UR cr2 = splat(static_cast<uint32_t>(ps) ^ k.k1[2]);
  for (int v = 0; v < K; ++v) {
    // round 0: c1 = ghi, c2 = row, c3 = stream -> c0 = h1r ^ ghi ^ k0, c1 = l1r (scalars)
    const UR p0 = mul_even(c0[v], m0);
    const UR a = hi_to_lo(p0) ^ cr0;
    // round 1: c0 scalar (its product is ps), c2 = a, c3 = p0
    const UR p1 = mul_even(a, m1);
    s[v].c0 = hi_to_lo(p1) ^ cr1a;
    s[v].c1 = p1;
    s[v].c2 = p0 ^ cr1b;
    // round 2: c3 = low half of ps (scalar)
    const UR q0 = mul_even(s[v].c0, m0);
    const UR q1 = mul_even(s[v].c2, m1);
    s[v].c0 = xor3(hi_to_lo(q1), s[v].c1, splat(k.k0[2]));
    s[v].c2 = hi_to_lo(q0) ^ cr2;
    s[v].c1 = q1;
    s[v].c3 = q0;
  }
  for (int r = 3; r < 10; ++r) {
    const UR k0 = splat(k.k0[r]), k1 = splat(k.k1[r]);
    for (int v = 0; v < K; ++v) {
      const UR p0 = mul_even(s[v].c0, m0);
      const UR p1 = mul_even(s[v].c2, m1);
      s[v].c0 = xor3(hi_to_lo(p1), s[v].c1, k0);
      s[v].c2 = xor3(hi_to_lo(p0), s[v].c3, k1);
      s[v].c1 = p1;
      s[v].c3 = p0;
    }
  }
}

struct LevelSimd {
  using VF = fd::VF;
  using VU = fd::VU;
  using VD = fd::VD;
  static constexpr int W = VW;
  static constexpr int WD = VW / 2;  // double lanes
#ifdef FD_SIMD_BF16
  static constexpr const char* name = "avx512bf16";
#else
  static constexpr const char* name = FD_SIMD_BITS == 512 ? "avx512" : "avx2";
#endif

  static VF load_f32(const float* p) { return vload<VF::R>(p); }
  static void store_f32(float* p, VF v) { vstore(p, v.v); }
  static VF load_f16(const uint16_t* p) { return FD_MM(cvtph_ps)(vload<HalfI>(p)); }
  static void store_f16(uint16_t* p, VF v) { vstore(p, FD_MM(cvtps_ph)(v.v, F16_ROUND)); }
  // bf16 storage works on packets of WB = 2W elements (VF2): one full register of 16-bit lanes per
  // load and store, no widening or narrowing across lanes (vpmovzxwd, vpmovdw), which cost more
  // than the step's own arithmetic on a compute-bound core. Buffers of per-element floats that the
  // kernel fills itself (per-sample scalars) are laid out in packet order (bf16_slot); those it
  // gets in element order (noise) are split on load.
  using VB = VF2;
  static constexpr int WB = 2 * VW;
  static VB load_bf16(const uint16_t* p) {
    const VU x = vload<VU::R>(p);
    return {fd_from_bits(x << 16), fd_from_bits(x & VU(0xFFFF0000u))};
  }
  /// x rounded to bf16 in its high half, as c10::BFloat16: round to nearest even by integer
  /// addition (no FP rounding mode or flush-to-zero involved: subnormals round like the rest, and
  /// a carry out of the mantissa gives the next binade or inf); NaN -> 0x7FC0. The NaN is replaced
  /// before rounding by 0x7FC00000, which the addition leaves with that high half.
  static VU bf16_round(VF v) {
    return add_bf16_bias(select(cmp_mask<_CMP_UNORD_Q>(v, v), fd_bits(v), VU(0x7FC00000u)));
  }
  static void store_bf16_int(uint16_t* p, VB v) {
    vstore(p, and_or(bf16_round(v.o), VU(0xFFFF0000u), bf16_round(v.e) >> 16).v);
  }
#ifdef FD_SIMD_BF16
  /// vcvtne2ps2bf16 rounds to nearest even as bf16_round does, except that it reads subnormal
  /// inputs as zero and keeps a NaN's payload (c10::BFloat16: 0x7FC0): a packet holding either
  /// (vfpclassps: QNaN, SNaN, denormal) takes the integer path. (A normal input rounds to a normal
  /// bf16 or, from 0x7F7F8000 up in magnitude, to inf, as in the integer path; zeros and infinities
  /// keep their sign.)
  /// vpermw puts the even elements (the instruction's low half) and the odd ones back in packet order.
  static void store_bf16(uint16_t* p, VB v) {
    const __mmask16 odd = _mm512_fpclass_ps_mask(v.e.v, 0xA1) | _mm512_fpclass_ps_mask(v.o.v, 0xA1);
    if (__builtin_expect(odd != 0, 0)) return store_bf16_int(p, v);
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    vstore(p, _mm512_permutexvar_epi16(idx, (__m512i)_mm512_cvtne2ps_pbh(v.o.v, v.e.v)));
  }
#else
  static void store_bf16(uint16_t* p, VB v) { store_bf16_int(p, v); }
#endif
  /// Slot of element t (from a packet boundary) in a buffer of floats in packet order.
  static int bf16_slot(int t) { return (t & -WB) + (t & 1) * VW + ((t & (WB - 1)) >> 1); }
  static VB load_f32_packed(const float* p) { return {load_f32(p), load_f32(p + VW)}; }
  static void store_f32_packed(float* p, VB v) {
    store_f32(p, v.e);
    store_f32(p + VW, v.o);
  }
  static VB load_f32_split(const float* p) { return split_even_odd(load_f32(p), load_f32(p + VW)); }
  static VD load_f64(const double* p) { return vload<VD::R>(p); }
  static void store_f64(double* p, VD v) { vstore(p, v.v); }
  static VD load_f32_as_f64(const float* p) { return FD_MM(cvtps_pd)(vload<raw_t<float, WD>>(p)); }
  static VU load_u32(const uint32_t* p) { return vload<VU::R>(p); }
  static void store_u32(uint32_t* p, VU v) { vstore(p, v.v); }
  /// Groups per noise_groups call: NG (the main loop) or NG1 (short runs and run ends).
  static constexpr int NG = 4 * VQ;
  static constexpr int NG1 = 8;

  /// Box-Muller of the Philox words of K vectors of groups, stored in element order into d.
  template <int K>
  static void store_normals(float* d, const Philox64 (&s)[K]) {
    VU ur[K], ut[K];
    VF rc[K], rs[K];
    for (int v = 0; v < K; ++v) {
      ur[v] = pack_lo32(s[v].c0, s[v].c2);
      ut[v] = pack_lo32(s[v].c1, s[v].c3);
    }
    fd_box_muller_n<K>(ur, ut, rc, rs);
    for (int v = 0; v < K; ++v) {
      store_f32(d + 2 * W * v, FD_MM(unpacklo_ps)(rc[v].v, rs[v].v));
      store_f32(d + 2 * W * v + W, FD_MM(unpackhi_ps)(rc[v].v, rs[v].v));
    }
  }
  /// Normals of the G consecutive groups g..g+G-1 of one sample (key k, a NoiseGen::Key) into
  /// d[0..4G), in element order. The low counter words of the groups must not wrap (the caller
  /// checks).
  template <int G, class NK>
  static void noise_groups(float* d, const NK& k, uint64_t g) {
    static_assert(G % VQ == 0, "whole vectors of groups");
    constexpr int K = G / VQ;
    const uint32_t glo = static_cast<uint32_t>(g);
    const UR off = lane_groups();  // lane i of vector v: group g + VQ * v + G(i)
    UR c0[K];
    for (int v = 0; v < K; ++v) c0[v] = splat(glo + static_cast<uint32_t>(VQ * v)) + off;
    Philox64 s[K];
    fd_philox64<K>(s, c0, static_cast<uint32_t>(g >> 32), k);
    store_normals<K>(d, s);
  }
  /// The general path: normals of W groups of any samples into d[0..4W) in lane order, lane l
  /// being the group of key (klo[l], khi[l]) and counter (glo[l], ghi[l], row, stream).
  static void noise_lanes(float* d, const uint32_t* klo, const uint32_t* khi, const uint32_t* glo,
                          const uint32_t* ghi, uint32_t row, uint32_t stream) {
    constexpr int K = 2;  // 64-bit lane i of vector v: lane VQ * v + G(i)
    const UR m0 = splat(PHILOX_M0), m1 = splat(PHILOX_M1);
    Philox64 s[K];
    UR k0[K], k1[K];
    for (int v = 0; v < K; ++v) {
      s[v].c0 = load_lanes(glo + VQ * v);
      s[v].c1 = load_lanes(ghi + VQ * v);
      s[v].c2 = splat(row);
      s[v].c3 = splat(stream);
      k0[v] = load_lanes(klo + VQ * v);
      k1[v] = load_lanes(khi + VQ * v);
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < K; ++v) {
        if (r) {
          k0[v] = k0[v] + splat(PHILOX_W0);
          k1[v] = k1[v] + splat(PHILOX_W1);
        }
        const UR p0 = mul_even(s[v].c0, m0);
        const UR p1 = mul_even(s[v].c2, m1);
        s[v].c0 = xor3(hi_to_lo(p1), s[v].c1, k0[v]);
        s[v].c2 = xor3(hi_to_lo(p0), s[v].c3, k1[v]);
        s[v].c1 = p1;
        s[v].c3 = p0;
      }
    }
    store_normals<K>(d, s);
  }
};

}  // namespace fd
