"""The ``cuda`` backend: the CUDA C++ kernel of ``fastdiff._C_cuda`` (csrc/cuda_step.cu).

One pass over memory per row, noise generated in the kernel with the same Philox/Box–Muller code as
the ``cpu`` backend (bit-identical results), launched on the caller's current stream (so it can be
captured in a CUDA graph).

The kernel is compiled in variants specialised on the row's shape of work, and each launch picks
the smallest that covers the row (``dispatch()`` in csrc/cuda_step.cu, documented at its top):
guided or not, no history or up to 2 reads and 2 writes, no noise / Philox / external ``z`` (clip,
``u`` and the flag at run time) -- 12 variants per storage type, each at most 64 registers (fp64: 96) with no spill on sm_90, so that an
SM keeps at least half its threads resident (tests/backends/test_cuda_registers.py) -- and, for
everything else (rescale, mask, gradient, more history, blend rows), a general variant whose
flags are run-time values. The coefficients are rounded and the flags decided on the host and
passed as kernel parameters; the grid is the occupancy API's resident blocks. Each operand takes
16-byte accesses where it is 16-byte aligned and element accesses where it is not, operand by
operand (``_C_cuda.vector_path`` says whether all of them do). Takes contiguous
CUDA tensors in float32, float64, float16 or bfloat16 that are identical to or disjoint from one
another; anything else is reported unsupported, never read wrongly. ``_C_cuda`` is built by
``pip install -e .`` only where ``nvcc`` and a CUDA-enabled torch exist.
"""

from __future__ import annotations

import os
import re
from types import ModuleType

import torch

from ..core.args import (DTYPE_CODES, StepArgs, element_tensors, kernel_args, per_sample_tensors,  # noqa: F401
                         pointers, unsafe_overlap)
from .cpu import check_layout

NAME = "cuda"

try:
    from .. import _C_cuda

    check_layout(_C_cuda)
except Exception as _exc:  # not built here (no nvcc or CPU-only torch), stale, or a broken build
    _C_cuda = None
    _import_error: Exception | None = _exc
else:
    _import_error = None

BUILD_NOTE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "_C_cuda.txt")
"""What setup.py wrote about ``fastdiff._C_cuda``: the toolkit and runtime it was built with, or why not."""

_runtime: tuple[bool, str] | None = None  # available()'s runtime verdict, asked of the extension once


def build_note() -> str:
    """setup.py's note on the extension's build (:data:`BUILD_NOTE`), or ``""`` where there is none."""
    try:
        with open(BUILD_NOTE) as f:
            return f.read().strip()
    except OSError:
        return ""


def cuda_version(v: int) -> str:
    """A CUDA version number (``1000 * major + 10 * minor``, as CUDART_VERSION) as ``"major.minor"``."""
    return f"{v // 1000}.{v % 1000 // 10}"


def _cubin_for(archs: str, capability: tuple[int, int] | None) -> bool:
    """Whether one of the cubins built (``archs``: "80;90") runs on a GPU of compute ``capability``:
    sm_XY code runs on X.Z for Z >= Y ("90a"-style targets only on X.Y itself)."""
    if capability is None:
        return False
    for a in archs.split(";"):
        m = re.fullmatch(r"(\d+)(a?)", a.strip())
        if m:
            major, minor = divmod(int(m.group(1)), 10)
            if major == capability[0] and (minor == capability[1] if m.group(2) else minor <= capability[1]):
                return True
    return False


