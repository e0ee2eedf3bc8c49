"""k-diffusion's samplers with k-diffusion's signatures, running one fused kernel per model call.

Code written for k-diffusion switches by changing an import::

    from fastdiff import k_diffusion as K        # was: import k_diffusion.sampling as K
    x = K.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, extra_args={"cond": c})

Conventions are k-diffusion's: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning
x0 for ``x = x0 + sigma * eps`` (``s_in`` a ``[B]`` tensor of ones in ``x``'s dtype); ``x``
arrives already scaled by ``sigmas[0]`` and is not modified; ``sigmas`` is the full grid (usually
ending in 0); ``callback`` gets ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step,
after the first model call of the step (``x`` is a copy when a callback is given). Each function
also takes ``backend=`` (fused-step backend, default ``auto``). k-diffusion itself is not needed.

Noise:

- churn (``s_churn`` of euler, heun, dpm_2) is ``torch.randn_like(x)`` as in k-diffusion, drawn
  in the same order (one draw per step, also where unused) whenever churn is active, so a seeded
  global RNG gives k-diffusion's result. Without churn nothing is drawn (k-diffusion still draws
  and discards one ``randn_like`` per step, so the global RNG state afterwards differs).
- ancestral (euler_ancestral): ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls it
  (``sigma_next > 0``); default ``torch.randn_like(x)``, as k-diffusion's default.
- SDE (dpmpp_2m_sde, dpmpp_3m_sde): ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls
  it. k-diffusion's default is a ``BrownianTreeNoiseSampler`` (torchsde); fastdiff's default is
  in-kernel Philox noise keyed by a seed drawn from torch's global RNG (independent normals per
  step: same distribution for a fixed grid, not the same numbers). Pass k-diffusion's
  ``BrownianTreeNoiseSampler`` (or any ``noise_sampler``) for exact parity.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import samplers
from .loop import LoopOptions, run_plan
from .plan import Plan
from .rng import expand_seeds
from .schedules import Discretization, VESchedule

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class _SigmaGrid(VESchedule):
    """A VE schedule whose grid is the caller's ``sigmas`` (k-diffusion passes the grid in)."""

    grid: Discretization | None = None

    def discretize(self, steps: int, spacing_default: str = "") -> Discretization:
        """The given sigmas (``steps`` must be their number of steps)."""
        if steps != self.grid.steps:
            raise ValueError(f"the sigmas given have {self.grid.steps} steps; {steps} were asked for")
        return self.grid


def _plan(name: str, sigmas: torch.Tensor, **options) -> tuple[Plan, np.ndarray]:
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 entries, got "
                         f"{tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    sig = sigmas.detach().to("cpu", torch.float64).numpy()  # one host copy, before the loop
    if not np.all(np.isfinite(sig)) or np.any(sig < 0) or np.any(np.diff(sig) > 0):
        raise ValueError(f"sigmas must be finite, >= 0 and non-increasing, got {sig.tolist()}")
    pos = sig[sig > 0]
    if len(pos) == 0:
        raise ValueError("sigmas has no positive entry")
    grid = Discretization(sigmas=sig, timesteps=sig[:-1], init_sigma=float(sig[0]))
    sch = _SigmaGrid(sigma_min=float(pos.min()), sigma_max=float(pos.max()), grid=grid)
    return samplers.build(name, sch, len(sig) - 1, prediction="x0", **options), sig


def _progress(disable) -> bool:
    # k-diffusion's trange(disable=None) shows a bar only on a terminal
    return disable is False or (disable is None and sys.stderr.isatty())


