// The CUDA step kernel: one plan row over contiguous device tensors, one pass over memory.
//
// The per-element math and the noise are the shared headers (step_math.h, philox.h), the same code
// the CPU kernel runs; this file only moves data. Built with --fmad=false so that, like the CPU
// build's -ffp-contract=off, every operation rounds as written and the results equal the CPU
// kernel's bit for bit.
//
// Work split: the flat tensor (numel = batch * per_sample elements) is cut into chunks of 16 bytes
// (VEC elements: 4 fp32, 8 fp16/bf16, 2 fp64). Where every pointer is 16-byte aligned, each chunk
// is one 128-bit load per input (but g, m_2 and m_3, read element by element: see run()) and one
// 128-bit store per output; the numel % VEC elements after the last chunk (or every element, when
// some pointer is not aligned) take the scalar path. Both run in a grid-stride loop. A thread loads
// every input of its chunk before it stores anything, so out == x, a history slot both read and
// written, and m_w == m_3 are safe.
//
// Contract v3 extras, in a second instantiation of the kernel (EXTRA = true) so that a row without
// them runs the v2 code unchanged (same registers): u, the next model input (u_copies copies of
// u_scale * x' as stored), is written after out, from the rounded x' still in registers; each copy
// takes a 16-byte store where its own start is aligned (UCopies, set at launch), else element
// stores, so an unaligned u never sends the other operands to the scalar path. The flag: each
// thread sums fd_nonfinite(m) (and of m_c, m_2, m_3) over its elements and, if the sum is NaN, stores 1.
//
// Blend mode (the row's per-sample blend coefficients a given: e = b m + a_1 (m_c - m) + a_2 (m_2 - m)
// + a_3 m_3, and optionally the momentum write m_w with a's second four rows), in a third
// instantiation (BLEND = true, with EXTRA) so that rows without it keep the code and registers
// above: the branches m_2 / m_3 are read element by element (as g), the coefficients once per
// sample (a[k * batch + b]), and m_w is stored with the other outputs, after the history writes
// (it may be m_3 itself, the momentum buffer updated in place).
//
// Compiled as plain C++ with -DFD_CUDA_EMU (cuda_emu.h), the same kernel runs on the CPU with
// blockIdx/threadIdx loops; tests use that to check the indexing without a GPU.
#if defined(FD_CUDA_EMU)
#include "cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FD_LAUNCH(kernel, grid, block, stream) kernel<<<(grid), (block), 0, (stream)>>>
#endif

#include <string.h>

#include "cuda_step.h"
#include "philox.h"
#include "step_math.h"

#define FD_DEV __device__ __forceinline__

namespace fd_cuda {
namespace {

using fd::StepCoef;
using fd::StepFlags;
using fd::StepIn;
using fd::StepOut;

constexpr int THREADS = 256;

// Storage type S <-> compute type T (round to nearest even, as torch's casts).
template <class S>
struct Storage;

template <>
struct Storage<float> {
  using T = float;
  static FD_DEV T load(float v) { return v; }
  static FD_DEV float store(T v) { return v; }
};

template <>
struct Storage<double> {
  using T = double;
  static FD_DEV T load(double v) { return v; }
  static FD_DEV double store(T v) { return v; }
};

template <>
struct Storage<__half> {
  using T = float;
  static FD_DEV T load(__half v) { return __half2float(v); }
  static FD_DEV __half store(T v) { return __float2half_rn(v); }
};

template <>
struct Storage<__nv_bfloat16> {
  using T = float;
  static FD_DEV T load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static FD_DEV __nv_bfloat16 store(T v) { return __float2bfloat16_rn(v); }
};

/// VEC storage elements in one 16-byte register group.
template <class S>
struct alignas(16) Pack {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(S));
  S v[VEC];
};

/// Elements [base, base + N) of `ptr` into `o`: one 128-bit load when N is a whole chunk.
template <int N, class S>
FD_DEV void load_pack(const void* ptr, int64_t base, Pack<S>& o) {
  const S* src = static_cast<const S*>(ptr) + base;
  if (N == Pack<S>::VEC) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(o.v) = *reinterpret_cast<const uint4*>(src);
#else
#if defined(FD_CUDA_EMU)
    fd_emu::check_aligned16(src);
#endif
    memcpy(o.v, src, sizeof(o.v));
#endif
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < N; ++k) o.v[k] = src[k];
  }
}

