"""The CUDA kernel's own indexing, run on the CPU: csrc/cuda_step.cu compiled as C++ with
csrc/cuda_emu.h (every block and thread run in turn), bound by csrc/cuda_bindings.cpp, driven by
fastdiff/backends/cuda.py's pointer marshalling, compared with ``reference``.

The grid is capped to a few blocks so the grid-stride loop wraps; sizes are odd so that chunks
straddle samples and Philox groups and the scalar tail is exercised; offset views move their
operands to element accesses (the others keep 16-byte ones: counted by the emulation), and each
specialised variant the kernel dispatches to is run. The
prepared-program entry point (``_C_cuda.Program``) is compared with ``step``. The GPU itself is
exercised by tests/backends/test_gpu.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fastdiff.core import rng
from fastdiff.core.args import C_AE, C_AX, C_OUT, C_U, N_COEF, PTR_NAMES, StepArgs, pointers
from fastdiff.backends import cuda as cb
from fastdiff.backends import reference
from fastdiff.core.plan import OP_D, OP_X, OP_Z

from ._cases import EVERYTHING, FEATURES, SEEDS, build, check, check_tiny_e_coefficient, run_unaligned
from ._emu import emu_module

P = {name: i for i, name in enumerate(PTR_NAMES)}



@pytest.fixture(scope="module")
def emu():
    """The emulated ``_C_cuda`` module."""
    return emu_module()


@pytest.fixture(scope="module")
def emu_div64():
    """The emulated ``_C_cuda`` module finding samples by the 64-bit division of numel >= 2^31 rows."""
    return emu_module("FD_CUDA_EMU_DIV64")


def _runner(emu, max_blocks):
    def run(args):
        cb.launch(emu, args, stream=0, max_blocks=max_blocks)
    return run


@pytest.mark.parametrize("name", list(FEATURES))
def test_every_feature_fp32(emu, name):
    check(_runner(emu, 2), FEATURES[name], (5, 3, 11), torch.float32, "cpu", seed=len(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("numel", [1, 3, 5, 17, 33, 257, 1031])
def test_odd_sizes(emu, numel, dtype):
    # 1 block of 256 threads, 3 blocks, and the automatic grid (the emulated device has 2 SMs)
    for batch, in_place, max_blocks in ((1, False, 1), (5, True, 3), (3, False, 0)):
        check(_runner(emu, max_blocks), dict(EVERYTHING, in_place=in_place), (batch, numel), dtype, "cpu",
              seed=numel + batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_unaligned_pointers_take_the_scalar_path(emu, dtype):
    buf = torch.randn(3 * 37 + 1).to(dtype)
    x = buf[1:].view(3, 37)  # contiguous, but 2-8 bytes past a 16-byte boundary
    assert x.is_contiguous() and x.data_ptr() % 16
    ptrs = [x.data_ptr()] * 3 + [0] * (len(PTR_NAMES) - 3)
    assert not emu.vector_path(ptrs)
    assert emu.vector_path([torch.empty(4).data_ptr()] + [0] * (len(PTR_NAMES) - 1))
    # g is read element by element, and u is stored copy by copy as its own alignment allows, so
    # neither's alignment forces the scalar path on the other operands
    aligned = [torch.empty(4).data_ptr()] + [0] * (len(PTR_NAMES) - 1)
    for name in ("g", "u"):
        assert emu.vector_path([x.data_ptr() if i == P[name] else q for i, q in enumerate(aligned)])

    def run(args):  # every element tensor moved 1 element past a 16-byte boundary
        run_unaligned(args, lambda a: cb.launch(emu, a, stream=0, max_blocks=2), emu.vector_path)

    check(run, EVERYTHING, (3, 37), dtype, "cpu", seed=5)


# --- issue 19: the variants dispatch picks, and an unaligned operand on its own -------------------

_HIST = {"none": {}, "r1w1": {"reads": 1, "writes": ("new",)}, "r2w2": {"reads": 2, "writes": ("h1", "new"), "e": "all"}}
_NOISE = {"none": {}, "philox": {"noise": "philox"}, "external": {"noise": "external"}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("noise", list(_NOISE))
@pytest.mark.parametrize("hist", list(_HIST))
@pytest.mark.parametrize("cfg", [False, True], ids=["uncond", "cfg"])
def test_specialised_variants(emu, cfg, hist, noise, dtype):
    """Each of the 12 specialised variants per storage type (guided or not; no history, or up to 2
    reads and 2 writes; no noise, Philox or external z: csrc/cuda_step.cu, dispatch()) equals the
    reference, with u and the flag, without clipping and with it (a run-time flag there), chunks
    straddling samples and Philox groups and a scalar tail; and gives the CPU kernel's bits."""
    feat = dict(_HIST[hist], **_NOISE[noise], cfg=cfg, u=1, flag=True)
    seed = 7 * len(hist) + len(noise) + cfg
    for shape in ((3, 37), (2, 64)):
        check(_runner(emu, 2), feat, shape, dtype, "cpu", seed=seed)
        check(_runner(emu, 2), dict(feat, clip=1 + cfg), shape, dtype, "cpu", seed=seed + 1)  # static / dynamic
    cpu = pytest.importorskip("fastdiff.backends.cpu")
    if not cpu.available()[0]:
        pytest.skip(f"cpu backend unavailable ({cpu.available()[1]}); compared with the reference only")
    pool, make_args, outputs = build(feat, (3, 37), dtype, seed, "cpu")
    on_cpu = {k: v.clone() for k, v in pool.items()}
    on_emu = {k: v.clone() for k, v in pool.items()}
    cpu.step(make_args(on_cpu))
    cb.launch(emu, make_args(on_emu), stream=0, max_blocks=2)
    for k in outputs:
        assert torch.equal(_bits(on_emu[k]), _bits(on_cpu[k])), f"{k}: emulated CUDA and cpu differ"


