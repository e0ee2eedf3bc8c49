"""The ``cpu`` backend (fastdiff._C) equals ``reference`` on every feature of a row, every shape
tail, dtype and SIMD level; is bit-identical across SIMD levels and thread counts; rejects what it
cannot run; and runs as the ``fastdiff::step`` custom op under torch.compile.

Inputs are fresh random numbers each run; the seed is printed (pytest shows it on failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from fastdiff.runtime import ops
from fastdiff.core import rng
from fastdiff.core.args import C_KNOWN_S, C_OUT, C_W0, C_W1, N_COEF, PTR_NAMES, StepArgs, pack_row
from fastdiff.backends import cpu, reference
from fastdiff.core.plan import OP_Z, Row, Write, combo

from ._cases import FEATURES as SHARED_FEATURES
from ._cases import check as shared_check
from ._cases import check_tiny_e_coefficient
from ._cpu_cases import FEATURES, check_close, check_ulp, clone_pool, kernel_normals, make_case

if cpu._C is None:
    pytest.skip(f"fastdiff._C is not built: {cpu.available()[1]}", allow_module_level=True)
_C = cpu._C

from .._cpu_levels import available_levels, gen, level  # noqa: F401

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SHAPES = [(b, n) for n in (1, 3, 7, 15, 17, 31, 33, 63, 65, 257) for b in (1, 64)] + [(64, 4, 9, 9)]




def _check_against_reference(case, dtype, what, monkeypatch):
    """cpu against reference, in two parts:

    1. given the same normals (the reference draws the kernel's own), every output within
       DESIGN.md's tolerance: fp32 1e-6 and fp64 1e-12 by norm, fp16/bf16 1 ulp per element;
    2. with the reference's own rng normals, by norm (fp16/bf16: unit roundoff), on tensors of at
       least 256 elements. A tiny tensor can hold one result that cancels terms of size ~1, so
       two float32 normals that differ in their last bit (allowed: test_in_kernel_noise_equals_rng)
       move it by more than 1e-6 of itself.
    """
    ref_pool = clone_pool(case.pool)
    ref_pool_k = clone_pool(case.pool)
    args = case.make(case.pool)
    ops.validate(args)
    assert cpu.supports(args)
    ops.step(args, backend="cpu")
    with monkeypatch.context() as mp:
        mp.setattr(reference, "philox_normal", kernel_normals)
        reference.step(case.make(ref_pool_k))
    for name in case.outputs:
        if dtype in (torch.float16, torch.bfloat16):
            check_ulp(case.pool[name], ref_pool_k[name], dtype, f"{what}/{name}")
        else:
            check_close(case.pool[name], ref_pool_k[name], dtype, False, f"{what}/{name}")
    if case.noise and args.x.numel() >= 256:
        reference.step(case.make(ref_pool))
        for name in case.outputs:
            check_close(case.pool[name], ref_pool[name], dtype, True, f"{what}/{name} (rng normals)")


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", list(FEATURES))
def test_matches_reference_every_feature(feature, dtype, inplace, level, gen, monkeypatch):
    case = make_case(FEATURES[feature], (5, 3, 7, 3), dtype, gen, inplace)
    _check_against_reference(case, dtype, f"{feature} {dtype} {level}", monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_shapes_and_tails(shape, dtype, level, gen, monkeypatch):
    case = make_case(FEATURES["everything"], shape, dtype, gen, inplace=True)
    _check_against_reference(case, dtype, f"{shape} {dtype} {level}", monkeypatch)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _run_with(case, level=None, threads=None):
    pool = clone_pool(case.pool)
    old_level, old_threads = _C.simd_level(), _C.num_threads()
    try:
        if level:
            _C.set_simd_level(level)
        if threads:
            _C.set_num_threads(threads)
        cpu.step(case.make(pool))
    finally:
        _C.set_simd_level(old_level)
        _C.set_num_threads(0)
    return [_bits(pool[n]) for n in case.outputs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_simd_levels_bit_identical_including_specials(dtype, gen):
    levels = available_levels(_C)
    case = make_case(FEATURES["everything"], (7, 300), dtype, gen, inplace=False)
    specials = torch.tensor([float("inf"), -float("inf"), float("nan"), 65504.0, -65519.0, 65520.0, 6e-8, 3e-8,
                             1e-5, 0.0, -0.0, 1e30, -3e38, 1e-40], dtype=torch.float64)
    for name in ("x", "m", "m_c", "h0", "g"):
        case.pool[name].view(-1)[: specials.numel()] = specials.to(dtype)
    runs = {lv: _run_with(case, level=lv) for lv in levels}
    for lv in levels[1:]:
        for name, a, b in zip(case.outputs, runs[levels[0]], runs[lv]):
            assert torch.equal(a, b), f"{name}: {lv} differs from {levels[0]} in {int((a != b).sum())} elements"


def _scale_row(c_out: float, c_h1: float) -> Row:
    """x' = c_out * x + 0 * d, h1 = c_h1 * x + 0 * d with d = x: one float product rounded to fp16 per output."""
    return Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=c_out), reads=(),
               writes=(Write(1, combo(x=c_h1)),))


