"""The row contract as kernels see it: the packed coefficient layout, the pointer order, and the
arguments of one fused step as every backend receives them (already validated).

These facts are written here once. The C++ extension (``csrc/step_math.h``, ``csrc/bind_args.h``)
states the same layout for its own compiler; it exports it (``_C.COEF_OFFSETS``, ``_C.PTR_NAMES``)
and :mod:`fastdiff.backends.cpu` refuses to load an extension that disagrees. The Triton kernel
imports the layout from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import MAX_READS, MAX_WRITES, N_OPERANDS, OP_D, OP_E, OP_X, OP_Z, Row

N_COEF = 2 + N_OPERANDS * 3 + 4
"""Packed coefficients: a_x, a_e, out[N_OPERANDS], write0[N_OPERANDS], write1[N_OPERANDS], known_a, known_s,
c_g, u_scale."""
C_AX, C_AE, C_OUT, C_W0, C_W1 = 0, 1, 2, 2 + N_OPERANDS, 2 + 2 * N_OPERANDS
C_KNOWN_A, C_KNOWN_S, C_G, C_U = 2 + 3 * N_OPERANDS, 3 + 3 * N_OPERANDS, 4 + 3 * N_OPERANDS, 5 + 3 * N_OPERANDS
"""Offsets into the packed coefficients."""
COEF_OFFSETS = {"a_x": C_AX, "a_e": C_AE, "out": C_OUT, "write0": C_W0, "write1": C_W1, "known_a": C_KNOWN_A,
                "known_s": C_KNOWN_S, "c_g": C_G, "u_scale": C_U, "n_coef": N_COEF}
"""The layout by name (what the extension exports as ``COEF_OFFSETS``, checked against this)."""

PTR_NAMES = ("x", "out", "m", "m_c", "h_read[0]", "h_read[1]", "h_read[2]", "h_read[3]", "h_write[0]", "h_write[1]",
             "z", "z2", "mask", "known", "w", "r", "s", "seeds", "g", "u", "flag", "m_2", "m_3", "a", "m_w")
"""The order of the pointer list the compiled kernels take (:func:`pointers`; 0 = not given)."""

BLEND_ROWS = 4
"""Rows of the blend coefficients ``a`` per combination: ``b`` (on ``m``), ``a_1`` (on ``m_c - m``), ``a_2`` (on
``m_2 - m``), ``a_3`` (on ``m_3``). ``a`` is float32 ``[BLEND_ROWS, B]``, or ``[2 * BLEND_ROWS, B]`` with ``m_w``
(the second four rows: the combination written to ``m_w``). See :class:`StepArgs`."""

CLIP_NONE, CLIP_STATIC, CLIP_DYNAMIC = 0, 1, 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for a storage dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_row(row: Row, c_g: float = 0.0, *, fold: bool = False, u_scale: float = 1.0) -> tuple[float, ...]:
    """Pack a row's coefficients in the order kernels read them (see ``N_COEF``).

    ``c_g`` is the classifier-guidance coefficient (``e += c_g * g``), decided by the loop.
    ``u_scale`` is the next row's ``in_scale``: the model input the step writes is ``u_scale * x'``.
    ``fold``: fold an unclipped data estimate into the ``x`` and ``e`` coefficients of ``out`` and
    of every history write (:func:`fold_estimate`; what the sampling loops run, as it is more
    accurate); ``a_x``/``a_e`` still give ``d`` itself.
    """
    zero = (0.0,) * N_OPERANDS
    fold = fold and row.clip is None and not row.snr
    out = fold_estimate(row.out, row.a_x, row.a_e) if fold else row.out
    w = [fold_estimate(wr.coef, row.a_x, row.a_e) if fold else wr.coef for wr in row.writes]
    w += [zero] * (2 - len(row.writes))
    return (row.a_x, row.a_e, *out, *w[0], *w[1], row.known_a, row.known_s, float(c_g), float(u_scale))


def fold_estimate(c: tuple[float, ...], a_x: float, a_e: float) -> tuple[float, ...]:
    """Operand coefficients ``c`` with the data estimate ``d = a_x x + a_e e`` multiplied out:
    ``c_x x + c_d d + c_e e -> (c_x + c_d a_x) x + (c_e + c_d a_e) e`` (computed in float64).

    ``c_x x + c_d d`` loses digits where ``c_d a_x`` nearly cancels ``c_x`` (Heun's second stage
    into a small sigma: ``(x - d) / sigma'`` with ``d ~ x``; DDIM or Euler from a huge first sigma);
    folded on the host the kernel adds two terms instead. Only for an unclipped ``d`` (the clamp is
    not linear) and not for Langevin rows (whose ``d`` coefficient the loop rescales per sample).
    """
    cd = c[OP_D]
    if cd == 0.0:
        return tuple(c)
    c = list(c)
    c[OP_X], c[OP_E], c[OP_D] = c[OP_X] + cd * a_x, c[OP_E] + cd * a_e, 0.0
    return tuple(c)


def clip_code(row: Row) -> int:
    """Integer clip mode of a row."""
    return {None: CLIP_NONE, "static": CLIP_STATIC, "dynamic": CLIP_DYNAMIC}[row.clip]


@dataclass
class StepArgs:
    """One row's tensors and scalars. Element tensors share ``x``'s shape, dtype and device.

    Attributes:
        x: current state ``[B, ...]``.
        out: where ``x'`` goes (may be ``x`` itself).
        m: model output, or its unconditional half under guidance.
        m_c: conditional half under guidance, else ``None``.
        h_read: history buffers read, in operand order (at most ``MAX_READS``).
        h_write: history buffers written (at most 2; may alias ``h_read``, ``x`` or ``out``).
        w: float32 ``[B]`` guidance scale (with ``m_c``).
        r: float32 ``[B]`` guidance-rescale factor, or ``None``.
        s: float32 ``[B]`` clip bound (with ``clip``).
        clip: 0 none, 1 clamp, 2 clamp and divide.
        seeds: int64 ``[B]`` Philox keys (used where ``z``/``z2`` are not given).
        z, z2: external noise tensors, or ``None`` for Philox.
        mask, known: mask blend tensors, or ``None``.
        g: classifier-guidance gradient (``e += c_g * g``), or ``None``.
        coef: packed float64 coefficients, ``N_COEF`` long.
        row: the Philox counter word for this row.
        u: the next row's model input, written by the step: ``[k * B, ...]`` (``k`` = 1, or 2 for a
            guided next row), contiguous, ``x``'s dtype and device, every one of its ``k`` copies of
            ``x'`` scaled by ``coef[C_U]`` (``x'`` rounded to the storage dtype first, as
            ``x' * in_scale`` in torch). ``None``: not written.
        flag: int32 tensor of one element set to 1 when a model output element the step reads
            (``m``, ``m_c``, ``m_2``, ``m_3``) is NaN or Inf; never cleared by the step. ``None``: not checked.
        m_2, m_3: further guidance branches (blend mode only; ``m_c``, ``m_2`` and ``m_3`` each optional).
        a: float32 ``[4, B]`` or ``[8, B]`` per-sample blend coefficients: given, the row is in blend mode
            and ``e = b m + a_1 (m_c - m) + a_2 (m_2 - m) + a_3 m_3`` (each term only where its branch is
            given; rows ``0..3`` of ``a`` hold ``b, a_1, a_2, a_3``), in that order, instead of the
            two-branch ``w``/``r`` form (``w`` and ``r`` are then not given). The difference form keeps
            the blend as accurate as ``m + w (m_c - m)`` where branches are close; ``m_3`` enters as it
            is (a momentum buffer, or a branch far from ``m``).
        m_w: written (blend mode) with the same combination under rows ``4..7`` of ``a``, after every
            input is read: a guidance momentum buffer (it may be ``m_3`` itself). ``None``: not written.
    """

    x: torch.Tensor
    out: torch.Tensor
    m: torch.Tensor
    coef: tuple[float, ...]
    row: int = 0
    m_c: torch.Tensor | None = None
    h_read: tuple[torch.Tensor, ...] = ()
    h_write: tuple[torch.Tensor, ...] = ()
    w: torch.Tensor | None = None
    r: torch.Tensor | None = None
    s: torch.Tensor | None = None
    clip: int = 0
    seeds: torch.Tensor | None = None
    z: torch.Tensor | None = None
    z2: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    known: torch.Tensor | None = None
    g: torch.Tensor | None = None
    u: torch.Tensor | None = None
    flag: torch.Tensor | None = None
    m_2: torch.Tensor | None = None
    m_3: torch.Tensor | None = None
    a: torch.Tensor | None = None
    m_w: torch.Tensor | None = None

    @property
    def blend(self) -> bool:
        """Whether the row blends its guidance branches by the per-sample coefficients ``a``."""
        return self.a is not None

    @property
    def u_copies(self) -> int:
        """How many copies of ``u_scale * x'`` the step writes into ``u`` (0 without ``u``)."""
        return 0 if self.u is None else self.u.shape[0] // self.x.shape[0]

    @property
    def needs_z(self) -> bool:
        """Whether ``x'`` or a history write uses the main noise."""
        c = self.coef
        return c[C_OUT + OP_Z] != 0 or any(c[C_W0 + N_OPERANDS * j + OP_Z] != 0 for j in range(len(self.h_write)))

    @property
    def needs_z2(self) -> bool:
        """Whether the mask blend uses the known-region noise."""
        return self.mask is not None and self.coef[C_KNOWN_S] != 0


