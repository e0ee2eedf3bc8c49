"""Shared by test_dpmpp.py and test_unipc.py: diffusers comparison from a config dict, k-diffusion
comparison on a VE (t = sigma) grid, and the convergence-order measurement."""

from __future__ import annotations

import math

import numpy as np
import torch

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.models import GaussianMixture

from ._harness import (SHAPE, NoiseTape, assert_close_traj, diffusers_loop, initial_noise, k_sampling, k_states, ours,
                       per_step, toy_model)


def compare_diffusers(cls, cfg: dict, name: str, steps: int, seed: int, *, dtype=torch.float32, tol: float = 1e-5,
                      **options) -> float:
    """``cls(**cfg)``'s stock loop vs ``build(name, cfg)``: same model, initial state and generator noise.

    The plan is built from the config dict a model repository would carry (the keys given plus
    ``_class_name``), not from ``scheduler.config``.
    """
    sched = cls(**cfg)
    plan = samplers.build(name, {**cfg, "_class_name": cls.__name__}, steps, **options)
    assert plan.init_scale == 1.0  # diffusers' init_noise_sigma for both schedulers
    model = toy_model(seed)
    x = initial_noise(seed, 1.0, dtype=dtype)
    ref = diffusers_loop(sched, model, x, steps, generator=torch.Generator().manual_seed(seed + 1))
    got = ours(plan, model, x, generator=torch.Generator().manual_seed(seed + 1))
    return assert_close_traj(got, ref, tol, what=f"{name} {cfg} {options} steps={steps} seed={seed}")


def ve_schedule(grid: str = "karras") -> schedules.VESchedule:
    """The k-style grid the k-diffusion comparisons run on."""
    return schedules.VESchedule(sigma_min=0.02, sigma_max=30.0, sigma_grid=grid)


def compare_k_diffusion(name: str, kfn: str, steps: int, seed: int, *, prediction: str = "x0",
                        dtype=torch.float32, tol: float = 1e-5, grid: str = "karras", sde: bool = False,
                        **options) -> float:
    """k-diffusion's ``kfn`` vs ``build(name, ve_schedule(grid))`` with the same noise (``noise_sampler``).

    ``prediction="eps"`` runs the toy model as an eps model (k-diffusion sees ``x - sigma f(x, sigma)``).
    Also checks that the plan draws noise exactly as often as k-diffusion calls its noise sampler.
    """
    sch = ve_schedule(grid)
    plan = samplers.build(name, sch, steps, prediction=prediction, **options)
    f = toy_model(seed)
    # the loop hands the model t in float32 (as diffusers pipelines do), float64 for a float64 state;
    # so does this denoiser, so that runs compare the plan's coefficients, not t rounding
    td = torch.float64 if dtype == torch.float64 else torch.float32
    den = (lambda x, s: f(x, s.to(td))) if prediction == "x0" else (
        lambda x, s: x - s.reshape(-1, 1, 1, 1) * f(x, s.to(td)))
    sig = torch.tensor(sch.discretize(steps).sigmas, dtype=torch.float64)
    x = initial_noise(seed, float(sig[0]), dtype=dtype)
    tape, kw = NoiseTape(steps, seed=seed + 7, dtype=dtype), {}
    if sde:
        kw["noise_sampler"] = tape.draw
    ref = k_states(getattr(k_sampling(), kfn), den, x, sig, **options, **kw)
    draws = iter(range(steps))
    got = ours(plan, f, x, noise_fn=lambda i, xx: tape.z[next(draws)])
    assert sum(r.noise for r in plan.rows) == tape.next, "noise draws differ from k-diffusion's"
    return assert_close_traj(per_step(plan, got), ref, tol, what=f"{name} {options} steps={steps} seed={seed}")


def _rk4_reference(gm: GaussianMixture, x: torch.Tensor, sigma_max: float, sigma_min: float, n: int = 800):
    """The probability-flow ODE ``dx/dlog(sigma) = x - D(x, sigma)`` solved by RK4 with ``n`` steps (float64)."""
    one = torch.ones(x.shape[0], dtype=torch.float64)

    def f(x, u):
        return x - gm.denoise(x, one, one * math.exp(u))

    u0, h = math.log(sigma_max), (math.log(sigma_min) - math.log(sigma_max)) / n
    for k in range(n):
        u = u0 + k * h
        k1 = f(x, u)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def convergence_slope(name: str, seed: int, steps=(8, 16, 32, 64), **options) -> tuple[float, list[float]]:
    """Fitted order ``p`` of ``error ~ steps^-p`` on a 2-D Gaussian mixture (exact denoiser).

    Karras grids from sigma_max = 20 to sigma_min = 0.2; the error is measured at sigma_min (the
    state before the final jump to sigma = 0, whose error does not shrink with the step count)
    against an RK4 solution with 800 steps, in float64.
    """
    gm = GaussianMixture.default((2,))
    smin, smax = 0.2, 20.0
    sch = schedules.VESchedule(sigma_min=smin, sigma_max=smax)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * smax
    ref = _rk4_reference(gm, x.clone(), smax, smin)
    model = gm.model(sch.alpha_sigma, "x0")
    errs = []
    for n in steps:
        plan = samplers.build(name, sch, n, prediction="x0", **options)
        traj = per_step(plan, ours(plan, model, x.clone()))
        errs.append(float((traj[n - 2] - ref).norm() / ref.norm()))
    slope = -float(np.polyfit(np.log(steps), np.log(errs), 1)[0])
    return slope, errs


__all__ = ["SHAPE", "compare_diffusers", "compare_k_diffusion", "convergence_slope", "ve_schedule"]
