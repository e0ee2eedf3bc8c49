"""csrc/cuda_step.cu and csrc/cuda_info.cu compile warning-free with nvcc for sm_80 and sm_90 (no GPU needed).

Flags are those setup.py builds ``fastdiff._C_cuda`` with, plus warnings as errors for nvcc and
the host compiler. Compile only (``-c`` to an object in a temporary folder); both architectures
are compiled at once, in parallel.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)
FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC",  # as setup.py
         "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed; the CUDA kernel is compiled in CI")
def test_cuda_kernel_compiles_without_warnings_for_sm80_and_sm90(tmp_path):
    procs = {}
    for src in ("cuda_step", "cuda_info"):
        for arch in (80, 90):
            cmd = [NVCC, "-c", os.path.join(CSRC, f"{src}.cu"), "-o", str(tmp_path / f"{src}_sm{arch}.o"),
                   f"-I{CSRC}", *FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]
            procs[src, arch] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for (src, arch), (cmd, proc) in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{src} sm_{arch}: {' '.join(cmd)}\n{out[-4000:]}"
        assert not out.strip(), f"{src} sm_{arch} printed diagnostics:\n{out[-4000:]}"
        assert (tmp_path / f"{src}_sm{arch}.o").stat().st_size > 0
