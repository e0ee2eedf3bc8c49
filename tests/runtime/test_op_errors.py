"""Hostile inputs to :mod:`fastdiff.runtime.ops`, table-driven.

Every case starts from one valid row that uses every operand (guidance with rescale, dynamic
clipping, two history reads and two writes, Philox noise, the mask blend with external
known-region noise, classifier guidance, a two-copy next model input and the non-finite flag) and
spoils one argument: wrong shapes, dtypes, devices (meta), short or long per-sample and history
tensors, non-tensors, non-contiguous views of a wrong shape or dtype, expanded outputs, outputs
that require grad, NaN/Inf or non-numeric coefficients, bad clip codes and Philox row words, too
many history tensors. Each must raise the exception type the table names, with a message naming
the argument, before any caller tensor changes, on every backend (``reference``, ``cpu``, and
``triton`` under ``TRITON_INTERPRET=1`` for a few cases), through :func:`fastdiff.runtime.ops.step` and
:func:`fastdiff.runtime.ops.prepare`. The cases a fused kernel would read or write out of bounds with
``check=False`` are also refused by :func:`fastdiff.runtime.ops.check_extents`.

Hostile-looking inputs that are *accepted* (non-contiguous, expanded and negated views, outputs
aliasing or partly overlapping inputs) must give what ``reference`` gives. Last, model outputs the
prepared loop (:mod:`fastdiff.runtime.executor`) must refuse by name after step 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import pytest
import torch

import fastdiff
from fastdiff.runtime import ops
from fastdiff.core.args import C_AE, C_AX, C_G, C_KNOWN_A, C_KNOWN_S, C_OUT, C_U, C_W0, C_W1, N_COEF, StepArgs
from fastdiff.runtime.executor import Call, Executor
from fastdiff.core.plan import OP_D, OP_E, OP_H, OP_X, OP_Z

B, TAIL = 3, (2, 5)
SHAPE = (B, *TAIL)

BACKENDS = [b for b in ("reference", "cpu") if ops.backend_status(b)[0]]
TRITON = ops.backend_status("triton")[0]  # CUDA, or the interpreter (tests/backends/conftest.py sets it)


def _coef() -> list[float]:
    c = [0.0] * N_COEF
    c[C_AX], c[C_AE] = 0.9, -0.3
    for k, v in {OP_X: 0.5, OP_D: 0.4, OP_E: 0.1, OP_H: 0.2, OP_H + 1: -0.1, OP_Z: 0.05}.items():
        c[C_OUT + k] = v
    c[C_W0 + OP_X], c[C_W0 + OP_E], c[C_W0 + OP_Z] = 1.0, 0.2, 0.3
    c[C_W1 + OP_D] = 1.0
    c[C_KNOWN_A], c[C_KNOWN_S], c[C_G], c[C_U] = 0.8, 0.6, 0.5, 1.5
    return c


def _row(seed: int = 0) -> StepArgs:
    """A valid row using every operand (fresh tensors; the same values for the same seed)."""
    g = torch.Generator().manual_seed(seed)

    def f() -> torch.Tensor:
        return torch.randn(SHAPE, generator=g)

    return StepArgs(
        x=f(), out=torch.zeros(SHAPE), m=f(), coef=tuple(_coef()), row=5, m_c=f(), h_read=(f(), f()),
        h_write=(torch.zeros(SHAPE), torch.zeros(SHAPE)), w=torch.full((B,), 3.0), r=torch.rand(B, generator=g) + 0.5,
        s=torch.full((B,), 1.5), clip=2, seeds=torch.arange(1, B + 1) * 7919, z=None, z2=f(),
        mask=(torch.rand(SHAPE, generator=g) > 0.5).float(), known=f(), g=f(), u=torch.zeros(2 * B, *TAIL),
        flag=torch.zeros(1, dtype=torch.int32),
    )


def _get(args: StepArgs, field: str):
    if field.endswith("]"):
        name, k = field[:-1].split("[")
        return getattr(args, name)[int(k)]
    return getattr(args, field)


def _set(args: StepArgs, field: str, value) -> None:
    if field.endswith("]"):
        name, k = field[:-1].split("[")
        seq = list(getattr(args, name))
        seq[int(k)] = value
        setattr(args, name, tuple(seq))
    else:
        setattr(args, field, value)


def _tensors(args: StepArgs) -> dict[str, torch.Tensor]:
    """Every tensor ``args`` holds that has memory, by field name."""
    out = {}
    for f in fields(StepArgs):
        v = getattr(args, f.name)
        items = [(f"{f.name}[{k}]", t) for k, t in enumerate(v)] if isinstance(v, (tuple, list)) else [(f.name, v)]
        for name, t in items:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                out[name] = t
    return out


@dataclass(frozen=True)
class Case:
    """One hostile input: ``spoil(args)`` changes one argument of a valid row; the step must raise
    ``exc`` with ``name`` in the message. ``extents``: a kernel would leave the tensors' memory with
    it (``check_extents`` refuses it too)."""

    id: str
    spoil: Callable[[StepArgs], None]
    exc: type
    name: str
    extents: bool


def _replace(field: str, make: Callable[[torch.Tensor], object]) -> Callable[[StepArgs], None]:
    def spoil(a: StepArgs) -> None:
        t = _get(a, field)
        _set(a, field, make(t if t is not None else torch.randn(SHAPE)))  # z: external noise given, but spoilt
    return spoil


def _nc(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous (transposed-memory) layout."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


ELEMENT_FIELDS = ["out", "m", "m_c", "z", "z2", "mask", "known", "g", "h_read[0]", "h_read[1]", "h_write[0]",
                  "h_write[1]"]
OUTPUT_FIELDS = ["out", "h_write[0]", "h_write[1]"]

# (id, make(t) from the field's valid tensor, exception, a kernel would leave its memory)
ELEMENT_SPOILS = [
    ("short_batch", lambda t: t[:-1], ValueError, True),
    ("one_sample", lambda t: t[:1], ValueError, True),
    ("short_tail", lambda t: t[..., :-1], ValueError, True),  # non-contiguous, too
    ("long_batch", lambda t: torch.cat([t, t[:1]]), ValueError, True),
    ("flat", lambda t: t.reshape(-1), ValueError, False),
    ("permuted_shape", lambda t: t.reshape(B, TAIL[1], TAIL[0]), ValueError, False),
    ("extra_dim", lambda t: t.unsqueeze(0), ValueError, False),
    ("zero_dim", lambda t: t.flatten()[0].clone(), ValueError, True),
    ("float64", lambda t: t.double(), TypeError, True),
    ("float16", lambda t: t.half(), TypeError, True),
    ("bfloat16", lambda t: t.bfloat16(), TypeError, True),
    ("int32", lambda t: t.int(), TypeError, True),
    ("bool", lambda t: t > 0, TypeError, True),
    ("nc_float64", lambda t: _nc(t.double()), TypeError, True),
    ("nc_short_batch", lambda t: _nc(t[:-1]), ValueError, True),
    ("meta", lambda t: torch.empty(SHAPE, device="meta"), ValueError, True),
    ("list", lambda t: t.tolist(), TypeError, True),
    ("numpy", lambda t: t.numpy(), TypeError, True),
]
OUTPUT_SPOILS = [
    ("expanded", lambda t: t[:1].expand(SHAPE), ValueError, False),
    ("requires_grad", lambda t: torch.zeros(SHAPE, requires_grad=True), ValueError, False),
]
PER_SAMPLE_SPOILS = [
    ("short", lambda t: t[:-1], ValueError, True),
    ("one", lambda t: t[:1], ValueError, True),
    ("long", lambda t: torch.cat([t, t[:1]]), ValueError, True),
    ("empty", lambda t: t[:0], ValueError, True),
    ("column", lambda t: t[:, None], ValueError, False),
    ("zero_dim", lambda t: t[0].clone(), ValueError, True),
    ("strided_short", lambda t: t.repeat(2)[::3], ValueError, True),
    ("float16", lambda t: t.half(), ValueError, True),
    ("meta", lambda t: torch.empty(B, dtype=t.dtype, device="meta"), ValueError, True),
    ("list", lambda t: t.tolist(), TypeError, True),
]
PER_SAMPLE_DTYPES = {"w": (torch.float64, torch.int32), "r": (torch.float64, torch.bfloat16),
                     "s": (torch.float64, torch.int64), "seeds": (torch.int32, torch.float32)}


def _missing(field: str) -> Callable[[StepArgs], None]:
    return lambda a: _set(a, field, None)


def _u(make: Callable[[], object]) -> Callable[[StepArgs], None]:
    return lambda a: setattr(a, "u", make())


def _flag(make: Callable[[], object]) -> Callable[[StepArgs], None]:
    return lambda a: setattr(a, "flag", make())


def _coef_at(i: int, v) -> Callable[[StepArgs], None]:
    def spoil(a: StepArgs) -> None:
        c = list(a.coef)
        c[i] = v
        a.coef = tuple(c)
    return spoil


def _attr(name: str, v) -> Callable[[StepArgs], None]:
    return lambda a: setattr(a, name, v)


def _x(make: Callable[[torch.Tensor], object]) -> Callable[[StepArgs], None]:
    return lambda a: setattr(a, "x", make(a.x))


def _cases() -> list[Case]:
    cases = []
    for field in ELEMENT_FIELDS:
        spoils = ELEMENT_SPOILS + (OUTPUT_SPOILS if field in OUTPUT_FIELDS else [])
        for sid, make, exc, ext in spoils:
            cases.append(Case(f"{field}-{sid}", _replace(field, make), exc, field, ext))
    for field, dtypes in PER_SAMPLE_DTYPES.items():
        for sid, make, exc, ext in PER_SAMPLE_SPOILS:
            cases.append(Case(f"{field}-{sid}", _replace(field, make), exc, field, ext))
        for dt in dtypes:
            cases.append(Case(f"{field}-{str(dt)[6:]}", _replace(field, lambda t, dt=dt: t.to(dt)), ValueError, field,
                              True))
    cases += [
        Case("w-missing", _missing("w"), ValueError, "w", False),
        Case("s-missing", _missing("s"), ValueError, "s", False),
        Case("seeds-missing", _missing("seeds"), ValueError, "seeds", False),
        Case("known-missing", _missing("known"), ValueError, "known", False),
        Case("out-missing", _missing("out"), TypeError, "out", False),
        Case("m-missing", _missing("m"), TypeError, "m", False),
        Case("h_read[1]-missing", _missing("h_read[1]"), TypeError, "h_read[1]", False),
        Case("h_write[0]-missing", _missing("h_write[0]"), TypeError, "h_write[0]", False),
    ]
    u_spoils = [
        ("three_copies", lambda: torch.zeros(3 * B, *TAIL), ValueError, True),
        ("short_batch", lambda: torch.zeros(B - 1, *TAIL), ValueError, True),
        ("short_tail", lambda: torch.zeros(2 * B, TAIL[0], TAIL[1] - 1), ValueError, True),
        ("two_batches_one_copy_of_memory", lambda: torch.zeros(2 * B, TAIL[1]), ValueError, True),
        ("flat", lambda: torch.zeros(2 * B * TAIL[0] * TAIL[1]), ValueError, True),
        ("float64", lambda: torch.zeros(2 * B, *TAIL, dtype=torch.float64), ValueError, True),
        ("meta", lambda: torch.empty(2 * B, *TAIL, device="meta"), ValueError, True),
        ("expanded", lambda: torch.zeros(1, *TAIL).expand(2 * B, *TAIL), ValueError, False),
        ("requires_grad", lambda: torch.zeros(2 * B, *TAIL, requires_grad=True), ValueError, False),
        ("list", lambda: [0.0] * (2 * B), TypeError, True),
    ]
    cases += [Case(f"u-{sid}", _u(make), exc, "u", ext) for sid, make, exc, ext in u_spoils]
    flag_spoils = [
        ("two", lambda: torch.zeros(2, dtype=torch.int32)),
        ("empty", lambda: torch.zeros(0, dtype=torch.int32)),
        ("int64", lambda: torch.zeros(1, dtype=torch.int64)),
        ("float32", lambda: torch.zeros(1)),
        ("bool", lambda: torch.zeros(1, dtype=torch.bool)),
        ("meta", lambda: torch.empty(1, dtype=torch.int32, device="meta")),
    ]
    cases += [Case(f"flag-{sid}", _flag(make), ValueError, "flag", True) for sid, make in flag_spoils]
    cases.append(Case("flag-int", _flag(lambda: 0), TypeError, "flag", True))
    for i in range(N_COEF):
        cases.append(Case(f"coef[{i}]-nan", _coef_at(i, float("nan")), ValueError, f"coef[{i}]", False))
    for i in (C_AX, C_OUT + OP_Z, C_W1 + OP_D, C_KNOWN_S, C_G, C_U):
        cases.append(Case(f"coef[{i}]-inf", _coef_at(i, float("inf")), ValueError, f"coef[{i}]", False))
        cases.append(Case(f"coef[{i}]--inf", _coef_at(i, float("-inf")), ValueError, f"coef[{i}]", False))
    cases += [
        Case("coef[3]-str", _coef_at(3, "0.5"), TypeError, "coef[3]", False),
        Case("coef[4]-None", _coef_at(4, None), TypeError, "coef[4]", False),
        Case("coef[5]-complex", _coef_at(5, 1j), TypeError, "coef[5]", False),
        Case("coef-short", _attr("coef", tuple(_coef()[:-1])), ValueError, "coef", True),
        Case("coef-long", _attr("coef", tuple(_coef()) + (0.0,)), ValueError, "coef", True),
        Case("coef-empty", _attr("coef", ()), ValueError, "coef", True),
        Case("coef-None", _attr("coef", None), TypeError, "coef", True),
    ]
    for v in (3, -1, True, False, 1.0, 2.5, "2", None):
        cases.append(Case(f"clip-{v!r}", _attr("clip", v), ValueError, "clip", True))
    for v, exc in ((-1, ValueError), (2**32, ValueError), (2**40, ValueError), (1.5, TypeError), (5.0, TypeError),
                   ("5", TypeError), (None, TypeError), (True, TypeError)):
        cases.append(Case(f"row-{v!r}", _attr("row", v), exc, "row", False))
    cases += [
        Case("h_read-five", lambda a: setattr(a, "h_read", (*a.h_read, *a.h_read, *a.h_read[:1])), ValueError,
             "h_read", True),
        Case("h_write-three", lambda a: setattr(a, "h_write", (*a.h_write, torch.zeros(SHAPE))), ValueError,
             "h_write", True),
        Case("h_read-tensor", lambda a: setattr(a, "h_read", a.h_read[0]), TypeError, "h_read", True),
        Case("x-int32", _x(lambda t: t.int()), TypeError, "x", True),
        Case("x-bool", _x(lambda t: t > 0), TypeError, "x", True),
        Case("x-complex", _x(lambda t: t.to(torch.complex64)), TypeError, "x", True),
        Case("x-zero_dim", _x(lambda t: t.flatten()[0].clone()), ValueError, "x", True),
        Case("x-empty_batch", _x(lambda t: t[:0]), ValueError, "x", True),
        Case("x-list", _x(lambda t: t.tolist()), TypeError, "x", True),
        Case("x-float64", _x(lambda t: t.double()), TypeError, "out", True),  # the others now disagree with x
    ]
    return cases


CASES = _cases()
EXTENT_CASES = [c for c in CASES if c.extents]
TRITON_CASES = {"h_read[1]-short_batch", "w-short", "seeds-short", "u-three_copies", "coef[0]-nan", "clip-3"}


def _backend_params():
    params = [pytest.param(be, c, id=f"{be}-{c.id}") for be in BACKENDS for c in CASES]
    if TRITON:
        params += [pytest.param("triton", c, id=f"triton-{c.id}") for c in CASES if c.id in TRITON_CASES]
    return params


def _hostile(case: Case) -> tuple[StepArgs, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The spoilt row, and every tensor it (or the valid row it came from) holds, with their copies."""
    args = _row()
    held = {f"valid.{k}": t for k, t in _tensors(args).items()}
    case.spoil(args)
    held.update(_tensors(args))
    return args, held, {k: t.detach().clone() for k, t in held.items()}


