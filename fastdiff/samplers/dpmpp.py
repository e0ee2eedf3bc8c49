"""DPM-Solver++ multistep samplers (Lu et al. 2022): first order, 2M, 3M and their SDE variants.

Each sampler mirrors diffusers' ``DPMSolverMultistepScheduler`` (``flavor="diffusers"``, the
default on a VP schedule) or k-diffusion's ``sample_dpmpp_*`` (``flavor="k-diffusion"``, the
default on a VE schedule). The flavors differ only where the libraries do: which steps fall back
to lower order, where noise is drawn, the second-order warm-up of 3M SDE, and the ``D2``
coefficient of diffusers' third-order SDE update (see :func:`_update`).

The sampler name fixes the algorithm: the config keys ``algorithm_type`` and ``solver_order`` are
not read (pick ``dpmpp_2m``/``dpmpp_3m``/``dpmpp_2m_sde``/``dpmpp_3m_sde`` instead).
"""

from __future__ import annotations

import math

from ..core.plan import Plan, Row, Write, combo
from . import register
from ._common import check_choice, check_number, clip_settings
from ._multistep import Grid, divided_differences, dpmsolver_orders, dpmsolver_restart, multistep_grid, phi

FLAVORS = ("diffusers", "k-diffusion")

PREDICTIONS = ("eps", "v", "x0", "flow")
"""Model outputs the multistep samplers take; ``flow`` needs a grid of kind ``flow`` (diffusers'
``use_flow_sigmas``: ``alpha = 1 - s``, ``sigma = s``), given as arrays by ``fastdiff.diffusers``."""

_OPTIONS = {"solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
            "use_lu_lambdas": False, "lambda_min_clipped": -math.inf, "variance_type": None,
            "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "flavor": None}
_SDE_OPTIONS = {**_OPTIONS, "eta": 1.0, "s_noise": 1.0}


def _update(grid: Grid, i: int, order: int, eta: float, form2: str, d2: str) -> tuple[float, list[float]]:
    """``(c_x, [c_i, c_{i-1}, c_{i-2}])`` of step ``i``: ``x' = c_x x + sum_k c_k d_{i-k}`` (+ noise).

    Data-prediction exponential integrator with ``H = (1 + eta) h``: ``c_x = (std'/std) e^{-eta h}``,
    ``-alpha' expm1(-H)`` on ``d_i``, then ``D1`` times ``alpha' expm1(-H)/2`` (``form2="midpoint"``)
    or ``alpha' H phi_2(-H)`` (``"heun"``), and ``D2`` times ``alpha' H phi_3(-H)`` (``d2="lu"``:
    Lu et al., k-diffusion, diffusers' ODE) or ``-alpha' (phi_2(-H) + 1/2)`` (``d2="diffusers_sde"``:
    diffusers' sde-dpmsolver++ third-order update as written there).
    """
    h = grid.h(i)
    if h == 0.0:
        # a repeated noise level (Karras grid ending at sigma_min, then sigma_min again): the limit
        # h -> 0 is the identity (diffusers' midpoint form gives it; its heun form gives 0/0)
        return 1.0, [0.0, 0.0, 0.0]
    a1, s0, s1 = grid.alphas[i + 1], grid.stds[i], grid.stds[i + 1]
    H = (1.0 + eta) * h
    cx = 0.0 if s1 == 0.0 else s1 / s0 * math.exp(-eta * h)
    c = [-a1 * math.expm1(-H), 0.0, 0.0]
    if order >= 2:
        if s1 == 0.0:
            raise ValueError(f"step {i}: a multistep update of order {order} into sigma = 0 divides by zero")
        r = [grid.h(i - 1) / h] if order == 2 else [grid.h(i - 1) / h, grid.h(i - 2) / h]
        c1 = -0.5 * a1 * math.expm1(-H) if (order == 2 and form2 == "midpoint") else a1 * H * phi(2, -H)
        weights = [c1]
        if order == 3:
            weights.append(a1 * H * phi(3, -H) if d2 == "lu" else -a1 * (phi(2, -H) + 0.5))
        for w, dd in zip(weights, divided_differences(r)):
            c = [ck + w * dk for ck, dk in zip(c, dd)]
    return cx, c


def _dpmpp(name: str, schedule, steps: int, prediction: str, order: int, sde: bool, *, solver_type: str,
           lower_order_final: bool, euler_at_final: bool, use_lu_lambdas: bool, lambda_min_clipped: float,
           variance_type, thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float,
           flavor: str | None, eta: float = 0.0, s_noise: float = 1.0) -> Plan:
    """The plan of a DPM-Solver++ multistep sampler of ``order`` (SDE variant if ``sde``)."""
    flavor = check_choice("flavor", flavor or ("k-diffusion" if schedule.kind == "ve" else "diffusers"), FLAVORS)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    if variance_type is not None:
        raise ValueError(f"variance_type={variance_type!r}: the model output carries variance channels that diffusers "
                         "slices off ([:, :3]); a plan row cannot. Wrap the model to return only its mean.")
    if flavor == "diffusers" and sde and (eta != 1.0 or s_noise != 1.0):
        raise ValueError(f"eta={eta!r}, s_noise={s_noise!r}: diffusers' sde-dpmsolver++ has eta = s_noise = 1; "
                         "use flavor='k-diffusion' for other values")
    if flavor == "k-diffusion" and euler_at_final:
        raise ValueError("euler_at_final=True is a diffusers option; k-diffusion only drops to first order into sigma=0")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    grid = multistep_grid(schedule, steps, flavor="dpmsolver", use_lu_lambdas=bool(use_lu_lambdas),
                          lambda_min_clipped=check_number("lambda_min_clipped", lambda_min_clipped))
    orders = dpmsolver_orders(grid, order, flavor, bool(lower_order_final), bool(euler_at_final))
    # k-diffusion's 3M SDE warms up with the phi_2 ("heun") form; diffusers uses solver_type
    form2 = "heun" if (flavor == "k-diffusion" and order == 3) else solver_type
    d2 = "diffusers_sde" if (flavor == "diffusers" and sde) else "lu"
    ring = max(orders) - 1  # d_{i-1}, d_{i-2} live in slots (i-1) % ring, (i-2) % ring
    rows = []
    for i, p in enumerate(orders):
        cx, c = _update(grid, i, p, eta if sde else 0.0, form2, d2)
        s1 = grid.stds[i + 1]
        # (0 on a repeated final sigma whose float32 values differ in the last bit: h ~ -1e-7)
        cz = s_noise * s1 * math.sqrt(max(-math.expm1(-2.0 * eta * grid.h(i)), 0.0)) if (sde and s1 > 0.0) else 0.0
        # diffusers draws at every step (also into sigma=0); k-diffusion only where it adds noise
        noise = sde and (flavor == "diffusers" or (eta > 0.0 and s1 > 0.0))
        writes = (Write(i % ring, combo(d=1.0)),) if ring and i + 1 < steps else ()
        rows.append(Row(**grid.point(i, prediction), out=combo(x=cx, d=c[0], h=tuple(c[1:p]), z=cz),
                        reads=tuple((i - k) % ring for k in range(1, p)), writes=writes, clip=clip,
                        noise=noise, step=i))
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=ring, sampler=name, prediction=prediction,
                steps=steps, meta={"flavor": flavor, "orders": orders},
                noise_dtype="float32" if (sde and flavor == "diffusers") else None, **plan_kw)


