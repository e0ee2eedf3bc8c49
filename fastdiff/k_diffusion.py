"""k-diffusion's samplers with k-diffusion's signatures, running one fused kernel per model call.

Code written for k-diffusion switches by changing an import::

    from fastdiff import k_diffusion as K  # was: import k_diffusion.sampling as K
    x = K.sample_dpmpp_2m(denoiser, noise * sigmas[0], sigmas, extra_args={"cond": c})

Conventions are k-diffusion's: ``model(x, sigma * s_in, **extra_args)`` is a denoiser returning
x0 for ``x = x0 + sigma * eps`` (``s_in`` a ``[B]`` tensor of ones in ``x``'s dtype); ``x``
arrives already scaled by ``sigmas[0]`` and is not modified; ``sigmas`` is the full grid (usually
ending in 0); ``callback`` gets ``{'x', 'i', 'sigma', 'sigma_hat', 'denoised'}`` once per step,
after the first model call of the step (``x`` is a copy when a callback is given). The payload is
to read and to keep (no later step writes into it), not to write into: k-diffusion's callback gets
its state itself, so writing into ``x`` moves its step (and writing into ``denoised`` moves some
samplers' steps but not others', e.g. not ``euler``'s, which has used it before the callback);
here writing into ``x`` changes nothing and ``denoised`` is the model's output, which the step
reads after the callback. Each function also takes ``backend=`` (fused-step backend, default
``auto``). k-diffusion itself is not needed.

Noise:

- churn samplers (euler, heun, dpm_2): k-diffusion draws one ``torch.randn_like(x)`` at the start
  of every step, churning or not; so do these functions, at the same points and in ``x``'s memory
  layout, keeping only the draws of churning steps. From the second step on they draw in the dtype
  k-diffusion's state has by then (its ``to_d`` promotes ``x`` to the sigmas' float dtype and the
  model output's: float32 draws for fp16 ``x`` with float32 sigmas), cast to ``x``'s dtype. A
  seeded global RNG gives k-diffusion's churn noise and leaves the global RNG in k-diffusion's
  state (the price: one discarded draw per step).
- ancestral (euler_ancestral, dpm_2_ancestral, dpmpp_2s_ancestral) and DPM-Solver (dpm_fast,
  dpm_adaptive): ``noise_sampler(sigma, sigma_next)`` where k-diffusion calls it (the ancestral
  samplers where ``sigma_next > 0``; dpm_fast after every step and dpm_adaptive after every
  accepted one, with ``eta = 0`` too, where k-diffusion adds the draw times 0); default
  ``torch.randn_like(x)``, as k-diffusion's default: a seeded global RNG gives its numbers.
- SDE (dpmpp_sde, dpmpp_2m_sde, dpmpp_3m_sde): ``noise_sampler(sigma, sigma_next)`` where
  k-diffusion calls it; without one, the keyword-only ``noise`` picks the default:

  - ``noise="brownian"`` (the default): k-diffusion's default, a torchsde Brownian tree
    (``BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed)``) whose seed is
    drawn from the global RNG as k-diffusion draws it (one ``torch.randint(0, 2**63 - 1, [])`` per
    call, used or not). The same ``torch.manual_seed`` gives k-diffusion's numbers and leaves the
    global RNG in k-diffusion's state. The tree's draws reach the fused step as external noise; it
    is built at its first draw (never with ``eta = 0``). Its cost is torchsde's, k-diffusion's own:
    ~17 ms per step at 4x4x64x64 fp32 on a 2-core CPU, against ~0.15 ms for the whole fused step
    with ``"philox"`` (the model excluded).
  - ``noise="philox"``: in-kernel Philox noise keyed by that same seed (the global RNG is left as
    k-diffusion leaves it): independent standard normals per step (dpmpp_sde's two draws of a step
    combined into increments of one Brownian motion), the law of k-diffusion's noise on a fixed
    grid, not its numbers, at no host cost.

  Where torchsde is not importable, ``"brownian"`` falls back to ``"philox"`` with a
  ``RuntimeWarning`` (once per process). Any other ``noise`` raises a ``ValueError``, as does
  ``noise="philox"`` with a ``noise_sampler`` (two sources for one noise); the default
  ``noise="brownian"`` with a ``noise_sampler`` uses the sampler, as k-diffusion uses any sampler
  it is given (``"brownian"`` names the default noise, and the sampler replaces the default).

A ``noise_sampler`` must return a tensor shaped like ``x`` (never broadcast).

Grids: ``sigmas`` is a non-empty 1-D tensor, finite, >= 0, non-increasing, with 0 at most in its
last entry (k-diffusion divides by zero on a step from 0). One sigma is zero steps (``x`` is
returned, as k-diffusion's loop runs ``len(sigmas) - 1`` steps). A repeated sigma that a
multistep difference divides by (lms, dpmpp_2m, dpmpp_2m_sde, dpmpp_3m_sde; k-diffusion returns
NaN or inf) raises a ``ValueError``; a zero step that nothing divides by leaves ``x`` as it is (and
draws the noise k-diffusion draws), where k-diffusion's dpmpp_3m_sde (``expm1(0) / 0``) and its
default Brownian noise on a zero interval (``0 / 0``, dpmpp_sde and dpmpp_2m_sde) return NaN.
k-diffusion's SDE samplers crash on a one-step grid ``[sigma, 0]``; here it is their denoising
step, ``x = denoised``. ``lms`` takes any ``order`` >= 1 on grids whose steps stay at order 8 or below
(above 5 a fused row reads 3 earlier derivatives and one sum of the older ones; a step of order 9
would need more than a row's 4 history reads: such a grid raises a ``ValueError``).

Precision: the state, the model input and the result have ``x``'s dtype (the result also has
``x``'s memory layout where ``x`` is dense, channels_last or permuted, as k-diffusion's element-wise
steps keep it; k-diffusion's dpmpp_2m_sde and dpmpp_3m_sde return the model's last output itself
on a grid ending in 0, in its dtype and layout) and the model gets
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

DPM-Solver (``sample_dpm_fast(model, x, sigma_min, sigma_max, n)``, ``sample_dpm_adaptive(model,
x, sigma_min, sigma_max)``): no grid; k-diffusion's ``DPMSolver`` steps in ``t = -log sigma``
between the two, and so do these (:mod:`fastdiff.samplers.k_dpm` has its steps as rows). Every
``t``, evaluation point, sigma the model gets and ancestral split is computed as k-diffusion
computes it (float32 ``t`` for float ``sigma_min``/``sigma_max``), so the model gets k-diffusion's
sigmas exactly; the coefficients are then computed in float64 from those values (float64 ``x``:
k-diffusion computes them in float32, ~1e-7 apart; ~4e-6 for the long steps of ``eta = 1``).
``callback`` gets k-diffusion's payload, ``{'sigma', 'sigma_hat', 'x', 'i', 't', 't_up',
'denoised'}``, dpm_adaptive's with ``'error', 'h', 'steps', 'nfe', 'n_accept', 'n_reject'`` and
after every try, accepted or not; ``x`` is the state itself (a new tensor per step, never written
afterwards) and ``denoised`` the model's output (k-diffusion's ``x - sigma * eps``, up to
rounding); as above, the payload is to read and keep: writing into ``x`` moves the step here and in
k-diffusion, but not alike (k-diffusion's step keeps the noise estimate of the ``x`` before).
dpm_adaptive's step-size control (the error norm, k-diffusion's PID controller) runs on the host,
as k-diffusion's; each try's fused rows also write the lower-order estimate and the
difference of the two, computed from noise-estimate differences (k-diffusion subtracts two
rounded states). The error estimate is moved ~1e-3 relative by float32 rounding of the model
inputs alone (k-diffusion's too), so steps land ~1e-5 relative from k-diffusion's (the same tries
accepted and rejected) and results agree to ~1e-6; with ``eta > 0`` and a noise sampler whose draws
depend on the interval (k-diffusion's ``BrownianTreeNoiseSampler``), draws on intervals ~1e-5
apart differ by ~1e-3 (Brownian increments are not smooth in their end points), and the paths
then part: the same law as k-diffusion's run, not its numbers. With float64 ``sigma_min`` (a
tensor) and ``eta > 0``, k-diffusion's ``dpm_fast`` returns NaN (its float32 ``t`` grid overshoots
the float64 ``t_end`` in the last step, and its noise scale is the square root of a negative
number); that noise scale is 0 here. Arguments k-diffusion takes without checking
are refused: ``sigma_min``/``sigma_max`` not finite (k-diffusion refuses only <= 0, as here),
``n`` < 1 (k-diffusion: ``IndexError``), ``h_init = 0`` (k-diffusion loops forever), negative
``eta``, ``s_noise``, ``rtol`` or ``atol``; a non-finite error estimate (a NaN model output)
raises :class:`fastdiff.runtime.loop.NonFiniteError` where k-diffusion rejects every try from there
on, forever. ``sigma_min == sigma_max`` is the identity step (and the noise k-diffusion adds),
where k-diffusion's order-3 step divides 0 by 0.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from . import samplers
from .core.args import StepArgs, pack_row
from .core.plan import Plan
from .core.rng import expand_seeds
from .core.schedules import Discretization, VESchedule
from .runtime import ops
from .runtime.loop import LoopOptions, NonFiniteError, run_plan
from .samplers import k_dpm
from .samplers._common import check_number

__all__ = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
           "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
           "sample_dpmpp_3m_sde", "sample_dpm_fast", "sample_dpm_adaptive"]

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


def _inputs(x, extra_args) -> dict:
    """The model's keyword arguments, after checking ``x`` and ``extra_args`` (errors name them)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if extra_args is not None and not isinstance(extra_args, Mapping):
        raise TypeError(f"extra_args must be a dict of keyword arguments for the model, got "
                        f"{type(extra_args).__name__}")
    return {} if extra_args is None else dict(extra_args)