def _assert_refused(run: Callable[[], object], case: Case, held, before) -> None:
    with pytest.raises(case.exc) as info:
        run()
    msg = str(info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(case.name)}(?![\w\[])", msg), f"{case.name!r} not named in: {msg}"
    for k, t in held.items():
        assert torch.equal(t.detach(), before[k]), f"{k} changed although the step was refused"


def test_the_valid_row_runs_and_matches_reference():
    outs = {}
    for be in BACKENDS:
        a = _row()
        ops.step(a, backend=be)
        outs[be] = a
    for be, a in outs.items():
        for name, t in _tensors(a).items():
            torch.testing.assert_close(t, _tensors(outs["reference"])[name], rtol=1e-5, atol=1e-5, msg=f"{be} {name}")
    assert len(CASES) >= 300 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("backend", "case"), _backend_params())
def test_hostile_step_is_refused_by_name(backend, case):
    args, held, before = _hostile(case)
    _assert_refused(lambda: ops.step(args, backend=backend), case, held, before)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_row_is_refused_when_prepared(case):
    args, held, before = _hostile(case)
    _assert_refused(lambda: ops.prepare([_row(1), args], backend="auto"), case, held, before)


@pytest.mark.parametrize("case", EXTENT_CASES, ids=[c.id for c in EXTENT_CASES])
def test_out_of_bounds_rows_are_refused_by_check_extents(case):
    # what a fused kernel would read or write past a tensor's end with ops.step(check=False)
    # (a heap overflow under `make asan`): check_extents, the cheap subset, refuses it by name
    args, held, before = _hostile(case)
    _assert_refused(lambda: ops.check_extents(args), case, held, before)
    for backend in BACKENDS:  # and ops.step(check=False) runs those checks
        _assert_refused(lambda b=backend: ops.step(args, backend=b, check=False), case, held, before)


