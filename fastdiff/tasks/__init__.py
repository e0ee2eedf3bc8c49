"""Image tasks on top of the plan: inpainting (with RePaint jumps), starting part-way (SDEdit,
img2img, denoising a noisy image), and super-resolution (ILVR).

The plan transforms these tasks run on (the known region, RePaint's jumps, a plan that starts
part-way, the noised initial state) are :mod:`fastdiff.samplers.plans`, below :mod:`fastdiff.api`; the
names are re-exported here.

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
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..core.plan import Plan
from ..api import sample
from ..samplers.plans import (MASK_UNSUPPORTED, levels_after, make_plan, noised_state, plan_from_step,  # noqa: F401
                    repaint_plan, repaint_schedule, resolve_start, row_level, start_step_for_strength, steps_of,
                    with_known_region)

INIT_ROW = 2**32 - 1
"""Philox row of initial noise (the value of :data:`fastdiff.distributed.INIT_ROW`)."""
STREAM_ILVR = 2
"""Philox stream of ILVR's low-resolution noise (0: solver noise, 1: known-region noise)."""


def _seeds_and_noise(shape, like: torch.Tensor, noise, seed, generator):
    """Resolve ``(seed list or None, noise)``: given noise, generator draws, or Philox at :data:`INIT_ROW`."""
    from ..runtime.loop import draw_noise
    from ..core.rng import expand_seeds, randn

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
    levels = [r.sigma_t / r.alpha_t for r in (blk[0] for blk in steps_of(full))]
    fits = [i for i, lv in enumerate(levels) if lv >= sigma * (1 - 1e-6)]
    if not fits:
        raise ValueError(f"sigma={sigma:g} is above the schedule's largest noise level {levels[0]:g}")
    plan = plan_from_step(sampler, steps, fits[-1], schedule, prediction, **opts)
    a, s, inn = row_level(plan.rows[0], plan)
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
    from ..runtime.loop import draw_noise
    from ..core.rng import randn

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
    levels = levels_after(plan)
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
