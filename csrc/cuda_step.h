// The CUDA step kernel's interface: a plain struct of raw device pointers (no torch, no CUDA
// headers), shared by cuda_bindings.cpp (host compiler) and cuda_step.cu (nvcc).
#pragma once

#include <stdint.h>

namespace fd_cuda {

/// Length of the packed coefficients (fd::N_COEF of step_math.h; cuda_bindings.cpp checks).
constexpr int N_COEF = 29;

/// One plan row over contiguous device tensors of `numel` elements (`per_sample` per sample).
/// Element pointers share one storage dtype; null means "not given". Outputs may alias inputs
/// exactly (same pointer), never partially. Same fields and meaning as fd_cpu::StepArgs.
struct StepParams {
  const void* x;
  void* out;
  const void* m;
  const void* m_c;        // conditional model output (guidance) or null
  const void* h_read[4];  // history reads, n_reads of them
  void* h_write[2];       // history writes, n_writes of them
  const void* z;          // external noise, or null for Philox stream 0
  const void* z2;         // external known-region noise, or null for Philox stream 1
  const void* mask;
  const void* known;
  const void* g;          // classifier-guidance gradient (e += c_g * g) or null
  const float* w;         // [B] guidance scale (with m_c)
  const float* r;         // [B] guidance-rescale factor or null
  const float* s;         // [B] clip bound (with clip)
  const int64_t* seeds;   // [B] Philox keys (when Philox noise is drawn)
  int64_t numel;
  int64_t per_sample;
  int n_reads;
  int n_writes;
  int clip;               // fd::CLIP_*
  uint32_t row;           // Philox counter word 2
  double coef[N_COEF];    // packed coefficients (fastdiff.args.pack_row)
};

/// Launch one row on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream).
/// `dtype` is fd::DTYPE_*; `max_blocks` > 0 caps the grid (tests use it to exercise the
/// grid-stride loop), 0 picks 8 blocks per SM. Returns null, or the CUDA error string.
const char* launch_step(const StepParams& p, int dtype, uintptr_t stream, int max_blocks);

/// Raw Philox words of groups [0, groups) of every sample into `out` ([batch, groups * 4] uint32).
const char* launch_bits(uint32_t* out, const int64_t* seeds, int64_t batch, int64_t groups, uint32_t row,
                        uint32_t stream_id, uintptr_t stream);

/// Whether the vectorised (16-byte) path applies: every pointer the row touches is 16-byte aligned.
bool vector_path(const StepParams& p);

}  // namespace fd_cuda
