"""CFG++ samplers (Chung et al. 2024), as ComfyUI's ``euler_cfg_pp``, ``euler_ancestral_cfg_pp`` and
``dpmpp_2m_cfg_pp`` write them: the guided data estimate ``d`` steps, but the re-noising follows
the unconditional estimate ``d_u``.

A row says how ``d_u`` enters through :attr:`fastdiff.core.plan.Row.out_u` (``x'`` gains
``out_u (d_u - d)``) and, for the multistep solver, :attr:`fastdiff.core.plan.Row.write_u_slot`
(the unconditional model output kept for the next step). With guidance off at a row (scale 1, or
outside an interval), ``d_u = d``: the base sampler's step.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ..core.plan import Plan, Row, Write, combo
from ..core.schedules import Schedule
from . import register
from ._common import CHURN_OPTIONS, ancestral_step, grid_point
from .euler import euler, euler_ancestral

GUIDED_LOOP = frozenset({"dpmpp_2m_cfg_pp"})
"""CFG++ samplers whose rows keep the unconditional estimate as history: they run on the guided loop
(:mod:`fastdiff.guiders.loop`), which :func:`fastdiff.sample` picks for them."""


@register("euler_cfg_pp")
def euler_cfg_pp(schedule: Schedule, steps: int, prediction: str) -> Plan:
    """CFG++ Euler (ComfyUI's ``sample_euler_cfg_pp``): ``x' = d + sigma' (x - d_u) / sigma``."""
    base = euler(schedule, steps, prediction, **CHURN_OPTIONS)
    sig = [float(s) for s in schedule.discretize(steps).sigmas]
    return _renoised(base, sig, sig[1:], "euler_cfg_pp")


@register("euler_ancestral_cfg_pp", options={"eta": 1.0, "s_noise": 1.0})
def euler_ancestral_cfg_pp(schedule: Schedule, steps: int, prediction: str, *, eta: float, s_noise: float) -> Plan:
    """CFG++ Euler ancestral (ComfyUI's ``sample_euler_ancestral_cfg_pp``):
    ``x' = d + sigma_down (x - d_u) / sigma + s_noise sigma_up z``."""
    base = euler_ancestral(schedule, steps, prediction, eta=eta, s_noise=s_noise)
    sig = [float(s) for s in schedule.discretize(steps).sigmas]
    downs = [ancestral_step(sig[i], sig[i + 1], eta, getattr(schedule, "scalar_dtype", None))[0] for i in range(steps)]
    return _renoised(base, sig, downs, "euler_ancestral_cfg_pp")


def _renoised(base: Plan, sigmas: list[float], targets: list[float], name: str) -> Plan:
    """``base``'s Euler rows (``x' = d + (s'/s)(x - d)``, ``s' = targets[i]``) with ``out_u = -s'/s``:
    ``x' = d + (s'/s)(x - d_u)``."""
    rows = [replace(r, out_u=-targets[i] / sigmas[i] if sigmas[i] else 0.0) for i, r in enumerate(base.rows)]
    return replace(base, rows=tuple(rows), sampler=name)


@register("dpmpp_2m_cfg_pp")
def dpmpp_2m_cfg_pp(schedule: Schedule, steps: int, prediction: str) -> Plan:
    """CFG++ DPM-Solver++(2M) (ComfyUI's ``sample_dpmpp_2m_cfg_pp``), in k-diffusion's sigma form
    (``t = -log sigma``, ``h = t' - t``):
    ``x' = d + e^{-h} x - e^{-h} d_u + (1 - e^{-h}) / (2 r) (d - d_u_prev)``, ``r = h_prev / h``;
    the first and the last step (into sigma = 0) drop the last term. Slots: 0 keeps ``x``, 1 the
    unconditional model output, so ``d_u_prev = a_x' x_prev + a_e' e_u_prev``."""
    disc = schedule.discretize(steps)
    sig, ts = [float(s) for s in disc.sigmas], disc.timesteps
    rows, prev = [], None
    for i in range(steps):
        s, s1 = sig[i], sig[i + 1]
        pt = grid_point(schedule, prediction, s, ts[i])
        eh = s1 / s  # e^{-h}
        last = i == steps - 1
        if prev is None or s1 == 0.0:
            out = combo(x=eh, d=1.0 - eh)
            reads: tuple[int, ...] = ()
        else:
            h, h_last = math.log(s / s1), math.log(sig[i - 1] / s)
            k = -math.expm1(-h) / (2.0 * (h_last / h))
            out = combo(x=eh, d=1.0 + k - eh, h=(-k * prev[0], -k * prev[1]))
            reads = (0, 1)
        writes = () if last else (Write(0, combo(x=1.0)),)
        rows.append(Row(**pt, out=out, reads=reads, writes=writes, out_u=-eh, write_u_slot=None if last else 1,
                        step=i))
        prev = (pt["a_x"], pt["a_e"])
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=2, sampler="dpmpp_2m_cfg_pp", prediction=prediction,
                steps=steps)
