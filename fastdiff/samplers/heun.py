"""Heun's second-order sampler (diffusers' HeunDiscreteScheduler, k-diffusion's ``sample_heun``)."""

from __future__ import annotations

from ..core.plan import Plan
from ..core.schedules import Schedule
from . import register
from ._common import CHURN_OPTIONS, add_noise, churned_grid, clip_mode, heun_rows


@register("heun", options={**CHURN_OPTIONS, "clip_sample": False, "clip_sample_range": 1.0})
def heun(schedule: Schedule, steps: int, prediction: str, *, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float,
         clip_sample: bool, clip_sample_range: float) -> Plan:
    """Heun steps of the probability-flow ODE, Euler into sigma = 0 (Karras et al. 2022, Alg. 2)."""
    disc = schedule.discretize(steps)
    sig = disc.sigmas
    hats, ts, zc, init = churned_grid(schedule, disc, s_churn, s_tmin, s_tmax, s_noise)
    clip = clip_mode(bool(clip_sample), False)
    rows = []
    for i in range(steps):
        t_next = float(disc.timesteps[i + 1] if i + 1 < steps else schedule.sigma_to_t(sig[-1]))
        step_rows = heun_rows(schedule, prediction, hats[i], ts[i], float(sig[i + 1]), t_next, i, clip)
        if i + 1 < steps and zc[i + 1]:
            step_rows[-1] = add_noise(step_rows[-1], zc[i + 1])
        rows += step_rows
    return Plan(tuple(rows), init_scale=init, n_slots=1, sampler="heun", prediction=prediction, steps=steps,
                clip_range=float(clip_sample_range))