def _sample(name: str, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args, callback, disable, backend: str, *,
            churn: tuple[float, ...] | None = None, noise: NoiseSampler | None = None, default: str | None = None,
            noise_args: Callable | None = None, **options) -> torch.Tensor:
    """Run sampler ``name`` on k-diffusion's inputs (see the module docstring for the noise rules).

    ``churn=(s_churn, s_tmin, s_tmax, s_noise)`` for Karras churn; ``noise`` is called where a
    row draws noise and k-diffusion would call its noise sampler (``sigma_next > 0``); without
    ``noise``, ``default`` (the SDE samplers': :func:`_sde_noise`) is ``"brownian"`` for k-diffusion's
    Brownian tree noise or ``"philox"`` for in-kernel Philox noise. ``noise_args(row, sigmas)``
    gives the two arguments of the noise sampler's call (default ``sigmas[step], sigmas[step + 1]``).
    """
    extra = _inputs(x, extra_args)
    sig = _check_sigmas(sigmas)
    seeds = None
    if default is not None and noise is None:
        # k-diffusion's default BrownianTreeNoiseSampler draws its seed here, used or not: same global RNG
        seed = int(torch.randint(0, 2**63 - 1, []))
        if default == "brownian":
            noise = _BrownianTreeNoise(x, sigmas, seed)
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
    # churn noise and leaves the same RNG state), keeping only the ones that churn. From step 1 on,
    # k-diffusion's x has the dtype its to_d promoted it to (x, the model's outputs and sigma_hat,
    # a >= 1-dim tensor of the sigmas' float dtype): its draws are in that dtype, and so are ours
    n_drawn = [0]
    drawn_dt = [torch.promote_types(dt, sigmas.dtype if sigmas.is_floating_point() else torch.get_default_dtype())]

    def draw_to(step: int) -> torch.Tensor | None:
        """Draw k-diffusion's per-step noise up to ``step``; returns the one of ``step`` if drawn now."""
        z = None
        while n_drawn[0] <= step:
            # x's layout: CPU normal_ draws differently for non-contiguous
            z = torch.randn_like(x_in, dtype=dt if n_drawn[0] == 0 else drawn_dt[0])
            n_drawn[0] += 1
        return z if z is None or z.dtype == dt else z.to(dt)

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
        if churn is not None and isinstance(den, torch.Tensor) and den.is_floating_point():
            drawn_dt[0] = torch.promote_types(drawn_dt[0], den.dtype)
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
    if not use_fn and default is not None and any(r.noise for r in rows):
        seeds = expand_seeds(seed, B)
    opts = LoopOptions(seeds=seeds, noise_fn=noise_fn if use_fn else None, backend=backend, progress=_progress(disable),
                       check_finite=False)
    out = run_plan(plan, f, x, opts, in_place=False)  # x is our own copy: the result comes back new
    # in x's layout where x is dense in another (channels_last, permuted), as k-diffusion's
    # element-wise steps keep it
    like = torch.empty_like(x_in)  # preserve_format: x's strides when x is dense, else contiguous
    return out if like.is_contiguous() or like.stride() == out.stride() else like.copy_(out)


