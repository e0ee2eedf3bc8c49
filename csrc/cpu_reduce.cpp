// The per-sample reductions some rows need before their step, each one pass over memory in the
// extension instead of a chain of torch operations (fastdiff/guidance.py has the torch versions,
// which the other backends run):
//   rescale:   r[b] = phi * std(m_c[b]) / std(cfg[b]) + (1 - phi), cfg = m + w (m_c - m)
//              (diffusers' guidance_rescale; std with Bessel's correction; r = 1 where std(cfg) = 0)
//   threshold: s[b] = clamp(quantile(|d[b]|, ratio), 1, max), d the row's data estimate
//              (Imagen's dynamic thresholding; the quantile as torch.quantile's linear rule)
//   gram:      per sample, the dot products of up to four guidance branches and their sums, in
//              float64 (what every guider's blend weights are computed from: fastdiff/guiders/stats.py)
// The first two read the row's own operands through step_math.h, so cfg and d are bit for bit what the step
// kernel computes.
#include "cpu_reduce.h"

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include <algorithm>
#include <vector>

#include "philox.h"
#include "step_math.h"

namespace fd_cpu {
namespace {

using fd::StepCoef;

template <class S, class T>
inline T ld(const void* p, int64_t i);
template <>
inline float ld<float, float>(const void* p, int64_t i) { return static_cast<const float*>(p)[i]; }
template <>
inline double ld<double, double>(const void* p, int64_t i) { return static_cast<const double*>(p)[i]; }
struct Half {};
struct BF16 {};
template <>
inline float ld<Half, float>(const void* p, int64_t i) { return fd::fd_half_to_float(static_cast<const uint16_t*>(p)[i]); }
template <>
inline float ld<BF16, float>(const void* p, int64_t i) { return fd::fd_bf16_to_float(static_cast<const uint16_t*>(p)[i]); }

constexpr int64_t CHUNK = 8192;  // elements per parallel work item of the rescale pass

/// Partial sums of one chunk of one sample, shifted by k (the sample's first value) for accuracy.
struct Sums {
  double c = 0, cc = 0, g = 0, gg = 0;
};

template <class S, class T>
void rescale_t(const StepArgs& a, double phi, float* r) {
  const int64_t B = a.numel / a.per_sample, ps = a.per_sample;
  const int64_t per = (ps + CHUNK - 1) / CHUNK, n = B * per;
  std::vector<Sums> part(n);
  auto cfg = [&](int64_t i, T w) {
    const T m = ld<S, T>(a.m, i);
    return fd::fd_guidance(m, ld<S, T>(a.m_c, i), w);
  };
#pragma omp parallel for schedule(static) num_threads(a.num_threads) if (a.numel >= (1 << 16) && a.num_threads > 1)
  for (int64_t q = 0; q < n; ++q) {
    const int64_t b = q / per, j0 = (q % per) * CHUNK, j1 = std::min(ps, j0 + CHUNK);
    const T w = static_cast<T>(a.w[b]);
    const double kc = ld<S, T>(a.m_c, b * ps), kg = cfg(b * ps, w);
    Sums s;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t i = b * ps + j;
      const double c = static_cast<double>(ld<S, T>(a.m_c, i)) - kc, g = static_cast<double>(cfg(i, w)) - kg;
      s.c += c;
      s.cc += c * c;
      s.g += g;
      s.gg += g * g;
    }
    part[q] = s;
  }
  const float fphi = static_cast<float>(phi), rest = static_cast<float>(1.0 - phi);
  for (int64_t b = 0; b < B; ++b) {
    Sums s;
    for (int64_t q = b * per; q < (b + 1) * per; ++q) {
      s.c += part[q].c;
      s.cc += part[q].cc;
      s.g += part[q].g;
      s.gg += part[q].gg;
    }
    const double nn = static_cast<double>(ps);
    // unbiased variances of the shifted values (the shift does not change them)
    const double vc = std::max(0.0, (s.cc - s.c * s.c / nn) / (nn - 1));
    const double vg = std::max(0.0, (s.gg - s.g * s.g / nn) / (nn - 1));
    const float std_c = static_cast<float>(sqrt(vc)), std_g = static_cast<float>(sqrt(vg));
    // a constant guided output (std 0) has no scale to match: r = 1 (diffusers' 0/0 would be NaN);
    // as guidance.rescale_factor, so is a NaN std (the step's non-finite flag reports that output)
    const float ratio = std_g > 0 ? std_c / std_g : 1.0f;
    r[b] = fphi * ratio + rest;
  }
}

/// torch.quantile(v, q) with linear interpolation, for float32 input (its arithmetic and rounding):
/// rank = q * (n - 1) in float, lerp between the order statistics below and above.
template <class T>
float quantile(std::vector<T>& v, double q) {
  const int64_t n = static_cast<int64_t>(v.size());
  for (const T& x : v)
    if (x != x) return NAN;  // torch: NaN sorts last and the rank moves there
  const float rank = static_cast<float>(q) * static_cast<float>(n - 1);
  const int64_t lo = static_cast<int64_t>(rank), hi = static_cast<int64_t>(ceilf(rank));
  const float weight = rank - static_cast<float>(lo);
  std::nth_element(v.begin(), v.begin() + lo, v.end());
  const T below = v[lo];
  const T above = hi == lo ? below : *std::min_element(v.begin() + lo + 1, v.end());
  // torch's lerp: the form that is exact at the nearer end
  const T wt = static_cast<T>(weight);
  const T res = fabs(weight) < 0.5f ? below + wt * (above - below) : above - (above - below) * (T(1) - wt);
  return static_cast<float>(res);
}

/// The row's e at element i: the model output, guided by w, rescaled by rr, plus c_g g (as the step).
template <class S, class T>
inline T guided(const StepArgs& a, const StepCoef<T>& c, int64_t i, T w, T rr) {
  T e = ld<S, T>(a.m, i);
  if (a.m_c) e = fd::fd_guidance(e, ld<S, T>(a.m_c, i), w);
  if (a.r) e = rr * e;
  if (a.g) e = e + c.c_g * ld<S, T>(a.g, i);
  return e;
}

template <class S, class T>
void threshold_t(const StepArgs& a, double ratio, double max_value, float* s) {
  const int64_t B = a.numel / a.per_sample, ps = a.per_sample;
  const StepCoef<T> c = fd::fd_unpack_coef<T>(a.coef);
  const float lo_bound = 1.0f, hi_bound = static_cast<float>(max_value);
#pragma omp parallel for schedule(dynamic) num_threads(a.num_threads) if (a.numel >= (1 << 16) && a.num_threads > 1)
  for (int64_t b = 0; b < B; ++b) {
    std::vector<T> v(static_cast<size_t>(ps));
    const T w = a.m_c ? static_cast<T>(a.w[b]) : T(0), rr = a.r ? static_cast<T>(a.r[b]) : T(1);
    for (int64_t j = 0; j < ps; ++j) {
      const int64_t i = b * ps + j;
      const T e = guided<S, T>(a, c, i, w, rr);
      const T d = c.a_x * ld<S, T>(a.x, i) + c.a_e * e;
      v[static_cast<size_t>(j)] = d < T(0) ? -d : d;
    }
    const float qv = quantile(v, ratio);
    // torch.clamp(min=1, max=max_value): max applied last, NaN kept
    s[b] = qv != qv ? qv : std::min(std::max(qv, lo_bound), hi_bound);
  }
}

template <class S, class T>
void langevin_t(const StepArgs& a, double l_x, double l_e, double* g2, double* z2) {
  const int64_t B = a.numel / a.per_sample, ps = a.per_sample;
  const StepCoef<T> c = fd::fd_unpack_coef<T>(a.coef);
  const T lx = static_cast<T>(l_x), le = static_cast<T>(l_e);
#pragma omp parallel for schedule(dynamic) num_threads(a.num_threads) if (a.numel >= (1 << 16) && a.num_threads > 1)
  for (int64_t b = 0; b < B; ++b) {
    const T w = a.m_c ? static_cast<T>(a.w[b]) : T(0), rr = a.r ? static_cast<T>(a.r[b]) : T(1);
    double gg = 0, zz = 0;
    for (int64_t j = 0; j < ps; ++j) {
      const int64_t i = b * ps + j;
      const T e = guided<S, T>(a, c, i, w, rr);
      const T g = l_x == 0.0 ? le * e : lx * ld<S, T>(a.x, i) + le * e;  // eps / score models: no x term
      gg += static_cast<double>(g) * static_cast<double>(g);
    }
    if (a.z) {
      for (int64_t j = 0; j < ps; ++j) {
        const double z = static_cast<double>(ld<S, T>(a.z, b * ps + j));
        zz += z * z;
      }
    } else {  // the noise the step draws, through the kernel's own generator
      std::vector<float> n(static_cast<size_t>(ps));
      normals(n.data(), a.seeds + b, 1, ps, a.row, fd::STREAM_MAIN, 1);
      for (float v : n) zz += static_cast<double>(v) * static_cast<double>(v);
    }
    g2[b] = gg;
    z2[b] = zz;
  }
}

/// The Gram reduction: per sample, chunks of CHUNK elements in parallel (cpu_gram.h's kernel on the
/// current SIMD level), then each sample's chunks summed in order (independent of the threads).
void gram_run(const void* const* slots, int64_t numel, int64_t ps, int dtype, int num_threads, double* g,
              double* sums) {
  constexpr int K = fd::BLEND_ROWS, NP = K * (K + 1) / 2;
  int mask = 0;
  for (int k = 0; k < K; ++k)
    if (slots[k]) mask |= 1 << k;
  const int64_t B = numel / ps, per = (ps + CHUNK - 1) / CHUNK, n = B * per;
  std::vector<double> part(static_cast<size_t>(n) * (NP + K), 0.0);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (numel >= (1 << 16) && num_threads > 1)
  for (int64_t q = 0; q < n; ++q) {
    const int64_t b = q / per, j0 = (q % per) * CHUNK, j1 = std::min(ps, j0 + CHUNK);
    gram_chunk(slots, mask, dtype, b * ps + j0, b * ps + j1, part.data() + q * (NP + K));
  }
  for (int64_t b = 0; b < B; ++b) {
    double tot[NP + K] = {};
    for (int64_t j = 0; j < per; ++j)
      for (int t = 0; t < NP + K; ++t) tot[t] += part[(b * per + j) * (NP + K) + t];
    int o = 0;
    for (int r = 0; r < K; ++r)
      for (int c = r; c < K; ++c, ++o) g[(b * K + r) * K + c] = g[(b * K + c) * K + r] = tot[o];
    for (int k = 0; k < K; ++k) sums[b * K + k] = tot[NP + k];
  }
}

}  // namespace

