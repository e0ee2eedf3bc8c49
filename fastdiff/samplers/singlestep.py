"""Two-stage samplers of k-diffusion: DPM-Solver-2 (with churn) and its ancestral variant,
DPM-Solver++(2S) ancestral and DPM-Solver++ SDE (``sample_dpm_2``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``, ``sample_dpmpp_sde``).

Each step is two rows: the first evaluates the model at the grid's ``sigma`` and moves to an
intermediate level (keeping what the second stage needs in one history slot), the second
evaluates it there and finishes the step (dpm_2's step into sigma = 0 is one Euler row). Noise is drawn where k-diffusion calls its noise
sampler (see each sampler), so an external noise sampler fed the same draws gives k-diffusion's
numbers. A schedule's ``scalar_dtype`` (fastdiff.k_diffusion: the sigmas' dtype) is the precision
of the ancestral step sizes, whose ``sigma_down == 0`` picks k-diffusion's Euler branch.
"""

from __future__ import annotations

import math

from ..core.plan import Plan, Row, Write, combo
from ..core.schedules import Schedule
from . import register
from ._common import CHURN_OPTIONS, add_noise, ancestral_step, check_number, churned_grid, euler_update, grid_point

_ANCESTRAL = {"eta": 1.0, "s_noise": 1.0}


def _point(schedule: Schedule, prediction: str, sigma: float) -> dict:
    """Row fields of a model evaluation at an intermediate noise level ``sigma``."""
    return grid_point(schedule, prediction, sigma, float(schedule.sigma_to_t(sigma)))


@register("dpm_2", options=CHURN_OPTIONS)
def dpm_2(schedule, steps: int, prediction: str, *, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float) -> Plan:
    """DPM-Solver-2 midpoint steps in sigma, with churn (Lu et al. 2022; Karras et al. 2022, Alg. 2)."""
    disc = schedule.discretize(steps)
    sig = disc.sigmas
    hats, ts, zc, init = churned_grid(schedule, disc, s_churn, s_tmin, s_tmax, s_noise)
    rows = []
    for i in range(steps):
        s, s1 = hats[i], float(sig[i + 1])
        first = grid_point(schedule, prediction, s, ts[i])
        if s1 == 0.0:  # Euler into sigma = 0, as k-diffusion does
            step_rows = [Row(**first, out=combo(*euler_update(s, s1)), step=i)]
        else:
            # k-diffusion's sigma_mid = exp(lerp(log s, log s1, 1/2)); H0 keeps x for the second stage
            mid = math.exp(math.log(s) + 0.5 * (math.log(s1) - math.log(s)))
            dt1, dt2 = mid - s, s1 - s
            step_rows = [
                Row(**first, out=combo(x=1 + dt1 / s, d=-dt1 / s), writes=(Write(0, combo(x=1.0)),), step=i),
                Row(**grid_point(schedule, prediction, mid, float(schedule.sigma_to_t(mid))),
                    out=combo(x=dt2 / mid, d=-dt2 / mid, h=(1.0,)), reads=(0,), step=i, stage=1),
            ]
        if i + 1 < steps and zc[i + 1]:  # churn of the next step, drawn at the end of this one
            step_rows[-1] = add_noise(step_rows[-1], zc[i + 1])
        rows += step_rows
    return Plan(tuple(rows), init_scale=init, n_slots=1, sampler="dpm_2", prediction=prediction, steps=steps)


@register("dpm_2_ancestral", options=_ANCESTRAL)
def dpm_2_ancestral(schedule: Schedule, steps: int, prediction: str, *, eta: float, s_noise: float) -> Plan:
    """Ancestral sampling with DPM-Solver-2 midpoint steps in sigma (k-diffusion's ``sample_dpm_2_ancestral``)."""
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    disc = schedule.discretize(steps)
    sig, rows = disc.sigmas, []
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        down, up = ancestral_step(s, s1, eta, getattr(schedule, "scalar_dtype", None))
        first = grid_point(schedule, prediction, s, float(disc.timesteps[i]))
        if down == 0.0:  # Euler to 0; k-diffusion adds no noise in this branch, whatever sigma_next
            rows.append(Row(**first, out=combo(*euler_update(s, 0.0)), step=i))
            continue
        mid = math.exp(math.log(s) + 0.5 * (math.log(down) - math.log(s)))
        dt1, dt2 = mid - s, down - s
        rows += [
            Row(**first, out=combo(x=1 + dt1 / s, d=-dt1 / s), writes=(Write(0, combo(x=1.0)),), step=i),
            Row(**_point(schedule, prediction, mid), out=combo(x=dt2 / mid, d=-dt2 / mid, h=(1.0,), z=up * s_noise),
                reads=(0,), noise=True, step=i, stage=1),
        ]
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=1, sampler="dpm_2_ancestral", prediction=prediction,
                steps=steps)