def _default_noise(x: torch.Tensor) -> NoiseSampler:
    return lambda sigma, sigma_next: torch.randn_like(x)


NOISE = ("brownian", "philox")
"""The default noises of the SDE samplers (their ``noise=`` argument)."""
_warned_no_torchsde = False


def _torchsde():
    """torchsde, or ``None`` where it is not importable."""
    try:
        import torchsde
    except ImportError:
        return None
    return torchsde


def _sde_noise(noise: str, noise_sampler) -> str | None:
    """The default noise an SDE sampler draws: ``None`` where ``noise_sampler`` is given, else ``noise``;
    ``"brownian"`` without torchsde is ``"philox"``, with a warning (once)."""
    global _warned_no_torchsde
    if not isinstance(noise, str) or noise not in NOISE:
        raise ValueError(f"noise must be one of {NOISE} (k-diffusion's Brownian tree noise, or in-kernel Philox "
                         f"noise), got {noise!r}")
    if noise_sampler is not None:
        if noise == "philox":
            raise ValueError("noise='philox' asks for in-kernel noise, but a noise_sampler was given: the noise "
                             "comes from one or the other")
        return None
    if noise == "brownian" and _torchsde() is None:
        if not _warned_no_torchsde:
            _warned_no_torchsde = True
            warnings.warn("fastdiff.k_diffusion: torchsde is not installed, so the SDE samplers' default noise is "
                          "in-kernel Philox noise (the law of k-diffusion's BrownianTreeNoiseSampler, not its "
                          "numbers); install torchsde for k-diffusion's noise, or pass noise='philox'",
                          RuntimeWarning, stacklevel=4)  # the caller of sample_*: past torch.no_grad
        return "philox"
    return noise


