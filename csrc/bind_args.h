// The Python-side arguments of a plan row (25 pointers as integers, counts, codes, the packed
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

// Order of the pointer list passed to step(): fastdiff/args.py PTR_NAMES is the source (the
// extension exports its copy and fastdiff/backends/cpu.py refuses one that differs).
enum Ptr {
  P_X, P_OUT, P_M, P_MC, P_H0, P_H1, P_H2, P_H3, P_W0, P_W1, P_Z, P_Z2, P_MASK, P_KNOWN, P_WS, P_R, P_S, P_SEEDS,
  P_G, P_U, P_FLAG, P_M2, P_M3, P_A, P_MW, N_PTRS
};
inline const char* const PTR_NAMES[N_PTRS] = {"x",         "out",        "m",          "m_c",   "h_read[0]", "h_read[1]",
                                              "h_read[2]", "h_read[3]",  "h_write[0]", "h_write[1]", "z", "z2",
                                              "mask",      "known",      "w",          "r",     "s",     "seeds",
                                              "g",         "u",          "flag",       "m_2",   "m_3",   "a",
                                              "m_w"};
static_assert(fd_row::N_COEF == fd::N_COEF, "step_params.h and step_math.h disagree on the packed layout");

using Ptrs = std::array<uintptr_t, N_PTRS>;

[[noreturn]] inline void bad(const std::string& msg) { throw std::invalid_argument(msg); }

inline void need(const Ptrs& p, int i, const char* why) {
  if (!p[i]) bad(std::string(PTR_NAMES[i]) + " is required (" + why + ") but its pointer is null");
}

/// Range checks of the counts and codes (everything but the pointers).
inline void check_counts(int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
                         const std::vector<double>& coef, int u_copies = 0) {
  if (u_copies < 0 || u_copies > 2) bad("u_copies must be 0, 1 or 2, got " + std::to_string(u_copies));
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
                           const std::vector<double>& coef, int u_copies = 0) {
  for (int i : {P_X, P_OUT, P_M}) need(p, i, "always");
  for (int k = 0; k < n_reads; ++k) need(p, P_H0 + k, "n_reads");
  for (int j = 0; j < n_writes; ++j) need(p, P_W0 + j, "n_writes");
  const bool cfg = p[P_MC], rescale = p[P_R], mask = p[P_MASK], g = p[P_G], blend = p[P_A];
  if (!blend) {
    for (int i : {P_M2, P_M3, P_MW})
      if (p[i]) bad(std::string(PTR_NAMES[i]) + " is given but a is null (branches beyond m_c need blend coefficients)");
  } else {
    for (int i : {P_WS, P_R})
      if (p[i]) bad(std::string(PTR_NAMES[i]) + " is given with a (a blend row's coefficients replace w and r)");
  }
  if (cfg && !blend) need(p, P_WS, "m_c is given");
  if (clip) need(p, P_S, "clip != 0");
  if (mask) need(p, P_KNOWN, "mask is given");
  if (u_copies) need(p, P_U, "u_copies > 0");
  const fd::StepFlags f =
      dtype == fd::DTYPE_F64
          ? fd::fd_make_flags(fd::fd_unpack_coef<double>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g)
          : fd::fd_make_flags(fd::fd_unpack_coef<float>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g);
  if ((f.z && !p[P_Z]) || (f.z2 && !p[P_Z2])) need(p, P_SEEDS, "the row draws Philox noise");
}

