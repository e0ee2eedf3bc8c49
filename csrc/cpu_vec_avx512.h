// AVX-512F level: 16 float / 8 double lanes. Same operations in the same order as the scalar
// level, so results are bit-identical across levels. Included inside an anonymous namespace by
// cpu_step_avx512.cpp, which compiles under #pragma GCC target("avx512f,avx2,fma,f16c").
#pragma once

#include "philox.h"
#include "step_math.h"

namespace fd {

struct VF16 {
  __m512 v;
  VF16() = default;
  VF16(__m512 x) : v(x) {}
  VF16(float c) : v(_mm512_set1_ps(c)) {}
};
struct VU16 {
  __m512i v;
  VU16() = default;
  VU16(__m512i x) : v(x) {}
  VU16(uint32_t c) : v(_mm512_set1_epi32(static_cast<int>(c))) {}
};
struct VD8 {
  __m512d v;
  VD8() = default;
  VD8(__m512d x) : v(x) {}
  VD8(double c) : v(_mm512_set1_pd(c)) {}
};

inline VF16 operator+(VF16 a, VF16 b) { return _mm512_add_ps(a.v, b.v); }
inline VF16 operator-(VF16 a, VF16 b) { return _mm512_sub_ps(a.v, b.v); }
inline VF16 operator*(VF16 a, VF16 b) { return _mm512_mul_ps(a.v, b.v); }
inline VF16 operator/(VF16 a, VF16 b) { return _mm512_div_ps(a.v, b.v); }
inline VF16 operator-(VF16 a) {
  return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(INT32_MIN)));
}
inline VF16 fd_sqrt(VF16 a) { return _mm512_sqrt_ps(a.v); }
inline VF16 fd_vmax(VF16 a, VF16 b) { return _mm512_max_ps(a.v, b.v); }  // b when either is NaN
inline VF16 fd_vmin(VF16 a, VF16 b) { return _mm512_min_ps(a.v, b.v); }

inline VD8 operator+(VD8 a, VD8 b) { return _mm512_add_pd(a.v, b.v); }
inline VD8 operator-(VD8 a, VD8 b) { return _mm512_sub_pd(a.v, b.v); }
inline VD8 operator*(VD8 a, VD8 b) { return _mm512_mul_pd(a.v, b.v); }
inline VD8 operator/(VD8 a, VD8 b) { return _mm512_div_pd(a.v, b.v); }
inline VD8 operator-(VD8 a) {
  return _mm512_castsi512_pd(_mm512_xor_si512(_mm512_castpd_si512(a.v), _mm512_set1_epi64(INT64_MIN)));
}
inline VD8 fd_vmax(VD8 a, VD8 b) { return _mm512_max_pd(a.v, b.v); }
inline VD8 fd_vmin(VD8 a, VD8 b) { return _mm512_min_pd(a.v, b.v); }

inline VU16 operator&(VU16 a, VU16 b) { return _mm512_and_si512(a.v, b.v); }
inline VU16 operator|(VU16 a, VU16 b) { return _mm512_or_si512(a.v, b.v); }
inline VU16 operator^(VU16 a, VU16 b) { return _mm512_xor_si512(a.v, b.v); }
inline VU16 operator~(VU16 a) { return _mm512_xor_si512(a.v, _mm512_set1_epi32(-1)); }
inline VU16 operator+(VU16 a, VU16 b) { return _mm512_add_epi32(a.v, b.v); }
inline VU16 operator-(VU16 a, VU16 b) { return _mm512_sub_epi32(a.v, b.v); }
inline VU16 operator<<(VU16 a, int n) { return _mm512_slli_epi32(a.v, static_cast<unsigned>(n)); }
inline VU16 operator>>(VU16 a, int n) { return _mm512_srli_epi32(a.v, static_cast<unsigned>(n)); }

inline VU16 fd_bits(VF16 a) { return _mm512_castps_si512(a.v); }
inline VF16 fd_from_bits(VU16 a) { return _mm512_castsi512_ps(a.v); }
inline VF16 fd_i2f(VU16 a) { return _mm512_cvtepi32_ps(a.v); }
inline VU16 fd_f2i(VF16 a) { return _mm512_cvttps_epi32(a.v); }
inline VU16 fd_lt(VF16 a, VF16 b) {
  return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ), _mm512_set1_epi32(-1));
}

inline void fd_mulhilo(uint32_t m, VU16 a, VU16& hi, VU16& lo) {
  const __m512i mm = _mm512_set1_epi32(static_cast<int>(m));
  __m512i even = _mm512_mul_epu32(a.v, mm);
  __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a.v, 32), mm);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