@register("dpmpp_1", options=_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_1(schedule, steps: int, prediction: str, **options) -> Plan:
    """DPM-Solver++(1), first-order data-prediction ODE solver (Lu et al. 2022)."""
    return _dpmpp("dpmpp_1", schedule, steps, prediction, 1, False, **options)


@register("dpmpp_1_sde", options=_SDE_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_1_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """SDE-DPM-Solver++(1), first-order solver of the diffusion SDE (Lu et al. 2022)."""
    return _dpmpp("dpmpp_1_sde", schedule, steps, prediction, 1, True, **options)


@register("dpmpp_2m", options=_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_2m(schedule, steps: int, prediction: str, **options) -> Plan:
    """DPM-Solver++(2M), second-order multistep data-prediction ODE solver (Lu et al. 2022)."""
    return _dpmpp("dpmpp_2m", schedule, steps, prediction, 2, False, **options)


@register("dpmpp_3m", options=_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_3m(schedule, steps: int, prediction: str, **options) -> Plan:
    """DPM-Solver++(3M), third-order multistep data-prediction ODE solver (Lu et al. 2022)."""
    return _dpmpp("dpmpp_3m", schedule, steps, prediction, 3, False, **options)


@register("dpmpp_2m_sde", options=_SDE_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_2m_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """SDE-DPM-Solver++(2M), second-order multistep solver of the diffusion SDE (Lu et al. 2022)."""
    return _dpmpp("dpmpp_2m_sde", schedule, steps, prediction, 2, True, **options)


@register("dpmpp_3m_sde", options=_SDE_OPTIONS, predictions=PREDICTIONS, restart=dpmsolver_restart)
def dpmpp_3m_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """SDE-DPM-Solver++(3M), third-order multistep solver of the diffusion SDE (Lu et al. 2022)."""
    return _dpmpp("dpmpp_3m_sde", schedule, steps, prediction, 3, True, **options)
