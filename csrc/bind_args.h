// The Python-side arguments of a plan row (19 pointers as integers, counts, codes, the packed
// coefficients), checked and unpacked into the step_params.h struct. Shared by bindings.cpp
// (fastdiff._C) and cuda_bindings.cpp (fastdiff._C_cuda): same pointer order, codes and messages.
// Checks what it can see (counts, codes, null pointers) and names the bad value; the tensors were
// validated by fastdiff/backends/{cpu,cuda}.py before their pointers crossed over.
#pragma once

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "step_math.h"
#include "step_params.h"

namespace fd_bind {

constexpr int N_PTRS = 19;
// Order of the pointer list passed to step() (g last: it came with contract v2 of the plan row).
inline const char* const PTR_NAMES[N_PTRS] = {"x",         "out",       "m",          "m_c",        "h_read[0]",
                                              "h_read[1]", "h_read[2]", "h_read[3]",  "h_write[0]", "h_write[1]",
                                              "z",         "z2",        "mask",       "known",      "w",
                                              "r",         "s",         "seeds",      "g"};
static_assert(fd_row::N_COEF == fd::N_COEF, "step_params.h and step_math.h disagree on the packed layout");

using Ptrs = std::array<uintptr_t, N_PTRS>;

[[noreturn]] inline void bad(const std::string& msg) { throw std::invalid_argument(msg); }

inline void need(const Ptrs& p, int i, const char* why) {
  if (!p[i]) bad(std::string(PTR_NAMES[i]) + " is required (" + why + ") but its pointer is null");
}

/// Range checks of the counts and codes (everything but the pointers).
inline void check_counts(int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
                         const std::vector<double>& coef) {
  if (numel < 0) bad("numel must be >= 0, got " + std::to_string(numel));
  if (per_sample < 1) bad("per_sample must be >= 1, got " + std::to_string(per_sample));
  if (numel % per_sample)
    bad("numel " + std::to_string(numel) + " is not a multiple of per_sample " + std::to_string(per_sample));
  if (dtype < fd::DTYPE_F32 || dtype > fd::DTYPE_BF16) bad("dtype code must be 0..3, got " + std::to_string(dtype));
  if (n_reads < 0 || n_reads > fd::MAX_READS) bad("n_reads must be 0..4, got " + std::to_string(n_reads));
  if (n_writes < 0 || n_writes > fd::MAX_WRITES) bad("n_writes must be 0..2, got " + std::to_string(n_writes));
  if (clip < fd::CLIP_NONE || clip > fd::CLIP_DYNAMIC) bad("clip must be 0, 1 or 2, got " + std::to_string(clip));
  if (static_cast<int>(coef.size()) != fd::N_COEF)
    bad("coef must have " + std::to_string(fd::N_COEF) + " entries, got " + std::to_string(coef.size()));
}

/// Every pointer the row reads or writes is non-null (after check_counts, for numel > 0).
inline void check_pointers(const Ptrs& p, int dtype, int n_reads, int n_writes, int clip,
                           const std::vector<double>& coef) {
  for (int i : {0, 1, 2}) need(p, i, "always");
  for (int k = 0; k < n_reads; ++k) need(p, 4 + k, "n_reads");
  for (int j = 0; j < n_writes; ++j) need(p, 8 + j, "n_writes");
  const bool cfg = p[3], rescale = p[15], mask = p[12], g = p[18];
  if (cfg) need(p, 14, "m_c is given");
  if (clip) need(p, 16, "clip != 0");
  if (mask) need(p, 13, "mask is given");
  const fd::StepFlags f =
      dtype == fd::DTYPE_F64
          ? fd::fd_make_flags(fd::fd_unpack_coef<double>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g)
          : fd::fd_make_flags(fd::fd_unpack_coef<float>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g);
  if ((f.z && !p[10]) || (f.z2 && !p[11])) need(p, 17, "the row draws Philox noise");
}

/// The element pointers of p into a (h_read / h_write beyond n_reads / n_writes left null).
inline void set_element_pointers(const Ptrs& p, int n_reads, int n_writes, fd_row::StepRow& a) {
  a.x = reinterpret_cast<const void*>(p[0]);
  a.out = reinterpret_cast<void*>(p[1]);
  a.m = reinterpret_cast<const void*>(p[2]);
  a.m_c = reinterpret_cast<const void*>(p[3]);
  for (int k = 0; k < 4; ++k) a.h_read[k] = k < n_reads ? reinterpret_cast<const void*>(p[4 + k]) : nullptr;
  for (int j = 0; j < 2; ++j) a.h_write[j] = j < n_writes ? reinterpret_cast<void*>(p[8 + j]) : nullptr;
  a.z = reinterpret_cast<const void*>(p[10]);
  a.z2 = reinterpret_cast<const void*>(p[11]);
  a.mask = reinterpret_cast<const void*>(p[12]);
  a.known = reinterpret_cast<const void*>(p[13]);
  a.g = reinterpret_cast<const void*>(p[18]);
}

/// The whole row: pointers, counts and coefficients (after check_counts and check_pointers).
inline void set_row(const Ptrs& p, int64_t numel, int64_t per_sample, int n_reads, int n_writes, int clip,
                    uint32_t row, const std::vector<double>& coef, fd_row::StepRow& a) {
  set_element_pointers(p, n_reads, n_writes, a);
  a.w = reinterpret_cast<const float*>(p[14]);
  a.r = reinterpret_cast<const float*>(p[15]);
  a.s = reinterpret_cast<const float*>(p[16]);
  a.seeds = reinterpret_cast<const int64_t*>(p[17]);
  a.numel = numel;
  a.per_sample = per_sample;
  a.n_reads = n_reads;
  a.n_writes = n_writes;
  a.clip = clip;
  a.row = row;
  for (int i = 0; i < fd::N_COEF; ++i) a.coef[i] = coef[i];
}

}  // namespace fd_bind
