"""Inversion: from data to noise, diffusers' ``DDIMInverseScheduler`` and
``DPMSolverMultistepInverseScheduler``.

**DPM-Solver(++) inversion** (``dpm_inverse``): diffusers' multistep DPM-Solver(++) update (the
rows of :mod:`~fastdiff.samplers.dpmpp` / :mod:`~fastdiff.samplers.dpmsolver`, orders 1-3,
``midpoint`` / ``heun``, thresholding) on the rising grid of
``DPMSolverMultistepInverseScheduler.set_timesteps``: ``steps`` timesteps from 0 towards the noisiest
one (``lambda_min_clipped``), duplicates dropped, ending at that timestep's sigma (Karras /
exponential grids: at their own last sigma). It has rows of its own rather than those samplers'
because of precision: the first step from sigma ~ 0.01 multiplies the state by ~100 and cancels
against the estimate, where diffusers' float32 coefficients are ~1e-5 off exact ones, so the
drop-in builds them as diffusers does (``scalar_dtype`` float32), which those samplers do not.
The SDE variants are refused: on a rising grid ``1 - e^{-2h} < 0`` and diffusers' noise term is NaN.
A native run cannot start part-way (its grid is not the forward one that restarts slice).

**DDIM inversion** (:func:`ddim_inverse`): diffusers calls the model at the TARGET timestep ``t``
on a sample at ``t - T // steps`` and moves it with DDIM's deterministic update,
``x' = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, where ``x0`` (clipped with ``clip_sample``) and the
noise ``eps`` of the unclipped estimate are those of the sample's own level (``abar`` of ``t -
T // steps``, or ``1`` / ``abar_0`` before the first training step: ``set_alpha_to_one``). Because the
model time is a whole step away from the state's level, its rows break the registry-wide rule of
``tests/samplers/test_rows.py`` (a row's model time is the state's noise level to within half a
training step), so it is a plan function run with ``fastdiff.sample(plan=...)`` rather than a
registered name; ``fastdiff.diffusers`` runs it for ``DDIMInverseScheduler``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.plan import Plan, Row, combo
from ..core.schedules import SPACINGS, VPSchedule
from . import register
from ._common import INF_SCALE, check_choice, check_number, clip_settings, data_coeffs, eps_coeffs
from ._multistep import (Grid, alpha_sigma32, divided_differences, dpmsolver_orders, estimate32, estimate64, log_snr,
                         multistep_row, phi)


def ddim_inverse(schedule, steps: int, prediction: str, *, clip_sample: bool = True, clip_sample_range: float = 1.0,
                 set_alpha_to_one: bool = True, jump: int | None = None) -> Plan:
    """DDIM inversion (Song et al. 2021; Mokady et al. 2023), diffusers' ``DDIMInverseScheduler``.

    ``schedule``: a VP schedule; its ``timesteps(steps)`` (``leading`` by default, ``trailing``), in
    rising order, are the model times. The initial state is the data (``init_scale = 1``). ``jump``:
    the sample's level is ``t - jump`` (default ``num_train_timesteps // steps``, as diffusers). With
    epsilon prediction a level whose ``alphas_cumprod`` is 0 (betas whose product underflows) gives
    ``x0 = +-inf``, which ``clip_sample`` clips to ``+-clip_sample_range`` as diffusers does (an
    :data:`~fastdiff.samplers._common.INF_SCALE` row); without clipping it is refused.
    """
    if schedule.kind != "vp":
        raise ValueError(f"ddim_inverse needs a vp schedule, got a {schedule.kind} schedule")
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, False, 0.995, 1.0)
    acp = schedule.alphas_cumprod
    T = int(schedule.num_train_timesteps)
    first = 1.0 if set_alpha_to_one else float(acp[0])
    ts = np.sort(np.asarray(schedule.timesteps(steps, "leading"), dtype=np.float64))
    jump = T // steps if jump is None else int(jump)
    rows = []
    for i, t in enumerate(int(v) for v in ts):
        if not 0 <= t < len(acp):
            raise ValueError(f"ddim_inverse: timestep {t} has no alphas_cumprod entry ({len(acp)} training steps); "
                             "diffusers' step fails there")
        src = min(t - jump, T - 1)
        a_s = float(acp[src]) if src >= 0 else first
        a_t = float(acp[t])
        alpha, sigma = math.sqrt(a_s), math.sqrt(1.0 - a_s)
        where = f"timestep {src}" if src >= 0 else f"before timestep 0 (set_alpha_to_one={set_alpha_to_one!r})"
        if prediction == "eps" and alpha == 0.0 and clip == "static":
            # x0 = (x - m) / 0 = +-inf (alphas_cumprod underflowing to 0), which the clip makes +-clip_sample_range,
            # as in diffusers; INF_SCALE keeps the sign of its 0 (torch's sqrt(-0.0) = -0.0 flips the inf)
            k = math.copysign(INF_SCALE, alpha)
            a_x, a_e = k, -k * sigma
        else:
            a_x, a_e = data_coeffs("vp", prediction, alpha, sigma, where=where)
        if prediction == "x0" and sigma == 0.0:
            raise ValueError(f"ddim_inverse: prediction 'x0' gives no noise estimate where sigma = 0 ({where}); "
                             "diffusers divides by 0 there (pass set_alpha_to_one=False)")
        b_x, b_e = eps_coeffs(prediction, alpha, sigma)
        # x' = sqrt(abar_t) clip(x0) + sqrt(1 - abar_t) eps(unclipped x0), eps = b_x x + b_e e
        c = math.sqrt(1.0 - a_t)
        k_sigma = sigma / alpha if alpha > 0 else 0.0
        point = dict(t=float(t), sigma=k_sigma, in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=alpha, sigma_t=sigma)
        rows.append(Row(**point, out=combo(x=c * b_x, d=math.sqrt(a_t), e=c * b_e), clip=clip, step=i))
    return Plan(tuple(rows), init_scale=1.0, sampler="ddim_inverse", prediction=prediction, steps=steps,
                meta={"inverse": True}, **plan_kw)


def inverse_grid(schedule: VPSchedule, steps: int, lambda_min_clipped: float = -math.inf) -> Grid:
    """The grid of diffusers' ``DPMSolverMultistepInverseScheduler.set_timesteps`` on a VP schedule
    (float32 sigmas, int64 timesteps, repeated timesteps dropped)."""
    T = schedule.num_train_timesteps
    acp32 = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    lam = torch.log(torch.sqrt(acp32)) - torch.log(torch.sqrt(1 - acp32))
    noisiest = T - 1 - int(torch.searchsorted(torch.flip(lam, [0]), float(lambda_min_clipped)))
    spacing = schedule.spacing or "linspace"
    if spacing == "linspace":
        ts = np.linspace(0, noisiest, steps + 1).round()[:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = (noisiest + 1) // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[:-1].astype(np.int64) + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.arange(noisiest + 1, 0, -T / steps).round()[::-1].astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    train = schedule.train_sigmas
    lo = float(schedule.sigma_min) if schedule.sigma_min is not None else float(train[0])
    hi = float(schedule.sigma_max) if schedule.sigma_max is not None else float(train[-1])
    if schedule.sigma_grid == "karras":  # rising: diffusers' _convert_to_karras of the rising sigmas
        rho, ramp = schedule.rho, np.linspace(0, 1, steps)
        sig = (lo ** (1 / rho) + ramp * (hi ** (1 / rho) - lo ** (1 / rho))) ** rho
        ts = np.round(schedule.sigma_to_t(sig)).astype(np.int64)
        sig = np.append(sig, sig[-1])
    elif schedule.sigma_grid == "exponential":
        sig = np.exp(np.linspace(math.log(lo), math.log(hi), steps))
        ts = np.asarray(schedule.sigma_to_t(sig), dtype=np.float64)
        sig = np.append(sig, sig[-1])
    else:
        sig = np.append(np.interp(ts, np.arange(len(train)), train), float(train[noisiest]))
    sig = sig.astype(np.float32).astype(np.float64)
    _, first = np.unique(ts, return_index=True)
    ts = np.asarray(ts)[np.sort(first)].astype(np.int64)
    sig = sig[:len(ts) + 1]  # diffusers keeps every sigma; step i reads sigmas[i], sigmas[i + 1]
    alphas = [1.0 / math.sqrt(s * s + 1.0) for s in sig]
    stds = [s * a for s, a in zip(sig, alphas)]
    return Grid(tuple(float(t) for t in ts), tuple(float(s) for s in sig), tuple(alphas), tuple(stds),
                tuple(log_snr(a, s) for a, s in zip(alphas, stds)), 1.0, "vp")


def inverse_update(grid: Grid, i: int, order: int, algorithm_type: str, solver_type: str) -> tuple[float, list[float]]:
    """``(c_x, [w_i, w_{i-1}, w_{i-2}])`` of step ``i``: ``x' = c_x x + sum_k w_k m_{i-k}``, ``m`` the data
    (``dpmsolver++``) or noise (``dpmsolver``) estimates; diffusers' multistep DPM-Solver update with the
    phi functions (as :mod:`~fastdiff.samplers.dpmpp` / :mod:`~fastdiff.samplers.dpmsolver`)."""
    h = grid.h(i)
    if h == 0.0:  # a repeated noise level (a Karras / exponential grid's last sigma twice): the identity
        return 1.0, [0.0, 0.0, 0.0]
    a0, a1, s0, s1 = grid.alphas[i], grid.alphas[i + 1], grid.stds[i], grid.stds[i + 1]
    if algorithm_type == "dpmsolver++":
        cx, w = s1 / s0, [-a1 * math.expm1(-h), 0.0, 0.0]
        c1 = -0.5 * a1 * math.expm1(-h) if (order == 2 and solver_type == "midpoint") else a1 * h * phi(2, -h)
        c2 = a1 * h * phi(3, -h)
    else:
        cx, w = a1 / a0, [-s1 * math.expm1(h), 0.0, 0.0]
        c1 = -0.5 * s1 * math.expm1(h) if (order == 2 and solver_type == "midpoint") else -s1 * h * phi(2, h)
        c2 = -s1 * h * phi(3, h)
    if order >= 2:
        r = [grid.h(i - 1) / h] if order == 2 else [grid.h(i - 1) / h, grid.h(i - 2) / h]
        for c, dd in zip((c1, c2), divided_differences(r)):
            w = [wk + c * dk for wk, dk in zip(w, dd)]
    return cx, w


def inverse_update32(grid: Grid, i: int, order: int, algorithm_type: str,
                     solver_type: str) -> tuple[float, list[float]]:
    """:func:`inverse_update` with diffusers' float32 arithmetic on its float32 sigmas, its expressions as
    written: on a rising grid from sigma ~ 0.01 the first step multiplies ``x`` by ``sigma'/sigma ~ 100``
    and cancels against the estimate, so its float32 coefficients are ~1e-5 off exact ones."""
    f32 = torch.float32

    def point(j: int):
        al, st = (torch.tensor(v, dtype=f32) for v in alpha_sigma32(grid, j)[:2])
        return al, st, torch.log(al) - torch.log(st)

    (at, st, lt), (a0, s0, l0) = point(i + 1), point(i)
    h, exp = lt - l0, torch.exp
    pp = algorithm_type == "dpmsolver++"
    cx = st / s0 if pp else at / a0
    d0 = -(at * (exp(-h) - 1.0)) if pp else -(st * (exp(h) - 1.0))
    w = {i: float(d0)}
    if order == 1:
        return float(cx), [w[i], 0.0, 0.0]
    l1 = point(i - 1)[2]
    r0 = (l0 - l1) / h
    d10 = {i: float(1.0 / r0), i - 1: -float(1.0 / r0)}
    if order == 2:
        if pp:
            c1 = -0.5 * (at * (exp(-h) - 1.0)) if solver_type == "midpoint" else at * ((exp(-h) - 1.0) / h + 1.0)
        else:
            c1 = -0.5 * (st * (exp(h) - 1.0)) if solver_type == "midpoint" else -(st * ((exp(h) - 1.0) / h - 1.0))
        terms = [(c1, d10)]
    else:
        l2 = point(i - 2)[2]
        r1 = (l1 - l2) / h
        d11 = {i - 1: float(1.0 / r1), i - 2: -float(1.0 / r1)}
        q, p = float(r0 / (r0 + r1)), float(1.0 / (r0 + r1))
        keys = (i, i - 1, i - 2)
        diff = {k: d10.get(k, 0.0) - d11.get(k, 0.0) for k in keys}
        d1 = {k: d10.get(k, 0.0) + q * diff[k] for k in keys}
        d2 = {k: p * diff[k] for k in keys}
        if pp:
            c1, c2 = at * ((exp(-h) - 1.0) / h + 1.0), -(at * ((exp(-h) - 1.0 + h) / h**2 - 0.5))
        else:
            c1, c2 = -(st * ((exp(h) - 1.0) / h - 1.0)), -(st * ((exp(h) - 1.0 - h) / h**2 - 0.5))
        terms = [(c1, d1), (c2, d2)]
    for c, dd in terms:
        for k, v in dd.items():
            w[k] = w.get(k, 0.0) + float(c) * v
    return float(cx), [w.get(i, 0.0), w.get(i - 1, 0.0), w.get(i - 2, 0.0)]


def inverse_sampler_check(algorithm_type: str, solver_order) -> str:
    """``algorithm_type`` of an inversion (diffusers' ``deis`` mapped to ``dpmsolver++``), refusing the SDE ones."""
    if algorithm_type in ("sde-dpmsolver++", "sde-dpmsolver"):
        raise ValueError(f"algorithm_type={algorithm_type!r}: an inversion's log-SNR decreases, where the SDE noise "
                         "term sqrt(1 - e^{-2h}) has no real value (diffusers' inverse step gives NaN)")
    algorithm_type = {"deis": "dpmsolver++"}.get(algorithm_type, algorithm_type)  # diffusers' __init__ mapping
    check_choice("algorithm_type", algorithm_type, ("dpmsolver++", "dpmsolver"))
    if isinstance(solver_order, bool) or solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
    return algorithm_type


@register("dpm_inverse", kinds=("vp",), predictions=("eps", "v", "x0", "flow"),
          options={"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                   "lower_order_final": True, "euler_at_final": False, "lambda_min_clipped": -math.inf,
                   "variance_type": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                   "sample_max_value": 1.0})
def dpm_inverse(schedule, steps: int, prediction: str, *, algorithm_type: str, solver_order: int, solver_type: str,
                lower_order_final: bool, euler_at_final: bool, lambda_min_clipped: float, variance_type,
                thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float) -> Plan:
    """DPM-Solver(++) multistep inversion, data to noise (Lu et al. 2022; diffusers' inverse scheduler)."""
    algorithm_type = inverse_sampler_check(algorithm_type, solver_order)
    solver_type = {"logrho": "midpoint", "bh1": "midpoint", "bh2": "midpoint"}.get(solver_type, solver_type)
    check_choice("solver_type", solver_type, ("midpoint", "heun"))
    if variance_type is not None:
        raise ValueError(f"variance_type={variance_type!r}: the model output carries variance channels that diffusers "
                         "slices off ([:, :3]); a plan row cannot. Wrap the model to return only its mean.")
    own = getattr(schedule, "own_multistep_grid", None)  # fastdiff.diffusers: the scheduler's own sigmas
    grid = own(steps) if own is not None else inverse_grid(schedule, steps,
                                                           check_number("lambda_min_clipped", lambda_min_clipped))
    n = grid.steps
    noise_form = algorithm_type == "dpmsolver"
    if noise_form and prediction == "flow":
        raise ValueError("prediction 'flow' needs algorithm_type='dpmsolver++' (as diffusers' step)")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    orders = dpmsolver_orders(grid, int(solver_order), "diffusers", bool(lower_order_final), bool(euler_at_final))
    # a schedule's scalar_dtype float32 (fastdiff.diffusers): diffusers' float32 coefficient arithmetic
    update = inverse_update32 if getattr(schedule, "scalar_dtype", None) == torch.float32 else inverse_update
    ring = max(orders) - 1  # m_{i-1}, m_{i-2} in slots (i-1) % ring, (i-2) % ring
    rows = []
    for i, p in enumerate(orders):
        cx, w = update(grid, i, p, algorithm_type, solver_type)
        point = grid.point(i, prediction)
        a0, s0 = grid.alphas[i], grid.stds[i]
        if update is inverse_update32:
            fields, m = estimate32(grid, i, prediction, noise_form, clip)
            point = dict(point, **fields)
        else:
            point, m = estimate64(point, prediction, noise_form, clip, a0, s0)
        rows.append(multistep_row(point, i, p, ring, cx, w, m, bool(ring) and i + 1 < n, clip))
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=ring, sampler="dpm_inverse", prediction=prediction,
                steps=n, meta={"orders": orders, "inverse": True},
                estimate="eps" if (noise_form and clip is None) else "x0", **plan_kw)
