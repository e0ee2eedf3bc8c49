"""Flow-matching Euler and Heun samplers (diffusers' FlowMatchEulerDiscrete / FlowMatchHeunDiscrete).

The state is the model input ``u = (1 - s) x0 + s eps``. ``Row.sigma`` is the flow sigma ``s``
(k-diffusion's ``s / (1 - s)`` is infinite at the first step ``s = 1``).
"""

from __future__ import annotations

from ..core.plan import Plan, Row, combo
from ..core.schedules import FlowSchedule
from . import register
from ._common import euler_update, grid_point, heun_rows

_PRED = ("flow", "x0", "eps")


@register("flow_euler", kinds=("flow",), options={"stochastic_sampling": False}, predictions=_PRED,
          default_prediction="flow")
def flow_euler(schedule: FlowSchedule, steps: int, prediction: str, *, stochastic_sampling: bool) -> Plan:
    """Euler steps of the rectified-flow ODE (Liu et al. 2022; Esser et al. 2024)."""
    disc = schedule.discretize(steps)
    sig, rows = disc.sigmas, []
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        p = grid_point(schedule, prediction, s, disc.timesteps[i])
        if stochastic_sampling:  # re-noise the x0 estimate to the next level (diffusers' stochastic_sampling)
            rows.append(Row(**p, out=combo(d=1 - s1, z=s1), noise=True, step=i))
        else:
            cx, cd = euler_update(s, s1)
            rows.append(Row(**p, out=combo(x=cx, d=cd), step=i))
    return Plan(tuple(rows), init_scale=disc.init_sigma, sampler="flow_euler", prediction=prediction, steps=steps)


@register("flow_heun", kinds=("flow",), predictions=_PRED, default_prediction="flow")
def flow_heun(schedule: FlowSchedule, steps: int, prediction: str) -> Plan:
    """Heun steps of the rectified-flow ODE, Euler into s = 0 (Karras et al. 2022 on flows)."""
    disc = schedule.discretize(steps)
    sig, ts, rows = disc.sigmas, disc.timesteps, []
    for i in range(steps):
        t_next = float(ts[i + 1]) if i + 1 < steps else 0.0
        rows += heun_rows(schedule, prediction, float(sig[i]), float(ts[i]), float(sig[i + 1]), t_next, i)
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=1, sampler="flow_heun", prediction=prediction,
                steps=steps)