def test_check_extents_passes_the_valid_row_and_the_accepted_layouts():
    ops.check_extents(_row())
    for _, make in ACCEPTED:
        ops.check_extents(make(0))


def test_step_op_refuses_bad_slots_and_coefficients():
    a = _row()
    x, hist = a.x.clone(), [h.clone() for h in a.h_read]
    kw = dict(history=hist, m_c=a.m_c, w=a.w, s=a.s, clip=2, seeds=a.seeds, backend="cpu" if "cpu" in BACKENDS else
              "reference")
    before = [x.clone(), *[h.clone() for h in hist]]
    for reads, writes, coef, exc, name in (((0, 2), (), a.coef, ValueError, "reads"),
                                           ((0,), (-1,), a.coef, ValueError, "writes"),
                                           ((0, 1), (0,), [float("nan")] + list(a.coef[1:]), ValueError, "coef[0]"),
                                           ((0, 1), (0,), list(a.coef[:-1]), ValueError, "coef")):
        with pytest.raises(exc, match=re.escape(name)):
            ops.step_op(x, a.m, coef, reads=reads, writes=writes, **kw)
        for t, b in zip([x, *hist], before):
            assert torch.equal(t, b)


# ---------------------------------------------------------------------------------------------
# The backends called directly, past ops.validate: reference refuses what the compiled ones refuse


