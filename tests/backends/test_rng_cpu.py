"""The C++ Philox (csrc/philox.h and the CPU kernel's SIMD noise) against fastdiff.core.rng.

The uint32 words and the normals must equal rng.philox_bits / rng.philox_normal bit for bit at every
SIMD level and in the scalar header code that the CUDA kernel compiles: on millions of counters, on
the edge words that reach the tails (every Philox output position), and, for the normal transform
itself, on every one of the 2**23 values of the uniform map.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess

import pytest
import torch

from fastdiff.core import rng
from fastdiff.backends import cpu

if cpu._C is None:
    pytest.skip(f"fastdiff._C is not built: {cpu.available()[1]}", allow_module_level=True)
_C = cpu._C

from .._cpu_levels import available_levels, gen, level  # noqa: F401

M32 = 0xFFFFFFFF




def _seeds(gen, n):
    s = torch.randint(-(2**63), 2**63 - 1, (n,), generator=gen)
    s[0] = -1  # 2**64 - 1
    s[1] = -(2**63)  # 2**63
    return s


def _bits(seeds, g0, groups, row, stream):
    out = torch.empty(seeds.numel(), groups * 4, dtype=torch.int32)
    _C.philox_bits(out.data_ptr(), seeds.data_ptr(), seeds.numel(), g0, groups, row, stream)
    return out.to(torch.int64) & M32


def test_known_answers():
    # Random123 kat_vectors, philox4x32_10: counter (g_lo, g_hi, row, stream), key (seed lo, hi)
    assert _C.philox_group_bits(0, 0, 0, 0) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert _C.philox_group_bits(2**64 - 1, 2**64 - 1, M32, M32) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    seed, g = 0x299F31D0_A4093822, 0x85A308D3_243F6A88
    assert _C.philox_group_bits(seed, g, 0x13198A2E, 0x03707344) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_bits_equal_rng(level, gen):
    seeds = _seeds(gen, 5)
    row, stream = int(torch.randint(0, 2**32, (1,), generator=gen)), 1
    got = _bits(seeds, 0, 37, row, stream)  # 37 groups: a partial SIMD batch at every level
    assert torch.equal(got, rng.philox_bits(seeds, row, stream, 37 * 4))


def test_bits_high_counter_word(level, gen):
    # groups around 2**32 use the counter's high word; checked against rng.philox4x32 directly
    seeds = _seeds(gen, 3)
    g0, groups = 2**32 - 7, 20
    got = _bits(seeds, g0, groups, 11, 0)
    g = torch.arange(g0, g0 + groups, dtype=torch.int64)[None, :]
    key = (seeds[:, None] & M32, (seeds[:, None] >> 32) & M32)
    words = rng.philox4x32((g & M32, g >> 32, torch.full_like(g, 11), torch.zeros_like(g)), key)
    assert torch.equal(got, torch.stack(words, -1).reshape(3, groups * 4))
    # the scalar header path (what the CUDA kernel runs) agrees, for a very large g too
    big = 2**63 + 12345
    for s in (int(seeds[0]) & (2**64 - 1), 2**64 - 1):
        gt = torch.tensor(big - 2**64)  # same 64 bits as an int64
        want = rng.philox4x32((gt & M32, (gt >> 32) & M32, torch.tensor(3), torch.tensor(1)),
                              (torch.tensor(s & M32), torch.tensor(s >> 32)))
        assert _C.philox_group_bits(s, big, 3, 1) == tuple(int(v) for v in want)


def test_normals_equal_rng_bit_for_bit(level, gen):
    seeds = _seeds(gen, 4)
    row = int(torch.randint(0, 2**32, (1,), generator=gen))
    n = 50_003  # not a multiple of 4: the last group is partial
    out = torch.full((4, n), float("nan"))
    _C.philox_normals(out.data_ptr(), seeds.data_ptr(), 4, n, row, 0)
    want = rng.philox_normal(seeds, row, 0, n)
    assert torch.equal(out, want), f"{int((out != want).sum())} normals differ, max {float((out - want).abs().max()):.3g}"
    # the scalar header code gives the same bits as the SIMD level
    for b in (0, 3):
        for g in (0, 1, n // 4):
            got = torch.tensor(_C.philox_group_normals(int(seeds[b]) & (2**64 - 1), g, row, 0))
            k = min(4, n - 4 * g)
            assert torch.equal(got[:k], out[b, 4 * g: 4 * g + k]), (b, g)


MILLIONS = ((0x0123456789ABCDEF, 2**32 - 1, 1, 1 << 20), (2**64 - 1, 5, 0, 1 << 18))
"""(seed, row, stream, groups): 1.3M Philox counters, 5.2M normals."""


@functools.lru_cache(maxsize=None)
def _millions(k: int):
    """Words of MILLIONS[k] from the C++ generator (bit-identical to rng.philox_bits: test_bits_equal_rng)
    and rng's normal transform of them, in chunks; computed once for every SIMD level."""
    seed, row, stream, groups = MILLIONS[k]
    seeds = torch.tensor([rng._signed64(seed)], dtype=torch.int64)
    words = _bits(seeds, 0, groups, row, stream).reshape(groups, 4)
    want = torch.empty(groups, 4)
    for i in range(0, groups, 1 << 16):
        w = words[i:i + (1 << 16)]
        want[i:i + (1 << 16), 0], want[i:i + (1 << 16), 1] = rng.box_muller(w[:, 0], w[:, 1])
        want[i:i + (1 << 16), 2], want[i:i + (1 << 16), 3] = rng.box_muller(w[:, 2], w[:, 3])
    return seeds, want.reshape(1, -1)


