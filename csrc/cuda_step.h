// The CUDA step kernel's interface: the plan row of step_params.h (raw device pointers, no torch,
// no CUDA headers), shared by cuda_bindings.cpp (host compiler) and cuda_step.cu (nvcc).
#pragma once

#include <stdint.h>

#include "step_params.h"

namespace fd_cuda {

using fd_row::N_COEF;

/// One plan row over contiguous device tensors (step_params.h; the same struct as the CPU
/// kernel's fd_cpu::StepArgs without its CPU-only fields).
using StepParams = fd_row::StepRow;

/// Launch one row on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream).
/// `dtype` is fd::DTYPE_*; `max_blocks` > 0 caps the grid (tests use it to exercise the
/// grid-stride loop), 0 picks 8 blocks per SM. Returns null, or the CUDA error string.
const char* launch_step(const StepParams& p, int dtype, uintptr_t stream, int max_blocks);

/// Raw Philox words of groups [0, groups) of every sample into `out` ([batch, groups * 4] uint32).
const char* launch_bits(uint32_t* out, const int64_t* seeds, int64_t batch, int64_t groups, uint32_t row,
                        uint32_t stream_id, uintptr_t stream);

/// Whether every element operand the row reads or writes takes 16-byte accesses: each is 16-byte
/// aligned, g, m_2, m_3 and u aside (g and the blend branches m_2 / m_3 are read element by element;
/// u, see u_vector, is stored in 16-byte or element stores, copy by copy). Where it is false, only
/// the unaligned operands take element accesses (the kernel decides operand by operand).
bool vector_path(const StepParams& p);

/// Bit k set when copy k < p.u_copies of u (elem_size-byte elements, p.numel apart) starts 16-byte
/// aligned, so that the vector path stores it 16 bytes at a time; 0 without u.
int u_vector(const StepParams& p, int elem_size);

}  // namespace fd_cuda
