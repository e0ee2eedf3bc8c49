"""The ``reference`` backend: a plan row op by op in plain torch (the executable specification)."""

from __future__ import annotations

import array
from contextlib import nullcontext

import torch

from ..core.args import (BLEND_ROWS, C_AE, C_AX, C_G, C_KNOWN_A, C_KNOWN_S, C_OUT, C_U, C_W0, C_W1, N_COEF, StepArgs,
                         compute_dtype)
from ..core.plan import MAX_READS, MAX_WRITES, N_OPERANDS, OP_D, OP_E, OP_H, OP_X, OP_Z
from ..core.rng import STREAM_KNOWN, STREAM_MAIN, philox_normal
from ..bench.timing import active_timer

NAME = "reference"


def available() -> tuple[bool, str]:
    """Always available: plain torch on any device."""
    return True, "plain torch"


def supports(args: StepArgs) -> bool:
    """Every dtype, device and layout."""
    return True


def _per_sample(v: torch.Tensor, ndim: int, dt: torch.dtype) -> torch.Tensor:
    return v.to(dt).reshape((-1,) + (1,) * (ndim - 1))


def _noise(args: StepArgs, ext: torch.Tensor | None, stream: int, dt: torch.dtype) -> torch.Tensor:
    x = args.x
    if ext is not None:
        return ext.to(dt)
    n = x[0].numel() if x.dim() else 1
    z = philox_normal(args.seeds.to(x.device), args.row, stream, n, x.device)
    return z.reshape(x.shape).to(dt)


def _round(coef, dt: torch.dtype) -> list[float]:
    # float32 rounding on the host (no tensors: nothing here touches a device)
    if dt == torch.float64:
        return [float(v) for v in coef]
    return array.array("f", coef).tolist()


def _no_region(name: str):
    return nullcontext()


def check_codes(args: StepArgs) -> None:
    """Refuse what the compiled backends' argument unpacking refuses (``csrc/bind_args.h``:
    ``check_counts`` and ``check_pointers``), with the same messages, so that this backend called
    directly (past :func:`fastdiff.runtime.ops.validate`) is no more lenient than ``cpu`` or ``cuda``: the
    clip code, the coefficient count, the history and model-input counts, and the operands a row
    needs (``w`` with ``m_c``, ``s`` with a clip, ``known`` with ``mask``, seeds or ``z``/``z2``
    for the noise it draws). Constant work; no tensor data is read."""
    clip, n_reads, n_writes = args.clip, len(args.h_read), len(args.h_write)
    u_copies = args.u_copies
    if not 0 <= u_copies <= 2:
        raise ValueError(f"u_copies must be 0, 1 or 2, got {u_copies}")
    if n_reads > MAX_READS:
        raise ValueError(f"n_reads must be 0..{MAX_READS}, got {n_reads}")
    if n_writes > MAX_WRITES:
        raise ValueError(f"n_writes must be 0..{MAX_WRITES}, got {n_writes}")
    if type(clip) is not int or clip not in (0, 1, 2):
        raise ValueError(f"clip must be 0, 1 or 2, got {clip!r}")
    if len(args.coef) != N_COEF:
        raise ValueError(f"coef must have {N_COEF} entries, got {len(args.coef)}")
    if not args.x.numel():
        return
    for name, t, why in (("x", args.x, "always"), ("out", args.out, "always"), ("m", args.m, "always"),
                         *((f"h_read[{k}]", h, "n_reads") for k, h in enumerate(args.h_read)),
                         *((f"h_write[{j}]", h, "n_writes") for j, h in enumerate(args.h_write)),
                         ("w", args.w, "m_c is given" if args.m_c is not None and args.a is None else None),
                         ("s", args.s, "clip != 0" if clip else None),
                         ("known", args.known, "mask is given" if args.mask is not None else None)):
        if why is not None and t is None:
            raise ValueError(f"{name} is required ({why}) but its pointer is null")
    check_blend(args)
    if ((args.needs_z and args.z is None) or (args.needs_z2 and args.z2 is None)) and args.seeds is None:
        raise ValueError("seeds is required (the row draws Philox noise) but its pointer is null")


def check_blend(args: StepArgs) -> None:
    """Refuse what the compiled backends refuse about the blend operands (``csrc/bind_args.h``
    ``check_pointers``), with the same messages: ``m_2``, ``m_3`` and ``m_w`` only in blend mode (with
    ``a``), and no ``w`` or ``r`` there (the blend coefficients replace them)."""
    if args.a is None:
        for name, t in (("m_2", args.m_2), ("m_3", args.m_3), ("m_w", args.m_w)):
            if t is not None:
                raise ValueError(f"{name} is given but a is null (branches beyond m_c need blend coefficients)")
        return
    for name, t in (("w", args.w), ("r", args.r)):
        if t is not None:
            raise ValueError(f"{name} is given with a (a blend row's coefficients replace w and r)")