def runtime_problem(info: dict, archs: str = "", capability: tuple[int, int] | None = None) -> str | None:
    """Why the extension cannot run here, in words, or ``None`` when it can.

    ``info`` is ``_C_cuda.runtime_info()`` (``built``: the toolkit's CUDART_VERSION, ``driver``:
    cudaDriverGetVersion, ``devices``, ``error``/``error_name``/``error_string``: cudaGetDeviceCount's).
    A driver for an older CUDA major version than the toolkit's cannot load the kernels; an older minor
    version of the same major can, by CUDA's minor-version compatibility, but only where a cubin for the
    GPU's ``capability`` was built (``archs``): the embedded PTX would need a newer driver's JIT.
    """
    built, driver = int(info.get("built", 0)), int(info.get("driver", 0))
    err = int(info.get("error", 0))
    init = f"{info.get('error_name') or 'error'} ({err}): {info.get('error_string') or 'no description'}"
    if driver <= 0:
        return "no CUDA driver is installed (cudaDriverGetVersion gave 0)" + (f"; cudaGetDeviceCount: {init}" if err else "")
    if driver < built and (driver // 1000 < built // 1000 or not _cubin_for(archs, capability)):
        why = (f"the driver supports CUDA {cuda_version(driver)} but fastdiff._C_cuda was built with CUDA "
               f"{cuda_version(built)}")
        if driver // 1000 == built // 1000:
            gpu = f"sm_{capability[0]}{capability[1]}" if capability else "this GPU"
            why += f" and has no cubin for {gpu} (built for sm {archs or '?'}; its PTX needs a newer driver)"
        return why + ("; update the driver, or rebuild with an older toolkit (FASTDIFF_NVCC=/path/to/nvcc "
                      "pip install -e .)")
    if err:
        return f"the CUDA runtime failed to initialise: {init}"
    if int(info.get("devices", 0)) < 1:
        return "the CUDA runtime sees no device"
    return None


def _check_runtime(module) -> tuple[bool, str]:
    """``(ok, details or why)`` for ``module`` (``_C_cuda``) on this machine's driver and devices."""
    try:
        info = dict(module.runtime_info())
    except Exception as exc:  # an extension built before runtime_info existed, or a broken runtime
        return False, f"fastdiff._C_cuda cannot report its CUDA runtime ({type(exc).__name__}: {exc}); rebuild it"
    archs = str(getattr(module, "CUDA_ARCHS", ""))
    capability = None
    if info.get("driver", 0) < info.get("built", 0) and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()  # (only asked where it decides)
    problem = runtime_problem(info, archs, capability)
    versions = (f"built with CUDA {cuda_version(int(info.get('built', 0)))}, runtime "
                f"{cuda_version(int(info.get('runtime', 0)))}, driver {cuda_version(int(info.get('driver', 0)))}")
    if problem is not None:
        return False, f"{problem} ({versions})"
    return True, versions


def available() -> tuple[bool, str]:
    """``(True, details)`` when the extension imports, the driver supports the CUDA it was built with,
    the runtime initialises and torch sees a CUDA device; else ``(False, why)`` (``auto`` then falls back)."""
    global _runtime
    if _C_cuda is None:
        note = build_note()
        return False, (f"the extension fastdiff._C_cuda did not import ({type(_import_error).__name__}: "
                       f"{_import_error}); " + (f"setup.py: {note}" if note else
                       "it is built by `pip install -e .` where nvcc and a CUDA-enabled torch exist"))
    if _runtime is None:
        _runtime = _check_runtime(_C_cuda)
    ok, details = _runtime
    if not ok:
        return False, details
    if not torch.cuda.is_available():
        return False, f"fastdiff._C_cuda is built ({details}) but torch sees no CUDA device"
    return True, f"CUDA C++ kernel on {torch.cuda.get_device_name()} ({details})"


def supports(args: StepArgs) -> bool:
    """Whether the kernel can run ``args`` (already validated by :func:`fastdiff.runtime.ops.validate`).

    Needs: the extension, CUDA tensors, a supported dtype, every tensor contiguous (element tensors,
    the model input ``u``, and the per-sample ``w``/``r``/``s``/``seeds`` and blend coefficients
    ``a``), and outputs that alias inputs only exactly. Blend rows (``a`` given: ``m_2``, ``m_3``,
    the momentum write ``m_w``) are supported.
    """
    if _C_cuda is None:
        return False
    x = args.x
    if x.device.type != "cuda" or x.dtype not in DTYPE_CODES:
        return False
    per_sample = per_sample_tensors(args)  # w, r, s, seeds and the blend coefficients a ([4 or 8, B], row k at k*B)
    if not all(t.is_contiguous() for t in element_tensors(args) + ([args.u] if args.u is not None else [])):
        return False
    if not all(t.is_contiguous() and t.device == x.device for t in per_sample):
        return False
    return not unsafe_overlap(args)


def launch(module: ModuleType, args: StepArgs, stream: int, max_blocks: int = 0) -> None:
    """Call ``module.step`` (``_C_cuda``, or its CPU emulation in tests) for ``args`` on ``stream``."""
    x = args.x
    numel = x.numel()
    if numel == 0:
        return
    module.step(*kernel_args(args), stream, max_blocks, args.u_copies)


def step(args: StepArgs) -> None:
    """Execute one row in one kernel launch on the current stream of ``args.x``'s device: writes
    ``args.out``, ``args.h_write``, ``args.u``, ``args.m_w`` and sets ``args.flag`` (never clears it;
    no host sync).

    Callers go through :func:`fastdiff.runtime.ops.step`, which validates and checks :func:`supports`.
    """
    if _C_cuda is None:
        raise RuntimeError(f"backend 'cuda' is not available: {available()[1]}")
    dev = args.x.device
    with torch.cuda.device(dev):
        launch(_C_cuda, args, torch.cuda.current_stream(dev).cuda_stream)


def philox_words(seeds: torch.Tensor, row: int, stream: int, numel: int) -> torch.Tensor:
    """The kernel's Philox uint32 stream as int64 ``[B, ceil(numel/4)*4]`` (layout of ``rng.philox_bits``)."""
    if _C_cuda is None:
        raise RuntimeError(f"backend 'cuda' is not available: {available()[1]}")
    if seeds.dtype != torch.int64 or seeds.dim() != 1 or seeds.device.type != "cuda":
        raise ValueError(f"seeds must be a 1-D int64 CUDA tensor, got {seeds.dtype} {tuple(seeds.shape)} on {seeds.device}")
    seeds = seeds.contiguous()
    groups = (numel + 3) // 4
    out = torch.empty((seeds.shape[0], groups * 4), dtype=torch.int32, device=seeds.device)
    with torch.cuda.device(seeds.device):
        _C_cuda.bits(out.data_ptr(), seeds.data_ptr(), seeds.shape[0], groups, int(row) & 0xFFFFFFFF, int(stream),
                     torch.cuda.current_stream(seeds.device).cuda_stream)
    return out.to(torch.int64) & 0xFFFFFFFF


class CudaProgram:
    """Prepared rows in the extension (``_C_cuda.Program``): ``run(i, m)`` launches row ``i`` with
    the model output ``m`` on the current stream, one call with two integers (the interface of
    :class:`fastdiff.runtime.ops.Program`). Per-sample reductions (guidance rescale, dynamic threshold) run
    as torch operations into the row's ``r``/``s`` just before it."""

    def __init__(self, rows: list[StepArgs], reductions: list, module: ModuleType | None = None) -> None:
        from ..runtime.ops import Program

        self.rows = rows
        self._py = Program(rows, reductions, lambda a: None)  # its run() does the reductions
        self._whole = Program(rows, reductions, step)  # a Langevin row: operands in torch, then step()
        self._reduce = [red is not None for red in reductions]
        self._langevin = [red is not None and red.snr > 0 for red in reductions]  # run whole by _py (torch + step)
        self._c = (module or _C_cuda).Program()
        for a in rows:
            self._c.add(*kernel_args(a), a.u_copies, a.x.numel() if a.m_c is not None else -1)
        dev = rows[0].x.device
        self.stream = lambda: torch.cuda.current_stream(dev).cuda_stream
        """The stream to launch on (the current one; replaceable to run the CPU emulation in tests)."""

    def run(self, i: int, m: torch.Tensor) -> None:
        if self._langevin[i]:
            self._whole.run(i, m)
            return
        if self._reduce[i]:
            self._py.run(i, m)
        self._c.run(i, m.data_ptr(), self.stream())

    def set(self, i: int, name: str, t: torch.Tensor | None) -> None:
        from ..core.args import PTR_NAMES

        self._c.set(i, PTR_NAMES.index(name), 0 if t is None else t.data_ptr())
        self._py.set(i, name, t)


def prepare(rows: list[StepArgs], reductions: list) -> CudaProgram:
    """The extension's prepared program for ``rows`` (validated and supported: :func:`fastdiff.runtime.ops.prepare`)."""
    return CudaProgram(rows, reductions)
