// One chunk of the guidance Gram reduction (cpu_reduce.cpp's gram), compiled per SIMD level by
// cpu_step_level.cpp so that the float64 lanes below vectorise with that level's instructions.
// Included inside an anonymous namespace after step_math.h (fd::BLEND_ROWS, fd_half_to_float).
#pragma once

namespace fd_gram {

template <int DT>
inline double load(const void* p, int64_t i) {
  if (DT == fd::DTYPE_F32) return static_cast<double>(static_cast<const float*>(p)[i]);
  if (DT == fd::DTYPE_F64) return static_cast<const double*>(p)[i];
  if (DT == fd::DTYPE_F16) {
#ifdef __F16C__  // the conversion instruction (exact, as fd_half_to_float), which vectorises
    return static_cast<double>(_cvtsh_ss(static_cast<const uint16_t*>(p)[i]));
#else
    return static_cast<double>(fd::fd_half_to_float(static_cast<const uint16_t*>(p)[i]));
#endif
  }
  return static_cast<double>(fd::fd_bf16_to_float(static_cast<const uint16_t*>(p)[i]));
}

/// Sums over elements [i0, i1) of the present slots MASK (bit k: slot k): acc[pair] for each pair
/// r <= c of slots (row-major upper triangle), then acc[NP + k] for each slot. Per sum, L
/// independent float64 lanes (lane l takes elements l, l + L, ...: chains that vectorise without
/// reassociation), added in lane order at the end: the result depends only on the chunk.
template <int DT, int MASK>
void chunk(const void* const* slots, int64_t i0, int64_t i1, double* acc) {
  constexpr int K = fd::BLEND_ROWS, NP = K * (K + 1) / 2, L = 8;
  double lane[NP + K][L] = {};
  int64_t i = i0;
  for (; i + L <= i1; i += L) {
    double v[K][L] = {};  // (rows of absent slots are never read)
    for (int k = 0; k < K; ++k)
      if (MASK >> k & 1)
        for (int l = 0; l < L; ++l) v[k][l] = load<DT>(slots[k], i + l);
    int o = 0;
    for (int r = 0; r < K; ++r)
      for (int c = r; c < K; ++c, ++o)
        if ((MASK >> r & 1) && (MASK >> c & 1))
          for (int l = 0; l < L; ++l) lane[o][l] += v[r][l] * v[c][l];
    for (int k = 0; k < K; ++k)
      if (MASK >> k & 1)
        for (int l = 0; l < L; ++l) lane[NP + k][l] += v[k][l];
  }
  for (int l = 0; i < i1; ++i, ++l) {  // the last < L elements, in lanes 0..
    double v[K] = {};
    for (int k = 0; k < K; ++k)
      if (MASK >> k & 1) v[k] = load<DT>(slots[k], i);
    int o = 0;
    for (int r = 0; r < K; ++r)
      for (int c = r; c < K; ++c, ++o) lane[o][l] += v[r] * v[c];
    for (int k = 0; k < K; ++k) lane[NP + k][l] += v[k];
  }
  for (int t = 0; t < NP + K; ++t) {
    double sum = 0;
    for (int l = 0; l < L; ++l) sum += lane[t][l];
    acc[t] = sum;
  }
}

using ChunkFn = void (*)(const void* const*, int64_t, int64_t, double*);

template <int DT>
ChunkFn pick_dt(int mask) {
  static const ChunkFn table[16] = {chunk<DT, 0>,  chunk<DT, 1>,  chunk<DT, 2>,  chunk<DT, 3>,
                                    chunk<DT, 4>,  chunk<DT, 5>,  chunk<DT, 6>,  chunk<DT, 7>,
                                    chunk<DT, 8>,  chunk<DT, 9>,  chunk<DT, 10>, chunk<DT, 11>,
                                    chunk<DT, 12>, chunk<DT, 13>, chunk<DT, 14>, chunk<DT, 15>};
  return table[mask & 15];
}

inline void run_chunk(const void* const* slots, int mask, int dtype, int64_t i0, int64_t i1, double* acc) {
  switch (dtype) {
    case fd::DTYPE_F32: pick_dt<fd::DTYPE_F32>(mask)(slots, i0, i1, acc); break;
    case fd::DTYPE_F64: pick_dt<fd::DTYPE_F64>(mask)(slots, i0, i1, acc); break;
    case fd::DTYPE_F16: pick_dt<fd::DTYPE_F16>(mask)(slots, i0, i1, acc); break;
    default: pick_dt<fd::DTYPE_BF16>(mask)(slots, i0, i1, acc); break;
  }
}

}  // namespace fd_gram
