// Per-sample reductions that run before a row's step (cpu_reduce.cpp): one pass each, in place of
// the torch operations of fastdiff/guidance.py.
#pragma once

#include "cpu_step.h"

namespace fd_cpu {

/// Guidance rescale factor per sample into r[B] (reads a.m, a.m_c, a.w).
void rescale(const StepArgs& a, double phi, float* r);

/// Dynamic-threshold bound per sample into s[B] (reads the row's operands: its data estimate d,
/// with a.r applied where given).
void threshold(const StepArgs& a, double ratio, double max_value, float* s);

/// Langevin corrector row: per sample the squared norms of the score g = l_x x + l_e e (e the
/// row's guided model output, rescaled by a.r, plus c_g g_cls) and of the row's noise (a.z, or
/// its Philox noise: stream 0 at a.row) into g2[B] and z2[B], accumulated in float64.
void langevin_norms(const StepArgs& a, double l_x, double l_e, double* g2, double* z2);

/// Per sample b: g[b][i][j] = <slot_i, slot_j> and sums[b][i] = sum of slot_i's elements (float64,
/// [B, 4, 4] and [B, 4]; absent slots (null) give 0), over `numel` elements of DTYPE_* `dtype`.
void gram(const void* const* slots, int64_t numel, int64_t per_sample, int dtype, int num_threads, double* g,
          double* sums);

}  // namespace fd_cpu
