// The CPU step kernel, generic over a SIMD level L (cpu_vec_*.h) and a storage dtype.
//
// Included inside an anonymous namespace by each cpu_step_<level>.cpp after the level's header,
// so every level's copy of the inline code has internal linkage and its own target flags.
//
// Work is split into chunks of CHUNK elements of the flat tensor, distributed by OpenMP, and each
// chunk into blocks of BLK elements, except that a chunk inside one sample whose row draws no noise
// is one block (it needs no per-element buffer: see block). Per block:
//   1. per-sample scalars (w, r, s) are expanded into small per-element buffers,
//   2. Philox noise for the block's elements is generated into a buffer (W groups per call, in
//      element order; no noise tensor in memory),
//   3. one pass over the block: every input of a vector is loaded before any output is stored,
//      so out == x and a history slot both read and written are safe.
// Each element's arithmetic depends only on its own inputs, sample and index, never on which
// thread or which vector (full or tail) handled it: results are bit-identical for any number of
// threads, and identical across SIMD levels.
#pragma once

#include "philox.h"
#include "step_math.h"

namespace fd {

// cpu_step.h is included by the TU before its anonymous namespace: StepArgs is the shared type.
using StepArgs_t = ::fd_cpu::StepArgs;

constexpr int BLK = 512;              // elements per block: buffers stay in L1
// Elements per chunk. Each block costs a call, two divisions and the loop's set-up (about a tenth of
// the vector loop's time at BLK elements when the loop is compute-bound, as fp16 and bf16 rows are),
// so the blocks that need no buffer of BLK elements are made this long instead.
constexpr int CHUNK = 8 * BLK;
constexpr int64_t PAR_MIN = 1 << 15;  // below this, one thread: fork/join costs about what it saves

template <class L, int DT>
struct Io;

template <class L>
struct Io<L, DTYPE_F32> {
  using S = float;
  using T = float;
  using V = typename L::VF;
  static constexpr int W = L::W;
  static V load(const S* p) { return L::load_f32(p); }
  static void store(S* p, V v) { L::store_f32(p, v); }
  static V load_t(const T* p) { return L::load_f32(p); }
  static void store_t(T* p, V v) { L::store_f32(p, v); }
  static V load_noise(const float* p) { return L::load_f32(p); }
  static int slot(int t) { return t; }
};

template <class L>
struct Io<L, DTYPE_F16> {
  using S = uint16_t;
  using T = float;
  using V = typename L::VF;
  static constexpr int W = L::W;
  static V load(const S* p) { return L::load_f16(p); }
  static void store(S* p, V v) { L::store_f16(p, v); }
  static V load_t(const T* p) { return L::load_f32(p); }
  static void store_t(T* p, V v) { L::store_f32(p, v); }
  static V load_noise(const float* p) { return L::load_f32(p); }
  static int slot(int t) { return t; }
};

// bf16 runs on the level's packets (L::VB: 2W elements on the SIMD levels, even and odd elements in
// separate registers): the per-sample buffers the kernel fills are in packet order (slot), the noise
// buffers, in element order, are split on load.
template <class L>
struct Io<L, DTYPE_BF16> {
  using S = uint16_t;
  using T = float;
  using V = typename L::VB;
  static constexpr int W = L::WB;
  static V load(const S* p) { return L::load_bf16(p); }
  static void store(S* p, V v) { L::store_bf16(p, v); }
  static V load_t(const T* p) { return L::load_f32_packed(p); }
  static void store_t(T* p, V v) { L::store_f32_packed(p, v); }
  static V load_noise(const float* p) { return L::load_f32_split(p); }
  static int slot(int t) { return L::bf16_slot(t); }
};

template <class L>
struct Io<L, DTYPE_F64> {
  using S = double;
  using T = double;
  using V = typename L::VD;
  static constexpr int W = L::WD;
  static V load(const S* p) { return L::load_f64(p); }
  static void store(S* p, V v) { L::store_f64(p, v); }
  static V load_t(const T* p) { return L::load_f64(p); }
  static void store_t(T* p, V v) { L::store_f64(p, v); }
  static V load_noise(const float* p) { return L::load_f32_as_f64(p); }
  static int slot(int t) { return t; }
};

/// Philox noise for a run of consecutive flat elements.
///
/// Runs of at least NG1 groups of one sample (the usual case: a block inside one sample) take the
/// level's noise_groups: NG (then NG1) consecutive groups per call with the key and the
/// group-independent counter words folded into scalars, written straight into the buffer. A run's
/// last call is moved back to end at the run's last group (it rewrites some groups with the same
/// values). Shorter runs (small samples, a sample boundary just inside a block) go through the
/// general path: W groups of any samples per Philox call, with per-lane keys.
template <class L>
struct NoiseGen {
  using VF = typename L::VF;
  using VU = typename L::VU;
  static constexpr int W = L::W;
  static constexpr int NG = L::NG;    // groups per call of the fast path
  static constexpr int NG1 = L::NG1;  // its smaller call, for short runs and run ends

