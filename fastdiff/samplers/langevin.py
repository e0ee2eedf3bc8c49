"""Langevin dynamics from a score model or any denoiser: annealed Langevin dynamics over a ladder
of noise levels (NCSN, Song & Ermon 2019) and plain Langevin dynamics at one noise level.

One step is ``x' = x + (a/2) g + sqrt(a) z`` with the score ``g = grad_x log p_sigma(x)`` taken from
the model output of any parameterization (:func:`fastdiff.plan.score_coeffs`; for a denoiser,
``g = (alpha x0 - u) / sigma^2``), so each step is one plan row. The state is the model input (VE:
``x0 + sigma eps``; VP: ``alpha x0 + sigma eps``).
"""

from __future__ import annotations

import math

from ..plan import Plan, Row, combo, score_coeffs
from . import register
from ._common import check_number, data_coeffs
from .score_sde import PREDICTIONS


def level(schedule, sigma: float, t: float, prediction: str) -> dict:
    """Row fields of a model evaluation at k-diffusion noise level ``sigma`` (state = model input)."""
    alpha = 1.0 if schedule.kind == "ve" else 1.0 / math.sqrt(1.0 + sigma * sigma)
    sig_t = sigma * alpha
    a_x, a_e = data_coeffs(schedule.kind, prediction, alpha, sig_t, 1.0, where=f"sigma={sigma:g}")
    return dict(t=float(t), sigma=float(sigma), in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=alpha, sigma_t=sig_t)


def langevin_out(p: dict, step_size: float) -> tuple[float, ...]:
    """``out`` of one Langevin step ``x' = x + (a/2) g + sqrt(a) z`` at the row fields ``p``."""
    l_x, l_e = score_coeffs(p["a_x"], p["a_e"], p["alpha_t"], p["sigma_t"])
    h = step_size / 2
    return combo(x=1.0 + h * l_x, e=h * l_e, z=math.sqrt(step_size))


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


@register("annealed_langevin", kinds=("ve", "vp"), predictions=PREDICTIONS, default_prediction="score",
          options={"n_steps_each": 100, "step_lr": None, "denoise": True})
def annealed_langevin(schedule, steps: int, prediction: str, *, n_steps_each: int, step_lr, denoise: bool) -> Plan:
    """Annealed Langevin dynamics over ``steps`` noise levels (Song & Ermon 2019, Algorithm 1).

    The levels are the schedule's grid (``schedule.discretize(steps)`` without its final 0); level
    ``i`` takes ``n_steps_each`` steps of size ``a_i = step_lr * sigma_i^2 / sigma_L^2`` (``sigma``
    the model input's noise std). ``step_lr`` defaults to ``0.2 sigma_L^2`` (NCSN's 2e-5 at
    ``sigma_L = 0.01``). ``denoise`` ends with Tweedie's ``E[x0 | x]`` at the last level (NCSNv2's
    final denoising, one more model evaluation).
    """
    n_each = _count("n_steps_each", n_steps_each)
    disc = schedule.discretize(steps)
    pts = [level(schedule, float(disc.sigmas[i]), float(disc.timesteps[i]), prediction) for i in range(steps)]
    var_l = pts[-1]["sigma_t"] ** 2
    eps = 0.2 * var_l if step_lr is None else check_number("step_lr", step_lr, 0.0)
    if not eps > 0:
        raise ValueError(f"step_lr must be > 0, got {step_lr!r}")
    rows = []
    for i, p in enumerate(pts):
        out = langevin_out(p, eps * p["sigma_t"] ** 2 / var_l)
        rows += [Row(**p, out=out, noise=True, step=i, stage=j) for j in range(n_each)]
    if denoise:
        rows.append(Row(**pts[-1], out=combo(d=1.0), step=steps - 1, stage=n_each))
    init = float(disc.init_sigma) if schedule.kind == "ve" else 1.0
    return Plan(tuple(rows), init_scale=init, sampler="annealed_langevin", prediction=prediction, steps=steps)


@register("sgld", kinds=("ve", "vp"), predictions=PREDICTIONS, default_prediction="score",
          options={"sigma": None, "step_size": None})
def sgld(schedule, steps: int, prediction: str, *, sigma, step_size) -> Plan:
    """``steps`` steps of (unadjusted) Langevin dynamics at one noise level (Welling & Teh 2011; Roberts & Tweedie 1996).

    Samples ``p_sigma``, the data convolved with the noise of level ``sigma`` (k-diffusion sigma;
    default the schedule's smallest: ``sigma_min`` for VE, the first training step's for VP).
    ``step_size`` defaults to a tenth of the noise variance. Starts from ``N(0, 1 + sigma^2)`` (VE)
    or ``N(0, 1)`` (VP).
    """
    if sigma is None:
        sigma = schedule.sigma_min if schedule.kind == "ve" else float(schedule.train_sigmas[0])
    sigma = check_number("sigma", sigma, 0.0)
    if not 0 < sigma < math.inf:
        raise ValueError(f"sigma must be > 0 and finite, got {sigma!r}")
    t = sigma if schedule.kind == "ve" else float(schedule.sigma_to_t(sigma))
    p = level(schedule, sigma, t, prediction)
    a = 0.1 * p["sigma_t"] ** 2 if step_size is None else check_number("step_size", step_size, 0.0)
    if not a > 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}")
    out = langevin_out(p, a)
    rows = tuple(Row(**p, out=out, noise=True, step=i) for i in range(steps))
    init = math.sqrt(1.0 + sigma * sigma) if schedule.kind == "ve" else 1.0
    return Plan(rows, init_scale=init, sampler="sgld", prediction=prediction, steps=steps, meta={"step_size": a})
