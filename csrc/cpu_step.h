// The CPU step kernel's interface: a plain struct of raw pointers (no torch) and the entry points
// of each SIMD level. bindings.cpp fills StepArgs from Python; cpu_step.cpp picks the level.
#pragma once

#include <stdint.h>

namespace fd_cpu {

/// Length of the packed coefficients (fd::N_COEF of step_math.h, which this header does not
/// include: each SIMD level compiles that header under its own target; bindings.cpp checks).
constexpr int N_COEF = 29;

/// One plan row over contiguous tensors of `numel` elements (`per_sample` per batch sample).
/// Element pointers share one storage dtype; null means "not given". Outputs may alias inputs
/// exactly (same pointer), never partially.
struct StepArgs {
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
  int64_t numel;
  int64_t per_sample;
  int dtype;                // fd::DTYPE_*
  int n_reads;
  int n_writes;
  int clip;                 // fd::CLIP_*
  uint32_t row;             // Philox counter word 2
  int num_threads;          // OpenMP threads (>= 1)
  double coef[N_COEF];      // packed coefficients (fastdiff.args.pack_row)
};

enum Level { LEVEL_SCALAR = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2 };

// Per-level entry points (cpu_step_<level>.cpp). Call only levels the CPU supports.
void step_scalar(const StepArgs& a);
void step_avx2(const StepArgs& a);
void step_avx512(const StepArgs& a);

/// Philox normals of samples [0, batch) x elements [0, per_sample) into out (float32, row-major).
void normals_scalar(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                    uint32_t stream, int num_threads);
void normals_avx2(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                  uint32_t stream, int num_threads);
void normals_avx512(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                    uint32_t stream, int num_threads);

/// Raw Philox words of groups [g0, g0 + groups) of every sample into out ([batch, groups * 4]).
void bits_scalar(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream);
void bits_avx2(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
               uint32_t stream);
void bits_avx512(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream);

/// Best level this CPU supports.
Level detect_level();
/// Level in use: FASTDIFF_CPU_SIMD if set (throws std::runtime_error if unknown or unsupported),
/// else detect_level(); changed by set_level.
Level current_level();
/// Force a level; throws std::invalid_argument naming the value if unknown or unsupported.
void set_level(const char* name);
const char* level_name(Level l);

/// Run one row on the current level.
void step(const StepArgs& a);
void normals(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
             int num_threads);
void bits(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
          uint32_t stream);

}  // namespace fd_cpu