/// Elements [base, base + N) of `o` to `ptr`: one 128-bit store when N is a whole chunk and `vec`
/// (the caller's promise that ptr + base is 16-byte aligned), else element stores.
template <int N, class S>
FD_DEV void store_pack(void* ptr, int64_t base, const Pack<S>& o, bool vec = true) {
  S* dst = static_cast<S*>(ptr) + base;
  if (N == Pack<S>::VEC && vec) {
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(o.v);
#else
#if defined(FD_CUDA_EMU)
    fd_emu::check_aligned16(dst);
#endif
    memcpy(dst, o.v, sizeof(o.v));
#endif
  } else {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < N; ++k) dst[k] = o.v[k];
  }
}

/// The copies of u a row writes, worked out at launch: their starts (ptr[1] = ptr[0] + numel
/// elements, a kernel parameter rather than a per-thread product: at 128 registers for 16-bit
/// storage that address is what made ptxas spill), and bit k of vec set when copy k starts 16-byte
/// aligned, so that the vector path stores it 16 bytes at a time (else element by element).
struct UCopies {
  void* ptr[2];
  int vec;
};

/// Per-sample state of the element being processed: scalars and the cached Philox group.
/// BLEND: also the blend coefficients of the sample, a[k] = p.a[k * batch + b] (k < 8 with m_w,
/// else k < 4: a has 4 rows then).
template <class T, bool BLEND>
struct Sample {
  int64_t b, j;  // sample, element within the sample
  T w, r, s;
  T a[2 * fd::BLEND_ROWS];
  uint64_t seed;
  int64_t group;  // Philox group whose normals are in nz/nz2; -1 for none
  float nz[4], nz2[4];

  FD_DEV void enter(const StepParams& p, int64_t b_, int64_t batch, bool mw) {
    b = b_;
    w = !BLEND && p.w ? static_cast<T>(p.w[b]) : T(0);  // blend rows have no w and r
    r = !BLEND && p.r ? static_cast<T>(p.r[b]) : T(0);
    s = p.s ? static_cast<T>(p.s[b]) : T(1);
    seed = p.seeds ? static_cast<uint64_t>(p.seeds[b]) : 0u;
    group = -1;
    if (BLEND) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < 2 * fd::BLEND_ROWS; ++k)  // constant indices: a stays in registers
        a[k] = (k < fd::BLEND_ROWS || mw) ? static_cast<T>(p.a[k * batch + b]) : T(0);
    }
  }
};

/// n[i] for a run-time i by selects: an indexed load would put n in local memory.
FD_DEV float pick(const float (&n)[4], int64_t i) {
  return i == 0 ? n[0] : i == 1 ? n[1] : i == 2 ? n[2] : n[3];
}