/// fd_box_muller<VF16, VU16> on N vectors at once: the same IEEE float operations in the same
/// order (so the same bits), with
///   - the N vectors' three polynomial chains (log, cos, sin) advanced in lockstep, so that 3N
///     independent chains hide the latency of the Horner steps;
///   - the integer glue on AVX-512 masks and vpternlogd;
///   - two multiplications by powers of two done exactly on the exponent bits:
///     fd_uniform01(u) = float(v) * 2^-24 with v = ((u >> 9) << 1) | 1 = (u >> 8) | 1, so the log
///     reads the bits of float(v) with 24 taken off the exponent, and fd_uniform01(u1) * float(2π)
///     equals float(v1) * (float(2π) * 2^-24) (a power-of-two scale commutes with rounding when
///     nothing is subnormal); -2 * log f is log f (< 0, normal) with its sign flipped and its
///     exponent raised by one (one integer add of 0x80800000).
template <int N>
__attribute__((always_inline)) inline void fd_box_muller16n(const VU16* u0, const VU16* u1, VF16* n0, VF16* n1) {
  const __m512i one = _mm512_set1_epi32(1);
  VF16 t[N], z[N], y[N], fe[N], th[N], x[N], zz[N], pc[N], ps[N];
  __m512i j[N];
  for (int v = 0; v < N; ++v) {
    // fd_log: f = m * 2^e with m in [0.5, 1); if m < sqrt(1/2): e -= 1, t = 2m - 1, else t = m - 1
    const __m512i bv =
        _mm512_castps_si512(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(u0[v].v, 8), one)));
    const __m512 m = _mm512_castsi512_ps(
        _mm512_ternarylogic_epi32(bv, _mm512_set1_epi32(0x007FFFFF), _mm512_set1_epi32(0x3F000000), 0xEA));  // a&b | c
    const __mmask16 lt = _mm512_cmp_ps_mask(m, _mm512_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    const __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bv, 23), _mm512_set1_epi32(126 + 24));
    fe[v] = _mm512_cvtepi32_ps(_mm512_mask_sub_epi32(e, lt, e, one));
    t[v] = VF16(_mm512_mask_add_ps(m, lt, m, m)) - VF16(1.0f);  // m + (m where lt, else +0)
    // fd_sincos's argument
    th[v] = VF16(_mm512_cvtepi32_ps(_mm512_or_si512(_mm512_srli_epi32(u1[v].v, 8), one))) *
            VF16(TWO_PI_F * 5.9604644775390625e-08f);
  }
  for (int v = 0; v < N; ++v) {
    z[v] = t[v] * t[v];
    y[v] = VF16(7.0376836292e-2f) * t[v] + VF16(-1.1514610310e-1f);
    // octant j (rounded up to even), x reduced to [-π/4, π/4]
    const __m512i q = _mm512_cvttps_epi32((th[v] * VF16(1.27323954473516f)).v);
    j[v] = _mm512_and_si512(_mm512_add_epi32(q, one), _mm512_set1_epi32(~1));
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF16(1.1676998740e-1f);
    const VF16 yj = _mm512_cvtepi32_ps(j[v]);
    x[v] = ((th[v] - yj * VF16(0.78515625f)) - yj * VF16(2.4187564849853515625e-4f)) -
           yj * VF16(3.77489497744594108e-8f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF16(-1.2420140846e-1f);
    zz[v] = x[v] * x[v];
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF16(1.4249322787e-1f);
    pc[v] = VF16(2.443315711809948e-5f) * zz[v] + VF16(-1.388731625493765e-3f);
    ps[v] = VF16(-1.9515295891e-4f) * zz[v] + VF16(8.3321608736e-3f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF16(-1.6668057665e-1f);
    pc[v] = pc[v] * zz[v] + VF16(4.166664568298827e-2f);
    ps[v] = ps[v] * zz[v] + VF16(-1.6666654611e-1f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF16(2.0000714765e-1f);
    pc[v] = pc[v] * zz[v] * zz[v] - VF16(0.5f) * zz[v] + VF16(1.0f);
    ps[v] = ps[v] * zz[v] * x[v] + x[v];
  }
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF16(-2.4999993993e-1f);
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF16(3.3333331174e-1f);
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] * z[v];
    y[v] = y[v] + VF16(-2.12194440e-4f) * fe[v];
    y[v] = y[v] - VF16(0.5f) * z[v];
    const VF16 lg = (t[v] + y[v]) + VF16(0.693359375f) * fe[v];
    const VF16 r = _mm512_sqrt_ps(
        _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(lg.v), _mm512_set1_epi32(0x80800000))));
    // j is even: where bit 1 is set the polynomials swap roles; sin's sign is bit 2 of j, cos's
    // is bit 2 of ~(j - 2), which for even j is bit 1 ^ bit 2
    const __mmask16 k2 = _mm512_test_epi32_mask(j[v], _mm512_set1_epi32(2));
    const __mmask16 k4 = _mm512_test_epi32_mask(j[v], _mm512_set1_epi32(4));
    const __m512i sgn = _mm512_set1_epi32(INT32_MIN);
    __m512i sn = _mm512_castps_si512(_mm512_mask_blend_ps(k2, ps[v].v, pc[v].v));
    __m512i cs = _mm512_castps_si512(_mm512_mask_blend_ps(k2, pc[v].v, ps[v].v));
    sn = _mm512_mask_xor_epi32(sn, k4, sn, sgn);
    cs = _mm512_mask_xor_epi32(cs, _kxor_mask16(k2, k4), cs, sgn);
    n0[v] = r * VF16(_mm512_castsi512_ps(cs));
    n1[v] = r * VF16(_mm512_castsi512_ps(sn));
  }
}

