"""UniPC (Zhao et al. 2023), diffusers' ``UniPCMultistepScheduler``.

Row ``i`` evaluates the model on the predictor's output ``x_i``; diffusers then *corrects* that
sample with the new data estimate before predicting the next one. Both halves are linear in the
previous corrected sample ``C`` (history slot 0), the earlier data estimates ``d_{i-k}`` (a ring
of ``solver_order`` slots from 1) and the new ``d_i``, so one row does both: it writes the
corrected ``x_i^c`` back to slot 0 and ``d_i`` to the ring, and moves the state to the next
predictor output. (The model saw the uncorrected ``x_i``, exactly as in diffusers.)

With ``predict_x0=False`` the estimates are noise estimates (diffusers' ``convert_model_output``
returns eps then): ``d = a_x x + a_e e`` is eps (``plan.estimate == "eps"``), while
``alpha_t``/``sigma_t`` still describe the model input.

Order 3 corrects with ``C`` and three earlier estimates: four history reads, the contract's limit.
Where diffusers' arithmetic is ``0/0`` or ``0 * inf`` but the limit is finite (bh1's last step into
sigma = 0, a repeated final sigma) the plan uses the limit; where none exists it raises.
"""

from __future__ import annotations

import math

import numpy as np

from ..core.plan import MAX_READS, Plan, Row, Write, combo
from . import Restart, register
from ._common import check_choice, clip_settings, eps_coeffs
from ._multistep import Grid, multistep_grid, phi
from .dpmpp import PREDICTIONS

_D, _C = "d", "c"  # operand keys: the new estimate d_i and the previous corrected sample; int k = d_{i-k}


def _bh_weights(hh: float, orders: int, solver_type: str) -> tuple[float, np.ndarray]:
    """``(B(h), b)`` of UniPC: ``B = hh`` (bh1) or ``expm1(hh)`` (bh2), ``b_j = hh phi_{j+1}(hh) j! / B``."""
    B = hh if solver_type == "bh1" else math.expm1(hh)
    b = np.array([hh * phi(j + 1, hh) * math.factorial(j) / B for j in range(1, orders + 1)])
    return B, b


def _bh_update(grid: Grid, s: int, order: int, predict_x0: bool, solver_type: str, corrector: bool) -> dict:
    """UniP (``corrector=False``) or UniC update from point ``s`` to ``s + 1`` as ``{operand: coef}``.

    Operands: ``"x"`` (the sample at ``s``), ``_D`` (the estimate at ``s + 1``, corrector only) and
    ``k`` for the estimate at point ``s + 1 - k`` relative to the evaluated row; see diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``.
    """
    h = grid.h(s)
    if h == 0.0:
        return {"x": 1.0}  # repeated noise level: the update is the identity (diffusers' limit)
    t, lam = s + 1, grid.lambdas
    if predict_x0:
        cs, cm, hh = grid.stds[t] / grid.stds[s], grid.alphas[t], -h
    else:
        cs, cm, hh = grid.alphas[t] / grid.alphas[s], grid.stds[t], h
    m0 = 1 if corrector else _D  # the estimate at point s, seen from the row that uses the update
    vec = {"x": cs, m0: -cm * math.expm1(hh)}
    if order == 1 and not corrector:
        return vec  # no B(h) term (into sigma = 0, where B(h) is infinite for bh1, this is its limit)
    rks = [(lam[s - k] - lam[s]) / h for k in range(1, order)]
    B, b = _bh_weights(hh, order, solver_type)
    R = np.array([[r ** j for r in rks + [1.0]] for j in range(order)])
    if corrector:
        rhos = [0.5] if order == 1 else list(np.linalg.solve(R, b))
    else:
        rhos = [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))
    # D1_k = (m_k - m0) / r_k; the corrector adds rho_last * (d_{s+1} - m0)
    terms = [(rhos[k], (k + 2) if corrector else (k + 1), rks[k]) for k in range(order - 1)]
    if corrector:
        terms.append((rhos[-1], _D, 1.0))
    for rho, key, r in terms:
        w = -cm * B * rho / r
        vec[key] = vec.get(key, 0.0) + w
        vec[m0] = vec.get(m0, 0.0) - w
    return vec


def _orders(steps: int, solver_order: int, lower_order_final: bool) -> list[int]:
    """Predictor order of every step: warm-up, and ``min(order, steps left)`` with lower_order_final."""
    return [min(min(solver_order, steps - i) if lower_order_final else solver_order, i + 1) for i in range(steps)]