  /// One sample's Philox key schedule (round r adds r * (W0, W1)) and the counter words that do
  /// not depend on the group: what the levels' noise_groups folds into scalars.
  struct Key {
    uint64_t seed;
    uint32_t k0[10], k1[10];
    uint32_t row, stream;
    uint32_t h1r, l1r;  // row * M1: high and low halves (round 0)
    Key(uint64_t s, uint32_t r, uint32_t st) : seed(s), row(r), stream(st) {
      uint32_t a = static_cast<uint32_t>(s), b = static_cast<uint32_t>(s >> 32);
      for (int q = 0; q < 10; ++q) {
        k0[q] = a;
        k1[q] = b;
        a += PHILOX_W0;
        b += PHILOX_W1;
      }
      fd_mulhilo(PHILOX_M1, r, h1r, l1r);
    }
  };

  /// Normals of flat elements [i0, i0 + n) into zb[0..n). zb must be writable on [-3, n + 3):
  /// whole groups are written, and a later group overwrites the spill of an earlier one.
  static void fill(float* zb, const int64_t* seeds, int64_t i0, int n, int64_t per_sample, uint32_t row,
                   uint32_t stream) {
    alignas(64) uint32_t klo[W], khi[W], glo[W], ghi[W];
    int64_t dst[W];
    int cnt = 0;
    int64_t b = i0 / per_sample, j = i0 - b * per_sample;
    int64_t t = 0;
    while (t < n) {
      int64_t len = per_sample - j < n - t ? per_sample - j : n - t;
      uint64_t seed = static_cast<uint64_t>(seeds[b]);
      int64_t g_beg = j / 4, g_end = (j + len - 1) / 4 + 1;
      int64_t g = g_beg;
      // the fast path: one seed, consecutive groups, no wrap of the low counter word inside the run
      if (g_end - g_beg >= NG1 && (static_cast<uint64_t>(g_beg) >> 32) == (static_cast<uint64_t>(g_end - 1) >> 32)) {
        if (cnt) {  // pending groups first: their spill must not overwrite what follows
          pad(klo, khi, glo, ghi, cnt);
          flush(zb, klo, khi, glo, ghi, dst, cnt, row, stream);
          cnt = 0;
        }
        const Key key(seed, row, stream);
        float* const base = zb + (t - j);  // group q of the sample at base + 4q
        for (; g + NG <= g_end; g += NG) L::template noise_groups<NG>(base + 4 * g, key, static_cast<uint64_t>(g));
        for (; g < g_end; g += NG1) {  // the last call ends at the run's last group (rewriting some)
          const int64_t q = g + NG1 <= g_end ? g : g_end - NG1;
          L::template noise_groups<NG1>(base + 4 * q, key, static_cast<uint64_t>(q));
        }
      }
      for (; g < g_end; ++g) {
        klo[cnt] = static_cast<uint32_t>(seed);
        khi[cnt] = static_cast<uint32_t>(seed >> 32);
        glo[cnt] = static_cast<uint32_t>(static_cast<uint64_t>(g));
        ghi[cnt] = static_cast<uint32_t>(static_cast<uint64_t>(g) >> 32);
        dst[cnt] = t + 4 * g - j;
        if (++cnt == W) {
          flush(zb, klo, khi, glo, ghi, dst, cnt, row, stream);
          cnt = 0;
        }
      }
      t += len;
      ++b;
      j = 0;
    }
    if (cnt) {
      pad(klo, khi, glo, ghi, cnt);
      flush(zb, klo, khi, glo, ghi, dst, cnt, row, stream);
    }
  }

