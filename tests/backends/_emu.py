"""The CUDA kernel's CPU emulation: csrc/cuda_step.cu (and cuda_info.cu, cuda_bindings.cpp) compiled
by the host compiler with -DFD_CUDA_EMU (csrc/cuda_emu.h), loaded as a ``_C_cuda`` module.

One build per set of extra defines, made once per session and kept on disk (``FASTDIFF_EMU_CACHE``,
else the temporary folder) under a key of the compiler, the flags, Python's version and every source
the emulation compiles, so a rerun with the same sources loads it at once; the kernel and the
bindings compile in parallel."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from types import ModuleType

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
SOURCES = ("cuda_step.cu", "cuda_info.cu", "cuda_bindings.cpp")


def _build(out_dir: str, cxx: str, defines: tuple[str, ...]) -> str:
    """The path of the emulated module built with ``-D<defines>`` under ``out_dir`` (reused when there)."""
    import pybind11

    flags = ["-O1", "-std=c++17", "-fPIC", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-DFD_CUDA_EMU",
             *(f"-D{d}" for d in defines), f"-I{CSRC}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    h = hashlib.sha256(" ".join([cxx, *flags, sys.version, *SOURCES]).encode())
    for name in sorted(os.listdir(CSRC)):  # what the emulation compiles (the CPU kernel's files aside)
        if name.endswith((".h", ".cu", ".cpp")) and not name.startswith("cpu_") and name != "bindings.cpp":
            with open(os.path.join(CSRC, name), "rb") as f:
                h.update(name.encode() + f.read())
    folder = os.path.join(out_dir, "fastdiff_cuda_emu_" + h.hexdigest()[:16])
    path = os.path.join(folder, "_C_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    objs = [os.path.join(folder, f"{os.getpid()}_{k}.o") for k in range(len(SOURCES))]
    procs = [subprocess.Popen([cxx, *flags, "-c", "-x", "c++", os.path.join(CSRC, src), "-o", obj],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src, obj in zip(SOURCES, objs)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]
    tmp = path + f".{os.getpid()}.tmp"
    res = subprocess.run([cxx, "-shared", *objs, "-o", tmp], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    os.replace(tmp, path)  # atomic: a concurrent run sees the whole file or none
    for obj in objs:
        os.remove(obj)
    return path


@functools.lru_cache(maxsize=None)
def _load(defines: tuple[str, ...]) -> ModuleType:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    path = _build(os.environ.get("FASTDIFF_EMU_CACHE", tempfile.gettempdir()), cxx, defines)
    # a package name per build: a second module loaded as plain "_C_cuda" was the first one again
    spec = importlib.util.spec_from_file_location("_".join(["emu", *defines]).lower() + "._C_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def emu_module(*defines: str) -> ModuleType:
    """The emulated ``_C_cuda`` module built with ``-D<defines>`` (skips the test where no host C++
    compiler or pybind11 is there)."""
    if (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")) is None:
        pytest.skip("no C++ compiler (g++/c++) to build the CUDA emulation")
    pytest.importorskip("pybind11", reason="pybind11 is not installed")
    return _load(tuple(defines))
