"""Langevin dynamics from a score model or any denoiser: annealed Langevin dynamics over NCSN's
geometric ladder of noise levels (Song & Ermon 2019, Algorithm 1) and unadjusted Langevin dynamics
at one noise level (``sgld``).

The state is the noisy data in k-diffusion units, ``x = x0 + sigma eps``: on VE it is the model
input; on VP the model sees ``u = x / sqrt(1 + sigma^2)`` at the fractional timestep whose
``sqrt(1 - abar) / sqrt(abar)`` is ``sigma`` (``schedule.state`` and ``schedule.sigma_to_t``, as
the Euler-type samplers), so both samplers run Song & Ermon's update literally on any schedule and
return data units. One step is ``x' = x + (a/2) g + sqrt(a) z`` with the score
``g = grad_x log p_sigma(x)`` taken from the model output of any parameterization
(:func:`fastdiff.core.plan.score_coeffs`; from a denoiser ``g = (x0_hat - x) / sigma^2``): one plan row.

Step sizes are ``O(sigma^2)``: the score of ``p_sigma`` is at most ``1/sigma^2``-Lipschitz (its
Hessian is ``(Cov[x0 | x] - sigma^2 I) / sigma^4``), so a step ``a = c sigma^2`` is stable for
``c < 4``; on a Gaussian of variance ``V`` the chain is ``x' - m = (1 - a/(2V)) (x - m) + sqrt(a) z``,
stationary at ``N(m, V / (1 - a/(4V)))``.
"""

from __future__ import annotations

import math

from ..core.plan import Plan, Row, combo, score_coeffs
from . import register
from ._common import check_number, grid_point
from .score_sde import PREDICTIONS

NCSN_C = 0.2
"""Annealed Langevin's default step at the last level in units of its variance: ``step_lr = NCSN_C
sigma_L^2`` (NCSN's ``eps = 2e-5`` at ``sigma_L = 0.01``), so level ``i`` steps ``a_i = NCSN_C sigma_i^2``."""
SGLD_C = 1.0
"""``sgld``'s default step in units of its noise variance, ``a = SGLD_C sigma^2`` (see :func:`sgld_sigma`)."""
SGLD_MIX = 3.0
"""``sgld``'s default noise level lets its steps shrink a unit-variance direction's memory of the initial
noise to ``exp(-SGLD_MIX)`` (see :func:`sgld_sigma`)."""


def level(schedule, sigma: float, prediction: str) -> dict:
    """Row fields of a model evaluation at k-diffusion noise level ``sigma`` (state ``x0 + sigma eps``)."""
    return grid_point(schedule, prediction, sigma, float(schedule.sigma_to_t(sigma)))


def langevin_out(p: dict, step_size: float) -> tuple[float, ...]:
    """``out`` of one Langevin step ``x' = x + (a/2) g + sqrt(a) z`` at the row fields ``p``."""
    l_x, l_e = score_coeffs(p["a_x"], p["a_e"], p["alpha_t"], p["sigma_t"], p["in_scale"])
    h = step_size / 2
    return combo(x=1.0 + h * l_x, e=h * l_e, z=math.sqrt(step_size))


def sigma_range(schedule) -> tuple[float, float]:
    """``(sigma_min, sigma_max)``, k-diffusion sigma: a VE schedule's own; on VP the schedule's
    ``sigma_min``/``sigma_max`` where set, else the first and last training steps' ``sqrt((1 - abar) / abar)``."""
    if schedule.kind == "ve":
        return float(schedule.sigma_min), float(schedule.sigma_max)
    train = schedule.train_sigmas
    lo = schedule.sigma_min if schedule.sigma_min is not None else train[0]
    hi = schedule.sigma_max if schedule.sigma_max is not None else train[-1]
    return float(lo), float(hi)


def geometric_ladder(sigma_max: float, sigma_min: float, n: int) -> list[float]:
    """NCSN's noise levels: ``n`` levels in geometric progression from ``sigma_max`` to ``sigma_min``
    (one level: ``sigma_min``)."""
    if n == 1:
        return [sigma_min]
    r = math.log(sigma_min / sigma_max)
    return [sigma_max * math.exp(r * i / (n - 1)) for i in range(n)]


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _positive(name: str, value) -> float:
    v = check_number(name, value, 0.0)
    if not 0 < v < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return v


@register("annealed_langevin", kinds=("ve", "vp"), predictions=PREDICTIONS, default_prediction="score",
          options={"n_steps_each": 100, "step_lr": None, "denoise": True, "sigma_min": None, "sigma_max": None})
