"""The ``cpu`` backend: the fused C++ kernel of ``fastdiff._C`` (OpenMP, AVX2/AVX-512 at run time).

One pass over memory per row, noise generated in the kernel, no allocation per step. Takes CPU
tensors in float32, float64, float16 or bfloat16 that are contiguous and either identical to or
disjoint from one another in memory; anything else is reported unsupported (dispatch then uses
``reference``), never read wrongly. ``FASTDIFF_CPU_SIMD=scalar|avx2|avx512|avx512bf16`` forces a SIMD level;
any other value, or a level this CPU lacks, makes asking for this backend (by name, or through
``auto`` on CPU tensors) raise a ``ValueError`` naming the variable (:func:`check_config`).
"""

from __future__ import annotations

import os

import torch

from ..core.args import (COEF_OFFSETS, DTYPE_CODES, PTR_NAMES, StepArgs, element_tensors, kernel_args,  # noqa: F401
                    output_tensors, per_sample_tensors, unsafe_overlap)

NAME = "cpu"


def check_layout(module) -> None:
    """Raise ``ImportError`` unless ``module`` (a compiled extension) states the row layout of
    :mod:`fastdiff.core.args`: the same coefficient offsets and pointer order (a stale build would
    otherwise read every row wrongly)."""
    got_c, got_p = dict(getattr(module, "COEF_OFFSETS", {})), tuple(getattr(module, "PTR_NAMES", ()))
    if got_c != COEF_OFFSETS or got_p != PTR_NAMES:
        raise ImportError(f"{module.__name__} was built for another row layout (coefficients {got_c}, pointers "
                          f"{list(got_p)}; fastdiff.core.args has {COEF_OFFSETS}, {list(PTR_NAMES)}): rebuild it with "
                          "`pip install -e .`")


SIMD_LEVELS = ("scalar", "avx2", "avx512", "avx512bf16")
"""The values ``FASTDIFF_CPU_SIMD`` may take (unset or empty: the best level this CPU supports)."""
SIMD_ENV = "FASTDIFF_CPU_SIMD"


def _simd_setting_error(exc: Exception | None) -> str | None:
    """What is wrong with a ``FASTDIFF_CPU_SIMD`` that is not a level, or names one this CPU lacks (the
    extension refuses to import then, saying so); ``None`` if the setting is fine."""
    value = os.environ.get(SIMD_ENV, "")
    allowed = f"one of {', '.join(SIMD_LEVELS)} (or unset it: the best level this CPU supports)"
    if value and value not in SIMD_LEVELS:
        return f"{SIMD_ENV} must be {allowed}, got {value!r}"
    if value and exc is not None and SIMD_ENV in str(exc):
        return f"{SIMD_ENV}={value!r} names a SIMD level this CPU cannot run ({exc}); set it to {allowed}"
    return None


try:
    from .. import _C

    check_layout(_C)
except Exception as _exc:  # not built, stale, or FASTDIFF_CPU_SIMD names a level this CPU lacks
    _C = None
    _import_error: Exception | None = _exc
else:
    _import_error = None
_config_error = _simd_setting_error(_import_error)


def check_config() -> None:
    """Raise the ``ValueError`` of an invalid ``FASTDIFF_CPU_SIMD`` (not one of :data:`SIMD_LEVELS`, or a
    level this CPU lacks), naming the variable and the allowed values.

    :func:`fastdiff.runtime.ops.resolve` calls it whenever this backend is asked for by name or considered
    by ``auto``: a bad setting is refused, never a silent fall-back to ``reference``. Importing
    fastdiff still works, and :func:`available` reports the same message.
    """
    if _config_error is not None:
        raise ValueError(_config_error)


def available() -> tuple[bool, str]:
    """``(True, details)`` when the extension is importable, else ``(False, why)``."""
    if _config_error is not None:
        return False, _config_error
    if _C is None:
        return False, (f"the extension fastdiff._C did not import ({type(_import_error).__name__}: {_import_error}); "
                       "build it with `pip install -e .`")
    return True, f"C++/OpenMP kernel, SIMD {_C.simd_level()}, {_C.num_threads()} threads"


def supports(args: StepArgs) -> bool:
    """Whether the kernel can run ``args`` (already validated by :func:`fastdiff.runtime.ops.validate`, so
    every element tensor has ``x``'s shape and dtype).

    Needs: the extension, CPU tensors, a supported dtype, every tensor contiguous (element tensors,
    the outputs ``u`` and ``flag``, and the per-sample ``w``/``r``/``s``/``seeds``), and outputs that
    overlap an element tensor only exactly (same start) and no per-sample tensor at all.
    """
    if _C is None:
        return False
    x = args.x
    if x.device.type != "cpu" or x.dtype not in DTYPE_CODES:
        return False
    if not all(t.is_contiguous() for t in element_tensors(args) + output_tensors(args)):
        return False
    if not all(t.is_contiguous() and t.device.type == "cpu" for t in per_sample_tensors(args)):
        return False
    return not unsafe_overlap(args)


def step(args: StepArgs) -> None:
    """Execute one row in one pass: writes ``args.out``, ``args.h_write``, ``args.u`` and ``args.flag``
    (``out`` and the history writes may alias inputs).

    Callers go through :func:`fastdiff.runtime.ops.step`, which validates and checks :func:`supports`.
    """
    x = args.x
    numel = x.numel()
    if numel == 0:
        return
    _C.step(*kernel_args(args), args.u_copies)


class CpuProgram:
    """Prepared rows in the extension (``_C.Program``): ``run_ptr(i, address)`` runs row ``i`` with
    the model output at ``address``, its reduction (guidance rescale, dynamic threshold, Langevin
    step sizes) and its step in one call (the interface of :class:`fastdiff.runtime.ops.Program`)."""

    def __init__(self, rows: list[StepArgs], reductions: list) -> None:
        self.rows = rows
        self._c = _C.Program()
        for a, red in zip(rows, reductions):
            # (an empty state's m_c has no memory, a null pointer: no offset either; such a row runs nothing)
            has_mc = a.m_c is not None and a.m_c.data_ptr() != 0
            self._c.add(*kernel_args(a), a.u_copies, a.x.numel() if has_mc else -1,
                        red.rescale if red else 0.0,
                        red.threshold_ratio if red else 0.0, red.threshold_max if red else 1.0,
                        red.snr if red else 0.0, red.l_x if red else 0.0, red.l_e if red else 0.0,
                        red.batch_norm if red else True)
        self.run_ptr = self._c.run

    def run(self, i: int, m: torch.Tensor) -> None:
        self._c.run(i, m.data_ptr())

    def set(self, i: int, name: str, t: torch.Tensor | None) -> None:
        self._c.set(i, PTR_NAMES.index(name), 0 if t is None else t.data_ptr())
        for a in (self.rows if i < 0 else [self.rows[i]]):
            setattr(a, name, t)


def prepare(rows: list[StepArgs], reductions: list) -> CpuProgram:
    """The extension's prepared program for ``rows`` (validated and supported: :func:`fastdiff.runtime.ops.prepare`)."""
    return CpuProgram(rows, reductions)
