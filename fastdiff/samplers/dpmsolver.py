"""DPM-Solver multistep with noise prediction (Lu et al. 2022a), diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver" / "sde-dpmsolver")``.

The exponential integrator of the noise-prediction ODE (and of the diffusion SDE for the
``_sde`` variants) on diffusers' DPM-Solver grid. With ``h = lambda_{i+1} - lambda_i`` and the
noise estimates ``eps_i``, ``D1``/``D2`` their divided differences (as in DPM-Solver++):

    x' = (alpha'/alpha) x - sigma' [h phi_1(h) eps_i + c_1 D1 + h phi_3(h) D2]        (ODE)
    x' = (alpha'/alpha) x - 2 sigma' [h phi_1(h) eps_i + c_1 D1] + sigma' sqrt(e^{2h} - 1) z   (SDE)

with ``c_1 = h phi_1(h) / 2`` (``solver_type="midpoint"``, second order) or ``h phi_2(h)``
(``"heun"``, and every third-order step). diffusers has no third-order SDE update (its step fails),
so ``dpmsolver_3m_sde`` does not exist.

The row's estimate is the noise (``plan.estimate == "eps"``) unless ``thresholding``:
diffusers then thresholds the data estimate and converts it back, ``eps = (x - alpha clip(x0)) /
sigma``, so the row clips ``d = x0`` and uses that combination of ``x`` and ``d``.

On a schedule whose ``scalar_dtype`` is float32 (the diffusers drop-in on a flow grid, where the
first step multiplies ``x`` by ``alpha'/alpha ~ 1e2..1e3`` and cancels it against the estimate) the
coefficients are diffusers' float32 ones (:func:`~.inverse.inverse_update32`, the same multistep
update, and :func:`~._multistep.estimate32`), not exact ones.
"""

from __future__ import annotations

import math

import torch

from ..core.plan import Plan
from . import register
from ._common import check_choice, clip_settings
from ._multistep import (Grid, divided_differences, dpmsolver_orders, dpmsolver_restart, estimate32, estimate64,
                         multistep_grid, multistep_row, phi)
from .inverse import inverse_update32

