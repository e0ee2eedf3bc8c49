// AVX2 + FMA + F16C level: 8 float / 4 double lanes. Every operation is the IEEE operation the
// scalar level performs (no FMA: the build uses -ffp-contract=off), so results are bit-identical
// across levels. Included inside an anonymous namespace by cpu_step_avx2.cpp, which compiles
// under #pragma GCC target("avx2,fma,f16c").
#pragma once

#include "philox.h"
#include "step_math.h"

namespace fd {

struct VF8 {
  __m256 v;
  VF8() = default;
  VF8(__m256 x) : v(x) {}
  VF8(float c) : v(_mm256_set1_ps(c)) {}
};
struct VU8 {
  __m256i v;
  VU8() = default;
  VU8(__m256i x) : v(x) {}
  VU8(uint32_t c) : v(_mm256_set1_epi32(static_cast<int>(c))) {}
};
struct VD4 {
  __m256d v;
  VD4() = default;
  VD4(__m256d x) : v(x) {}
  VD4(double c) : v(_mm256_set1_pd(c)) {}
};

inline VF8 operator+(VF8 a, VF8 b) { return _mm256_add_ps(a.v, b.v); }
inline VF8 operator-(VF8 a, VF8 b) { return _mm256_sub_ps(a.v, b.v); }
inline VF8 operator*(VF8 a, VF8 b) { return _mm256_mul_ps(a.v, b.v); }
inline VF8 operator/(VF8 a, VF8 b) { return _mm256_div_ps(a.v, b.v); }
inline VF8 operator-(VF8 a) { return _mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f)); }
inline VF8 fd_sqrt(VF8 a) { return _mm256_sqrt_ps(a.v); }
inline VF8 fd_vmax(VF8 a, VF8 b) { return _mm256_max_ps(a.v, b.v); }  // b when either is NaN
inline VF8 fd_vmin(VF8 a, VF8 b) { return _mm256_min_ps(a.v, b.v); }

inline VD4 operator+(VD4 a, VD4 b) { return _mm256_add_pd(a.v, b.v); }
inline VD4 operator-(VD4 a, VD4 b) { return _mm256_sub_pd(a.v, b.v); }
inline VD4 operator*(VD4 a, VD4 b) { return _mm256_mul_pd(a.v, b.v); }
inline VD4 operator/(VD4 a, VD4 b) { return _mm256_div_pd(a.v, b.v); }
inline VD4 operator-(VD4 a) { return _mm256_xor_pd(a.v, _mm256_set1_pd(-0.0)); }
inline VD4 fd_vmax(VD4 a, VD4 b) { return _mm256_max_pd(a.v, b.v); }
inline VD4 fd_vmin(VD4 a, VD4 b) { return _mm256_min_pd(a.v, b.v); }

inline VU8 operator&(VU8 a, VU8 b) { return _mm256_and_si256(a.v, b.v); }
inline VU8 operator|(VU8 a, VU8 b) { return _mm256_or_si256(a.v, b.v); }
inline VU8 operator^(VU8 a, VU8 b) { return _mm256_xor_si256(a.v, b.v); }
inline VU8 operator~(VU8 a) { return _mm256_xor_si256(a.v, _mm256_set1_epi32(-1)); }
inline VU8 operator+(VU8 a, VU8 b) { return _mm256_add_epi32(a.v, b.v); }
inline VU8 operator-(VU8 a, VU8 b) { return _mm256_sub_epi32(a.v, b.v); }
inline VU8 operator<<(VU8 a, int n) { return _mm256_slli_epi32(a.v, n); }
inline VU8 operator>>(VU8 a, int n) { return _mm256_srli_epi32(a.v, n); }

inline VU8 fd_bits(VF8 a) { return _mm256_castps_si256(a.v); }
inline VF8 fd_from_bits(VU8 a) { return _mm256_castsi256_ps(a.v); }
inline VF8 fd_i2f(VU8 a) { return _mm256_cvtepi32_ps(a.v); }
inline VU8 fd_f2i(VF8 a) { return _mm256_cvttps_epi32(a.v); }
inline VU8 fd_lt(VF8 a, VF8 b) { return _mm256_castps_si256(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)); }

