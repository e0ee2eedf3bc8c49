"""Singlestep DPM-Solver (Lu et al. 2022a) and DPM-Solver++ (Lu et al. 2022b), diffusers'
``DPMSolverSinglestepScheduler``: orders 1-3, ``algorithm_type`` ``dpmsolver++`` (data prediction),
``sde-dpmsolver++`` (its SDE variant) or ``dpmsolver`` (noise prediction), ``solver_type``
``midpoint`` or ``heun``.

A singlestep solver of order ``k`` spans ``k`` grid intervals from an anchor sample ``S`` (the sample
of the last first-order step): the intermediate steps of lower order give the samples at which the
model is evaluated, and the step of order ``k`` recomputes from ``S`` with every output since. With
the log-SNR span ``h = lambda' - lambda_a`` from the anchor, ``r0``/``r1`` the spans to the
intermediate points and ``D0``/``D1``/``D2`` diffusers' divided differences of the converted model
outputs (data estimates for ``dpmsolver++``, noise estimates for ``dpmsolver``), a row is
``x' = c_S S + sum_j c_j m_j (+ c_z z)``: ``S`` in history slot 0, the outputs in a ring.

The orders are diffusers' ``get_order_list``: ``[1, 2, 3]`` repeated (``[1, 2]`` for order 2), with
``lower_order_final`` ending in lower orders (diffusers switches it on when ``steps`` is not a
multiple of ``solver_order`` or the grid ends at sigma 0), and first order into sigma 0. A run that
starts at step ``begin_index`` of a longer one (img2img, ``set_begin_index``) keeps the full run's
orders, lowered where the outputs they need were not computed in this run, as diffusers does.

Coefficients follow diffusers' formulas, including its third-order SDE Heun ``D2`` coefficient
``alpha' ((1 - e^{-2h} - 2h) / (2h)^2 - 1/2)``; the ``(e^{-h} - 1)/h + 1``-type factors are written
with the phi functions (no cancellation for small ``h``).
"""

from __future__ import annotations

import math

import torch

from ..core.plan import Plan, Row, Write, combo
from . import Restart, register
from ._common import check_choice, check_number, clip_settings, eps_coeffs
from ._multistep import Grid, estimate32, multistep_grid, phi

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver")

_OPTIONS = {"solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": False,
            "lambda_min_clipped": -math.inf, "variance_type": None, "thresholding": False,
            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0, "begin_index": 0}


