// fastdiff._C_cuda: the CUDA step kernel on raw device pointers (no torch headers, no CUDA headers
// here). fastdiff/backends/cuda.py validates tensors (dtype, shape, device, contiguity, aliasing)
// before pointers cross over; this file re-checks what it can see (counts, codes, null pointers)
// and names the bad value (bind_args.h: the same pointer order, codes and checks as fastdiff._C).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "bind_args.h"
#include "cuda_info.h"
#include "cuda_step.h"

namespace py = pybind11;

namespace {

using fd_bind::bad;
using fd_bind::N_PTRS;
using fd_bind::PTR_NAMES;

void check_max_blocks(int max_blocks) {
  if (max_blocks < 0) bad("max_blocks must be >= 0, got " + std::to_string(max_blocks));
}

void launch(const fd_cuda::StepParams& a, int dtype, uintptr_t stream, int max_blocks) {
  const char* err = fd_cuda::launch_step(a, dtype, stream, max_blocks);
  if (err) throw std::runtime_error(std::string("fastdiff CUDA step kernel failed to launch: ") + err);
}

void step(const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
          uint32_t row, const std::vector<double>& coef, uintptr_t stream, int max_blocks, int u_copies) {
  fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef, u_copies);
  check_max_blocks(max_blocks);
  if (numel == 0) return;
  fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef, u_copies);
  fd_cuda::StepParams a{};
  fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, a, u_copies);
  launch(a, dtype, stream, max_blocks);
}

int elem_size(int dtype) { return dtype == fd::DTYPE_F64 ? 8 : dtype == fd::DTYPE_F32 ? 4 : 2; }

/// A prepared sampling loop, as fastdiff._C.Program: every row's arguments checked and packed once;
/// run(i, m, stream) fills in the model output and launches row i on `stream` (a cudaStream_t as an
/// integer), with no argument conversion beyond those integers and no host synchronisation. The
/// per-sample reductions (guidance rescale, dynamic thresholding) stay in torch on the Python side
/// on CUDA: add() refuses phi and ratio other than 0 (r and s are then read as given).
class Program {
 public:
  explicit Program(int max_blocks) : max_blocks_(max_blocks) { check_max_blocks(max_blocks); }

  struct Entry {
    fd_cuda::StepParams a;
    fd_bind::Ptrs p;
    std::vector<double> coef;
    int dtype;
    int64_t mc_bytes;  // m_c = m + mc_bytes, or -1: no guidance
  };

  int add(const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
          uint32_t row, const std::vector<double>& coef, int u_copies, int64_t mc_offset, double phi, double ratio,
          double /*max_value: only with ratio*/) {
    fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef, u_copies);
    if (!(phi == 0))
      bad("phi must be 0 on CUDA (guidance rescale runs in torch before the row, into r), got " + std::to_string(phi));
    if (!(ratio == 0))
      bad("ratio must be 0 on CUDA (dynamic thresholding runs in torch before the row, into s), got " +
          std::to_string(ratio));
    if ((mc_offset >= 0) != (p[fd_bind::P_MC] != 0))
      bad("mc_offset must be >= 0 exactly when m_c is given, got " + std::to_string(mc_offset));
    if (numel) fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef, u_copies);
    Entry e{};
    e.p = p;
    e.coef = coef;
    e.dtype = dtype;
    e.mc_bytes = mc_offset < 0 ? -1 : mc_offset * elem_size(dtype);
    fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, e.a, u_copies);
    rows_.push_back(std::move(e));
    return static_cast<int>(rows_.size()) - 1;
  }

  /// Point operand `which` (a PTR_NAMES index other than m / m_c) of row i, or of every row for i = -1.
  void set(int i, int which, uintptr_t v) {
    fd_bind::repoint(rows_, i, which, v, [](const Entry& e) { return e.dtype; });
  }

  void run(int i, uintptr_t m, uintptr_t stream) {
    if (i < 0 || i >= size()) bad("run: row " + std::to_string(i) + " out of range");
    if (!m) bad("run: the model output pointer m is null");
    Entry& e = rows_[i];
    if (!e.a.numel) return;
    e.a.m = reinterpret_cast<const void*>(m);
    e.a.m_c = e.mc_bytes < 0 ? nullptr : reinterpret_cast<const void*>(m + e.mc_bytes);
    launch(e.a, e.dtype, stream, max_blocks_);
  }

  int size() const { return static_cast<int>(rows_.size()); }
  int max_blocks() const { return max_blocks_; }

 private:
  int max_blocks_;
  std::vector<Entry> rows_;
};

void bits(uintptr_t out, uintptr_t seeds, int64_t batch, int64_t groups, uint32_t row, uint32_t stream_id,
          uintptr_t stream) {
  if (batch < 0 || groups < 0) bad("batch and groups must be >= 0, got " + std::to_string(batch) + " and " +
                                   std::to_string(groups));
  if (batch * groups == 0) return;
  if (!out || !seeds) bad("out and seeds must be non-null device pointers");
  const char* err = fd_cuda::launch_bits(reinterpret_cast<uint32_t*>(out), reinterpret_cast<const int64_t*>(seeds),
                                         batch, groups, row, stream_id, stream);
  if (err) throw std::runtime_error(std::string("fastdiff CUDA Philox kernel failed to launch: ") + err);
}

