// fastdiff._C_cuda: the CUDA step kernel on raw device pointers (no torch headers, no CUDA headers
// here). fastdiff/backends/cuda.py validates tensors (dtype, shape, device, contiguity, aliasing)
// before pointers cross over; this file re-checks what it can see (counts, codes, null pointers)
// and names the bad value (bind_args.h: the same pointer order, codes and checks as fastdiff._C).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "bind_args.h"
#include "cuda_step.h"

namespace py = pybind11;

namespace {

using fd_bind::bad;

void step(const fd_bind::Ptrs& p, int64_t numel, int64_t per_sample, int dtype, int n_reads, int n_writes, int clip,
          uint32_t row, const std::vector<double>& coef, uintptr_t stream, int max_blocks) {
  fd_bind::check_counts(numel, per_sample, dtype, n_reads, n_writes, clip, coef);
  if (max_blocks < 0) bad("max_blocks must be >= 0, got " + std::to_string(max_blocks));
  if (numel == 0) return;
  fd_bind::check_pointers(p, dtype, n_reads, n_writes, clip, coef);
  fd_cuda::StepParams a{};
  fd_bind::set_row(p, numel, per_sample, n_reads, n_writes, clip, row, coef, a);
  const char* err = fd_cuda::launch_step(a, dtype, stream, max_blocks);
  if (err) throw std::runtime_error(std::string("fastdiff CUDA step kernel failed to launch: ") + err);
}

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

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastdiff CUDA step kernel on raw device pointers (see fastdiff/backends/cuda.py)";
  m.def("step", &step, py::arg("ptrs"), py::arg("numel"), py::arg("per_sample"), py::arg("dtype"),
        py::arg("n_reads"), py::arg("n_writes"), py::arg("clip"), py::arg("row"), py::arg("coef"),
        py::arg("stream"), py::arg("max_blocks") = 0,
        "Run one plan row on `stream`. ptrs: 19 device pointers (x, out, m, m_c, h_read[4], h_write[2], z, z2, "
        "mask, known, w, r, s, seeds, g; 0 = not given); dtype: 0 fp32, 1 fp64, 2 fp16, 3 bf16; coef: 29 floats "
        "(fastdiff.args.pack_row); max_blocks > 0 caps the grid.");
  m.def("bits", &bits, py::arg("out"), py::arg("seeds"), py::arg("batch"), py::arg("groups"), py::arg("row"),
        py::arg("stream_id"), py::arg("stream"),
        "Raw Philox words of groups [0, groups) of every sample into uint32 [batch, 4 * groups] at `out`.");
  m.def("vector_path", &vector_path, py::arg("ptrs"),
        "Whether the 16-byte vectorised path applies to these 19 pointers (all non-null ones 16-byte aligned).");
}