/// Elements [base, base + N) of the flat tensor (N = VEC for a chunk, 1 on the scalar path).
/// EXTRA: the row may write u and check the model output (f.u_copies, f.check; uc: where the copies
/// of u start and which take 16-byte stores); nf accumulates fd_nonfinite of every m / m_c (/ m_2 /
/// m_3) read. BLEND (with EXTRA): the row may be in blend mode (f.blend; batch: samples in the row,
/// the row stride of a).
template <int N, class S, bool EXTRA, bool BLEND>
FD_DEV void run(const StepParams& p, const StepCoef<typename Storage<S>::T>& c, const StepFlags& f, int64_t base,
                typename Storage<S>::T& nf, const UCopies& uc, int64_t batch) {
  using T = typename Storage<S>::T;
  using St = Storage<S>;
  const bool z_ext = p.z != nullptr, z2_ext = p.z2 != nullptr;

  // 1. every input of the N elements
  // (g, the classifier-guidance gradient, is read element by element in step 2 instead: one more
  // 16-byte pack made ptxas spill at its 128-register target for 16-bit storage on sm_90, and a
  // row with g costs a backward pass of the model anyway. Still before any store. The blend
  // branches m_2 and m_3 likewise: two more packs took the 16-bit blend variant from 146 to 150
  // registers and fp32's from 126, under the 128 that keeps two blocks per SM, to 136.)
  Pack<S> x{}, m{}, mc{}, h[fd::MAX_READS]{}, z{}, z2{}, mk{}, kn{};
  load_pack<N>(p.x, base, x);
  load_pack<N>(p.m, base, m);
  if (f.cfg) load_pack<N>(p.m_c, base, mc);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < fd::MAX_READS; ++k)
    if (k < f.n_reads) load_pack<N>(p.h_read[k], base, h[k]);
  if (f.z && z_ext) load_pack<N>(p.z, base, z);
  if (f.mask) {
    load_pack<N>(p.mask, base, mk);
    load_pack<N>(p.known, base, kn);
    if (f.z2 && z2_ext) load_pack<N>(p.z2, base, z2);
  }

  // 2. the math, element by element (sample and Philox group tracked incrementally)
  Sample<T, BLEND> smp;
  const int64_t b0 = base / p.per_sample;
  smp.enter(p, b0, batch, BLEND && f.mw);
  smp.j = base - b0 * p.per_sample;
  Pack<S> ox{}, oh[fd::MAX_WRITES]{}, ow{};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < N; ++k) {
    if (k > 0 && ++smp.j == p.per_sample) {
      smp.enter(p, smp.b + 1, batch, BLEND && f.mw);
      smp.j = 0;
    }
    StepIn<T> in{};
    in.x = St::load(x.v[k]);
    in.m = St::load(m.v[k]);
    if (f.cfg) in.m_c = St::load(mc.v[k]);
    if (BLEND && f.m2) in.m_2 = St::load(static_cast<const S*>(p.m_2)[base + k]);
    if (BLEND && f.m3) in.m_3 = St::load(static_cast<const S*>(p.m_3)[base + k]);
    if (EXTRA && f.check) {
      nf = nf + fd::fd_nonfinite(in.m);
      if (f.cfg) nf = nf + fd::fd_nonfinite(in.m_c);
      if (BLEND && f.m2) nf = nf + fd::fd_nonfinite(in.m_2);
      if (BLEND && f.m3) nf = nf + fd::fd_nonfinite(in.m_3);
    }
    if (f.g) in.g = St::load(static_cast<const S*>(p.g)[base + k]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int q = 0; q < fd::MAX_READS; ++q)
      if (q < f.n_reads) in.h[q] = St::load(h[q].v[k]);
    in.w = smp.w;
    in.r = smp.r;
    in.s = smp.s;
    if (BLEND && f.blend) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int q = 0; q < 2 * fd::BLEND_ROWS; ++q) in.a[q] = smp.a[q];
    }
    const int64_t g = smp.j >> 2;
    if ((f.z && !z_ext) || (f.z2 && !z2_ext)) {
      if (g != smp.group) {
        if (f.z && !z_ext) fd::fd_philox_group_normals(smp.seed, static_cast<uint64_t>(g), p.row, fd::STREAM_MAIN, smp.nz);
        if (f.z2 && !z2_ext) fd::fd_philox_group_normals(smp.seed, static_cast<uint64_t>(g), p.row, fd::STREAM_KNOWN, smp.nz2);
        smp.group = g;
      }
    }
    if (f.z) in.z = z_ext ? St::load(z.v[k]) : static_cast<T>(pick(smp.nz, smp.j & 3));
    if (f.mask) {
      in.mask = St::load(mk.v[k]);
      in.known = St::load(kn.v[k]);
      if (f.z2) in.z2 = z2_ext ? St::load(z2.v[k]) : static_cast<T>(pick(smp.nz2, smp.j & 3));
    }
    // Evaluate every write slot (a compile-time count: o.h stays in registers); unused writes are
    // not stored. Reads are added for k < n_reads only, as the reference does (no 0 * h term,
    // which would turn a -0 into +0).
    StepFlags fk = f;
    fk.n_writes = fd::MAX_WRITES;
    const StepOut<T> o = fd::fd_step_element<T, T>(c, fk, in);
    ox.v[k] = St::store(o.x);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int q = 0; q < fd::MAX_WRITES; ++q)
      if (q < f.n_writes) oh[q].v[k] = St::store(o.h[q]);
    if (BLEND && f.mw) ow.v[k] = St::store(o.m_w);
  }

  // 3. only now the outputs (they may alias the inputs read above)
  store_pack<N>(p.out, base, ox);
  if (f.n_writes > 0) store_pack<N>(p.h_write[0], base, oh[0]);
  if (f.n_writes > 1) store_pack<N>(p.h_write[1], base, oh[1]);
  if (BLEND && f.mw) store_pack<N>(p.m_w, base, ow);  // after the history writes, as reference writes it
  if (EXTRA && f.u_copies) {  // the next model input from x' as stored (rounded to S), as torch's x * in_scale
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < N; ++k) ox.v[k] = St::store(St::load(ox.v[k]) * c.u_scale);  // ox is stored: reuse it
    store_pack<N>(uc.ptr[0], base, ox, uc.vec & 1);
    if (f.u_copies == 2) store_pack<N>(uc.ptr[1], base, ox, (uc.vec & 2) != 0);
  }
}

