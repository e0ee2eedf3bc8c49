// Scalar "vector" level (one lane): the portable fallback of the CPU kernel. Uses the scalar
// primitives of fd_common.h, so it runs exactly the code the CUDA kernel runs per element.
// Included inside an anonymous namespace by cpu_step_scalar.cpp (see cpu_kernel.h).
#pragma once

#include "step_math.h"

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
  static VF load_bf16(const uint16_t* p) { return fd_bf16_to_float(*p); }
  static void store_bf16(uint16_t* p, VF v) { *p = fd_float_to_bf16(v); }
  static VD load_f64(const double* p) { return *p; }
  static void store_f64(double* p, VD v) { *p = v; }
  static VD load_f32_as_f64(const float* p) { return static_cast<double>(*p); }
  static VU load_u32(const uint32_t* p) { return *p; }
  static void store_u32(uint32_t* p, VU v) { *p = v; }
  /// d[4*l + k] = n_k[l]: the normals of W groups in element order.
  static void store_interleave4(float* d, VF n0, VF n1, VF n2, VF n3) {
    d[0] = n0;
    d[1] = n1;
    d[2] = n2;
    d[3] = n3;
  }
};

}  // namespace fd