def _direct(**kw) -> StepArgs:
    x = torch.randn(2, 8)
    coef = list(kw.pop("coef", (0.0,) * N_COEF))
    if kw.pop("noise", False):
        coef[C_OUT + OP_Z] = 1.0
    return StepArgs(**{"x": x, "out": torch.zeros_like(x), "m": x.clone(), "coef": tuple(coef), **kw})


DIRECT = {
    "clip-3": lambda: _direct(clip=3, s=torch.ones(2)),
    "clip--1": lambda: _direct(clip=-1),
    "coef-29": lambda: _direct(coef=(0.0,) * 29),
    "coef-31": lambda: _direct(coef=(0.0,) * 31),
    "w-missing": lambda: _direct(m_c=torch.randn(2, 8)),
    "s-missing": lambda: _direct(clip=1),
    "known-missing": lambda: _direct(mask=torch.ones(2, 8)),
    "seeds-missing": lambda: _direct(noise=True),
    "h_read-five": lambda: _direct(h_read=(torch.randn(2, 8),) * 5),
    "h_write-three": lambda: _direct(h_write=(torch.zeros(2, 8),) * 3),
    "u-three_copies": lambda: _direct(u=torch.zeros(6, 8)),
}


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no cpu backend")
@pytest.mark.parametrize("name", list(DIRECT))
def test_reference_step_refuses_what_the_compiled_backends_refuse(name):
    from fastdiff.backends import cpu, reference

    errors = []
    for be in (reference, cpu):
        args = DIRECT[name]()
        held = _tensors(args)
        before = {k: t.clone() for k, t in held.items()}
        with pytest.raises((ValueError, TypeError)) as info:
            be.step(args)
        errors.append(info.value)
        for k, t in held.items():
            assert torch.equal(t, before[k]), f"{be.NAME}: {k} changed"
    ref, comp = errors
    assert isinstance(ref, ValueError)
    if isinstance(comp, ValueError):  # (too many history tensors: the pointer list no longer fits: TypeError)
        assert str(ref) == str(comp)


