"""nvcc for the CUDA kernel's compile-only tests (no GPU needed): the flags setup.py builds
``fastdiff._C_cuda`` with, and the one sm_90 compile of csrc/cuda_step.cu that both the
warnings test (test_cuda_compile.py) and the register test (test_cuda_registers.py) read, made once
per test session (``-Xptxas -v`` adds ptxas's per-kernel report; nvcc's own warnings are errors)."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None)
SETUP_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC"]
"""nvcc flags as setup.py's."""
STRICT_FLAGS = SETUP_FLAGS + ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
"""setup.py's flags with every nvcc and host-compiler warning an error."""


def command(src: str, arch: int, out_dir: str, *extra: str) -> list[str]:
    """The compile-only nvcc command of ``csrc/<src>.cu`` for ``sm_<arch>`` with :data:`STRICT_FLAGS`."""
    return [NVCC, "-c", os.path.join(CSRC, f"{src}.cu"), "-o", os.path.join(out_dir, f"{src}_sm{arch}.o"),
            f"-I{CSRC}", *STRICT_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}", *extra]


@functools.lru_cache(maxsize=None)
def step_sm90() -> tuple[list[str], int, str, int]:
    """``(command, return code, output, object size)`` of csrc/cuda_step.cu compiled for sm_90 with
    ``-Xptxas -v`` (about 25 s on two cores; once per session)."""
    out_dir = tempfile.mkdtemp(prefix="fastdiff-nvcc-")
    cmd = command("cuda_step", 90, out_dir, "-Xptxas", "-v")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    obj = os.path.join(out_dir, "cuda_step_sm90.o")
    size = os.path.getsize(obj) if os.path.exists(obj) else 0
    shutil.rmtree(out_dir, ignore_errors=True)
    return cmd, res.returncode, res.stdout + res.stderr, size


_REPORT = re.compile(r"ptxas info\s*:|\s+\d+ bytes stack frame, \d+ bytes spill stores, \d+ bytes spill loads$")


def diagnostics(out: str) -> str:
    """nvcc's output without ptxas's ``-v`` report (its ``ptxas info`` lines and their stack-frame lines):
    what is left is a diagnostic."""
    return "\n".join(ln for ln in out.splitlines() if ln.strip() and not _REPORT.match(ln))
