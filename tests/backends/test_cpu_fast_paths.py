"""The CPU kernel's SIMD levels give the scalar level's bits, on inputs chosen to break fast paths.

The avx512bf16 level (chosen at run time where the CPU has AVX512_BF16, DQ and BW) stores bf16
through vcvtne2ps2bf16, which flushes subnormal inputs and keeps NaN payloads: packets holding
either must take the integer rounding. The rows include history writes that copy d (c_d = 1, the
other terms 0, as the multistep samplers' denoised estimate), where the contract's zero terms
0 * x, 0 * h still decide the sign of a zero and turn an inf into NaN: a kernel that skipped them
would differ here. Every level must equal the scalar level bit for bit (NaN payloads aside where
two differ: see _same), at 1 and 2 threads, on fresh random inputs seeded with inf, NaN (with
payloads), -0, zeros that make d = +-0, the dtype's subnormals and values whose results round to
them, in lengths with tails.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff.backends import cpu
from fastdiff.core.args import StepArgs, pack_row
from fastdiff.core.plan import Row, Write, combo

if cpu._C is None:
    pytest.skip(f"fastdiff._C is not built: {cpu.available()[1]}", allow_module_level=True)
_C = cpu._C

from .._cpu_levels import available_levels, gen  # noqa: F401,E402

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# rows whose history writes copy d (the zero terms 0 * x, 0 * h matter on -0, inf and NaN), with
# -0 zero terms, with e in out, with two reads and two writes, and rows that only nearly copy d
ROWS = {
    "dpmpp2m": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.25, a_e=-0.6, out=combo(x=0.6, d=0.45, h=(-0.05,)),
                   reads=(0,), writes=(Write(1, combo(d=1.0)),)),
    "two_reads_two_writes": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.9, a_e=0.3,
                                out=combo(x=0.5, d=0.25, h=(0.125, -0.375)), reads=(0, 1),
                                writes=(Write(2, combo(d=1.0)), Write(0, combo(d=1.0)))),
    "e_in_out": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=-1.5, out=combo(x=0.7, d=0.2, e=0.1, h=(0.3,)),
                    reads=(0,), writes=(Write(1, combo(d=1.0)),)),
    "negative_zero_terms": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=2.0, a_e=1.0, out=combo(x=-0.5, d=3.0, h=(1.0,)),
                               reads=(0,), writes=(Write(1, combo(x=-0.0, d=1.0, h=(-0.0,))),)),
    "no_reads": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=-0.75, a_e=0.5, out=combo(x=1.0, d=-2.0), reads=(),
                    writes=(Write(0, combo(d=1.0)),)),
    "out_lacks_h": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=1.0, out=combo(x=0.5, d=0.5, h=(0.0,)),
                       reads=(0,), writes=(Write(1, combo(d=1.0)),)),
    "write_has_x": Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=1.0, out=combo(x=0.5, d=0.5, h=(0.5,)),
                       reads=(0,), writes=(Write(1, combo(x=0.5, d=1.0)),)),
}


def _specials(dtype: torch.dtype) -> torch.Tensor:
    """inf, NaN (quiet and signalling payloads, both signs), +-0, the dtype's subnormals and values
    next to them, huge values, as ``dtype``."""
    vals = [float("inf"), -float("inf"), 0.0, -0.0, 1e30, -3e38, 65504.0, -65519.0, 6e-8, -3e-8, 1e-5, 5.9e-5,
            1e-38, -1e-39, 1.2e-38, 1e-40, -9.2e-41, 1e-45]
    out = torch.tensor(vals, dtype=torch.float64).to(dtype)
    bits = {torch.float16: [0x7E00, 0xFE01, 0x7C01, 0x7D55, 0x0001, 0x83FF, 0x0400],
            torch.bfloat16: [0x7FC0, 0xFFC1, 0x7F81, 0x7FAA, 0x0001, 0x807F, 0x0080],
            torch.float32: [0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FA5A5A5, 0x00000001, 0x807FFFFF],
            torch.float64: [0x7FF8000000000000, 0xFFF8000000000001, 0x7FF0000000000001, 0x0000000000000001]}[dtype]
    nb = 8 * torch.empty((), dtype=dtype).element_size()
    raw = torch.tensor([b - (1 << nb) if b >= 1 << (nb - 1) else b for b in bits], dtype=_INT[nb // 8]).view(dtype)
    return torch.cat([out, raw])


def _field(n: int, dtype: torch.dtype, gen: torch.Generator, zero_runs: list[slice]) -> torch.Tensor:
    """Normal values at mixed scales, ~6% specials at random places, and zeros over zero_runs."""
    t = torch.randn(n, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1.0, 1e-3, 1e3, 1e-37 if dtype != torch.float16 else 1e-6], dtype=torch.float64)
    t = t * scale[torch.randint(0, 4, (n,), generator=gen)]
    t = t.to(dtype)
    sp = _specials(dtype)
    where = torch.rand(n, generator=gen) < 0.06
    t[where] = sp[torch.randint(0, sp.numel(), (int(where.sum()),), generator=gen)]
    for s in zero_runs:
        t[s] = 0.0
    return t


def _case(row: Row, dtype: torch.dtype, shape: tuple[int, int], gen: torch.Generator, cfg: bool, extras: bool):
    """A pool of tensors for ``row`` and a function making its StepArgs over a clone of the pool."""
    b, per = shape
    n = b * per
    # runs of zeros in x, m and m_c (d = +-0 there): whole vectors and vectors with a few such lanes
    runs = [slice(0, min(n, 40)), slice(n // 2, n // 2 + 3)] if n > 8 else [slice(0, 1)]
    pool = {k: _field(n, dtype, gen, runs).reshape(shape) for k in ("x", "m", "m_c")}
    pool["x"].view(-1)[n // 2 + 1] = -0.0
    slots = max([*row.reads, *(w.slot for w in row.writes)], default=-1) + 1
    for s in range(slots):
        pool[f"h{s}"] = _field(n, dtype, gen, runs[:1]).reshape(shape)
    pool["out"] = torch.full(shape, float("nan"), dtype=dtype)
    if extras:
        pool["u"] = torch.full((2 * b, per), float("nan"), dtype=dtype)
        pool["flag"] = torch.zeros(1, dtype=torch.int32)
    w = torch.rand(b, generator=gen, dtype=torch.float64).to(torch.float32) * 8

    def make(p):
        return StepArgs(x=p["x"], out=p["out"], m=p["m"], m_c=p["m_c"] if cfg else None, w=w if cfg else None,
                        coef=pack_row(row, u_scale=0.5 if extras else 1.0),
                        h_read=tuple(p[f"h{s}"] for s in row.reads),
                        h_write=tuple(p[f"h{wr.slot}"] for wr in row.writes),
                        u=p.get("u"), flag=p.get("flag"))

    return pool, make


def _same(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where the bit patterns agree; for float32/float64/float16 storage any NaN equals any NaN:
    which payload survives where two NaNs of different payloads meet is the compiler's operand
    order, and the SIMD levels already differed from the scalar level there before the fast paths
    (bf16 NaN is always c10's 0x7FC0: compared bit for bit, as everything else)."""
    same = got == want
    if dtype != torch.bfloat16:
        same = same | (got.view(dtype).isnan() & want.view(dtype).isnan())
    return same


