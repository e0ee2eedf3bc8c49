"""DEIS (Zhang & Chen 2022), diffusers' ``DEISMultistepScheduler``: the multistep exponential
integrator of the noise-prediction ODE with polynomial extrapolation in ``log rho``, ``rho = sigma /
alpha`` ("logrho"), orders 1-3.

With the noise estimates ``eps_i`` and ``rho_j = sigma_j / alpha_j`` the step from point ``i`` to
``i + 1`` is ``x' = alpha' (x / alpha_i + sum_k c_k eps_{i-k})``, ``c_k`` the integral over
``[rho_i, rho']`` of the Lagrange polynomial in ``log rho`` through the points ``i, i-1, ...`` that
is 1 at ``i - k`` (diffusers' ``ind_fn``); first order is DDIM, ``x' = (alpha'/alpha) x - sigma'
(e^h - 1) eps`` (into ``sigma' = 0`` its limit ``alpha' (x - sigma eps) / alpha``).

The grid is the multistep grid of :func:`~fastdiff.samplers._multistep.multistep_grid` (flavor
``unipc``, which is DEIS's: Karras timesteps rounded, the last sigma the grid's own). diffusers'
DEIS has no ``final_sigmas_type`` and always ends at ``sigma_min`` (the first training sigma, or the
Karras/exponential grid's last one): give a schedule with ``final_sigma="sigma_min"`` (config
``final_sigmas_type="sigma_min"``) for its grid; the default ``zero`` ends at the data with a
first-order last step.

As in diffusers, ``thresholding`` clips the data estimate and converts it back to a noise estimate,
``eps = (x - alpha clip(x0)) / sigma``; the row then clips ``d = x0`` and uses that combination.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.plan import Plan
from . import Restart, register
from ._common import clip_settings
from ._multistep import Grid, alpha_sigma32, dpmsolver_orders, estimate64, multistep_grid, multistep_row

_OPTIONS = {"solver_order": 2, "lower_order_final": True, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
            "sample_max_value": 1.0}


def _ind2(t: float, b: float, c: float) -> float:
    """diffusers' second-order ``ind_fn``: the integral of the linear Lagrange basis in ``log rho``."""
    lt, lb, lc = math.log(t), math.log(b), math.log(c)
    return t * (-lc + lt - 1.0) / (lb - lc)


def _ind3(t: float, b: float, c: float, d: float) -> float:
    """diffusers' third-order ``ind_fn`` (quadratic Lagrange basis in ``log rho``)."""
    lt, lb, lc, ld = math.log(t), math.log(b), math.log(c), math.log(d)
    num = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0)
    return num / ((lb - lc) * (lb - ld))


def deis_weights(grid: Grid, i: int, order: int) -> tuple[float, list[float]]:
    """``(c_x, [w_i, w_{i-1}, w_{i-2}])`` of step ``i``: ``x' = c_x x + sum_k w_k eps_{i-k}``."""
    a0, a1, s0, s1 = grid.alphas[i], grid.alphas[i + 1], grid.stds[i], grid.stds[i + 1]
    cx = a1 / a0
    if order == 1:
        if s1 == 0.0:  # sigma' (e^h - 1) -> alpha' sigma / alpha as sigma' -> 0
            return cx, [-a1 * s0 / a0, 0.0, 0.0]
        return cx, [-s1 * math.expm1(grid.h(i)), 0.0, 0.0]
    if s1 == 0.0:
        raise ValueError(f"step {i}: a DEIS update of order {order} into sigma = 0 takes log(0)")
    rho = [grid.stds[j] / grid.alphas[j] for j in (i + 1, i, i - 1, i - 2) if j >= i - order + 1]
    rt, r0, r1 = rho[0], rho[1], rho[2]
    if order == 2:
        c = [_ind2(rt, r0, r1) - _ind2(r0, r0, r1), _ind2(rt, r1, r0) - _ind2(r0, r1, r0), 0.0]
    else:
        r2 = rho[3]
        c = [_ind3(rt, r0, r1, r2) - _ind3(r0, r0, r1, r2), _ind3(rt, r1, r2, r0) - _ind3(r0, r1, r2, r0),
             _ind3(rt, r2, r0, r1) - _ind3(r0, r2, r0, r1)]
    return cx, [a1 * v for v in c]


