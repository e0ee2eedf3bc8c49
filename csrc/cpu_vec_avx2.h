// AVX2 + FMA + F16C level: 8 float / 4 double lanes. Every operation is the IEEE operation the
// scalar level performs (no FMA: the build uses -ffp-contract=off), so results are bit-identical
// across levels. Included inside an anonymous namespace by cpu_step_avx2.cpp, which compiles
// under #pragma GCC target("avx2,fma,f16c").
#pragma once

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
  /// d[4*l + k] = n_k[l] for the 8 lanes l: a 4x8 transpose.
  static void store_interleave4(float* d, VF n0, VF n1, VF n2, VF n3) {
    __m256 t0 = _mm256_unpacklo_ps(n0.v, n1.v), t1 = _mm256_unpackhi_ps(n0.v, n1.v);
    __m256 t2 = _mm256_unpacklo_ps(n2.v, n3.v), t3 = _mm256_unpackhi_ps(n2.v, n3.v);
    // o_i holds group i in its low 128 bits and group i+4 in its high 128 bits
    __m256 o0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 o1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
    __m256 o2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    __m256 o3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(o0, o1, 0x20));
    _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(o2, o3, 0x20));
    _mm256_storeu_ps(d + 16, _mm256_permute2f128_ps(o0, o1, 0x31));
    _mm256_storeu_ps(d + 24, _mm256_permute2f128_ps(o2, o3, 0x31));
  }
};

}  // namespace fd