/// Philox4x32-10 rounds 0..9 on 8 groups held one per 64-bit lane (each counter word in the low
/// half; the high half is don't-care: vpmuludq reads only low halves and xor moves no bit down),
/// so one vpmuludq gives both halves of a product. c0 holds the groups' low counter words; the
/// words that are the same in every lane (c1 = g >> 32, c2 = row, c3 = stream and, in rounds 0-2,
/// what follows from them) are folded into scalars. The integer results equal fd_philox4x32_10's.
struct Philox8x64 {
  __m512i c0, c1, c2, c3;
};

/// Words of K groups-vectors (8 groups each) from their low counter words c0[v] (K independent
/// chains, interleaved so that their latencies overlap). k: a NoiseGen::Key (cpu_kernel.h).
template <int K, class NK>
__attribute__((always_inline)) inline void fd_philox8x64(Philox8x64 (&s)[K], const __m512i (&c0)[K], uint32_t ghi,
                                                         const NK& k) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(PHILOX_M1));
  const uint64_t ps = static_cast<uint64_t>(PHILOX_M0) * (k.h1r ^ ghi ^ k.k0[0]);  // round 1, c0 * M0
  const __m512i cr0 = _mm512_set1_epi32(static_cast<int>(k.stream ^ k.k1[0]));
  const __m512i cr1a = _mm512_set1_epi32(static_cast<int>(k.l1r ^ k.k0[1]));
  const __m512i cr1b = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ps >> 32) ^ k.k1[1]));
  const __m512i cr2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ps) ^ k.k1[2]));
  for (int v = 0; v < K; ++v) {
    // round 0: c1 = ghi, c2 = row, c3 = stream -> c0 = h1r ^ ghi ^ k0, c1 = l1r (scalars)
    const __m512i p0 = _mm512_mul_epu32(c0[v], m0);
    const __m512i a = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), cr0);
    // round 1: c0 scalar (its product is ps), c2 = a, c3 = p0
    const __m512i p1 = _mm512_mul_epu32(a, m1);
    s[v].c0 = _mm512_xor_si512(_mm512_srli_epi64(p1, 32), cr1a);
    s[v].c1 = p1;
    s[v].c2 = _mm512_xor_si512(p0, cr1b);
    // round 2: c3 = low half of ps (scalar)
    const __m512i q0 = _mm512_mul_epu32(s[v].c0, m0);
    const __m512i q1 = _mm512_mul_epu32(s[v].c2, m1);
    s[v].c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(q1, 32), s[v].c1,
                                        _mm512_set1_epi32(static_cast<int>(k.k0[2])), 0x96);
    s[v].c2 = _mm512_xor_si512(_mm512_srli_epi64(q0, 32), cr2);
    s[v].c1 = q1;
    s[v].c3 = q0;
  }
  for (int r = 3; r < 10; ++r) {
    const __m512i k0 = _mm512_set1_epi32(static_cast<int>(k.k0[r]));
    const __m512i k1 = _mm512_set1_epi32(static_cast<int>(k.k1[r]));
    for (int v = 0; v < K; ++v) {
      const __m512i p0 = _mm512_mul_epu32(s[v].c0, m0);
      const __m512i p1 = _mm512_mul_epu32(s[v].c2, m1);
      s[v].c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s[v].c1, k0, 0x96);
      s[v].c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s[v].c3, k1, 0x96);
      s[v].c1 = p1;
      s[v].c3 = p0;
    }
  }
}

struct LevelAvx512 {
  using VF = VF16;
  using VU = VU16;
  using VD = VD8;
  static constexpr int W = 16;
  static constexpr int WD = 8;
  static constexpr const char* name = "avx512";

