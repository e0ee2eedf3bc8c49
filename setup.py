"""Build fastdiff and its CPU extension ``fastdiff._C`` (pybind11, raw pointers, no torch headers).

The top-level ``kernels/`` folder (Triton kernels) is installed as ``fastdiff.kernels``.
"""

import os
import shutil
import subprocess
from multiprocessing.pool import ThreadPool

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from setuptools.modified import newer_group  # setuptools >= 69
except ImportError:  # pyproject.toml allows setuptools >= 64
    from distutils.dep_util import newer_group

# compile the sources in parallel (NPY_NUM_BUILD_JOBS=N to choose; default: all cores)
ParallelCompile("NPY_NUM_BUILD_JOBS").install()

CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu_step.cpp",
    "csrc/cpu_reduce.cpp",
]

CPU_LEVEL_SOURCE = "csrc/cpu_step_level.cpp"
CPU_LEVELS = {
    "scalar": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx2", "-mfma", "-mf16c"],
}
"""The CPU kernel's SIMD levels: CPU_LEVEL_SOURCE is compiled once per level, with -DFD_LEVEL=<level>
and the level's flags, into the entry points step_<level>, normals_<level> and bits_<level> of
csrc/cpu_step.h; csrc/cpu_step.cpp picks one at run time (FASTDIFF_CPU_SIMD, or the best the CPU
supports). Only those objects carry AVX code; the rest of the extension runs on any x86-64."""

# -ffp-contract=off: no FMA contraction, so every SIMD level (and the reference backend's
# operation order) gives the same bits. Never -march=native: the level is picked at run time.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra"]
CPU_LINK_FLAGS = ["-fopenmp"]

SANITIZE = os.environ.get("FASTDIFF_SANITIZE", "") not in ("", "0")
"""``FASTDIFF_SANITIZE=1``: build ``fastdiff._C`` with AddressSanitizer and UBSan (``make asan``, which
builds it out of place, into build/asan/, and runs the op and kernel tests against it with the ASan
runtime preloaded). -O1, as the sanitizers' documentation advises: fast enough, exact reports. The
CUDA extension is not built then."""
if SANITIZE:
    _SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
    CPU_FLAGS = ["-O1" if f == "-O3" else f for f in CPU_FLAGS] + _SAN
    CPU_LINK_FLAGS = CPU_LINK_FLAGS + _SAN

ext_modules = [
    Pybind11Extension(
        "fastdiff._C",
        CPU_SOURCES,
        include_dirs=["csrc"],
        depends=[CPU_LEVEL_SOURCE] + [f"csrc/{h}" for h in (
            "fd_common.h", "philox.h", "step_math.h", "step_params.h", "bind_args.h", "cpu_step.h", "cpu_reduce.h",
            "cpu_gram.h", "cpu_kernel.h", "cpu_vec_scalar.h", "cpu_vec_simd.h")],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=CPU_LINK_FLAGS,
        cxx_std=17,
    ),
]


def with_cpu_levels(base):
    """``base`` (a build_ext class) that also compiles CPU_LEVEL_SOURCE once per CPU_LEVELS entry, with
    fastdiff._C's own flags, and links the objects into fastdiff._C whenever that extension is rebuilt.
    The levels compile (up to NPY_NUM_BUILD_JOBS at a time) while build_ext compiles CPU_SOURCES; the
    link waits for them."""

    class BuildExtCpuLevels(base):
        def build_extension(self, ext):
            if ext.name != "fastdiff._C" or not (
                    self.force or newer_group(ext.sources + ext.depends, self.get_ext_fullpath(ext.name), "newer")):
                return super().build_extension(ext)

            def compile_level(level):
                return self.compiler.compile(
                    [CPU_LEVEL_SOURCE], output_dir=os.path.join(self.build_temp, f"level-{level}"),
                    macros=ext.define_macros + [("FD_LEVEL", level)], include_dirs=ext.include_dirs,
                    debug=self.debug, extra_postargs=ext.extra_compile_args + CPU_LEVELS[level], depends=ext.depends)

            jobs = int(os.environ.get("NPY_NUM_BUILD_JOBS", 0)) or os.cpu_count() or 1
            with ThreadPool(min(jobs, len(CPU_LEVELS))) as pool:
                levels = pool.map_async(compile_level, list(CPU_LEVELS)[::-1])  # the widest (slowest) first
                link = self.compiler.link_shared_object

                def link_with_levels(objects, *args, **kwargs):
                    return link(objects + [o for objs in levels.get() for o in objs], *args, **kwargs)

                self.compiler.link_shared_object = link_with_levels
                try:
                    super().build_extension(ext)
                finally:
                    del self.compiler.link_shared_object  # the class's method again
                    levels.wait()

    return BuildExtCpuLevels