bool vector_path(const fd_bind::Ptrs& p) {
  fd_cuda::StepParams a{};
  fd_bind::set_element_pointers(p, 4, 2, a);
  return fd_cuda::vector_path(a);
}

std::vector<bool> u_vector(const fd_bind::Ptrs& p, int64_t numel, int dtype, int u_copies) {
  fd_bind::check_counts(numel, 1, dtype, 0, 0, 0, std::vector<double>(fd::N_COEF), u_copies);
  fd_cuda::StepParams a{};
  a.u = reinterpret_cast<void*>(p[fd_bind::P_U]);
  a.u_copies = u_copies;
  a.numel = numel;
  const int bits = fd_cuda::u_vector(a, elem_size(dtype));
  std::vector<bool> r;
  for (int k = 0; k < u_copies; ++k) r.push_back(a.u && ((bits >> k) & 1));
  return r;
}

/// fd_cuda::runtime_info() as a dict (fastdiff/backends/cuda.py decides from it whether the kernel can run here).
py::dict runtime_info() {
  const fd_cuda::RuntimeInfo r = fd_cuda::runtime_info();
  py::dict d;
  d["built"] = r.built;
  d["runtime"] = r.runtime;
  d["driver"] = r.driver;
  d["devices"] = r.devices;
  d["error"] = r.error;
  d["error_name"] = r.error_name ? py::str(r.error_name) : py::str("");
  d["error_string"] = r.error_string ? py::str(r.error_string) : py::str("");
  return d;
}

}  // namespace

// The compute capabilities setup.py compiled cubins for ("80;90"; the last one's PTX is embedded too).
#ifndef FD_CUDA_ARCHS
#define FD_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastdiff CUDA step kernel on raw device pointers (see fastdiff/backends/cuda.py)";
  m.attr("N_COEF") = fd::N_COEF;
  m.attr("PTR_NAMES") = py::cast(std::vector<std::string>(PTR_NAMES, PTR_NAMES + N_PTRS));
  {
    py::dict offsets;
    for (const auto& kv : fd_bind::coef_offsets()) offsets[py::str(kv.first)] = kv.second;
    m.attr("COEF_OFFSETS") = offsets;
  }
  m.attr("CUDA_ARCHS") = FD_CUDA_ARCHS;
  m.def("runtime_info", &runtime_info,
        "The CUDA versions (1000 * major + 10 * minor) this extension was built with (built: CUDART_VERSION), "
        "links (runtime) and the driver supports (driver: 0 without one), the device count, and "
        "cudaGetDeviceCount's error (error: its code, 0 for none; error_name, error_string).");
  m.def("step", &step, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
        py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
        py::arg("stream"), py::arg("max_blocks") = 0, py::arg("u_copies") = 0,
        "Run one plan row on `stream`. ptrs: 25 device pointers in PTR_NAMES order (0 = not given); "
        "dtype: 0 fp32, 1 fp64, 2 fp16, 3 bf16; coef: N_COEF floats (fastdiff.args.pack_row); max_blocks > 0 "
        "caps the grid; u_copies: copies of the next model input written to u (0, 1 or 2); flag: int32 set to 1 "
        "on a non-finite model output element; a (float32 [4 or 8, B]) given: blend mode over m, m_c, m_2, m_3, "
        "with the momentum write m_w.");
  py::class_<Program>(m, "Program",
                      "A prepared sampling loop: rows checked and packed once, run(i, m, stream) per row "
                      "(phi and ratio must be 0: the reductions stay in torch on CUDA).")
      .def(py::init<int>(), py::arg("max_blocks") = 0)
      .def("add", &Program::add, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
           py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
           py::arg("u_copies"), py::arg("mc_offset"), py::arg("phi") = 0.0, py::arg("ratio") = 0.0,
           py::arg("max_value") = 1.0,
           "Add a row (step's arguments; ptrs[m] is a placeholder, ptrs[m_c] non-zero exactly when guided, "
           "mc_offset: elements from m to m_c in the model output, or -1; phi and ratio must be 0). "
           "Returns its index.")
      .def("set", &Program::set, py::arg("i"), py::arg("which"), py::arg("ptr"),
           "Point operand `which` (PTR_NAMES index) of row i (every row for i = -1) at ptr.")
      .def("run", &Program::run, py::arg("i"), py::arg("m"), py::arg("stream"),
           "Launch row i on `stream` with the model output at address m (its conditional half mc_offset "
           "elements on).")
      .def_property_readonly("max_blocks", &Program::max_blocks)
      .def("__len__", &Program::size);
  m.def("bits", &bits, py::arg("out"), py::arg("seeds"), py::arg("batch"), py::arg("groups"), py::arg("row"),
        py::arg("stream_id"), py::arg("stream"),
        "Raw Philox words of groups [0, groups) of every sample into uint32 [batch, 4 * groups] at `out`.");
  m.def("vector_path", &vector_path, py::arg("ptrs"),
        "Whether the 16-byte vectorised path applies to these 25 pointers (all non-null element operands 16-byte "
        "aligned; g, m_2 and m_3, read element by element, and u aside: see u_vector).");
  m.def("u_vector", &u_vector, py::arg("ptrs"), py::arg("numel"), py::arg("dtype"), py::arg("u_copies"),
        "Per copy of u (ptrs[u], copies numel elements apart): whether the vector path stores it 16 bytes at a "
        "time (its start is 16-byte aligned).");
}
