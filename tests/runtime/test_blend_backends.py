"""Blend rows (``StepArgs.a``: the per-sample coefficients of N guidance branches ``m``, ``m_c``,
``m_2``, ``m_3``, and the momentum write ``m_w``) on the fused backends, against ``reference``.

Backends: ``triton`` (compiled on a GPU, else under ``TRITON_INTERPRET=1`` on CPU tensors), the
CUDA kernel's CPU emulation (csrc/cuda_step.cu compiled as C++ with csrc/cuda_emu.h, as
tests/backends/test_cuda_emu.py builds it; its grid capped so the grid-stride loop wraps) and, where
there is a GPU and ``fastdiff._C_cuda``, the ``cuda`` backend itself. Rows are the random rows of
tests/backends/_cases.py (history reads and writes, clip, mask, noise, the gradient g, u, flag,
``out`` in place) with the blend operands added: random ``a``, any of ``m_c``/``m_2``/``m_3``,
``m_w`` new or ``m_3`` itself. Shapes are tiny and odd (chunks straddle samples; one element per
sample; a scalar tail), so the file runs in seconds once the emulation is built (cached by source).
"""

from __future__ import annotations

import dataclasses
import os

import torch

if not torch.cuda.is_available():  # before the Triton kernels are first imported (tests/backends/conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdiff.backends import cuda as cb  # noqa: E402
from fastdiff.backends import reference  # noqa: E402
from fastdiff.core.args import N_COEF, PTR_NAMES, pointers  # noqa: E402
from fastdiff.runtime import ops  # noqa: E402

from ..backends._cases import build, compare_to_reference, tolerance  # noqa: E402

