// The per-element math of one plan row, written once for every C++/CUDA kernel.
//
// Semantics are those of fastdiff/backends/reference.py (the executable specification), in the
// same operation order, with no fused multiply-add in the CPU build (-ffp-contract=off):
//   e  = m                     or  m + w * (m_c - m)          (guidance, w per sample)
//   e  = r * e                                                 (optional rescale, r per sample)
//   or, in blend mode (per-sample coefficients a[0..8) given instead of w and r):
//   e  = a0*m [+ a1*(m_c - m)] [+ a2*(m_2 - m)] [+ a3*m_3]     (each term where its branch is given)
//   m_w = the same with a4..a7                                 (optional momentum write, after all reads)
//   e  = e + c_g * g                                           (optional gradient term, g given)
//   d  = a_x * x + a_e * e
//   d  = min(s, max(-s, d))    [then d / s]                    (clip 1 static, 2 dynamic)
//   v  = [x, d, e, h0..h3, z]                                  (e: before clipping touches d)
//   x' = c_x*x + c_d*d (+ c_e*e if c_e != 0) (+ c_{h+k}*h_k for k < n_reads) (+ c_z*z if c_z != 0)
//   x' = mask*x' + (1 - mask)*(known_a*known + known_s*z2)     (optional; z2 = 0 if known_s == 0)
//   H[write j] = same combination with the write's coefficients
//   u[k*numel + i] = u_scale * x'   (k < u_copies; x' as stored, i.e. rounded to the storage type)
//   *flag = 1 if any m, m_c, m_2 or m_3 element read is NaN or Inf       (optional; never cleared)
// T is the compute scalar (float for fp16/bf16/fp32 storage, double for fp64); V is T or a SIMD
// vector of T with operators + - * / (and unary -), fd_vmax/fd_vmin, constructible from a T.
// Also: fp16 and bf16 <-> float conversions (round to nearest even, as torch's casts) that need
// no CUDA headers.
#pragma once

#include "fd_common.h"

namespace fd {

constexpr int MAX_READS = 4;
constexpr int MAX_WRITES = 2;
// Operands of a combination, as fastdiff/plan.py numbers them: x, d, e, h0..h3, z.
constexpr int N_OPERANDS = 4 + MAX_READS;
constexpr int OP_X = 0, OP_D = 1, OP_E = 2, OP_H = 3, OP_Z = 3 + MAX_READS;
// Packed coefficients (fastdiff/args.py, the source of this layout: pack_row and COEF_OFFSETS, which
// fastdiff/backends/cpu.py checks against COEF_OFFSETS exported by bindings.cpp):
// a_x, a_e, out, write0, write1, known_a, known_s, c_g, u_scale.
constexpr int N_COEF = 6 + 3 * N_OPERANDS;
constexpr int C_AX = 0, C_AE = 1, C_OUT = 2, C_W0 = 2 + N_OPERANDS, C_W1 = 2 + 2 * N_OPERANDS;
constexpr int C_KNOWN_A = 2 + 3 * N_OPERANDS, C_KNOWN_S = 3 + 3 * N_OPERANDS, C_G = 4 + 3 * N_OPERANDS;
constexpr int C_U = 5 + 3 * N_OPERANDS;
static_assert(N_COEF == 30 && C_U == N_COEF - 1, "packed layout of fastdiff.args.pack_row");
constexpr int CLIP_NONE = 0, CLIP_STATIC = 1, CLIP_DYNAMIC = 2;
// Blend coefficients per combination (fastdiff/core/args.py BLEND_ROWS): b, a_1, a_2, a_3.
constexpr int BLEND_ROWS = 4;

// Storage dtype codes shared with fastdiff/backends/cpu.py.
constexpr int DTYPE_F32 = 0, DTYPE_F64 = 1, DTYPE_F16 = 2, DTYPE_BF16 = 3;

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 <-> float (bit patterns in uint16_t), integer-only so that no FMA contraction or
// flush-to-zero mode changes the result. Matches x86 F16C (vcvtps2ph, round to nearest even).

FD_HD float fd_half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0x1Fu) return fd_from_bits(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    // zero or subnormal: m * 2^-24 is exact in float
    float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return fd_from_bits(sign | fd_bits(v));
  }
  return fd_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

