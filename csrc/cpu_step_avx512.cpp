// The CPU step kernel compiled for the avx512 level. Everything level-specific lives in an anonymous
// namespace so that no inline function compiled for this level can be picked by the linker for
// another level's code. Call only on a CPU that supports the level (cpu_step.cpp checks).
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

#include "cpu_step.h"

#pragma GCC target("avx512f,avx2,fma,f16c")
// GCC 12 false positive inside its own _mm512_undefined_epi32 (self-initialised; GCC PR105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace {
#include "cpu_vec_avx512.h"
#include "cpu_kernel.h"
}  // namespace

namespace fd_cpu {

void step_avx512(const StepArgs& a) { fd::run_step<fd::LevelAvx512>(a); }

void normals_avx512(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
                    int num_threads) {
  fd::run_normals<fd::LevelAvx512>(out, seeds, batch, per_sample, row, stream, num_threads);
}

void bits_avx512(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream) {
  fd::run_bits<fd::LevelAvx512>(out, seeds, batch, g0, groups, row, stream);
}

}  // namespace fd_cpu