# ---------------------------------------------------------------------------------------------
# Accepted: any strides, expanded or negated inputs, outputs aliasing or overlapping inputs


def _accept_transposed(seed):
    a = _row(seed)
    a.m, a.h_read, a.known = _nc(a.m), (_nc(a.h_read[0]), a.h_read[1]), _nc(a.known)
    return a


def _accept_expanded_inputs(seed):
    a = _row(seed)
    a.m_c, a.z2, a.w = a.m_c[:1].expand(SHAPE), a.z2[:, :1].expand(SHAPE), a.w[:1].expand(B)
    return a


def _accept_strided_per_sample(seed):
    a = _row(seed)
    a.s, a.seeds = a.s.repeat(2)[::2], a.seeds.repeat_interleave(2)[::2]
    return a


def _accept_in_place(seed):
    a = _row(seed)
    a.out, a.h_write = a.x, (a.h_read[0], a.h_read[1])
    return a


def _accept_two_outputs_one_tensor(seed):
    a = _row(seed)
    a.h_write = (a.h_write[0], a.out)  # written twice: the later write (h_write[1]) wins, as in reference
    a.u = None  # (what u gets then: test_model_input_when_a_history_write_aliases_out)
    return a


def _accept_out_overlapping_m(seed):
    a = _row(seed)
    n = a.x.numel()
    buf = torch.randn(n + 7, generator=torch.Generator().manual_seed(seed + 1))
    a.m, a.out = buf[:n].view(SHAPE), buf[7:].view(SHAPE)
    return a