# Shapes that give a one-block grid (256 threads) several chunks per thread: per_sample odd and
# not a multiple of VEC (chunks straddle samples and Philox groups, a scalar tail), a single sample,
# per_sample < VEC (several samples in one chunk), and a grid stride that is not a multiple of U.
_MANY_CHUNKS = [(3, 1237), (1, 4101), (1500, 3), (2, 2053)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("noise", list(_NOISE))
@pytest.mark.parametrize("hist", list(_HIST))
@pytest.mark.parametrize("cfg", [False, True], ids=["uncond", "cfg"])
def test_chunks_in_flight_per_thread(emu, cfg, hist, noise, dtype):
    """Each specialised variant on a grid capped to 1 or 3 blocks, so that every thread takes several
    groups of U chunks (csrc/cuda_step.cu, UNROLL), the last group part-filled, then scalar-tail
    elements; the per-sample scalars are kept across a thread's chunks. In place (out = x, a history
    slot read and written), with m_c at an odd offset in the model output it shares with m (its own
    element accesses), and out of place: equal to the reference, and bit for bit to the CPU kernel
    and to the same row on the automatic grid."""
    feat = dict(_HIST[hist], **_NOISE[noise], cfg=cfg, u=2, flag=True)
    cpu = pytest.importorskip("fastdiff.backends.cpu")
    on_cpu_too = cpu.available()[0]
    for i, shape in enumerate(_MANY_CHUNKS):
        row = dict(feat, in_place=i % 2 == 0, clip=i % 3)  # clip 0 / 1 / 2: none, static, dynamic
        seed = 100 * i + 7 * len(hist) + len(noise) + cfg

        def run(args, max_blocks=1 + 2 * (i % 2)):
            if args.m_c is None:
                cb.launch(emu, args, stream=0, max_blocks=max_blocks)
                return
            mo = torch.cat([args.m.reshape(-1), args.m_c.reshape(-1)])  # the model's batched output
            n = args.m.numel()
            a = dataclasses.replace(args, m=mo[:n].view(args.m.shape), m_c=mo[n:].view(args.m.shape))
            assert (a.m_c.data_ptr() % 16 != 0) == (n * _elem(dtype) % 16 != 0)
            cb.launch(emu, a, stream=0, max_blocks=max_blocks)

        check(run, row, shape, dtype, "cpu", seed=seed)
        pool, make_args, outputs = build(row, shape, dtype, seed, "cpu")
        small, auto = ({k: v.clone() for k, v in pool.items()} for _ in range(2))
        run(make_args(small))
        run(make_args(auto), max_blocks=0)
        for k in outputs:
            assert torch.equal(_bits(small[k]), _bits(auto[k])), f"{shape}: {k} depends on the grid"
        if on_cpu_too:
            on_cpu = {k: v.clone() for k, v in pool.items()}
            cpu.step(make_args(on_cpu))
            for k in outputs:
                assert torch.equal(_bits(small[k]), _bits(on_cpu[k])), f"{shape}: {k}: emulated CUDA and cpu differ"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_the_64_bit_division_path_gives_the_same_bits(emu, emu_div64, dtype):
    """A row of numel >= 2^31 finds an element's sample by a 64-bit division instead of the 32-bit
    multiply-shift (Layout): built with FD_CUDA_EMU_DIV64 (emu_div64), the emulation takes that path on small
    tensors, and every variant kind and layout of test_chunks_in_flight_per_thread gives the bits of
    the multiply-shift build."""
    feats = [dict(cfg=True, reads=2, writes=("h1", "new"), noise="philox", u=1, flag=True, clip=2),
             dict(noise="external", in_place=True, clip=1), {}, dict(EVERYTHING, in_place=True)]
    for i, shape in enumerate(_MANY_CHUNKS):
        for j, feat in enumerate(feats):
            pool, make_args, outputs = build(feat, shape, dtype, 10 * i + j, "cpu")
            got = {k: v.clone() for k, v in pool.items()}
            want = {k: v.clone() for k, v in pool.items()}
            cb.launch(emu_div64, make_args(got), stream=0, max_blocks=1 + i % 2)
            cb.launch(emu, make_args(want), stream=0, max_blocks=1 + i % 2)
            for k in outputs:
                assert torch.equal(_bits(got[k]), _bits(want[k])), f"{shape} {feat}: {k} differs"


_ONE_UNALIGNED = {
    "specialised": (dict(cfg=True, reads=2, writes=("new",), noise="external", u=1, flag=True),
                    ["x", "out", "m", "m_c", "h0", "h1", "wr0", "z", "u"]),
    "general": (dict(EVERYTHING, noise="external", mask="external"),
                ["x", "out", "m_c", "h3", "wr1", "mask", "known", "z2"]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("kind", list(_ONE_UNALIGNED))
def test_one_unaligned_operand_falls_back_alone(emu, kind, dtype):
    """One operand one element off a 16-byte boundary (m_c = out[B:] at an odd offset, say): only
    its own accesses become element accesses (the emulation throws on a misaligned 16-byte one and
    counts the others: one per chunk fewer, exactly), and the results are bit for bit those of the
    aligned row."""
    import ctypes

    vec16 = ctypes.c_longlong.in_dll(ctypes.CDLL(emu.__file__), "fd_emu_vec16_accesses")
    feat, names = _ONE_UNALIGNED[kind]
    pool, make_args, outputs = build(feat, (3, 37), dtype, 4, "cpu")
    chunks = 3 * 37 // (16 // _elem(dtype))
    want = {k: v.clone() for k, v in pool.items()}
    before = vec16.value
    cb.launch(emu, make_args(want), stream=0, max_blocks=2)
    aligned = vec16.value - before
    for name in names:
        got = {k: v.clone() for k, v in pool.items()}
        buf = torch.empty(got[name].numel() + 1, dtype=dtype)
        got[name] = buf[1:].view(got[name].shape)
        got[name].copy_(pool[name])
        a = make_args(got)
        assert not emu.vector_path(pointers(a)) or name == "u", name
        before = vec16.value
        cb.launch(emu, a, stream=0, max_blocks=2)
        assert vec16.value - before == aligned - chunks, f"{name} moved: not the only operand off the vector path"
        for k in outputs:
            assert torch.equal(_bits(got[k]), _bits(want[k])), f"{name} moved: {k} differs from the aligned row"


def test_e_coefficient_below_float32_range_is_no_e_term(emu):
    check_tiny_e_coefficient(_runner(emu, 1), "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["in_place_everything", "e_all_reads2", "g_cfg_rescale_clip_e", "reads1_write_new"])
def test_bit_identical_to_the_cpu_kernel(emu, name, dtype):
    """The CUDA kernel's code and the CPU kernel's (same header, no FMA contraction) give the same
    bits, signs of zeros included, also where the CPU kernel takes a specialised loop."""
    cpu = pytest.importorskip("fastdiff.backends.cpu")
    if not cpu.available()[0]:
        pytest.skip(f"cpu backend unavailable ({cpu.available()[1]})")
    from ._cases import build

    pool, make_args, outputs = build(FEATURES[name], (3, 203), dtype, 11, "cpu")
    pool["x"].view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e30, -1e-30]).to(dtype)
    on_cpu = {k: v.clone() for k, v in pool.items()}
    on_emu = {k: v.clone() for k, v in pool.items()}
    cpu.step(make_args(on_cpu))
    cb.launch(emu, make_args(on_emu), stream=0, max_blocks=2)
    for k in outputs:  # out, history writes, u (its own dtype's bits) and flag
        a, b = _bits(on_emu[k]), _bits(on_cpu[k])
        assert torch.equal(a, b), f"{k}: emulated CUDA and cpu differ in {int((a != b).sum())} elements"


def test_philox_bits_bit_exact(emu):
    seeds = torch.tensor([rng._signed64(s) for s in SEEDS], dtype=torch.int64)
    for row, stream, numel in ((0, 0, 1), (2**31 + 7, 1, 67), (2**32 - 1, 0, 257)):
        groups = (numel + 3) // 4
        out = torch.empty(len(SEEDS), groups * 4, dtype=torch.int32)
        emu.bits(out.data_ptr(), seeds.data_ptr(), len(SEEDS), groups, row, stream, 0)
        assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, rng.philox_bits(seeds, row, stream, numel))


def test_normals_match_rng_and_the_cpu_kernel(emu):
    seeds = torch.tensor([rng._signed64(s) for s in SEEDS], dtype=torch.int64)
    numel = 1031
    x = torch.zeros(len(SEEDS), numel)
    out = torch.full_like(x, float("nan"))
    coef = [0.0] * N_COEF
    coef[C_OUT + OP_Z] = 1.0  # x' = z
    args = StepArgs(x=x, out=out, m=x, coef=tuple(coef), row=9, seeds=seeds)
    cb.launch(emu, args, stream=0, max_blocks=3)
    want = rng.philox_normal(seeds, 9, rng.STREAM_MAIN, numel)
    assert ((out.double() - want.double()).norm() / want.double().norm()).item() <= 1e-6
    cpu = pytest.importorskip("fastdiff.backends.cpu")
    if not cpu.available()[0]:
        pytest.skip(f"cpu backend unavailable ({cpu.available()[1]}); compared with rng only")
    out_cpu = torch.full_like(x, float("nan"))
    cpu.step(StepArgs(x=x, out=out_cpu, m=x, coef=tuple(coef), row=9, seeds=seeds))
    assert torch.equal(out, out_cpu), "the CUDA kernel's code and the CPU kernel's give different normals"


def test_binding_errors_name_the_value(emu):
    x = torch.zeros(2, 4)
    ptrs = [x.data_ptr()] * 3 + [0] * (len(PTR_NAMES) - 3)
    coef = [0.0] * N_COEF
    with pytest.raises(ValueError, match="dtype code must be 0..3, got 7"):
        emu.step(ptrs, 8, 4, 7, 0, 0, 0, 0, coef, 0)
    with pytest.raises(ValueError, match=f"coef must have {N_COEF} entries, got 29"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, [0.0] * 29, 0)  # a contract-v2 row
    with pytest.raises(TypeError):
        emu.step(ptrs[:19], 8, 4, 0, 0, 0, 0, 0, coef, 0)  # the v2 pointer list, without u and flag
    with pytest.raises(TypeError):
        emu.step(ptrs[:21], 8, 4, 0, 0, 0, 0, 0, coef, 0)  # the v3 pointer list, without the blend operands
    with pytest.raises(ValueError, match="u_copies must be 0, 1 or 2, got 3"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0, u_copies=3)
    with pytest.raises(ValueError, match=r"u is required \(u_copies > 0\)"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0, 0, 1)
    with pytest.raises(ValueError, match="max_blocks must be >= 0, got -1"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0, -1)
    with pytest.raises(ValueError, match="numel 9 is not a multiple of per_sample 4"):
        emu.step(ptrs, 9, 4, 0, 0, 0, 0, 0, coef, 0)
    with pytest.raises(ValueError, match=r"h_read\[0\] is required"):
        emu.step(ptrs, 8, 4, 0, 1, 0, 0, 0, coef, 0)
    noisy = list(coef)
    noisy[C_OUT + OP_Z] = 1.0
    with pytest.raises(ValueError, match="seeds is required"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, noisy, 0)


def test_the_extension_states_the_row_layout_of_fastdiff_args(emu):
    from fastdiff.backends.cpu import check_layout

    check_layout(emu)  # what fastdiff.backends.cuda checks when it imports the real _C_cuda
    assert emu.N_COEF == N_COEF


# --- contract v3: the next model input u and the non-finite flag ----------------------------------


def _elem(dtype):
    return torch.empty(0, dtype=dtype).element_size()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4, 16), (3, 37)], ids=str)
