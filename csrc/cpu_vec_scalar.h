// Scalar "vector" level (one lane): the portable fallback of the CPU kernel. Uses the scalar
// primitives of fd_common.h, so it runs exactly the code the CUDA kernel runs per element.
// Included inside an anonymous namespace by cpu_step_scalar.cpp (see cpu_kernel.h).
#pragma once

#include "step_math.h"
#include "philox.h"

namespace fd {

struct LevelScalar {
  using VF = float;
  using VU = uint32_t;
  using VD = double;
  static constexpr int W = 1;   // float lanes
  static constexpr int WD = 1;  // double lanes
  static constexpr const char* name = "scalar";

  static VF load_f32(const float* p) { return *p; }
  static void store_f32(float* p, VF v) { *p = v; }
  static VF load_f16(const uint16_t* p) { return fd_half_to_float(*p); }
  static void store_f16(uint16_t* p, VF v) { *p = fd_float_to_half(v); }
  // bf16 packets (see cpu_vec_simd.h): one element here, so every layout is element order.
  using VB = float;
  static constexpr int WB = 1;
  static VB load_bf16(const uint16_t* p) { return fd_bf16_to_float(*p); }
  static void store_bf16(uint16_t* p, VB v) { *p = fd_float_to_bf16(v); }
  static int bf16_slot(int t) { return t; }
  static VB load_f32_packed(const float* p) { return *p; }
  static void store_f32_packed(float* p, VB v) { *p = v; }
  static VB load_f32_split(const float* p) { return *p; }
  static VD load_f64(const double* p) { return *p; }
  static void store_f64(double* p, VD v) { *p = v; }
  static VD load_f32_as_f64(const float* p) { return static_cast<double>(*p); }
  static VU load_u32(const uint32_t* p) { return *p; }
  static void store_u32(uint32_t* p, VU v) { *p = v; }
  /// Groups per noise_groups call.
  static constexpr int NG = 1;
  static constexpr int NG1 = 1;
  /// fd_philox_group_normals, written out so that the compiler sees the two Box-Muller pairs
  /// side by side (it may run them as one 2-lane SSE computation: the same IEEE operations).
  static void group_normals(float* d, uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
    fd_philox4x32_10<uint32_t>(c0, c1, c2, c3, k0, k1);
    fd_box_muller<float, uint32_t>(c0, c1, d[0], d[1]);
    fd_box_muller<float, uint32_t>(c2, c3, d[2], d[3]);
  }
  /// Normals of group g of one sample (key k, a NoiseGen::Key) into d[0..4).
  template <int G, class NK>
  static void noise_groups(float* d, const NK& k, uint64_t g) {
    static_assert(G == 1, "one group per call");
    group_normals(d, k.k0[0], k.k1[0], static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), k.row, k.stream);
  }
  /// The general path: the normals of the group of key (klo, khi) and counter (glo, ghi, row,
  /// stream) into d[0..4).
  static void noise_lanes(float* d, const uint32_t* klo, const uint32_t* khi, const uint32_t* glo,
                          const uint32_t* ghi, uint32_t row, uint32_t stream) {
    group_normals(d, *klo, *khi, *glo, *ghi, row, stream);
  }
};

}  // namespace fd
