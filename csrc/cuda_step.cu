// The CUDA step kernel: one plan row over contiguous device tensors, one pass over memory.
//
// The per-element math and the noise are the shared headers (step_math.h, philox.h), the same code
// the CPU kernel runs; this file only moves data. Built with --fmad=false so that, like the CPU
// build's -ffp-contract=off, every operation rounds as written and the results equal the CPU
// kernel's bit for bit.
//
// Dispatch (issue 19): one kernel template, step_kernel<S, K>, S the storage type and K a bitmask
// of what the row does, compiled in a bounded set of variants. A run-time test per element costs
// little, but every operand a generic kernel might touch costs registers, and registers decide the
// occupancy (the one generic kernel took 126-180 registers: a quarter of an SM's threads). So the
// common rows get variants that hold only their own operands:
//   K_CFG    guided: m_c and w (e = m + w (m_c - m))
//   K_HIST   history: up to 2 reads and 2 writes (their counts at run time, bounded by 2 so the
//            unused slots are dead code); without it the row has none
//   K_PHILOX noise z drawn in the kernel (Philox), or K_ZEXT: external z; neither: the row has no z
// with u (the next model input), the non-finite flag and the clip mode (static or dynamic, s per
// sample) tested at run time in every variant (uniform branches, few registers). That is
// 2 x 2 x 3 = 12 specialised variants per storage type. Everything else (rescale r,
// mask/known/z2, gradient g, more than 2 history reads or writes) runs the
// general variant K_GENERAL, whose flags are all run-time values (the pre-issue-19 kernel), and
// blend rows (a given) its blend instantiation K_GENERAL | K_BLEND: 14 kernels per storage type,
// 56 in all. dispatch() maps a row to its variant; launch_typed() indexes a table of them.
// tests/backends/test_cuda_registers.py holds the specialised fp32/fp16/bf16 variants to <= 64
// registers (fp64 <= 96), no spills, on sm_90 (__launch_bounds__ gives ptxas that target).
//
// Host-side work, once per launch: the coefficients are rounded to the compute type and the flags
// decided (fd_unpack_coef / fd_make_flags, the same code the device ran before) and passed as
// kernel parameters (no shared memory, no barrier); the multiply-shift that finds an element's
// sample is set up (Layout); the grid is at most the occupancy API's blocks per SM times the SMs,
// for the variant launched.
//
// Work split: the flat tensor (numel = batch * per_sample elements) is cut into chunks of 16 bytes
// (VEC elements: 4 fp32, 8 fp16/bf16, 2 fp64); the numel % VEC elements after the last chunk take
// the scalar path. Both run in a grid-stride loop. Each operand of a chunk is one 128-bit load or
// store where that operand is 16-byte aligned (bit k of Layout::al, set at launch) and VEC element
// accesses where it is not, so one unaligned operand (m_c = out[B:] at an odd offset) costs only its
// own accesses; g, m_2 and m_3 are always read element by element (see load()). vector_path() still
// says whether every operand takes the 16-byte accesses. m, m_c and external z (read once,
// overwritten before the next row reads anything) are loaded with the evict-first hint (__ldcs)
// where 16 bytes at a time.
//
// Chunks in flight (issue 19): a thread of a specialised variant takes U chunks per iteration
// (UNROLL, 1-4 by variant and storage width: as many as fit its register target without a spill,
// measured with ptxas; the general variants 1), chunks ch, ch + stride, ..., ch + (U-1) stride so
// that at every access adjacent threads still touch adjacent 16-byte chunks (coalesced), then
// moves on by U strides; a group that runs past the last chunk is cut short (run()), and the grid
// is sized for numel / (U VEC) threads. run() issues every load of its U chunks before any math
// or store (U times the memory requests of one chunk in flight: SASS shows all of them ahead of
// the first store), then computes and stores each chunk in turn. Every input of every chunk is
// read before any output is written, so out == x, a history slot both read and written, and
// m_w == m_3 are safe (outputs alias inputs element for element only).
//
// Per-sample scalars (w, r, s, the Philox seed, blend a) are held across a thread's chunks
// (Sample) and reloaded only where an element's sample is not the one held: one multiply-shift per
// chunk finds it (Layout: exact for numel < 2^31, else a 64-bit division), and an element that
// crosses into the next sample inside a chunk moves on by one. Only the scalars the row uses are
// loaded. (A 2-D grid, a block row per sample, would find the sample for free but breaks the
// 16-byte chunks wherever per_sample is not a multiple of VEC, and wastes blocks on small batches.)
//
// u, the next model input (u_copies copies of u_scale * x' as stored), is written after out, from
// the rounded x' still in registers; each copy takes a 16-byte store where its own start is aligned
// (UCopies). The flag: each thread sums fd_nonfinite(m) (and of m_c, m_2, m_3) over its elements
// and, if the sum is NaN, stores 1.
//
// Blend mode (the row's per-sample blend coefficients a given: e = b m + a_1 (m_c - m) + a_2 (m_2 - m)
// + a_3 m_3, and optionally the momentum write m_w with a's second four rows), in its own general
// instantiation so that rows without it keep the code and registers above: the branches m_2 / m_3
// are read element by element (as g), the coefficients once per sample (a[k * batch + b]), and m_w
// is stored with the other outputs, after the history writes (it may be m_3 itself, the momentum
// buffer updated in place).
//
// Compiled as plain C++ with -DFD_CUDA_EMU (cuda_emu.h), the same kernel runs on the CPU with
// blockIdx/threadIdx loops; tests use that to check the indexing and the dispatch without a GPU.
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