class _BrownianTreeNoise:
    """k-diffusion's default noise sampler of its SDE samplers, ``BrownianTreeNoiseSampler(x, sigma_min,
    sigma_max, seed)`` (torchsde), operation for operation (k-diffusion is not needed). The tree is
    built at the first draw: building it draws only from its own seeded generators, so the numbers
    are k-diffusion's, and a run that draws nothing (``eta = 0``) pays nothing."""

    def __init__(self, x: torch.Tensor, sigmas: torch.Tensor, seed: int) -> None:
        self.x, self.sigmas, self.seed = x, sigmas, seed
        self.tree = None
        self.sign = 1

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        if self.tree is None:
            sig = self.sigmas
            lo, hi = torch.as_tensor(sig[sig > 0].min()), torch.as_tensor(sig.max())
            lo, hi, self.sign = (lo, hi, 1) if lo < hi else (hi, lo, -1)
            self.tree = _torchsde().BrownianTree(lo, torch.zeros_like(self.x), hi, entropy=self.seed)
        t0, t1 = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        a, b, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        return self.tree(a, b) * (self.sign * sign) / (t1 - t0).abs().sqrt()


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
                        noise_sampler=None, solver_type="midpoint", *, noise: str = "brownian",
                        backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++(2M) SDE."""
    if solver_type not in ("heun", "midpoint"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    return _sample("dpmpp_2m_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   default=_sde_noise(noise, noise_sampler), flavor="k-diffusion", eta=eta, s_noise=s_noise,
                   solver_type=solver_type)


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1., s_noise=1.,
                        noise_sampler=None, *, noise: str = "brownian", backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++(3M) SDE."""
    return _sample("dpmpp_3m_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   default=_sde_noise(noise, noise_sampler), flavor="k-diffusion", eta=eta, s_noise=s_noise)


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
                     noise_sampler=None, r=1 / 2, *, noise: str = "brownian", backend: str = "auto") -> torch.Tensor:
    """DPM-Solver++ (stochastic).

    With ``noise="philox"`` the two draws of a step are Philox normals combined into the
    increments of one Brownian motion over ``[sigma_s, sigma]`` and ``[sigma_next, sigma]``, the
    law of k-diffusion's default ``BrownianTreeNoiseSampler``.
    """

    def args(row, sig):  # k-diffusion's sigma_fn(t), sigma_fn(s) / sigma_fn(t_next), computed as it does
        t, t_next = sig[row.step].log().neg(), sig[row.step + 1].log().neg()
        end = t + (t_next - t) * r if row.stage == 0 else t_next
        return t.neg().exp(), end.neg().exp()

    default = _sde_noise(noise, noise_sampler)
    return _sample("dpmpp_sde", model, x, sigmas, extra_args, callback, disable, backend, noise=noise_sampler,
                   default=default, noise_args=args, eta=eta, s_noise=s_noise, r=r, brownian=default == "philox")