def _run(pool, make, level: str, threads: int) -> dict[str, torch.Tensor]:
    p = {k: v.clone() for k, v in pool.items()}
    old = _C.simd_level()
    try:
        _C.set_simd_level(level)
        _C.set_num_threads(threads)
        cpu.step(make(p))
    finally:
        _C.set_simd_level(old)
        _C.set_num_threads(0)
    return {k: v.view(_INT[v.element_size()]) for k, v in p.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("row", list(ROWS))
def test_every_level_equals_scalar_bit_for_bit(row, dtype, gen):
    levels = available_levels(_C)
    if len(levels) < 2:
        pytest.skip("only the scalar level runs here")
    for shape, cfg, extras in [((3, 1021), True, False), ((2, 4096 + 35), False, True), ((1, 77), True, True),
                               ((40, 1024), True, False)]:
        pool, make = _case(ROWS[row], dtype, shape, gen, cfg, extras)
        want = _run(pool, make, "scalar", 1)
        for lv in levels[1:]:
            for threads in (1, 2):
                got = _run(pool, make, lv, threads)
                for k in want:
                    same = got[k] == want[k] if k == "flag" else _same(got[k], want[k], dtype)
                    assert bool(same.all()), (
                        f"{row} {dtype} {shape} cfg={cfg} extras={extras} {lv} x{threads}: {k} differs from scalar "
                        f"in {int((~same).sum())} elements")


def test_bf16_every_float_pattern_class_stores_as_scalar(gen):
    """bf16 stores of float results in every class (normal, subnormal inputs and results, NaN with
    payloads, inf, +-0, ties of the rounding, values rounding up to inf) through x' = c * x with
    bf16 x over all 65536 patterns and several c: each SIMD level equals the scalar level."""
    levels = available_levels(_C)
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(2, -1).clone()
    for c in (1.0, 0.5, 1.0 + 2.0 ** -8, 3.0, 2.0 ** -10, 2.0 ** 100, 1.0 - 2.0 ** -9, 0.7):
        row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=c), reads=(), writes=())
        m = torch.zeros_like(x)

        def make(p):
            return StepArgs(x=p["x"], out=p["out"], m=p["m"], coef=pack_row(row))

        pool = {"x": x, "m": m, "out": torch.full_like(x, float("nan"))}
        want = _run(pool, make, "scalar", 1)["out"]
        for lv in levels[1:]:
            got = _run(pool, make, lv, 1)["out"]
            assert torch.equal(got, want), f"c={c} {lv}: {int((got != want).sum())} of 65536 differ from scalar"
