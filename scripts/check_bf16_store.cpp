// The avx512bf16 level's bf16 store (LevelSimd::store_bf16: vcvtne2ps2bf16, the integer rounding for
// packets holding a subnormal or NaN) against step_math.h's fd_float_to_bf16 (c10::BFloat16's rounding)
// on all 2^32 float bit patterns. Needs a CPU with AVX512_BF16; about 5 s of one core:
//   g++ -O2 -std=c++17 -ffp-contract=off -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mavx2 \
//       -mfma -mf16c -Icsrc -Wno-maybe-uninitialized scripts/check_bf16_store.cpp -o /tmp/check_bf16 && /tmp/check_bf16
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <stdio.h>
#include <math.h>
#include "cpu_step.h"
namespace {
#include "cpu_vec_simd.h"
}
int main() {
  using namespace fd;
  uint64_t bad = 0, fast = 0;
  alignas(64) uint32_t in[32];
  alignas(64) uint16_t out[32];
  for (uint64_t base = 0; base < (1ull << 32); base += 32) {
    for (int i = 0; i < 32; ++i) in[i] = (uint32_t)(base + i);
    VF e, o;
    alignas(64) float ef[16], of[16];
    for (int i = 0; i < 16; ++i) { memcpy(&ef[i], &in[2 * i], 4); memcpy(&of[i], &in[2 * i + 1], 4); }
    e = LevelSimd::load_f32(ef); o = LevelSimd::load_f32(of);
    LevelSimd::store_bf16(out, VF2(e, o));
    for (int i = 0; i < 32; ++i) {
      float f; memcpy(&f, &in[i], 4);
      if (out[i] != fd_float_to_bf16(f)) { if (bad < 5) printf("bad %08x: %04x vs %04x\n", in[i], out[i], fd_float_to_bf16(f)); ++bad; }
    }
  }
  printf("mismatches: %llu\n", (unsigned long long)bad);
  return bad != 0;
}