def order_list(steps: int, solver_order: int, lower_order_final: bool, final_zero: bool) -> list[int]:
    """diffusers' ``DPMSolverSinglestepScheduler.get_order_list`` (with ``lower_order_final`` switched
    on as its ``set_timesteps`` does: steps not a multiple of the order, or a grid ending at 0)."""
    k = int(solver_order)
    lof = bool(lower_order_final) or steps % k != 0 or final_zero
    if not lof:
        orders = {1: [1], 2: [1, 2], 3: [1, 2, 3]}[k] * (steps // k)
    elif k == 3:
        orders = ([1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1] if steps % 3 == 0 else
                  [1, 2, 3] * (steps // 3) + ([1] if steps % 3 == 1 else [1, 2]))
    elif k == 2:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        orders = [1] * steps
    if final_zero:
        orders[-1] = 1
    return orders


def _dd(grid: Grid, i: int, order: int, h: float) -> dict:
    """diffusers' divided differences of step ``i`` as ``{name: {point: coef}}`` (``D1``/``D1_1``/``D2``)."""
    a, lam = i - order + 1, grid.lambdas
    r0 = (lam[i] - lam[a]) / h
    d11 = {i: 1.0 / r0, a: -1.0 / r0}
    if order == 2:
        return {"D1": d11}
    r1 = (lam[i - 1] - lam[a]) / h
    d10 = {i - 1: 1.0 / r1, a: -1.0 / r1}
    keys = (i, i - 1, a)
    d1 = {k: (r0 * d10.get(k, 0.0) - r1 * d11.get(k, 0.0)) / (r0 - r1) for k in keys}
    d2 = {k: 2.0 * (d11.get(k, 0.0) - d10.get(k, 0.0)) / (r0 - r1) for k in keys}
    return {"D1": d1, "D1_1": d11, "D2": d2}


def single_update(grid: Grid, i: int, order: int, algorithm_type: str, solver_type: str) -> tuple[float, dict, float]:
    """``(c_S, {point j: c_j}, c_z)`` of step ``i`` of ``order``: ``x' = c_S S + sum_j c_j m_j + c_z z``
    (``S`` the anchor sample at point ``i - order + 1``, ``m_j`` the converted model output at ``j``)."""
    a, t = i - order + 1, i + 1
    at, st = grid.alphas[t], grid.stds[t]
    h = grid.lambdas[t] - grid.lambdas[a]
    sde, noise_form = algorithm_type == "sde-dpmsolver++", algorithm_type == "dpmsolver"
    if order > 1 and st == 0.0:
        raise ValueError(f"step {i}: a singlestep update of order {order} into sigma = 0 divides by zero")
    if noise_form:
        c_s = at / grid.alphas[a]
        base, terms = -st * math.expm1(h), {}
        if order == 2:
            terms["D1"] = -0.5 * st * math.expm1(h) if solver_type == "midpoint" else -st * h * phi(2, h)
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = -st * h * phi(2, h)
            else:
                terms["D1"], terms["D2"] = -st * h * phi(2, h), -st * h * phi(3, h)
        c_z = 0.0
    elif sde:
        c_s = 0.0 if st == 0.0 else st / grid.stds[a] * math.exp(-h)
        e2 = -math.expm1(-2.0 * h)  # 1 - e^{-2h}
        base, terms = at * e2, {}
        if order == 2:
            terms["D1"] = 0.5 * at * e2 if solver_type == "midpoint" else at * 2.0 * h * phi(2, -2.0 * h)
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = at * 2.0 * h * phi(2, -2.0 * h)
            else:
                terms["D1"], terms["D2"] = at * 2.0 * h * phi(2, -2.0 * h), at * (-phi(2, -2.0 * h) - 0.5)
        c_z = st * math.sqrt(max(e2, 0.0))
    else:
        c_s = 0.0 if st == 0.0 else st / grid.stds[a]
        base, terms = -at * math.expm1(-h), {}
        if order == 2:
            terms["D1"] = -0.5 * at * math.expm1(-h) if solver_type == "midpoint" else at * h * phi(2, -h)
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = at * h * phi(2, -h)
            else:
                terms["D1"], terms["D2"] = at * h * phi(2, -h), at * h * phi(3, -h)
        c_z = 0.0
    coefs = {a: base}
    if order > 1:
        if h == 0.0:
            raise ValueError(f"step {i}: a singlestep update of order {order} over a zero log-SNR span")
        dd = _dd(grid, i, order, h)
        for name, w in terms.items():
            for j, c in dd[name].items():
                coefs[j] = coefs.get(j, 0.0) + w * c
    return c_s, coefs, c_z


def single_update32(grid: Grid, i: int, order: int, algorithm_type: str,
                    solver_type: str) -> tuple[float, dict, float]:
    """:func:`single_update` with diffusers' float32 arithmetic on its float32 sigmas, its expressions
    as written (``(e^{-h} - 1)/h + 1`` and the like cancel in float32, which a float64 plan would not
    reproduce)."""
    f32 = torch.float32
    a, t = i - order + 1, i + 1

    def point(j: int):
        s = torch.tensor(grid.sigmas[j], dtype=f32)
        if grid.kind == "flow":
            al, st = 1 - s, s
        else:
            al = 1 / ((s**2 + 1) ** 0.5)
            st = s * al
        return al, st, torch.log(al) - torch.log(st)

    at, st, lt = point(t)
    aa, sa, la = point(a)
    if order > 1 and float(st) == 0.0:
        raise ValueError(f"step {i}: a singlestep update of order {order} into sigma = 0 divides by zero")
    h = lt - la
    exp = torch.exp
    terms = {}
    if algorithm_type == "dpmsolver":
        c_s, base, c_z = at / aa, -(st * (exp(h) - 1.0)), 0.0
        if order == 2:
            terms["D1"] = (-0.5 * (st * (exp(h) - 1.0)) if solver_type == "midpoint"
                           else -(st * ((exp(h) - 1.0) / h - 1.0)))
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = -(st * ((exp(h) - 1.0) / h - 1.0))
            else:
                terms["D1"] = -(st * ((exp(h) - 1.0) / h - 1.0))
                terms["D2"] = -(st * ((exp(h) - 1.0 - h) / h**2 - 0.5))
    elif algorithm_type == "sde-dpmsolver++":
        c_s, base = st / sa * exp(-h), at * (1 - exp(-2.0 * h))
        c_z = float(st * torch.sqrt(1.0 - exp(-2 * h)))
        if order == 2:
            terms["D1"] = (0.5 * (at * (1 - exp(-2.0 * h))) if solver_type == "midpoint"
                           else at * ((1.0 - exp(-2.0 * h)) / (-2.0 * h) + 1.0))
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = at * ((1.0 - exp(-2.0 * h)) / (-2.0 * h) + 1.0)
            else:
                terms["D1"] = at * ((1.0 - exp(-2.0 * h)) / (-2.0 * h) + 1.0)
                terms["D2"] = at * ((1.0 - exp(-2.0 * h) + (-2.0 * h)) / (-2.0 * h) ** 2 - 0.5)
    else:
        c_s, base, c_z = st / sa, -(at * (exp(-h) - 1.0)), 0.0
        if order == 2:
            terms["D1"] = (-0.5 * (at * (exp(-h) - 1.0)) if solver_type == "midpoint"
                           else at * ((exp(-h) - 1.0) / h + 1.0))
        elif order == 3:
            if solver_type == "midpoint":
                terms["D1_1"] = at * ((exp(-h) - 1.0) / h + 1.0)
            else:
                terms["D1"] = at * ((exp(-h) - 1.0) / h + 1.0)
                terms["D2"] = -(at * ((exp(-h) - 1.0 + h) / h**2 - 0.5))
    coefs = {a: float(base)}
    if order > 1:
        if float(h) == 0.0:
            raise ValueError(f"step {i}: a singlestep update of order {order} over a zero log-SNR span")
        r0 = (point(i)[2] - la) / h
        inv0 = float(1.0 / r0)
        dd = {"D1": {i: inv0, a: -inv0}}
        if order == 3:
            r1 = (point(i - 1)[2] - la) / h
            inv1, den = float(1.0 / r1), float(r0 - r1)
            d10, d11 = {i - 1: inv1, a: -inv1}, {i: inv0, a: -inv0}
            keys = (i, i - 1, a)
            dd = {"D1_1": d11,
                  "D1": {k: (float(r0) * d10.get(k, 0.0) - float(r1) * d11.get(k, 0.0)) / den for k in keys},
                  "D2": {k: 2.0 * (d11.get(k, 0.0) - d10.get(k, 0.0)) / den for k in keys}}
        for name, w in terms.items():
            for j, c in dd[name].items():
                coefs[j] = coefs.get(j, 0.0) + float(w) * c
    return float(c_s), coefs, c_z


def _restart(options, start: int, steps: int) -> Restart:
    """The full run's orders from ``start`` on (``begin_index``), on diffusers' DPM-Solver grid."""
    grid = {"flavor": "dpmsolver"}
    if "lambda_min_clipped" in options:
        grid["lambda_min_clipped"] = options["lambda_min_clipped"]
    return Restart(grid=grid, options={"begin_index": int(options.get("begin_index") or 0) + start})


@register("dpm_single", options=_OPTIONS, predictions=("eps", "v", "x0", "flow"), restart=_restart)
def dpm_single(schedule, steps: int, prediction: str, *, solver_order: int, algorithm_type: str, solver_type: str,
               lower_order_final: bool, lambda_min_clipped: float, variance_type, thresholding: bool,
               dynamic_thresholding_ratio: float, sample_max_value: float, begin_index: int) -> Plan:
    """Singlestep DPM-Solver / DPM-Solver++ of order 1-3 (Lu et al. 2022a, 2022b)."""
    if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
    # diffusers' __init__ maps the other families' names onto its own
    algorithm_type = {"deis": "dpmsolver++"}.get(algorithm_type, algorithm_type)
    solver_type = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}.get(solver_type, solver_type)
    check_choice("algorithm_type", algorithm_type, ALGORITHMS)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    if variance_type is not None:
        raise ValueError(f"variance_type={variance_type!r}: the model output carries variance channels that diffusers "
                         "slices off ([:, :3]); a plan row cannot. Wrap the model to return only its mean.")
    if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
        raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
    noise_form = algorithm_type == "dpmsolver"
    if noise_form and thresholding:
        raise ValueError("algorithm_type='dpmsolver' with thresholding=True: diffusers' singlestep step fails there "
                         "(it indexes alpha_t with timestep None); use dpmsolver++")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    grid = multistep_grid(schedule, steps, flavor="dpmsolver",
                          lambda_min_clipped=check_number("lambda_min_clipped", lambda_min_clipped))
    final_zero = grid.stds[-1] == 0.0
    if noise_form and final_zero:
        raise ValueError("algorithm_type='dpmsolver' needs a grid that ends at sigma_min (final_sigmas_type="
                         "'sigma_min'), as diffusers requires: its noise-prediction update into sigma 0 is undefined")
    full = order_list(steps + begin_index, solver_order, lower_order_final, final_zero)[begin_index:]
    # diffusers lowers an order whose earlier outputs this run has not computed (a late start)
    orders = [min(o, p + 1) for p, o in enumerate(full)]
    ring = max(orders) - 1  # m_j in slot 1 + j % ring; the anchor sample in slot 0
    reads_of = [(i - o + 1, i) for i, o in enumerate(orders)]  # the points each row combines
    # a schedule's scalar_dtype float32 (fastdiff.diffusers): diffusers' float32 coefficient arithmetic
    update = single_update32 if getattr(schedule, "scalar_dtype", None) == torch.float32 else single_update
    rows, anchor = [], None
    for i, o in enumerate(orders):
        if o == 1:
            anchor = i
        elif anchor != i - o + 1:
            raise ValueError(f"step {i}: order {o} needs the anchor at step {i - o + 1}, the last first-order step "
                             f"is {anchor} (orders {orders})")
        c_s, coefs, c_z = update(grid, i, o, algorithm_type, solver_type)
        point = grid.point(i, prediction)
        if update is single_update32:
            point = dict(point, **estimate32(grid, i, prediction, noise_form, clip)[0])
        elif noise_form:
            b_x, b_e = eps_coeffs(prediction, point["alpha_t"], point["sigma_t"], point["in_scale"])
            point = dict(point, a_x=b_x, a_e=b_e)  # d is the noise estimate
        prev = [j for j in range(i - o + 1, i)]
        reads = ((0,) if o > 1 else ()) + tuple(1 + j % ring for j in prev)
        h = ((c_s,) if o > 1 else ()) + tuple(coefs.get(j, 0.0) for j in prev)
        out = combo(x=c_s if o == 1 else 0.0, d=coefs.get(i, 0.0), h=h, z=c_z)
        later = range(i + 1, len(orders))
        writes = []
        if o == 1 and any(reads_of[j][0] == i and orders[j] > 1 for j in later):
            writes.append(Write(0, combo(x=1.0)))
        if any(reads_of[j][0] <= i for j in later if orders[j] > 1):
            writes.append(Write(1 + i % ring, combo(d=1.0)))
        rows.append(Row(**point, out=out, reads=reads, writes=tuple(writes), clip=clip,
                        noise=algorithm_type == "sde-dpmsolver++", step=i))
    n_slots = 1 + ring if ring else 0
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=n_slots, sampler="dpm_single", prediction=prediction,
                steps=steps, meta={"orders": orders, "algorithm_type": algorithm_type},
                estimate="eps" if noise_form else "x0", **plan_kw)
