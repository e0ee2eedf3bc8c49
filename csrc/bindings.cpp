// fastdiff._C: the CPU step kernel on raw pointers (no torch headers). fastdiff/backends/cpu.py
// validates tensors (dtype, shape, device, contiguity, aliasing) before pointers cross over;
// this file re-checks what it can see (counts, codes, null pointers) and names the bad value.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_step.h"
#include "philox.h"
#include "step_math.h"

namespace py = pybind11;

namespace {

constexpr int N_PTRS = 19;
// Order of the pointer list passed to step() (g last: it came with contract v2 of the plan row).
const char* const PTR_NAMES[N_PTRS] = {"x",   "out", "m",     "m_c",   "h_read[0]", "h_read[1]", "h_read[2]",
                                       "h_read[3]", "h_write[0]", "h_write[1]", "z", "z2", "mask", "known",
                                       "w",   "r",   "s",     "seeds", "g"};
static_assert(fd_cpu::N_COEF == fd::N_COEF, "cpu_step.h and step_math.h disagree on the packed layout");
int g_threads = 0;  // 0: follow OpenMP (omp_get_max_threads, i.e. torch.get_num_threads)

int threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

void need(const std::array<uintptr_t, N_PTRS>& p, int i, const char* why) {
  if (!p[i]) bad(std::string(PTR_NAMES[i]) + " is required (" + why + ") but its pointer is null");
}

template <class T>
fd::StepFlags flags_of(const double* coef, int n_reads, int n_writes, int clip, bool cfg, bool rescale, bool mask,
                       bool g) {
  return fd::fd_make_flags(fd::fd_unpack_coef<T>(coef), n_reads, n_writes, clip, cfg, rescale, mask, g);
}

void step(const std::array<uintptr_t, N_PTRS>& p, int64_t numel, int64_t per_sample, int dtype, int n_reads,
          int n_writes, int clip, uint32_t row, const std::vector<double>& coef) {
  if (numel < 0) bad("numel must be >= 0, got " + std::to_string(numel));
  if (per_sample < 1) bad("per_sample must be >= 1, got " + std::to_string(per_sample));
  if (numel % per_sample) bad("numel " + std::to_string(numel) + " is not a multiple of per_sample " +
                              std::to_string(per_sample));
  if (dtype < fd::DTYPE_F32 || dtype > fd::DTYPE_BF16) bad("dtype code must be 0..3, got " + std::to_string(dtype));
  if (n_reads < 0 || n_reads > fd::MAX_READS) bad("n_reads must be 0..4, got " + std::to_string(n_reads));
  if (n_writes < 0 || n_writes > fd::MAX_WRITES) bad("n_writes must be 0..2, got " + std::to_string(n_writes));
  if (clip < fd::CLIP_NONE || clip > fd::CLIP_DYNAMIC) bad("clip must be 0, 1 or 2, got " + std::to_string(clip));
  if (static_cast<int>(coef.size()) != fd::N_COEF)
    bad("coef must have " + std::to_string(fd::N_COEF) + " entries, got " + std::to_string(coef.size()));
  if (numel == 0) return;
  for (int i : {0, 1, 2}) need(p, i, "always");
  for (int k = 0; k < n_reads; ++k) need(p, 4 + k, "n_reads");
  for (int j = 0; j < n_writes; ++j) need(p, 8 + j, "n_writes");
  const bool cfg = p[3], rescale = p[15], mask = p[12], g = p[18];
  if (cfg) need(p, 14, "m_c is given");
  if (clip) need(p, 16, "clip != 0");
  if (mask) need(p, 13, "mask is given");
  const fd::StepFlags f = dtype == fd::DTYPE_F64
                              ? flags_of<double>(coef.data(), n_reads, n_writes, clip, cfg, rescale, mask, g)
                              : flags_of<float>(coef.data(), n_reads, n_writes, clip, cfg, rescale, mask, g);
  if ((f.z && !p[10]) || (f.z2 && !p[11])) need(p, 17, "the row draws Philox noise");

  fd_cpu::StepArgs a{};
  a.x = reinterpret_cast<const void*>(p[0]);
  a.out = reinterpret_cast<void*>(p[1]);
  a.m = reinterpret_cast<const void*>(p[2]);
  a.m_c = reinterpret_cast<const void*>(p[3]);
  for (int k = 0; k < 4; ++k) a.h_read[k] = reinterpret_cast<const void*>(p[4 + k]);
  for (int j = 0; j < 2; ++j) a.h_write[j] = reinterpret_cast<void*>(p[8 + j]);
  a.z = reinterpret_cast<const void*>(p[10]);
  a.z2 = reinterpret_cast<const void*>(p[11]);
  a.mask = reinterpret_cast<const void*>(p[12]);
  a.known = reinterpret_cast<const void*>(p[13]);
  a.g = reinterpret_cast<const void*>(p[18]);
  a.w = reinterpret_cast<const float*>(p[14]);
  a.r = reinterpret_cast<const float*>(p[15]);
  a.s = reinterpret_cast<const float*>(p[16]);
  a.seeds = reinterpret_cast<const int64_t*>(p[17]);
  a.numel = numel;
  a.per_sample = per_sample;
  a.dtype = dtype;
  a.n_reads = n_reads;
  a.n_writes = n_writes;
  a.clip = clip;
  a.row = row;
  a.num_threads = threads();
  for (int i = 0; i < fd::N_COEF; ++i) a.coef[i] = coef[i];
  py::gil_scoped_release nogil;
  fd_cpu::step(a);
}

uint64_t as_u64(const py::int_& v) {
  // seeds are 64-bit words: accept any Python int and keep its low 64 bits (two's complement)
  unsigned long long u = PyLong_AsUnsignedLongLongMask(v.ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  return u;
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
  mod.doc() = "fastdiff CPU step kernel (raw pointers; see fastdiff/backends/cpu.py)";
  fd_cpu::current_level();  // an invalid FASTDIFF_CPU_SIMD fails the import, naming the value

  mod.attr("N_COEF") = fd::N_COEF;
  mod.attr("DTYPE_F32") = fd::DTYPE_F32;
  mod.attr("DTYPE_F64") = fd::DTYPE_F64;
  mod.attr("DTYPE_F16") = fd::DTYPE_F16;
  mod.attr("DTYPE_BF16") = fd::DTYPE_BF16;
  mod.attr("PTR_NAMES") = py::cast(std::vector<std::string>(PTR_NAMES, PTR_NAMES + N_PTRS));

  mod.def("step", &step, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
          py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
          "Run one plan row over contiguous buffers. ptrs: 19 addresses in PTR_NAMES order (0 = absent); "
          "numel elements, per_sample per batch sample; dtype: DTYPE_* code of every element buffer; "
          "w, r, s: float32 [B]; seeds: int64 [B]; coef: N_COEF float64 (fastdiff.args.pack_row).");
  mod.def("simd_level", [] { return std::string(fd_cpu::level_name(fd_cpu::current_level())); },
          "SIMD level in use: 'avx512', 'avx2' or 'scalar'.");
  mod.def("detected_simd_level", [] { return std::string(fd_cpu::level_name(fd_cpu::detect_level())); },
          "Best SIMD level this CPU supports.");
  mod.def("set_simd_level", [](const std::string& name) { fd_cpu::set_level(name.c_str()); }, py::arg("name"),
          "Force a SIMD level ('scalar', 'avx2', 'avx512'); ValueError if unknown or unsupported.");
  mod.def("num_threads", &threads, "OpenMP threads the kernel uses.");
  mod.def(
      "set_num_threads",
      [](int n) {
        if (n < 0) bad("n must be >= 0 (0 follows OpenMP/torch), got " + std::to_string(n));
        g_threads = n;
      },
      py::arg("n"), "Threads for the kernel only (0: follow omp_get_max_threads, as torch sets it).");

  mod.def(
      "philox_group_bits",
      [](const py::int_& seed, const py::int_& g, uint32_t row, uint32_t stream) {
        uint32_t u[4];
        fd::fd_philox_group_bits(as_u64(seed), as_u64(g), row, stream, u);
        return py::make_tuple(u[0], u[1], u[2], u[3]);
      },
      py::arg("seed"), py::arg("g"), py::arg("row"), py::arg("stream"),
      "The 4 Philox words of group g (scalar code of philox.h, as CUDA runs it).");
  mod.def(
      "philox_group_normals",
      [](const py::int_& seed, const py::int_& g, uint32_t row, uint32_t stream) {
        float n[4];
        fd::fd_philox_group_normals(as_u64(seed), as_u64(g), row, stream, n);
        return py::make_tuple(n[0], n[1], n[2], n[3]);
      },
      py::arg("seed"), py::arg("g"), py::arg("row"), py::arg("stream"),
      "The 4 normals of group g (scalar code of philox.h).");
  mod.def(
      "philox_normals",
      [](uintptr_t out, uintptr_t seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream) {
        if (!out || !seeds) bad("out and seeds must be non-null");
        if (batch < 0 || per_sample < 1) bad("batch must be >= 0 and per_sample >= 1");
        py::gil_scoped_release nogil;
        fd_cpu::normals(reinterpret_cast<float*>(out), reinterpret_cast<const int64_t*>(seeds), batch, per_sample,
                        row, stream, threads());
      },
      py::arg("out"), py::arg("seeds"), py::arg("batch"), py::arg("per_sample"), py::arg("row"), py::arg("stream"),
      "Fill float32 [batch, per_sample] with the kernel's in-kernel Philox normals (current SIMD level).");
  mod.def(
      "philox_bits",
      [](uintptr_t out, uintptr_t seeds, int64_t batch, const py::int_& g0, int64_t groups, uint32_t row,
         uint32_t stream) {
        if (!out || !seeds) bad("out and seeds must be non-null");
        if (batch < 0 || groups < 0) bad("batch and groups must be >= 0");
        fd_cpu::bits(reinterpret_cast<uint32_t*>(out), reinterpret_cast<const int64_t*>(seeds), batch, as_u64(g0),
                     groups, row, stream);
      },
      py::arg("out"), py::arg("seeds"), py::arg("batch"), py::arg("g0"), py::arg("groups"), py::arg("row"),
      py::arg("stream"),
      "Fill uint32 [batch, groups*4] with the Philox words of groups g0.. (current SIMD level).");
}
