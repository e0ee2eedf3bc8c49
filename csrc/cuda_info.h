// What the CUDA extension was built with and what this machine's CUDA stack supports (csrc/cuda_info.cu).
// fastdiff/backends/cuda.py reads it before using the kernel: a driver older than the toolkit the
// extension was built with, or a runtime that fails to initialise, makes the backend unavailable
// with the reason, so `auto` falls back instead of failing at the first launch.
#pragma once

namespace fd_cuda {

struct RuntimeInfo {
  int built;               // CUDART_VERSION of the toolkit this was compiled with (1000 * major + 10 * minor)
  int runtime;             // cudaRuntimeGetVersion: the CUDA runtime linked in (torch's, or the static one)
  int driver;              // cudaDriverGetVersion: the newest CUDA the installed driver supports (0: no driver)
  int devices;             // cudaGetDeviceCount, 0 where it failed
  int error;               // cudaGetDeviceCount's error code (0: none)
  const char* error_name;  // and its name and description (nullptr when error == 0)
  const char* error_string;
};

/// Ask the CUDA runtime; never throws, never leaves an error behind for a later launch to report.
RuntimeInfo runtime_info();

}  // namespace fd_cuda
