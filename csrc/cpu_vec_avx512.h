// AVX-512F level: 16 float / 8 double lanes. Same operations in the same order as the scalar
// level, so results are bit-identical across levels. Included inside an anonymous namespace by
// cpu_step_avx512.cpp, which compiles under #pragma GCC target("avx512f,avx2,fma,f16c").
#pragma once

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
  /// d[4*l + k] = n_k[l] for the 16 lanes l: 4x4 transposes per 128-bit lane, then lane shuffles.
  static void store_interleave4(float* d, VF n0, VF n1, VF n2, VF n3) {
    __m512 t0 = _mm512_unpacklo_ps(n0.v, n1.v), t1 = _mm512_unpackhi_ps(n0.v, n1.v);
    __m512 t2 = _mm512_unpacklo_ps(n2.v, n3.v), t3 = _mm512_unpackhi_ps(n2.v, n3.v);
    // o_i = [g_i, g_i+4, g_i+8, g_i+12], one group per 128-bit lane
    __m512 o0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 o1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
    __m512 o2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    __m512 o3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
    __m512 a = _mm512_shuffle_f32x4(o0, o1, _MM_SHUFFLE(1, 0, 1, 0));  // g0 g4 g1 g5
    __m512 b = _mm512_shuffle_f32x4(o2, o3, _MM_SHUFFLE(1, 0, 1, 0));  // g2 g6 g3 g7
    __m512 c = _mm512_shuffle_f32x4(o0, o1, _MM_SHUFFLE(3, 2, 3, 2));  // g8 g12 g9 g13
    __m512 e = _mm512_shuffle_f32x4(o2, o3, _MM_SHUFFLE(3, 2, 3, 2));  // g10 g14 g11 g15
    _mm512_storeu_ps(d, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(d + 16, _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_ps(d + 32, _mm512_shuffle_f32x4(c, e, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_ps(d + 48, _mm512_shuffle_f32x4(c, e, _MM_SHUFFLE(3, 1, 3, 1)));
  }
};

}  // namespace fd
