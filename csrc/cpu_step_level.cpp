// The CPU step kernel compiled for one SIMD level. setup.py compiles this file once per level
// (CPU_LEVELS): -DFD_LEVEL=scalar, avx2, avx512 or avx512bf16 and that level's -m flags, giving the entry points
// step_<level>, normals_<level>, bits_<level> and gram_chunk_<level> of cpu_step.h; cpu_step.cpp picks one at run time.
// Everything level-specific lives in an anonymous namespace so that no inline function compiled for
// this level can be picked by the linker for another level's code. Call only on a CPU that supports
// the level (cpu_step.cpp checks).
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_step.h"

#define FD_CAT_(a, b) a##b
#define FD_CAT(a, b) FD_CAT_(a, b)
#define FD_LEVEL_ID_scalar 1
#define FD_LEVEL_ID_avx2 2
#define FD_LEVEL_ID_avx512 3
#define FD_LEVEL_ID_avx512bf16 4
#define FD_LEVEL_ID FD_CAT(FD_LEVEL_ID_, FD_LEVEL)

#if FD_LEVEL_ID == FD_LEVEL_ID_scalar
#define FD_LEVEL_HEADER "cpu_vec_scalar.h"
#define FD_LEVEL_TYPE fd::LevelScalar
#elif (FD_LEVEL_ID == FD_LEVEL_ID_avx2 && defined(__AVX2__) && !defined(__AVX512F__)) || \
    (FD_LEVEL_ID == FD_LEVEL_ID_avx512 && defined(__AVX512F__) && !defined(__AVX512BF16__)) ||                \
    (FD_LEVEL_ID == FD_LEVEL_ID_avx512bf16 && defined(__AVX512BF16__) && defined(__AVX512BW__) &&             \
     defined(__AVX512DQ__))
#include <immintrin.h>
#define FD_LEVEL_HEADER "cpu_vec_simd.h"
#define FD_LEVEL_TYPE fd::LevelSimd
#if FD_LEVEL_ID == FD_LEVEL_ID_avx512 || FD_LEVEL_ID == FD_LEVEL_ID_avx512bf16
// GCC 12 false positive inside its own _mm512_undefined_epi32 (self-initialised; GCC PR105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#else
#error "FD_LEVEL must be scalar, avx2, avx512 or avx512bf16, compiled with that level's -m flags (setup.py's CPU_LEVELS)"
#endif

namespace {
#include FD_LEVEL_HEADER
#include "cpu_kernel.h"
#include "cpu_gram.h"
}  // namespace

namespace fd_cpu {

void FD_CAT(step_, FD_LEVEL)(const StepArgs& a) { fd::run_step<FD_LEVEL_TYPE>(a); }

void FD_CAT(normals_, FD_LEVEL)(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row,
                                uint32_t stream, int num_threads) {
  fd::run_normals<FD_LEVEL_TYPE>(out, seeds, batch, per_sample, row, stream, num_threads);
}

void FD_CAT(gram_chunk_, FD_LEVEL)(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1,
                                   double* acc) {
  fd_gram::run_chunk(slots, mask, dtype, i0, i1, acc);
}

void FD_CAT(bits_, FD_LEVEL)(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups,
                             uint32_t row, uint32_t stream) {
  fd::run_bits<FD_LEVEL_TYPE>(out, seeds, batch, g0, groups, row, stream);
}

}  // namespace fd_cpu