def _accept_u_holding_m(seed):
    a = _row(seed)
    a.u = torch.cat([a.m, a.m])
    a.m = a.u[:B]  # the model output inside the next model input the step writes
    return a


def _accept_flag_inside_seeds(seed):
    a = _row(seed)
    a.flag = a.seeds.view(torch.int32)[1:2]  # the high word of the first seed (zero)
    return a


def _accept_negated_views(seed):
    a = _row(seed)
    a.m = torch._neg_view(-a.m)
    c = torch.complex(a.h_read[1], -a.g)
    a.h_read, a.g = (a.h_read[0], c.real), c.conj().imag  # .imag of a conjugate: a negated, strided view
    return a


def _accept_input_requiring_grad(seed):
    a = _row(seed)
    a.m = a.m.requires_grad_(True)
    return a


ACCEPTED = [("transposed", _accept_transposed), ("expanded_inputs", _accept_expanded_inputs),
            ("strided_per_sample", _accept_strided_per_sample), ("in_place", _accept_in_place),
            ("two_outputs_one_tensor", _accept_two_outputs_one_tensor),
            ("out_overlapping_m", _accept_out_overlapping_m), ("u_holding_m", _accept_u_holding_m),
            ("flag_inside_seeds", _accept_flag_inside_seeds), ("negated_views", _accept_negated_views),
            ("input_requiring_grad", _accept_input_requiring_grad)]


