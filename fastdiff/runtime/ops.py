"""Backend dispatch for the fused step: validation, ``backend=`` / ``FASTDIFF_BACKEND`` resolution.

Backends live in :mod:`fastdiff.backends` and all implement the row contract of
:mod:`fastdiff.core.plan`. ``auto`` picks ``cpu`` for CPU tensors and ``cuda`` > ``triton`` for CUDA
tensors, by availability; when it falls back to ``reference`` it warns once, saying why. A backend
asked for by name that cannot run raises instead.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from dataclasses import dataclass
from types import ModuleType

import torch

from ..core.args import (BLEND_ROWS, N_COEF, StepArgs, element_tensors, output_tensors, per_sample_tensors,
                         unsafe_overlap)
from ..core.plan import MAX_READS, MAX_WRITES

BACKENDS = ("reference", "cpu", "triton", "cuda")
"""Every backend name, in no particular order of preference."""

# cuda before triton: measured on an H200 (benchmarks/gpu_check.py, 2x3x512x512 fp32 multistep row),
# the CUDA kernel took 19.8 us per step and the Triton one 94 us, almost all of it Triton's host-side
# launch path; both compute the same row, so the faster one is the default where both exist.
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
_modules: dict[str, ModuleType | Exception] = {}
_warned: set[str] = set()


def _module(name: str) -> ModuleType | Exception:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(f"fastdiff.backends.{name}")
        except Exception as exc:  # a missing extension or toolchain makes the backend unavailable
            _modules[name] = exc
    return _modules[name]


def backend_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend name."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    mod = _module(name)
    if isinstance(mod, Exception):
        return False, f"import failed: {type(mod).__name__}: {mod}"
    return mod.available()


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every backend with ``(available, reason)``; what ``fastdiff info`` prints."""
    return {name: backend_status(name) for name in BACKENDS}


def requested_backend(backend: str | None = "auto") -> str:
    """The backend asked for: the argument, or ``FASTDIFF_BACKEND`` when the argument is ``auto``."""
    name = backend or "auto"
    if name == "auto":
        name = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")
    return name


def _check_configured(name: str) -> None:
    """Raise the ``ValueError`` of a backend whose configuration is invalid (``cpu``: a bad
    ``FASTDIFF_CPU_SIMD``): asked for by name or considered by ``auto``, it is refused, not skipped."""
    check = getattr(_module(name), "check_config", None)
    if check is not None:
        check()


def resolve(backend: str | None, args: StepArgs) -> ModuleType:
    """The backend module that will run ``args``; a ``ValueError`` if that backend (or one ``auto``
    considers) is misconfigured (see :func:`_check_configured`)."""
    name = requested_backend(backend)
    if name != "auto":
        _check_configured(name)
        ok, why = backend_status(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} was requested but is not available: {why}")
        mod = _module(name)
        if not mod.supports(args):
            raise RuntimeError(
                f"backend {name!r} cannot run this step (device {args.x.device.type}, dtype {args.x.dtype}, "
                f"shape {tuple(args.x.shape)}); use backend='auto' or 'reference'"
            )
        return mod
    reasons = []
    for cand in _AUTO_ORDER.get(args.x.device.type, ()):
        _check_configured(cand)
        ok, why = backend_status(cand)
        if ok and _module(cand).supports(args):
            return _module(cand)
        reasons.append(f"{cand}: {why if not ok else 'does not support these inputs'}")
    key = f"{args.x.device.type}:{';'.join(reasons)}"
    if reasons and key not in _warned:
        _warned.add(key)
        warnings.warn(
            f"fastdiff: using the reference backend for {args.x.device.type} tensors ({'; '.join(reasons)})",
            RuntimeWarning,
            stacklevel=3,
        )
    return _module("reference")


_ROW_LIMIT = 1 << 32
_ELEMENT_FIELDS = ("out", "m", "m_c", "z", "z2", "mask", "known", "g", "m_2", "m_3", "m_w")
_PER_SAMPLE_FIELDS = ("w", "r", "s", "seeds", "a")


def _not_a_tensor(args: StepArgs) -> TypeError | None:
    """A ``TypeError`` naming the first tensor argument of ``args`` that is not a tensor (or ``None``)."""
    fields = [(n, getattr(args, n)) for n in ("x", *_ELEMENT_FIELDS, *_PER_SAMPLE_FIELDS, "u", "flag")]
    fields += [(f"{n}[{i}]", t) for n in ("h_read", "h_write") for i, t in enumerate(getattr(args, n))]
    for name, t in fields:
        if not isinstance(t, torch.Tensor) and (t is not None or name in ("x", "out", "m") or "[" in name):
            return TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return None