@pytest.mark.parametrize("scales", [(1.0, 0.5), (2.0 ** -10, 2.0 ** 14), (0.75, 1.5), (2.0 ** -14, 3.0)], ids=str)
def test_fp16_conversions_every_bit_pattern_match_torch(scales, level):
    """Every fp16 bit pattern through the kernel's half -> float -> half path, as torch casts it.

    The row's outputs are ``c * x`` (exact in float for these c, and 0 * d == 0 for finite x), so
    each output is torch's ``(x.float() * c).half()`` bit for bit: round trips (c = 1), ties and
    subnormal results (c = 2^-10, 2^-14, 0.75), overflow to inf (c = 2^14, 3). Non-finite x gives
    NaN through 0 * d (and -0 gives +0), so all patterns are also compared with the scalar level.
    """
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(1, -1)
    xf = torch.where(torch.isfinite(x) & (x != 0), x, torch.zeros_like(x))  # -0: -0 + 0 * d is +0
    outs = {}
    for lv in ("scalar", level):
        old = _C.simd_level()
        _C.set_simd_level(lv)
        try:
            for name, inp in (("finite", xf), ("all", x)):
                xx, h1 = inp.clone(), torch.empty_like(inp)
                cpu.step(StepArgs(x=xx, out=xx, m=torch.zeros_like(inp), coef=pack_row(_scale_row(*scales)),
                                  h_read=(), h_write=(h1,)))
                outs[lv, name] = (_bits(xx), _bits(h1))
        finally:
            _C.set_simd_level(old)
    for c, got in zip(scales, outs[level, "finite"]):
        want = _bits((xf.float() * c).to(torch.float16))
        assert torch.equal(got, want), f"{level} c={c}: {int((got != want).sum())} of 65536 differ from torch"
    for a, b in zip(outs["scalar", "all"], outs[level, "all"]):
        assert torch.equal(a, b), f"{level}: {int((a != b).sum())} of 65536 differ from the scalar level"


