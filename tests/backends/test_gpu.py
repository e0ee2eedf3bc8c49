"""GPU backends on CUDA tensors: ``triton`` and ``cuda`` equal ``reference`` across dtypes and odd
shapes; the Philox stream is the same on cpu, triton and cuda; contract v3 (the model input u and
the non-finite flag) and ``_C_cuda.Program`` on the device. Skipped without a GPU.

Triton compiles each variant once with a fixed configuration per size class (the default, and
``FASTDIFF_TRITON_AUTOTUNE=0``: what benchmarks/gpu_check.py sets, to keep a GPU session short);
one test below opts into the autotuner, whose trial runs must restore in-place outputs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastdiff.runtime import ops
from fastdiff.core import rng
from fastdiff.core.args import C_KNOWN_S, C_OUT, N_COEF, StepArgs, pack_row, pointers
from fastdiff.backends import cuda as cb
from fastdiff.backends import reference
from fastdiff.backends import triton as tb
from fastdiff.core.plan import Row, combo

from ._cases import EVERYTHING, FEATURES, SEEDS, build, check, check_tiny_e_coefficient, run_unaligned
from .test_cuda_emu import P, _add, _bits, _model_output

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU tests need one")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NOISE_ONLY = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.0, a_e=0.0, out=combo(z=1.0), noise=True))  # x' = z


def _backend(name):
    mod = {"triton": tb, "cuda": cb}[name]
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"{name} backend unavailable: {why}")
    if name == "triton" and tb.kernels().INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the Triton kernels are interpreted, not compiled for the GPU")

    def run(args):
        assert mod.supports(args), f"{name} refused a valid step"
        ops.step(args, backend=name)
    return run


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 17, 257, 4099, 3 * 4096 + 5])
def test_odd_shapes_and_dtypes(backend, numel, dtype):
    run = _backend(backend)
    for batch, in_place in ((1, False), (5, True)):
        check(run, dict(EVERYTHING, in_place=in_place), (batch, numel), dtype, "cuda", seed=numel + batch)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(FEATURES))
def test_every_feature_fp16(backend, name):
    check(_backend(backend), FEATURES[name], (3, 5, 7, 9), torch.float16, "cuda", seed=len(name))


def test_cuda_grid_stride_and_unaligned_on_the_device():
    _backend("cuda")

    def capped(args):
        cb.launch(cb._C_cuda, args, torch.cuda.current_stream().cuda_stream, max_blocks=2)
        torch.cuda.synchronize()
    check(capped, dict(EVERYTHING, in_place=True), (3, 10007), torch.float16, "cuda", seed=1)

    def unaligned(args):  # every element tensor moved 1 element past a 16-byte boundary
        run_unaligned(args, cb.step, cb._C_cuda.vector_path)
    check(unaligned, EVERYTHING, (3, 1001), torch.float32, "cuda", seed=2)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_e_coefficient_below_float32_range_is_no_e_term(backend):
    check_tiny_e_coefficient(_backend(backend), "cuda")


def test_triton_autotuner_restores_in_place_outputs(monkeypatch):
    run = _backend("triton")
    monkeypatch.setenv("FASTDIFF_TRITON_AUTOTUNE", "1")
    check(run, FEATURES["in_place_everything"], (2, 3 * 4096 + 7), torch.float32, "cuda", seed=4)


def test_cuda_on_a_side_stream_and_in_a_graph():
    _backend("cuda")
    x = torch.randn(4, 3, 33, device="cuda")
    m = torch.randn_like(x)
    coef = pack_row(Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.3, a_e=-1.1, out=combo(x=0.9, d=0.2, e=0.1, z=0.5),
                        noise=True))
    seeds = torch.arange(4, device="cuda", dtype=torch.int64)
    want = torch.empty_like(x)
    reference.step(StepArgs(x=x, out=want, m=m, coef=coef, row=3, seeds=seeds))
    side = torch.cuda.Stream()
    out = torch.full_like(x, float("nan"))
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cb.step(StepArgs(x=x, out=out, m=m, coef=coef, row=3, seeds=seeds))
    torch.cuda.current_stream().wait_stream(side)
    assert ((out - want).norm() / want.norm()).item() <= 1e-6
    g = torch.cuda.CUDAGraph()
    out2 = torch.full_like(x, float("nan"))
    with torch.cuda.graph(g):
        cb.step(StepArgs(x=x, out=out2, m=m, coef=coef, row=3, seeds=seeds))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out2, out)


def test_cuda_refuses_what_it_cannot_read():
    _backend("cuda")
    x = torch.randn(2, 8, device="cuda")
    coef = (1.0,) + (0.0,) * (N_COEF - 1)
    assert not cb.supports(StepArgs(x=x.cpu(), out=x.cpu(), m=x.cpu(), coef=coef))
    assert not cb.supports(StepArgs(x=x, out=torch.empty_like(x), m=torch.randn(8, 2, device="cuda").t(), coef=coef))
    flat = torch.randn(17, device="cuda")
    assert not cb.supports(StepArgs(x=flat[:16].view(2, 8), out=flat[1:].view(2, 8), m=x, coef=coef))
    assert cb.supports(StepArgs(x=x, out=x, m=x, coef=coef))


# --- one noise stream on every device -------------------------------------------------------------


def _seeds(device):
    return torch.tensor([rng._signed64(s) for s in SEEDS], dtype=torch.int64, device=device)


@pytest.mark.parametrize("row,stream,numel", [(0, 0, 1), (2**31 + 7, 1, 67), (2**32 - 1, 0, 4099)])
def test_philox_words_equal_on_cpu_triton_and_cuda(row, stream, numel):
    want = rng.philox_bits(_seeds("cpu"), row, stream, numel)
    got = {}
    if cb.available()[0]:
        got["cuda"] = cb.philox_words(_seeds("cuda"), row, stream, numel).cpu()
    if tb.available()[0] and not tb.kernels().INTERPRETED:
        got["triton"] = tb.kernels().philox_words(_seeds("cuda"), row, stream, numel).cpu()
    try:
        from fastdiff import _C
    except ImportError:
        _C = None
    if _C is not None:
        groups = (numel + 3) // 4
        out = torch.empty(len(SEEDS), groups * 4, dtype=torch.int32)
        seeds = _seeds("cpu")  # keep it alive while the kernel reads it
        _C.philox_bits(out.data_ptr(), seeds.data_ptr(), len(SEEDS), 0, groups, row, stream)
        got["cpu"] = out.to(torch.int64) & 0xFFFFFFFF
    if not got:
        pytest.skip("no GPU backend is available")
    for name, words in got.items():
        assert torch.equal(words, want), f"{name}: Philox words differ from fastdiff.core.rng"


def _noise(run, device, numel=4099, row=5):
    seeds = _seeds(device)
    x = torch.zeros(len(SEEDS), numel, device=device)
    out = torch.full_like(x, float("nan"))
    run(StepArgs(x=x, out=out, m=x, coef=NOISE_ONLY, row=row, seeds=seeds))
    return out.cpu()


def test_normals_agree_across_backends_and_cuda_equals_cpu_bitwise():
    """cuda draws fastdiff.core.rng's normals bit for bit (the Cephes code of csrc/philox.h that rng
    reproduces in torch); triton's libdevice normals are within rng.TRITON_NORMAL_TOL."""
    want = rng.philox_normal(_seeds("cpu"), 5, rng.STREAM_MAIN, 4099)
    got = {}
    if cb.available()[0]:
        got["cuda"] = _noise(cb.step, "cuda")
    if tb.available()[0] and not tb.kernels().INTERPRETED:
        got["triton"] = _noise(tb.step, "cuda")
    if not got:
        pytest.skip("no GPU backend is available")
    if "cuda" in got:
        assert torch.equal(got["cuda"], want), f"cuda: {int((got['cuda'] != want).sum())} normals differ from rng"
    if "triton" in got:
        err = ((got["triton"] - want).abs() / want.abs().clamp_min(1.0)).max().item()
        assert err <= rng.TRITON_NORMAL_TOL, f"triton: normals differ from fastdiff.core.rng by {err:.3g} (scaled)"
    from fastdiff.backends import cpu

    if "cuda" in got and cpu.available()[0]:
        assert torch.equal(got["cuda"], _noise(cpu.step, "cpu")), "cuda and cpu kernels give different normals"


