"""k-diffusion's samplers with k-diffusion's signatures, running one fused kernel per model call.

Code written for k-diffusion switches by changing an import::

    from fastdiff import k_diffusion as K  # was: import k_diffusion.sampling as K
    x = K.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, extra_args={"cond": c})

Conventions are k-diffusion's: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning
x0 for ``x = x0 + sigma * eps`` (``s_in`` a ``[B]`` tensor of ones in ``x``'s dtype); ``x``
arrives already scaled by ``sigmas[0]`` and is not modified; ``sigmas`` is the full grid (usually
ending in 0); ``callback`` gets ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step,
after the first model call of the step (``x`` is a copy when a callback is given). Each function
also takes ``backend=`` (fused-step backend, default ``auto``). k-diffusion itself is not needed.

Noise:

- churn samplers (euler, heun, dpm_2): k-diffusion draws one ``torch.randn_like(x)`` at the start
  of every step, churning or not; so do these functions, at the same points and in ``x``'s memory
  layout, keeping only the draws of churning steps. A seeded global RNG gives k-diffusion's churn
  noise and leaves the global RNG in k-diffusion's state (the price: one discarded draw per step).
- ancestral (euler_ancestral): ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls it
  (``sigma_next > 0``); default ``torch.randn_like(x)``, as k-diffusion's default.
- SDE (dpmpp_2m_sde, dpmpp_3m_sde): ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls
  it. k-diffusion's default is a ``BrownianTreeNoiseSampler`` (torchsde) seeded with one
  ``torch.randint`` from the global RNG; fastdiff's default draws that same seed (so the global
  RNG state afterwards is k-diffusion's) and uses it as the key of in-kernel Philox noise:
  independent standard normals per step, the law of k-diffusion's increments on a fixed grid, not
  the same numbers. Pass k-diffusion's ``BrownianTreeNoiseSampler`` (or any ``noise_sampler``)
  for exact parity. A ``noise_sampler`` must return a tensor shaped like ``x`` (never broadcast).

Grids: ``sigmas`` is a non-empty 1-D tensor, finite, >= 0, non-increasing, with 0 at most in its
last entry (k-diffusion divides by zero on a step from 0). One sigma is zero steps (``x`` is
returned, as k-diffusion's loop runs ``len(sigmas) - 1`` steps). A repeated sigma that a
multistep difference divides by (lms, dpmpp_*; k-diffusion returns NaN) raises a ``ValueError``.
k-diffusion's SDE samplers crash on a one-step grid ``[sigma, 0]``; here it is their denoising
step, ``x = denoised``. ``lms`` takes ``order`` 1 to 5 (a fused row reads at most 4 history slots).

Precision: the state, the model input and the result have ``x``'s dtype and the model gets
``sigma`` in ``x``'s dtype, as in k-diffusion when ``sigmas`` has ``x``'s dtype. Each step is
computed in float32 (float64 for float64 ``x``) from coefficients computed in float64 from the
values of ``sigmas``, so fp16/bf16 runs round once per step (k-diffusion rounds after every
operation) and are at least as close to exact arithmetic as k-diffusion's. Two things follow
k-diffusion's own arithmetic in the sigmas' dtype instead, because its results hinge on them:
the ancestral split ``sigma_down, sigma_up`` (in float32, ``sigma_to**2 - sigma_up**2`` cancels:
``sigma_down`` is off by up to ~1e-3 relative, or exactly 0 where float64 gives ~1e-6, which
switches k-diffusion to its Euler branch) and the churn test ``s_tmin <= sigmas[i] <= s_tmax``.
With ``sigmas`` of another dtype than ``x`` the sigmas are read as values: float64 ``x`` with
float32 sigmas equals k-diffusion with ``sigmas.double()`` except for those two (k-diffusion
itself would compute all its step scalars in float32, ~1e-7 off), and fp16 ``x`` with float32
sigmas stays fp16 (k-diffusion's ``to_d`` samplers promote their state to the sigmas' dtype there).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from . import samplers
from .runtime.loop import LoopOptions, run_plan
from .core.plan import Plan
from .core.rng import expand_seeds
from .core.schedules import Discretization, VESchedule

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_3m_sde"]

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class _SigmaGrid(VESchedule):
    """A VE schedule whose grid is the caller's ``sigmas`` (k-diffusion passes the grid in)."""

    grid: Discretization | None = None
    scalar_dtype: torch.dtype | None = None
    """The sigmas' dtype: k-diffusion computes ancestral step sizes in it (and branches on them)."""

    def discretize(self, steps: int, spacing_default: str = "") -> Discretization:
        """The given sigmas (``steps`` must be their number of steps)."""
        if steps != self.grid.steps:
            raise ValueError(f"the sigmas given have {self.grid.steps} steps; {steps} were asked for")
        return self.grid


