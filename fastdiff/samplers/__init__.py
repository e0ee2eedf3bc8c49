"""Samplers: small pure functions from a schedule and a step count to a :class:`~fastdiff.core.plan.Plan`.

Public API::

    available() -> list[str]
    build(name, schedule, steps, *, prediction=None, **options) -> Plan
    info(name) -> SamplerInfo

Writing a sampler (one module per family under ``fastdiff/samplers/``; every module whose name
does not start with ``_`` is imported here, so dropping a module in registers its samplers)::

    from . import register
    from ._common import ...

    @register("my_sampler", kinds=("vp", "ve"), options={"eta": 0.0, "clip_sample": False})
    def my_sampler(schedule, steps: int, prediction: str, *, eta: float, clip_sample: bool) -> Plan:
        \"\"\"One line naming the paper.\"\"\"

The function receives a schedule object (never a config), ``steps >= 1`` and a normalised
prediction (``eps``/``v``/``x0``/``flow``), and every declared option as a keyword argument,
already resolved: caller's value, else the config's value (``schedule.options``, whose keys are
diffusers config names — so name options after diffusers' config keys where one exists), else the
declared default. ``build`` checks the sampler name, schedule kind, ``steps``, prediction and
option names before calling it; the sampler checks option values.
"""

from __future__ import annotations

import importlib
import numbers
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core import schedules as _schedules
from ..core.plan import PREDICTIONS, Plan, check_prediction

SamplerFn = Callable[..., Plan]


@dataclass(frozen=True)
class SamplerInfo:
    """A registered sampler.

    Attributes:
        name: the name ``build`` takes.
        fn: ``fn(schedule, steps, prediction, **options) -> Plan``.
        kinds: schedule kinds it accepts (``vp``, ``ve``, ``flow``).
        options: option name -> default.
        predictions: prediction types it accepts.
        default_prediction: used when neither the caller nor the config gives one.
        doc: the one-line docstring.
        restart: how a run started part-way is re-planned where its rows read earlier history
            (:class:`Restart`); ``None``: such a start is refused.
    """

    name: str
    fn: SamplerFn
    kinds: tuple[str, ...]
    options: Mapping[str, Any] = field(default_factory=dict)
    predictions: tuple[str, ...] = PREDICTIONS
    default_prediction: str = "eps"
    doc: str = ""
    restart: RestartFn | None = None


@dataclass(frozen=True)
class Restart:
    """How a sampler's run that starts at solver step ``start`` is re-planned when its rows from there
    read history written before ``start`` (a multistep sampler started part-way: img2img, a drop-in
    scheduler after ``set_begin_index``): on the full run's grid from ``start`` on, with fresh history.

    Attributes:
        grid: options of :func:`fastdiff.samplers._multistep.multistep_grid` for that grid (unused
            by samplers that discretize without it, and by the drop-ins, which slice their own arrays).
        options: sampler options replacing the run's for the re-planned part (rules decided on the
            WHOLE run, e.g. diffusers' ``lower_order_final`` below 15 steps, and step indices shifted).
    """

    grid: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


RestartFn = Callable[[Mapping[str, Any], int, int], Restart]
"""``restart(options, start, steps) -> Restart``: ``options`` the run's resolved sampler options,
``start`` the first solver step run, ``steps`` the WHOLE run's step count."""


_REGISTRY: dict[str, SamplerInfo] = {}


def register(name: str, *, kinds: tuple[str, ...] = ("vp", "ve"), options: Mapping[str, Any] | None = None,
             predictions: tuple[str, ...] = ("eps", "v", "x0"), default_prediction: str = "eps",
             restart: RestartFn | None = None):
    """Decorator registering ``fn`` under ``name`` (see the module docstring; ``restart``: see
    :class:`Restart`, needed only by samplers whose rows read history of earlier steps)."""

    def deco(fn: SamplerFn) -> SamplerFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"sampler {name!r} is registered twice")
        _REGISTRY[name] = SamplerInfo(name, fn, tuple(kinds), dict(options or {}), tuple(predictions),
                                      default_prediction, (fn.__doc__ or "").strip().split("\n")[0], restart)
        return fn

    return deco


def available() -> list[str]:
    """Names of every registered sampler, sorted."""
    return sorted(_REGISTRY)


def info(name: str) -> SamplerInfo:
    """The :class:`SamplerInfo` of ``name`` (``ValueError`` naming the known ones if unknown)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def _default_schedule(si: SamplerInfo):
    if si.kinds == ("flow",):
        return _schedules.FlowSchedule()
    if "vp" in si.kinds:
        return _schedules.from_config({})
    return _schedules.VESchedule()


def build(name: str, schedule: Any, steps: int, *, prediction: str | None = None, **options) -> Plan:
    """Build the plan of sampler ``name`` for ``steps`` solver steps.

    Args:
        name: one of :func:`available`.
        schedule: a fastdiff schedule, a diffusers scheduler config (dict / ``scheduler.config``),
            or ``None`` for the default schedule of the sampler's family (diffusers' defaults).
        steps: number of solver steps, an int >= 1.
        prediction: ``eps``, ``v``, ``x0``, ``flow`` (or diffusers' names); default: the config's
            ``prediction_type``, else the sampler's default (``eps``; ``flow`` for flow samplers).
        **options: sampler options (see ``info(name).options``); defaults come from the config.

    Raises:
        ValueError: unknown sampler, option or prediction, a schedule kind the sampler does not
            take, or ``steps < 1``.
    """
    si = info(name)
    if schedule is None:
        schedule = _default_schedule(si)
    elif not _schedules.is_schedule(schedule):
        schedule = _schedules.from_config(schedule)
    if schedule.kind not in si.kinds:
        raise ValueError(f"sampler {name!r} needs a {' or '.join(si.kinds)} schedule, got a {schedule.kind} schedule")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    steps = int(steps)
    if prediction is None:
        prediction = schedule.options.get("prediction_type") or si.default_prediction
    pred = check_prediction(prediction)
    if pred not in si.predictions:
        raise ValueError(f"sampler {name!r} does not support prediction {prediction!r}; supported: {si.predictions}")
    unknown = sorted(set(options) - set(si.options))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for sampler {name!r}; options: {sorted(si.options)}")
    resolved = {k: options[k] if k in options else schedule.options.get(k, d) for k, d in si.options.items()}
    resolved = {k: (si.options[k] if v is None and si.options[k] is not None else v) for k, v in resolved.items()}
    return si.fn(schedule, steps, pred, **resolved)


def _load_all() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_load_all()