def deis_weights32(grid: Grid, i: int, order: int) -> tuple[float, list[float]]:
    """:func:`deis_weights` with diffusers' float32 arithmetic on its float32 sigmas (tensors for
    ``alpha``/``sigma``/``lambda``, numpy's float32 ``log`` in ``ind_fn``): its third-order
    coefficients lose ~1e-5 to cancellation there, which a float64 plan would not reproduce."""
    f32 = torch.float32

    def alpha_sigma(j: int):
        s = torch.tensor(grid.sigmas[j], dtype=f32)
        if grid.kind == "flow":
            return 1 - s, s
        a = 1 / ((s**2 + 1) ** 0.5)
        return a, s * a

    (a1, s1), (a0, s0) = alpha_sigma(i + 1), alpha_sigma(i)
    if order == 1:
        h = (torch.log(a1) - torch.log(s1)) - (torch.log(a0) - torch.log(s0))
        if float(s1) == 0.0:
            return float(a1 / a0), [-float(a1) * float(s0) / float(a0), 0.0, 0.0]
        return float(a1 / a0), [-float(s1 * (torch.exp(h) - 1.0)), 0.0, 0.0]
    lg = np.log
    rho = [np.float32(float(s / a)) for a, s in (alpha_sigma(j) for j in range(i + 1, i - order, -1))]
    rt, r0, r1 = rho[0], rho[1], rho[2]
    one, two = np.float32(1), np.float32(2)
    if order == 2:
        def ind(t, b, c):
            return t * (-lg(c) + lg(t) - one) / (lg(b) - lg(c))

        c = [ind(rt, r0, r1) - ind(r0, r0, r1), ind(rt, r1, r0) - ind(r0, r1, r0)]
    else:
        r2 = rho[3]

        def ind(t, b, c, d):
            num = t * (lg(c) * (lg(d) - lg(t) + one) - lg(d) * lg(t) + lg(d) + lg(t) ** 2 - two * lg(t) + two)
            return num / ((lg(b) - lg(c)) * (lg(b) - lg(d)))

        c = [ind(rt, r0, r1, r2) - ind(r0, r0, r1, r2), ind(rt, r1, r2, r0) - ind(r0, r1, r2, r0),
             ind(rt, r2, r0, r1) - ind(r0, r2, r0, r1)]
    # diffusers: alpha_t * (sample / alpha_s0 + coef_k m_k), float32 scalars applied to the tensors in turn
    return float(a1) / float(a0), [float(a1) * float(v) for v in c] + [0.0] * (3 - len(c))


def _point32(grid: Grid, i: int, prediction: str) -> tuple[float, float, float, float]:
    """``(alpha, sigma, A, B)`` at point ``i`` as diffusers computes them in float32 from its float32 sigma,
    with its data estimate ``x0 = A x + B m`` (``convert_model_output``): the noise estimate it takes
    from that, ``(x - alpha x0) / sigma``, is what float32 alpha and sigma (``alpha^2 + sigma^2`` not
    exactly 1) make of it, which matters where a step cancels (a cosine schedule's ``alpha ~ 3e-5``)."""
    a, sg, s = alpha_sigma32(grid, i)
    A, B = {"eps": (1.0 / a, -sg / a), "x0": (0.0, 1.0), "v": (a, -sg), "flow": (1.0, -s)}[prediction]
    return a, sg, A, B


def _restart(options, start: int, steps: int) -> Restart:
    """diffusers lowers the last orders only when the WHOLE run has < 15 steps (the sliced plan has fewer)."""
    return Restart(grid={"flavor": "unipc"},
                   options={"lower_order_final": bool(options["lower_order_final"]) and steps < 15})


@register("deis", options=_OPTIONS, predictions=("eps", "v", "x0", "flow"), restart=_restart)
def deis(schedule, steps: int, prediction: str, *, solver_order: int, lower_order_final: bool, thresholding: bool,
         dynamic_thresholding_ratio: float, sample_max_value: float) -> Plan:
    """DEIS multistep, log-rho polynomial extrapolation of the noise (Zhang & Chen 2022)."""
    if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order < 1:
        raise ValueError(f"solver_order must be an int >= 1 (above 3: third order, as diffusers), got {solver_order!r}")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    grid = multistep_grid(schedule, steps, flavor="unipc")
    orders = dpmsolver_orders(grid, int(solver_order), "diffusers", bool(lower_order_final), False)
    ring = max(orders) - 1  # eps_{i-1}, eps_{i-2} in slots (i-1) % ring, (i-2) % ring
    # a schedule's scalar_dtype float32 (fastdiff.diffusers): diffusers' float32 coefficient arithmetic
    f32 = getattr(schedule, "scalar_dtype", None) == torch.float32
    weights = deis_weights32 if f32 else deis_weights
    rows = []
    for i, p in enumerate(orders):
        cx, w = weights(grid, i, p)
        point = grid.point(i, prediction)
        a0, s0 = grid.alphas[i], grid.stds[i]
        if f32:
            a0, s0, A, B = _point32(grid, i, prediction)
            point = dict(point, a_x=A, a_e=B, alpha_t=a0, sigma_t=s0)
        if f32 and clip is None:  # d is the noise estimate: diffusers' (x - alpha x0) / sigma of its float32 numbers
            point = dict(point, a_x=(1.0 - a0 * point["a_x"]) / s0, a_e=-a0 * point["a_e"] / s0)
            eps = {"x": 0.0, "d": 1.0}
        else:
            point, eps = estimate64(point, prediction, True, clip, a0, s0)
        rows.append(multistep_row(point, i, p, ring, cx, w, eps, bool(ring) and i + 1 < steps, clip))
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=ring, sampler="deis", prediction=prediction,
                steps=steps, meta={"orders": orders}, estimate="eps" if clip is None else "x0", **plan_kw)