// --- variants -------------------------------------------------------------------------------------

constexpr unsigned K_CFG = 1, K_HIST = 2, K_PHILOX = 4, K_ZEXT = 8, K_GENERAL = 16, K_BLEND = 32;

/// What variant K may meet, as compile-time constants (the general ones: anything, at run time).
template <unsigned K>
struct Spec {
  static constexpr bool general = (K & K_GENERAL) != 0;
  static constexpr bool blend = (K & K_BLEND) != 0;  // general only
  static constexpr bool cfg = general || (K & K_CFG) != 0;
  static constexpr int max_reads = general ? fd::MAX_READS : (K & K_HIST) ? 2 : 0;
  static constexpr int max_writes = general ? fd::MAX_WRITES : (K & K_HIST) ? 2 : 0;
  static constexpr bool philox = general || (K & K_PHILOX) != 0;
  static constexpr bool zext = general || (K & K_ZEXT) != 0;
  // registers: the specialised variants are held to 64 (fp32 compute) / 80 (fp64) by asking for 4 /
  // 3 resident blocks of THREADS (ptxas meets that without spilling: test_cuda_registers.py); the
  // general ones keep ptxas's own choice (93-120 on sm_90 today: 2 blocks per SM)
  static constexpr int min_blocks(bool f64) { return general ? 1 : f64 ? 3 : 4; }
};

/// Chunks in flight per thread and grid-stride iteration (run()) of the specialised variants, by K
/// (= variant_index) and storage width: the most that ptxas (nvcc 13.0, sm_90) fits into the
/// variant's register target (min_blocks) without spilling, measured by compiling with every
/// -DFD_FORCE_UNROLL=U (U = 1..4) and reading ptxas -v (test_cuda_registers.py holds the result).
/// Each chunk in flight holds its input packs (x, m, and m_c, 2 history reads, external z as the
/// variant has them: 4 registers each) from its loads to its math, so the count falls as packs
/// and the Philox math's temporaries are added: rows of 5 or 6 packs, and history with Philox,
/// spill even at 2 and keep 1 (for 16-bit storage, whose conversions cost registers, 4 packs too).
/// The general variants keep 1: their rows are the rare ones, at 93-120 registers already.
constexpr int UNROLL_BY_K[3][12] = {
    // K: 0  CFG HIST HIST|CFG, then the same with PHILOX, then with ZEXT
    {3, 2, 2, 1, 3, 2, 1, 1, 2, 2, 1, 1},   // fp32 (4 for K = 0 spilled 4 bytes)
    {3, 2, 1, 1, 3, 2, 1, 1, 2, 1, 1, 1},   // fp16, bf16 (bf16 K_ZEXT|K_CFG fits 2, fp16's spills)
    {4, 2, 2, 1, 4, 2, 1, 1, 3, 2, 1, 1}};  // fp64 (80 registers: 3 blocks of 256 per SM)