def annealed_langevin(schedule, steps: int, prediction: str, *, n_steps_each: int, step_lr, denoise: bool,
                      sigma_min, sigma_max) -> Plan:
    """Annealed Langevin dynamics over ``steps`` geometric noise levels (Song & Ermon 2019, Algorithm 1).

    Levels ``sigma_1 > ... > sigma_L`` (``L = steps``, k-diffusion sigma) are geometric from
    ``sigma_max`` to ``sigma_min`` (default: the schedule's range, :func:`sigma_range`; on VP the
    model is queried at the fractional timestep whose ``sqrt(1 - abar) / sqrt(abar)`` is
    ``sigma_i``), whatever the schedule's own sampling grid. Level ``i`` takes ``n_steps_each``
    (NCSN's ``T``) steps ``x' = x + (a_i/2) g + sqrt(a_i) z`` on ``x = x0 + sigma_i eps`` with
    ``a_i = step_lr sigma_i^2 / sigma_L^2``; ``step_lr`` (NCSN's ``eps``) defaults to
    ``0.2 sigma_L^2`` (NCSN's 2e-5 at ``sigma_L = 0.01``). Starts from ``N(0, 1 + sigma_1^2)`` (unit-scale
    data under the first level's noise; NCSN starts from uniform noise). ``denoise`` (default) ends
    with Tweedie's ``E[x0 | x]`` at ``sigma_L`` (NCSNv2's final denoising, one more model
    evaluation); without it the result is the last state, a sample of ``p_{sigma_L}``.

    The levels must be dense enough for ``T`` steps to carry each level's samples to the next: NCSN's
    CIFAR-10 ladder is 10 levels from 1 to 0.01 (ratio 1.67); 10 levels over a 1000x range (ratio 2.2)
    and 15 over a VP schedule's 0.01..157 (ratio 2.0) still sample a Gaussian mixture within 25% of
    the exact sampler's sliced Wasserstein-2 floor with the defaults.
    """
    n_each = _count("n_steps_each", n_steps_each)
    lo, hi = sigma_range(schedule)
    lo = lo if sigma_min is None else _positive("sigma_min", sigma_min)
    hi = hi if sigma_max is None else _positive("sigma_max", sigma_max)
    if not lo <= hi:
        raise ValueError(f"need sigma_min <= sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}")
    sig = geometric_ladder(hi, lo, steps)
    var_l = sig[-1] ** 2
    eps = NCSN_C * var_l if step_lr is None else _positive("step_lr", step_lr)
    rows = []
    for i, s in enumerate(sig):
        p = level(schedule, s, prediction)
        out = langevin_out(p, eps * s * s / var_l)
        rows += [Row(**p, out=out, noise=True, step=i, stage=j) for j in range(n_each)]
    if denoise:
        rows.append(Row(**level(schedule, sig[-1], prediction), out=combo(d=1.0), step=steps - 1, stage=n_each))
    return Plan(tuple(rows), init_scale=math.sqrt(1.0 + sig[0] ** 2), sampler="annealed_langevin",
                prediction=prediction, steps=steps, meta={"sigmas": sig, "step_lr": eps})


def sgld_sigma(steps: int, c: float = SGLD_C, k: float = SGLD_MIX) -> float:
    """``sgld``'s default noise level for ``steps`` steps of size ``a = c sigma^2`` (``inf`` if none mixes).

    For data of unit scale (the convention of VP and VE priors) the score of ``p_sigma`` is stiff
    across the data, ``-1/sigma^2``, which bounds the step to ``O(sigma^2)``, and soft along it,
    ``-1/(1 + sigma^2)``: a unit-variance direction keeps ``1 - a / (2 (1 + sigma^2))`` of its
    distance to equilibrium per step. ``steps`` steps leave ``exp(-k)`` of it where
    ``steps c sigma^2 / (2 (1 + sigma^2)) = k``, i.e. ``sigma^2 = 2k / (c steps - 2k)``: a small noise
    level needs ``~ 1/sigma^2`` steps.
    """
    d = c * steps - 2 * k
    return math.sqrt(2 * k / d) if d > 0 else math.inf


@register("sgld", kinds=("ve", "vp"), predictions=PREDICTIONS, default_prediction="score",
          options={"sigma": None, "step_size": None, "denoise": True})
def sgld(schedule, steps: int, prediction: str, *, sigma, step_size, denoise: bool) -> Plan:
    """Unadjusted Langevin dynamics at one noise level (Roberts & Tweedie 1996; Welling & Teh 2011's SGLD, full score).

    ``steps`` steps ``x' = x + (a/2) g + sqrt(a) z`` on ``x = x0 + sigma eps`` (k-diffusion sigma;
    on VP the model sees ``x / sqrt(1 + sigma^2)`` at the timestep of ``sigma``) from
    ``N(0, 1 + sigma^2)``, towards ``p_sigma``, the data convolved with ``N(0, sigma^2)``, at a
    constant step (Welling & Teh anneal it to 0 for exact posteriors; with a score model the
    stable step is ``O(sigma^2)`` however long the run).

    Defaults, chosen together from the score's scale and ``steps`` (:func:`sgld_sigma`): step
    ``a = sigma^2`` (a quarter of the stability bound ``4 sigma^2``; across the data the chain's
    variance is ``4/3 sigma^2``, along it within ``a / (4V)`` of the target's ``V``) and the smallest
    ``sigma`` whose ``steps`` steps mix a unit-variance direction to ``e^-3``:
    ``sigma^2 = 6 / (steps - 6)``, clamped to the schedule's range
    (:func:`~fastdiff.samplers.langevin.sigma_range`): 30 steps give ``sigma = 0.5``, 200 give
    0.18, 1000 give 0.078, 6 or fewer the schedule's ``sigma_max`` (its prior). ``denoise`` (default)
    ends with Tweedie's ``E[x0 | x]`` at ``sigma`` (one more model evaluation, as NCSNv2 ends);
    without it the result is the last state, a sample of ``p_sigma`` (up to the step's bias).
    """
    lo, hi = sigma_range(schedule)
    sigma = min(max(sgld_sigma(steps), lo), hi) if sigma is None else _positive("sigma", sigma)
    p = level(schedule, sigma, prediction)
    a = SGLD_C * sigma * sigma if step_size is None else _positive("step_size", step_size)
    out = langevin_out(p, a)
    rows = [Row(**p, out=out, noise=True, step=i) for i in range(steps)]
    if denoise:
        rows.append(Row(**p, out=combo(d=1.0), step=steps - 1, stage=1))
    return Plan(tuple(rows), init_scale=math.sqrt(1.0 + sigma * sigma), sampler="sgld", prediction=prediction,
                steps=steps, meta={"sigma": sigma, "step_size": a})
