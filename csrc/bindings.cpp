// fastdiff._C: the CPU step kernel on raw pointers (no torch headers). fastdiff/backends/cpu.py
// validates tensors (dtype, shape, device, contiguity, aliasing) before pointers cross over;
// this file re-checks what it can see (counts, codes, null pointers) and names the bad value.
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "cpu_step.h"
#include "philox.h"
#include "step_math.h"

namespace py = pybind11;

namespace {

using fd_bind::bad;
using fd_bind::N_PTRS;
using fd_bind::PTR_NAMES;

int g_threads = 0;  // 0: follow OpenMP (omp_get_max_threads, i.e. torch.get_num_threads)

int threads() { return g_threads > 0 ? g_threads : omp_get_max_threads(); }

void step(const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
          uint32_t row, const std::vector<double>& coef) {
  fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef);
  if (numel == 0) return;
  fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef);
  fd_cpu::StepArgs a{};
  fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, a);
  a.dtype = dtype;
  a.num_threads = threads();
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
