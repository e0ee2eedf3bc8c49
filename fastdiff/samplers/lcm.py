"""Consistency-distilled samplers: LCM, TCD and flow-matching LCM (diffusers' ``LCMScheduler``,
``TCDScheduler``, ``FlowMatchLCMScheduler``).

LCM (Luo et al. 2023) evaluates the consistency function ``f = c_skip x + c_out x0`` at each step
and re-noises it to the next timestep; TCD (Zheng et al. 2024) moves to an intermediate timestep
``s = floor((1 - gamma) t_prev)`` along the DDIM direction and re-noises from there (``gamma``:
diffusers' ``eta``). Both are one linear row per step over ``[x, d, e, z]``. The estimate diffusers
returns beside ``prev_sample`` (LCM's ``denoised``, TCD's ``pred_noised_sample``) is recorded per
row in ``plan.meta["second_output"]`` as ``(c_x, c_d, c_e)``: ``c_x x + c_d d + c_e e``.

Timesteps: the LCM grid (``original_inference_steps`` training-grid points ``k j - 1``, ``k = T //
original_inference_steps``, of which ``steps`` are taken at evenly spaced indices), or a scheduler's
own timesteps where the schedule holds them (``fastdiff.diffusers``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

from ..core.plan import Plan, Row, combo, x0_coeffs
from ..core.schedules import VPSchedule
from . import build, register
from ._common import INF_SCALE, check_number, clip_settings, eps_coeffs

_CLIP = {"clip_sample": False, "clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
         "sample_max_value": 1.0}
"""LCMScheduler's clipping defaults (no clipping)."""


def lcm_timesteps(schedule: VPSchedule, steps: int, original_inference_steps: int) -> list[int]:
    """The integer timesteps of ``LCMScheduler.set_timesteps(steps)`` (``TCDScheduler``'s too), or the
    schedule's own (a diffusers scheduler's ``timesteps``, as :mod:`fastdiff.diffusers` passes them)."""
    if getattr(schedule, "own_multistep_grid", None) is not None:  # a grid given as arrays
        return [int(t) for t in schedule.timesteps(steps)]
    T = schedule.num_train_timesteps
    orig = original_inference_steps
    if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or not 1 <= orig <= T:
        raise ValueError(f"original_inference_steps must be an int in [1, {T}] (num_train_timesteps), got {orig!r}")
    if steps > orig:
        raise ValueError(f"steps={steps} is more than original_inference_steps={orig}: the LCM grid takes steps "
                         "from the original_inference_steps-point distillation grid")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def boundary_scalings(t: float, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """LCM's consistency boundary condition ``(c_skip, c_out)`` at timestep ``t`` (Song et al. 2023)."""
    s = t * timestep_scaling
    return sigma_data**2 / (s * s + sigma_data**2), s / math.sqrt(s * s + sigma_data**2)


def distilled_point(schedule: VPSchedule, prediction: str, t: int, clip: str | None = None) -> dict:
    """Row fields of an LCM / TCD evaluation at timestep ``t`` (``vp_point``'s), also where
    ``alphas_cumprod[t]`` is 0 or float32-tiny (zero terminal SNR, underflowing betas), as diffusers'
    step computes there: the v and x0 estimates are finite; the eps estimate ``x0 = (x - m) / 0`` is
    +-inf, which only a static clip (``clip_sample``) makes finite (``INF_SCALE (x - m)`` clips the
    same), else a ``ValueError`` (diffusers' step gives inf/NaN). The noise level (for callbacks) is the
    schedule's k-diffusion sigma, with ``abar`` floored at ``2**-24`` where that overflows float32."""
    abar = float(schedule.alphas_cumprod[t])
    if prediction == "eps" and abar == 0.0:
        if clip != "static":
            how = "thresholded: the quantile of infinities is NaN" if clip == "dynamic" else "without clipping"
            raise ValueError(f"prediction 'eps' gives no data estimate where alpha = 0 (timestep {t}, alphas_cumprod "
                             f"= 0): x0 = (x - m) / 0 is inf/NaN ({how})")
        alpha, sigma, (a_x, a_e) = 0.0, 1.0, (INF_SCALE, -INF_SCALE)
    else:
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        a_x, a_e = x0_coeffs(prediction, alpha, sigma)
    k = float(schedule.train_sigmas[t])
    k = k if math.isfinite(k) else math.sqrt((1.0 - abar) / max(abar, 2.0**-24))
    return dict(t=float(t), sigma=k, in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=alpha, sigma_t=sigma)


def lcm_step(schedule: VPSchedule, prediction: str, ts: list[int], i: int, timestep_scaling: float,
             clip: str | None) -> tuple[Row, tuple[float, float, float]]:
    """Row ``i`` of an LCM run on timesteps ``ts`` and its second output (``denoised``: ``c_skip x + c_out x0``)."""
    t, last = ts[i], i == len(ts) - 1
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    # x' = sqrt(abar_prev) f + sqrt(1 - abar_prev) z, f = c_skip x + c_out clip(x0); the last step returns f
    a_p = float(schedule.alphas_cumprod[ts[i + 1]]) if not last else 1.0
    scale = math.sqrt(a_p)
    out = combo(x=scale * c_skip, d=scale * c_out, z=0.0 if last else math.sqrt(1.0 - a_p))
    row = Row(**distilled_point(schedule, prediction, t, clip), out=out, clip=clip, noise=not last, step=i)
    return row, (c_skip, c_out, 0.0)


def distilled_plan(sampler: str, step: Callable[[int], tuple[Row, tuple]], ts: list[int], prediction: str,
                   partial: bool, **plan_kw) -> Plan:
    """The plan of rows ``step(i)`` over timesteps ``ts``, with each row's second output in
    ``meta["second_output"]``. A step that cannot be planned (``ValueError``, ``ArithmeticError``: its
    diffusers step gives inf/NaN) fails the plan, or where ``partial`` (``fastdiff.diffusers``, whose
    runs may never reach it) is a placeholder row listed in ``meta["refused"]`` (row -> reason)."""
    rows, second, refused = [], [], {}
    for i in range(len(ts)):
        try:
            row, out = step(i)
        except (ValueError, ArithmeticError) as exc:
            if not partial:
                raise
            refused[i] = str(exc) or type(exc).__name__
            row, out = Row(t=float(ts[i]), sigma=0.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=1.0), step=i), \
                (0.0, 0.0, 0.0)
        rows.append(row)
        second.append(out)
    meta = {"second_output": tuple(second), "timesteps": tuple(ts), **({"refused": refused} if refused else {})}
    return Plan(tuple(rows), init_scale=1.0, sampler=sampler, prediction=prediction, steps=len(ts), meta=meta,
                **plan_kw)