def _check_sigmas(sigmas) -> np.ndarray:
    """``sigmas`` as float64 host values (one copy, before the loop), or ``ValueError`` naming the fault."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.dim() != 1 or sigmas.numel() < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D tensor, got "
                         f"{tuple(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    if sigmas.is_complex() or sigmas.dtype == torch.bool:
        raise ValueError(f"sigmas must be a real tensor, got dtype {sigmas.dtype}")
    sig = sigmas.detach().to("cpu", torch.float64).numpy()
    if not np.all(np.isfinite(sig)) or np.any(sig < 0) or np.any(np.diff(sig) > 0):
        raise ValueError(f"sigmas must be finite, >= 0 and non-increasing, got {sig.tolist()}")
    if np.any(sig[:-1] == 0):
        raise ValueError(f"sigmas may be 0 only in its last entry (a step from sigma = 0 divides by zero), got "
                         f"{sig.tolist()}")
    return sig


def _plan(name: str, sig: np.ndarray, scalar_dtype: torch.dtype | None = None, **options) -> Plan:
    grid = Discretization(sigmas=sig, timesteps=sig[:-1], init_sigma=float(sig[0]))
    pos = sig[sig > 0]
    sch = _SigmaGrid(sigma_min=float(pos.min()), sigma_max=float(pos.max()), grid=grid, scalar_dtype=scalar_dtype)
    try:
        return samplers.build(name, sch, len(sig) - 1, prediction="x0", **options)
    except ZeroDivisionError as exc:
        raise ValueError(f"sample_{name} divides by a zero step on these sigmas (a repeated value feeds a "
                         f"multistep difference; k-diffusion returns NaN there): {sig.tolist()}") from exc
    except ValueError as exc:
        if "non-finite coefficient" not in str(exc):
            raise
        raise ValueError(f"sample_{name} gets a non-finite coefficient from these sigmas (a repeated value feeds "
                         f"a multistep difference; k-diffusion returns NaN there): {sig.tolist()}") from exc


def _progress(disable) -> bool:
    # k-diffusion's trange(disable=None) shows a bar only on a terminal
    return disable is False or (disable is None and sys.stderr.isatty())


def _sample(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args, callback, disable, backend: str, *,
            churn: tuple[float, ...] | None = None, noise: NoiseSampler | None = None, philox: bool = False,
            noise_args: Callable | None = None, **options) -> torch.Tensor:
    """Run sampler ``name`` on k-diffusion's inputs (see the module docstring for the noise rules).

    ``churn=(s_churn, s_tmin, s_tmax, s_noise)`` for Karras churn; ``noise`` is called where a
    row draws noise and k-diffusion would call its noise sampler (``sigma_next > 0``); with
    ``philox`` and no ``noise``, rows draw in-kernel Philox noise. ``noise_args(row, sigmas)``
    gives the two arguments of the noise sampler's call (default ``sigmas[step], sigmas[step + 1]``).
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got "
                        f"{type(extra_args).__name__}")
    extra = {} if extra_args is None else dict(extra_args)
    sig = _check_sigmas(sigmas)
    seeds = None
    if philox and noise is None:
        # k-diffusion's default BrownianTreeNoiseSampler draws its seed here, used or not: same global RNG
        seed = int(torch.randint(0, 2**63 - 1, []))
    if len(sig) == 1:  # no step, as k-diffusion's loop over len(sigmas) - 1 steps
        return x.clone()
    if not np.any(sig > 0):
        raise ValueError(f"sigmas has no positive entry: {sig.tolist()}")
    if churn is not None:
        s_churn, s_tmin, s_tmax, s_noise = churn
        # k-diffusion tests s_tmin <= sigmas[i] <= s_tmax in sigmas' dtype: round the bounds to it
        s_tmin, s_tmax = (float(sigmas.new_tensor(v)) if isinstance(v, (int, float)) and sigmas.is_floating_point()
                          else v for v in (s_tmin, s_tmax))
        options.update(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    plan = _plan(name, sig, sigmas.dtype if sigmas.is_floating_point() else None, **options)
    rows, B = plan.rows, x.shape[0]
    dev, dt = x.device, x.dtype
    # model times in x's dtype, straight from the plan (float32 rounding of the loop's own table
    # would perturb float64 runs): one device table, indexed per row without a host sync
    row_sigma = torch.tensor([r.sigma for r in rows], dtype=torch.float64).to(dtype=dt, device=dev)
    x_in, x = x, x.clone(memory_format=torch.contiguous_format)
    # churn samplers: k-diffusion draws one randn_like(x) at the start of every step, churning or
    # not; we draw the same tensors at the same points (so a seeded global RNG gives k-diffusion's
    # churn noise and leaves the same RNG state), keeping only the ones that churn
    n_drawn = [0]

    def draw_to(step: int) -> torch.Tensor | None:
        """Draw k-diffusion's per-step noise up to ``step``; returns the one of ``step`` if drawn now."""
        z = None
        while n_drawn[0] <= step:
            z = torch.randn_like(x_in)  # x's layout: CPU normal_ draws differently for non-contiguous
            n_drawn[0] += 1
        return z

    if plan.init_scale > sig[0]:  # step 0's churn: k-diffusion adds it before the first call
        x.add_(draw_to(0), alpha=math.sqrt(plan.init_scale**2 - sig[0] ** 2))
    k = [0]

    def f(xx: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = k[0]
        k[0] += 1
        r = rows[i]
        if churn is not None and r.stage == 0:
            draw_to(r.step)  # k-diffusion's draw of this step (a no-op if it churned: drawn already)
        den = model(xx, row_sigma[i].expand(B).clone(), **extra)  # a tensor of its own, as sigma * s_in
        if callback is not None and r.stage == 0:
            s = sigmas[r.step]
            # k-diffusion's sigmas[i] * (gamma + 1): in the sigmas' dtype, int sigmas promoted
            hat_dtype = sigmas.dtype if sigmas.is_floating_point() else torch.get_default_dtype()
            s_hat = s if r.sigma == sig[r.step] else torch.tensor(r.sigma, dtype=hat_dtype, device=sigmas.device)
            callback({"x": xx.clone(), "i": r.step, "sigma": s, "sigma_hat": s_hat, "denoised": den})
        return den

    def noise_fn(i: int, xx: torch.Tensor) -> torch.Tensor:
        r = rows[i]
        if churn is not None:  # the next step's churn, drawn at the end of this one
            return draw_to(r.step + 1)
        if sig[r.step + 1] <= 0:  # k-diffusion skips the draw into sigma = 0 (coefficient 0 here)
            return torch.zeros_like(xx)
        z = noise(*(noise_args(r, sigmas) if noise_args is not None else (sigmas[r.step], sigmas[r.step + 1])))
        if not isinstance(z, torch.Tensor) or z.shape != xx.shape:  # never broadcast
            raise ValueError(f"noise_sampler must return a tensor shaped like x {tuple(xx.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__} at step {r.step}")
        return z

    use_fn = churn is not None or noise is not None
    if not use_fn and philox and any(r.noise for r in rows):
        seeds = expand_seeds(seed, B)
    opts = LoopOptions(seeds=seeds, noise_fn=noise_fn if use_fn else None, backend=backend, progress=_progress(disable),
                       check_finite=False)
    return run_plan(plan, f, x, opts, in_place=False)  # x is our own copy: the result comes back new


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


@torch.no_grad()
def sample_dpm_2_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                           noise_sampler=None, *, backend: str = "auto") -> torch.Tensor:
    """Ancestral sampling with DPM-Solver second-order steps."""
    ns = _default_noise(x) if noise_sampler is None else noise_sampler
    return _sample("dpm_2_ancestral", model, x, sigmas, extra_args, callback, disable, backend, noise=ns, eta=eta,
                   s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                              noise_sampler=None, *, backend: str = "auto") -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) second-order steps."""
    ns = _default_noise(x) if noise_sampler is None else noise_sampler
    return _sample("dpmpp_2s_ancestral", model, x, sigmas, extra_args, callback, disable, backend, noise=ns, eta=eta,
                   s_noise=s_noise)


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                     noise_sampler=None, r=1 / 2, *, backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++ (stochastic).

    Without ``noise_sampler`` the two draws of a step are Philox normals combined into the
    increments of one Brownian motion over ``[sigma_s, sigma]`` and ``[sigma_next, sigma]``, the
    law of k-diffusion's default ``BrownianTreeNoiseSampler``.
    """

    def args(row, sig):  # k-diffusion's sigma_fn(t), sigma_fn(s) / sigma_fn(t_next), computed as it does
        t, t_next = sig[row.step].log().neg(), sig[row.step + 1].log().neg()
        end = t + (t_next - t) * r if row.stage == 0 else t_next
        return t.neg().exp(), end.neg().exp()

    return _sample("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   philox=True, noise_args=args, eta=eta, s_noise=s_noise, r=r, brownian=noise_sampler is None)