def test_normals_bit_identical_on_millions_of_counters(level):
    for k, (_, row, stream, groups) in enumerate(MILLIONS):
        seeds, want = _millions(k)
        out = torch.full((1, 4 * groups), float("nan"))
        _C.philox_normals(out.data_ptr(), seeds.data_ptr(), 1, 4 * groups, row, stream)
        assert torch.equal(out, want), (f"{int((out != want).sum())} of {out.numel()} normals differ, "
                                        f"max {float((out - want).abs().max()):.3g}")


_INV_M0 = pow(rng.PHILOX_M0, -1, 2**32)
_INV_M1 = pow(rng.PHILOX_M1, -1, 2**32)


def _philox_inverse(words, seed: int) -> tuple[int, int, int, int]:
    """The counter (c0, c1, c2, c3) whose Philox4x32-10 words under key ``seed`` are ``words``: each
    round is invertible (the multipliers are odd), so any output can be reached."""
    c0, c1, c2, c3 = words
    k0, k1 = seed & M32, seed >> 32
    for r in reversed(range(10)):
        kr0, kr1 = (k0 + r * rng.PHILOX_W0) & M32, (k1 + r * rng.PHILOX_W1) & M32
        p0, p2 = (c3 * _INV_M0) & M32, (c1 * _INV_M1) & M32  # lo0 = M0 * c0, lo1 = M1 * c2
        hi0, hi1 = (rng.PHILOX_M0 * p0) >> 32, (rng.PHILOX_M1 * p2) >> 32
        c0, c1, c2, c3 = p0, c0 ^ hi1 ^ kr0, p2, c2 ^ hi0 ^ kr1
    return c0, c1, c2, c3


EDGES = (0, 1, 511, 512, 2**31 - 1, 2**31, 2**32 - 513, 2**32 - 512, 2**32 - 1)
"""f(0..511) = 2**-24 (the largest radius, |z| = 5.77), f(2**32 - 512..) = 1 - 2**-24 (the smallest);
as angles, 2π * 2**-24 and 2π (1 - 2**-24), the ends of the sincos range."""