def blended_output(args: StepArgs, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A blend row's ``e`` (before the gradient term) and its ``m_w`` combination (``None`` without
    ``m_w``) in torch, in the compute dtype ``dt``, in the kernels' order of operations:
    ``b m + a_1 (m_c - m) + a_2 (m_2 - m) + a_3 m_3``, each term where its branch is given."""
    nd = args.x.dim()
    m = args.m.to(dt)
    diffs = [None if t is None else t.to(dt) - m for t in (args.m_c, args.m_2)]
    m3 = None if args.m_3 is None else args.m_3.to(dt)

    def combine(k0: int) -> torch.Tensor:
        acc = _per_sample(args.a[k0], nd, dt) * m
        for k, dk in enumerate(diffs):
            if dk is not None:
                acc = acc + _per_sample(args.a[k0 + 1 + k], nd, dt) * dk
        if m3 is not None:
            acc = acc + _per_sample(args.a[k0 + 3], nd, dt) * m3
        return acc

    return combine(0), (combine(BLEND_ROWS) if args.m_w is not None else None)


def step(args: StepArgs) -> None:
    """Execute one row: writes ``args.out`` and ``args.h_write`` (which may alias inputs).

    Checks what the compiled backends check on their own (:func:`check_codes`); the tensors
    themselves are :func:`fastdiff.runtime.ops.validate`'s."""
    check_codes(args)
    dt = compute_dtype(args.x.dtype)
    c = _round(args.coef, dt)  # coefficients rounded like kernels do
    a_x, a_e = c[C_AX], c[C_AE]
    out_c = c[C_OUT:C_OUT + N_OPERANDS]
    wr_c = [c[C_W0:C_W0 + N_OPERANDS], c[C_W1:C_W1 + N_OPERANDS]]
    known_a, known_s, c_g = c[C_KNOWN_A], c[C_KNOWN_S], c[C_G]
    nd = args.x.dim()

    timer = active_timer()  # the profiler times this op-by-op step's phases separately
    region = timer.region if timer is not None else _no_region
    x = args.x.to(dt)
    with region("step/guidance"):
        e, e_w = blended_output(args, dt) if args.a is not None else (args.m.to(dt), None)
        if args.a is None and args.m_c is not None:
            e = e + _per_sample(args.w, nd, dt) * (args.m_c.to(dt) - e)
        if args.r is not None:
            e = _per_sample(args.r, nd, dt) * e
        if args.g is not None:
            e = e + c_g * args.g.to(dt)
    d = a_x * x + a_e * e
    if args.clip:
        s = _per_sample(args.s, nd, dt)
        d = torch.minimum(torch.maximum(d, -s), s)
        if args.clip == 2:
            d = d / s
    need_z = out_c[OP_Z] != 0 or any(wc[OP_Z] != 0 for wc in wr_c[: len(args.h_write)])
    with region("step/noise"):
        z = _noise(args, args.z, STREAM_MAIN, dt) if need_z else None
    hist = [h.to(dt) for h in args.h_read]

    def combine(coefs):
        acc = coefs[OP_X] * x + coefs[OP_D] * d
        if coefs[OP_E] != 0:
            acc = acc + coefs[OP_E] * e
        for k, h in enumerate(hist):
            acc = acc + coefs[OP_H + k] * h
        if z is not None and coefs[OP_Z] != 0:
            acc = acc + coefs[OP_Z] * z
        return acc

    new_x = combine(out_c)
    if args.mask is not None:
        z2 = _noise(args, args.z2, STREAM_KNOWN, dt) if known_s != 0 else 0.0
        mk = args.mask.to(dt)
        new_x = mk * new_x + (1 - mk) * (known_a * args.known.to(dt) + known_s * z2)
    writes = [combine(wr_c[j]) for j in range(len(args.h_write))]
    bad = None
    if args.flag is not None:  # any model output element read is NaN or Inf
        bad = ~torch.isfinite(args.m).all()
        for t in (args.m_c, args.m_2, args.m_3):
            if t is not None:
                bad = bad | ~torch.isfinite(t).all()
    # every input is read above; only now write (outputs may alias inputs)
    args.out.copy_(new_x)
    u = None
    if args.u is not None:  # the next model input: x' as stored (before any history write that may
        # alias out), times the next row's in_scale
        u = args.out * c[C_U] if dt == torch.float64 else (args.out.to(dt) * c[C_U]).to(args.out.dtype)
    for h, v in zip(args.h_write, writes):
        h.copy_(v)
    if e_w is not None:
        args.m_w.copy_(e_w)
    if u is not None:
        for k in range(args.u_copies):
            args.u[k * args.x.shape[0]:(k + 1) * args.x.shape[0]].copy_(u)
    if bad is not None:
        args.flag.masked_fill_(bad, 1)