  static VF load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static void store_f32(float* p, VF v) { _mm512_storeu_ps(p, v.v); }
  static VF load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f16(uint16_t* p, VF v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static VF load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, VF v) {
    __m512i x = _mm512_castps_si512(v.v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v.v, v.v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static VD load_f64(const double* p) { return _mm512_loadu_pd(p); }
  static void store_f64(double* p, VD v) { _mm512_storeu_pd(p, v.v); }
  static VD load_f32_as_f64(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
  static VU load_u32(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static void store_u32(uint32_t* p, VU v) { _mm512_storeu_si512(p, v.v); }
  /// Groups per noise_groups call: NG (the main loop) or NG1 (short runs and run ends).
  static constexpr int NG = 32;
  static constexpr int NG1 = 8;
  /// Box-Muller of the Philox words of K vectors of groups, stored in element order into d.
  template <int K>
  static void store_normals(float* d, const Philox8x64 (&s)[K]) {
    VU16 ur[K], ut[K];
    VF16 rc[K], rs[K];
    for (int v = 0; v < K; ++v) {
      ur[v] = _mm512_mask_shuffle_epi32(s[v].c0, 0xAAAA, s[v].c2, static_cast<_MM_PERM_ENUM>(0xA0));
      ut[v] = _mm512_mask_shuffle_epi32(s[v].c1, 0xAAAA, s[v].c3, static_cast<_MM_PERM_ENUM>(0xA0));
    }
    fd_box_muller16n<K>(ur, ut, rc, rs);
    for (int v = 0; v < K; ++v) {
      _mm512_storeu_ps(d + 32 * v, _mm512_unpacklo_ps(rc[v].v, rs[v].v));
      _mm512_storeu_ps(d + 32 * v + 16, _mm512_unpackhi_ps(rc[v].v, rs[v].v));
    }
  }
  /// Normals of the G consecutive groups g..g+G-1 of one sample (key k, a NoiseGen::Key) into
  /// d[0..4G), in element order. The low counter words of the groups must not wrap (the caller
  /// checks).
  template <int G, class NK>
  static void noise_groups(float* d, const NK& k, uint64_t g) {
    constexpr int K = G / 8;
    // lane i (64-bit) of vector v: group g + 8v + G(i), G = 0 4 1 5 2 6 3 7, so that after
    // Box-Muller on pairs (32-bit lane 2i: words 0, 1 of its group; lane 2i+1: words 2, 3)
    // unpacklo/unpackhi give groups 0-3 and 4-7 in element order
    const __m512i off = _mm512_set_epi64(7, 3, 6, 2, 5, 1, 4, 0);
    const uint32_t glo = static_cast<uint32_t>(g);
    __m512i c0[K];
    for (int v = 0; v < K; ++v) c0[v] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(glo + 8u * v)), off);
    Philox8x64 s[K];
    fd_philox8x64<K>(s, c0, static_cast<uint32_t>(g >> 32), k);
    store_normals<K>(d, s);
  }
  /// Words q[G(i)] (G as in noise_groups), one per 64-bit lane i.
  static __m512i load_lanes(const uint32_t* q) {
    const __m256i gi = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    return _mm512_cvtepu32_epi64(
        _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)), gi));
  }
  /// The general path: normals of 16 groups of any samples into d[0..64) in lane order, lane l
  /// being the group of key (klo[l], khi[l]) and counter (glo[l], ghi[l], row, stream).
  static void noise_lanes(float* d, const uint32_t* klo, const uint32_t* khi, const uint32_t* glo,
                          const uint32_t* ghi, uint32_t row, uint32_t stream) {
    constexpr int K = 2;
    // 64-bit lane i of vector v: lane 8v + G(i) (see noise_groups)
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(PHILOX_M0));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(PHILOX_M1));
    Philox8x64 s[K];
    __m512i k0[K], k1[K];
    for (int v = 0; v < K; ++v) {
      s[v].c0 = load_lanes(glo + 8 * v);
      s[v].c1 = load_lanes(ghi + 8 * v);
      s[v].c2 = _mm512_set1_epi32(static_cast<int>(row));
      s[v].c3 = _mm512_set1_epi32(static_cast<int>(stream));
      k0[v] = load_lanes(klo + 8 * v);
      k1[v] = load_lanes(khi + 8 * v);
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < K; ++v) {
        if (r) {
          k0[v] = _mm512_add_epi32(k0[v], _mm512_set1_epi32(static_cast<int>(PHILOX_W0)));
          k1[v] = _mm512_add_epi32(k1[v], _mm512_set1_epi32(static_cast<int>(PHILOX_W1)));
        }
        const __m512i p0 = _mm512_mul_epu32(s[v].c0, m0);
        const __m512i p1 = _mm512_mul_epu32(s[v].c2, m1);
        s[v].c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s[v].c1, k0[v], 0x96);
        s[v].c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s[v].c3, k1[v], 0x96);
        s[v].c1 = p1;
        s[v].c3 = p0;
      }
    }
    store_normals<K>(d, s);
  }
};

}  // namespace fd
