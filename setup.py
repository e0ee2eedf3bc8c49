"""Build fastdiff and its CPU extension ``fastdiff._C`` (pybind11, raw pointers, no torch headers).

The top-level ``kernels/`` folder (Triton kernels) is installed as ``fastdiff.kernels``.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import warnings
from multiprocessing.pool import ThreadPool

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError as DistutilsError  # DistutilsError: what compile and link errors derive from
from setuptools.errors import CCompilerError

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
    "avx512bf16": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512bf16", "-mavx2", "-mfma", "-mf16c"],
}
"""The CPU kernel's SIMD levels: CPU_LEVEL_SOURCE is compiled once per level, with -DFD_LEVEL=<level>
and the level's flags, into the entry points step_<level>, normals_<level> and bits_<level> of
csrc/cpu_step.h; csrc/cpu_step.cpp picks one at run time (FASTDIFF_CPU_SIMD, or the best the CPU
supports). Only those objects carry AVX code; the rest of the extension runs on any x86-64.
avx512bf16 is avx512 plus the instructions of AMD Zen 4 and Intel Cooper Lake / Sapphire Rapids
(AVX512_BF16's vcvtne2ps2bf16 for bf16 stores, AVX512DQ's vfpclassps to find the packets it would
round differently, AVX512BW's vpermw), chosen at run time only where the CPU has all of them."""

# -ffp-contract=off: no FMA contraction, so every SIMD level (and the reference backend's
# operation order) gives the same bits. Never -march=native: the level is picked at run time.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra"]
CPU_LINK_FLAGS = ["-fopenmp"]

SANITIZE = os.environ.get("FASTDIFF_SANITIZE", "") not in ("", "0")
"""``FASTDIFF_SANITIZE=1``: build ``fastdiff._C`` with AddressSanitizer and UBSan (``make asan``, which
builds it out of place, into build/asan/, and runs the op and kernel tests against it with the ASan
runtime preloaded). -O1, as the sanitizers' documentation advises: fast enough, exact reports. The
CUDA extension is not built then. -g1: line tables, enough for the reports' file:line frames (a
quarter less compile time than -g, whose variable records the reports do not use: 90 s against
120 s for one SIMD level here)."""
if SANITIZE:
    _SAN = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g1"]
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
CUDA_NOTE = "_C_cuda.txt"
"""Written next to the extension by every build: how fastdiff._C_cuda was built (toolkit, runtime),
or why it was not; fastdiff/backends/cuda.py quotes it when the extension does not import."""


def _nvcc_candidates() -> list[str]:
    """The nvcc executables to choose from: ``FASTDIFF_NVCC`` alone where set (a failing one is not
    replaced by another), else CUDA_HOME / CUDA_PATH, PATH, /usr/local/cuda and /usr/local/cuda-*."""
    forced = os.environ.get("FASTDIFF_NVCC")
    if forced:
        return [forced] if os.access(forced, os.X_OK) else []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cands = [os.path.join(home, "bin", "nvcc")] if home else []
    cands += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    cands += sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)  # the newest first
    out, seen = [], set()
    for c in cands:
        if c and os.access(c, os.X_OK) and os.path.realpath(c) not in seen:
            seen.add(os.path.realpath(c))
            out.append(c)
    return out