/// EXTRA = false: the v2 row (u and flag ignored); true: also u (p.u_copies copies) and flag.
/// BLEND = true (with EXTRA): also blend mode (p.a given; batch = numel / per_sample, a's row stride).
template <class S, bool EXTRA, bool BLEND>
__global__ void __launch_bounds__(THREADS)
    step_kernel(const StepParams p, int64_t n_chunks, const UCopies uc, int64_t batch) {
  using T = typename Storage<S>::T;
  constexpr int VEC = Pack<S>::VEC;
  __shared__ StepCoef<T> c;
  if (threadIdx.x == 0) c = fd::fd_unpack_coef<T>(p.coef);
  __syncthreads();
  // BLEND is launched for rows with a (and so without w and r: bind_args.h refuses them), the other
  // variants for rows without: the constants drop the other mode's code
  const StepFlags f = fd::fd_make_flags<T>(c, p.n_reads, p.n_writes, p.clip, p.m_c != nullptr,
                                           !BLEND && p.r != nullptr, p.mask != nullptr, p.g != nullptr,
                                           EXTRA && p.u ? p.u_copies : 0, EXTRA && p.flag != nullptr, BLEND,
                                           p.m_2 != nullptr, p.m_3 != nullptr, p.m_w != nullptr);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T nf(0);  // NaN once any m / m_c / m_2 / m_3 element this thread read is NaN or +-Inf
  for (int64_t ch = tid; ch < n_chunks; ch += stride) run<VEC, S, EXTRA, BLEND>(p, c, f, ch * VEC, nf, uc, batch);
  for (int64_t i = n_chunks * VEC + tid; i < p.numel; i += stride)
    run<1, S, EXTRA, BLEND>(p, c, f, i, nf, uc, batch);
  if (EXTRA && f.check && nf != nf) *p.flag = 1;  // never 0: other threads, and earlier rows, may have set it
}

__global__ void __launch_bounds__(THREADS)
    bits_kernel(uint32_t* out, const int64_t* seeds, int64_t batch, int64_t groups, uint32_t row, uint32_t stream_id) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < batch * groups; i += stride) {
    const int64_t b = i / groups, g = i - b * groups;
    fd::fd_philox_group_bits(static_cast<uint64_t>(seeds[b]), static_cast<uint64_t>(g), row, stream_id, out + 4 * i);
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

/// Where the copies of u start (k < u_copies, numel elements apart) and which start 16-byte aligned:
/// those take 16-byte stores on the vector path (the other operands decide that path, vector_path()).
UCopies u_copies_of(const StepParams& p, size_t elem) {
  UCopies uc{{nullptr, nullptr}, 0};
  for (int k = 0; p.u && k < p.u_copies && k < 2; ++k) {
    const int64_t stride = p.u_stride ? p.u_stride : p.numel;  // u_stride: a row run sample by sample
    uc.ptr[k] = static_cast<char*>(p.u) + static_cast<size_t>(k) * static_cast<size_t>(stride) * elem;
    if (aligned16(uc.ptr[k])) uc.vec |= 1 << k;
  }
  return uc;
}

int blocks_cap(int max_blocks) {
  if (max_blocks > 0) return max_blocks;
  static int sms[64] = {0};  // per device; a benign race writes the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 1024;
  if (!sms[dev]) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 128;
    sms[dev] = n;
  }
  return sms[dev] * 8;
}