def _accepted_params():
    params = [pytest.param(be, make, id=f"{be}-{name}") for be in BACKENDS if be != "reference"
              for name, make in ACCEPTED]
    if TRITON:
        params += [pytest.param("triton", make, id=f"triton-{name}") for name, make in ACCEPTED
                   if name in ("transposed", "negated_views")]
    return params


@pytest.mark.parametrize(("backend", "make"), _accepted_params())
def test_accepted_layouts_and_aliasing_equal_reference(backend, make):
    want, got = make(0), make(0)
    ops.step(want, backend="reference")
    ops.step(got, backend=backend)
    w, g = _tensors(want), _tensors(got)
    assert w.keys() == g.keys()
    for name in w:  # every tensor, inputs included: those no output aliases are unchanged in both
        torch.testing.assert_close(g[name].detach(), w[name].detach(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="no cpu backend")
def test_model_input_when_a_history_write_aliases_out():
    """u is u_scale * x' as stored, whatever a history write aliasing out leaves there afterwards (as
    the CUDA and Triton kernels compute it from x' in registers); the cpu kernel's vector body once
    read it back after the history writes and its tail did not."""
    from fastdiff.backends import cpu

    if cpu._C.simd_level() == "scalar":
        pytest.skip("one lane: no tail")
    a, b = _accept_two_outputs_one_tensor(0), _accept_two_outputs_one_tensor(0)
    a.u, b.u = torch.zeros(2 * B, *TAIL), torch.zeros(2 * B, *TAIL)  # 30 elements: a tail at every SIMD level
    ops.step(a, backend="reference")
    ops.step(b, backend="cpu")
    torch.testing.assert_close(b.u, a.u, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The prepared loop: a model output without memory after step 0 is refused by name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("check_finite", [False, True])
@pytest.mark.parametrize("kind", ["meta", "sparse"])
def test_model_output_without_dense_memory_after_step_0_is_refused_by_name(backend, check_finite, kind):
    plan = fastdiff.make_plan("euler", 4)
    ex = Executor(plan, (2, 4), torch.float32, "cpu", backend=backend, check_finite=check_finite)
    calls = []

    def model(x, t):
        calls.append(1)
        if len(calls) == 1:
            return x * 0.5
        return torch.empty(x.shape, device="meta") if kind == "meta" else (x * 0.5).to_sparse()

    x0 = torch.randn(2, 4)
    before = x0.clone()
    want = "is on meta and has no memory" if kind == "meta" else "is on cpu and is a torch.sparse_coo tensor"
    with pytest.raises(ValueError, match=f"model output at step {plan.rows[1].step} {want}; expected a dense tensor "
                                         "on cpu"):
        ex.run(model, x0, Call(seeds=[1, 2]))
    assert torch.equal(x0, before) and len(calls) == 2
    assert ex.run(lambda x, t: x * 0.5, x0, Call(seeds=[1, 2])).shape == (2, 4)  # the executor still works
