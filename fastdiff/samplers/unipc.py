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
Order 4 corrects with ``d_{i-4}`` too, which row ``i`` cannot read beside them: row ``i - 1`` (which
reads it for its own predictor) folds that term into slot 0, ``C + (w_4 / c_C) d_{i-4}``. From order 5
the predictor alone reads four earlier estimates, and with ``C`` that is five: such a row is refused
(:class:`~._common.RowLimitError`; diffusers computes it), and so are rows without the corrector
whose predictor reads more than four.
Where diffusers' arithmetic is ``0/0`` or ``0 * inf`` but the limit is finite (bh1's last step into
sigma = 0, a repeated final sigma) the plan uses the limit; where none exists it raises.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from ..core.plan import MAX_READS, Plan, Row, Write, combo
from . import Restart, register
from ._common import RowLimitError, check_choice, clip_settings, eps_coeffs
from ._multistep import Grid, alpha_sigma32, estimate32, multistep_grid, phi
from .dpmpp import PREDICTIONS

_D, _C = "d", "c"  # operand keys: the new estimate d_i and the previous corrected sample; int k = d_{i-k}


def _bh_weights(hh: float, orders: int, solver_type: str) -> tuple[float, np.ndarray]:
    """``(B(h), b)`` of UniPC: ``B = hh`` (bh1) or ``expm1(hh)`` (bh2), ``b_j = hh phi_{j+1}(hh) j! / B``."""
    B = hh if solver_type == "bh1" else math.expm1(hh)
    b = np.array([hh * phi(j + 1, hh) * math.factorial(j) / B for j in range(1, orders + 1)])
    return B, b


def _bh_scalars(grid: Grid, s: int, order: int, predict_x0: bool, solver_type: str,
                corrector: bool) -> tuple[float, float, float, list[float], list[float]]:
    """``(c_x, c_0, c_B, r, rho)`` of the update from point ``s`` (float64, exact): ``x' = c_x x + c_0 m_0
    - c_B sum_k rho_k (m_k - m_0) / r_k`` (the corrector's last term, ``r = 1``, is the new estimate's);
    no ``rho`` for a first-order predictor (no B(h) term: into sigma = 0, where B(h) is infinite for
    bh1, this is its limit)."""
    h, t, lam = grid.h(s), s + 1, grid.lambdas
    if predict_x0:
        cs, cm, hh = grid.stds[t] / grid.stds[s], grid.alphas[t], -h
    else:
        cs, cm, hh = grid.alphas[t] / grid.alphas[s], grid.stds[t], h
    c0 = -cm * math.expm1(hh)
    if order == 1 and not corrector:
        return cs, c0, 0.0, [], []
    rks = [(lam[s - k] - lam[s]) / h for k in range(1, order)]
    B, b = _bh_weights(hh, order, solver_type)
    R = np.array([[r ** j for r in rks + [1.0]] for j in range(order)])
    if corrector:
        return cs, c0, cm * B, rks + [1.0], [0.5] if order == 1 else list(np.linalg.solve(R, b))
    return cs, c0, cm * B, rks, [0.5] if order == 2 else list(np.linalg.solve(R[:-1, :-1], b[:-1]))


def _bh_scalars32(grid: Grid, s: int, order: int, predict_x0: bool, solver_type: str,
                  corrector: bool) -> tuple[float, float, float, list[float], list[float]]:
    """:func:`_bh_scalars` with diffusers' float32 arithmetic on its float32 sigmas, its expressions as
    written (``torch.linalg.solve`` in float32): on a flow grid a noise-prediction step multiplies ``x`` by
    ``alpha'/alpha`` (about 1e5 from the first point, alpha = 1e-6) and cancels it against the estimate,
    so its result follows diffusers' float32 coefficients, not exact ones."""
    f32 = torch.float32

    def point(j: int):
        al, st = (torch.tensor(v, dtype=f32) for v in alpha_sigma32(grid, j)[:2])
        return al, st, torch.log(al) - torch.log(st)

    (at, st, lt), (a0, s0, l0) = point(s + 1), point(s)
    h = lt - l0
    hh = -h if predict_x0 else h
    cs, cm = (st / s0, at) if predict_x0 else (at / a0, st)
    h_phi_1 = torch.expm1(hh)
    c0 = -float(cm * h_phi_1)
    if order == 1 and not corrector:
        return float(cs), c0, 0.0, [], []
    rks = torch.stack([(point(s - k)[2] - l0) / h for k in range(1, order)] + [torch.ones((), dtype=f32)])
    B = hh if solver_type == "bh1" else torch.expm1(hh)
    h_phi_k, fact, R, b = h_phi_1 / hh - 1, 1, [], []
    for j in range(1, order + 1):
        R.append(torch.pow(rks, j - 1))
        b.append(h_phi_k * fact / B)
        fact *= j + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.stack(b)
    r = rks.tolist() if corrector else rks.tolist()[:-1]
    if corrector:
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    else:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
    return float(cs), c0, float(cm * B), r, rhos