def test_reference_draws_the_same_bits_on_the_gpu():
    """fastdiff.core.rng on CUDA tensors (what the reference backend runs there) equals it on the CPU."""
    seeds = _seeds("cpu")
    for row, stream, numel in ((5, 0, 4099), (2**32 - 1, 1, 1 << 16)):
        want = rng.philox_normal(seeds, row, stream, numel)
        got = rng.philox_normal(seeds.cuda(), row, stream, numel, "cuda").cpu()
        assert torch.equal(got, want), f"row {row}: {int((got != want).sum())} normals differ on the GPU"


def test_triton_normals_within_the_stated_bound():
    """The size of triton's noise differences, on 18.9M normals (README, "Reproducibility"): measured
    against rng (on the GPU; bit-identical to the CPU's, test above) and against the cuda kernel."""
    _backend("triton")
    seeds = _seeds("cuda")
    numel = 1 << 20
    worst, differ, total = 0.0, 0, 0
    known_noise = list(NOISE_ONLY)
    known_noise[C_KNOWN_S] = 1.0  # with mask = 0 everywhere: x' = z2, the known-region stream
    for row, stream in ((3, 0), (2**32 - 1, 1)):
        x = torch.zeros(len(SEEDS), numel, device="cuda")

        def args(out):
            if stream == 0:
                return StepArgs(x=x, out=out, m=x, coef=NOISE_ONLY, row=row, seeds=seeds)
            return StepArgs(x=x, out=out, m=x, coef=tuple(known_noise), row=row, seeds=seeds,
                            mask=torch.zeros_like(x), known=x)

        z = torch.full_like(x, float("nan"))
        tb.step(args(z))
        want = rng.philox_normal(seeds, row, stream, numel, "cuda")
        d = (z - want).abs()
        worst = max(worst, (d / want.abs().clamp_min(1.0)).max().item())
        differ += int((z != want).sum())
        total += z.numel()
        print(f"triton vs reference, row {row} stream {stream}: max |diff| {d.max().item():.3g}, "
              f"{(z != want).float().mean().item():.1%} of {z.numel()} differ")
        if cb.available()[0]:
            zc = torch.full_like(x, float("nan"))
            cb.step(args(zc))
            assert torch.equal(zc, want), "cuda differs from rng on the GPU"
    print(f"triton: max |diff| / max(|z|, 1) = {worst / 2**-23:.2f} * 2**-23; {differ / total:.1%} differ")
    assert worst <= rng.TRITON_NORMAL_TOL
    assert differ < 0.25 * total


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde", "ddpm", "sde_vp"])
def test_triton_samples_close_to_reference(sampler):
    """Whole stochastic samples on the GPU: cuda equals reference bit for bit; triton differs by its
    noise (above) and its FMA contraction of the step (Triton's default), measured and bounded."""
    import fastdiff

    def model(x, t):
        return 0.5 * x / (1.0 + x * x) + 0.05 * x

    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0)).cuda()
    ref = fastdiff.sample(model, noise, sampler=sampler, steps=10, seed=1234, backend="reference")
    if cb.available()[0]:
        got = fastdiff.sample(model, noise, sampler=sampler, steps=10, seed=1234, backend="cuda")
        assert torch.equal(got, ref), f"{sampler}: cuda and reference differ by {(got - ref).abs().max().item():.3g}"
    if tb.available()[0] and not tb.kernels().INTERPRETED:
        got = fastdiff.sample(model, noise, sampler=sampler, steps=10, seed=1234, backend="triton")
        rel = ((got - ref).norm() / ref.norm()).item()
        print(f"{sampler}: triton vs reference max |diff| {(got - ref).abs().max().item():.3g}, relative {rel:.3g}, "
              f"{(got != ref).float().mean().item():.1%} differ")
        assert rel <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_step_equals_cpu_step_bitwise(dtype):
    """Same header, no FMA contraction on either side: the whole step agrees bit for bit."""
    _backend("cuda")
    from fastdiff.backends import cpu

    if not cpu.available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu.available()[1]}")
    from ._cases import build

    pool, make_args, outputs = build(dict(EVERYTHING, in_place=True), (3, 1031), dtype, 9, "cpu")
    on_cpu = {k: v.clone() for k, v in pool.items()}
    on_gpu = {k: v.cuda() for k, v in pool.items()}
    cpu.step(make_args(on_cpu))
    a = make_args(on_gpu)
    a.w, a.r, a.s, a.seeds = (t.cuda() for t in (a.w, a.r, a.s, a.seeds))
    cb.step(a)
    bits = {2: torch.int16, 4: torch.int32}[pool["x"].element_size()]  # signs of zeros too
    for k in outputs:
        assert torch.equal(on_gpu[k].cpu().view(bits), on_cpu[k].view(bits)), f"{k}: cuda and cpu differ"