  static void pad(uint32_t* klo, uint32_t* khi, uint32_t* glo, uint32_t* ghi, int cnt) {
    for (int l = cnt; l < W; ++l) klo[l] = khi[l] = glo[l] = ghi[l] = 0;
  }

  /// The four words of W groups.
  static void words(const uint32_t* klo, const uint32_t* khi, const uint32_t* glo, const uint32_t* ghi, uint32_t row,
                    uint32_t stream, VU& c0, VU& c1, VU& c2, VU& c3) {
    c0 = L::load_u32(glo);
    c1 = L::load_u32(ghi);
    c2 = VU(row);
    c3 = VU(stream);
    fd_philox4x32_10<VU>(c0, c1, c2, c3, L::load_u32(klo), L::load_u32(khi));
  }

  /// The general path (out of line: the cold path of fill).
  __attribute__((noinline)) static void flush(float* zb, const uint32_t* klo, const uint32_t* khi, const uint32_t* glo,
                                              const uint32_t* ghi, const int64_t* dst, int cnt, uint32_t row,
                                              uint32_t stream) {
    alignas(64) float tmp[4 * W];
    L::noise_lanes(tmp, klo, khi, glo, ghi, row, stream);
    if (dst[cnt - 1] == dst[0] + 4 * (cnt - 1)) {  // consecutive groups: one copy
      memcpy(zb + dst[0], tmp, sizeof(float) * 4 * cnt);
    } else {  // sample boundaries inside: in order, so a later group overwrites a spill
      for (int l = 0; l < cnt; ++l) memcpy(zb + dst[l], tmp + 4 * l, sizeof(float) * 4);
    }
  }
};

template <class L, int DT>
struct StepKernel {
  using IO = Io<L, DT>;
  using S = typename IO::S;
  using T = typename IO::T;
  using V = typename IO::V;
  static constexpr int W = IO::W;

  struct Ptrs {
    const S *x, *m, *mc, *z, *z2, *mask, *known, *g;
    const S* h[MAX_READS];
    S* out;
    S* hw[MAX_WRITES];
    S* u;           // the next model input (f.u_copies copies, u_off elements apart)
    int64_t u_off;
    const S *m2, *m3;  // blend branches
    S* mw;             // blend momentum write
  };
  struct Bufs {  // per-block buffers, indexed by position in the block
    const T *w, *r, *s;
    const T* a;  // blend coefficients: 2 * BLEND_ROWS rows of BLK
    const float *z, *z2;
    int pm;  // index mask of w, r, s: 0 when the block lies in one sample (W copies), else -1
    int32_t* flag;
  };

