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



def available() -> tuple[bool, str]:
    """``(True, details)`` when the extension imports and a CUDA device is present, else ``(False, why)``."""
    if _C_cuda is None:
        return False, (f"the extension fastdiff._C_cuda did not import ({type(_import_error).__name__}: "
                       f"{_import_error}); it is built by `pip install -e .` where nvcc and a CUDA-enabled torch exist")
    if not torch.cuda.is_available():
        return False, "fastdiff._C_cuda is built but torch sees no CUDA device"
    return True, f"CUDA C++ kernel on {torch.cuda.get_device_name()}"


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
