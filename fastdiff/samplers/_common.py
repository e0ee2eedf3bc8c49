"""Helpers shared by sampler modules, named after the maths (no tensors, float64 host scalars)."""

from __future__ import annotations

import dataclasses
import math

from ..core.plan import Row, Write, combo, x0_coeffs

SQRT2_M1 = 2**0.5 - 1


class RowLimitError(ValueError):
    """A step whose update is finite but needs more history reads or writes than a plan row has
    (:data:`~fastdiff.core.plan.MAX_READS`, :data:`~fastdiff.core.plan.MAX_WRITES`): refused by name
    (the diffusers drop-in refuses that step when it runs), never approximated."""

INF_SCALE = 2.0**64
"""Stands for ``1 / sqrt(alpha_cumprod) = inf`` (zero terminal SNR, or alphas_cumprod underflowing to 0)
in an epsilon row that clips its data estimate (``clip_sample``): diffusers' ``(x - m) / 0`` is ``+-inf``,
clipped to ``+-clip_sample_range``; ``2**64 (x - m)`` (a power of two: exact in float32, no overflow below
``|x| = 2**64``) clips the same wherever ``|x - m| > 2**-64 clip_sample_range`` (diffusers gives NaN
where ``x == m``)."""


def data_coeffs(kind: str, prediction: str, alpha: float, sigma: float, in_scale: float = 1.0,
                where: str = "") -> tuple[float, float]:
    """``(a_x, a_e)`` with ``x0 = a_x x + a_e e`` for a model seeing ``in_scale x = alpha x0 + sigma eps``.

    Refuses combinations that have no meaning: ``v`` outside VP (needs ``alpha^2 + sigma^2 = 1``),
    ``flow`` outside flow schedules, and ``eps`` where ``alpha = 0`` (zero terminal SNR, flow at s=1).
    """
    if prediction == "v" and kind != "vp":
        raise ValueError(f"prediction 'v' needs a vp schedule (alpha^2 + sigma^2 = 1), got a {kind} schedule")
    if prediction == "flow" and kind != "flow":
        raise ValueError(f"prediction 'flow' needs a flow schedule, got a {kind} schedule")
    if prediction == "eps" and alpha == 0.0:
        raise ValueError(f"prediction 'eps' gives no data estimate where alpha = 0 ({where}); "
                         "use v (zero terminal SNR) or flow/x0 predictions")
    return x0_coeffs(prediction, alpha, sigma, in_scale)


def eps_coeffs(prediction: str, alpha: float, sigma: float, in_scale: float = 1.0) -> tuple[float, float]:
    """``(b_x, b_e)`` with ``eps = b_x x + b_e e`` for a model seeing ``in_scale x = alpha x0 + sigma eps``.

    The noise estimate of the UNCLIPPED data estimate ``x0 = a_x x + a_e e`` (:func:`data_coeffs`),
    ``eps = (in_scale x - alpha x0) / sigma``, in closed form per prediction (exact zeros, no
    cancellation): ``eps`` gives ``(0, 1)``; ``v`` (``alpha^2 + sigma^2 = 1``) ``(sigma in_scale, alpha)``;
    ``x0`` ``(in_scale / sigma, -alpha / sigma)``; ``flow`` (``alpha = 1 - sigma``) ``(in_scale, alpha)``;
    ``score`` (``-eps / sigma``) ``(0, -sigma)``.
    """
    if prediction == "eps":
        return 0.0, 1.0
    if prediction == "v":
        return sigma * in_scale, alpha
    if prediction == "flow":
        return in_scale, alpha
    if prediction == "score":
        return 0.0, -sigma
    if prediction != "x0":
        raise ValueError(f"no noise estimate for prediction {prediction!r}")
    if sigma == 0.0:
        raise ValueError("prediction 'x0' gives no noise estimate where sigma = 0")
    return in_scale / sigma, -alpha / sigma


def grid_point(schedule, prediction: str, sigma: float, t: float) -> dict:
    """Row fields of a model evaluation at grid noise level ``sigma`` (state space of ``schedule.state``),
    with the model input's ``alpha_t``/``sigma_t`` (``in_scale x = alpha_t x0 + sigma_t eps``)."""
    in_scale, alpha, sig = schedule.state(sigma)
    a_x, a_e = data_coeffs(schedule.kind, prediction, alpha, sig, in_scale, where=f"sigma={sigma:g}")
    return dict(t=float(t), sigma=float(sigma), in_scale=in_scale, a_x=a_x, a_e=a_e, alpha_t=float(alpha),
                sigma_t=float(sig))