def element_tensors(args: StepArgs) -> list[torch.Tensor]:
    """The tensors of ``args`` shaped like ``x`` (inputs and outputs)."""
    ts = [args.x, args.out, args.m, args.m_c, args.z, args.z2, args.mask, args.known, args.g, *args.h_read,
          *args.h_write, args.m_2, args.m_3, args.m_w]
    return [t for t in ts if t is not None]


def per_sample_tensors(args: StepArgs) -> list[torch.Tensor]:
    """The per-sample tensors of ``args``: guidance scale, rescale factor, clip bound, seeds (``[B]``) and the
    blend coefficients (``[4, B]`` or ``[8, B]``)."""
    return [t for t in (args.w, args.r, args.s, args.seeds, args.a) if t is not None]


def output_tensors(args: StepArgs) -> list[torch.Tensor]:
    """Every tensor the step writes: ``out``, the history writes, the model input ``u``, ``flag`` and ``m_w``."""
    return [args.out, *args.h_write] + [t for t in (args.u, args.flag, args.m_w) if t is not None]


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def pointers(args: StepArgs) -> list[int]:
    """The addresses of ``args``' tensors in ``PTR_NAMES`` order (0 where a tensor is not given)."""
    hr = [_ptr(h) for h in args.h_read] + [0] * (MAX_READS - len(args.h_read))
    hw = [_ptr(h) for h in args.h_write] + [0] * (MAX_WRITES - len(args.h_write))
    return [args.x.data_ptr(), args.out.data_ptr(), args.m.data_ptr(), _ptr(args.m_c), *hr, *hw, _ptr(args.z),
            _ptr(args.z2), _ptr(args.mask), _ptr(args.known), _ptr(args.w), _ptr(args.r), _ptr(args.s),
            _ptr(args.seeds), _ptr(args.g), _ptr(args.u), _ptr(args.flag), _ptr(args.m_2), _ptr(args.m_3),
            _ptr(args.a), _ptr(args.m_w)]


DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
"""Storage dtype -> the compiled kernels' dtype code (``DTYPE_*`` of csrc/step_math.h)."""


def kernel_args(args: StepArgs) -> tuple:
    """The leading arguments every compiled entry point takes for a row (``_C.step``,
    ``_C_cuda.step``, both ``Program.add``): pointers, ``numel``, elements per sample, dtype code,
    read and write counts, clip code, the Philox row word and the packed coefficients."""
    x = args.x
    numel = x.numel()
    return (pointers(args), numel, max(1, numel // x.shape[0]), DTYPE_CODES[x.dtype], len(args.h_read),
            len(args.h_write), args.clip, args.row & 0xFFFFFFFF, list(args.coef))


def _span(t: torch.Tensor) -> tuple[int, int]:
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def unsafe_overlap(args: StepArgs) -> bool:
    """Whether an output overlaps another operand other than as an exact alias (for contiguous tensors).

    An exact alias (same start, dtype and shape: an element tensor written in place) is read and
    written by the same thread, element for element; any other overlap, and any overlap with a
    per-sample tensor, would let one thread read what another has already written. The model input
    ``u`` and ``flag`` may overlap nothing else at all (``u`` holds copies at other offsets).
    """
    operands = [(t, True) for t in element_tensors(args)] + [(t, False) for t in per_sample_tensors(args)]
    extra = [t for t in (args.u, args.flag) if t is not None]
    for o in extra:
        for t in [t for t, _ in operands] + [t for t in extra if t is not o]:
            if _overlap(o, t):
                return True
    for o in (args.out, *args.h_write, *([args.m_w] if args.m_w is not None else [])):
        for t, may_alias in operands:
            alias = may_alias and t.data_ptr() == o.data_ptr() and t.dtype == o.dtype and t.shape == o.shape
            if not alias and _overlap(o, t):
                return True
    return False


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.numel() or not b.numel():
        return False
    a0, a1 = _span(a)
    b0, b1 = _span(b)
    return a0 < b1 and b0 < a1
