"""Image tasks on top of the plan: inpainting (with RePaint jumps), starting part-way (SDEdit,
img2img, denoising a noisy image), and super-resolution (ILVR).

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

**Super-resolution** (ILVR, Choi et al. 2021; :func:`ilvr`, :func:`super_resolution`): after
every row the low-frequency part of the state is replaced by that of the low-resolution image
noised to the state's level, ``x <- x - up(down(x)) + up(y_t)``, with ``down`` average pooling by
``factor`` and ``up`` nearest (default; then ``down(up(y)) = y`` and the final sample's
``down(x) = y`` exactly) or bilinear (smoother, ``down(x) ~ y``). This projection is linear but
not element-wise, so it runs after the fused step as a ``post_step`` hook of the loop.

Noise conventions (all keyed per sample, so results do not depend on the batch): initial noise is
Philox at row :data:`INIT_ROW`, stream 0 (as :mod:`fastdiff.distributed`); ILVR's noise of the
low-resolution image after row ``i`` is Philox row ``i``, stream :data:`STREAM_ILVR`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .plan import Plan, Row

MASK_UNSUPPORTED = frozenset({"unipc"})
"""Samplers whose next state is rebuilt from the history ring (UniPC's corrector), so blending
``x'`` alone would be overwritten: a mask (and an ILVR projection) is refused for them."""

INIT_ROW = 2**32 - 1
"""Philox row of initial noise (the value of :data:`fastdiff.distributed.INIT_ROW`)."""
STREAM_ILVR = 2
"""Philox stream of ILVR's low-resolution noise (0: solver noise, 1: known-region noise)."""


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


def _level(row: Row, plan: Plan) -> tuple[float, float, float]:
    """``(alpha, sigma, in_scale)`` of the state a row starts from: ``in_scale x = alpha x0 + sigma eps``."""
    if row.alpha_t is None or row.sigma_t is None:
        raise ValueError(f"sampler {plan.sampler!r} does not give alpha_t/sigma_t on its rows; this task needs them")
    return float(row.alpha_t), float(row.sigma_t), float(row.in_scale)


def _levels_after(plan: Plan) -> list[tuple[float, float, float]]:
    """The level of the state after each row: the next row's, and clean (``out_scale x = x0``) at the end."""
    return [_level(plan.rows[i + 1], plan) for i in range(len(plan.rows) - 1)] + [(1.0, 0.0, float(plan.out_scale))]


def _steps_of(plan: Plan) -> list[list[Row]]:
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
    blocks = _steps_of(plan)
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
        return end if s == n else _level(blocks[s][0], plan)

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
    """``cls`` with the drop-in schedulers' own-grid methods (:class:`fastdiff.diffusers._OwnGrid`)."""
    from .diffusers import _OwnGrid

    ns = {"__annotations__": {"arrays": Mapping}, "arrays": dataclasses.field(default_factory=dict),
          "__module__": __name__, "__qualname__": f"_Sliced{cls.__name__}"}
    return dataclasses.dataclass(frozen=True, eq=False)(type(f"_Sliced{cls.__name__}", (_OwnGrid, cls), ns))


def _sliced_schedule(schedule, steps: int, start: int, grid_options: Mapping[str, Any]):
    """``schedule`` whose grids for ``steps - start`` steps are its ``steps``-step grids from ``start`` on."""
    from .samplers._multistep import Grid, multistep_grid
    from .schedules import Discretization

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
    from . import samplers

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
    from . import samplers, schedules
    from .api import make_plan

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
        if schedule is None:
            schedule = samplers._default_schedule(si)
        elif not schedules.is_schedule(schedule):
            schedule = schedules.from_config(schedule)
        res = _resolved_options(sampler, schedule, options)
        opts = dict(options)
        if sampler == "unipc":
            grid_options = {"flavor": "unipc"}
            opts["disable_corrector"] = [int(i) - k for i in (res.get("disable_corrector") or ()) if int(i) >= k]
        else:
            grid_options = {"flavor": "dpmsolver"}
            for key in ("use_lu_lambdas", "lambda_min_clipped"):
                if key in res:
                    grid_options[key] = res[key]
            if "lower_order_final" in res:
                # diffusers lowers the last two orders when the WHOLE run has < 15 steps (as the drop-in)
                opts["lower_order_final"] = bool(res["lower_order_final"]) and steps < 15
        own = _sliced_schedule(schedule, steps, k, grid_options)
        plan = samplers.build(sampler, own, steps - k, prediction=full.prediction, **opts)
        want = [r.t for r in full.rows if r.step >= k and r.stage == 0]
        got = [r.t for r in plan.rows if r.stage == 0]
        if len(got) != len(want) or any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(got, want)):
            raise RuntimeError(f"the {sampler} plan from step {k} does not follow the full run's timesteps; "
                               "this is a bug")
    r0 = plan.rows[0]
    a, s, inn = _level(r0, plan)
    meta = {**plan.meta, "start_step": k, "steps_total": steps}
    return dataclasses.replace(plan, init_scale=s / inn, meta=meta)