def test_edge_words_bit_identical(gen):
    """Every edge word in every output position (the others random), and every pair of edge words in
    each Box–Muller pair, through the scalar header code the CUDA kernel compiles."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 4 + 3
    cases = []
    for p in range(4):
        for e in EDGES:
            w = [int(v) for v in torch.randint(0, 2**32, (4,), generator=gen)]
            w[p] = e
            cases.append(w)
    cases += [[a, b, b, a] for a in EDGES for b in EDGES]
    got, words = [], []
    for w in cases:
        c0, c1, c2, c3 = _philox_inverse(w, seed)
        g = c0 | (c1 << 32)
        assert _C.philox_group_bits(seed, g, c2, c3) == tuple(w)
        got.append(_C.philox_group_normals(seed, g, c2, c3))
        words.append(w)
    got = torch.tensor(got, dtype=torch.float32)
    u = torch.tensor(words, dtype=torch.int64)
    n0, n1 = rng.box_muller(u[:, 0], u[:, 1])
    n2, n3 = rng.box_muller(u[:, 2], u[:, 3])
    want = torch.stack((n0, n1, n2, n3), dim=-1)
    assert torch.equal(got, want), f"{int((got != want).sum())} differ: {got[got != want][:4]} vs {want[got != want][:4]}"
    assert float(got.abs().max()) > 5.76  # the tails are reached


_HARNESS = r"""
#include "philox.h"
// r(u) = sqrt(-2 ln f(u)) and (sin, cos)(f(u) float(2 pi)) for u = i << 9, i < n: every uniform value
extern "C" void fd_transform_all(float* r, float* s, float* c, long n) {
  for (long i = 0; i < n; ++i) {
    float f = fd::fd_uniform01<float, uint32_t>(static_cast<uint32_t>(i) << 9);
    r[i] = fd::fd_sqrt(-2.0f * fd::fd_log(f));
    fd::fd_sincos(f * fd::TWO_PI_F, s[i], c[i]);
  }
}
"""


def test_transform_bit_identical_on_every_uniform_value(tmp_path):
    """The radius and the angle's sin/cos of csrc/philox.h (host compiler, no FMA contraction, as
    setup.py builds the kernels) against rng's torch code for all 2**23 values of f(u): since each
    normal is one product r * cos or r * sin of these, every pair of words gives the same normals."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    (tmp_path / "h.cpp").write_text(_HARNESS)
    so = tmp_path / "libfdh.so"
    res = subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", f"-I{csrc}",
                          str(tmp_path / "h.cpp"), "-o", str(so)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lib = ctypes.CDLL(str(so))
    n = 1 << 23
    r, s, c = torch.empty(n), torch.empty(n), torch.empty(n)
    lib.fd_transform_all(*(ctypes.c_void_p(t.data_ptr()) for t in (r, s, c)), ctypes.c_long(n))
    for i in range(0, n, 1 << 18):
        f = rng.uniform01(torch.arange(i, i + (1 << 18), dtype=torch.int64) << 9)
        sl = slice(i, i + (1 << 18))
        assert torch.equal(rng.sqrt_rn(rng.log_f32(f) * -2.0), r[sl]), f"radius differs in [{i}, {i + (1 << 18)})"
        ts, tc = rng.sincos_f32(f * rng._TWO_PI_F)
        assert torch.equal(ts, s[sl]) and torch.equal(tc, c[sl]), f"sin/cos differ in [{i}, {i + (1 << 18)})"


def test_normals_bit_identical_across_levels_and_layouts(gen):
    seeds = _seeds(gen, 9)
    levels = available_levels(_C)
    old = _C.simd_level()
    try:
        runs = []
        for lv in levels:
            _C.set_simd_level(lv)
            for per_sample in (3, 130):  # samples shorter than a group batch, and longer
                out = torch.empty(9, per_sample)
                _C.philox_normals(out.data_ptr(), seeds.data_ptr(), 9, per_sample, 7, 1)
                runs.append((lv, per_sample, out))
    finally:
        _C.set_simd_level(old)
    for lv, ps, out in runs:
        ref = next(o for l2, p2, o in runs if p2 == ps)
        assert torch.equal(out, ref), f"{lv} differs at per_sample={ps}"
    # a sample's noise does not depend on the others: per_sample 3 is a prefix of per_sample 130
    short = next(o for _, p, o in runs if p == 3)
    long = next(o for _, p, o in runs if p == 130)
    assert torch.equal(short, long[:, :3])
