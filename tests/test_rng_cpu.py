"""The C++ Philox (csrc/philox.h and the CPU kernel's SIMD noise) against fastdiff.rng.

The uint32 words must equal rng.philox_bits bit for bit at every SIMD level; the normals must
equal rng.philox_normal to float rounding, and be bit-identical across SIMD levels and the scalar
header code that the CUDA kernel compiles.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import rng
from fastdiff.backends import cpu

if cpu._C is None:
    pytest.skip(f"fastdiff._C is not built: {cpu.available()[1]}", allow_module_level=True)
_C = cpu._C

from ._cpu_levels import available_levels, gen, level  # noqa: F401

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


def test_normals_equal_rng_to_float_rounding(level, gen):
    seeds = _seeds(gen, 4)
    row = int(torch.randint(0, 2**32, (1,), generator=gen))
    n = 50_003  # not a multiple of 4: the last group is partial
    out = torch.full((4, n), float("nan"))
    _C.philox_normals(out.data_ptr(), seeds.data_ptr(), 4, n, row, 0)
    want = rng.philox_normal(seeds, row, 0, n)
    err = (out - want).abs() / want.abs().clamp_min(1.0)
    assert float(err.max()) <= 4 * torch.finfo(torch.float32).eps, f"max scaled error {float(err.max()):.3e}"
    # the scalar header code gives the same bits as the SIMD level
    for b in (0, 3):
        for g in (0, 1, n // 4):
            got = torch.tensor(_C.philox_group_normals(int(seeds[b]) & (2**64 - 1), g, row, 0))
            k = min(4, n - 4 * g)
            assert torch.equal(got[:k], out[b, 4 * g: 4 * g + k]), (b, g)


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
