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

}  // namespace fd_cpu