@pytest.mark.parametrize("shift_u", [False, True])
def test_u_alignment_is_decided_per_copy(emu, dtype, shape, shift_u):
    """Every operand aligned but u (moved one element), or u aligned but its second copy not (an odd
    numel): the others stay on the 16-byte path, each copy of u takes 16-byte stores exactly where
    it starts aligned, and every combination is right (4 x 16 and 3 x 37 cover all four)."""
    es = _elem(dtype)

    def run(args):
        u = args.u
        if shift_u:
            buf = torch.empty(u.numel() + 1, dtype=u.dtype)
            u = buf[1:].view(u.shape)
        a = dataclasses.replace(args, u=u)
        ptrs = pointers(a)
        assert emu.vector_path(ptrs)
        numel = a.x.numel()
        want = [(u.data_ptr() + k * numel * es) % 16 == 0 for k in range(a.u_copies)]
        assert emu.u_vector(ptrs, numel, cb.DTYPE_CODES[dtype], a.u_copies) == want
        assert want[0] != shift_u
        cb.launch(emu, a, stream=0, max_blocks=2)
        if shift_u:
            args.u.copy_(u)

    check(run, dict(EVERYTHING, in_place=True), shape, dtype, "cpu", seed=shape[1] + shift_u)
    check(run, FEATURES["u2_cfg_multistep"], shape, dtype, "cpu", seed=shape[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_flag_finds_one_bad_element_anywhere_and_is_never_cleared(emu, dtype):
    """One NaN / Inf in m or m_c at the first element, inside a 16-byte chunk, in the last chunk and
    in the scalar tail, with one thread doing everything and with the grid-stride loop: flag is 1.
    A finite row leaves a flag that is already 1 at 1 (the loop sets it; the kernel never clears)."""
    b, n = 3, 37  # numel 111: the last 111 % VEC elements take the scalar path
    numel = b * n
    for pos in (0, 5, numel - 9, numel - 1):
        for key, bad in (("m", float("nan")), ("m_c", float("inf")), ("m", float("-inf"))):
            for max_blocks in (1, 0):
                x = torch.randn(b, n).to(dtype)
                m, m_c = torch.randn_like(x), torch.randn_like(x)
                (m if key == "m" else m_c).view(-1)[pos] = bad
                flag = torch.zeros(1, dtype=torch.int32)
                coef = [0.0] * N_COEF
                coef[C_OUT] = 1.0
                args = StepArgs(x=x, out=torch.empty_like(x), m=m, m_c=m_c, w=torch.ones(b), coef=tuple(coef),
                                flag=flag)
                cb.launch(emu, args, stream=0, max_blocks=max_blocks)
                assert flag.item() == 1, (pos, key, bad, max_blocks)
    x = torch.randn(b, n).to(dtype)
    flag = torch.ones(1, dtype=torch.int32)
    coef = [0.0] * N_COEF
    coef[C_OUT] = 1.0
    cb.launch(emu, StepArgs(x=x, out=torch.empty_like(x), m=x.clone(), coef=tuple(coef), flag=flag), stream=0,
              max_blocks=2)
    assert flag.item() == 1
    # m_c without guidance is not read: a NaN there is not the row's model output
    flag.zero_()
    m = torch.randn_like(x)
    cb.launch(emu, StepArgs(x=x, out=torch.empty_like(x), m=m, coef=tuple(coef), flag=flag), stream=0)
    assert flag.item() == 0


# --- _C_cuda.Program: prepared rows, run(i, m, stream) --------------------------------------------


def _model_output(a):
    """m and m_c as one buffer (the model's batched output) and the offset of m_c in it, or -1."""
    if a.m_c is None:
        return a.m.clone().view(-1), -1
    return torch.cat([a.m.reshape(-1), a.m_c.reshape(-1)]), a.m.numel()


def _add(prog, a, mc_offset, placeholder, **kw):
    """Add row `a` to `prog` with m (and m_c) pointing at `placeholder`, which run() must replace."""
    ptrs = pointers(a)
    ptrs[P["m"]] = placeholder.data_ptr()
    ptrs[P["m_c"]] = placeholder.data_ptr() if a.m_c is not None else 0
    numel = a.x.numel()
    return prog.add(ptrs, numel, numel // a.x.shape[0], cb.DTYPE_CODES[a.x.dtype], len(a.h_read), len(a.h_write),
                    a.clip, a.row & 0xFFFFFFFF, list(a.coef), a.u_copies, mc_offset, **kw)


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", ["plain", "in_place_everything", "u2_cfg_multistep", "flag_nan_uncond_half",
                                  "flag_inf_cond_half", "reads4_writes_read_and_x", "g_cfg_rescale_clip_e"])
