// fastdiff._C: the CPU step kernel on raw pointers (no torch headers). fastdiff/backends/cpu.py
// validates tensors (dtype, shape, device, contiguity, aliasing) before pointers cross over;
// this file re-checks what it can see (counts, codes, null pointers) and names the bad value.
#include <math.h>
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "cpu_reduce.h"
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
          uint32_t row, const std::vector<double>& coef, int u_copies) {
  fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef, u_copies);
  if (numel == 0) return;
  fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef, u_copies);
  fd_cpu::StepArgs a{};
  fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, a, u_copies);
  a.dtype = dtype;
  a.num_threads = threads();
  py::gil_scoped_release nogil;
  fd_cpu::step(a);
}

/// Whether any of `numel` words at `ptr` has all the bits of `exp` set (a plain loop the compiler
/// vectorises; both threads for large buffers).
template <class U>
bool any_exponent_max(uintptr_t ptr, int64_t numel, U exp) {
  const U* p = reinterpret_cast<const U*>(ptr);
  int hit = 0;
#pragma omp parallel for reduction(| : hit) num_threads(threads()) if (numel >= (1 << 20))
  for (int64_t i = 0; i < numel; ++i) hit |= (p[i] & exp) == exp;
  return hit != 0;
}

size_t elem_size(int dtype) { return dtype == fd::DTYPE_F64 ? 8 : dtype == fd::DTYPE_F32 ? 4 : 2; }

/// A prepared sampling loop: every row's arguments checked and packed once (fastdiff/executor.py
/// builds one per workspace). run(i, m) fills in the model output and runs row i: one call, no
/// argument conversion, the GIL released. Rows that need a per-sample reduction (guidance rescale,
/// dynamic thresholding) run it here, just before their step, into their own r / s buffer.
class Program {
 public:
  struct Entry {
    fd_cpu::StepArgs a;
    fd_bind::Ptrs p;
    std::vector<double> coef;
    int64_t mc_bytes;  // m_c = m + mc_bytes, or -1: no guidance
    double phi;        // > 0: compute r (guidance rescale) before the step
    double ratio, max_value;  // ratio > 0: compute s (dynamic threshold) before the step
    double snr, l_x, l_e;     // snr > 0: a Langevin corrector row (run_langevin)
    bool batch_norm;          // its norms averaged over the batch (else per sample)
  };

