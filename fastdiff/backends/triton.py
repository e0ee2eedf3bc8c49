"""The ``triton`` backend: one Triton kernel per plan row (``fastdiff.kernels.step``).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set
before triton is first imported; slow, meant for tests). Inputs must be contiguous; anything else
is reported unsupported, never read wrongly.

A prepared loop (:func:`prepare`, what the executor and the guided loop build) decides each row's
support, checks and kernel flags once per signature (which operands are given, the coefficients)
and then launches it directly, instead of running :func:`supports` and the kernel wrapper's checks
at every step. Its rows' coefficients sit in one device table built at preparation (one pointer per
launch instead of 30 scalars), and after a variant's first launch the compiled kernel is launched
directly (``fastdiff.kernels.step``: ``DIRECT``, ``CoefTable``, ``fixed_config``).
"""

from __future__ import annotations

import array
import dataclasses
import importlib
import importlib.util
import operator
import os
from types import ModuleType

import torch

from ..core.args import StepArgs, element_tensors, output_tensors, unsafe_overlap
from ..runtime.ops import Program

NAME = "triton"


def _load_kernels() -> ModuleType | Exception:
    try:
        return importlib.import_module("fastdiff.kernels.step")
    except ModuleNotFoundError as exc:
        if exc.name not in ("fastdiff.kernels", "fastdiff.kernels.step"):
            return exc  # triton itself (or torch) is missing
    # A source checkout where setup.py has not mapped kernels/ into the package: load it by path.
    path = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "step.py")
    if not os.path.exists(path):
        return ModuleNotFoundError("fastdiff.kernels.step is not installed and kernels/step.py is not beside the package")
    try:
        spec = importlib.util.spec_from_file_location("_fastdiff_kernels_step", os.path.abspath(path))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    except Exception as exc:  # triton missing or broken
        return exc


_kernels = _load_kernels()


def kernels() -> ModuleType:
    """The ``fastdiff.kernels.step`` module (raises the import error when it cannot load)."""
    if isinstance(_kernels, Exception):
        raise _kernels
    return _kernels


def available() -> tuple[bool, str]:
    """``(True, how)`` when the kernel can run: triton imports, and a CUDA device or the interpreter."""
    if isinstance(_kernels, Exception):
        return False, f"triton kernels failed to import ({type(_kernels).__name__}: {_kernels})"
    import triton

    if _kernels.INTERPRETED:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    return False, (f"triton {triton.__version__} has no CUDA device here; set TRITON_INTERPRET=1 before "
                   "importing fastdiff to run it on CPU tensors (interpreter, for tests)")


def supports(args: StepArgs) -> bool:
    """Whether this backend can run ``args``: device, dtype, contiguity, aliasing (any batch size).
    Blend rows (``a`` given, with ``m_2``/``m_3``/``m_w``) are supported."""
    if isinstance(_kernels, Exception):
        return False
    x = args.x
    dev = x.device.type
    if not (dev == "cuda" or (dev == "cpu" and _kernels.INTERPRETED)):
        return False
    if x.dtype not in _kernels.STORAGE_DTYPES:
        return False
    if x.dim() < 1 or x.shape[0] < 1:  # batches above MAX_BATCH run in slices (see step)
        return False
    if not all(t.is_contiguous() for t in element_tensors(args) + output_tensors(args)):
        return False
    return not unsafe_overlap(args)