/// The element pointers of p into a (h_read / h_write beyond n_reads / n_writes left null).
inline void set_element_pointers(const Ptrs& p, int n_reads, int n_writes, fd_row::StepRow& a) {
  a.x = reinterpret_cast<const void*>(p[P_X]);
  a.out = reinterpret_cast<void*>(p[P_OUT]);
  a.m = reinterpret_cast<const void*>(p[P_M]);
  a.m_c = reinterpret_cast<const void*>(p[P_MC]);
  for (int k = 0; k < 4; ++k) a.h_read[k] = k < n_reads ? reinterpret_cast<const void*>(p[P_H0 + k]) : nullptr;
  for (int j = 0; j < 2; ++j) a.h_write[j] = j < n_writes ? reinterpret_cast<void*>(p[P_W0 + j]) : nullptr;
  a.z = reinterpret_cast<const void*>(p[P_Z]);
  a.z2 = reinterpret_cast<const void*>(p[P_Z2]);
  a.mask = reinterpret_cast<const void*>(p[P_MASK]);
  a.known = reinterpret_cast<const void*>(p[P_KNOWN]);
  a.g = reinterpret_cast<const void*>(p[P_G]);
  a.m_2 = reinterpret_cast<const void*>(p[P_M2]);
  a.m_3 = reinterpret_cast<const void*>(p[P_M3]);
  a.m_w = reinterpret_cast<void*>(p[P_MW]);
}

/// The whole row: pointers, counts and coefficients (after check_counts and check_pointers).
inline void set_row(const Ptrs& p, int64_t numel, int64_t per_sample, int n_reads, int n_writes, int clip,
                    uint32_t row, const std::vector<double>& coef, fd_row::StepRow& a, int u_copies = 0) {
  set_element_pointers(p, n_reads, n_writes, a);
  a.w = reinterpret_cast<const float*>(p[P_WS]);
  a.r = reinterpret_cast<const float*>(p[P_R]);
  a.s = reinterpret_cast<const float*>(p[P_S]);
  a.seeds = reinterpret_cast<const int64_t*>(p[P_SEEDS]);
  a.u = u_copies ? reinterpret_cast<void*>(p[P_U]) : nullptr;
  a.flag = reinterpret_cast<int32_t*>(p[P_FLAG]);
  a.a = reinterpret_cast<const float*>(p[P_A]);
  a.u_copies = u_copies;
  a.numel = numel;
  a.per_sample = per_sample;
  a.n_reads = n_reads;
  a.n_writes = n_writes;
  a.clip = clip;
  a.row = row;
  for (int i = 0; i < fd::N_COEF; ++i) a.coef[i] = coef[i];
}

/// A prepared program's `set`: point operand `which` (a PTR_NAMES index; m and m_c are run()'s) of
/// row i, or of every row for i = -1, at v. Every row is checked first, so a refused pointer changes
/// no row. Entry holds `p` (Ptrs), `coef` and `a` (a StepRow); dtype_of(entry) is its dtype code.
template <class Entry, class DtypeOf>
void repoint(std::vector<Entry>& rows, int i, int which, uintptr_t v, DtypeOf dtype_of) {
  const int n = static_cast<int>(rows.size());
  if (which < 0 || which >= N_PTRS || which == P_M || which == P_MC)
    bad("set: which must index PTR_NAMES (not m or m_c, which run() sets), got " + std::to_string(which));
  if (i < -1 || i >= n) bad("set: row " + std::to_string(i) + " out of range");
  const int lo = i < 0 ? 0 : i, hi = i < 0 ? n : i + 1;
  for (int k = lo; k < hi; ++k) {
    const Entry& e = rows[k];
    Ptrs p = e.p;
    p[which] = v;
    if (e.a.numel) check_pointers(p, dtype_of(e), e.a.n_reads, e.a.n_writes, e.a.clip, e.coef, e.a.u_copies);
  }
  for (int k = lo; k < hi; ++k) {
    Entry& e = rows[k];
    e.p[which] = v;
    set_row(e.p, e.a.numel, e.a.per_sample, e.a.n_reads, e.a.n_writes, e.a.clip, e.a.row, e.coef, e.a, e.a.u_copies);
  }
}

/// The packed layout by name, as fastdiff/args.py COEF_OFFSETS names it.
inline std::vector<std::pair<std::string, int>> coef_offsets() {
  return {{"a_x", fd::C_AX},         {"a_e", fd::C_AE},         {"out", fd::C_OUT}, {"write0", fd::C_W0},
          {"write1", fd::C_W1},      {"known_a", fd::C_KNOWN_A}, {"known_s", fd::C_KNOWN_S}, {"c_g", fd::C_G},
          {"u_scale", fd::C_U},      {"n_coef", fd::N_COEF}};
}

}  // namespace fd_bind