template <class S, unsigned K>
#if defined(FD_FORCE_UNROLL)  // the measurement above
constexpr int UNROLL = Spec<K>::general ? 1 : FD_FORCE_UNROLL;
#else
constexpr int UNROLL = Spec<K>::general ? 1 : UNROLL_BY_K[sizeof(S) == 4 ? 0 : sizeof(S) == 2 ? 1 : 2][K];
#endif

// --- loads and stores ---------------------------------------------------------------------------

/// VEC storage elements in one 16-byte register group.
template <class S>
struct alignas(16) Pack {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(S));
  S v[VEC];
};

/// Elements [base, base + N) of `ptr` into `o`: one 128-bit load when N is a whole chunk and `vec`
/// (the caller's promise that ptr is 16-byte aligned), else element loads. STREAM: the data is read
/// once (evict-first hint).
template <int N, bool STREAM = false, class S>
FD_DEV void load_pack(const void* ptr, int64_t base, Pack<S>& o, bool vec) {
  const S* src = static_cast<const S*>(ptr) + base;
  if (N == Pack<S>::VEC && vec) {
#if defined(__CUDA_ARCH__)
    if (STREAM)
      *reinterpret_cast<uint4*>(o.v) = __ldcs(reinterpret_cast<const uint4*>(src));
    else
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
/// (the caller's promise that ptr is 16-byte aligned), else element stores.
template <int N, class S>
FD_DEV void store_pack(void* ptr, int64_t base, const Pack<S>& o, bool vec) {
  S* dst = static_cast<S*>(ptr) + base;
  if (N == Pack<S>::VEC && vec) {
#if defined(__CUDA_ARCH__)
    // st.global.v4 by inline asm (__stwb: the default write-back policy): a plain uint4 store of
    // the second of U chunks came out of nvcc 13.0 as four 32-bit stores
    __stwb(reinterpret_cast<uint4*>(dst), *reinterpret_cast<const uint4*>(o.v));
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

// Bits of Layout::al: which element operands start 16-byte aligned.
constexpr int A_X = 0, A_OUT = 1, A_M = 2, A_MC = 3, A_H = 4, A_W = A_H + fd::MAX_READS, A_Z = A_W + fd::MAX_WRITES,
              A_Z2 = A_Z + 1, A_MASK = A_Z + 2, A_KNOWN = A_Z + 3, A_MW = A_Z + 4;

/// The row's shape, worked out at launch: operand alignment, samples, and the multiply-shift that
/// gives an element's sample (b = i / per_sample = (i * div_mul) >> div_shift, exact for i, per_sample
/// < 2^31 with div_mul = ceil(2^div_shift / per_sample), div_shift = 31 + ceil(log2 per_sample);
/// div_shift 0: numel >= 2^31, a 64-bit division instead).
struct Layout {
  unsigned al;    // bit A_*: operand 16-byte aligned
  int div_shift;  // 0: divide
  uint32_t div_mul;
  int64_t batch;  // samples in the row (the row stride of the blend coefficients a)
};

FD_DEV bool al(const Layout& L, int bit) { return ((L.al >> bit) & 1u) != 0; }

FD_DEV int64_t sample_of(int64_t i, int64_t per_sample, const Layout& L) {
  if (L.div_shift) return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(i)) * L.div_mul) >> L.div_shift);
  return i / per_sample;
}

/// The per-sample scalars of the sample a thread is in, kept across its chunks (step_kernel) and
/// reloaded by enter() only when an element's sample is not the one held (b; -1: none yet): a
/// thread walks its chunks in increasing order, so each sample it meets is loaded once. Only what
/// the row uses is loaded (w with guidance, r with rescale, s with clipping, the seed with Philox
/// noise): the specialised variants know most of that at compile time and hold no register for
/// the rest. BLEND: also the blend coefficients, a[k] = p.a[k * batch + b] (k < 8 with m_w, else
/// k < 4: a has 4 rows then).
template <class T, bool BLEND>
struct Sample {
  int64_t b = -1;
  T w{}, r{}, s{};
  T a[2 * fd::BLEND_ROWS]{};
  uint64_t seed = 0;

  FD_DEV void enter(const StepParams& p, const StepFlags& f, bool philox, int64_t b_, int64_t batch) {
    b = b_;
    if (!BLEND && f.cfg) w = static_cast<T>(p.w[b]);  // blend rows have no w and r
    if (!BLEND && f.rescale) r = static_cast<T>(p.r[b]);
    s = f.clip != fd::CLIP_NONE ? static_cast<T>(p.s[b]) : T(1);
    if (philox) seed = static_cast<uint64_t>(p.seeds[b]);
    if (BLEND && f.blend) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int k = 0; k < 2 * fd::BLEND_ROWS; ++k)  // constant indices: a stays in registers
        a[k] = (k < fd::BLEND_ROWS || f.mw) ? static_cast<T>(p.a[k * batch + b]) : T(0);
    }
  }
};