def noised_state(plan: Plan, image: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The state at the first row's level: ``(alpha_t * image + sigma_t * noise) / in_scale`` (a new tensor)."""
    if not isinstance(image, torch.Tensor) or not isinstance(noise, torch.Tensor) or image.shape != noise.shape:
        raise ValueError(f"image must be a tensor shaped like the noise {tuple(noise.shape)}, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}")
    a, s, inn = _level(plan.rows[0], plan)
    img = image.to(dtype=noise.dtype, device=noise.device)
    return img * (a / inn) + noise * (s / inn)


def _seeds_and_noise(shape, like: torch.Tensor, noise, seed, generator):
    """Resolve ``(seed list or None, noise)``: given noise, generator draws, or Philox at :data:`INIT_ROW`."""
    from .loop import draw_noise
    from .rng import expand_seeds, randn

    if seed is not None and generator is not None:
        raise ValueError("give either seed (Philox noise) or generator (diffusers-style noise), not both")
    seeds = None
    if generator is None:
        if seed is None:
            seed = [int(v) for v in torch.randint(0, 2**62, (shape[0],), dtype=torch.int64)]
        seeds = expand_seeds(seed, shape[0])
    if noise is None:
        if generator is not None:
            noise = draw_noise(tuple(shape), generator, like.dtype, like.device)
        else:
            noise = randn(tuple(shape), seeds, row=INIT_ROW, stream=0, device=like.device, dtype=like.dtype)
    elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must be a tensor of shape {tuple(shape)}")
    return seeds, noise.to(dtype=like.dtype, device=like.device)


def denoise(model: Callable, image: torch.Tensor, *, strength: float | None = None, start_step: int | None = None,
            sigma: float | None = None, sampler: str = "dpmpp_2m", steps: int = 30, schedule: Any = None,
            prediction: str | None = None, noise: torch.Tensor | None = None, seed: int | Sequence[int] | None = None,
            generator: torch.Generator | list | None = None, **sample_kwargs) -> torch.Tensor:
    """SDEdit / img2img: denoise ``image`` from an intermediate step of a ``steps``-step run.

    Exactly one of:

    - ``strength`` in (0, 1]: start at diffusers img2img's ``t_start = steps - int(steps * strength)``;
    - ``start_step``: start at that solver step;

    then the state is ``image`` (clean) noised to that step's level with ``noise`` (default: Philox
    keyed per sample by ``seed`` at row :data:`INIT_ROW`, or drawn from ``generator`` first, as
    diffusers does); or

    - ``sigma``: ``image`` is ALREADY noisy, ``image = x0 + sigma * n`` in data units (k-diffusion
      sigma; on a VP or flow schedule the level where ``sigma_t / alpha_t = sigma``). The run starts
      at the last step whose level is at least ``sigma``, topping the noise up to exactly that level
      with ``sqrt(sigma_k^2 - sigma^2) * noise``.

    Multistep samplers restart their history (see :func:`plan_from_step`). Other keyword arguments go
    to :func:`fastdiff.sample` (``cond``, ``guidance_scale``, ``mask``/``known``, ``backend``, ...).
    """
    from .api import make_plan, sample

    given = [n for n, v in (("strength", strength), ("start_step", start_step), ("sigma", sigma)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of strength, start_step or sigma (got {given or 'none'})")
    if "plan" in sample_kwargs:
        raise ValueError("denoise builds its own plan; use fastdiff.sample(plan=..., image=...) for a prebuilt one")
    if not isinstance(image, torch.Tensor) or not image.is_floating_point() or image.dim() < 1:
        raise TypeError("image must be a floating [B, ...] tensor")
    seeds, noise = _seeds_and_noise(image.shape, image, noise, seed, generator)
    run = dict(sample_kwargs, seed=seeds, generator=generator)
    if sigma is None:
        return sample(model, noise, image=image, strength=strength, start_step=start_step, sampler=sampler,
                      steps=steps, schedule=schedule, prediction=prediction, **run)
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0.0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    opts = {k: sample_kwargs.pop(k) for k in list(sample_kwargs) if k not in _SAMPLE_ARGS}
    run = dict(sample_kwargs, seed=seeds, generator=generator)
    full = make_plan(sampler, steps, schedule, prediction, **opts)
    levels = [r.sigma_t / r.alpha_t for r in (blk[0] for blk in _steps_of(full))]
    fits = [i for i, lv in enumerate(levels) if lv >= sigma * (1 - 1e-6)]
    if not fits:
        raise ValueError(f"sigma={sigma:g} is above the schedule's largest noise level {levels[0]:g}")
    plan = plan_from_step(sampler, steps, fits[-1], schedule, prediction, **opts)
    a, s, inn = _level(plan.rows[0], plan)
    top = math.sqrt(max((s / a) ** 2 - sigma * sigma, 0.0))
    x = (image.to(noise.dtype) + noise * top) * (a / inn)
    return sample(model, x, plan=dataclasses.replace(plan, init_scale=1.0), **run)


_SAMPLE_ARGS = frozenset({
    "guidance_scale", "guidance_interval", "guidance_rescale", "cond", "uncond", "backend", "callback", "progress",
    "check_finite", "classifier", "classifier_scale", "classifier_y", "mask", "known", "post_step",
})
"""Keyword arguments of :func:`fastdiff.sample` that are not sampler options."""


# ------------------------------------------------------------------------------------- RePaint API


def repaint(model: Callable, known: torch.Tensor, mask: torch.Tensor, *, jump_length: int = 10,
            jump_n_sample: int = 10, sampler: str = "ddpm", steps: int = 50, schedule: Any = None,
            prediction: str | None = None, noise: torch.Tensor | None = None, seed: int | Sequence[int] | None = None,
            generator: torch.Generator | list | None = None, **sample_kwargs) -> torch.Tensor:
    """RePaint inpainting (Lugmayr et al. 2022): ``mask`` is 1 where the sample is generated, 0 where
    ``known`` is kept (exact at the end); every solver step re-noises the known region to the
    state's level, and the schedule jumps ``jump_length`` levels back up ``jump_n_sample - 1``
    times at every ``jump_length``-th step (diffusers' ``RePaintScheduler``). Model evaluations:
    ``len(repaint_schedule(...))`` minus the re-noising entries, times the sampler's rows per step.
    Other keyword arguments (sampler options such as ``eta``, and :func:`fastdiff.sample`'s) pass on.
    """
    from .api import make_plan, sample

    if not isinstance(known, torch.Tensor) or not known.is_floating_point():
        raise TypeError("known must be a floating [B, ...] tensor")
    opts = {k: sample_kwargs.pop(k) for k in list(sample_kwargs) if k not in _SAMPLE_ARGS}
    plan = repaint_plan(make_plan(sampler, steps, schedule, prediction, **opts), jump_length, jump_n_sample)
    seeds, noise = _seeds_and_noise(known.shape, known, noise, seed, generator)
    return sample(model, noise, plan=plan, mask=mask, known=known, seed=seeds, generator=generator, **sample_kwargs)


# ----------------------------------------------------------------------------------- ILVR (super-res)


def _down(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor)


def _up(y: torch.Tensor, factor: int, mode: str) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(y, scale_factor=factor, mode="nearest")
    return F.interpolate(y, scale_factor=factor, mode="bilinear", align_corners=False)


def ilvr(plan: Plan, low_res: torch.Tensor, factor: int, *, up: str = "nearest", seeds: Sequence[int] | None = None,
         generator: torch.Generator | list | None = None) -> Callable[[int, torch.Tensor], None]:
    """The ``post_step`` hook of ILVR for ``plan``: ``x <- x + up(y_i - down(x))`` after row ``i``.

    ``y_i = (alpha y + sigma z / factor) / in_scale`` is ``low_res`` noised to the level after row
    ``i`` (the next row's, clean after the last): ``z / factor`` is exactly the average pooling of
    full-resolution white noise, drawn directly at low resolution (Philox row ``i``, stream
    :data:`STREAM_ILVR`, keyed by ``seeds``; or drawn from ``generator`` after the row's own noise).
    ``down`` is ``avg_pool2d(factor)``, ``up`` ``nearest`` or ``bilinear``. States are ``[B, C, H, W]``.
    """
    from .loop import draw_noise
    from .rng import randn

    if plan.sampler in MASK_UNSUPPORTED:
        raise ValueError(f"sampler {plan.sampler!r} rebuilds its state from history, so ILVR's projection would be "
                         "overwritten; use e.g. dpmpp_2m, euler, ddim or ddpm")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    if up not in ("nearest", "bilinear"):
        raise ValueError(f"up must be 'nearest' or 'bilinear', got {up!r}")
    if not isinstance(low_res, torch.Tensor) or low_res.dim() != 4 or not low_res.is_floating_point():
        raise ValueError("low_res must be a floating [B, C, h, w] tensor")
    if (seeds is None) == (generator is None):
        raise ValueError("ilvr needs seeds (Philox noise) or a generator, exactly one")
    levels = _levels_after(plan)
    factor = int(factor)

    def post_step(i: int, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[0] != low_res.shape[0] or x.shape[1] != low_res.shape[1] or \
                tuple(x.shape[2:]) != (low_res.shape[2] * factor, low_res.shape[3] * factor):
            raise ValueError(f"ILVR: state {tuple(x.shape)} is not low_res {tuple(low_res.shape)} upscaled by {factor}")
        a, s, inn = levels[i]
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        y = low_res.to(device=x.device, dtype=cdt) * (a / inn)
        if s != 0.0:
            if generator is not None:
                z = draw_noise(tuple(low_res.shape), generator, cdt, x.device)
            else:
                z = randn(tuple(low_res.shape), list(seeds), row=i, stream=STREAM_ILVR, device=x.device, dtype=cdt)
            y = y + z * (s / (inn * factor))
        xc = x.to(cdt)
        x.copy_(xc + _up(y - _down(xc, factor), factor, up))

    return post_step


def super_resolution(model: Callable, low_res: torch.Tensor, *, factor: int, up: str = "nearest",
                     sampler: str = "dpmpp_2m", steps: int = 30, schedule: Any = None, prediction: str | None = None,
                     noise: torch.Tensor | None = None, seed: int | Sequence[int] | None = None,
                     generator: torch.Generator | list | None = None, **sample_kwargs) -> torch.Tensor:
    """Super-resolution by ILVR (Choi et al. 2021): sample ``[B, C, h*factor, w*factor]`` images
    whose ``avg_pool2d(x, factor)`` is ``low_res`` (exactly with ``up="nearest"``), the low
    frequencies replaced after every row by those of ``low_res`` noised to the state's level
    (:func:`ilvr`). Other keyword arguments (sampler options, :func:`fastdiff.sample`'s) pass on.
    """
    from .api import make_plan, sample

    if not isinstance(low_res, torch.Tensor) or low_res.dim() != 4 or not low_res.is_floating_point():
        raise ValueError("low_res must be a floating [B, C, h, w] tensor")
    if isinstance(factor, bool) or not isinstance(factor, numbers.Integral) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    if "post_step" in sample_kwargs or "plan" in sample_kwargs:
        raise ValueError("super_resolution builds its own plan and post_step")
    opts = {k: sample_kwargs.pop(k) for k in list(sample_kwargs) if k not in _SAMPLE_ARGS}
    plan = make_plan(sampler, steps, schedule, prediction, **opts)
    b, c, h, w = low_res.shape
    seeds, noise = _seeds_and_noise((b, c, h * factor, w * factor), low_res, noise, seed, generator)
    hook = ilvr(plan, low_res, factor, up=up, seeds=seeds, generator=generator)
    return sample(model, noise, plan=plan, seed=seeds, generator=generator, post_step=hook, **sample_kwargs)