void gram(const void* const* slots, int64_t numel, int64_t per_sample, int dtype, int num_threads, double* g,
          double* sums) {
  if (dtype >= fd::DTYPE_F32 && dtype <= fd::DTYPE_BF16) gram_run(slots, numel, per_sample, dtype, num_threads, g, sums);
}

void langevin_norms(const StepArgs& a, double l_x, double l_e, double* g2, double* z2) {
  switch (a.dtype) {
    case fd::DTYPE_F32: langevin_t<float, float>(a, l_x, l_e, g2, z2); break;
    case fd::DTYPE_F64: langevin_t<double, double>(a, l_x, l_e, g2, z2); break;
    case fd::DTYPE_F16: langevin_t<Half, float>(a, l_x, l_e, g2, z2); break;
    case fd::DTYPE_BF16: langevin_t<BF16, float>(a, l_x, l_e, g2, z2); break;
    default: break;
  }
}

void rescale(const StepArgs& a, double phi, float* r) {
  switch (a.dtype) {
    case fd::DTYPE_F32: rescale_t<float, float>(a, phi, r); break;
    case fd::DTYPE_F64: rescale_t<double, double>(a, phi, r); break;
    case fd::DTYPE_F16: rescale_t<Half, float>(a, phi, r); break;
    case fd::DTYPE_BF16: rescale_t<BF16, float>(a, phi, r); break;
    default: break;
  }
}

void threshold(const StepArgs& a, double ratio, double max_value, float* s) {
  switch (a.dtype) {
    case fd::DTYPE_F32: threshold_t<float, float>(a, ratio, max_value, s); break;
    case fd::DTYPE_F64: threshold_t<double, double>(a, ratio, max_value, s); break;
    case fd::DTYPE_F16: threshold_t<Half, float>(a, ratio, max_value, s); break;
    case fd::DTYPE_BF16: threshold_t<BF16, float>(a, ratio, max_value, s); break;
    default: break;
  }
}

}  // namespace fd_cpu
