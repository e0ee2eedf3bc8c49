// The plan row as raw pointers: the one struct both kernels take (no torch, no CUDA headers, no
// step_math.h, which each CPU SIMD level compiles under its own target). fd_cpu::StepArgs
// (cpu_step.h) extends it with the CPU-only fields; fd_cuda::StepParams (cuda_step.h) is it.
#pragma once

#include <stdint.h>

namespace fd_row {

/// Length of the packed coefficients (fd::N_COEF of step_math.h; bind_args.h checks).
constexpr int N_COEF = 30;

/// One plan row over contiguous tensors of `numel` elements (`per_sample` per batch sample).
/// Element pointers share one storage dtype; null means "not given". Outputs may alias inputs
/// exactly (same pointer), never partially.
struct StepRow {
  const void* x;
  void* out;
  const void* m;
  const void* m_c;          // conditional model output (guidance) or null
  const void* h_read[4];    // history reads, n_reads of them
  void* h_write[2];         // history writes, n_writes of them
  const void* z;            // external noise, or null for Philox stream 0
  const void* z2;           // external known-region noise, or null for Philox stream 1
  const void* mask;
  const void* known;
  const void* g;            // classifier-guidance gradient (e += c_g * g) or null
  const float* w;           // [B] guidance scale (with m_c)
  const float* r;           // [B] guidance-rescale factor or null
  const float* s;           // [B] clip bound (with clip)
  const int64_t* seeds;     // [B] Philox keys (when Philox noise is drawn)
  void* u;                  // next model input: u_copies * numel elements, or null
  int32_t* flag;            // set to 1 on a non-finite m / m_c / m_2 / m_3 element, or null
  const void* m_2;          // blend branch (blend mode) or null
  const void* m_3;          // blend branch (blend mode) or null
  const float* a;           // [4, B] or [8, B] blend coefficients: given, the row is in blend mode
  void* m_w;                // blend momentum write (with a, 8 rows) or null
  int u_copies;             // 0, 1 or 2
  int64_t u_stride;         // elements from one copy of u to the next (0: numel)
  int64_t numel;
  int64_t per_sample;
  int n_reads;
  int n_writes;
  int clip;                 // fd::CLIP_*
  uint32_t row;             // Philox counter word 2
  double coef[N_COEF];      // packed coefficients (fastdiff.args.pack_row)
};

}  // namespace fd_row