_OPTIONS = {"solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False,
            "use_lu_lambdas": False, "lambda_min_clipped": -math.inf, "variance_type": None,
            "thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "flavor": None}


def _weights(grid: Grid, i: int, order: int, form2: str) -> tuple[float, list[float]]:
    """``(c_x, [w_i, w_{i-1}, w_{i-2}])`` of the ODE step ``x' = c_x x + sum_k w_k eps_{i-k}``.

    Into ``sigma' = 0`` (first order only) ``sigma' (e^h - 1)`` is its limit ``alpha' sigma / alpha``.
    """
    a0, a1, s0, s1 = grid.alphas[i], grid.alphas[i + 1], grid.stds[i], grid.stds[i + 1]
    cx = a1 / a0
    if s1 == 0.0:
        if order > 1:
            raise ValueError(f"step {i}: a multistep update of order {order} into sigma = 0 divides by zero")
        return cx, [-a1 * s0 / a0, 0.0, 0.0]
    h = grid.h(i)
    if h == 0.0:
        # a repeated noise level (a grid ending at sigma_min, then sigma_min again): the limit h -> 0
        # is the identity, as in DPM-Solver++ (diffusers' higher-order forms give 0/0 there)
        return 1.0, [0.0, 0.0, 0.0]
    w = [-s1 * math.expm1(h), 0.0, 0.0]
    if order >= 2:
        r = [grid.h(i - 1) / h] if order == 2 else [grid.h(i - 1) / h, grid.h(i - 2) / h]
        c1 = 0.5 * h * phi(1, h) if (order == 2 and form2 == "midpoint") else h * phi(2, h)
        coefs = [c1] + ([h * phi(3, h)] if order == 3 else [])
        for c, dd in zip(coefs, divided_differences(r)):
            w = [wk - s1 * c * dk for wk, dk in zip(w, dd)]
    return cx, w


def _dpmsolver(name: str, schedule, steps: int, prediction: str, order: int, sde: bool, *, solver_type: str,
               lower_order_final: bool, euler_at_final: bool, use_lu_lambdas: bool, lambda_min_clipped: float,
               variance_type, thresholding: bool, dynamic_thresholding_ratio: float,
               sample_max_value: float, flavor: str | None) -> Plan:
    check_choice("flavor", flavor or "diffusers", ("diffusers",))  # diffusers' rules only (no k-diffusion twin)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    if variance_type is not None:
        raise ValueError(f"variance_type={variance_type!r}: the model output carries variance channels that diffusers "
                         "slices off ([:, :3]); a plan row cannot. Wrap the model to return only its mean.")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    grid = multistep_grid(schedule, steps, flavor="dpmsolver", use_lu_lambdas=bool(use_lu_lambdas),
                          lambda_min_clipped=float(lambda_min_clipped))
    orders = dpmsolver_orders(grid, order, "diffusers", bool(lower_order_final), bool(euler_at_final))
    ring = max(orders) - 1  # eps_{i-1}, eps_{i-2} live in slots (i-1) % ring, (i-2) % ring
    f32 = getattr(schedule, "scalar_dtype", None) == torch.float32  # diffusers' float32 coefficients
    rows = []
    for i, p in enumerate(orders):
        cx, w = inverse_update32(grid, i, p, "dpmsolver", solver_type) if f32 else _weights(grid, i, p, solver_type)
        a0, a1, s0, s1 = grid.alphas[i], grid.alphas[i + 1], grid.stds[i], grid.stds[i + 1]
        cz = 0.0
        if sde:
            if grid.h(i) < -1e-6:
                raise ValueError(f"step {i}: the log-SNR decreases (h = {grid.h(i):g} < 0): the SDE step has no real "
                                 "noise coefficient (diffusers takes the square root of a negative number: NaN)")
            w = [2.0 * v for v in w]
            # sigma' sqrt(e^{2h} - 1), i.e. sqrt((alpha' sigma / alpha)^2 - sigma'^2) (finite into sigma' = 0);
            # 0 for a repeated noise level whose float32 sigmas differ in the last bit (h ~ -1e-8)
            cz = s1 * math.sqrt(max(math.expm1(2.0 * grid.h(i)), 0.0)) if s1 > 0.0 else a1 * s0 / a0
        point = grid.point(i, prediction)
        if f32:  # d (the noise estimate, or the clipped data estimate) and eps = m_x x + m_d d, in float32
            fields, eps = estimate32(grid, i, prediction, True, clip)
            point = dict(point, **fields)
        else:
            point, eps = estimate64(point, prediction, True, clip, a0, s0)
        rows.append(multistep_row(point, i, p, ring, cx, w, eps, bool(ring) and i + 1 < steps, clip, z=cz, noise=sde))
    meta = {"flavor": "diffusers", "orders": orders}
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=ring, sampler=name, prediction=prediction,
                steps=steps, meta=meta, noise_dtype="float32" if sde else None,
                estimate="eps" if clip is None else "x0", **plan_kw)


@register("dpmsolver_1", kinds=("vp",), options=_OPTIONS, restart=dpmsolver_restart)
def dpmsolver_1(schedule, steps: int, prediction: str, **options) -> Plan:
    """DPM-Solver-1 (DDIM on the DPM-Solver grid), noise-prediction ODE solver (Lu et al. 2022a)."""
    return _dpmsolver("dpmsolver_1", schedule, steps, prediction, 1, False, **options)


@register("dpmsolver_2m", kinds=("vp",), options=_OPTIONS, restart=dpmsolver_restart)
def dpmsolver_2m(schedule, steps: int, prediction: str, **options) -> Plan:
    """Multistep DPM-Solver-2, noise-prediction ODE solver (Lu et al. 2022a)."""
    return _dpmsolver("dpmsolver_2m", schedule, steps, prediction, 2, False, **options)


@register("dpmsolver_3m", kinds=("vp",), options=_OPTIONS, restart=dpmsolver_restart)
def dpmsolver_3m(schedule, steps: int, prediction: str, **options) -> Plan:
    """Multistep DPM-Solver-3, noise-prediction ODE solver (Lu et al. 2022a)."""
    return _dpmsolver("dpmsolver_3m", schedule, steps, prediction, 3, False, **options)


@register("dpmsolver_1_sde", kinds=("vp",), options=_OPTIONS, restart=dpmsolver_restart)
def dpmsolver_1_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """SDE-DPM-Solver-1, first-order noise-prediction solver of the diffusion SDE (Lu et al. 2022b)."""
    return _dpmsolver("dpmsolver_1_sde", schedule, steps, prediction, 1, True, **options)


@register("dpmsolver_2m_sde", kinds=("vp",), options=_OPTIONS, restart=dpmsolver_restart)
def dpmsolver_2m_sde(schedule, steps: int, prediction: str, **options) -> Plan:
    """Multistep SDE-DPM-Solver-2, noise-prediction solver of the diffusion SDE (Lu et al. 2022b)."""
    return _dpmsolver("dpmsolver_2m_sde", schedule, steps, prediction, 2, True, **options)
