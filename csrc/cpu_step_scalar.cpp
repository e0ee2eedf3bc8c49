// The CPU step kernel compiled for the scalar level. Everything level-specific lives in an anonymous
// namespace so that no inline function compiled for this level can be picked by the linker for
// another level's code. Call only on a CPU that supports the level (cpu_step.cpp checks).
#include <math.h>
#include <stdint.h>
#include <string.h>


#include "cpu_step.h"


namespace {
#include "cpu_vec_scalar.h"
#include "cpu_kernel.h"
}  // namespace

namespace fd_cpu {

void step_scalar(const StepArgs& a) { fd::run_step<fd::LevelScalar>(a); }

void normals_scalar(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
                    int num_threads) {
  fd::run_normals<fd::LevelScalar>(out, seeds, batch, per_sample, row, stream, num_threads);
}

void bits_scalar(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
                 uint32_t stream) {
  fd::run_bits<fd::LevelScalar>(out, seeds, batch, g0, groups, row, stream);
}

}  // namespace fd_cpu