inline void fd_mulhilo(uint32_t m, VU8 a, VU8& hi, VU8& lo) {
  const __m256i mm = _mm256_set1_epi32(static_cast<int>(m));
  __m256i even = _mm256_mul_epu32(a.v, mm);                         // lanes 0,2,4,6 -> 64-bit
  __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), mm);  // lanes 1,3,5,7 -> 64-bit
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

/// fd_box_muller<VF8, VU8> on N vectors at once: the same IEEE float operations in the same
/// order (so the same bits), the N vectors' polynomial chains in lockstep, and the exact
/// shortcuts of fd_box_muller16n (cpu_vec_avx512.h): float(v) with v = (u >> 8) | 1 for
/// fd_uniform01's numerator, its scale 2^-24 folded into the log's exponent and into float(2π),
/// and -2 * log f as an integer add of 0x80800000 to the bits of log f.
template <int N>
__attribute__((always_inline)) inline void fd_box_muller8n(const VU8* u0, const VU8* u1, VF8* n0, VF8* n1) {
  const __m256i one = _mm256_set1_epi32(1);
  VF8 t[N], z[N], y[N], fe[N], th[N], x[N], zz[N], pc[N], ps[N];
  __m256i j[N];
  for (int v = 0; v < N; ++v) {
    // fd_log: f = m * 2^e with m in [0.5, 1); if m < sqrt(1/2): e -= 1, t = 2m - 1, else t = m - 1
    const __m256i bv =
        _mm256_castps_si256(_mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(u0[v].v, 8), one)));
    const __m256 m = _mm256_castsi256_ps(
        _mm256_or_si256(_mm256_and_si256(bv, _mm256_set1_epi32(0x007FFFFF)), _mm256_set1_epi32(0x3F000000)));
    const __m256 lt = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
    const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bv, 23), _mm256_set1_epi32(126 + 24));
    fe[v] = _mm256_cvtepi32_ps(_mm256_add_epi32(e, _mm256_castps_si256(lt)));  // lt: -1 or 0
    t[v] = VF8(_mm256_add_ps(m, _mm256_and_ps(m, lt))) - VF8(1.0f);
    th[v] = VF8(_mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(u1[v].v, 8), one))) *
            VF8(TWO_PI_F * 5.9604644775390625e-08f);
  }
  for (int v = 0; v < N; ++v) {
    z[v] = t[v] * t[v];
    y[v] = VF8(7.0376836292e-2f) * t[v] + VF8(-1.1514610310e-1f);
    const __m256i q = _mm256_cvttps_epi32((th[v] * VF8(1.27323954473516f)).v);
    j[v] = _mm256_and_si256(_mm256_add_epi32(q, one), _mm256_set1_epi32(~1));
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF8(1.1676998740e-1f);
    const VF8 yj = _mm256_cvtepi32_ps(j[v]);
    x[v] = ((th[v] - yj * VF8(0.78515625f)) - yj * VF8(2.4187564849853515625e-4f)) -
           yj * VF8(3.77489497744594108e-8f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF8(-1.2420140846e-1f);
    zz[v] = x[v] * x[v];
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF8(1.4249322787e-1f);
    pc[v] = VF8(2.443315711809948e-5f) * zz[v] + VF8(-1.388731625493765e-3f);
    ps[v] = VF8(-1.9515295891e-4f) * zz[v] + VF8(8.3321608736e-3f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF8(-1.6668057665e-1f);
    pc[v] = pc[v] * zz[v] + VF8(4.166664568298827e-2f);
    ps[v] = ps[v] * zz[v] + VF8(-1.6666654611e-1f);
  }
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] + VF8(2.0000714765e-1f);
    pc[v] = pc[v] * zz[v] * zz[v] - VF8(0.5f) * zz[v] + VF8(1.0f);
    ps[v] = ps[v] * zz[v] * x[v] + x[v];
  }
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF8(-2.4999993993e-1f);
  for (int v = 0; v < N; ++v) y[v] = y[v] * t[v] + VF8(3.3333331174e-1f);
  for (int v = 0; v < N; ++v) {
    y[v] = y[v] * t[v] * z[v];
    y[v] = y[v] + VF8(-2.12194440e-4f) * fe[v];
    y[v] = y[v] - VF8(0.5f) * z[v];
    const VF8 lg = (t[v] + y[v]) + VF8(0.693359375f) * fe[v];
    const VF8 r = _mm256_sqrt_ps(
        _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(lg.v), _mm256_set1_epi32(0x80800000))));
    // j is even: bit 1 (moved to the sign bit) picks the polynomials; sin's sign is bit 2 of j,
    // cos's is bit 2 of ~(j - 2), which for even j is bit 1 ^ bit 2
    const __m256i j29 = _mm256_slli_epi32(j[v], 29), j30 = _mm256_slli_epi32(j[v], 30);
    const __m256 sgn = _mm256_castsi256_ps(_mm256_set1_epi32(INT32_MIN));
    __m256 sn = _mm256_blendv_ps(ps[v].v, pc[v].v, _mm256_castsi256_ps(j30));
    __m256 cs = _mm256_blendv_ps(pc[v].v, ps[v].v, _mm256_castsi256_ps(j30));
    sn = _mm256_xor_ps(sn, _mm256_and_ps(_mm256_castsi256_ps(j29), sgn));
    cs = _mm256_xor_ps(cs, _mm256_and_ps(_mm256_castsi256_ps(_mm256_xor_si256(j29, j30)), sgn));
    n0[v] = r * VF8(cs);
    n1[v] = r * VF8(sn);
  }
}

