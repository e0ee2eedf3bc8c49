"""Build fastdiff and its CPU extension ``fastdiff._C`` (pybind11, raw pointers, no torch headers).

The top-level ``kernels/`` folder (Triton kernels) is installed as ``fastdiff.kernels``.
"""

from pybind11.setup_helpers import Pybind11Extension
from setuptools import find_packages, setup

CPU_SOURCES = [
    "csrc/bindings.cpp",
    "csrc/cpu_step.cpp",
    "csrc/cpu_step_scalar.cpp",
    "csrc/cpu_step_avx2.cpp",  # compiled for AVX2 by #pragma GCC target, chosen at run time
    "csrc/cpu_step_avx512.cpp",  # likewise for AVX-512F
]

# -ffp-contract=off: no FMA contraction, so every SIMD level (and the reference backend's
# operation order) gives the same bits. Never -march=native: the level is picked at run time.
CPU_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wextra"]

ext_modules = [
    Pybind11Extension(
        "fastdiff._C",
        CPU_SOURCES,
        include_dirs=["csrc"],
        depends=[f"csrc/{h}" for h in ("fd_common.h", "philox.h", "step_math.h", "cpu_step.h", "cpu_kernel.h",
                                       "cpu_vec_scalar.h", "cpu_vec_avx2.h", "cpu_vec_avx512.h")],
        extra_compile_args=CPU_FLAGS,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    ),
]

packages = find_packages(include=["fastdiff", "fastdiff.*"]) + ["fastdiff.kernels"]

setup(
    packages=packages,
    package_dir={"fastdiff": "fastdiff", "fastdiff.kernels": "kernels"},
    ext_modules=ext_modules,
)