  /// One vector: elements [o, o + W) of the tensors, [lo, lo + W) of the block buffers.
  __attribute__((always_inline)) static inline void vec(const StepCoef<T>& c, const StepFlags& f, const Ptrs& p,
                                                        int64_t o, const Bufs& bf, int lo, V& nf) {
    // Not value-initialised (zeroing the whole struct per vector costs more than the step);
    // members a row does not use are set to 0 so no uninitialised value is ever read.
    StepIn<V> in;
    const V zero(0);
    in.x = IO::load(p.x + o);
    in.m = IO::load(p.m + o);
    in.m_c = f.cfg ? IO::load(p.mc + o) : zero;
    in.g = f.g ? IO::load(p.g + o) : zero;
    const int lp = lo & bf.pm;
    in.w = f.cfg && !f.blend ? IO::load_t(bf.w + lp) : zero;
    in.r = f.rescale ? IO::load_t(bf.r + lp) : zero;
    in.s = f.clip ? IO::load_t(bf.s + lp) : zero;
    for (int k = 0; k < MAX_READS; ++k) in.h[k] = k < f.n_reads ? IO::load(p.h[k] + o) : zero;
    in.z = !f.z ? zero : p.z ? IO::load(p.z + o) : IO::load_noise(bf.z + lo);
    in.mask = f.mask ? IO::load(p.mask + o) : zero;
    in.known = f.mask ? IO::load(p.known + o) : zero;
    in.z2 = !f.z2 ? zero : p.z2 ? IO::load(p.z2 + o) : IO::load_noise(bf.z2 + lo);
    in.m_2 = f.m2 ? IO::load(p.m2 + o) : zero;
    in.m_3 = f.m3 ? IO::load(p.m3 + o) : zero;
    for (int k = 0; k < 2 * BLEND_ROWS; ++k)
      in.a[k] = f.blend && (k < BLEND_ROWS || f.mw) ? IO::load_t(bf.a + k * BLK + lp) : zero;
    if (f.check) {
      nf = nf + fd_nonfinite(in.m);
      if (f.cfg) nf = nf + fd_nonfinite(in.m_c);
      if (f.m2) nf = nf + fd_nonfinite(in.m_2);
      if (f.m3) nf = nf + fd_nonfinite(in.m_3);
    }
    StepOut<V> r = fd_step_element<V, T>(c, f, in);  // all loads done: outputs may alias inputs
    IO::store(p.out + o, r.x);
    if (f.u_copies) {  // the next model input from x' as stored (rounded to S), as torch's x * in_scale,
      const V u = IO::load(p.out + o) * V(c.u_scale);  // read before any history write aliasing out
      IO::store(p.u + o, u);
      if (f.u_copies == 2) IO::store(p.u + p.u_off + o, u);
    }
    for (int j = 0; j < f.n_writes; ++j) IO::store(p.hw[j] + o, r.h[j]);
    if (f.mw) IO::store(p.mw + o, r.m_w);
  }

  /// Whether a lane of the accumulator of fd_nonfinite terms is NaN.
  static bool any_nan(V v) {
    alignas(64) T buf[W];
    IO::store_t(buf, v);
    bool bad = false;
    for (int q = 0; q < W; ++q) bad = bad || buf[q] != buf[q];
    return bad;
  }

  /// Specialisations of the vector loop: any row; the common deterministic row (no rescale,
  /// clip, mask, noise or gradient term; guidance may be on) without or with e in a combination;
  /// that row with a clip (DDIM/DDPM with clip_sample or thresholding); that row with noise
  /// (ancestral and SDE samplers). The flags a mode rules out are constants in its code.
  enum Mode { GENERAL = 0, PLAIN = 1, PLAIN_E = 2, CLIP = 3, NOISE = 4, N_MODES = 5 };

  /// The vector loop of a block, with the read/write counts as constants so that the operands
  /// stay in registers (fully unrolled combinations).
  template <int NR, int NW, int MODE>
  static void loop(const StepCoef<T>& cc, StepFlags f, const Ptrs& pp, int64_t i0, int n, const Bufs& bb) {
    f.n_reads = NR;
    f.n_writes = NW;
    if (MODE != GENERAL) {
      f.rescale = f.mask = f.z2 = f.g = f.blend = f.m2 = f.m3 = f.mw = false;
      if (MODE != CLIP) f.clip = CLIP_NONE;
      if (MODE != NOISE) f.z = false;
      if (MODE == PLAIN || MODE == PLAIN_E) f.e = MODE == PLAIN_E;  // PLAIN: no e term in the code at all
    }
    // local copies: stores through S* cannot alias them, so pointers and coefficients stay in registers
    // (the block buffers' too: through the reference, the per-sample buffer's pointer and index mask
    // were loaded again for every vector)
    const Ptrs p = pp;
    const StepCoef<T> c = cc;
    const Bufs bf = bb;
    V nf(0);
    int i = 0;
    for (; i + W <= n; i += W) vec(c, f, p, i0 + i, bf, i, nf);
    if (i < n) tail(c, f, p, i0 + i, n - i, bf, i, nf);
    if (f.check && any_nan(nf)) __atomic_store_n(bf.flag, 1, __ATOMIC_RELAXED);
  }

  using LoopFn = void (*)(const StepCoef<T>&, StepFlags, const Ptrs&, int64_t, int, const Bufs&);

