// fd_cuda::runtime_info (csrc/cuda_info.h): the versions and the initialisation error of the CUDA
// stack, compiled by nvcc so that CUDART_VERSION is the toolkit's own (cuda_bindings.cpp includes
// no CUDA headers). Compiled as plain C++ with -DFD_CUDA_EMU, it reports cuda_emu.h's stand-ins.
#if defined(FD_CUDA_EMU)
#include "cuda_emu.h"
#else
#include <cuda_runtime.h>
#endif

#include "cuda_info.h"

namespace fd_cuda {

RuntimeInfo runtime_info() {
  RuntimeInfo r{};
  r.built = CUDART_VERSION;
  if (cudaRuntimeGetVersion(&r.runtime) != cudaSuccess) r.runtime = 0;
  if (cudaDriverGetVersion(&r.driver) != cudaSuccess) r.driver = 0;
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  r.devices = err == cudaSuccess ? n : 0;
  r.error = static_cast<int>(err);
  r.error_name = err == cudaSuccess ? nullptr : cudaGetErrorName(err);
  r.error_string = err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  cudaGetLastError();  // a failed initialisation must not be reported by the next launch as its own error
  return r;
}

}  // namespace fd_cuda