@register("dpmpp_2s_ancestral", options=_ANCESTRAL)
def dpmpp_2s_ancestral(schedule: Schedule, steps: int, prediction: str, *, eta: float, s_noise: float) -> Plan:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022; k-diffusion's ``sample_dpmpp_2s_ancestral``)."""
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    disc = schedule.discretize(steps)
    sig, rows = disc.sigmas, []
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        down, up = ancestral_step(s, s1, eta, getattr(schedule, "scalar_dtype", None))
        first = grid_point(schedule, prediction, s, float(disc.timesteps[i]))
        noise = s1 > 0.0  # k-diffusion adds sigma_up noise whenever sigma_next > 0
        z = up * s_noise if noise else 0.0
        if down == 0.0:  # Euler to 0
            rows.append(Row(**first, out=combo(*euler_update(s, 0.0), z=z), noise=noise, step=i))
            continue
        h = math.log(s) - math.log(down)  # t_next - t for t = -log sigma
        mid = math.exp(math.log(s) - 0.5 * h)
        rows += [
            Row(**first, out=combo(x=mid / s, d=-math.expm1(-0.5 * h)), writes=(Write(0, combo(x=1.0)),), step=i),
            Row(**_point(schedule, prediction, mid), out=combo(d=-math.expm1(-h), h=(down / s,), z=z), reads=(0,),
                noise=noise, step=i, stage=1),
        ]
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=1, sampler="dpmpp_2s_ancestral",
                prediction=prediction, steps=steps)


@register("dpmpp_sde", options={**_ANCESTRAL, "r": 0.5, "brownian": True})
def dpmpp_sde(schedule: Schedule, steps: int, prediction: str, *, eta: float, s_noise: float, r: float,
              brownian: bool) -> Plan:
    """DPM-Solver++ SDE, two stages per step (Lu et al. 2022; k-diffusion's ``sample_dpmpp_sde``).

    Both stages add noise (k-diffusion calls its noise sampler on ``(sigma, sigma_s)`` and then on
    ``(sigma, sigma_next)``, overlapping intervals of one Brownian motion in sigma). With
    ``brownian=True`` (for noise drawn independently per row: Philox, a generator) the second draw
    is built as that Brownian increment given the first, ``sqrt(D1/D) z1 + sqrt(D2/D) z2`` with
    ``D1 = sigma - sigma_s``, ``D2 = sigma_s - sigma_next``, ``D = D1 + D2``: k-diffusion's law.
    ``brownian=False`` takes the second draw as the whole increment (an external noise sampler
    that returns it, such as k-diffusion's ``BrownianTreeNoiseSampler``).
    """
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    r = check_number("r", r)
    if not 0.0 < r < 1.0:
        raise ValueError(f"r must be in (0, 1) (the intermediate level between sigma and sigma_next), got {r!r}")
    fac = 1.0 / (2.0 * r)
    disc = schedule.discretize(steps)
    sig, rows = disc.sigmas, []
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        first = grid_point(schedule, prediction, s, float(disc.timesteps[i]))
        if s1 == 0.0:  # Euler to 0: x = denoised
            rows.append(Row(**first, out=combo(*euler_update(s, 0.0)), step=i))
            continue
        h = math.log(s) - math.log(s1)
        mid = math.exp(math.log(s) - r * h)
        down1, up1 = ancestral_step(s, mid, eta, getattr(schedule, "scalar_dtype", None))
        down2, up2 = ancestral_step(s, s1, eta, getattr(schedule, "scalar_dtype", None))
        c1, c2 = down1 / s, down2 / s
        k2 = up2 * s_noise
        a, b = (math.sqrt((s - mid) / (s - s1)), math.sqrt((mid - s1) / (s - s1))) if brownian else (0.0, 1.0)
        # the second stage's x' = c2 x + (1 - c2)((1 - fac) d + fac d2) + k2 z: all but its own terms
        # are known after the first stage and kept in slot 0
        keep = Write(0, combo(x=c2, d=(1.0 - c2) * (1.0 - fac), z=k2 * a))
        rows += [
            Row(**first, out=combo(x=c1, d=1.0 - c1, z=up1 * s_noise), writes=(keep,), noise=True, step=i),
            Row(**_point(schedule, prediction, mid), out=combo(d=(1.0 - c2) * fac, h=(1.0,), z=k2 * b), reads=(0,),
                noise=True, step=i, stage=1),
        ]
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=1, sampler="dpmpp_sde", prediction=prediction,
                steps=steps, meta={"brownian": bool(brownian)})