def _bh_update(grid: Grid, s: int, order: int, predict_x0: bool, solver_type: str, corrector: bool,
               f32: bool = False) -> dict:
    """UniP (``corrector=False``) or UniC update from point ``s`` to ``s + 1`` as ``{operand: coef}``.

    Operands: ``"x"`` (the sample at ``s``), ``_D`` (the estimate at ``s + 1``, corrector only) and
    ``k`` for the estimate at point ``s + 1 - k`` relative to the evaluated row; see diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``. ``f32``: diffusers' float32
    coefficients (:func:`_bh_scalars32`) wherever they are finite, else (as without ``f32``) exact ones
    and their finite limits.
    """
    if f32:
        try:
            vec = _bh_vec(_bh_scalars32(grid, s, order, predict_x0, solver_type, corrector), order, corrector)
        except RuntimeError:  # (torch.linalg.solve of a singular system)
            vec = None
        if vec is not None and all(math.isfinite(v) for v in vec.values()):
            return vec
    if grid.h(s) == 0.0:
        return {"x": 1.0}  # repeated noise level: the update is the identity (diffusers' limit)
    return _bh_vec(_bh_scalars(grid, s, order, predict_x0, solver_type, corrector), order, corrector)


def _bh_vec(scalars: tuple, order: int, corrector: bool) -> dict:
    """The ``{operand: coef}`` of an update from its :func:`_bh_scalars` (see :func:`_bh_update`)."""
    cs, c0, cb, rks, rhos = scalars
    m0 = 1 if corrector else _D  # the estimate at point s, seen from the row that uses the update
    vec = {"x": cs, m0: c0}
    # D1_k = (m_k - m0) / r_k; the corrector adds rho_last * (d_{s+1} - m0)
    keys = [(k + 2) if corrector else (k + 1) for k in range(order - 1)] + ([_D] if corrector else [])
    for rho, key, r in zip(rhos, keys, rks):
        w = -cb * rho / r
        vec[key] = vec.get(key, 0.0) + w
        vec[m0] = vec.get(m0, 0.0) - w
    return vec


def _folded(vec: dict, new: bool) -> dict:
    """The terms of a corrector update (:func:`_bh_update`) that the row before folds into slot 0: those in
    the estimates ``d_{i-k}``, ``k >= MAX_READS``, which its row cannot read beside the corrected sample,
    and with ``new`` the one in ``d_{i-1}``, the estimate of the row before (folded there with ``x`` and
    ``e`` on the host, :func:`fastdiff.core.args.fold_estimate`: the corrector's ``c_C C + c_1 d_{i-1}``
    cancels where ``c_C = alpha_i / alpha_{i-1}`` is ~1e5, from a flow grid's first point)."""
    return {k: v for k, v in vec.items() if isinstance(k, int) and (k >= MAX_READS or (new and k == 1))}


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
    if isinstance(solver_order, bool) or not isinstance(solver_order, numbers.Integral) or solver_order < 1:
        raise ValueError(f"solver_order must be an int >= 1, got {solver_order!r}")
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
    f32 = getattr(schedule, "scalar_dtype", None) == torch.float32  # diffusers' float32 coefficients
    ring = min(int(solver_order), MAX_READS)  # d_j lives in slot 1 + j % ring (no row reads d_{i-k}, k > MAX_READS)
    # the corrector of row i (it corrects step i - 1), its "x" the previous corrected sample C (slot 0)
    corr = [None] + [_bh_update(grid, i - 1, orders[i - 1], predict_x0, solver_type, True, f32)
                     if (i - 1) not in skip else None for i in range(1, steps)]
    for c in corr:
        if c is not None:
            c[_C] = c.pop("x")
    rows = []
    for i in range(steps):
        xc = {k: v for k, v in corr[i].items() if k not in _folded(corr[i], f32)} if corr[i] is not None \
            else {"x": 1.0}
        pred = _bh_update(grid, i, orders[i], predict_x0, solver_type, False, f32)
        out = {k: pred.get("x", 0.0) * v for k, v in xc.items()}
        for k, v in pred.items():
            if k != "x":
                out[k] = out.get(k, 0.0) + v
        carry = dict(xc)  # slot 0 for row i + 1: the corrected sample, and the folded terms of its corrector
        if i + 1 < steps and corr[i + 1] is not None:
            for k, w in _folded(corr[i + 1], f32).items():  # d_{i+1-k} is this row's d_{i-(k-1)} (k = 1: d_i)
                key = _D if k == 1 else k - 1
                carry[key] = carry.get(key, 0.0) + w / corr[i + 1][_C]
        used = set(out) | (set(carry) if i + 1 < steps and i not in skip else set())
        keys = ([_C] if _C in used else []) + sorted(k for k in used if isinstance(k, int))
        if len(keys) > MAX_READS or any(isinstance(k, int) and k > ring for k in keys):
            raise RowLimitError(
                f"unipc step {i} (solver_order={solver_order}, order {orders[i]}"
                f"{'' if corr[i] is None else f', corrector order {orders[i - 1]}'}) reads {len(keys)} history "
                f"buffers ({'the corrected sample and ' if _C in keys else ''}{len(keys) - (_C in keys)} earlier "
                f"estimates); a plan row reads at most {MAX_READS} (orders up to {MAX_READS} fit)")
        reads = [0 if k == _C else 1 + (i - k) % ring for k in keys]
        writes = []
        if i + 1 < steps and i not in skip:
            writes.append(Write(0, _combo(carry, keys)))
        if i + 1 < steps:
            writes.append(Write(1 + i % ring, combo(d=1.0)))
        if f32:  # the estimate as diffusers converts it with its float32 alpha, sigma
            point = dict(grid.point(i, prediction), **estimate32(grid, i, prediction, not predict_x0, None)[0])
        elif predict_x0:
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
