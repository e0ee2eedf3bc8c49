"""Building plans and transforming them, below :mod:`fastdiff.api` (which calls them) and
:mod:`fastdiff.tasks` (the user-facing tasks that run them): :func:`make_plan`, the known region of
inpainting, RePaint's jumps, a run that starts part-way, and its noised initial state.

**Inpainting.** The known region enters the fused step's mask blend ``x' = mask*x' + (1-mask)*
(known_a*known + known_s*z2)``: after row ``i`` the state is at the noise level of row ``i+1``,
whose model input is ``u = alpha_t x0 + sigma_t eps = in_scale * x``, so the known image is
re-noised to ``known_a = alpha_t / in_scale`` and ``known_s = sigma_t / in_scale`` of that row
(clean after the last row). The re-noising noise ``z2`` is Philox stream 1 (or drawn like the
solver noise). See :func:`with_known_region`.

**RePaint** (Lugmayr et al. 2022; :func:`repaint_plan`, :func:`repaint`): the solver steps follow
diffusers' ``RePaintScheduler`` schedule: after some steps the state is re-noised ``jump_length``
levels back up (the forward process from level ``a`` to the higher level ``b``:
``u_b = (alpha_b/alpha_a) u_a + sqrt(sigma_b^2 - (alpha_b sigma_a/alpha_a)^2) z``, which is
``sqrt(abar_b/abar_a) x + sqrt(1 - abar_b/abar_a) z`` on a VP schedule and ``x + sqrt(s_b^2 - s_a^2) z``
on a k-style one, written in the sampler's state space ``x = u / in_scale``) and those steps are
run again, ``jump_n_sample - 1`` extra times per jump point. The re-noising is linear, so it is
FUSED into the plan row that ends before the jump: every coefficient of the row's update is
multiplied by the jump's gain and its noise coefficient becomes ``sqrt((gain c_z)^2 + s^2)`` (one
draw of the sum of two independent Gaussians). No extra rows, no model evaluations and no loop
changes: the plan just has more rows (one per solver step taken), and the known region is
re-noised at every row by :func:`with_known_region` as above. Jumps need a sampler without
history across steps (DDPM, DDIM, Euler, Euler ancestral, Heun, DPM-2, flow Euler/Heun).

**Starting part-way** (:func:`plan_from_step`, :func:`denoise`, and ``fastdiff.sample(image=,
strength=|start_step=)``): the plan of a run that starts at solver step ``k`` of an ``n``-step
schedule, as diffusers' img2img runs ``timesteps[t_start:]`` after ``set_begin_index(t_start)``
(``t_start = n - int(n * strength)``). Samplers whose rows from ``k`` on read no history written
before ``k`` are sliced (their rows do not depend on earlier ones); multistep samplers (DPM-Solver++
2M/3M and SDE variants, UniPC, LMS) are re-planned on the grid from ``k`` on, so their history
starts empty and the first steps take the lower orders of a warm-up, as in diffusers (the same
re-planning the drop-in schedulers of :mod:`fastdiff.diffusers` use; LMS then follows
k-diffusion's sliced sigmas, not diffusers' LMS, which truncates its coefficients differently).
The initial state is the image noised to the first row's level:
``x = (alpha_t * image + sigma_t * noise) / in_scale``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import samplers
from ..core import validate
from ..core.plan import Plan, Row, check_prediction
from ._multistep import Grid
from ..core.schedules import Discretization


def make_plan(sampler: str, steps: int, schedule: Any = None, prediction: str | None = None, **options) -> Plan:
    """Build the plan ``fastdiff.sample`` would run (see :func:`fastdiff.samplers.build`)."""
    validate.plan_args(sampler, schedule)
    validate.steps(steps)
    if prediction is not None:
        prediction = check_prediction(prediction)
    return samplers.build(sampler, schedule, steps, prediction=prediction, **options)


class OwnGrid:
    """A schedule whose grid is given as arrays (a diffusers scheduler's own ``set_timesteps``, or
    a full run's grid sliced from a step on): mixed into a schedule class by the drop-in schedulers
    and :func:`plan_from_step`."""

    def _own(self, steps: int, what: str):
        value = self.arrays[what]
        n = self.arrays["steps"]
        if steps != n:
            raise ValueError(f"this schedule holds the scheduler's own grid of {n} steps; {steps} were asked for")
        return value

    def discretize(self, steps: int, spacing_default: str = "") -> Discretization:
        """The scheduler's own sigmas and timesteps."""
        return self._own(steps, "disc")

    def timesteps(self, steps: int, spacing_default: str = "") -> np.ndarray:
        """The scheduler's own integer timesteps (DDPM, DDIM)."""
        return self._own(steps, "timesteps")

    def own_multistep_grid(self, steps: int) -> Grid:
        """The multistep grid from the scheduler's own sigmas (DPM-Solver, UniPC)."""
        return self._own(steps, "grid")


MASK_UNSUPPORTED = frozenset({"unipc"})
"""Samplers whose next state is rebuilt from the history ring (UniPC's corrector), so blending
``x'`` alone would be overwritten: a mask (and an ILVR projection) is refused for them."""

# ------------------------------------------------------------------------------------- inpainting


def with_known_region(plan: Plan) -> Plan:
    """``plan`` with every row's ``known_a``/``known_s`` set for inpainting (see the module doc)."""
    if plan.sampler in MASK_UNSUPPORTED:
        raise ValueError(f"sampler {plan.sampler!r} rebuilds its state from history, so a mask cannot be "
                         "blended into it; use e.g. dpmpp_2m, euler, ddim or ddpm for inpainting")
    rows = list(plan.rows)
    out = []
    for i, r in enumerate(rows):
        if i + 1 < len(rows):
            nxt = rows[i + 1]
            if nxt.alpha_t is None or nxt.sigma_t is None:
                raise ValueError(f"sampler {plan.sampler!r} does not give alpha_t/sigma_t on its rows; "
                                 "inpainting needs them")
            ka, ks = nxt.alpha_t / nxt.in_scale, nxt.sigma_t / nxt.in_scale
        else:
            ka, ks = 1.0 / plan.out_scale, 0.0
        out.append(dataclasses.replace(r, known_a=ka, known_s=ks, noise=r.noise))
    return dataclasses.replace(plan, rows=tuple(out))


def row_level(row: Row, plan: Plan) -> tuple[float, float, float]:
    """``(alpha, sigma, in_scale)`` of the state a row starts from: ``in_scale x = alpha x0 + sigma eps``."""
    if row.alpha_t is None or row.sigma_t is None:
        raise ValueError(f"sampler {plan.sampler!r} does not give alpha_t/sigma_t on its rows; this task needs them")
    return float(row.alpha_t), float(row.sigma_t), float(row.in_scale)


def levels_after(plan: Plan) -> list[tuple[float, float, float]]:
    """The level of the state after each row: the next row's, and clean (``out_scale x = x0``) at the end."""
    return [row_level(plan.rows[i + 1], plan) for i in range(len(plan.rows) - 1)] + [(1.0, 0.0, float(plan.out_scale))]


def steps_of(plan: Plan) -> list[list[Row]]:
    """Rows grouped by solver step (``plan.steps`` groups, in order)."""
    blocks: list[list[Row]] = []
    for r in plan.rows:
        if r.step == len(blocks):
            blocks.append([r])
        elif blocks and r.step == len(blocks) - 1:
            blocks[-1].append(r)
        else:
            raise ValueError(f"plan rows are not grouped by consecutive steps (row of step {r.step} after step "
                             f"{len(blocks) - 1})")
    return blocks


def _reads_outside(rows: Sequence[Row]) -> bool:
    """Whether some row reads a history slot that no earlier row of ``rows`` wrote."""
    written: set[int] = set()
    for r in rows:
        if any(s not in written for s in r.reads):
            return True
        written.update(w.slot for w in r.writes)
    return False


def repaint_schedule(steps: int, jump_length: int = 10, jump_n_sample: int = 10) -> list[int]:
    """The inference-step sequence of diffusers' ``RePaintScheduler.set_timesteps`` (``timesteps // (T // steps)``).

    Entry ``t`` is a model evaluation at inference index ``t`` (solver step ``steps - 1 - t``) when it is
    smaller than the entry before it, else one level of re-noising ("undo"). Jump points are
    ``t = 0, jump_length, 2 jump_length, ... < steps - jump_length``, each jumped ``jump_n_sample - 1`` times.
    """
    for name, v in (("steps", steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    jumps = {j: jump_n_sample - 1 for j in range(0, steps - jump_length, jump_length)}
    seq, t = [], steps
    while t >= 1:
        t -= 1
        seq.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                seq.append(t)
    return seq


def _jump(row: Row, a: tuple[float, float, float], b: tuple[float, float, float]) -> Row:
    """``row`` followed by forward re-noising from level ``a`` to the noisier level ``b``, fused."""
    (al_a, s_a, in_a), (al_b, s_b, in_b) = a, b
    ratio = al_b / al_a
    var = s_b * s_b - (ratio * s_a) ** 2
    if var < -1e-12 * max(s_b * s_b, 1e-300):
        raise ValueError(f"a RePaint jump must go to a noisier level (sigma/alpha {s_a / al_a:g} -> {s_b / al_b:g})")
    gain = ratio * in_a / in_b
    s = math.sqrt(max(var, 0.0)) / in_b
    out = tuple(gain * c for c in row.out)
    out = out[:-1] + (math.hypot(out[-1], s),)
    return dataclasses.replace(row, out=out, noise=True)


def repaint_plan(plan: Plan, jump_length: int = 10, jump_n_sample: int = 10) -> Plan:
    """``plan`` with RePaint's resampling jumps (see the module doc); apply :func:`with_known_region` after.

    Rows of step ``s`` keep ``step = s`` when a step is run again (per-step guidance lists still
    apply); the plan has one row per solver step taken, so its length is the number of model
    evaluations. ``jump_n_sample = 1`` (or ``jump_length >= steps``) leaves the plan unchanged.
    """
    if any(r.known_s != 0.0 or r.known_a != 1.0 for r in plan.rows):
        raise ValueError("apply repaint_plan before with_known_region (the known region's level follows the rows)")
    if any(getattr(r, "snr", 0.0) for r in plan.rows):
        raise ValueError("RePaint jumps are not defined for plans with Langevin corrector rows")
    blocks = steps_of(plan)
    n = len(blocks)
    seq = repaint_schedule(n, jump_length, jump_n_sample)
    if len(seq) == n:
        return plan
    for s, blk in enumerate(blocks):
        if _reads_outside(blk):
            raise ValueError(f"sampler {plan.sampler!r} carries history across steps (step {s} reads it), which "
                             "RePaint's jumps would invalidate; use a sampler without it (ddpm, ddim, euler, "
                             "euler_ancestral, heun, dpm_2, flow_euler)")
    end = (1.0, 0.0, float(plan.out_scale))

    def level(s: int) -> tuple[float, float, float]:
        return end if s == n else row_level(blocks[s][0], plan)

    rows: list[Row] = []
    cur, jump_from, last = 0, None, seq[0] + 1
    for t in seq:
        if t < last:  # a solver step
            s = n - 1 - t
            if jump_from is not None:
                rows[-1] = _jump(rows[-1], level(jump_from), level(s))
                jump_from = None
            if s != cur:
                raise AssertionError(f"RePaint schedule is inconsistent: step {s} at level {cur}")
            rows.extend(blocks[s])
            cur = s + 1
        else:  # one level of re-noising
            if jump_from is None:
                jump_from = cur
            cur -= 1
        last = t
    if jump_from is not None:
        raise AssertionError("RePaint schedule ends with a jump")
    meta = {**plan.meta, "repaint": {"jump_length": jump_length, "jump_n_sample": jump_n_sample, "nfe": len(rows)}}
    return dataclasses.replace(plan, rows=tuple(rows), meta=meta)


# ------------------------------------------------------------------------------ starting part-way


def start_step_for_strength(steps: int, strength: float) -> int:
    """diffusers img2img's ``t_start = steps - min(int(steps * strength), steps)`` (first step run)."""
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    init = min(int(steps * strength), steps)
    k = max(steps - init, 0)
    if k >= steps:
        raise ValueError(f"strength={strength} with steps={steps} runs no step (int(steps * strength) = 0)")
    return k


def resolve_start(steps: int, strength: float | None = None, start_step: int | None = None) -> int:
    """The first solver step from ``strength`` or ``start_step`` (at most one; neither: 0)."""
    if strength is not None and start_step is not None:
        raise ValueError("give strength or start_step, not both")
    if strength is not None:
        return start_step_for_strength(steps, strength)
    if start_step is None:
        return 0
    if isinstance(start_step, bool) or not isinstance(start_step, numbers.Integral) or not 0 <= start_step < steps:
        raise ValueError(f"start_step must be an int in [0, {steps}), got {start_step!r}")
    return int(start_step)


class _Arrays(dict):
    """The sliced grids of :func:`_sliced_schedule`, computed on first use."""

    def __init__(self, steps: int, makers: Mapping[str, Callable[[], Any]]):
        super().__init__(steps=steps)
        self._makers = makers

    def __missing__(self, key: str):
        if key not in self._makers:
            raise ValueError(f"no {key!r} grid for a run starting part-way; this sampler cannot start there")
        value = self[key] = self._makers[key]()
        return value


@functools.lru_cache(maxsize=None)
def _own_class(cls: type) -> type:
    """``cls`` with the own-grid methods of :class:`OwnGrid`."""
    ns = {"__annotations__": {"arrays": Mapping}, "arrays": dataclasses.field(default_factory=dict),
          "__module__": __name__, "__qualname__": f"_Sliced{cls.__name__}"}
    return dataclasses.dataclass(frozen=True, eq=False)(type(f"_Sliced{cls.__name__}", (OwnGrid, cls), ns))


def _sliced_schedule(schedule, steps: int, start: int, grid_options: Mapping[str, Any]):
    """``schedule`` whose grids for ``steps - start`` steps are its ``steps``-step grids from ``start`` on."""
    from ._multistep import multistep_grid

    def disc():
        d = schedule.discretize(steps)
        return Discretization(sigmas=d.sigmas[start:], timesteps=d.timesteps[start:], init_sigma=float(d.sigmas[start]))

    def grid():
        g = multistep_grid(schedule, steps, **grid_options)
        return Grid(g.timesteps[start:], g.sigmas[start:], g.alphas[start:], g.stds[start:], g.lambdas[start:],
                    float(g.stds[start]), g.kind)

    arrays = _Arrays(steps - start, {"disc": disc, "grid": grid})
    fields = {f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedule) if f.init and f.name != "arrays"}
    return _own_class(type(schedule))(**fields, arrays=arrays)


def _resolved_options(name: str, schedule, options: Mapping[str, Any]) -> dict:
    """Sampler options as :func:`fastdiff.samplers.build` resolves them (caller, config, default)."""
    si = samplers.info(name)
    out = {k: options[k] if k in options else schedule.options.get(k, d) for k, d in si.options.items()}
    return {k: (si.options[k] if v is None and si.options[k] is not None else v) for k, v in out.items()}


def plan_from_step(sampler: str, steps: int, start_step: int, schedule: Any = None, prediction: str | None = None,
                   **options) -> Plan:
    """The plan of a ``steps``-step run of ``sampler`` that starts at solver step ``start_step``.

    Rows are those of the full run from ``start_step`` on where they read no earlier history,
    else the run is re-planned on the grid from ``start_step`` on, with fresh multistep history
    (diffusers' img2img: ``set_timesteps(steps)``, ``set_begin_index(start_step)``). Steps are
    renumbered from 0; ``plan.meta["start_step"]`` records the start. The initial state is NOT
    ``noise * init_scale`` but the image noised to the first row's level (:func:`noised_state`);
    ``init_scale`` is the noise part's scale there, ``sigma_t / in_scale``.
    """
    from ..core import schedules

    full = make_plan(sampler, steps, schedule, prediction, **options)
    k = resolve_start(steps, start_step=start_step)
    if k == 0:
        return full
    first = next(i for i, r in enumerate(full.rows) if r.step == k)
    if not _reads_outside(full.rows[first:]):
        rows = tuple(dataclasses.replace(r, step=r.step - k) for r in full.rows[first:])
        plan = dataclasses.replace(full, rows=rows, steps=full.steps - k)
    else:
        si = samplers.info(sampler)
        if si.restart is None:
            raise ValueError(f"sampler {sampler!r} cannot start at step {k}: its rows from there read history of "
                             "earlier steps and it has no restart rule (fastdiff.samplers.Restart)")
        if schedule is None:
            schedule = samplers._default_schedule(si)
        elif not schedules.is_schedule(schedule):
            schedule = schedules.from_config(schedule)
        restart = si.restart(_resolved_options(sampler, schedule, options), k, steps)
        opts = {**options, **restart.options}
        grid_options = restart.grid
        own = _sliced_schedule(schedule, steps, k, grid_options)
        plan = samplers.build(sampler, own, steps - k, prediction=full.prediction, **opts)
        want = [r.t for r in full.rows if r.step >= k and r.stage == 0]
        got = [r.t for r in plan.rows if r.stage == 0]
        if len(got) != len(want) or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(got, want)):
            raise RuntimeError(f"the {sampler} plan from step {k} does not follow the full run's timesteps; "
                               "this is a bug")
    r0 = plan.rows[0]
    a, s, inn = row_level(r0, plan)
    meta = {**plan.meta, "start_step": k, "steps_total": steps}
    return dataclasses.replace(plan, init_scale=s / inn, meta=meta)


def noised_state(plan: Plan, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The state at the first row's level: ``(alpha_t * image + sigma_t * noise) / in_scale`` (a new tensor)."""
    if not isinstance(image, torch.Tensor) or not isinstance(noise, torch.Tensor) or image.shape != noise.shape:
        raise ValueError(f"image must be a tensor shaped like the noise {tuple(noise.shape)}, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    a, s, inn = row_level(plan.rows[0], plan)
    img = image.to(dtype=noise.dtype, device=noise.device)
    return img * (a / inn) + noise * (s / inn)