def step(args: StepArgs) -> None:
    """Execute one row with one kernel launch: writes ``args.out``, ``args.h_write``, ``args.u``
    (the next model input), ``args.m_w`` (a blend row's momentum write) and ``args.flag`` (set to 1
    on non-finite model output)."""
    if not supports(args):
        tensors = element_tensors(args) + output_tensors(args)
        raise RuntimeError(
            f"triton backend cannot run this step (device {args.x.device.type}, dtype {args.x.dtype}, "
            f"shape {tuple(args.x.shape)}, contiguous={[t.is_contiguous() for t in tensors]})"
        )
    k = kernels()
    b, cap = args.x.shape[0], k.MAX_BATCH
    # The sample index is grid axis 1 (at most MAX_BATCH on CUDA): a larger batch runs as slices
    # along the batch. Every tensor is contiguous [B, ...] and noise is keyed per sample, so each
    # slice is exactly the batch's rows (and exact aliases stay exact aliases). The model input u
    # holds k copies of B rows each: a slice's rows lo..hi of every copy, as a [k, hi-lo, ...] view
    # whose copies stay B*n elements apart (the kernel takes that stride); flag is shared. The blend
    # coefficients a ([4 or 8, B]) run as their columns lo..hi.
    k_u = args.u_copies
    u_all = None if args.u is None else args.u.view(k_u, *args.x.shape)
    for lo in range(0, b, cap):
        hi = min(lo + cap, b)

        def keep(t, lo=lo, hi=hi):
            return t if lo == 0 and hi == b else (None if t is None else t[lo:hi])

        k.fused_step(
            keep(args.x), keep(args.out), keep(args.m), args.coef, row=args.row, m_c=keep(args.m_c),
            h_read=tuple(keep(h) for h in args.h_read), h_write=tuple(keep(h) for h in args.h_write),
            w=keep(args.w), r=keep(args.r), s=keep(args.s), clip=args.clip, seeds=keep(args.seeds),
            z=keep(args.z), z2=keep(args.z2), mask=keep(args.mask), known=keep(args.known), g=keep(args.g),
            u=None if u_all is None else u_all[:, lo:hi], flag=args.flag,
            m_2=keep(args.m_2), m_3=keep(args.m_3), m_w=keep(args.m_w),
            a=None if args.a is None else (args.a if lo == 0 and hi == b else args.a[:, lo:hi]),
        )


_SIGNATURE_FIELDS = ("m_c", "w", "r", "s", "seeds", "z", "z2", "mask", "known", "g", "u", "flag", "m_2", "m_3", "a",
                     "m_w")


_operands = operator.attrgetter(*_SIGNATURE_FIELDS)
_NONES = (None,) * len(_SIGNATURE_FIELDS)


def _signature(a: StepArgs) -> tuple:
    """What decides a row's kernel variant and checks besides its coefficients (:func:`_same_coef`):
    which operands are given, the history counts, the clip mode and the model input's copies."""
    return (tuple(map(operator.is_, _operands(a), _NONES)), len(a.h_read), len(a.h_write), a.clip,
            0 if a.u is None else a.u.shape[0])


def _same_coef(a, b) -> bool:
    """Whether two packed coefficient rows are the same bits: the same object (a prepared row's, every
    step), else compared as float64 bits, so that ``-0.0`` and ``0.0`` (equal as floats, not in what a
    step computes from them) are different rows."""
    return a is b or array.array("d", a).tobytes() == array.array("d", b).tobytes()


class _PreparedSteps:
    """The ``step`` of a prepared program (:func:`prepare`): a row's support, checks and kernel flags
    decided once per signature (:func:`_signature`: a row whose operands come and go, as a host-drawn
    noise tensor pointed at per call, is decided again), then one direct launch per step.

    The rows' coefficients live in one device table (``kernels().CoefTable``, built here, at
    preparation); a row whose coefficients change gets its entry rewritten when its signature is
    decided again (eagerly: never during CUDA graph capture, which raises). With opt-in autotuning
    (``FASTDIFF_TRITON_AUTOTUNE=1``) every row is tuned here, before the loop, by one launch on
    scratch tensors of its shapes (:func:`_scratch`), so that no step of the loop benchmarks or
    synchronises."""

    def __init__(self, rows: list[StepArgs]) -> None:
        self._index = {id(a): i for i, a in enumerate(rows)}
        self._keep = rows  # (their ids stay theirs while this program lives)
        self._decided: dict[int, tuple] = {}
        self._table = kernels().CoefTable([a.coef for a in rows], rows[0].x.device) if rows else None
        if rows and not kernels().INTERPRETED and kernels()._autotune():
            for i, a in enumerate(rows):
                self._step(i, _scratch(a))

    def __call__(self, a: StepArgs) -> None:
        i = self._index.get(id(a))
        if i is None:  # a row made for one call (a Langevin row's operands): the checked path
            step(a)
            return
        self._step(i, a)

    def _step(self, i: int, a: StepArgs) -> None:
        """Row ``i`` on the tensors of ``a`` (the row itself, or its scratch copy)."""
        sig = _signature(a)
        hit = self._decided.get(i)
        if hit is None or hit[0] != sig or not _same_coef(a.coef, hit[4]):
            if a.x.shape[0] > kernels().MAX_BATCH or not supports(a):
                step(a)  # (slices along the batch, or raises naming what it cannot run)
                return
            k = kernels()
            flags, u_stride = k.launch_flags(
                a.x, a.out, a.m, a.coef, m_c=a.m_c, h_read=a.h_read, h_write=a.h_write, w=a.w, r=a.r, s=a.s,
                clip=a.clip, seeds=a.seeds, z=a.z, z2=a.z2, mask=a.mask, known=a.known, g=a.g, u=a.u, flag=a.flag,
                m_2=a.m_2, m_3=a.m_3, a=a.a, m_w=a.m_w)
            coef_t = (self._table.write(i, a.coef) if a.x.device == self._table.table.device
                      else k.coef_tensor(a.coef, a.x.device))
            hit = self._decided[i] = (sig, flags, u_stride, coef_t, a.coef)
        kernels().launch(a.x, a.out, a.m, a.m_c, a.h_read, a.h_write, a.z, a.z2, a.mask, a.known, a.g, a.w, a.r, a.s,
                         a.seeds, a.u, hit[2], a.flag, a.row, hit[3], hit[1], a.m_2, a.m_3, a.a, a.m_w)


    def launcher(self, i: int):
        """Row ``i``'s direct launcher (``kernels().direct_launcher``) on its current operands, as decided
        at its last step; ``None`` where there is none (the row ran the checked path, its variant
        has no compiled kernel to launch directly, a per-sample operand is not contiguous)."""
        a = self._keep[i]
        hit = self._decided.get(i)
        if hit is None or hit[0] != _signature(a) or not _same_coef(a.coef, hit[4]):
            return None
        return kernels().direct_launcher(a.x, a.out, a.m, a.m_c, a.h_read, a.h_write, a.z, a.z2, a.mask, a.known,
                                         a.g, a.w, a.r, a.s, a.seeds, a.u, hit[2], a.flag, a.row, hit[3], hit[1],
                                         a.m_2, a.m_3, a.a, a.m_w)