/// Philox4x32-10 on 4 groups held one per 64-bit lane (see fd_philox8x64 in cpu_vec_avx512.h:
/// the same scheme, with xor pairs for vpternlogd).
struct Philox4x64 {
  __m256i c0, c1, c2, c3;
};

template <int K, class NK>
__attribute__((always_inline)) inline void fd_philox4x64(Philox4x64 (&s)[K], const __m256i (&c0)[K], uint32_t ghi,
                                                         const NK& k) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(PHILOX_M1));
  const uint64_t ps = static_cast<uint64_t>(PHILOX_M0) * (k.h1r ^ ghi ^ k.k0[0]);
  const __m256i cr0 = _mm256_set1_epi32(static_cast<int>(k.stream ^ k.k1[0]));
  const __m256i cr1a = _mm256_set1_epi32(static_cast<int>(k.l1r ^ k.k0[1]));
  const __m256i cr1b = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ps >> 32) ^ k.k1[1]));
  const __m256i cr2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ps) ^ k.k1[2]));
  for (int v = 0; v < K; ++v) {
    const __m256i p0 = _mm256_mul_epu32(c0[v], m0);
    const __m256i a = _mm256_xor_si256(_mm256_srli_epi64(p0, 32), cr0);
    const __m256i p1 = _mm256_mul_epu32(a, m1);
    s[v].c0 = _mm256_xor_si256(_mm256_srli_epi64(p1, 32), cr1a);
    s[v].c1 = p1;
    s[v].c2 = _mm256_xor_si256(p0, cr1b);
    const __m256i q0 = _mm256_mul_epu32(s[v].c0, m0);
    const __m256i q1 = _mm256_mul_epu32(s[v].c2, m1);
    s[v].c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(q1, 32), s[v].c1),
                               _mm256_set1_epi32(static_cast<int>(k.k0[2])));
    s[v].c2 = _mm256_xor_si256(_mm256_srli_epi64(q0, 32), cr2);
    s[v].c1 = q1;
    s[v].c3 = q0;
  }
  for (int r = 3; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(k.k0[r]));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(k.k1[r]));
    for (int v = 0; v < K; ++v) {
      const __m256i p0 = _mm256_mul_epu32(s[v].c0, m0);
      const __m256i p1 = _mm256_mul_epu32(s[v].c2, m1);
      s[v].c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), s[v].c1), k0);
      s[v].c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), s[v].c3), k1);
      s[v].c1 = p1;
      s[v].c3 = p0;
    }
  }
}

struct LevelAvx2 {
  using VF = VF8;
  using VU = VU8;
  using VD = VD4;
  static constexpr int W = 8;
  static constexpr int WD = 4;
  static constexpr const char* name = "avx2";