def _check_coef(coef) -> None:
    try:
        n = len(coef)
    except TypeError:
        raise TypeError(f"coef must be a sequence of {N_COEF} numbers, got {type(coef).__name__}") from None
    if n != N_COEF:
        raise ValueError(f"coef must have {N_COEF} entries, got {n}")
    try:
        if all(map(math.isfinite, coef)):  # the common case: one pass in C
            return
    except TypeError:
        pass
    for i, c in enumerate(coef):
        if isinstance(c, (str, bytes)) or not hasattr(c, "__float__"):
            raise TypeError(f"coef[{i}] must be a real number, got {type(c).__name__} {c!r}")
        if not math.isfinite(c):
            raise ValueError(f"coef[{i}] must be finite, got {c!r}")


def backend_for(backend: str | None, like: torch.Tensor) -> str:
    """The name of the backend that ``backend`` (``auto`` included) resolves to for rows of tensors
    shaped, typed and placed like ``like`` (``[B, ...]``); ``RuntimeError`` if none can run them,
    ``ValueError`` for a bad or misconfigured name. ``auto``'s fallback warning is not issued here."""
    x = like[:1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve(backend, StepArgs(x=x, out=x, m=x, coef=(0.0,) * N_COEF)).NAME


def validate(args: StepArgs) -> None:
    """Check every argument of a step before any backend sees it, naming the first bad one.

    ``x`` a floating tensor with a non-empty batch; every element tensor (``out``, ``m``, ``m_c``,
    ``z``, ``z2``, ``mask``, ``known``, ``g``, ``h_read[k]``, ``h_write[j]``) of ``x``'s shape, dtype
    and device; ``w``/``r``/``s`` float32 and ``seeds`` int64 of shape ``(B,)`` on that device,
    wherever given (``w`` with ``m_c``, ``s`` with a clip and ``seeds`` for Philox noise are
    required); ``u``/``flag`` as :class:`fastdiff.core.args.StepArgs` says; ``coef`` ``N_COEF`` finite
    real numbers; ``row`` an int in ``[0, 2**32)`` (the Philox counter word, as every backend takes
    it); ``clip`` the int 0, 1 or 2; at most ``MAX_READS`` history reads and ``MAX_WRITES`` writes;
    no output (``out``, ``h_write[j]``, ``u``) whose elements share memory (an expanded view), nor
    one that requires grad while grad mode is on (the fused kernels write memory autograd does not
    see; ``reference`` would refuse a leaf). Strides and overlap between different tensors are not
    errors: :func:`step` stages such rows. Raises ``TypeError`` for something that is not a tensor
    (or a number) where one belongs, a non-int ``row`` and an element tensor of another dtype;
    ``ValueError`` for anything else. Every backend gets the same checks: they run before one is
    chosen.
    """
    try:
        _validate(args)
    except AttributeError:  # an argument that is not a tensor (or a tuple of them)
        err = _not_a_tensor(args)
        if err is None:
            raise
        raise err from None


def _validate(args: StepArgs) -> None:
    x = args.x
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    _check_coef(args.coef)
    row, clip = args.row, args.clip
    if type(row) is not int:
        raise TypeError(f"row must be an int (the Philox counter word), got {type(row).__name__} {row!r}")
    if not 0 <= row < _ROW_LIMIT:
        raise ValueError(f"row must be in [0, 2**32) (the Philox counter word), got {row}")
    for name, seq in (("h_read", args.h_read), ("h_write", args.h_write)):
        if type(seq) not in (tuple, list):
            raise TypeError(f"{name} must be a tuple of tensors, got {type(seq).__name__}")
    if len(args.h_read) > MAX_READS or len(args.h_write) > MAX_WRITES:
        raise ValueError(f"at most {MAX_READS} history reads and {MAX_WRITES} writes per row, got h_read with "
                         f"{len(args.h_read)} and h_write with {len(args.h_write)} tensors")
    if type(clip) is not int or clip not in (0, 1, 2):
        raise ValueError(f"clip must be 0 (none), 1 (static) or 2 (dynamic), got {clip!r}")
    named = [(n, getattr(args, n)) for n in _ELEMENT_FIELDS]
    named += [(f"h_read[{i}]", h) for i, h in enumerate(args.h_read)]
    named += [(f"h_write[{i}]", h) for i, h in enumerate(args.h_write)]
    shape, dtype, dev = x.shape, x.dtype, x.device
    for name, t in named:
        if t is None:
            if name in ("out", "m") or name.startswith("h_"):
                raise TypeError(f"{name} must be a torch.Tensor, got None")
            continue
        if t.shape != shape or t.dtype != dtype or t.device != dev:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.shape != shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but x has shape {tuple(shape)}")
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {dtype}")
            raise ValueError(f"{name} is on {t.device} but x is on {dev}")
    if args.known is None and args.mask is not None:
        raise ValueError("mask was given without known")
    b = shape[0]
    _check_blend(args, b, dev)
    for name, t, need in (("w", args.w, args.m_c is not None and args.a is None), ("r", args.r, False),
                          ("s", args.s, clip != 0), ("seeds", args.seeds, False)):
        if t is None:
            if need:
                raise ValueError(f"{name} is required for this row")
            continue
        want = torch.int64 if name == "seeds" else torch.float32
        if t.shape != (b,) or t.dtype != want or t.device != dev:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            kind = "an int64" if want is torch.int64 else "a float32"
            raise ValueError(f"{name} must be {kind} tensor of shape ({b},) on {dev}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    u, f = args.u, args.flag
    for name, t in (("u", u), ("flag", f)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if u is not None and (u.dim() != x.dim() or u.shape[0] not in (b, 2 * b) or u.shape[1:] != shape[1:]
                          or u.dtype != dtype or u.device != dev):
        raise ValueError(f"u (the next model input) must be {dtype} of shape ({b}, ...) or ({2 * b}, ...) with "
                         f"x's trailing shape {tuple(shape[1:])} on {dev}, got {u.dtype} {tuple(u.shape)} "
                         f"on {u.device}")
    if f is not None and (f.dtype != torch.int32 or f.numel() != 1 or f.device != dev):
        raise ValueError(f"flag must be an int32 tensor of one element on {dev}, got {f.dtype} "
                         f"{tuple(f.shape)} on {f.device}")
    grad = torch.is_grad_enabled()
    for name, t in (("out", args.out), *((f"h_write[{i}]", h) for i, h in enumerate(args.h_write)), ("u", u),
                    ("m_w", args.m_w)):
        if t is None:
            continue
        # a contiguous tensor's elements are distinct; only a strided one can repeat memory
        if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(f"{name} is written but several of its elements share memory (strides "
                             f"{t.stride()}: an expanded view); give a tensor whose elements are distinct")
        if grad and t.requires_grad:  # the fused kernels write memory, unseen by autograd
            raise ValueError(f"{name} requires grad: the step writes it in place and is not differentiable; "
                             "run it under torch.no_grad() or write into a tensor that does not require grad")
    if ((args.needs_z and args.z is None) or (args.needs_z2 and args.z2 is None)) and args.seeds is None:
        raise ValueError("this row draws noise: give seeds (Philox) or an external noise tensor")


def _check_blend(args: StepArgs, b: int, dev: torch.device) -> None:
    """The blend operands (:class:`fastdiff.core.args.StepArgs`): ``m_2``/``m_3``/``m_w`` only with ``a``;
    no ``w``/``r`` with it; ``a`` float32 ``[4, B]`` (``[8, B]`` with ``m_w``) on ``x``'s device."""
    from ..backends.reference import check_blend

    check_blend(args)
    a = args.a
    if a is None:
        return
    rows = 2 * BLEND_ROWS if args.m_w is not None else BLEND_ROWS
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"a must be a torch.Tensor, got {type(a).__name__}")
    if a.shape != (rows, b) or a.dtype != torch.float32 or a.device != dev:
        raise ValueError(f"a must be a float32 tensor of shape ({rows}, {b}) on {dev} (the blend coefficients"
                         f"{', twice: m_w is given' if args.m_w is not None else ''}), got {a.dtype} "
                         f"{tuple(a.shape)} on {a.device}")


def check_extents(args: StepArgs) -> None:
    """The checks that keep every backend within the memory of the tensors it is given: constant
    work per tensor (about 0.2 us each; 3 us for a guided multistep row with its model input and
    flag); :func:`step` runs them even with ``check=False``. Raises what :func:`validate` raises,
    naming the argument.

    Checks that every element tensor (``out``, ``m``, ``m_c``, ``z``, ``z2``, ``mask``, ``known``,
    ``g``, ``h_read[k]``, ``h_write[j]``) has ``x``'s element count, dtype and device; ``w``/``r``/``s``
    float32 and ``seeds`` int64 with ``B`` elements, ``u`` ``x``'s dtype with 1 or 2 times ``x``'s
    elements (as its batch says) and ``flag`` one int32 element, all on ``x``'s device; at most
    ``MAX_READS``/``MAX_WRITES`` history tensors, ``N_COEF`` coefficients and a clip code 0, 1 or 2.
    """
    try:
        ok = _extents_ok(args)
    except (AttributeError, TypeError, IndexError):  # not a tensor where one belongs, and the like
        ok = False
    if not ok:
        validate(args)  # raises, naming the argument
        raise ValueError("a step argument has the wrong size, dtype or device (fastdiff.runtime.ops.check_extents)")


def _extents_ok(args: StepArgs) -> bool:
    x = args.x
    hr, hw, clip, n = args.h_read, args.h_write, args.clip, x.numel()
    if not (len(hr) <= MAX_READS and len(hw) <= MAX_WRITES and len(args.coef) == N_COEF and type(clip) is int
            and 0 <= clip <= 2 and x.dim() > 0):
        return False
    dt, dev = x.dtype, x.device
    for t in (args.out, args.m, args.m_c, args.z, args.z2, args.mask, args.known, args.g, *hr, *hw, args.m_2,
              args.m_3, args.m_w):
        if t is not None and t is not x and (t.numel() != n or t.dtype is not dt or t.device != dev):
            return False
    if args.a is not None:
        rows = 2 * BLEND_ROWS if args.m_w is not None else BLEND_ROWS
        if (args.a.numel() != rows * x.shape[0] or args.a.dtype is not torch.float32 or args.a.device != dev
                or args.w is not None or args.r is not None):
            return False
    elif args.m_2 is not None or args.m_3 is not None or args.m_w is not None:
        return False
    b, f32 = x.shape[0], torch.float32
    for t, want in ((args.w, f32), (args.r, f32), (args.s, f32), (args.seeds, torch.int64)):
        if t is not None and (t.numel() != b or t.dtype is not want or t.device != dev):
            return False
    u, f = args.u, args.flag
    if u is not None:
        k = u.shape[0] // b if b and u.dim() else 0
        if not (k in (1, 2) and u.numel() == k * n and u.dtype is dt and u.device == dev):
            return False
    return f is None or (f.numel() == 1 and f.dtype is torch.int32 and f.device == dev)


def step(args: StepArgs, backend: str | None = "auto", check: bool = True) -> None:
    """Run one plan row on the chosen backend (writes ``args.out`` and ``args.h_write``).

    Tensors of any layout are accepted: where a fused backend needs contiguous, non-overlapping
    operands and ``args`` has others (transposed, channels_last, sliced or expanded views, outputs
    partly overlapping inputs), the row runs on contiguous copies and the outputs are copied back,
    ``out`` first, then ``h_write`` in order and ``m_w``, as ``reference`` writes them.

    ``check=True`` runs :func:`validate`: a bad argument raises, naming it, before any tensor is
    written. ``check=False`` is for rows validated already: it skips the checks of values and
    layouts (finite coefficients, ``row`` and clip ranges, negated views, outputs that are expanded,
    need grad or overlap inputs) but still runs :func:`check_extents` (element counts, dtypes and
    devices: about 3 us for a guided multistep row), so no argument can make a kernel read or write
    outside its tensors. The executor's prepared rows skip even those (their tensors are its own).
    """
    negated = False
    if check:
        validate(args)
        negated = _any_negated(args)
    else:
        check_extents(args)
    _run(args, backend, negated)


def _run(args: StepArgs, backend: str | None, negated: bool = False) -> None:
    """:func:`step` after its checks (the executor's prepared rows come here directly)."""
    name = requested_backend(backend)
    if name != "reference":
        mod = _fused_for(name, args) if not negated else None
        if mod is not None:  # the common case: the inputs as they are
            mod.step(args)
            return
        if negated or needs_staging(args):
            staged, commit = stage(args)
            resolve(backend, staged).step(staged)
            commit()
            return
    resolve(backend, args).step(args)


def _any_negated(args: StepArgs) -> bool:
    """Whether a tensor of ``args`` is a negated view (``torch._neg_view``, the ``.imag`` of a
    conjugated complex tensor): its memory holds the negated values, which a fused kernel reading
    the pointer would take as they are; :func:`stage` resolves such views."""
    return any(t.is_neg() for t in element_tensors(args) + per_sample_tensors(args) + output_tensors(args))


def _fused_for(name: str, args: StepArgs) -> ModuleType | None:
    """The fused backend ``name`` (or ``auto``'s first choice) if it runs ``args`` as given, else ``None``."""
    for cand in (_AUTO_ORDER.get(args.x.device.type, ()) if name == "auto" else (name,)):
        mod = _module(cand)
        if not isinstance(mod, Exception) and mod.available()[0] and mod.supports(args):
            return mod
    return None


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not a.numel() or not b.numel():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + _reach(b) and b0 < a0 + _reach(a)


def _reach(t: torch.Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element (non-negative strides; else huge)."""
    if any(st < 0 for st in t.stride()):
        return 1 << 62
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
            and a.stride() == b.stride() and a.is_neg() == b.is_neg())


def needs_staging(args: StepArgs) -> bool:
    """Whether a fused backend needs contiguous copies of ``args``: a non-contiguous tensor, or an
    output that overlaps another operand other than as an exact alias (:func:`fastdiff.core.args.unsafe_overlap`)."""
    if not all(t.is_contiguous() for t in element_tensors(args) + per_sample_tensors(args) + output_tensors(args)):
        return True
    return unsafe_overlap(args)


def stage(args: StepArgs):
    """``(staged, commit)``: ``args`` on contiguous copies (one copy per distinct view, so exact
    aliases stay aliases) with fresh output buffers, and ``commit()`` writing the outputs back."""
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    targets = (args.out, *args.h_write, *(() if args.m_w is None else (args.m_w,)))

    def inp(t):
        if t is None:
            return None
        for src, c in copies:
            if src is t or _same_view(src, t):
                return c
        c = t.resolve_neg().contiguous()  # a negated view's values, not its memory
        if c is t and any(_overlaps(o, t) for o in targets):
            c = t.clone()  # an output overlaps it: read from a copy the outputs cannot touch
        copies.append((t, c))
        return c

    def fresh(o):
        # an output that is also read (in place, a history slot read and written) starts as that
        # input's copy (a clone: inp() copies every operand an output overlaps); the kernel reads
        # it before writing, element for element
        for src, c in copies:
            if src is o or _same_view(src, o):
                return c
        return torch.empty(o.shape, dtype=o.dtype, device=o.device)

    staged = StepArgs(
        x=inp(args.x), out=args.out, m=inp(args.m), coef=args.coef, row=args.row, m_c=inp(args.m_c),
        h_read=tuple(inp(h) for h in args.h_read), h_write=args.h_write,
        w=inp(args.w), r=inp(args.r), s=inp(args.s), clip=args.clip, seeds=inp(args.seeds),
        z=inp(args.z), z2=inp(args.z2), mask=inp(args.mask), known=inp(args.known), g=inp(args.g),
        m_2=inp(args.m_2), m_3=inp(args.m_3), a=inp(args.a),
    )
    outs = [fresh(o) for o in targets]
    # two outputs that are the same view share one buffer (the later write wins, as in reference)
    for j in range(1, len(outs)):
        for k in range(j):
            if targets[j] is targets[k] or _same_view(targets[j], targets[k]):
                outs[j] = outs[k]
    n_w = len(args.h_write)
    staged.out, staged.h_write = outs[0], tuple(outs[1:1 + n_w])
    staged.m_w = outs[1 + n_w] if args.m_w is not None else None
    # written only (the flag keeping its value): contiguous copies the outputs cannot touch
    staged.u = args.u.clone(memory_format=torch.contiguous_format) if args.u is not None else None
    staged.flag = args.flag.clone(memory_format=torch.contiguous_format) if args.flag is not None else None

    def commit() -> None:
        for o, c in zip(targets, outs):
            if c is not o:
                o.copy_(c)
        if args.u is not None:
            args.u.copy_(staged.u)
        if args.flag is not None:
            args.flag.copy_(staged.flag)

    return staged, commit


# ---------------------------------------------------------------------------------------------
# Prepared rows: a whole loop's rows validated and resolved once (fastdiff.runtime.executor's programs)


@dataclass(frozen=True)
class Reduction:
    """A per-sample reduction a prepared row runs just before its step.

    Attributes:
        rescale: ``> 0``: the guidance-rescale factor with this ``phi`` into the row's ``r``
            (:func:`fastdiff.core.guidance.rescale_factor`).
        threshold_ratio, threshold_max: ``ratio > 0``: the dynamic-threshold bound into the row's
            ``s`` (:func:`fastdiff.core.guidance.threshold_bound`).
        snr, l_x, l_e, batch_norm: ``snr > 0``: a Langevin corrector row (:mod:`fastdiff.core.plan`)
            whose score is ``g = l_x x + l_e e``; its step size ``k = 2 (snr |z| / |g|)^2`` per
            sample, the norms averaged over the batch with ``batch_norm``
            (:func:`fastdiff.runtime.row_terms.langevin_step_operands`).
    """

    rescale: float = 0.0
    threshold_ratio: float = 0.0
    threshold_max: float = 1.0
    snr: float = 0.0
    l_x: float = 0.0
    l_e: float = 0.0
    batch_norm: bool = True


class Program:
    """Prepared rows run by the backend's ``step`` (reference, triton, cuda, or any fallback).

    ``run(i, m)`` gives row ``i`` its model output ``m`` (``[B, ...]``, or ``[2B, ...]`` for a
    guided row: unconditional half first), runs its reduction and its step. ``set(i, name, t)``
    points operand ``name`` (a :class:`fastdiff.core.args.StepArgs` field) of row ``i`` (every row for
    ``i = -1``) at ``t``. The rows were validated when prepared; ``run`` checks nothing.
    """

    run_ptr = None

    def __init__(self, rows: list[StepArgs], reductions: list, step_fn, extension: bool = True) -> None:
        self.rows = rows
        self.reductions = reductions
        self._step = step_fn
        self.extension = extension  # False: the reductions in plain torch (the reference backend)

    def run(self, i: int, m: torch.Tensor) -> None:
        from ..core.guidance import rescale_factor, threshold_bound

        a = self.rows[i]
        if a.m_c is not None:
            b = a.x.shape[0]
            a.m, a.m_c = m[:b], m[b:]
        else:
            a.m = m
        red = self.reductions[i]
        if red is not None:
            if red.snr > 0:
                self._langevin(a, red)
                return
            if red.rescale > 0:
                a.r.copy_(rescale_factor(a.m, a.m_c, a.w, red.rescale, extension=self.extension))
            if red.threshold_ratio > 0:
                a.s.copy_(threshold_bound(a.x, a.m, a.m_c, a.w, a.r, a.coef, red.threshold_ratio, red.threshold_max,
                                          g=a.g, extension=self.extension))
        self._step(a)

    def _langevin(self, a: StepArgs, red: Reduction) -> None:
        from dataclasses import replace

        from ..core.guidance import rescale_factor
        from .row_terms import langevin_step_operands

        rr = None
        if red.rescale > 0:
            rr = rescale_factor(a.m, a.m_c, a.w, red.rescale, extension=self.extension)
        m, k, z, coef = langevin_step_operands(a.x, a.m, a.m_c, a.w, rr, a.g, a.coef, a.z, a.seeds, a.row, red.l_x,
                                               red.l_e, red.snr, red.batch_norm, self._step)
        self._step(replace(a, m=m, m_c=None, w=None, r=k, z=z, g=None, coef=coef))

    def set(self, i: int, name: str, t: torch.Tensor | None) -> None:
        for a in (self.rows if i < 0 else [self.rows[i]]):
            setattr(a, name, t)


def prepare(rows: list[StepArgs], backend: str | None = "auto", reductions: list | None = None):
    """Validate every row once and pick the backend once: the one dispatch point of a prepared
    loop (:mod:`fastdiff.runtime.executor`), as :func:`step` is for a single row.

    ``rows`` share their buffers (contiguous and non-overlapping but for exact aliases, as the
    executor allocates them); ``m``/``m_c`` are placeholders that ``run`` replaces. Returns the
    backend's own program where it has one (``cpu``: the extension's, whose ``run_ptr(i, address)``
    takes the model output's address), else a :class:`Program` over the backend's ``step``; rows a
    fused backend cannot run go through :func:`step` (staged copies) one by one.
    """
    reductions = list(reductions) if reductions is not None else [None] * len(rows)
    if len(reductions) != len(rows):
        raise ValueError(f"reductions has {len(reductions)} entries for {len(rows)} rows")
    for a, red in zip(rows, reductions):
        validate(a)
        if red is not None and ((red.rescale > 0 and (a.m_c is None or a.r is None))
                                or (red.threshold_ratio > 0 and (a.clip != 2 or a.s is None))):
            raise ValueError(f"row {a.row}: a rescale reduction needs m_c and r, a threshold one clip=2 and s")
    if not rows:
        return Program(rows, reductions, lambda a: None)
    name = requested_backend(backend)
    if name == "reference":
        return Program(rows, reductions, _module("reference").step, extension=False)
    # the first row picks the backend (resolve warns or raises as for one step); the others must suit it
    mod = resolve(backend, rows[0]) if name != "auto" else (_fused_for("auto", rows[0]) or resolve(backend, rows[0]))
    if all(mod.supports(a) for a in rows[1:]):
        make = getattr(mod, "prepare", None)
        return make(rows, reductions) if make is not None else Program(rows, reductions, mod.step)
    return Program(rows, reductions, lambda a: _run(a, backend))


# ---------------------------------------------------------------------------------------------
# torch.library custom op ``fastdiff::step`` (owned by the CPU-kernel issue; the rest of this file
# is the dispatch above). With it, torch.compile(fullgraph=True) traces a loop that steps without
# a graph break. The state is updated in place and history slots are indices into one mutated
# list, so in-place use (out is x, a slot both read and written) never passes one tensor as two
# arguments, which custom ops do not allow for mutated tensors.

_STEP_SCHEMA = (
    "(Tensor(a!) x, Tensor(b!)[] history, Tensor m, Tensor? m_c, Tensor? w, Tensor? r, Tensor? s, "
    "Tensor? seeds, Tensor? z, Tensor? z2, Tensor? mask, Tensor? known, Tensor? g, int[] reads, int[] writes, "
    "float[] coef, int clip, int row, str backend) -> ()"
)


@torch.library.custom_op("fastdiff::step", mutates_args=("x", "history"), schema=_STEP_SCHEMA)
def _step_op(x, history, m, m_c, w, r, s, seeds, z, z2, mask, known, g, reads, writes, coef, clip, row, backend):
    for name, slots in (("reads", reads), ("writes", writes)):
        for k in slots:
            if not 0 <= k < len(history):
                raise ValueError(f"{name} has slot {k} but history has {len(history)} tensors")
    args = StepArgs(
        x=x, out=x, m=m, coef=tuple(coef), row=row, m_c=m_c,
        h_read=tuple(history[k] for k in reads), h_write=tuple(history[k] for k in writes),
        w=w, r=r, s=s, clip=clip, seeds=seeds, z=z, z2=z2, mask=mask, known=known, g=g,
    )
    step(args, backend)


@_step_op.register_fake
def _step_op_fake(x, history, m, m_c, w, r, s, seeds, z, z2, mask, known, g, reads, writes, coef, clip, row,
                  backend):
    return None


def step_op(
    x: torch.Tensor,
    m: torch.Tensor,
    coef,
    *,
    row: int = 0,
    history=(),
    reads=(),
    writes=(),
    m_c: torch.Tensor | None = None,
    w: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
    s: torch.Tensor | None = None,
    clip: int = 0,
    seeds: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    z2: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    g: torch.Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One plan row as the custom op ``torch.ops.fastdiff.step``: updates ``x`` and ``history`` in place.

    Same contract as :func:`step` with ``out=x``: ``x``, ``m``, ``m_c``, ``z``, ``z2``, ``mask``,
    ``known``, ``g`` and every ``history[k]`` share ``x``'s shape ``[B, ...]``, dtype and device; ``w``,
    ``r``, ``s`` are float32 ``[B]``; ``seeds`` int64 ``[B]``; ``coef`` is ``args.N_COEF`` floats
    (:func:`fastdiff.core.args.pack_row`, whose last entry ``c_g`` scales ``g``: ``e += c_g * g``).
    ``reads``/``writes`` are slot indices into ``history``
    (the row's ``reads`` and ``[w.slot for w in writes]``). Traceable by torch.compile.
    """
    torch.ops.fastdiff.step(
        x, list(history), m, m_c, w, r, s, seeds, z, z2, mask, known, g,
        [int(k) for k in reads], [int(k) for k in writes], [float(c) for c in coef], int(clip), int(row), backend,
    )