def _nvcc_version(nvcc: str) -> tuple[int, int] | None:
    """``(major, minor)`` of ``nvcc --version`` ("release 12.4"), or None where it does not say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def pick_nvcc(torch_cuda: str | None) -> tuple[str | None, tuple[int, int] | None, str]:
    """``(nvcc, its (major, minor), what was chosen and why)``: the first candidate whose CUDA major
    version is torch's (so the kernel runs wherever torch's runtime does and can link that runtime),
    else the first candidate, said so."""
    cands = _nvcc_candidates()
    if not cands:
        return None, None, "no nvcc found (FASTDIFF_NVCC, CUDA_HOME, PATH, /usr/local/cuda)"
    versions = [(c, _nvcc_version(c)) for c in cands]
    want = int(torch_cuda.split(".")[0]) if torch_cuda else None
    for c, v in versions:
        if v is not None and v[0] == want:
            return c, v, f"nvcc {c} (CUDA {v[0]}.{v[1]}, the major version of torch's CUDA {torch_cuda})"
    c, v = versions[0]
    have = ", ".join(f"{c} ({'CUDA %d.%d' % v if v else 'version unknown'})" for c, v in versions)
    return c, v, (f"no toolkit for torch's CUDA {torch_cuda} among {have}; using {c}: the extension needs a driver "
                  "for that toolkit and links its static runtime")


def torch_cudart(torch_cuda: str | None, roots: list[str] | None = None) -> str | None:
    """The shared CUDA runtime torch loads (``libcudart.so.<major>`` of the nvidia-cuda-runtime wheel:
    nvidia/cuda_runtime/lib or nvidia/cu<major>/lib, or a copy bundled in torch/lib), or None.
    ``roots`` are the folders holding ``nvidia/`` and ``torch/`` (default: sys.path)."""
    if not torch_cuda:
        return None
    major = torch_cuda.split(".")[0]
    if roots is None:
        roots = [p for p in sys.path if p and os.path.isdir(p)]
        try:
            import torch

            roots.insert(0, os.path.dirname(os.path.dirname(torch.__file__)))
        except ImportError:
            pass
    for root in roots:
        for folder in ("nvidia/cuda_runtime/lib", f"nvidia/cu{major}/lib", "torch/lib"):
            # libcudart.so.12 (CUDA 11: libcudart.so.11.0), or torch's own copy libcudart-<hash>.so.<major>[.<minor>]
            found = sorted(f for name in ("libcudart", "libcudart-*") for v in (major, f"{major}.*")
                           for f in glob.glob(os.path.join(root, folder, f"{name}.so.{v}")))
            if found:  # linked by path: the library's SONAME (what torch loaded) is what gets recorded
                return found[0]
    return None


def _cuda_lib_dirs(nvcc: str) -> list[str]:
    # nvcc may be a wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc): ask it where
    # the toolkit lives, falling back to the usual places.
    homes = [os.environ.get("CUDA_HOME", ""), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
             "/usr/local/cuda"]
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60).stderr
        homes += [ln.split("=", 1)[1].strip() for ln in out.splitlines() if "TOP=" in ln]
    except (OSError, subprocess.SubprocessError):
        pass
    dirs = [os.path.join(h, sub) for h in homes if h for sub in ("lib64", "targets/x86_64-linux/lib", "lib")]
    return [d for d in dirs if os.path.exists(os.path.join(d, "libcudart_static.a"))][:1]


def cuda_extension(torch_cuda: str | None = None, probe_torch: bool = True):
    """``(Pybind11Extension, build_ext class, note)`` for ``fastdiff._C_cuda``, or ``(None, None, note)``.

    The kernel (csrc/cuda_step.cu, csrc/cuda_info.cu) is compiled by nvcc (:func:`pick_nvcc`: a toolkit of
    torch's CUDA major version where there is one) into objects linked into the pybind11 module built from
    csrc/cuda_bindings.cpp; no torch headers are involved. The CUDA runtime linked is torch's own shared
    one (:func:`torch_cudart`) where the toolkit's major version is torch's, so one runtime serves both
    and the extension needs no newer driver than torch; else the toolkit's static runtime. Skipped
    unless nvcc and a CUDA-enabled torch exist (``torch_cuda``: torch.version.cuda, read from torch when
    ``probe_torch``). An nvcc or link failure skips the extension with a warning, not the build.
    """
    if probe_torch:
        try:
            import torch

            torch_cuda = torch.version.cuda
        except ImportError:
            torch_cuda = None
    if torch_cuda is None:
        return None, None, "not built: torch has no CUDA (torch.version.cuda is None) or is not installed"
    nvcc, version, chosen = pick_nvcc(torch_cuda)
    if nvcc is None:
        return None, None, f"not built: {chosen}"
    cudart = torch_cudart(torch_cuda) if version is not None and str(version[0]) == torch_cuda.split(".")[0] else None
    lib_dirs = [] if cudart else _cuda_lib_dirs(nvcc)
    if not cudart and not lib_dirs:
        return None, None, f"not built: {chosen}, but neither torch's libcudart nor the toolkit's libcudart_static.a found"
    if cudart:
        runtime = f"torch's CUDA runtime {cudart}"
        link = dict(libraries=["rt", "pthread", "dl"],
                    extra_link_args=[cudart, f"-Wl,-rpath,{os.path.dirname(cudart)}"])
    else:
        runtime = f"the static CUDA runtime of {lib_dirs[0]}"
        link = dict(library_dirs=lib_dirs, libraries=["cudart_static", "rt", "pthread", "dl"])
    note = f"built with {chosen}; linked with {runtime}; cubins for sm {CUDA_ARCHS}"
    print(f"fastdiff._C_cuda: {note}")
    from setuptools.command.build_ext import build_ext

    archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    cu_sources = ["csrc/cuda_step.cu", "csrc/cuda_info.cu"]
    headers = [f"csrc/{h}" for h in ("fd_common.h", "philox.h", "step_math.h", "step_params.h", "cuda_step.h",
                                     "cuda_info.h")]
    ext = Pybind11Extension(
        "fastdiff._C_cuda",
        ["csrc/cuda_bindings.cpp"],
        include_dirs=["csrc"],
        define_macros=[("FD_CUDA_ARCHS", '"' + ";".join(archs) + '"')],
        depends=cu_sources + headers + ["csrc/bind_args.h"],
        cxx_std=17,
        **link,
    )

    class BuildExtCuda(build_ext):
        def build_extension(self, e):
            if e.name != "fastdiff._C_cuda":
                return super().build_extension(e)
            target = self.get_ext_fullpath(e.name)
            try:
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
            except (subprocess.CalledProcessError, OSError, CCompilerError, DistutilsError) as exc:
                # the CPU extension and the package stay usable: build on without fastdiff._C_cuda
                why = f"not built: {type(exc).__name__}: {exc} ({chosen}; {runtime})"
                warnings.warn(f"fastdiff._C_cuda {why}; the cuda backend will be unavailable "
                              "(`fastdiff info` says why)", stacklevel=1)
                print(f"WARNING: fastdiff._C_cuda {why}", file=sys.stderr)
                if os.path.exists(target):  # an older build must not be imported as if it were this one
                    os.remove(target)
                _write_note(target, why)
            else:
                _write_note(target, note)

    return ext, BuildExtCuda, note


def _write_note(ext_path: str, text: str) -> None:
    """CUDA_NOTE next to the extension's file: what fastdiff/backends/cuda.py quotes."""
    os.makedirs(os.path.dirname(ext_path) or ".", exist_ok=True)
    with open(os.path.join(os.path.dirname(ext_path), CUDA_NOTE), "w") as f:
        f.write(text + "\n")


def with_cuda_note(base, note: str):
    """``base`` that writes ``note`` (why fastdiff._C_cuda is not built) next to fastdiff._C."""

    class BuildExtNote(base):
        def run(self):
            super().run()
            if not self.dry_run:
                _write_note(self.get_ext_fullpath("fastdiff._C"), note)

    return BuildExtNote


_cuda_ext, _cuda_build_ext, _cuda_note = (
    cuda_extension() if not SANITIZE else (None, None, "not built: FASTDIFF_SANITIZE builds the CPU extension alone"))
if _cuda_ext is not None:
    ext_modules.append(_cuda_ext)
else:
    print(f"fastdiff._C_cuda {_cuda_note}")
cmdclass = {"build_ext": with_cpu_levels(_cuda_build_ext or with_cuda_note(build_ext, _cuda_note))}

packages = find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"]

setup(
    packages=packages,
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    # the trained weights of fastdiff.models.zoo (safetensors + their JSON configs) ship with the package
    package_data={"fastdiff.models.zoo": ["weights/*.safetensors", "weights/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