int64_t grid_for(int64_t work, int max_blocks) {
  int64_t blocks = (work + THREADS - 1) / THREADS;
  const int64_t cap = blocks_cap(max_blocks);
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : blocks;
}

template <class S>
const char* launch_typed(const StepParams& p, cudaStream_t stream, int max_blocks) {
  constexpr int VEC = Pack<S>::VEC;
  const int64_t n_chunks = vector_path(p) ? p.numel / VEC : 0;
  const int64_t work = n_chunks + (p.numel - n_chunks * VEC);
  const int64_t blocks = grid_for(work, max_blocks);
  const bool extra = (p.u && p.u_copies > 0) || p.flag;
  const int64_t batch = p.numel / p.per_sample;  // the row stride of the blend coefficients a
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
  if (p.a)
    FD_LAUNCH((step_kernel<S, true, true>), static_cast<unsigned>(blocks), THREADS, stream)(
        p, n_chunks, u_copies_of(p, sizeof(S)), batch);
  else if (extra)
    FD_LAUNCH((step_kernel<S, true, false>), static_cast<unsigned>(blocks), THREADS, stream)(
        p, n_chunks, u_copies_of(p, sizeof(S)), batch);
  else
    FD_LAUNCH((step_kernel<S, false, false>), static_cast<unsigned>(blocks), THREADS, stream)(p, n_chunks,
                                                                                            UCopies{}, batch);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int u_vector(const StepParams& p, int elem_size) { return u_copies_of(p, static_cast<size_t>(elem_size)).vec; }

bool vector_path(const StepParams& p) {
  // g, m_2 and m_3 are read element by element (see run()) and each copy of u is stored by the
  // vector path with 16-byte or element stores as its own alignment allows (u_copies_of): none of
  // them decides here (m_w, stored 16 bytes at a time, does)
  const void* ptrs[] = {p.x, p.out, p.m, p.m_c, p.h_read[0], p.h_read[1], p.h_read[2], p.h_read[3],
                        p.h_write[0], p.h_write[1], p.z, p.z2, p.mask, p.known, p.m_w};
  for (const void* q : ptrs)
    if (q && !aligned16(q)) return false;
  return true;
}

const char* launch_step(const StepParams& p, int dtype, uintptr_t stream, int max_blocks) {
  if (p.numel <= 0) return nullptr;
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case fd::DTYPE_F32: return launch_typed<float>(p, st, max_blocks);
    case fd::DTYPE_F64: return launch_typed<double>(p, st, max_blocks);
    case fd::DTYPE_F16: return launch_typed<__half>(p, st, max_blocks);
    case fd::DTYPE_BF16: return launch_typed<__nv_bfloat16>(p, st, max_blocks);
    default: return "unknown dtype code";
  }
}

const char* launch_bits(uint32_t* out, const int64_t* seeds, int64_t batch, int64_t groups, uint32_t row,
                        uint32_t stream_id, uintptr_t stream) {
  if (batch <= 0 || groups <= 0) return nullptr;
  const int64_t blocks = grid_for(batch * groups, 0);
  cudaGetLastError();
  FD_LAUNCH(bits_kernel, static_cast<unsigned>(blocks), THREADS, reinterpret_cast<cudaStream_t>(stream))(
      out, seeds, batch, groups, row, stream_id);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fd_cuda