  int add(const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
          uint32_t row, const std::vector<double>& coef, int u_copies, int64_t mc_offset, double phi, double ratio,
          double max_value, double snr, double l_x, double l_e, bool batch_norm) {
    fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef, u_copies);
    if ((mc_offset >= 0) != (p[fd_bind::P_MC] != 0))
      bad("mc_offset must be >= 0 exactly when m_c is given, got " + std::to_string(mc_offset));
    if (phi > 0 && (mc_offset < 0 || !p[fd_bind::P_R])) bad("a rescaled row needs m_c and its r buffer");
    if (ratio > 0 && (clip != fd::CLIP_DYNAMIC || !p[fd_bind::P_S])) bad("a thresholded row needs clip=2 and its s buffer");
    Entry e{};
    e.p = p;
    e.coef = coef;
    e.mc_bytes = mc_offset < 0 ? -1 : mc_offset * static_cast<int64_t>(elem_size(dtype));
    e.phi = phi;
    e.ratio = ratio;
    e.max_value = max_value;
    if (snr < 0 || snr != snr) bad("snr must be >= 0, got " + std::to_string(snr));
    if (snr > 0 && (clip || n_writes)) bad("a Langevin row has no clip and no history writes");
    e.snr = snr;
    e.l_x = l_x;
    e.l_e = l_e;
    e.batch_norm = batch_norm;
    e.a.dtype = dtype;
    e.a.numel = numel;
    e.a.per_sample = per_sample;
    e.a.n_reads = n_reads;
    e.a.n_writes = n_writes;
    e.a.clip = clip;
    e.a.row = row;
    e.a.u_copies = u_copies;
    if (numel) fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef, u_copies);
    fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, e.a, u_copies);
    rows_.push_back(std::move(e));
    return static_cast<int>(rows_.size()) - 1;
  }

  /// Point operand `which` (a PTR_NAMES index other than m / m_c) of row i, or of every row for i = -1.
  void set(int i, int which, uintptr_t v) {
    fd_bind::repoint(rows_, i, which, v, [](const Entry& e) { return e.a.dtype; });
  }

  void run(int i, uintptr_t m) {
    if (i < 0 || i >= static_cast<int>(rows_.size())) bad("run: row " + std::to_string(i) + " out of range");
    Entry& e = rows_[i];
    fd_cpu::StepArgs& a = e.a;
    if (!a.numel) return;  // an empty tensor may have no memory at all
    if (!m) bad("run: the model output pointer is null");
    a.m = reinterpret_cast<const void*>(m);
    a.m_c = e.mc_bytes < 0 ? nullptr : reinterpret_cast<const void*>(m + e.mc_bytes);
    a.num_threads = threads();
    py::gil_scoped_release nogil;
    if (e.phi > 0) fd_cpu::rescale(a, e.phi, const_cast<float*>(a.r));
    if (e.ratio > 0) fd_cpu::threshold(a, e.ratio, e.max_value, const_cast<float*>(a.s));
    if (e.snr > 0) {
      run_langevin(e);
      return;
    }
    fd_cpu::step(a);
  }

  /// A Langevin corrector row (Song et al. 2021, Algorithm 5): x' = x + k g + sqrt(2 k) z with the
  /// score g = l_x x + l_e e and k[b] = 2 (snr ||z[b]|| / ||g[b]||)^2 (norms averaged over the batch
  /// with batch_norm). One pass for the norms (langevin_norms), then the step sample by sample, each
  /// with its own coefficients: d = g (a_x = l_x, a_e = l_e), x' = x + k d + sqrt(2k) z, the noise
  /// the row's own (per-sample Philox keys and counters do not depend on the batch).
  void run_langevin(const Entry& e) {
    const fd_cpu::StepArgs& a = e.a;
    const int64_t B = a.numel / a.per_sample, ps = a.per_sample;
    std::vector<double> g2(B), z2(B), k(B);
    fd_cpu::langevin_norms(a, e.l_x, e.l_e, g2.data(), z2.data());
    double gm = 0, zm = 0;
    for (int64_t b = 0; b < B; ++b) {
      gm += sqrt(g2[b]) / B;
      zm += sqrt(z2[b]) / B;
    }
    for (int64_t b = 0; b < B; ++b) {
      const double gn = e.batch_norm ? gm : sqrt(g2[b]), zn = e.batch_norm ? zm : sqrt(z2[b]);
      const double q = e.snr * zn / gn;
      k[b] = 2 * q * q;
    }
    const int64_t bytes = ps * static_cast<int64_t>(elem_size(a.dtype));
    auto at = [bytes](const void* p, int64_t b) -> void* {
      return p ? static_cast<char*>(const_cast<void*>(p)) + b * bytes : nullptr;
    };
    for (int64_t b = 0; b < B; ++b) {
      fd_cpu::StepArgs s = a;
      s.x = at(a.x, b);
      s.out = at(a.out, b);
      s.m = at(a.m, b);
      s.m_c = at(a.m_c, b);
      for (int r = 0; r < a.n_reads; ++r) s.h_read[r] = at(a.h_read[r], b);
      s.z = at(a.z, b);
      s.z2 = at(a.z2, b);
      s.mask = at(a.mask, b);
      s.known = at(a.known, b);
      s.g = at(a.g, b);
      s.u = at(a.u, b);
      s.u_stride = a.numel;  // the copies of u stay the whole batch apart
      s.w = a.w ? a.w + b : nullptr;
      s.r = a.r ? a.r + b : nullptr;
      s.s = a.s ? a.s + b : nullptr;
      s.seeds = a.seeds ? a.seeds + b : nullptr;
      s.numel = ps;
      s.coef[fd::C_AX] = e.l_x;
      s.coef[fd::C_AE] = e.l_e;
      for (int q = 0; q < fd::N_OPERANDS; ++q) s.coef[fd::C_OUT + q] = 0.0;
      s.coef[fd::C_OUT + fd::OP_X] = 1.0;
      s.coef[fd::C_OUT + fd::OP_D] = k[b];
      s.coef[fd::C_OUT + fd::OP_Z] = sqrt(2 * k[b]);
      fd_cpu::step(s);
    }
  }

  int size() const { return static_cast<int>(rows_.size()); }

 private:
  std::vector<Entry> rows_;
};

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
  {
    py::dict offsets;
    for (const auto& kv : fd_bind::coef_offsets()) offsets[py::str(kv.first)] = kv.second;
    mod.attr("COEF_OFFSETS") = offsets;
  }

  mod.def("step", &step, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
          py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
          py::arg("u_copies") = 0,
          "Run one plan row over contiguous buffers. ptrs: 21 addresses in PTR_NAMES order (0 = absent); "
          "numel elements, per_sample per batch sample; dtype: DTYPE_* code of every element buffer; "
          "w, r, s: float32 [B]; seeds: int64 [B]; coef: N_COEF float64 (fastdiff.args.pack_row); "
          "u_copies: copies of the next model input written to u (0, 1 or 2), flag: int32 set on a non-finite "
          "model output element.");
  py::class_<Program>(mod, "Program", "A prepared sampling loop: rows checked and packed once, run(i, m) per row.")
      .def(py::init<>())
      .def("add", &Program::add, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
           py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
           py::arg("u_copies"), py::arg("mc_offset"), py::arg("phi") = 0.0, py::arg("ratio") = 0.0,
           py::arg("max_value") = 1.0, py::arg("snr") = 0.0, py::arg("l_x") = 0.0, py::arg("l_e") = 0.0,
           py::arg("batch_norm") = true,
           "Add a row (step's arguments; ptrs[m] is a placeholder, ptrs[m_c] non-zero exactly when guided, "
           "mc_offset: elements from m to m_c in the model output, or -1; phi > 0: guidance rescale into r; "
           "ratio > 0: dynamic threshold into s; snr > 0: a Langevin corrector row with score coefficients "
           "l_x, l_e, its norms batch means with batch_norm). Returns its index.")
      .def("set", &Program::set, py::arg("i"), py::arg("which"), py::arg("ptr"),
           "Point operand `which` (PTR_NAMES index) of row i (every row for i = -1) at ptr.")
      .def("run", &Program::run, py::arg("i"), py::arg("m"),
           "Run row i with the model output at address m (its conditional half mc_offset elements on).")
      .def("__len__", &Program::size);
  mod.def(
      "all_finite",
      [](uintptr_t ptr, int64_t numel, int dtype) -> bool {
        if (!ptr && numel) bad("all_finite needs a non-null pointer");
        if (numel < 0 || dtype < fd::DTYPE_F32 || dtype > fd::DTYPE_BF16) bad("all_finite: bad numel or dtype code");
        py::gil_scoped_release nogil;
        switch (dtype) {  // exponent bits all ones: Inf or NaN, per storage type
          case fd::DTYPE_F32: return !any_exponent_max<uint32_t>(ptr, numel, 0x7F800000u);
          case fd::DTYPE_F64: return !any_exponent_max<uint64_t>(ptr, numel, 0x7FF0000000000000ull);
          case fd::DTYPE_F16: return !any_exponent_max<uint16_t>(ptr, numel, 0x7C00u);
          default: return !any_exponent_max<uint16_t>(ptr, numel, 0x7F80u);  // bf16
        }
      },
      py::arg("ptr"), py::arg("numel"), py::arg("dtype"),
      "Whether no element of a contiguous buffer of DTYPE_* `dtype` is NaN or Inf (one pass).");
  mod.def(
      "first_flag",
      [](uintptr_t flags, int64_t n) -> int64_t {
        if (!flags || n < 0) bad("first_flag needs a non-null int32 array and n >= 0");
        const int32_t* f = reinterpret_cast<const int32_t*>(flags);
        for (int64_t i = 0; i < n; ++i)
          if (f[i]) return i;
        return -1;
      },
      py::arg("flags"), py::arg("n"), "Index of the first non-zero entry of an int32 array, or -1.");
  mod.def(
      "rescale",
      [](const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, double phi) {
        fd_bind::check_counts(numel, per_sample, dtype, 0, 0, 0, std::vector<double>(fd::N_COEF));
        if (!p[fd_bind::P_M] || !p[fd_bind::P_MC] || !p[fd_bind::P_WS] || !p[fd_bind::P_R])
          bad("rescale needs m, m_c, w and r");
        fd_cpu::StepArgs a{};
        fd_bind::set_row(p, numel, per_sample, 0, 0, 0, 0, std::vector<double>(fd::N_COEF), a);
        a.dtype = dtype;
        a.num_threads = threads();
        py::gil_scoped_release nogil;
        fd_cpu::rescale(a, phi, const_cast<float*>(a.r));
      },
      py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"), py::arg("phi"),
      "Guidance-rescale factors into r (float32 [B]) from m, m_c, w (step's pointer list).");
  mod.def(
      "gram",
      [](const std::vector<uintptr_t>& slots, int64_t numel, int64_t per_sample, int dtype, uintptr_t g,
         uintptr_t sums) {
        fd_bind::check_counts(numel, per_sample, dtype, 0, 0, 0, std::vector<double>(fd::N_COEF));
        if (slots.size() != static_cast<size_t>(fd::BLEND_ROWS))
          bad("gram needs " + std::to_string(fd::BLEND_ROWS) + " slot pointers, got " + std::to_string(slots.size()));
        if (!g || !sums) bad("gram needs non-null g and sums");
        if (numel && !slots[0] && !slots[1] && !slots[2] && !slots[3]) bad("gram needs at least one slot");
        const void* sp[fd::BLEND_ROWS];
        for (int k = 0; k < fd::BLEND_ROWS; ++k) sp[k] = reinterpret_cast<const void*>(slots[k]);
        const int nt = threads();
        py::gil_scoped_release nogil;
        fd_cpu::gram(sp, numel, per_sample, dtype, nt, reinterpret_cast<double*>(g), reinterpret_cast<double*>(sums));
      },
      py::arg("slots"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"), py::arg("g"), py::arg("sums"),
      "Per-sample Gram matrix (float64 [B, 4, 4]) and sums ([B, 4]) of up to four branch slots (null: absent).");
  mod.def(
      "threshold",
      [](const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, const std::vector<double>& coef,
         double ratio, double max_value) {
        fd_bind::check_counts(numel, per_sample, dtype, 0, 0, fd::CLIP_DYNAMIC, coef);
        if (!p[fd_bind::P_X] || !p[fd_bind::P_M] || !p[fd_bind::P_S] || (p[fd_bind::P_MC] && !p[fd_bind::P_WS]))
          bad("threshold needs x, m, s (and w with m_c)");
        if (p[fd_bind::P_A]) bad("threshold of a blend row is not computed here (fastdiff/guiders computes it)");
        fd_cpu::StepArgs a{};
        fd_bind::set_row(p, numel, per_sample, 0, 0, fd::CLIP_DYNAMIC, 0, coef, a);
        a.dtype = dtype;
        a.num_threads = threads();
        py::gil_scoped_release nogil;
        fd_cpu::threshold(a, ratio, max_value, const_cast<float*>(a.s));
      },
      py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"), py::arg("coef"), py::arg("ratio"),
      py::arg("max_value"),
      "Dynamic-threshold bounds into s (float32 [B]) from the row's x, m, m_c, w, r, g and coef.");
  mod.def("simd_level", [] { return std::string(fd_cpu::level_name(fd_cpu::current_level())); },
          "SIMD level in use: 'avx512bf16', 'avx512', 'avx2' or 'scalar'.");
  mod.def("detected_simd_level", [] { return std::string(fd_cpu::level_name(fd_cpu::detect_level())); },
          "Best SIMD level this CPU supports.");
  mod.def("set_simd_level", [](const std::string& name) { fd_cpu::set_level(name.c_str()); }, py::arg("name"),
          "Force a SIMD level ('scalar', 'avx2', 'avx512', 'avx512bf16'); ValueError if unknown or unsupported.");
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
