// fastdiff._C_cuda: the CUDA step kernel on raw device pointers (no torch headers, no CUDA headers
// here). fastdiff/backends/cuda.py validates tensors (dtype, shape, device, contiguity, aliasing)
// before pointers cross over; this file re-checks what it can see (counts, codes, null pointers)
// and names the bad value. Same pointer order and codes as fastdiff._C (csrc/bindings.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_step.h"
#include "step_math.h"

namespace py = pybind11;

namespace {

constexpr int N_PTRS = 19;
const char* const PTR_NAMES[N_PTRS] = {"x",          "out",        "m",    "m_c",  "h_read[0]", "h_read[1]",
                                       "h_read[2]",  "h_read[3]",  "h_write[0]", "h_write[1]", "z", "z2",
                                       "mask",       "known",      "w",    "r",    "s",         "seeds",
                                       "g"};
static_assert(fd_cuda::N_COEF == fd::N_COEF, "cuda_step.h and step_math.h disagree on the packed layout");

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

void need(const std::array<uintptr_t, N_PTRS>& p, int i, const char* why) {
  if (!p[i]) bad(std::string(PTR_NAMES[i]) + " is required (" + why + ") but its pointer is null");
}

void step(const std::array<uintptr_t, N_PTRS>& p, int64_t numel, int64_t per_sample, int dtype, int n_reads,
          int n_writes, int clip, uint32_t row, const std::vector<double>& coef, uintptr_t stream, int max_blocks) {
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
  if (max_blocks < 0) bad("max_blocks must be >= 0, got " + std::to_string(max_blocks));
  if (numel == 0) return;
  for (int i : {0, 1, 2}) need(p, i, "always");
  for (int k = 0; k < n_reads; ++k) need(p, 4 + k, "n_reads");
  for (int j = 0; j < n_writes; ++j) need(p, 8 + j, "n_writes");
  const bool cfg = p[3], rescale = p[15], mask = p[12], g = p[18];
  if (cfg) need(p, 14, "m_c is given");
  if (clip) need(p, 16, "clip != 0");
  if (mask) need(p, 13, "mask is given");
  fd::StepFlags f;
  if (dtype == fd::DTYPE_F64)
    f = fd::fd_make_flags(fd::fd_unpack_coef<double>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g);
  else
    f = fd::fd_make_flags(fd::fd_unpack_coef<float>(coef.data()), n_reads, n_writes, clip, cfg, rescale, mask, g);
  if ((f.z && !p[10]) || (f.z2 && !p[11])) need(p, 17, "the row draws Philox noise");

  fd_cuda::StepParams a{};
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

bool vector_path(const std::array<uintptr_t, N_PTRS>& p) {
  fd_cuda::StepParams a{};
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