# (c_out, c_h1) pairs per storage dtype: products of a stored value (11 / 8 significant bits) and c
# (at most 13 / 16) are exact in float, and over every stored bit pattern they include ties of both
# parities, results just past the largest finite value, subnormal results and float overflow.
_EDGE_SCALES = {
    torch.float16: [(1.0 + 2.0 ** -11, 0.75), (2.0 ** -10, 1.5), (2.0 - 2.0 ** -11, 3.0),
                    (3 * 2.0 ** -14, 1.0 + 2.0 ** -12)],
    torch.bfloat16: [(1.0 + 2.0 ** -8, 0.75), (1.0 + 2.0 ** -9, 1.5), (3 * 2.0 ** -8, 2.0 - 2.0 ** -8),
                     (2.0 ** -126, 1.0 + 3 * 2.0 ** -9)],
}


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_half_store_edge_cases_match_torch(dtype, level):
    """The float -> fp16/bf16 rounding of every SIMD level against torch's ``.to(dtype)``.

    x takes every bit pattern of the dtype; the row computes ``x' = c_out * x + 0 * d`` and
    ``h1 = c_h1 * x + 0 * d`` with ``d = 1 * x + 0 * m`` (m = 0), which torch evaluates the same
    way in float32. Non-NaN results must equal torch's conversion bit for bit: round to nearest
    even at ties of both parities (asserted present), overflow to inf in the conversion (a finite
    float past the dtype's range), subnormal results, float overflow, -0 and inf. NaN results must
    be NaN, the same bits on every level, and bf16's the canonical 0x7FC0 of c10::BFloat16 (torch's
    own vectorised cast gives 0xFFFF, its scalar one 0x7FC0).
    """
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(1, -1)
    xf = x.float()
    d = 1.0 * xf + 0.0 * torch.zeros_like(xf)
    mant = 10 if dtype == torch.float16 else 7  # stored mantissa bits
    drop = 23 - mant  # float bits below the dtype's last place (normal range)
    ties = {0: 0, 1: 0}
    overflow = subnormal = 0
    for scales in _EDGE_SCALES[dtype]:
        outs = {}
        for lv in ("scalar", level):
            old = _C.simd_level()
            _C.set_simd_level(lv)
            try:
                xx, h1 = x.clone(), torch.empty_like(x)
                cpu.step(StepArgs(x=xx, out=xx, m=torch.zeros_like(x), coef=pack_row(_scale_row(*scales)),
                                  h_read=(), h_write=(h1,)))
                outs[lv] = (xx, h1)
            finally:
                _C.set_simd_level(old)
        for c, got, ref_lv in zip(scales, outs[level], outs["scalar"]):
            f = xf * c + 0.0 * d  # the kernel's float result, by the same IEEE operations
            want = f.to(dtype)
            nan = torch.isnan(f)
            assert torch.equal(torch.isnan(got), nan), f"{level} {dtype} c={c}: NaN where torch has none or v.v."
            fine = ~nan
            assert torch.equal(_bits(got)[fine], _bits(want)[fine]), (
                f"{level} {dtype} c={c}: {int((_bits(got) != _bits(want))[fine].sum())} of 65536 differ from torch")
            assert torch.equal(_bits(got), _bits(ref_lv)), f"{level} {dtype} c={c}: differs from the scalar level"
            if dtype == torch.bfloat16:
                assert bool((_bits(got)[nan] == 0x7FC0).all()), f"{level} c={c}: a bf16 NaN is not 0x7FC0"
            fb = f.view(torch.int32)[fine & torch.isfinite(f)]
            low, lsb = fb & ((1 << drop) - 1), (fb >> drop) & 1
            for parity in (0, 1):
                ties[parity] += int(((low == 1 << (drop - 1)) & (lsb == parity)).sum())
            overflow += int((torch.isfinite(f) & torch.isinf(want.float())).sum())
            subnormal += int((want.float() != 0).logical_and(want.float().abs() < torch.finfo(dtype).tiny).sum())
    assert ties[0] and ties[1] and overflow and subnormal, f"the scales miss a case: {ties}, {overflow}, {subnormal}"


@pytest.mark.parametrize("feature", ["everything", "two_writes_alias_reads", "plain_e"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_threads_bit_identical(dtype, feature, gen):
    # 3 samples of an odd size: blocks straddle samples and the split between threads
    case = make_case(FEATURES[feature], (3, 40_001), dtype, gen, inplace=False)
    one, two = _run_with(case, threads=1), _run_with(case, threads=2)
    for name, a, b in zip(case.outputs, one, two):
        assert torch.equal(a, b), f"{name}: 1 and 2 threads differ in {int((a != b).sum())} elements"


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 4, 5, 5), (5, 1027)], ids=str)
def test_in_kernel_noise_equals_rng(shape, level, gen):
    # out = 1*z: the kernel's Philox normals, element by element, against rng.philox_normal
    b = shape[0]
    x = torch.randn(shape, generator=gen)
    seeds = torch.randint(-(2**63), 2**63 - 1, (b,), generator=gen)
    row = int(torch.randint(0, 2**32, (1,), generator=gen))
    coef = [0.0] * N_COEF
    coef[C_OUT + OP_Z] = 1.0
    out = torch.full(shape, float("nan"))
    ops.step(StepArgs(x=x, out=out, m=x, coef=tuple(coef), row=row, seeds=seeds), backend="cpu")
    want = rng.philox_normal(seeds, row, rng.STREAM_MAIN, x[0].numel()).reshape(shape)
    err = (out - want).abs() / want.abs().clamp_min(1.0)
    assert float(err.max()) <= 4 * torch.finfo(torch.float32).eps, f"max scaled error {float(err.max()):.3e}"


