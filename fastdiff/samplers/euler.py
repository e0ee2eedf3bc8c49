"""Euler and Euler ancestral samplers (diffusers' EulerDiscrete / EulerAncestralDiscrete, k-diffusion).

Churn (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``) follows k-diffusion and Karras et al.:
noise is added *before* the model call and the model sees ``sigma_hat``. diffusers'
``EulerDiscreteScheduler.step(s_churn=...)`` instead adds it after evaluating the model at
``sigma``; that variant is not mirrored. Without churn both libraries agree and so do we.
"""

from __future__ import annotations

from ..core.plan import Plan, Row, combo
from ..core.schedules import Schedule
from . import register
from ._common import CHURN_OPTIONS, add_noise, ancestral_step, check_number, churned_grid, euler_update, grid_point

@register("euler", options=CHURN_OPTIONS)
def euler(schedule: Schedule, steps: int, prediction: str, *, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> Plan:
    """Euler steps of the probability-flow ODE, with optional churn (Karras et al. 2022, Alg. 2)."""
    disc = schedule.discretize(steps)
    sig = disc.sigmas
    hats, ts, zc, init = churned_grid(schedule, disc, s_churn, s_tmin, s_tmax, s_noise)
    rows = []
    for i in range(steps):
        cx, cd = euler_update(hats[i], float(sig[i + 1]))
        row = Row(**grid_point(schedule, prediction, hats[i], ts[i]), out=combo(x=cx, d=cd), step=i)
        rows.append(add_noise(row, zc[i + 1]) if i + 1 < steps and zc[i + 1] else row)
    return Plan(tuple(rows), init_scale=init, sampler="euler", prediction=prediction, steps=steps)


@register("euler_ancestral", options={"eta": 1.0, "s_noise": 1.0})
def euler_ancestral(schedule: Schedule, steps: int, prediction: str, *, eta: float, s_noise: float) -> Plan:
    """Ancestral sampling with Euler steps (Song et al. 2021; k-diffusion's ``sample_euler_ancestral``)."""
    check_number("eta", eta, 0.0)
    check_number("s_noise", s_noise, 0.0)
    disc = schedule.discretize(steps)
    sig, rows = disc.sigmas, []
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        down, up = ancestral_step(s, s1, eta, getattr(schedule, "scalar_dtype", None))
        cx, cd = euler_update(s, down)
        # diffusers draws noise at every step, also the last (sigma_up = 0 there)
        rows.append(Row(**grid_point(schedule, prediction, s, disc.timesteps[i]), out=combo(x=cx, d=cd, z=up * s_noise),
                        noise=True, step=i))
    return Plan(tuple(rows), init_scale=disc.init_sigma, sampler="euler_ancestral", prediction=prediction, steps=steps)