P = {name: i for i, name in enumerate(PTR_NAMES)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


# --- the backends -----------------------------------------------------------------------------------


def _triton():
    """``(kernels module, device)`` of the triton backend, or a skip reason."""
    from fastdiff.backends import triton as tb

    if isinstance(tb._kernels, Exception):
        return None, f"triton kernels do not import: {tb._kernels}"
    k = tb.kernels()
    if not k.INTERPRETED and not torch.cuda.is_available():
        return None, "fastdiff.kernels.step was imported without TRITON_INTERPRET=1 and there is no GPU"
    return k, ("cpu" if k.INTERPRETED else "cuda")


@pytest.fixture(scope="module")
def emu():
    """The emulated ``_C_cuda`` module, built with the host compiler."""
    from tests.backends._emu import emu_module

    return emu_module()


def _runner(name: str, request):
    """``(run(args), device)`` for backend ``name``, or a skip."""
    if name == "triton":
        from fastdiff.backends import triton as tb

        k, dev = _triton()
        if k is None:
            pytest.skip(dev)

        def run(args):
            assert tb.supports(args), "triton refuses a blend row"
            tb.step(args)

        return run, dev
    if name.startswith("cuda_emu"):
        mod = request.getfixturevalue("emu")
        blocks = int(name.rsplit("_", 1)[1])  # 0: the automatic grid (the emulated device has 2 SMs)
        return (lambda args: cb.launch(mod, args, stream=0, max_blocks=blocks)), "cpu"
    assert name == "cuda"
    if not cb.available()[0]:
        pytest.skip(f"cuda backend unavailable ({cb.available()[1]})")

    def run(args):
        assert cb.supports(args), "cuda refuses a blend row"
        cb.step(args)
        torch.cuda.synchronize()

    return run, "cuda"


BACKENDS = ["triton", "cuda_emu_2", "cuda"]


# --- blend rows -------------------------------------------------------------------------------------


def build_blend(feat: dict, shape, dtype, seed: int, device):
    """``build`` of tests/backends/_cases.py with the blend operands: ``(pool, make_args, outputs)``.

    ``feat`` adds to _cases' keys: ``branches`` (a string of ``c``, ``2``, ``3``: ``m_c``, ``m_2``,
    ``m_3`` given), ``mw`` (None, ``"new"`` or ``"m3"``: ``m_w`` is ``m_3`` itself) and ``bad``
    (``"m2"``/``"m3"``, with ``_inf`` for +Inf: one non-finite element there). ``a`` is random, its
    rows for absent branches garbage the kernels must not use."""
    br = feat.get("branches", "")
    base = {k: v for k, v in feat.items() if k not in ("branches", "mw", "bad")}
    base["cfg"] = "c" in br  # m_c (its w is dropped below: blend rows have none)
    assert not base.get("rescale"), "blend rows have no r"
    pool, make_args, outputs = build(base, shape, dtype, seed, device)
    g = torch.Generator().manual_seed(seed + 1)
    for k in "23":
        if k in br:
            pool[f"m{k}"] = torch.randn(*shape, generator=g).to(dtype).to(device)
    if feat.get("bad"):
        key = feat["bad"].removesuffix("_inf")
        flat = pool[key].view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = (
            float("inf") if feat["bad"].endswith("_inf") else float("nan"))
    mw = feat.get("mw")
    if mw == "new":
        pool["mw"] = torch.full(shape, float("nan"), dtype=dtype, device=device)
    elif mw == "m3":
        assert "3" in br, "m_w aliases m_3: give m_3"
    mw_key = {"new": "mw", "m3": "m3"}.get(mw)
    rows = 8 if mw else 4
    a = (torch.randn(rows, shape[0], generator=g) * 1.5).to(device)

    def make(p):
        args = make_args(p)
        return dataclasses.replace(args, w=None, r=None, a=a, m_2=p.get("m2"), m_3=p.get("m3"),
                                   m_w=None if mw_key is None else p[mw_key])

    outputs = outputs + ([mw_key] if mw_key else [])
    return pool, make, outputs


def compare(run, feat: dict, shape, dtype, device, seed: int = 0) -> None:
    """``run(args)`` equals ``reference`` on the blend row ``feat`` (the checks of _cases.check)."""
    pool, make_args, outputs = build_blend(feat, shape, dtype, seed, device)
    ref = {k: v.clone() for k, v in pool.items()}
    got = {k: v.clone() for k, v in pool.items()}
    a_ref, a_got = make_args(ref), make_args(got)
    ops.validate(a_got)
    assert a_got.blend
    reference.step(a_ref)
    run(a_got)
    compare_to_reference(got, ref, pool, outputs, feat, shape, dtype, bool(feat.get("nonfinite") or feat.get("bad")))


CASES = {
    "b_only": {},
    "two_branch": {"branches": "c"},
    "c2": {"branches": "c2", "writes": ("new",), "reads": 1},
    "c23_mw_new": {"branches": "c23", "mw": "new"},
    "momentum_in_place": {"branches": "3", "mw": "m3"},
    "c3_momentum_history_e": {"branches": "c3", "mw": "m3", "reads": 2, "writes": ("h1", "new"), "e": "all"},
    "2_mw_dynamic_clip": {"branches": "2", "mw": "new", "clip": 2},
    "c2_static_clip_e": {"branches": "c2", "clip": 1, "e": "out", "reads": 1, "writes": ("h0",)},
    "c23_mask_philox_noise": {"branches": "c23", "mw": "m3", "mask": "philox", "noise": "philox"},
    "c2_external_noise": {"branches": "c2", "mask": "external", "noise": "external", "writes": ("new",)},
    "c3_noise_in_write_only": {"branches": "c3", "noise": "write_only", "writes": ("new",)},
    "c23_g_u2_flag": {"branches": "c23", "mw": "new", "g": "random", "u": 2, "flag": True},
    "g_is_x_in_place_u1": {"branches": "c", "g": "x", "in_place": True, "u": 1, "flag": True},
    "everything_in_place": {"branches": "c23", "mw": "m3", "in_place": True, "clip": 2, "reads": 4,
                            "writes": ("h0", "h2"), "mask": "philox", "noise": "philox", "e": "all", "g": "random",
                            "u": 2, "flag": True},
    "flag_nan_m": {"branches": "c23", "flag": True, "nonfinite": "m", "mw": "new"},
    "flag_inf_m_c": {"branches": "c2", "flag": True, "nonfinite": "m_c_inf", "u": 1},
    "flag_nan_m2": {"branches": "c2", "flag": True, "bad": "m2", "u": 2},
    "flag_inf_m3_momentum": {"branches": "3", "flag": True, "bad": "m3_inf", "mw": "m3"},
}
EVERYTHING = CASES["everything_in_place"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_blend_row_fp32(backend, name, request):
    run, dev = _runner(backend, request)
    compare(run, CASES[name], (5, 3, 11), torch.float32, dev, seed=len(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (9, 1), (3, 37), (2, 5, 7)], ids=str)
def test_blend_odd_shapes_and_dtypes(backend, dtype, shape, request):
    # one element per sample (a 16-byte chunk spans several samples and their coefficients), a
    # scalar tail; out of place with a new m_w and in place with m_w = m_3
    run, dev = _runner(backend, request)
    feats = [EVERYTHING, dict(EVERYTHING, in_place=False, mw="new"), CASES["c2_external_noise"]]
    for k, feat in enumerate(feats[:1] if shape == (9, 1) else feats):  # 9 samples: slow in the interpreter
        compare(run, feat, shape, dtype, dev, seed=sum(shape) + k)


@pytest.mark.parametrize("blocks", [1, 0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64], ids=str)
def test_cuda_emulation_grid_sizes(emu, blocks, dtype):
    """One thread doing everything, and the automatic grid."""
    run = lambda args: cb.launch(emu, args, stream=0, max_blocks=blocks)  # noqa: E731
    compare(run, EVERYTHING, (3, 37), dtype, "cpu", seed=blocks)
    compare(run, CASES["flag_nan_m2"], (5, 17), dtype, "cpu", seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_every_input_is_read_before_any_write(backend, dtype, request):
    """``m_w`` is ``m_3`` (the momentum buffer updated in place), ``out`` is ``x`` and the history
    writes are the slots read: the results equal the reference run on separate, unaliased copies."""
    run, dev = _runner(backend, request)
    pool, make_args, outputs = build_blend(EVERYTHING, (3, 37), dtype, 5, dev)
    assert {"x", "m3", "h0", "h2"} <= set(outputs)
    got = {k: v.clone() for k, v in pool.items()}
    args = make_args(got)
    assert args.out is args.x and args.m_w is args.m_3
    assert args.h_write[0] is args.h_read[0] and args.h_write[1] is args.h_read[2]
    run(args)
    sep = {k: v.clone() for k, v in pool.items()}
    want = make_args(sep)
    fresh = {name: torch.full_like(pool["x"], float("nan")) for name in ("out", "m_w", "w0", "w1")}
    reference.step(dataclasses.replace(want, out=fresh["out"], m_w=fresh["m_w"], h_write=(fresh["w0"], fresh["w1"])))
    tol = tolerance(dtype, True)
    for k, ref in (("x", fresh["out"]), ("m3", fresh["m_w"]), ("h0", fresh["w0"]), ("h2", fresh["w1"]),
                   ("u", sep["u"])):
        err = ((got[k].double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= tol, f"{k}: relative error {err:.3g} against the unaliased reference"
    assert torch.equal(got["m2"], pool["m2"]) and torch.equal(got["m_c"], pool["m_c"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_cuda_emulation_alignment(emu, dtype):
    """``m_2`` and ``m_3`` are read element by element (like ``g``), so they alone off a 16-byte
    boundary keep the vector path; ``m_w`` (16-byte stores) off it takes the scalar path. Either
    way the results are the reference's (the emulation throws on a misaligned 16-byte access)."""
    aligned = torch.empty(4)
    odd = torch.empty(5, dtype=dtype)[1:]
    ptrs = [aligned.data_ptr()] * 3 + [0] * (len(PTR_NAMES) - 3)
    assert emu.vector_path(ptrs)
    for name, vec in (("m_2", True), ("m_3", True), ("m_w", False)):
        assert emu.vector_path([odd.data_ptr() if i == P[name] else q for i, q in enumerate(ptrs)]) is vec, name

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype)
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    for moved in (("m_2", "m_3"), ("m_w",)):
        def run(args):
            a = dataclasses.replace(args, **{n: shifted(getattr(args, n)) for n in moved})
            assert emu.vector_path(pointers(a)) is (moved != ("m_w",))
            cb.launch(emu, a, stream=0, max_blocks=2)
            if args.m_w is not None:
                args.m_w.copy_(a.m_w)

        compare(run, dict(CASES["c23_mw_new"], u=1, flag=True), (3, 37), dtype, "cpu", seed=len(moved))


def test_triton_blend_through_ops_with_a_strided_a_and_batch_slices(monkeypatch):
    """``ops.step(backend="triton")`` dispatches a blend row to the kernel (triton supports it); the
    coefficients may be a strided view, and a batch above the grid limit runs in slices, each with
    its own columns of ``a``."""
    k, dev = _triton()
    if k is None:
        pytest.skip(dev)
    from fastdiff.backends import triton as tb

    for cap in (k.MAX_BATCH, 2):
        monkeypatch.setattr(k, "MAX_BATCH", cap)
        pool, make_args, outputs = build_blend(EVERYTHING, (5, 3, 7), torch.float32, 11 + cap, dev)
        ref = {kk: v.clone() for kk, v in pool.items()}
        got = {kk: v.clone() for kk, v in pool.items()}
        args = make_args(got)
        strided = torch.empty(args.a.shape[1], args.a.shape[0], device=dev).t()
        strided.copy_(args.a)
        assert not strided.is_contiguous()
        args = dataclasses.replace(args, a=strided)
        assert tb.supports(args)
        assert ops.resolve("triton", args) is tb
        ops.step(args, backend="triton")
        reference.step(make_args(ref))
        for kk in outputs:
            torch.testing.assert_close(got[kk], ref[kk], rtol=1e-6, atol=1e-6)


def test_cuda_binding_refuses_blend_operands_out_of_place(emu):
    """What bind_args.h refuses, with the reference's messages: a branch beyond m_c or m_w without
    a, and w or r with a."""
    x = torch.zeros(2, 4)
    coef = [0.0] * N_COEF
    base = [x.data_ptr()] * 3 + [0] * (len(PTR_NAMES) - 3)
    for name in ("m_2", "m_3", "m_w"):
        ptrs = [x.data_ptr() if i == P[name] else q for i, q in enumerate(base)]
        with pytest.raises(ValueError, match=f"{name} is given but a is null"):
            emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0)
    a = torch.zeros(4, 2)
    for name in ("w", "r"):
        ptrs = [a.data_ptr() if i in (P[name], P["a"]) else q for i, q in enumerate(base)]
        with pytest.raises(ValueError, match=f"{name} is given with a"):
            emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0)
    ptrs = [a.data_ptr() if i == P["a"] else q for i, q in enumerate(base)]
    out = torch.full_like(x, float("nan"))
    ptrs[P["out"]] = out.data_ptr()
    emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0)  # a row in blend mode with m alone (coef 0: x' = 0)
    assert (out == 0).all()