# --- DPM-Solver with fixed and adaptive step sizes: k-diffusion's DPMSolver loop on the host, its
# solver updates as fused rows (fastdiff.samplers.k_dpm) run one at a time by the step backend


def _sigma_t(name: str, value) -> torch.Tensor:
    """k-diffusion's ``t = -log(torch.tensor(value))`` of ``sigma_min``/``sigma_max`` (a number or a
    one-element tensor, finite and > 0), on the host."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(f"{name} must be a number or a one-element real tensor, got {value.dtype} "
                             f"{tuple(value.shape)}")
        v = value.detach().to("cpu").reshape(())  # as torch.tensor(value): its dtype
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        v = torch.tensor(value)  # a float gives float32 t, as in k-diffusion
    else:
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(float(v)) and float(v) > 0):
        raise ValueError(f"sigma_min and sigma_max must be finite and > 0 (k-diffusion: must not be 0), got "
                         f"{name}={float(v)!r}")
    return v.log().neg()


def _sig(t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``DPMSolver.sigma(t) = exp(-t)``."""
    return t.neg().exp()


def _ancestral(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float):
    """k-diffusion's ``get_ancestral_step`` (``eta > 0``) on its tensors: ``(sigma_down, sigma_up)``."""
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def _noise_scale(sigma: torch.Tensor, sigma_to: torch.Tensor) -> float:
    """k-diffusion's ``su = (sigma**2 - sigma_to**2) ** 0.5``, 0 where rounding makes the difference
    negative: float64 ``sigma_min`` gives a float64 ``t_end`` but (torch.linspace) float32 ``t``, whose
    last one can overshoot it by an ulp; k-diffusion's ``su`` is NaN there, and so is its result."""
    d = float(sigma**2 - sigma_to**2)
    return math.sqrt(d) if d > 0 else 0.0


def _bar(disable, total=None):
    """k-diffusion's tqdm bar (one tick per model call), or ``None`` in a context manager."""
    if not _progress(disable):
        return contextlib.nullcontext()
    from tqdm.auto import tqdm

    return tqdm(total=total)