@pytest.mark.parametrize("variant", ["clip_rescale_g", "plain_cfg"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
def test_e_operand_is_the_guided_output_before_clipping(dtype, variant, level, gen):
    """x' = e and h = d (the shape of diffusers' DDIM with clip_sample=True), checked against the
    formulas of fastdiff/core/plan.py rather than against reference: e is m guided, rescaled and moved
    by c_g * g, never clipped; d is formed from that e and then clipped. Exact: the same float
    operations in the same order, coefficients exact in float32."""
    b, shape = 3, (3, 5, 7)
    x, m, m_c, g = (torch.randn(shape, generator=gen).to(dtype) * 3 for _ in range(4))
    w, r = torch.rand(b, generator=gen) * 8, torch.rand(b, generator=gen) + 0.5
    clipped = variant == "clip_rescale_g"
    row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.5, a_e=-0.75, out=combo(e=1.0), writes=(Write(0, combo(d=1.0)),),
              clip="static" if clipped else None)
    out, h = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    args = StepArgs(x=x, out=out, m=m, m_c=m_c, w=w, h_write=(h,), coef=pack_row(row, c_g=0.25 if clipped else 0.0))
    if clipped:
        args.r, args.s, args.clip, args.g = r, torch.ones(b), 1, g
    ops.step(args, backend="cpu")
    wv, rv = (t.to(dtype)[:, None, None] for t in (w, r))
    e = m + wv * (m_c - m)
    if clipped:
        e = rv * e + 0.25 * g
    d = 0.5 * x + -0.75 * e
    if clipped:
        d = torch.minimum(torch.maximum(d, -torch.ones_like(d)), torch.ones_like(d))
        assert (d.abs() == 1).float().mean() > 0.2, "the test should clip many elements"
    assert torch.equal(out, e), f"x' differs from e in {int((out != e).sum())} elements"
    assert torch.equal(h, d), f"h differs from d in {int((h != d).sum())} elements"


def test_e_coefficient_below_float32_range_is_no_e_term(level):
    check_tiny_e_coefficient(cpu.step, "cpu")


def test_empty_tensor_is_a_no_op():
    x = torch.zeros(2, 0)
    coef = [0.5] * N_COEF
    for c in (C_OUT, C_W0, C_W1):
        coef[c + OP_Z] = 0.0
    ops.step(StepArgs(x=x, out=x, m=x, g=x, coef=tuple(coef)), backend="cpu")


def _simple_args(**kw) -> StepArgs:
    x = torch.randn(4, 6, 5)
    base = dict(x=x, out=torch.empty_like(x), m=torch.randn(4, 6, 5), coef=tuple(torch.randn(N_COEF).tolist()))
    coef = list(base["coef"])
    coef[C_OUT + OP_Z] = coef[C_W0 + OP_Z] = coef[C_W1 + OP_Z] = coef[C_KNOWN_S] = 0.0
    base["coef"] = tuple(coef)
    base.update(kw)
    return StepArgs(**base)


def test_non_contiguous_and_overlap_are_unsupported_and_fall_back():
    x = torch.randn(6, 4, 5).transpose(0, 1)  # batch 4, not contiguous
    args = _simple_args(x=x, out=torch.empty(4, 6, 5))
    assert not cpu.supports(args)
    ref = StepArgs(**{**args.__dict__, "out": torch.empty(4, 6, 5)})
    reference.step(ref)
    for name in ("cpu", "auto"):  # ops.step runs the kernel on contiguous copies (no fallback, no warning)
        args.out.fill_(float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            ops.step(args, backend=name)
        torch.testing.assert_close(args.out, ref.out, rtol=1e-6, atol=1e-6)
    # a per-sample scalar with a stride
    w = torch.rand(8)[::2]
    assert not cpu.supports(_simple_args(m_c=torch.randn(4, 6, 5), w=w))
    # out overlapping x by one element
    buf = torch.randn(2 * 120 + 1)
    assert not cpu.supports(_simple_args(x=buf[:120].view(4, 6, 5), out=buf[1:121].view(4, 6, 5)))
    # g is an element tensor like the others: not contiguous, or overlapping out other than exactly
    assert not cpu.supports(_simple_args(g=torch.randn(6, 4, 5).transpose(0, 1)))
    assert not cpu.supports(_simple_args(g=buf[:120].view(4, 6, 5), out=buf[1:121].view(4, 6, 5)))
    # exact aliasing is supported
    y = torch.randn(4, 6, 5)
    assert cpu.supports(_simple_args(x=y, out=y, m=y))


def test_unsupported_dtype():
    x = torch.randn(2, 8).to(torch.float8_e4m3fn)
    args = StepArgs(x=x, out=x, m=x, coef=(0.0,) * N_COEF)
    assert not cpu.supports(args)


def test_extension_argument_errors_name_the_value():
    x = torch.randn(2, 8)
    n = len(PTR_NAMES)
    assert tuple(_C.PTR_NAMES) == PTR_NAMES and _C.N_COEF == N_COEF == 30
    ptrs = [x.data_ptr(), x.data_ptr(), x.data_ptr()] + [0] * (n - 3)
    coef = [0.0] * N_COEF
    with pytest.raises(ValueError, match="dtype code must be 0..3, got 7"):
        _C.step(ptrs, 16, 8, 7, 0, 0, 0, 0, coef)
    with pytest.raises(ValueError, match="not a multiple of per_sample 5"):
        _C.step(ptrs, 16, 5, 0, 0, 0, 0, 0, coef)
    with pytest.raises(ValueError, match="coef must have 30 entries, got 29"):
        _C.step(ptrs, 16, 8, 0, 0, 0, 0, 0, [0.0] * 29)  # a contract-v2 row, without u_scale
    with pytest.raises(TypeError):
        _C.step(ptrs[:19], 16, 8, 0, 0, 0, 0, 0, coef)  # the v2 pointer list, without u and flag
    with pytest.raises(ValueError, match=r"h_read\[1\] is required"):
        _C.step(ptrs[:4] + [x.data_ptr()] + [0] * (n - 5), 16, 8, 0, 2, 0, 0, 0, coef)
    with pytest.raises(ValueError, match="w is required"):
        _C.step(ptrs[:3] + [x.data_ptr()] + [0] * (n - 4), 16, 8, 0, 0, 0, 0, 0, coef)
    with pytest.raises(ValueError, match="u is required"):
        _C.step(ptrs, 16, 8, 0, 0, 0, 0, 0, coef, 1)
    with pytest.raises(ValueError, match="u_copies must be 0, 1 or 2, got 3"):
        _C.step(ptrs, 16, 8, 0, 0, 0, 0, 0, coef, 3)
    noisy = list(coef)
    noisy[C_OUT + OP_Z] = 1.0
    with pytest.raises(ValueError, match="seeds is required"):
        _C.step(ptrs, 16, 8, 0, 0, 0, 0, 0, noisy)
    with pytest.raises(ValueError, match="'sse9'"):
        _C.set_simd_level("sse9")


def test_simd_level_env_var():
    code = "from fastdiff.backends import cpu; print(cpu.available())"
    env = dict(os.environ, FASTDIFF_CPU_SIMD="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "SIMD scalar" in out, out
    env["FASTDIFF_CPU_SIMD"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "(False" in out and "'bogus'" in out, out


def test_missing_extension_leaves_fastdiff_importable():
    code = ("import sys; sys.modules['fastdiff._C'] = None\n"
            "import fastdiff, torch\n"
            "from fastdiff import ops\n"
            "from fastdiff.core.args import StepArgs, N_COEF\n"
            "print(ops.backend_status('cpu'))\n"
            "x = torch.ones(1, 3)\n"
            "c = [0.0] * N_COEF; c[2] = 2.0  # x' = 2 x\n"
            "ops.step(StepArgs(x=x, out=x, m=x, coef=tuple(c)), backend='reference'); print(x.tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "(False" in out and "fastdiff._C did not import" in out and "[[2.0, 2.0, 2.0]]" in out, out


# --- the fastdiff::step custom op ----------------------------------------------------------------


def _op_inputs(gen, dtype=torch.float32):
    b, shape = 3, (3, 4, 5, 7)
    x = torch.randn(shape, generator=gen).to(dtype)
    hist = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]
    m, m_c, g = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    w = torch.rand(b, generator=gen) * 7
    seeds = torch.randint(-(2**63), 2**63 - 1, (b,), generator=gen)
    coef = torch.randn(N_COEF, generator=gen).tolist()  # e and z coefficients non-zero
    coef[C_KNOWN_S] = 0.0
    return x, hist, m, m_c, g, w, seeds, coef


@pytest.mark.parametrize("with_g", [False, True], ids=["no_g", "g"])
def test_custom_op_opcheck(gen, with_g):
    x, hist, m, m_c, g, w, seeds, coef = _op_inputs(gen)
    g = g if with_g else None
    # in place: x is the output, slot 1 is read and written, slot 2 written
    args = (x, hist, m, m_c, w, None, None, seeds, None, None, None, None, g, [0, 1], [1, 2], coef, 0, 5, "cpu")
    torch.library.opcheck(torch.ops.fastdiff.step.default, args)


def test_custom_op_compiles_fullgraph_and_matches_reference(gen):
    x, hist, m, m_c, g, w, seeds, coef = _op_inputs(gen)

    def f(x, h0, h1, h2, m, m_c, g, w, seeds):
        ops.step_op(x, m, coef, row=9, history=[h0, h1, h2], reads=[0, 1], writes=[1, 2], m_c=m_c, w=w,
                    seeds=seeds, g=g, backend="cpu")
        return x

    xc, hc = x.clone(), [h.clone() for h in hist]
    torch.compile(f, fullgraph=True)(xc, *hc, m, m_c, g, w, seeds)
    xr, hr = x.clone(), [h.clone() for h in hist]
    ops.step(StepArgs(x=xr, out=xr, m=m, m_c=m_c, w=w, seeds=seeds, coef=tuple(coef), row=9,
                      h_read=(hr[0], hr[1]), h_write=(hr[1], hr[2]), g=g), backend="reference")
    check_close(xc, xr, torch.float32, True, "compiled x")
    check_close(hc[1], hr[1], torch.float32, True, "compiled slot 1")
    check_close(hc[2], hr[2], torch.float32, True, "compiled slot 2")
    assert torch.equal(hc[0], hr[0])  # read only


def test_custom_op_rejects_bad_slot(gen):
    x, hist, m, m_c, g, w, seeds, coef = _op_inputs(gen)
    with pytest.raises(ValueError, match="writes has slot 5 but history has 3 tensors"):
        ops.step_op(x, m, coef, history=hist, writes=[5], seeds=seeds)


# --- contract v3: the next model input and the non-finite flag, through the shared cases -------------

_V3 = [k for k in SHARED_FEATURES if k.startswith(("u1", "u2", "flag")) or k == "in_place_everything"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", _V3)
def test_model_input_and_flag_match_reference(name, dtype, level):
    # shapes whose tails are shorter than one vector and whose blocks straddle samples
    for shape in ((3, 37), (2, 4, 129), (1, 5)):
        shared_check(lambda a: ops.step(a, backend="cpu"), SHARED_FEATURES[name], shape, dtype, "cpu",
                     seed=len(name) + shape[-1])


@pytest.mark.parametrize("where", ["m", "m_c"])
def test_flag_names_a_nonfinite_element_anywhere(where):
    # every position of a multi-block, multi-thread row: one NaN, alone, is seen
    x = torch.randn(3, 40_000)
    for pos in (0, 511, 512, 40_000 - 1, 40_000, 3 * 40_000 - 1):
        m, m_c = torch.randn(3, 40_000), torch.randn(3, 40_000)
        (m if where == "m" else m_c).view(-1)[pos] = float("nan")
        flag = torch.zeros(1, dtype=torch.int32)
        ops.step(StepArgs(x=x.clone(), out=torch.empty_like(x), m=m, m_c=m_c, w=torch.ones(3), flag=flag,
                          coef=pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=-1.0, out=combo(d=1.0)))),
                 backend="cpu")
        assert flag.item() == 1, (where, pos)