@pytest.mark.parametrize("shape", [(3, 37), (2, 64)], ids=str)
def test_program_equals_step(emu, dtype, name, shape):
    """A row added to a Program and run with the model output at m (m_c mc_offset elements on) writes
    the bits step writes with the same arguments; the placeholder m given to add() (NaN) is never read."""
    pool, make_args, outputs = build(FEATURES[name], shape, dtype, 3, "cpu")
    want = {k: v.clone() for k, v in pool.items()}
    cb.launch(emu, make_args(want), stream=0, max_blocks=2)
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    mo, mc_offset = _model_output(a)
    placeholder = torch.full_like(mo, float("nan"))
    prog = emu.Program(max_blocks=2)
    assert len(prog) == 0 and prog.max_blocks == 2
    i = _add(prog, a, mc_offset, placeholder)
    assert i == 0 and len(prog) == 1
    prog.run(i, mo.data_ptr(), 0)
    for k in outputs:
        assert torch.equal(_bits(got[k]), _bits(want[k])), f"{name}: {k} differs from step"


def test_program_runs_rows_in_turn_and_set_repoints_operands(emu):
    """Two rows (a guided one writing u twice, then a plain one writing it once); set() moves row 1's
    out, and every row's u and flag (i = -1); run() takes each row's model output as it comes."""
    torch.manual_seed(0)
    b, n = 2, 45
    x0 = torch.randn(b, n)
    m0, m1 = torch.randn(2 * b, n), torch.randn(b, n)  # row 0's model output is guided (2 halves)
    w = torch.full((b,), 3.0)

    def coef(c_x, c_d, u_scale):  # x' = c_x x + c_d d, d = x - 0.5 e; u = u_scale x'
        c = [0.0] * N_COEF
        c[C_AX], c[C_AE], c[C_OUT + OP_X], c[C_OUT + OP_D], c[C_U] = 1.0, -0.5, c_x, c_d, u_scale
        return tuple(c)

    x1, x2 = torch.full_like(x0, float("nan")), torch.full_like(x0, float("nan"))
    u_a, u_b = torch.full((2 * b, n), 7.0), torch.full((2 * b, n), float("nan"))
    flag_a, flag_b = torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    rows = [StepArgs(x=x0, out=x1, m=m0[:b], m_c=m0[b:], w=w, coef=coef(0.7, 0.2, 1.5), u=u_a, flag=flag_a),
            StepArgs(x=x1, out=x2, m=m1, coef=coef(0.9, -0.4, 0.5), u=u_a[:b], flag=flag_a)]
    prog = emu.Program()
    placeholder = torch.full((2 * b * n,), float("nan"))
    assert [_add(prog, rows[0], b * n, placeholder), _add(prog, rows[1], -1, placeholder)] == [0, 1]
    assert len(prog) == 2
    x2_moved = torch.full_like(x0, float("nan"))
    prog.set(1, P["out"], x2_moved.data_ptr())
    prog.set(-1, P["u"], u_b.data_ptr())
    prog.set(-1, P["flag"], flag_b.data_ptr())
    m1.view(-1)[11] = float("nan")
    prog.run(0, m0.data_ptr(), 0)
    prog.run(1, m1.data_ptr(), 0)

    want = []  # the same rows through the reference
    x = x0
    for a in rows:
        out, u, flag = torch.empty_like(x0), torch.empty(a.u.shape), torch.zeros(1, dtype=torch.int32)
        reference.step(dataclasses.replace(a, x=x, out=out, u=u, flag=flag))
        want.append((out, u, flag))
        x = out
    assert torch.allclose(x1, want[0][0], rtol=1e-6, atol=1e-6)
    assert torch.isnan(x2).all(), "row 1 wrote its old out after set() moved it"
    assert torch.equal(x2_moved.isnan(), want[1][0].isnan()) and x2_moved.isnan().sum() == 1
    assert torch.allclose(x2_moved.nan_to_num(0.0), want[1][0].nan_to_num(0.0), rtol=1e-6, atol=1e-6)
    assert (u_a == 7.0).all(), "u was written at its old address after set(-1, u)"
    assert torch.allclose(u_b[:b].nan_to_num(0.0), want[1][1].nan_to_num(0.0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(u_b[b:], want[0][1][b:], rtol=1e-6, atol=1e-6)  # row 1 writes one copy only
    assert [flag_a.item(), flag_b.item()] == [0, 1] and [f.item() for _, _, f in want] == [0, 1]


def test_program_errors_name_the_argument(emu):
    x = torch.zeros(2, 4)
    p = x.data_ptr()
    ptrs = [p] * 3 + [0] * (len(PTR_NAMES) - 3)
    coef = [0.0] * N_COEF
    prog = emu.Program()
    args = (ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0, -1)
    with pytest.raises(ValueError, match=r"phi must be 0 on CUDA .* got 0\.5"):
        prog.add(*args, phi=0.5)
    with pytest.raises(ValueError, match=r"ratio must be 0 on CUDA .* got 0\.9"):
        prog.add(*args, ratio=0.9)
    with pytest.raises(ValueError, match="phi must be 0"):
        prog.add(*args, phi=math.nan)
    with pytest.raises(ValueError, match="mc_offset must be >= 0 exactly when m_c is given, got 8"):
        prog.add(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 0, 8)
    with pytest.raises(ValueError, match="u_copies must be 0, 1 or 2, got 3"):
        prog.add(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 3, -1)
    with pytest.raises(ValueError, match=r"u is required \(u_copies > 0\)"):
        prog.add(ptrs, 8, 4, 0, 0, 0, 0, 0, coef, 1, -1)
    with pytest.raises(ValueError, match=f"coef must have {N_COEF} entries, got 29"):
        prog.add(ptrs, 8, 4, 0, 0, 0, 0, 0, coef[:29], 0, -1)
    with pytest.raises(ValueError, match="dtype code must be 0..3, got 9"):
        prog.add(ptrs, 8, 4, 9, 0, 0, 0, 0, coef, 0, -1)
    with pytest.raises(TypeError):
        prog.add(ptrs[:19], 8, 4, 0, 0, 0, 0, 0, coef, 0, -1)
    assert len(prog) == 0, "a refused row was added"
    assert prog.add(*args, max_value=5.0) == 0  # max_value goes with ratio, which is 0: ignored
    with pytest.raises(ValueError, match="set: which must index PTR_NAMES .* got 2"):
        prog.set(0, P["m"], p)
    with pytest.raises(ValueError, match="got 3"):
        prog.set(0, P["m_c"], p)
    with pytest.raises(ValueError, match=f"got {len(PTR_NAMES)}"):
        prog.set(0, len(PTR_NAMES), p)
    with pytest.raises(ValueError, match="set: row 1 out of range"):
        prog.set(1, P["out"], p)
    with pytest.raises(ValueError, match="set: row -2 out of range"):
        prog.set(-2, P["out"], p)
    with pytest.raises(ValueError, match=r"out is required \(always\)"):
        prog.set(-1, P["out"], 0)
    with pytest.raises(ValueError, match="run: row 1 out of range"):
        prog.run(1, p, 0)
    with pytest.raises(ValueError, match="run: row -1 out of range"):
        prog.run(-1, p, 0)
    with pytest.raises(ValueError, match="model output pointer m is null"):
        prog.run(0, 0, 0)
    with pytest.raises(ValueError, match="max_blocks must be >= 0, got -1"):
        emu.Program(max_blocks=-1)
    out = torch.full_like(x, float("nan"))
    prog.set(0, P["out"], out.data_ptr())  # the refused set(-1, out, 0) above left the row as it was
    m = torch.ones_like(x)
    prog.run(0, m.data_ptr(), 0)  # coef all 0: x' = 0
    assert (out == 0).all()


def test_runtime_info_states_the_cuda_it_was_built_with(emu):
    # the emulation's stand-ins (cuda_emu.h): a toolkit 13.0 and a driver that supports it, one device
    info = emu.runtime_info()
    assert info == dict(built=13000, runtime=13000, driver=13000, devices=1, error=0, error_name="", error_string="")
    assert cb.runtime_problem(info, emu.CUDA_ARCHS) is None
    assert emu.CUDA_ARCHS == ""  # FD_CUDA_ARCHS is defined by setup.py's build only