def _restart(options, start: int, steps: int) -> Restart:
    """A run started at step ``start``: diffusers' UniPC grid, and ``disable_corrector``'s step indices
    shifted to the re-planned run's (those before ``start`` dropped)."""
    skip = [int(k) - start for k in (options.get("disable_corrector") or ()) if int(k) >= start]
    return Restart(grid={"flavor": "unipc"}, options={"disable_corrector": skip})


@register("unipc", restart=_restart, options={"solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
                            "disable_corrector": (), "predict_x0": True, "solver_p": None, "thresholding": False,
                            "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}, predictions=PREDICTIONS)
def unipc(schedule, steps: int, prediction: str, *, solver_order: int, solver_type: str, lower_order_final: bool,
          disable_corrector, predict_x0: bool, solver_p, thresholding: bool, dynamic_thresholding_ratio: float,
          sample_max_value: float) -> Plan:
    """UniPC: unified predictor-corrector multistep solver, B(h) variants (Zhao et al. 2023)."""
    if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r} (order 4 would correct with "
                         f"{4 + 1} history reads; a plan row has {MAX_READS})")
    check_choice("solver_type", solver_type, ("bh1", "bh2"))
    if solver_p is not None:
        raise ValueError("solver_p (an external predictor scheduler) cannot be expressed as plan rows; pass None")
    try:
        skip = {int(k) for k in (disable_corrector or ())}
    except (TypeError, ValueError):
        raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}") from None
    grid = multistep_grid(schedule, steps, flavor="unipc")
    orders = _orders(steps, solver_order, bool(lower_order_final))
    if grid.stds[-1] == 0.0 and (not predict_x0 or orders[-1] > 1):
        raise ValueError(
            "unipc into sigma = 0 (final_sigmas_type='zero') needs predict_x0=True and a first-order last step "
            f"(lower_order_final=True); got predict_x0={predict_x0!r} and last order {orders[-1]}, where diffusers' "
            "update has no finite value (it returns NaN/inf)")
    # diffusers thresholds the data estimate only when it predicts x0
    clip, plan_kw = clip_settings(False, 1.0, bool(thresholding) and bool(predict_x0), dynamic_thresholding_ratio,
                                  sample_max_value)
    ring = solver_order  # d_j lives in slot 1 + j % ring
    rows = []
    for i in range(steps):
        corrected = i > 0 and (i - 1) not in skip
        xc = _bh_update(grid, i - 1, orders[i - 1], predict_x0, solver_type, True) if corrected else {"x": 1.0}
        if corrected:  # the corrector's "x" is the previous corrected sample
            xc[_C] = xc.pop("x")
        pred = _bh_update(grid, i, orders[i], predict_x0, solver_type, False)
        out = {k: pred.get("x", 0.0) * v for k, v in xc.items()}
        for k, v in pred.items():
            if k != "x":
                out[k] = out.get(k, 0.0) + v
        reads = ([0] if _C in out else []) + [1 + (i - k) % ring for k in range(1, ring + 1) if k in out]
        keys = ([_C] if _C in out else []) + [k for k in range(1, ring + 1) if k in out]
        writes = []
        if i + 1 < steps and i not in skip:
            writes.append(Write(0, _combo(xc, keys)))
        if i + 1 < steps:
            writes.append(Write(1 + i % ring, combo(d=1.0)))
        if predict_x0:
            point = grid.point(i, prediction)
        else:
            a_x, a_e = eps_coeffs(prediction, grid.alphas[i], grid.stds[i])  # d is eps here
            point = dict(grid.point(i, prediction), a_x=a_x, a_e=a_e)
        rows.append(Row(**point, out=_combo(out, keys), reads=tuple(reads), writes=tuple(writes), clip=clip, step=i))
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=1 + ring, sampler="unipc", prediction=prediction,
                steps=steps, meta={"orders": orders},
                estimate="x0" if predict_x0 else "eps", **plan_kw)


def _combo(vec: dict, keys: list) -> tuple[float, ...]:
    """Coefficient vector of ``vec`` over ``[x, d, e, H[keys...], z]`` (``e`` unused: 0)."""
    return combo(x=vec.get("x", 0.0), d=vec.get(_D, 0.0), h=tuple(vec.get(k, 0.0) for k in keys))