  static LoopFn pick_loop(const StepFlags& f) {
#define FD_LOOPS(M)                                                              \
  {{loop<0, 0, M>, loop<0, 1, M>, loop<0, 2, M>},                                \
   {loop<1, 0, M>, loop<1, 1, M>, loop<1, 2, M>},                                \
   {loop<2, 0, M>, loop<2, 1, M>, loop<2, 2, M>},                                \
   {loop<3, 0, M>, loop<3, 1, M>, loop<3, 2, M>},                                \
   {loop<4, 0, M>, loop<4, 1, M>, loop<4, 2, M>}}
    static const LoopFn table[N_MODES][MAX_READS + 1][MAX_WRITES + 1] = {
        FD_LOOPS(GENERAL), FD_LOOPS(PLAIN), FD_LOOPS(PLAIN_E), FD_LOOPS(CLIP), FD_LOOPS(NOISE)};
#undef FD_LOOPS
    const bool simple = !f.rescale && !f.mask && !f.z2 && !f.g && !f.blend;
    const int mode = !simple               ? GENERAL
                     : !f.clip && !f.z     ? (f.e ? PLAIN_E : PLAIN)
                     : f.clip && !f.z      ? CLIP
                     : !f.clip             ? NOISE
                                           : GENERAL;
    return table[mode][f.n_reads][f.n_writes];
  }

  /// The last n < W elements, through zero-padded copies so the arithmetic is the full-vector one.
  static void tail(const StepCoef<T>& c, const StepFlags& f, const Ptrs& p, int64_t o, int n, const Bufs& bf, int lo,
                   V& nf) {
    constexpr int NIN = 10;  // element inputs besides the history reads
    S buf[NIN + 3 + MAX_WRITES + MAX_READS][W];
    memset(buf, 0, sizeof buf);
    const S* src[NIN] = {p.x, p.m, p.mc, p.z, p.z2, p.mask, p.known, p.g, p.m2, p.m3};
    const S* loc[NIN];
    for (int q = 0; q < NIN; ++q) {
      loc[q] = src[q] ? buf[q] : nullptr;
      if (src[q]) memcpy(buf[q], src[q] + o, sizeof(S) * n);
    }
    S (*const hw)[W] = buf + NIN + 1;               // MAX_WRITES rows
    S (*const hr)[W] = buf + NIN + 1 + MAX_WRITES;  // MAX_READS rows
    static_assert(MAX_WRITES == 2, "Ptrs below lists the write rows");
    S* const ub = buf[NIN + 1 + MAX_WRITES + MAX_READS];
    S* const mwb = buf[NIN + 2 + MAX_WRITES + MAX_READS];
    Ptrs lp{loc[0], loc[1], loc[2], loc[3], loc[4], loc[5], loc[6], loc[7], {}, buf[NIN], {hw[0], hw[1]}, ub, 0,
            loc[8], loc[9], mwb};
    for (int k = 0; k < f.n_reads; ++k) {
      memcpy(hr[k], p.h[k] + o, sizeof(S) * n);
      lp.h[k] = hr[k];
    }
    vec(c, f, lp, 0, bf, lo, nf);  // the zero padding is finite: it never sets the flag
    memcpy(p.out + o, buf[NIN], sizeof(S) * n);
    for (int j = 0; j < f.n_writes; ++j) memcpy(p.hw[j] + o, hw[j], sizeof(S) * n);
    for (int k = 0; k < f.u_copies; ++k) memcpy(p.u + k * p.u_off + o, ub, sizeof(S) * n);
    if (f.mw) memcpy(p.mw + o, mwb, sizeof(S) * n);
  }

  /// The per-sample values src[b] of elements [i0, i0 + n) into dstbuf, in the order load_t reads
  /// (IO::slot: element order, or bf16's packet order).
  static void fill_param(T* dstbuf, const float* src, int64_t i0, int n, int64_t per_sample) {
    int64_t b = i0 / per_sample, j = i0 - b * per_sample;
    int t = 0;
    while (t < n) {
      int64_t len = per_sample - j < n - t ? per_sample - j : n - t;
      T v = static_cast<T>(src[b]);
      for (int q = 0; q < static_cast<int>(len); ++q) dstbuf[IO::slot(t + q)] = v;
      t += static_cast<int>(len);
      ++b;
      j = 0;
    }
  }