/// The Philox normals of the group (4 elements of a sample) the element being processed is in.
/// Drawn at a chunk's first element and wherever j % 4 == 0 (a new group, or a new sample: j = 0)
/// as the chunk's elements walk on, so no group index is held. Per chunk, not per thread: a
/// thread's next chunk is a grid stride (>= 256 chunks) away, never in the same group.
struct Noise {
  float nz[4], nz2[4];
};

/// n[i] for a run-time i by selects: an indexed load would put n in local memory.
FD_DEV float pick(const float (&n)[4], int64_t i) {
  return i == 0 ? n[0] : i == 1 ? n[1] : i == 2 ? n[2] : n[3];
}

/// The flags variant K runs a row with: the host's flags (fd_make_flags), with what K rules out
/// made constant false / zero / bounded so that the compiler drops that code. dispatch() sends a
/// row only to a variant whose constants agree with its flags.
template <unsigned K>
FD_DEV StepFlags spec_flags(const StepFlags& h) {
  using Sp = Spec<K>;
  if (Sp::general) return h;
  StepFlags f = h;
  f.n_reads = h.n_reads < Sp::max_reads ? h.n_reads : Sp::max_reads;
  f.n_writes = h.n_writes < Sp::max_writes ? h.n_writes : Sp::max_writes;
  f.cfg = Sp::cfg;
  f.rescale = false;  // clip stays a run-time flag (a per-sample scalar and a compare)
  f.mask = f.g = f.z2 = f.blend = f.m2 = f.m3 = f.mw = false;
  f.z = Sp::philox || Sp::zext;
  return f;
}

/// Every input of elements [base, base + N) that is read as a pack (g and the blend branches m_2 /
/// m_3 are read element by element by compute(), see there).
template <class S>
struct Inputs {
  Pack<S> x, m, mc, h[fd::MAX_READS], z, z2, mk, kn;
};

/// The outputs of elements [base, base + N) that compute() fills and store() writes.
template <class S>
struct Outputs {
  Pack<S> x, h[fd::MAX_WRITES], mw;
};

/// Step 1: the input packs of elements [base, base + N) (N = VEC for a chunk, 1 on the scalar path).
template <int N, class S, unsigned K>
FD_DEV void load(const StepParams& p, const StepFlags& f, int64_t base, const Layout& L, Inputs<S>& in) {
  using Sp = Spec<K>;
  const bool z_ext = Sp::general ? p.z != nullptr : Sp::zext;  // the specialised variants know it
  // (g, the classifier-guidance gradient, is read element by element in compute() instead: one more
  // 16-byte pack made ptxas spill at its 128-register target for 16-bit storage on sm_90, and a
  // row with g costs a backward pass of the model anyway. Still before any store. The blend
  // branches m_2 and m_3 likewise: two more packs took the 16-bit blend variant from 146 to 150
  // registers and fp32's from 126, under the 128 that keeps two blocks per SM, to 136.)
  load_pack<N>(p.x, base, in.x, al(L, A_X));
  load_pack<N, true>(p.m, base, in.m, al(L, A_M));
  if (f.cfg) load_pack<N, true>(p.m_c, base, in.mc, al(L, A_MC));
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < Sp::max_reads; ++k)
    if (k < f.n_reads) load_pack<N>(p.h_read[k], base, in.h[k], al(L, A_H + k));
  if (f.z && z_ext) load_pack<N, true>(p.z, base, in.z, al(L, A_Z));
  if (f.mask) {
    load_pack<N>(p.mask, base, in.mk, al(L, A_MASK));
    load_pack<N>(p.known, base, in.kn, al(L, A_KNOWN));
    if (f.z2 && p.z2) load_pack<N>(p.z2, base, in.z2, al(L, A_Z2));
  }
}