def euler_update(sigma: float, sigma_next: float) -> tuple[float, float]:
    """Euler step of the probability-flow ODE ``dx/dsigma = (x - d)/sigma``: ``x' = c_x x + c_d d``."""
    r = sigma_next / sigma
    return r, 1.0 - r


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0, dtype=None) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` of an ancestral step (k-diffusion's ``get_ancestral_step``).

    ``dtype`` (a torch dtype, e.g. a schedule's ``scalar_dtype``): compute the split with
    k-diffusion's expression in that precision, as k-diffusion does on its sigmas tensor. In
    float32 ``sigma_to**2 - sigma_up**2`` cancels (``sigma_down`` can be off by 1e-3 relative, or
    exactly 0 where float64 gives ~1e-6, which switches k-diffusion to its Euler branch), and the
    samplers downstream are sensitive to it: mirroring the library needs its numbers.
    """
    if not eta:
        return sigma_to, 0.0
    if dtype is not None:
        import torch

        f, t = torch.tensor(sigma_from, dtype=dtype), torch.tensor(sigma_to, dtype=dtype)
        up = min(t, eta * (t**2 * (f**2 - t**2) / f**2) ** 0.5)  # builtin min, as k-diffusion (NaN: sigma_to)
        return float((t**2 - up**2) ** 0.5), float(up)
    up = min(sigma_to, eta * math.sqrt(max(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2, 0.0)))
    down = math.sqrt(max(sigma_to**2 - up**2, 0.0))
    return down, up


def churn_gammas(sigmas, s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """Karras et al. (2022) Algorithm 2 churn factor per step (k-diffusion's ``gamma``)."""
    n = len(sigmas) - 1
    g = min(s_churn / n, SQRT2_M1)
    return [g if s_tmin <= sigmas[i] <= s_tmax else 0.0 for i in range(n)]


def add_noise(row: Row, coef: float) -> Row:
    """``row`` with ``coef * z`` added to ``x'`` and ``noise=True``."""
    out = row.out[:-1] + (row.out[-1] + coef,)
    return dataclasses.replace(row, out=out, noise=True)


def clip_mode(clip_sample: bool, thresholding: bool) -> str | None:
    """Row clip mode of diffusers' ``thresholding`` (wins) / ``clip_sample`` config."""
    return "dynamic" if thresholding else "static" if clip_sample else None


def check_number(name: str, value, lo: float | None = None, hi: float | None = None) -> float:
    """``float(value)`` if finite (infinity allowed for ``s_tmax``-style bounds) and within ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value!r}")
    return v


def check_choice(name: str, value, choices: tuple) -> object:
    """``value`` if it is one of ``choices``, else ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def heun_rows(schedule, prediction: str, sigma_hat: float, t_hat: float, sigma_next: float, t_next: float,
              step: int, clip: str | None = None) -> list[Row]:
    """One Heun step (Karras et al. 2022, Alg. 1/2) from ``sigma_hat`` to ``sigma_next`` as rows.

    Two rows when ``sigma_next > 0``: an Euler predictor that also stores
    ``H0 = x + dt/2 * D1`` and a corrector ``x' = H0 + dt/2 * D2``. A plain Euler row when
    ``sigma_next == 0`` (as diffusers and k-diffusion do).
    """
    p1 = grid_point(schedule, prediction, sigma_hat, t_hat)
    cx, cd = euler_update(sigma_hat, sigma_next)
    if sigma_next == 0:
        return [Row(**p1, out=combo(x=cx, d=cd), clip=clip, step=step)]
    half = (sigma_next - sigma_hat) / 2
    first = Row(**p1, out=combo(x=cx, d=cd), clip=clip, step=step, stage=0,
                writes=(Write(0, combo(x=1 + half / sigma_hat, d=-half / sigma_hat)),))
    p2 = grid_point(schedule, prediction, sigma_next, t_next)
    second = Row(**p2, out=combo(x=half / sigma_next, d=-half / sigma_next, h=(1.0,)), reads=(0,), clip=clip,
                 step=step, stage=1)
    return [first, second]



CLIP_OPTIONS = {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False,
                "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
"""diffusers' x0 clipping options with the defaults of DDPMScheduler / DDIMScheduler."""


def clip_settings(clip_sample: bool, clip_sample_range: float, thresholding: bool,
                  dynamic_thresholding_ratio: float, sample_max_value: float) -> tuple[str | None, dict]:
    """Row clip mode and the matching Plan fields from diffusers' clipping options."""
    clip = clip_mode(bool(clip_sample), bool(thresholding))
    kw = dict(clip_range=check_number("clip_sample_range", clip_sample_range, 0.0),
              threshold_ratio=check_number("dynamic_thresholding_ratio", dynamic_thresholding_ratio, 0.0, 1.0),
              threshold_max=check_number("sample_max_value", sample_max_value, 1.0))
    return clip, kw


def vp_point(schedule, prediction: str, t: int) -> dict:
    """Row fields of a DDPM/DDIM evaluation at integer timestep ``t`` (state = model input), with
    ``alpha_t = sqrt(abar[t])``, ``sigma_t = sqrt(1 - abar[t])``."""
    abar = float(schedule.alphas_cumprod[t])
    alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
    a_x, a_e = data_coeffs("vp", prediction, alpha, sigma, where=f"timestep {t}")
    return dict(t=float(t), sigma=float(schedule.train_sigmas[t]), in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=alpha,
                sigma_t=sigma)


CHURN_OPTIONS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
"""Karras et al. (2022) churn options of the samplers that take them (euler, heun, dpm_2), with defaults."""


def churned_grid(schedule, disc, s_churn: float, s_tmin: float, s_tmax: float,
                 s_noise: float) -> tuple[list[float], list[float], list[float], float]:
    """Per step ``(sigma_hat, t_hat, z_coef)`` of Karras et al. (2022) churn, and the initial scale.

    ``z_coef[i]`` is the noise added before step ``i`` (k-diffusion draws it there); rows add it at
    the end of step ``i-1``, and step 0's goes into the initial scale (same distribution).
    """
    check_number("s_churn", s_churn, 0.0)
    check_number("s_noise", s_noise, 0.0)
    sig = disc.sigmas
    gam = churn_gammas(sig, s_churn, s_tmin, s_tmax)
    hats = [float(sig[i]) * (1 + g) for i, g in enumerate(gam)]
    ts = [float(disc.timesteps[i]) if g == 0 else float(schedule.sigma_to_t(hats[i])) for i, g in enumerate(gam)]
    zc = [s_noise * math.sqrt(max(hats[i] ** 2 - float(sig[i]) ** 2, 0.0)) if g > 0 else 0.0
          for i, g in enumerate(gam)]
    init = math.sqrt(disc.init_sigma**2 + zc[0] ** 2)
    return hats, ts, zc, init