  /// Elements [i0, i0 + n) (n <= BLK, or any n when they lie in one sample and the row draws no
  /// noise here: then only W copies of the per-sample scalars are read).
  static void block(const StepArgs_t& a, const StepCoef<T>& c, const StepFlags& f, const Ptrs& p, LoopFn loop_fn,
                    int64_t i0, int n) {
    alignas(64) T wb[BLK], rb[BLK], sb[BLK];
    alignas(64) T ab[2 * BLEND_ROWS * BLK];  // blend coefficients (left unset without blend: never read)
    alignas(64) float zbuf[BLK + 8], z2buf[BLK + 8];  // noise at [4, 4 + n), spill room both sides
    // One sample's block (the usual case): W copies of each scalar, read at index lo & 0.
    const int64_t b0 = i0 / a.per_sample;
    const bool one = b0 == (i0 + n - 1) / a.per_sample;
    Bufs bf{wb, rb, sb, ab, zbuf + 4, z2buf + 4, one ? 0 : -1, a.flag};
    const int n_a = f.mw ? 2 * BLEND_ROWS : BLEND_ROWS;
    const int64_t b_stride = a.numel / a.per_sample;  // the batch: row k of a starts at a.a + k * B
    if (one) {
      for (int q = 0; q < W; ++q) {
        if (f.cfg && !f.blend) wb[q] = static_cast<T>(a.w[b0]);
        if (f.rescale) rb[q] = static_cast<T>(a.r[b0]);
        if (f.clip) sb[q] = static_cast<T>(a.s[b0]);
        if (f.blend)
          for (int k = 0; k < n_a; ++k) ab[k * BLK + q] = static_cast<T>(a.a[k * b_stride + b0]);
      }
    } else {
      if (f.cfg && !f.blend) fill_param(wb, a.w, i0, n, a.per_sample);
      if (f.rescale) fill_param(rb, a.r, i0, n, a.per_sample);
      if (f.clip) fill_param(sb, a.s, i0, n, a.per_sample);
      if (f.blend)
        for (int k = 0; k < n_a; ++k) fill_param(ab + k * BLK, a.a + k * b_stride, i0, n, a.per_sample);
    }
    if (f.z && !p.z) NoiseGen<L>::fill(zbuf + 4, a.seeds, i0, n, a.per_sample, a.row, STREAM_MAIN);
    if (f.z2 && !p.z2) NoiseGen<L>::fill(z2buf + 4, a.seeds, i0, n, a.per_sample, a.row, STREAM_KNOWN);
    loop_fn(c, f, p, i0, n, bf);
  }

  /// Elements [i0, i0 + n), n <= CHUNK: one block when they lie in one sample and the row draws no
  /// noise in the kernel, else blocks of BLK.
  static void chunk(const StepArgs_t& a, const StepCoef<T>& c, const StepFlags& f, const Ptrs& p, LoopFn loop_fn,
                    int64_t i0, int n) {
    const bool noise = (f.z && !p.z) || (f.z2 && !p.z2);
    if (!noise && i0 / a.per_sample == (i0 + n - 1) / a.per_sample) return block(a, c, f, p, loop_fn, i0, n);
    for (int q = 0; q < n; q += BLK) block(a, c, f, p, loop_fn, i0 + q, n - q < BLK ? n - q : BLK);
  }