@register("lcm", kinds=("vp",), options={"original_inference_steps": 50, "timestep_scaling": 10.0, **_CLIP})
def lcm(schedule: VPSchedule, steps: int, prediction: str, *, original_inference_steps: int, timestep_scaling: float,
        clip_sample: bool, clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
        sample_max_value: float, partial: bool = False) -> Plan:
    """Latent consistency model multistep sampling (Luo et al. 2023).

    ``partial`` (not an option of ``build``): steps that cannot be planned are placeholders listed in
    ``plan.meta["refused"]`` (:func:`distilled_plan`), for ``fastdiff.diffusers``."""
    timestep_scaling = check_number("timestep_scaling", timestep_scaling)
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value)
    ts = lcm_timesteps(schedule, steps, original_inference_steps)
    return distilled_plan("lcm", lambda i: lcm_step(schedule, prediction, ts, i, timestep_scaling, clip), ts,
                          prediction, partial, **plan_kw)


def tcd_intermediate(t_prev: int, eta: float) -> int:
    """TCD's intermediate timestep ``s = floor((1 - eta) t_prev)``, with diffusers' float32 product."""
    import torch

    return int(torch.floor((1 - eta) * torch.tensor(int(t_prev), dtype=torch.int64)).to(torch.int64))


def tcd_step(schedule: VPSchedule, prediction: str, ts: list[int], i: int,
             eta: float) -> tuple[Row, tuple[float, float, float]]:
    """Row ``i`` of a TCD run on timesteps ``ts`` and its second output (``pred_noised_sample``)."""
    last = i + 1 == len(ts)
    t_prev = ts[i + 1] if not last else 0
    s = tcd_intermediate(t_prev, eta)
    a_s, a_p = float(schedule.alphas_cumprod[s]), float(schedule.alphas_cumprod[t_prev])
    p = distilled_point(schedule, prediction, ts[i])
    # pred_noised = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, eps of the model output (unclipped)
    b_x, b_e = eps_coeffs(prediction, p["alpha_t"], p["sigma_t"])
    n_x, n_d, n_e = math.sqrt(1 - a_s) * b_x, math.sqrt(a_s), math.sqrt(1 - a_s) * b_e
    noise = eta > 0 and not last  # diffusers re-noises from s to t_prev, except at the last step
    if noise and a_s == 0.0:
        raise ValueError(f"alphas_cumprod = 0 at TCD's intermediate timestep {s}: re-noising from it to timestep "
                         f"{t_prev} divides by it (0 / 0)")
    k = math.sqrt(a_p / a_s) if noise else 1.0
    z = math.sqrt(max(1.0 - a_p / a_s, 0.0)) if noise else 0.0
    return Row(**p, out=combo(x=k * n_x, d=k * n_d, e=k * n_e, z=z), noise=noise, step=i), (n_x, n_d, n_e)


@register("tcd", kinds=("vp",), options={"original_inference_steps": 50, "eta": 0.3})
def tcd(schedule: VPSchedule, steps: int, prediction: str, *, original_inference_steps: int, eta: float,
        partial: bool = False) -> Plan:
    """Trajectory consistency distillation sampling, stochasticity ``eta`` (gamma) in [0, 1] (Zheng et al. 2024).

    ``partial``: as :func:`lcm`'s."""
    eta = check_number("eta", eta, 0.0, 1.0)
    ts = lcm_timesteps(schedule, steps, original_inference_steps)
    return distilled_plan("tcd", lambda i: tcd_step(schedule, prediction, ts, i, eta), ts, prediction, partial)


@register("flow_lcm", kinds=("flow",), predictions=("flow", "x0", "eps"), default_prediction="flow")
def flow_lcm(schedule, steps: int, prediction: str) -> Plan:
    """Consistency sampling on a rectified flow: re-noise the data estimate to the next level (Luo et al. 2023)."""
    # diffusers' FlowMatchLCMScheduler step is flow_euler's stochastic_sampling step, noise drawn at every step
    plan = build("flow_euler", schedule, steps, prediction=prediction, stochastic_sampling=True)
    return dataclasses.replace(plan, sampler="flow_lcm")
