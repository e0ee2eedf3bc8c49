"""EDM preconditioning (Karras et al. 2022, Table 1) as rows: diffusers' ``EDMEulerScheduler`` and
``EDMDPMSolverMultistepScheduler``.

Their solvers are the ones fastdiff already has, on a VE schedule (state ``x = x0 + sigma eps``) with
a denoiser ``D(x; sigma)`` as an ``x0`` model: ``euler`` (and diffusers' post-evaluation churn), and
``dpmpp_2m`` / ``dpmpp_3m`` / ``dpmpp_2m_sde`` with ``flavor="diffusers"``. EDM's network ``F`` is
not that denoiser: it sees ``c_in x`` at time ``c_noise = log(sigma) / 4``, and
``D = c_skip x + c_out F`` with ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = +-sigma sd /
sqrt(sigma^2 + sd^2)`` (``+`` for diffusers' ``epsilon``, ``-`` for ``v_prediction``; ``sd`` is
``sigma_data``) and ``c_in = 1 / sqrt(sigma^2 + sd^2)``. All of that is each row's ``in_scale``,
``t``, ``a_x`` and ``a_e``, so :func:`precondition` turns a plan for ``D`` into the plan for ``F``::

    plan = precondition(make_plan("euler", 20, VESchedule(), prediction="x0"), sigma_data=0.5)
    x = fastdiff.sample(F, noise, plan=plan)

The rows keep ``alpha_t = c_in``, ``sigma_t = c_in sigma`` (the model input is ``c_in x0 + c_in
sigma eps``); their prediction is ``edm_eps`` / ``edm_v`` (not one of the plan's own
parameterizations: re-planning such a plan from its prediction is refused by ``build``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ..core.plan import Plan
from ._common import check_choice, check_number

PREDICTIONS = {"eps": 1.0, "epsilon": 1.0, "v": -1.0, "v_prediction": -1.0}
"""EDM's network outputs and the sign of ``c_out`` (diffusers' names accepted)."""


def scalings(sigma: float, sigma_data: float, prediction: str = "epsilon") -> tuple[float, float, float, float]:
    """``(c_in, c_skip, c_out, c_noise)`` of EDM's preconditioning at noise level ``sigma > 0``."""
    sign = PREDICTIONS[check_choice("prediction", prediction, tuple(PREDICTIONS))]
    r = sigma * sigma + sigma_data * sigma_data
    c_skip, c_out = sigma_data * sigma_data / r, sign * sigma * sigma_data / math.sqrt(r)
    return 1.0 / math.sqrt(r), c_skip, c_out, math.log(sigma) / 4


def precondition(plan: Plan, sigma_data: float = 0.5, prediction: str = "epsilon",
                 times: Sequence[float] | None = None) -> Plan:
    """``plan`` (built with prediction ``x0`` on a VE schedule: every row evaluates ``D`` on ``x``)
    for EDM's network ``F`` instead (see the module docstring).

    Args:
        plan: rows with ``in_scale = 1``, ``a_x = 0``, ``a_e = 1`` (a VE plan for an ``x0`` model).
        sigma_data: EDM's ``sigma_data`` (> 0).
        prediction: ``epsilon`` or ``v_prediction`` (``eps``/``v``): the sign of ``c_out``.
        times: the model time of every row (default ``c_noise = log(sigma) / 4``; the drop-in passes
            diffusers' float32 values).
    """
    sd = check_number("sigma_data", sigma_data)
    if not sd > 0:
        raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
    check_choice("prediction", prediction, tuple(PREDICTIONS))
    if plan.prediction != "x0":
        raise ValueError(f"precondition needs a plan for an x0 model (prediction 'x0'), got {plan.prediction!r}")
    if times is not None and len(times) != len(plan.rows):
        raise ValueError(f"times has {len(times)} entries for {len(plan.rows)} rows")
    rows = []
    for k, r in enumerate(plan.rows):
        if r.in_scale != 1.0 or r.a_x != 0.0 or r.a_e != 1.0 or not r.sigma > 0:
            raise ValueError(f"row {k} (step {r.step}) is not a VE row of an x0 model at sigma > 0; build the plan "
                             "with prediction='x0' on a VE schedule")
        c_in, c_skip, c_out, c_noise = scalings(r.sigma, sd, prediction)
        rows.append(dataclasses.replace(r, t=float(times[k]) if times is not None else c_noise, in_scale=c_in,
                                        a_x=c_skip, a_e=c_out, alpha_t=c_in, sigma_t=c_in * r.sigma))
    name = "edm_v" if PREDICTIONS[prediction] < 0 else "edm_eps"
    return dataclasses.replace(plan, rows=tuple(rows), prediction=name,
                               meta={**plan.meta, "edm": {"sigma_data": sd, "prediction": prediction}})