  static void run(const StepArgs_t& a) {
    const StepCoef<T> c = fd_unpack_coef<T>(a.coef);
    const StepFlags f = fd_make_flags(c, a.n_reads, a.n_writes, a.clip, a.m_c != nullptr, a.r != nullptr,
                                      a.mask != nullptr, a.g != nullptr, a.u ? a.u_copies : 0, a.flag != nullptr,
                                      a.a != nullptr, a.m_2 != nullptr, a.m_3 != nullptr, a.m_w != nullptr);
    Ptrs p{};
    p.x = static_cast<const S*>(a.x);
    p.m = static_cast<const S*>(a.m);
    p.mc = static_cast<const S*>(a.m_c);
    p.z = static_cast<const S*>(a.z);
    p.z2 = static_cast<const S*>(a.z2);
    p.mask = static_cast<const S*>(a.mask);
    p.known = static_cast<const S*>(a.known);
    p.g = static_cast<const S*>(a.g);
    for (int k = 0; k < a.n_reads; ++k) p.h[k] = static_cast<const S*>(a.h_read[k]);
    p.out = static_cast<S*>(a.out);
    for (int j = 0; j < a.n_writes; ++j) p.hw[j] = static_cast<S*>(a.h_write[j]);
    p.u = static_cast<S*>(a.u);
    p.u_off = a.u_stride ? a.u_stride : a.numel;
    p.m2 = static_cast<const S*>(a.m_2);
    p.m3 = static_cast<const S*>(a.m_3);
    p.mw = static_cast<S*>(a.m_w);
    const LoopFn loop_fn = pick_loop(f);
    const int64_t nchunk = (a.numel + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) num_threads(a.num_threads) if (a.numel >= PAR_MIN && a.num_threads > 1)
    for (int64_t k = 0; k < nchunk; ++k) {
      int64_t i0 = k * CHUNK;
      int n = static_cast<int>(a.numel - i0 < CHUNK ? a.numel - i0 : CHUNK);
      chunk(a, c, f, p, loop_fn, i0, n);
    }
  }
};

/// Dispatch on the storage dtype.
template <class L>
void run_step(const StepArgs_t& a) {
  switch (a.dtype) {
    case DTYPE_F32: StepKernel<L, DTYPE_F32>::run(a); break;
    case DTYPE_F64: StepKernel<L, DTYPE_F64>::run(a); break;
    case DTYPE_F16: StepKernel<L, DTYPE_F16>::run(a); break;
    case DTYPE_BF16: StepKernel<L, DTYPE_BF16>::run(a); break;
    default: break;  // bindings.cpp rejects other codes
  }
}

/// Philox normals for [batch, per_sample] through the kernel's own noise path.
template <class L>
void run_normals(float* out, const int64_t* seeds, int64_t batch, int64_t per_sample, uint32_t row, uint32_t stream,
                 int num_threads) {
  const int64_t numel = batch * per_sample, nblk = (numel + BLK - 1) / BLK;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (numel >= PAR_MIN && num_threads > 1)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    alignas(64) float zbuf[BLK + 8];
    int64_t i0 = blk * BLK;
    int n = static_cast<int>(numel - i0 < BLK ? numel - i0 : BLK);
    NoiseGen<L>::fill(zbuf + 4, seeds, i0, n, per_sample, row, stream);
    memcpy(out + i0, zbuf + 4, sizeof(float) * n);
  }
}

/// Raw Philox words of groups [g0, g0 + groups) per sample, W groups per call.
template <class L>
void run_bits(uint32_t* out, const int64_t* seeds, int64_t batch, uint64_t g0, int64_t groups, uint32_t row,
              uint32_t stream) {
  constexpr int W = L::W;
  using VU = typename L::VU;
  alignas(64) uint32_t klo[W], khi[W], glo[W], ghi[W], w[4][W];
  for (int64_t b = 0; b < batch; ++b) {
    uint64_t seed = static_cast<uint64_t>(seeds[b]);
    for (int64_t q0 = 0; q0 < groups; q0 += W) {
      for (int l = 0; l < W; ++l) {
        uint64_t g = g0 + static_cast<uint64_t>(q0 + l);
        klo[l] = static_cast<uint32_t>(seed);
        khi[l] = static_cast<uint32_t>(seed >> 32);
        glo[l] = static_cast<uint32_t>(g);
        ghi[l] = static_cast<uint32_t>(g >> 32);
      }
      VU c0, c1, c2, c3;
      NoiseGen<L>::words(klo, khi, glo, ghi, row, stream, c0, c1, c2, c3);
      L::store_u32(w[0], c0);
      L::store_u32(w[1], c1);
      L::store_u32(w[2], c2);
      L::store_u32(w[3], c3);
      for (int l = 0; l < W && q0 + l < groups; ++l)
        for (int k = 0; k < 4; ++k) out[(b * groups + q0 + l) * 4 + k] = w[k][l];
    }
  }
}

}  // namespace fd
