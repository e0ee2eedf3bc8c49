// The CPU step kernel's interface: the plan row of step_params.h (raw pointers, no torch) and
// the entry points of each SIMD level. bindings.cpp fills StepArgs from Python (bind_args.h);
// cpu_step.cpp picks the level.
#pragma once

#include <stdint.h>

#include "step_params.h"

namespace fd_cpu {

using fd_row::N_COEF;

/// The plan row (step_params.h) plus what only the CPU kernel needs.
struct StepArgs : fd_row::StepRow {
  int dtype;                // fd::DTYPE_*
  int num_threads;          // OpenMP threads (>= 1)
};

enum Level { LEVEL_SCALAR = 0, LEVEL_AVX2 = 1, LEVEL_AVX512 = 2, LEVEL_AVX512BF16 = 3 };

// Per-level entry points (cpu_step_<level>.cpp). Call only levels the CPU supports.
void step_scalar(const StepArgs& a);
void step_avx2(const StepArgs& a);
void step_avx512(const StepArgs& a);
void step_avx512bf16(const StepArgs& a);

/// Philox normals of samples [0, batch) x elements [0, per_sample) into out (float32, row-major).
void normals_scalar(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                    uint32_t stream, int num_threads);
void normals_avx2(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                  uint32_t stream, int num_threads);
void normals_avx512(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                    uint32_t stream, int num_threads);
void normals_avx512bf16(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                    uint32_t stream, int num_threads);

/// Raw Philox words of groups [g0, g0 + groups) of every sample into out ([batch, groups * 4]).
void bits_scalar(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream);
void bits_avx2(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
               uint32_t stream);
void bits_avx512(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream);
void bits_avx512bf16(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream);

void gram_chunk_scalar(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc);
void gram_chunk_avx2(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc);
void gram_chunk_avx512(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc);
void gram_chunk_avx512bf16(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc);

/// Best level this CPU supports.
Level detect_level();
/// Level in use: FASTDIFF_CPU_SIMD if set (throws std::runtime_error if unknown or unsupported),
/// else detect_level(); changed by set_level.
Level current_level();
/// Force a level; throws std::invalid_argument naming the value if unknown or unsupported.
void set_level(const char* name);
const char* level_name(Level l);

/// One chunk of the guidance Gram reduction (cpu_gram.h) on the current level.
void gram_chunk(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc);
/// Run one row on the current level.
void step(const StepArgs& a);
void normals(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
             int num_threads);
void bits(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
          uint32_t stream);

}  // namespace fd_cpu