def _scratch(a: StepArgs) -> StepArgs:
    """``a`` over fresh zero tensors of the same shapes, strides, dtypes and devices, one per distinct
    tensor (exact aliases stay aliases): a launch on it touches none of the program's buffers."""
    made: dict[int, torch.Tensor] = {}

    def fresh(t):
        if isinstance(t, tuple):
            return tuple(fresh(v) for v in t)
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) not in made:
            made[id(t)] = torch.zeros_like(t) if t.is_contiguous() else \
                torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device).zero_()
        return made[id(t)]

    return dataclasses.replace(a, **{f.name: fresh(getattr(a, f.name)) for f in dataclasses.fields(a)})


def prepare(rows: list[StepArgs], reductions: list):
    """A prepared program for ``rows`` (:func:`fastdiff.runtime.ops.prepare`): the generic program's
    reductions, each row's step launched directly, its support and kernel flags decided once per
    signature instead of at every step. The model outputs the program is given (``m``, ``m_c``) must
    be contiguous, as the executor's are."""
    return TritonProgram(rows, reductions, _PreparedSteps(rows))


class TritonProgram(Program):
    """:class:`fastdiff.runtime.ops.Program` whose ``run`` launches a row's compiled kernel directly once it
    has run: a row without reductions, after its first step, keeps a launcher with every operand's
    address fixed but the model output's (``kernels().direct_launcher``), so a step is one address
    computation and the launch. ``set`` (the one way a prepared program's operands are pointed
    elsewhere, as for the ``cuda`` backend's program) drops the launchers it affects; a model output
    of another dtype or alignment, another current device or a profiler's launch hook take the
    checked path. Like the ``cpu`` and ``cuda`` programs', a row's coefficients are those it was
    prepared with (the checked path alone follows a row whose ``coef`` is replaced)."""

    def __init__(self, rows: list[StepArgs], reductions: list, steps: _PreparedSteps) -> None:
        super().__init__(rows, reductions, steps)
        self._plain = [red is None for red in reductions]
        self._fast: list = [None] * len(rows)

    def run(self, i: int, m: torch.Tensor) -> None:
        fast = self._fast[i]  # None: not tried yet; False: none for this row until an operand moves
        if fast and fast(m):
            return
        super().run(i, m)
        if fast is None and self._plain[i]:
            self._fast[i] = self._step.launcher(i) or False

    def set(self, i: int, name: str, t: torch.Tensor | None) -> None:
        super().set(i, name, t)
        if i < 0:
            self._fast = [None] * len(self.rows)
        else:
            self._fast[i] = None