class _Rows:
    """k-diffusion's ``DPMSolver`` with every solver update a fused row: the model is called where
    k-diffusion calls it, ``model(x, sigma * ones[B], **extra_args)`` (a denoiser), and each row of
    :mod:`fastdiff.samplers.k_dpm` runs on the step backend (:func:`fastdiff.runtime.ops.step`).
    Every state is a new tensor that is never written again (as k-diffusion's), so the model and
    callbacks may keep what they are given."""

    def __init__(self, model, x: torch.Tensor, extra: dict, backend: str, bar) -> None:
        self.model, self.x, self.extra, self.backend, self.bar = model, x, extra, backend, bar
        ops.requested_backend(backend)  # a bad name fails before the first model call

    def denoise(self, u: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        x = self.x
        out = self.model(u, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), **self.extra)
        if self.bar is not None:
            self.bar.update()
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:  # never broadcast
            raise ValueError(f"model must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__} "
                             f"at step {step}")
        return out.detach().to(dtype=x.dtype, device=x.device).contiguous()

    def noise(self, sampler: NoiseSampler, sigma, sigma_next, step: int) -> torch.Tensor:
        z = sampler(sigma, sigma_next)
        if not isinstance(z, torch.Tensor) or z.shape != self.x.shape:
            raise ValueError(f"noise_sampler must return a tensor shaped like x {tuple(self.x.shape)}, got "
                             f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__} at step {step}")
        return z.to(dtype=self.x.dtype, device=self.x.device).contiguous()

    def run(self, row, u: torch.Tensor, m: torch.Tensor, slots: dict, z: torch.Tensor | None = None) -> torch.Tensor:
        """Row ``row`` from state ``u`` and model output ``m``: its new state (its history writes go to ``slots``)."""
        out = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        writes = tuple(torch.empty_like(out) for _ in row.writes)
        ops.step(StepArgs(x=u, out=out, m=m, coef=pack_row(row, fold=True), h_read=tuple(slots[k] for k in row.reads),
                          h_write=writes, z=z), self.backend, check=False)
        slots.update((w.slot, t) for w, t in zip(row.writes, writes))
        return out

    def step(self, rows, x: torch.Tensor, first: Callable | None = None, noise: Callable | None = None):
        """One solver step's rows from ``x``: ``(x', slots)``. ``first(denoised)`` runs after the first
        model call, ``noise()`` draws the last row's noise after the last one."""
        slots = {k_dpm.SLOT_X: x}
        u = x
        for r in rows:
            m = self.denoise(u, r.t, r.step)
            if r.stage == 0 and first is not None:
                first(m)
            u = self.run(r, u, m, slots, noise() if r.noise else None)
        return u, slots

    def result(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a new tensor in the layout of the caller's ``x``, as torch's element-wise operations keep it."""
        out = torch.empty_like(self.x)  # preserve_format: x's strides when x is dense, else contiguous
        if out.is_contiguous():
            return x.clone() if x is self.x else x
        return out.copy_(x)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral)
                                       or (isinstance(value, float) and value.is_integer())) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


@torch.no_grad()
def sample_dpm_fast(model, x, sigma_min, sigma_max, n, extra_args=None, callback=None, disable=None, eta=0.,
                    s_noise=1., noise_sampler=None, *, backend: str = "auto") -> torch.Tensor:
    """DPM-Solver-Fast (fixed step size). See https://arxiv.org/abs/2206.00927.

    ``n`` model evaluations on a uniform grid in ``t = -log sigma`` from ``sigma_max`` to
    ``sigma_min``, in DPM-Solver-3 steps with a DPM-Solver-2 and/or -1 step last (Lu et al. 2022,
    Sec. 3.4). ``x``: ``[B, ...]`` (already scaled by ``sigma_max``); returns a new tensor like it.
    """
    t_end, t_start = _sigma_t("sigma_min", sigma_min), _sigma_t("sigma_max", sigma_max)
    extra = _inputs(x, extra_args)
    n = _check_count("n (model evaluations)", n)
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    ns = _default_noise(x) if noise_sampler is None else noise_sampler
    if eta and not t_end > t_start:
        raise ValueError(f"eta must be 0 for reverse sampling (sigma_min >= sigma_max), got eta={eta}")
    m = n // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1)  # on the host (k-diffusion: on x's device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    dev = x.device
    with _bar(disable, n) as bar:
        run = _Rows(model, x, extra, backend, bar)
        state = x.contiguous()
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            if eta:
                sd, _ = _ancestral(_sig(t), _sig(t_next), eta)
                t_to = torch.minimum(t_end, sd.log().neg())
                su = _noise_scale(_sig(t_next), _sig(t_to))
            else:
                t_to, su = t_next, 0.0
            # k-diffusion calls its noise sampler after every step, adding su * s_noise times its draw
            rows = k_dpm.step_rows(float(t), float(t_to), order, z=su * s_noise, step=i,
                                   dtype=torch.promote_types(t.dtype, t_to.dtype))

            def first(den, i=i, t=t.to(dev), x=state):  # k-diffusion's callback, after the step's first model call
                callback({"sigma": _sig(t), "sigma_hat": _sig(t), "x": x, "i": i, "t": t, "t_up": t,
                          "denoised": den.clone()})

            def draw(i=i, t=t, t_next=t_next):
                return run.noise(ns, _sig(t).to(dev), _sig(t_next).to(dev), i)

            state, _ = run.step(rows, state, first if callback is not None else None, draw)
        return run.result(state)


@torch.no_grad()
def sample_dpm_adaptive(model, x, sigma_min, sigma_max, extra_args=None, callback=None, disable=None, order=3,
                        rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0., icoeff=1., dcoeff=0., accept_safety=0.81,
                        eta=0., s_noise=1., noise_sampler=None, return_info=False, *, backend: str = "auto"):
    """DPM-Solver-12 and 23 (adaptive step size). See https://arxiv.org/abs/2206.00927.

    Each try of a step runs ``order`` model calls whose fused rows give the solution of ``order`` and
    the embedded one of ``order - 1``; the error between them (a norm on the host, k-diffusion's)
    drives the PID step-size control (:class:`fastdiff.samplers.k_dpm.PIDStepSize`). ``x``:
    ``[B, ...]`` (already scaled by ``sigma_max``); returns a new tensor like it, and with
    ``return_info`` also ``{'steps', 'nfe', 'n_accept', 'n_reject'}``.
    """
    t_end, t_start = _sigma_t("sigma_min", sigma_min), _sigma_t("sigma_max", sigma_max)
    extra = _inputs(x, extra_args)
    if isinstance(order, bool) or order not in (2, 3):
        raise ValueError(f"order must be 2 or 3, got {order!r}")
    rtol, atol = check_number("rtol", rtol, 0.0), check_number("atol", atol, 0.0)
    h_init = check_number("h_init", h_init)
    if h_init == 0.0 or not math.isfinite(h_init):
        raise ValueError(f"h_init must be a finite non-zero step in t = -log(sigma), got {h_init!r}")
    pcoeff, icoeff, dcoeff = (check_number(k, v) for k, v in (("pcoeff", pcoeff), ("icoeff", icoeff),
                                                              ("dcoeff", dcoeff)))
    accept_safety = check_number("accept_safety", accept_safety)
    eta, s_noise = check_number("eta", eta, 0.0), check_number("s_noise", s_noise, 0.0)
    ns = _default_noise(x) if noise_sampler is None else noise_sampler
    forward = bool(t_end > t_start)
    if eta and not forward:
        raise ValueError(f"eta must be 0 for reverse sampling (sigma_min >= sigma_max), got eta={eta}")
    pid = k_dpm.PIDStepSize(abs(h_init) * (1 if forward else -1), pcoeff, icoeff, dcoeff, 1.5 if eta else order,
                            accept_safety)
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    s = t_start
    with _bar(disable) as bar:
        run = _Rows(model, x, extra, backend, bar)
        state = x_prev = x.contiguous()
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            if eta:
                sd, _ = _ancestral(_sig(s), _sig(t), eta)
                t_to = torch.minimum(t_end, sd.log().neg())
                su = _noise_scale(_sig(t), _sig(t_to))
            else:
                t_to, su = t, 0.0
            rows = k_dpm.step_rows(float(s), float(t_to), order, low=True, step=info["steps"],
                                   dtype=torch.promote_types(s.dtype, t_to.dtype))
            den = []
            high, slots = run.step(rows, state, den.append)
            low = slots[k_dpm.SLOT_LOW]
            # the step-size control, on the host as in k-diffusion (one norm per try), from the rows'
            # own high - low (k-diffusion subtracts the two rounded estimates)
            delta = torch.maximum(atol_t, rtol_t * torch.maximum(low.abs(), x_prev.abs()))
            error = torch.linalg.norm(slots[k_dpm.SLOT_DIFF] / delta) / state.numel() ** 0.5
            if not math.isfinite(float(error)):  # k-diffusion would reject every try from here on, forever
                raise NonFiniteError(f"sample_dpm_adaptive: the error estimate of try {info['steps']} is "
                                     f"{float(error)} (a NaN or Inf model output, or rtol = atol = 0?)")
            if pid.propose_step(error):
                x_prev = low
                z = run.noise(ns, _sig(s), _sig(t), info["steps"])  # drawn even when su = 0, as k-diffusion
                state = run.run(k_dpm.noise_row(su * s_noise), high, high, {}, z) if su * s_noise else high
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if callback is not None:
                callback({"sigma": _sig(s), "sigma_hat": _sig(s), "x": state, "i": info["steps"] - 1, "t": s,
                          "t_up": s, "denoised": den[0], "error": error, "h": pid.h, **info})
        out = run.result(state)
    return (out, info) if return_info else out
