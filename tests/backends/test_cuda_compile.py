"""csrc/cuda_step.cu and csrc/cuda_info.cu compile warning-free with nvcc for sm_80 and sm_90 (no GPU needed).

Flags are those setup.py builds ``fastdiff._C_cuda`` with, plus warnings as errors for nvcc and
the host compiler (tests/backends/_nvcc.py). Compile only (``-c`` to an object in a temporary folder);
the four compiles run at once, cuda_step's for sm_90 being the session's one (with ptxas's register
report, which test_cuda_registers.py reads).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ._nvcc import NVCC, command, diagnostics, step_sm90


@pytest.mark.skipif(NVCC is None, reason="nvcc (CUDA toolkit) is not installed; the CUDA kernel is compiled in CI")
def test_cuda_kernel_compiles_without_warnings_for_sm80_and_sm90(tmp_path):
    procs = {}
    for src in ("cuda_step", "cuda_info"):
        for arch in (80, 90):
            if (src, arch) == ("cuda_step", 90):
                continue  # the session's one compile of it (step_sm90), which the register test reads too
            cmd = command(src, arch, str(tmp_path))
            procs[src, arch] = (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    cmd, rc, out, size = step_sm90()  # (while the others compile)
    assert rc == 0, f"cuda_step sm_90: {' '.join(cmd)}\n{out[-4000:]}"
    assert not diagnostics(out), f"cuda_step sm_90 printed diagnostics:\n{diagnostics(out)[-4000:]}"
    assert size > 0
    for (src, arch), (cmd, proc) in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{src} sm_{arch}: {' '.join(cmd)}\n{out[-4000:]}"
        assert not out.strip(), f"{src} sm_{arch} printed diagnostics:\n{out[-4000:]}"
        assert os.path.getsize(tmp_path / f"{src}_sm{arch}.o") > 0
