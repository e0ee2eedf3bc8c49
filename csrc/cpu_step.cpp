// Run-time choice of the CPU kernel's SIMD level: the best the CPU supports, or the one named by
// FASTDIFF_CPU_SIMD (scalar | avx2 | avx512 | avx512bf16), or one forced by set_level (for tests).
#include "cpu_step.h"

#include <stdexcept>
#include <string>
#include <cstdlib>

namespace fd_cpu {
namespace {

bool supports(Level l) {
  switch (l) {
    case LEVEL_SCALAR: return true;
    case LEVEL_AVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case LEVEL_AVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case LEVEL_AVX512BF16:
      return supports(LEVEL_AVX512) && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

Level parse(const std::string& name, const char* what) {
  Level l;
  if (name == "scalar") l = LEVEL_SCALAR;
  else if (name == "avx2") l = LEVEL_AVX2;
  else if (name == "avx512") l = LEVEL_AVX512;
  else if (name == "avx512bf16") l = LEVEL_AVX512BF16;
  else
    throw std::invalid_argument(std::string(what) + " must be 'scalar', 'avx2', 'avx512' or 'avx512bf16', got '" +
                                name + "'");
  if (!supports(l))
    throw std::invalid_argument(std::string(what) + "='" + name + "' but this CPU does not support it (best: " +
                                level_name(detect_level()) + ")");
  return l;
}

Level initial_level() {
  const char* env = std::getenv("FASTDIFF_CPU_SIMD");
  if (env && *env) return parse(env, "FASTDIFF_CPU_SIMD");
  return detect_level();
}

Level g_level = LEVEL_SCALAR;
bool g_level_set = false;

}  // namespace

Level detect_level() {
  __builtin_cpu_init();
  if (supports(LEVEL_AVX512BF16)) return LEVEL_AVX512BF16;
  if (supports(LEVEL_AVX512)) return LEVEL_AVX512;
  if (supports(LEVEL_AVX2)) return LEVEL_AVX2;
  return LEVEL_SCALAR;
}

Level current_level() {
  if (!g_level_set) {
    g_level = initial_level();
    g_level_set = true;
  }
  return g_level;
}

void set_level(const char* name) {
  g_level = parse(name, "level");
  g_level_set = true;
}

const char* level_name(Level l) {
  switch (l) {
    case LEVEL_SCALAR: return "scalar";
    case LEVEL_AVX2: return "avx2";
    case LEVEL_AVX512: return "avx512";
    case LEVEL_AVX512BF16: return "avx512bf16";
  }
  return "?";
}

void step(const StepArgs& a) {
  switch (current_level()) {
    case LEVEL_AVX512BF16: step_avx512bf16(a); break;
    case LEVEL_AVX512: step_avx512(a); break;
    case LEVEL_AVX2: step_avx2(a); break;
    default: step_scalar(a); break;
  }
}

void normals(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
             int num_threads) {
  switch (current_level()) {
    case LEVEL_AVX512BF16: normals_avx512bf16(out, seeds, batch, per_sample, row, stream, num_threads); break;
    case LEVEL_AVX512: normals_avx512(out, seeds, batch, per_sample, row, stream, num_threads); break;
    case LEVEL_AVX2: normals_avx2(out, seeds, batch, per_sample, row, stream, num_threads); break;
    default: normals_scalar(out, seeds, batch, per_sample, row, stream, num_threads); break;
  }
}

void gram_chunk(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc) {
  switch (current_level()) {
    case LEVEL_AVX512BF16: gram_chunk_avx512bf16(slots, mask, dtype, i0, i1, acc); break;
    case LEVEL_AVX512: gram_chunk_avx512(slots, mask, dtype, i0, i1, acc); break;
    case LEVEL_AVX2: gram_chunk_avx2(slots, mask, dtype, i0, i1, acc); break;
    default: gram_chunk_scalar(slots, mask, dtype, i0, i1, acc); break;
  }
}

void bits(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
          uint32_t stream) {
  switch (current_level()) {
    case LEVEL_AVX512BF16: bits_avx512bf16(out, seeds, batch, g0, groups, row, stream); break;
    case LEVEL_AVX512: bits_avx512(out, seeds, batch, g0, groups, row, stream); break;
    case LEVEL_AVX2: bits_avx2(out, seeds, batch, g0, groups, row, stream); break;
    default: bits_scalar(out, seeds, batch, g0, groups, row, stream); break;
  }
}

}  // namespace fd_cpu