/// Step 2: the math of elements [base, base + N), element by element, from `in` into `out`. smp
/// holds the sample of the element before (or -1) and is moved on as the elements cross samples;
/// nf accumulates fd_nonfinite of every m / m_c (/ m_2 / m_3) read (f.check).
template <int N, class S, unsigned K>
FD_DEV void compute(const StepParams& p, const StepCoef<typename Storage<S>::T>& c, const StepFlags& f,
                    int64_t base, const Layout& L, const Inputs<S>& in, Sample<typename Storage<S>::T, Spec<K>::blend>& smp,
                    typename Storage<S>::T& nf, Outputs<S>& out) {
  using T = typename Storage<S>::T;
  using St = Storage<S>;
  using Sp = Spec<K>;
  constexpr bool BLEND = Sp::blend;
  // which noise source: the specialised variants know it (philox xor zext), the general one asks
  const bool z_ext = Sp::general ? p.z != nullptr : Sp::zext;
  const bool z2_ext = p.z2 != nullptr;
  const bool philox = (f.z && !z_ext) || (f.z2 && !z2_ext);

  // the sample of the first element: one multiply-shift; the scalars only when it is a new one
  const int64_t b0 = sample_of(base, p.per_sample, L);
  if (b0 != smp.b) smp.enter(p, f, philox, b0, L.batch);
  int64_t j = base - b0 * p.per_sample;  // element within the sample
  Noise nz;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int k = 0; k < N; ++k) {
    if (k > 0 && ++j == p.per_sample) {  // the chunk straddles samples (and any number of them)
      smp.enter(p, f, philox, smp.b + 1, L.batch);
      j = 0;
    }
    StepIn<T> e{};
    e.x = St::load(in.x.v[k]);
    e.m = St::load(in.m.v[k]);
    if (f.cfg) e.m_c = St::load(in.mc.v[k]);
    if (BLEND && f.m2) e.m_2 = St::load(static_cast<const S*>(p.m_2)[base + k]);
    if (BLEND && f.m3) e.m_3 = St::load(static_cast<const S*>(p.m_3)[base + k]);
    if (f.check) {
      nf = nf + fd::fd_nonfinite(e.m);
      if (f.cfg) nf = nf + fd::fd_nonfinite(e.m_c);
      if (BLEND && f.m2) nf = nf + fd::fd_nonfinite(e.m_2);
      if (BLEND && f.m3) nf = nf + fd::fd_nonfinite(e.m_3);
    }
    if (f.g) e.g = St::load(static_cast<const S*>(p.g)[base + k]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int q = 0; q < Sp::max_reads; ++q)
      if (q < f.n_reads) e.h[q] = St::load(in.h[q].v[k]);
    e.w = smp.w;
    e.r = smp.r;
    e.s = smp.s;
    if (BLEND && f.blend) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int q = 0; q < 2 * fd::BLEND_ROWS; ++q) e.a[q] = smp.a[q];
    }
    if (philox && (k == 0 || (j & 3) == 0)) {
      const uint64_t g = static_cast<uint64_t>(j >> 2);
      if (f.z && !z_ext) fd::fd_philox_group_normals(smp.seed, g, p.row, fd::STREAM_MAIN, nz.nz);
      if (f.z2 && !z2_ext) fd::fd_philox_group_normals(smp.seed, g, p.row, fd::STREAM_KNOWN, nz.nz2);
    }
    if (f.z) e.z = z_ext ? St::load(in.z.v[k]) : static_cast<T>(pick(nz.nz, j & 3));
    if (f.mask) {
      e.mask = St::load(in.mk.v[k]);
      e.known = St::load(in.kn.v[k]);
      if (f.z2) e.z2 = z2_ext ? St::load(in.z2.v[k]) : static_cast<T>(pick(nz.nz2, j & 3));
    }
    // The general variant evaluates every write slot (a compile-time count: o.h stays in registers;
    // unused writes are not stored); a specialised one only the row's (at most 2, so o.h stays in
    // registers too). Reads are added for k < n_reads only, as the reference does (no 0 * h term,
    // which would turn a -0 into +0).
    StepFlags fk = f;
    if (Sp::general) fk.n_writes = fd::MAX_WRITES;
    const StepOut<T> o = fd::fd_step_element<T, T>(c, fk, e);
    out.x.v[k] = St::store(o.x);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int q = 0; q < Sp::max_writes; ++q)
      if (q < f.n_writes) out.h[q].v[k] = St::store(o.h[q]);
    if (BLEND && f.mw) out.mw.v[k] = St::store(o.m_w);
  }
}