# --- contract v3 and the prepared program on the device ------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_u_copies_take_16_byte_stores_where_each_is_aligned(dtype):
    """u moved one element (the other operands aligned), or u aligned with an odd numel (its second
    copy not): the vector path stays on, each copy is stored as its alignment allows (a 16-byte
    store at a misaligned address would fault), and the results equal reference."""
    _backend("cuda")
    mod = cb._C_cuda
    es = torch.empty(0, dtype=dtype).element_size()
    for shape in ((4, 16), (3, 37), (2, 4099)):
        for shift_u in (False, True):
            def run(args):
                u = args.u
                if shift_u:
                    u = torch.empty(u.numel() + 1, dtype=u.dtype, device=u.device)[1:].view(u.shape)
                a = dataclasses.replace(args, u=u)
                ptrs = pointers(a)
                numel = a.x.numel()
                assert mod.vector_path(ptrs)
                want = [(u.data_ptr() + k * numel * es) % 16 == 0 for k in range(a.u_copies)]
                assert mod.u_vector(ptrs, numel, cb.DTYPE_CODES[dtype], a.u_copies) == want
                assert cb.supports(a)
                cb.step(a)
                if shift_u:
                    args.u.copy_(u)
            check(run, dict(EVERYTHING, in_place=True), shape, dtype, "cuda", seed=shape[1] + shift_u)
            check(run, FEATURES["u2_cfg_multistep"], shape, dtype, "cuda", seed=shape[1])
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cuda_flag_is_set_without_a_host_sync_and_never_cleared(dtype):
    """One NaN / Inf anywhere in m or m_c (first element, a 16-byte chunk, the scalar tail) sets the
    flag in the same stream order as the step, also inside a CUDA graph; a finite row leaves 1."""
    _backend("cuda")
    b, n = 3, 10007
    coef = [0.0] * N_COEF
    coef[C_OUT] = 1.0
    x = torch.randn(b, n, device="cuda").to(dtype)
    m, m_c = torch.randn_like(x), torch.randn_like(x)
    w = torch.ones(b, device="cuda")
    flag = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(x)
    args = StepArgs(x=x, out=out, m=m, m_c=m_c, w=w, coef=tuple(coef), flag=flag)
    for pos in (0, 4099, b * n - 1):
        for t, bad in ((m, float("nan")), (m_c, float("inf")), (m, float("-inf"))):
            flag.zero_()
            t.view(-1)[pos] = bad
            cb.step(args)
            t.view(-1)[pos] = 0.0
            assert flag.item() == 1, (pos, bad)
    cb.step(args)  # finite: the 1 stays
    assert flag.item() == 1
    flag.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        cb.step(args)
    g.replay()
    assert flag.item() == 0
    m.view(-1)[77] = float("nan")
    g.replay()
    assert flag.item() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["in_place_everything", "u2_cfg_multistep", "flag_nan_uncond_half", "u1",
                                  "reads4_writes_read_and_x"])