def _sample(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args, callback, disable, backend: str, *,
            churn: tuple[float, ...] | None = None, noise: NoiseSampler | None = None, philox: bool = False,
            **options) -> torch.Tensor:
    """Run sampler ``name`` on k-diffusion's inputs (see the module docstring for the noise rules).

    ``churn=(s_churn, s_tmin, s_tmax, s_noise)`` for Karras churn; ``noise`` is called where a
    row draws noise and k-diffusion would call its noise sampler (``sigma_next > 0``); with
    ``philox`` and no ``noise``, rows draw in-kernel Philox noise.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    extra = {} if extra_args is None else dict(extra_args)
    if churn is not None:
        options.update(zip(("s_churn", "s_tmin", "s_tmax", "s_noise"), churn))
    plan, sig = _plan(name, sigmas, **options)
    rows, B = plan.rows, x.shape[0]
    dev, dt = x.device, x.dtype
    # model times in x's dtype, straight from the plan (float32 rounding of the loop's own table
    # would perturb float64 runs): one device table, indexed per row without a host sync
    row_sigma = torch.tensor([r.sigma for r in rows], dtype=torch.float64).to(dtype=dt, device=dev)
    x = x.clone()
    drawn: list[torch.Tensor] = []  # churn: one randn_like per step, in k-diffusion's order
    # churn is active if any step churns: step 0's goes into the initial scale, later ones into rows
    churned = churn is not None and (plan.init_scale > sig[0] or any(r.noise for r in rows))

    def eps(step: int) -> torch.Tensor:
        while len(drawn) <= step:
            drawn.append(torch.randn_like(x))
        return drawn[step]

    if plan.init_scale > sig[0]:  # step 0's churn: k-diffusion adds it before the first call
        x.add_(eps(0), alpha=math.sqrt(plan.init_scale**2 - sig[0] ** 2))
    k = [0]

    def f(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = k[0]
        k[0] += 1
        r = rows[i]
        if churned and r.stage == 0:
            eps(r.step)  # keeps the global RNG in step with k-diffusion's per-step draw
        den = model(xx, row_sigma[i].expand(B), **extra)
        if callback is not None and r.stage == 0:
            s = sigmas[r.step]
            s_hat = s if r.sigma == sig[r.step] else sigmas.new_tensor(r.sigma)
            callback({"x": xx.clone(), "i": r.step, "sigma": s, "sigma_hat": s_hat, "denoised": den})
        return den

    def noise_fn(i: int, xx: torch.Tensor) -> torch.Tensor:
        r = rows[i]
        if churn is not None:  # the next step's churn, drawn at the end of this one
            return eps(r.step + 1)
        if sig[r.step + 1] <= 0:  # k-diffusion skips the draw into sigma = 0 (coefficient 0 here)
            return torch.zeros_like(xx)
        return noise(sigmas[r.step], sigmas[r.step + 1])

    seeds = None
    use_fn = churn is not None or noise is not None
    if not use_fn and philox and any(r.noise for r in rows):
        seeds = expand_seeds(int(torch.randint(0, 2**62, (1,), dtype=torch.int64)), B)
    opts = LoopOptions(seeds=seeds, noise_fn=noise_fn if use_fn else None, backend=backend, progress=_progress(disable),
                       check_finite=False)
    return run_plan(plan, f, x, opts)


def _default_noise(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, backend: str = "auto") -> torch.Tensor:
    """Implements Algorithm 2 (Euler steps) from Karras et al. (2022)."""
    return _sample("euler", model, x, sigmas, extra_args, callback, disable, backend,
                   churn=(s_churn, s_tmin, s_tmax, s_noise))


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, backend: str = "auto") -> torch.Tensor:
    """Ancestral sampling with Euler method steps."""
    ns = _default_noise(x) if noise_sampler is None else noise_sampler
    return _sample("euler_ancestral", model, x, sigmas, extra_args, callback, disable, backend, noise=ns, eta=eta,
                   s_noise=s_noise)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                s_tmax=float("inf"), s_noise=1., *, backend: str = "auto") -> torch.Tensor:
    """Implements Algorithm 2 (Heun steps) from Karras et al. (2022)."""
    return _sample("heun", model, x, sigmas, extra_args, callback, disable, backend,
                   churn=(s_churn, s_tmin, s_tmax, s_noise))


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None, s_churn=0., s_tmin=0.,
                 s_tmax=float("inf"), s_noise=1., *, backend: str = "auto") -> torch.Tensor:
    """A sampler inspired by DPM-Solver-2 and Algorithm 2 from Karras et al. (2022)."""
    return _sample("dpm_2", model, x, sigmas, extra_args, callback, disable, backend,
                   churn=(s_churn, s_tmin, s_tmax, s_noise))


@torch.no_grad()
def sample_lms(model, x, sigmas, extra_args=None, callback=None, disable=None, order=4, *,
               backend: str = "auto") -> torch.Tensor:
    """Linear multistep sampler (Adams–Bashforth in sigma, k-diffusion's ``sample_lms``)."""
    return _sample("lms", model, x, sigmas, extra_args, callback, disable, backend, order=order)


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None, *,
                    backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++(2M)."""
    return _sample("dpmpp_2m", model, x, sigmas, extra_args, callback, disable, backend, flavor="k-diffusion")


@torch.no_grad()
def sample_dpmpp_2m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, solver_type="midpoint", *, backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++(2M) SDE."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    return _sample("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   philox=True, flavor="k-diffusion", eta=eta, s_noise=s_noise, solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++(3M) SDE."""
    return _sample("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   philox=True, flavor="k-diffusion", eta=eta, s_noise=s_noise)