/// Step 3: the outputs of elements [base, base + N) (they may alias the inputs: only after every
/// input of them was read). uc: where the copies of u start and which take 16-byte stores.
template <int N, class S, unsigned K>
FD_DEV void store(const StepParams& p, const StepCoef<typename Storage<S>::T>& c, const StepFlags& f, int64_t base,
                  const Layout& L, const UCopies& uc, Outputs<S>& out) {
  using St = Storage<S>;
  using Sp = Spec<K>;
  store_pack<N>(p.out, base, out.x, al(L, A_OUT));
  if (Sp::max_writes > 0 && f.n_writes > 0) store_pack<N>(p.h_write[0], base, out.h[0], al(L, A_W));
  if (Sp::max_writes > 1 && f.n_writes > 1) store_pack<N>(p.h_write[1], base, out.h[1], al(L, A_W + 1));
  if (Sp::blend && f.mw) store_pack<N>(p.m_w, base, out.mw, al(L, A_MW));  // after the history writes, as reference writes it
  if (f.u_copies) {  // the next model input from x' as stored (rounded to S), as torch's x * in_scale
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int k = 0; k < N; ++k) out.x.v[k] = St::store(St::load(out.x.v[k]) * c.u_scale);  // x is stored: reuse it
    store_pack<N>(uc.ptr[0], base, out.x, uc.vec & 1);
    if (f.u_copies == 2) store_pack<N>(uc.ptr[1], base, out.x, (uc.vec & 2) != 0);
  }
}

/// U groups of elements of N: [base + u * step, + N) for u < U, those that start before `end`
/// (the first always does). Every load of all U is issued before any math or store, so U times
/// the memory requests of one group are in flight at once; then each group is computed and
/// stored in turn (its outputs die before the next group's math). Alias-safe: every input of
/// every group is read before any output is written. smp: the thread's sample state (Sample).
template <int N, int U, class S, unsigned K>
FD_DEV void run(const StepParams& p, const StepCoef<typename Storage<S>::T>& c, const StepFlags& f, int64_t base,
                int64_t step, int64_t end, typename Storage<S>::T& nf, Sample<typename Storage<S>::T, Spec<K>::blend>& smp,
                const UCopies& uc, const Layout& L) {
  // zeroed (and Outputs below): left undefined, they cost registers (the general fp32 variant 102
  // instead of 96, and the 16-bit Philox variants with history spilled)
  Inputs<S> in[U]{};
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int u = 0; u < U; ++u)
    if (u == 0 || base + u * step < end) load<N, S, K>(p, f, base + u * step, L, in[u]);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int u = 0; u < U; ++u) {
    if (u > 0 && base + u * step >= end) break;
    Outputs<S> out{};
    compute<N, S, K>(p, c, f, base + u * step, L, in[u], smp, nf, out);
    store<N, S, K>(p, c, f, base + u * step, L, uc, out);
  }
}