# --- CUDA extension fastdiff._C_cuda: only where nvcc and a CUDA-enabled torch both exist ---------

CUDA_ARCHS = os.environ.get("FASTDIFF_CUDA_ARCHS", "80;90")
"""Compute capabilities to build cubins for (';'-separated); PTX of the last one is embedded too."""
# --fmad=false: no FMA contraction, like -ffp-contract=off for the CPU kernel: the CUDA kernel's
# results then equal the CPU kernel's bit for bit.
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-Xcompiler", "-fPIC"]


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [os.path.join(home, "bin", "nvcc")] if home else []
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _cuda_lib_dirs(nvcc: str) -> list[str]:
    # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc): ask it where
    # the toolkit lives, falling back to the usual places.
    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
        homes += [ln.split("=", 1)[1].strip() for ln in out.splitlines() if "TOP=" in ln]
    except OSError:
        pass
    dirs = [os.path.join(h, sub) for h in homes if h for sub in ("lib64", "targets/x86_64-linux/lib", "lib")]
    return [d for d in dirs if os.path.exists(os.path.join(d, "libcudart_static.a"))][:1]


def cuda_extension():
    """``(Pybind11Extension, build_ext class)`` for ``fastdiff._C_cuda``, or ``(None, None)``.

    The kernel (csrc/cuda_step.cu) is compiled by nvcc into an object that is linked, with the
    static CUDA runtime, into the pybind11 module built from csrc/cuda_bindings.cpp; no torch
    headers are involved. Skipped (with a message) unless nvcc and a CUDA-enabled torch exist.
    """
    nvcc = _nvcc()
    try:
        import torch

        torch_cuda = torch.version.cuda
    except ImportError:
        torch_cuda = None
    lib_dirs = _cuda_lib_dirs(nvcc) if nvcc else []
    if not nvcc or torch_cuda is None or not lib_dirs:
        print("CUDA toolkit or CUDA-enabled torch not available; skipping fastdiff._C_cuda")
        return None, None
    from setuptools.command.build_ext import build_ext

    archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    cu_sources = ["csrc/cuda_step.cu"]
    headers = [f"csrc/{h}" for h in ("fd_common.h", "philox.h", "step_math.h", "step_params.h", "cuda_step.h")]
    ext = Pybind11Extension(
        "fastdiff._C_cuda",
        ["csrc/cuda_bindings.cpp"],
        include_dirs=["csrc"],
        library_dirs=lib_dirs,
        libraries=["cudart_static", "rt", "pthread", "dl"],
        depends=cu_sources + headers + ["csrc/bind_args.h"],
        cxx_std=17,
    )

    class BuildExtCuda(build_ext):
        def build_extension(self, e):
            if e.name == "fastdiff._C_cuda":
                os.makedirs(self.build_temp, exist_ok=True)
                for src in cu_sources:
                    obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
                    newest = max(os.path.getmtime(f) for f in [src] + headers)
                    if self.force or not os.path.exists(obj) or os.path.getmtime(obj) < newest:
                        cmd = [nvcc, "-c", src, "-o", obj, "-Icsrc", *NVCC_FLAGS, *gencode]
                        print(" ".join(cmd))
                        subprocess.check_call(cmd)
                    if obj not in e.extra_objects:
                        e.extra_objects.append(obj)
            super().build_extension(e)

    return ext, BuildExtCuda


_cuda_ext, _cuda_build_ext = cuda_extension() if not SANITIZE else (None, None)
if _cuda_ext is not None:
    ext_modules.append(_cuda_ext)
cmdclass = {"build_ext": with_cpu_levels(_cuda_build_ext or build_ext)}

packages = find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"]

setup(
    packages=packages,
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    # the trained weights of fastdiff.models.zoo (safetensors + their JSON configs) ship with the package
    package_data={"fastdiff.models.zoo": ["weights/*.safetensors", "weights/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