FD_HD uint16_t fd_float_to_half(float f) {
  uint32_t x = fd_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u)  // inf, or NaN made quiet keeping the top payload bits
    return static_cast<uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u | ((x >> 13) & 0x3FFu) : 0x7C00u));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds past 65504
  if (x < 0x38800000u) {                                                // half subnormal or zero
    if (x <= 0x33000000u) return static_cast<uint16_t>(sign);          // <= 2^-25 rounds to 0
    uint32_t m = (x & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126u - (x >> 23);  // 14..24
    uint32_t h = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (x - 0x38000000u) >> 13;  // rebias exponent 127 -> 15
  uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

FD_HD float fd_bf16_to_float(uint16_t h) { return fd_from_bits(static_cast<uint32_t>(h) << 16); }

FD_HD uint16_t fd_float_to_bf16(float f) {
  uint32_t x = fd_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // NaN, as c10::BFloat16
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// Coefficients and flags of one row.

/// A row's coefficients rounded to the compute type T (as reference.py rounds them).
template <class T>
struct StepCoef {
  T a_x, a_e;
  T out[N_OPERANDS];
  T wr[MAX_WRITES][N_OPERANDS];
  T known_a, known_s;
  T c_g;      // e += c_g * g
  T u_scale;  // u = u_scale * x' (the next row's model input)
};

/// What a row does, beyond its coefficients.
struct StepFlags {
  int n_reads;   // history reads, 0..MAX_READS
  int n_writes;  // history writes, 0..MAX_WRITES
  int clip;      // CLIP_NONE / CLIP_STATIC / CLIP_DYNAMIC
  bool cfg;      // m_c and w given
  bool rescale;  // r given
  bool mask;     // mask and known given
  bool g;        // gradient term g given (e += c_g * g, even where c_g == 0, as reference.py)
  bool e;        // x' or a history write has a non-zero e coefficient
  bool z;        // x' or a history write uses z
  bool z2;       // the mask blend uses z2 (mask && known_s != 0)
  int u_copies;  // copies of u_scale * x' written to u (0: none)
  bool check;    // record non-finite model output elements in *flag
  bool blend;    // blend mode: e from the per-sample coefficients a (cfg: m_c given; rescale false)
  bool m2, m3;   // blend branches m_2 / m_3 given
  bool mw;       // blend momentum write m_w given
};

/// Unpack the N_COEF packed float64 coefficients (fastdiff.args.pack_row order) into T.
template <class T>
FD_HD StepCoef<T> fd_unpack_coef(const double* p) {
  StepCoef<T> c;
  c.a_x = static_cast<T>(p[C_AX]);
  c.a_e = static_cast<T>(p[C_AE]);
  for (int k = 0; k < N_OPERANDS; ++k) {
    c.out[k] = static_cast<T>(p[C_OUT + k]);
    c.wr[0][k] = static_cast<T>(p[C_W0 + k]);
    c.wr[1][k] = static_cast<T>(p[C_W1 + k]);
  }
  c.known_a = static_cast<T>(p[C_KNOWN_A]);
  c.known_s = static_cast<T>(p[C_KNOWN_S]);
  c.c_g = static_cast<T>(p[C_G]);
  c.u_scale = static_cast<T>(p[C_U]);
  return c;
}

/// Flags of a row; e/z/z2 are decided on the rounded coefficients, as reference.py does.
template <class T>
FD_HD StepFlags fd_make_flags(const StepCoef<T>& c, int n_reads, int n_writes, int clip, bool cfg, bool rescale,
                              bool mask, bool g, int u_copies = 0, bool check = false, bool blend = false,
                              bool m2 = false, bool m3 = false, bool mw = false) {
  StepFlags f;
  f.blend = blend;
  f.m2 = blend && m2;
  f.m3 = blend && m3;
  f.mw = blend && mw;
  f.u_copies = u_copies;
  f.check = check;
  f.n_reads = n_reads;
  f.n_writes = n_writes;
  f.clip = clip;
  f.cfg = cfg;
  f.rescale = rescale;
  f.mask = mask;
  f.g = g;
  f.e = c.out[OP_E] != T(0);
  for (int j = 0; j < n_writes; ++j) f.e = f.e || c.wr[j][OP_E] != T(0);
  f.z = c.out[OP_Z] != T(0);
  for (int j = 0; j < n_writes; ++j) f.z = f.z || c.wr[j][OP_Z] != T(0);
  f.z2 = mask && c.known_s != T(0);
  return f;
}

// ---------------------------------------------------------------------------------------------
// The element math. Each piece is a function so a kernel can reuse it; fd_step_element composes.

/// e = m + w * (m_c - m)
template <class V>
FD_HD V fd_guidance(V m, V m_c, V w) {
  return m + w * (m_c - m);
}

/// Blend mode: a[k0]*m + a[k0+1]*(m_c - m) + a[k0+2]*(m_2 - m) + a[k0+3]*m_3, each term where its
/// branch is given (has_c, has_2, has_3), in that order.
template <class V>
FD_HD V fd_blend(const V* a, V m, V m_c, V m_2, V m_3, bool has_c, bool has_2, bool has_3) {
  V acc = a[0] * m;
  if (has_c) acc = acc + a[1] * (m_c - m);
  if (has_2) acc = acc + a[2] * (m_2 - m);
  if (has_3) acc = acc + a[3] * m_3;
  return acc;
}

/// d = clamp(d, -s, s), divided by s for dynamic thresholding. NaN in d propagates.
template <class V>
FD_HD V fd_clip(V d, V s, int clip) {
  if (clip == CLIP_NONE) return d;
  d = fd_vmin(s, fd_vmax(-s, d));
  return clip == CLIP_DYNAMIC ? d / s : d;
}

/// c · [x, d, e, h[0..n_reads), z]; the e and z terms only when their coefficients are non-zero.
/// `use_e` / `use_z` false promise that c[OP_E] / c[OP_Z] == 0 (StepFlags::e / ::z): kernels pass
/// constants to drop the terms and their per-element tests.
template <class V, class T>
FD_HD V fd_combine(const T* c, V x, V d, V e, const V* h, int n_reads, V z, bool use_e, bool use_z) {
  V acc = V(c[OP_X]) * x + V(c[OP_D]) * d;
  if (use_e && c[OP_E] != T(0)) acc = acc + V(c[OP_E]) * e;
  for (int k = 0; k < MAX_READS; ++k)  // constant indices (h stays in registers), run-time count
    if (k < n_reads) acc = acc + V(c[OP_H + k]) * h[k];
  if (use_z && c[OP_Z] != T(0)) acc = acc + V(c[OP_Z]) * z;
  return acc;
}

/// Inputs of one element (or one vector of elements). Unused members may hold anything.
template <class V>
struct StepIn {
  V x, m, m_c, g, z, mask, known, z2;
  V h[MAX_READS];
  V w, r, s;  // per-sample scalars, broadcast
  V m_2, m_3;                // blend branches (blend mode)
  V a[2 * BLEND_ROWS];       // per-sample blend coefficients, broadcast (blend mode; a[4..8) with m_w)
};

/// Outputs of one element: the new state and the history writes.
template <class V>
struct StepOut {
  V x;
  V h[MAX_WRITES];
  V m_w;  // the momentum write (blend mode with m_w)
};

/// NaN for a non-finite v (inf - inf, NaN - NaN), else 0: summed into an accumulator, it records
/// whether any element read was non-finite (the build never re-associates or folds v - v).
template <class V>
FD_HD V fd_nonfinite(V v) {
  return v - v;
}

/// One row for one element (or vector): reads only `in`, so outputs may alias inputs in memory.
template <class V, class T>
FD_HD StepOut<V> fd_step_element(const StepCoef<T>& c, const StepFlags& f, const StepIn<V>& in) {
  StepOut<V> o;
  V e;
  if (f.blend) {
    e = fd_blend(in.a, in.m, in.m_c, in.m_2, in.m_3, f.cfg, f.m2, f.m3);
    if (f.mw) o.m_w = fd_blend(in.a + BLEND_ROWS, in.m, in.m_c, in.m_2, in.m_3, f.cfg, f.m2, f.m3);
  } else {
    e = f.cfg ? fd_guidance(in.m, in.m_c, in.w) : in.m;
    if (f.rescale) e = in.r * e;
  }
  if (f.g) e = e + V(c.c_g) * in.g;
  V d = V(c.a_x) * in.x + V(c.a_e) * e;
  d = fd_clip(d, in.s, f.clip);  // e stays the unclipped model output: it is an operand too
  o.x = fd_combine(c.out, in.x, d, e, in.h, f.n_reads, in.z, f.e, f.z);
  if (f.mask) {
    V z2 = f.z2 ? in.z2 : V(0);
    o.x = in.mask * o.x + (V(1) - in.mask) * (V(c.known_a) * in.known + V(c.known_s) * z2);
  }
  for (int j = 0; j < f.n_writes; ++j) o.h[j] = fd_combine(c.wr[j], in.x, d, e, in.h, f.n_reads, in.z, f.e, f.z);
  return o;
}

}  // namespace fd