/// One row with variant K (see the top of this file): c and f are the row's coefficients and flags
/// as the host worked them out (fd_unpack_coef, fd_make_flags). Thread tid takes chunks tid,
/// tid + stride, ..., U of them per iteration (UNROLL: adjacent threads still touch adjacent
/// 16-byte chunks at every access), then the scalar tail's elements likewise one at a time.
template <class S, unsigned K>
__global__ void __launch_bounds__(THREADS, Spec<K>::min_blocks(sizeof(typename Storage<S>::T) == 8))
    step_kernel(const StepParams p, const StepCoef<typename Storage<S>::T> c, const StepFlags hf, int64_t n_chunks,
                const UCopies uc, const Layout L) {
  using T = typename Storage<S>::T;
  constexpr int VEC = Pack<S>::VEC;
  constexpr int U = UNROLL<S, K>;
  const StepFlags f = spec_flags<K>(hf);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  T nf(0);  // NaN once any m / m_c / m_2 / m_3 element this thread read is NaN or +-Inf
  Sample<T, Spec<K>::blend> smp;  // across every chunk and element of this thread
  const int64_t end = n_chunks * VEC;
  for (int64_t ch = tid; ch < n_chunks; ch += U * stride) run<VEC, U, S, K>(p, c, f, ch * VEC, stride * VEC, end, nf, smp, uc, L);
  for (int64_t i = end + tid; i < p.numel; i += stride) run<1, 1, S, K>(p, c, f, i, stride, p.numel, nf, smp, uc, L);
  if (f.check && nf != nf) *p.flag = 1;  // never 0: other threads, and earlier rows, may have set it
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
/// those take 16-byte stores on the vector path.
UCopies u_copies_of(const StepParams& p, size_t elem) {
  UCopies uc{{nullptr, nullptr}, 0};
  for (int k = 0; p.u && k < p.u_copies && k < 2; ++k) {
    const int64_t stride = p.u_stride ? p.u_stride : p.numel;  // u_stride: a row run sample by sample
    uc.ptr[k] = static_cast<char*>(p.u) + static_cast<size_t>(k) * static_cast<size_t>(stride) * elem;
    if (aligned16(uc.ptr[k])) uc.vec |= 1 << k;
  }
  return uc;
}

/// The element operands in A_* bit order (null: not given, counted as aligned).
Layout layout_of(const StepParams& p) {
  const void* ptrs[] = {p.x, p.out, p.m, p.m_c, p.h_read[0], p.h_read[1], p.h_read[2], p.h_read[3],
                        p.h_write[0], p.h_write[1], p.z, p.z2, p.mask, p.known, p.m_w};
  static_assert(sizeof(ptrs) / sizeof(ptrs[0]) == A_MW + 1, "one pointer per A_* bit");
  Layout L{0u, 0, 0u, p.numel / p.per_sample};
  for (int k = 0; k <= A_MW; ++k)
    if (!ptrs[k] || aligned16(ptrs[k])) L.al |= 1u << k;
#if defined(FD_CUDA_EMU_DIV64)  // tests: the 64-bit division of numel >= 2^31 on small tensors
  constexpr int64_t DIV32_BELOW = 0;
#else
  constexpr int64_t DIV32_BELOW = int64_t(1) << 31;
#endif
  if (p.numel < DIV32_BELOW) {  // then per_sample < 2^31 too
    const uint64_t d = static_cast<uint64_t>(p.per_sample);
    int l = 0;
    while ((uint64_t(1) << l) < d) ++l;
    L.div_shift = 31 + l;
    L.div_mul = static_cast<uint32_t>(((uint64_t(1) << L.div_shift) + d - 1) / d);  // < 2^32
  }
  return L;
}

int sm_count() {
  static int sms[64] = {0};  // per device; a benign race writes the same value
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
  if (!sms[dev]) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 128;
    sms[dev] = n;
  }
  return sms[dev];
}

/// Blocks for `work` threads' worth of chunks: at most what can be resident at once (the occupancy
/// API's blocks per SM for `kernel`, `*cache` remembering it, times the SMs), or max_blocks when > 0.
template <class F>
int64_t grid_for(int64_t work, int max_blocks, F kernel, int* cache) {
  int64_t blocks = (work + THREADS - 1) / THREADS;
  int64_t cap = max_blocks;
  if (cap <= 0) {
    const int sms = sm_count();
    if (sms <= 0) {
      cap = 1024;
    } else {
      if (*cache <= 0) {
        int per_sm = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, 0) != cudaSuccess || per_sm <= 0)
          per_sm = 2;
        *cache = per_sm;  // a benign race writes the same value
      }
      cap = static_cast<int64_t>(sms) * *cache;
    }
  }
  if (blocks > cap) blocks = cap;
  return blocks < 1 ? 1 : blocks;
}

/// The variant for a row (flags f as fd_make_flags decides them; K_* bits, see the top of the file).
unsigned dispatch(const StepParams& p, const StepFlags& f) {
  if (f.blend) return K_GENERAL | K_BLEND;
  if (f.rescale || f.mask || f.g || f.n_reads > 2 || f.n_writes > 2) return K_GENERAL;
  unsigned k = 0;
  if (f.cfg) k |= K_CFG;
  if (f.n_reads > 0 || f.n_writes > 0) k |= K_HIST;
  if (f.z) k |= p.z ? K_ZEXT : K_PHILOX;
  return k;
}