  static VF load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static void store_f32(float* p, VF v) { _mm256_storeu_ps(p, v.v); }
  static VF load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f16(uint16_t* p, VF v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.v, _MM_FROUND_TO_NEAREST_INT));
  }
  static VF load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static void store_bf16(uint16_t* p, VF v) {
    // round to nearest even as c10::BFloat16; NaN -> 0x7FC0
    __m256i x = _mm256_castps_si256(v.v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v.v, v.v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static VD load_f64(const double* p) { return _mm256_loadu_pd(p); }
  static void store_f64(double* p, VD v) { _mm256_storeu_pd(p, v.v); }
  static VD load_f32_as_f64(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
  static VU load_u32(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store_u32(uint32_t* p, VU v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v.v); }
  /// Groups per noise_groups call: NG (the main loop) or NG1 (short runs and run ends).
  static constexpr int NG = 16;
  static constexpr int NG1 = 8;
  /// Box-Muller of the Philox words of K vectors of groups, stored in element order into d.
  template <int K>
  static void store_normals(float* d, const Philox4x64 (&s)[K]) {
    VU8 ur[K], ut[K];
    VF8 rc[K], rs[K];
    for (int v = 0; v < K; ++v) {
      ur[v] = _mm256_blend_epi32(s[v].c0, _mm256_shuffle_epi32(s[v].c2, 0xA0), 0xAA);
      ut[v] = _mm256_blend_epi32(s[v].c1, _mm256_shuffle_epi32(s[v].c3, 0xA0), 0xAA);
    }
    fd_box_muller8n<K>(ur, ut, rc, rs);
    for (int v = 0; v < K; ++v) {
      _mm256_storeu_ps(d + 16 * v, _mm256_unpacklo_ps(rc[v].v, rs[v].v));
      _mm256_storeu_ps(d + 16 * v + 8, _mm256_unpackhi_ps(rc[v].v, rs[v].v));
    }
  }
  /// Normals of the G consecutive groups g..g+G-1 of one sample (key k, a NoiseGen::Key) into
  /// d[0..4G), in element order. The low counter words of the groups must not wrap (the caller
  /// checks).
  template <int G, class NK>
  static void noise_groups(float* d, const NK& k, uint64_t g) {
    constexpr int K = G / 4;
    // lane i (64-bit) of vector v: group g + 4v + G(i), G = 0 2 1 3 (see LevelAvx512::noise_groups)
    const __m256i off = _mm256_set_epi64x(3, 1, 2, 0);
    const uint32_t glo = static_cast<uint32_t>(g);
    __m256i c0[K];
    for (int v = 0; v < K; ++v) c0[v] = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(glo + 4u * v)), off);
    Philox4x64 s[K];
    fd_philox4x64<K>(s, c0, static_cast<uint32_t>(g >> 32), k);
    store_normals<K>(d, s);
  }
  /// Words q[G(i)] (G as in noise_groups), one per 64-bit lane i.
  static __m256i load_lanes(const uint32_t* q) {
    return _mm256_cvtepu32_epi64(
        _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  /// The general path: normals of 8 groups of any samples into d[0..32) in lane order, lane l
  /// being the group of key (klo[l], khi[l]) and counter (glo[l], ghi[l], row, stream).
  static void noise_lanes(float* d, const uint32_t* klo, const uint32_t* khi, const uint32_t* glo,
                          const uint32_t* ghi, uint32_t row, uint32_t stream) {
    constexpr int K = 2;
    // 64-bit lane i of vector v: lane 4v + G(i), G = 0 2 1 3 (see noise_groups)
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(PHILOX_M0));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(PHILOX_M1));
    Philox4x64 s[K];
    __m256i k0[K], k1[K];
    for (int v = 0; v < K; ++v) {
      s[v].c0 = load_lanes(glo + 4 * v);
      s[v].c1 = load_lanes(ghi + 4 * v);
      s[v].c2 = _mm256_set1_epi32(static_cast<int>(row));
      s[v].c3 = _mm256_set1_epi32(static_cast<int>(stream));
      k0[v] = load_lanes(klo + 4 * v);
      k1[v] = load_lanes(khi + 4 * v);
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < K; ++v) {
        if (r) {
          k0[v] = _mm256_add_epi32(k0[v], _mm256_set1_epi32(static_cast<int>(PHILOX_W0)));
          k1[v] = _mm256_add_epi32(k1[v], _mm256_set1_epi32(static_cast<int>(PHILOX_W1)));
        }
        const __m256i p0 = _mm256_mul_epu32(s[v].c0, m0);
        const __m256i p1 = _mm256_mul_epu32(s[v].c2, m1);
        s[v].c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), s[v].c1), k0[v]);
        s[v].c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), s[v].c3), k1[v]);
        s[v].c1 = p1;
        s[v].c3 = p0;
      }
    }
    store_normals<K>(d, s);
  }
};

}  // namespace fd