def test_cuda_program_equals_step(dtype, name):
    """A Program row run with the model output at m (m_c mc_offset elements on) writes what step
    writes, bit for bit; the NaN placeholder given to add() is never read."""
    _backend("cuda")
    pool, make_args, outputs = build(FEATURES[name], (3, 4099), dtype, 3, "cuda")
    want = {k: v.clone() for k, v in pool.items()}
    cb.step(make_args(want))
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    mo, mc_offset = _model_output(a)
    placeholder = torch.full_like(mo, float("nan"))
    prog = cb._C_cuda.Program()
    i = _add(prog, a, mc_offset, placeholder)
    prog.run(i, mo.data_ptr(), torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    for k in outputs:
        assert torch.equal(_bits(got[k]), _bits(want[k])), f"{name}: {k} differs from step"


def test_cuda_program_on_a_side_stream_in_a_graph_and_with_set():
    """Program.run launches on the stream it is given (a side stream, a graph capture: no host sync),
    set() re-points an operand; phi / ratio are refused by name (the reductions stay in torch)."""
    _backend("cuda")
    pool, make_args, outputs = build(FEATURES["u2_ancestral"], (2, 3 * 4096 + 5), torch.float16, 5, "cuda")
    want = {k: v.clone() for k, v in pool.items()}
    cb.step(make_args(want))
    torch.cuda.synchronize()
    got = {k: v.clone() for k, v in pool.items()}
    a = make_args(got)
    mo, mc_offset = _model_output(a)
    placeholder = torch.full_like(mo, float("nan"))
    prog = cb._C_cuda.Program(max_blocks=3)
    with pytest.raises(ValueError, match="phi must be 0"):
        _add(prog, a, mc_offset, placeholder, phi=0.7)
    with pytest.raises(ValueError, match="ratio must be 0"):
        _add(prog, a, mc_offset, placeholder, ratio=0.995)
    i = _add(prog, a, mc_offset, placeholder)
    u_moved = torch.full_like(got["u"], float("nan"))
    prog.set(i, P["u"], u_moved.data_ptr())
    x0 = got["x"].clone()  # the row is in place: rerun it from x0
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        prog.run(i, mo.data_ptr(), side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.isnan(got["u"]).all(), "u written at its old address after set()"
    assert torch.equal(_bits(u_moved), _bits(want["u"])) and torch.equal(_bits(got["x"]), _bits(want["x"]))
    g = torch.cuda.CUDAGraph()
    got["x"].copy_(x0)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        prog.run(i, mo.data_ptr(), torch.cuda.current_stream().cuda_stream)
    got["x"].copy_(x0)
    u_moved.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(_bits(u_moved), _bits(want["u"])) and torch.equal(_bits(got["x"]), _bits(want["x"]))
    assert got["flag"].item() == 0