constexpr int N_SPECIAL = 12;  // K_CFG x K_HIST x {none, K_PHILOX, K_ZEXT}
constexpr int N_VARIANTS = N_SPECIAL + 2;

/// Table index of variant k: the specialised ones by their bits (noise none 0, Philox 1, external 2).
int variant_index(unsigned k) {
  if (k & K_GENERAL) return k & K_BLEND ? N_SPECIAL + 1 : N_SPECIAL;
  return static_cast<int>(k & (K_CFG | K_HIST)) + 4 * ((k & K_PHILOX) ? 1 : (k & K_ZEXT) ? 2 : 0);
}

template <class S>
using KernelFn = void (*)(const StepParams, const StepCoef<typename Storage<S>::T>, const StepFlags, int64_t,
                          const UCopies, const Layout);

/// A kernel of the table and the chunks each of its threads takes per iteration (the grid's size).
template <class S>
struct Variant {
  KernelFn<S> kernel;
  int unroll;
};

template <class S, unsigned K>
constexpr Variant<S> variant() {
  return {step_kernel<S, K>, UNROLL<S, K>};
}

template <class S>
const char* launch_typed(const StepParams& p, cudaStream_t stream, int max_blocks) {
  using T = typename Storage<S>::T;
  constexpr int VEC = Pack<S>::VEC;
  // in variant_index order
  static const Variant<S> table[N_VARIANTS] = {
      variant<S, 0>(), variant<S, K_CFG>(), variant<S, K_HIST>(), variant<S, K_HIST | K_CFG>(),
      variant<S, K_PHILOX>(), variant<S, K_PHILOX | K_CFG>(), variant<S, K_PHILOX | K_HIST>(),
      variant<S, K_PHILOX | K_HIST | K_CFG>(),
      variant<S, K_ZEXT>(), variant<S, K_ZEXT | K_CFG>(), variant<S, K_ZEXT | K_HIST>(),
      variant<S, K_ZEXT | K_HIST | K_CFG>(),
      variant<S, K_GENERAL>(), variant<S, K_GENERAL | K_BLEND>()};
  static int occupancy[64][N_VARIANTS];  // blocks per SM per device and variant (0: not asked yet)
  const StepCoef<T> c = fd::fd_unpack_coef<T>(p.coef);
  const bool blend = p.a != nullptr;  // then no w and r (bind_args.h refuses them)
  const StepFlags f = fd::fd_make_flags<T>(c, p.n_reads, p.n_writes, p.clip, p.m_c != nullptr, !blend && p.r != nullptr,
                                           p.mask != nullptr, p.g != nullptr, p.u ? p.u_copies : 0,
                                           p.flag != nullptr, blend, p.m_2 != nullptr, p.m_3 != nullptr,
                                           p.m_w != nullptr);
  const Variant<S>& v = table[variant_index(dispatch(p, f))];
  const int64_t n_chunks = p.numel / VEC;
  // a thread per v.unroll chunks (or per tail element, at most VEC - 1)
  const int64_t work = (n_chunks + v.unroll - 1) / v.unroll + (p.numel - n_chunks * VEC);
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  const int64_t blocks = grid_for(work, max_blocks, v.kernel, &occupancy[dev][&v - table]);
  cudaGetLastError();  // an earlier, unrelated error must not be reported as ours
  FD_LAUNCH(v.kernel, static_cast<unsigned>(blocks), THREADS, stream)(p, c, f, n_chunks, u_copies_of(p, sizeof(S)),
                                                                      layout_of(p));
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

int u_vector(const StepParams& p, int elem_size) { return u_copies_of(p, static_cast<size_t>(elem_size)).vec; }

bool vector_path(const StepParams& p) {
  // g, m_2 and m_3 are read element by element (see load()) and each copy of u is stored by the
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
  static int occupancy[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  const int64_t blocks = grid_for(batch * groups, 0, bits_kernel, &occupancy[dev]);
  cudaGetLastError();
  FD_LAUNCH(bits_kernel, static_cast<unsigned>(blocks), THREADS, reinterpret_cast<cudaStream_t>(stream))(
      out, seeds, batch, groups, row, stream_id);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fd_cuda
