"""The CUDA kernel's own indexing, run on the CPU: csrc/cuda_step.cu compiled as C++ with
csrc/cuda_emu.h (every block and thread run in turn), bound by csrc/cuda_bindings.cpp, driven by
fastdiff/backends/cuda.py's pointer marshalling, compared with ``reference``.

The grid is capped to a few blocks so the grid-stride loop wraps; sizes are odd so that chunks
straddle samples and Philox groups and the scalar tail is exercised; offset views force the
unaligned (all-scalar) path. The GPU itself is exercised by tests/backends/test_gpu.py.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

from fastdiff import rng
from fastdiff.args import C_OUT, N_COEF, StepArgs
from fastdiff.backends import cuda as cb
from fastdiff.plan import OP_Z

from ._cases import EVERYTHING, FEATURES, SEEDS, check, check_tiny_e_coefficient, run_unaligned

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated ``_C_cuda`` module, built with the host compiler."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++/c++) to build the CUDA emulation")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    out = tmp_path_factory.mktemp("cuda_emu") / ("_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [cxx, "-O1", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror",
           "-DFD_CUDA_EMU", f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           "-x", "c++", os.path.join(CSRC, "cuda_step.cu"), "-x", "none", os.path.join(CSRC, "cuda_bindings.cpp"),
           "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    spec = importlib.util.spec_from_file_location("_C_cuda", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    ptrs = [x.data_ptr()] * 3 + [0] * 16
    assert not emu.vector_path(ptrs)
    assert emu.vector_path([torch.empty(4).data_ptr()] + [0] * 18)
    # g is read element by element, so its alignment alone does not force the scalar path
    assert emu.vector_path([torch.empty(4).data_ptr()] + [0] * 17 + [x.data_ptr()])

    def run(args):  # every element tensor moved 1 element past a 16-byte boundary
        run_unaligned(args, lambda a: cb.launch(emu, a, stream=0, max_blocks=2), emu.vector_path)

    check(run, EVERYTHING, (3, 37), dtype, "cpu", seed=5)


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
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[pool["x"].element_size()]
    for k in outputs:
        a, b = on_emu[k].view(bits), on_cpu[k].view(bits)
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
    ptrs = [x.data_ptr()] * 3 + [0] * 16
    coef = [0.0] * N_COEF
    with pytest.raises(ValueError, match="dtype code must be 0..3, got 7"):
        emu.step(ptrs, 8, 4, 7, 0, 0, 0, 0, coef, 0)
    with pytest.raises(ValueError, match="coef must have 29 entries, got 25"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, [0.0] * 25, 0)  # a contract-v1 row
    with pytest.raises(TypeError):
        emu.step(ptrs[:18], 8, 4, 0, 0, 0, 0, 0, coef, 0)  # the v1 pointer list, without g
    with pytest.raises(ValueError, match="numel 9 is not a multiple of per_sample 4"):
        emu.step(ptrs, 9, 4, 0, 0, 0, 0, 0, coef, 0)
    with pytest.raises(ValueError, match=r"h_read\[0\] is required"):
        emu.step(ptrs, 8, 4, 0, 1, 0, 0, 0, coef, 0)
    noisy = list(coef)
    noisy[C_OUT + OP_Z] = 1.0
    with pytest.raises(ValueError, match="seeds is required"):
        emu.step(ptrs, 8, 4, 0, 0, 0, 0, 0, noisy, 0)
