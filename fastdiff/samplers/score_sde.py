"""Score-based generative modeling through SDEs (Song et al. 2021): reverse-SDE predictors, the
probability-flow ODE, and predictor-corrector sampling with a Langevin corrector.

Every step crosses one interval of the SDE's variance clock, with the score ``g = grad log p`` of
the state taken from any parameterization (:func:`fastdiff.core.plan.score_coeffs`):

- VE (``x = x0 + sigma eps``), clock ``sigma^2``, ``D = sigma_i^2 - sigma_{i+1}^2``: the reverse
  SDE's Euler-Maruyama step ``x' = x + D g + sqrt(D) z`` (Song et al.'s reverse-diffusion
  predictor, diffusers' ``ScoreSdeVeScheduler.step_pred``); the probability-flow ODE's Euler step
  ``x' = x + D/2 g``.
- VP (state = model input ``u = alpha x0 + sigma eps``, prior ``N(0, I)``), clock ``-log abar``,
  ``b = log(abar_{i+1} / abar_i)``: ``x' = (1 + b/2) x + b g + sqrt(b) z``; ODE
  ``x' = (1 + b/2) x + b/2 g``.

The last step, to the end of the grid, adds no noise (Song et al.'s ``denoise``; diffusers' score-SDE
pipeline returns ``prev_sample_mean``): on VE it is Tweedie's ``x + sigma^2 g = E[x0 | x]``.

``pc``'s Langevin corrector is Song et al.'s Algorithm 4 (VE) / 5 (VP): ``x' = x + e g + sqrt(2e) z``
with ``e = 2 alpha_i (snr ||z|| / ||g||)^2``, ``alpha_i = 1`` on VE and ``1 - beta_i`` on VP, ``beta_i``
the training schedule's discrete beta at the level's timestep (their code's
``alpha = 1 - beta[timestep]``). A plan's Langevin row computes ``2 (r ||z|| / ||g||)^2``
(:mod:`fastdiff.core.plan`), so the row carries ``r = snr sqrt(alpha_i)``.

Grids are the schedule's own (``schedule.discretize``). With ``sampling_eps`` a VE schedule with
``sigma_grid="exponential"`` uses Song et al.'s (and diffusers') grid instead: times
``t_i = linspace(1, sampling_eps, N)``, the model called at ``sigma(t_i) = sigma_min (sigma_max /
sigma_min)^t_i``, the step taken between the geometric levels ``discrete_sigmas[floor(t_i (N - 1))]``
and the one below (0 after the lowest), all in float32 as diffusers computes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.plan import Plan, Row, combo, score_coeffs
from . import register
from ._common import check_choice, check_number, data_coeffs

PREDICTIONS = ("score", "eps", "x0", "v")


@dataclass(frozen=True)
class Level:
    """One model evaluation of a score-SDE grid.

    Attributes:
        t: model time.
        sigma: the schedule's noise level of the model input (k-diffusion sigma).
        alpha_t, sigma_t: the model input is ``alpha_t x0 + sigma_t eps`` (it is the state).
        clock: the variance-clock increment to the next level (``D`` for VE, ``b`` for VP).
        noise_coef: the reverse SDE's noise coefficient, ``sqrt(clock)``.
    """

    t: float
    sigma: float
    alpha_t: float
    sigma_t: float
    clock: float
    noise_coef: float


def song_ve_levels(sigma_min: float, sigma_max: float, steps: int, sampling_eps: float) -> list[Level]:
    """Song et al.'s VE grid exactly as diffusers' ``ScoreSdeVeScheduler`` builds and indexes it (float32)."""
    if steps < 2:
        raise ValueError(f"sampling_eps (Song et al.'s time grid) needs steps >= 2, got {steps}")
    ts = torch.linspace(1, sampling_eps, steps)
    discrete = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), steps))
    model_sigma = torch.tensor([sigma_min * (sigma_max / sigma_min) ** t for t in ts])
    levels = []
    for i, t in enumerate(ts):
        idx = int((t * torch.ones(1) * (steps - 1)).long())
        sig = discrete[idx]
        adj = discrete[idx - 1] if idx > 0 else torch.zeros(())
        g = (sig**2 - adj**2) ** 0.5  # float32, as step_pred computes its diffusion
        s = float(model_sigma[i])
        levels.append(Level(t=s, sigma=s, alpha_t=1.0, sigma_t=s, clock=float(g**2), noise_coef=float(g)))
    return levels


def levels(schedule, steps: int, sampling_eps: float | None) -> tuple[list[Level], float]:
    """The grid of a score-SDE sampler and the initial scale (VE: ``sigma_max``; VP: 1)."""
    if sampling_eps is not None:
        eps = check_number("sampling_eps", sampling_eps, 0.0, 1.0)
        if schedule.kind != "ve" or schedule.sigma_grid != "exponential":
            raise ValueError("sampling_eps (Song et al.'s time grid) needs a ve schedule with "
                             f"sigma_grid='exponential', got a {schedule.kind} schedule"
                             + (f" with sigma_grid={schedule.sigma_grid!r}" if schedule.kind == "ve" else ""))
        if not eps > 0:
            raise ValueError(f"sampling_eps must be > 0, got {sampling_eps!r}")
        return song_ve_levels(schedule.sigma_min, schedule.sigma_max, steps, eps), float(schedule.sigma_max)
    disc = schedule.discretize(steps)
    sig = [float(s) for s in disc.sigmas]
    out = []
    for i in range(steps):
        s, s_next = sig[i], sig[i + 1]
        if schedule.kind == "ve":
            clock = s * s - s_next * s_next
            out.append(Level(float(disc.timesteps[i]), s, 1.0, s, clock, math.sqrt(clock)))
        else:
            a = 1.0 / math.sqrt(1.0 + s * s)
            clock = math.log1p(s * s) - math.log1p(s_next * s_next)
            out.append(Level(float(disc.timesteps[i]), s, a, s * a, clock, math.sqrt(clock)))
    return out, (float(disc.init_sigma) if schedule.kind == "ve" else 1.0)


def point(schedule, prediction: str, lv: Level) -> dict:
    """Row fields of a model evaluation at level ``lv`` (the state is the model input)."""
    a_x, a_e = data_coeffs(schedule.kind, prediction, lv.alpha_t, lv.sigma_t, 1.0, where=f"sigma={lv.sigma:g}")
    return dict(t=lv.t, sigma=lv.sigma, in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=lv.alpha_t, sigma_t=lv.sigma_t)


def predictor_out(kind: str, p: dict, lv: Level, ode: bool, noise: bool) -> tuple[float, ...]:
    """``out`` of a reverse-SDE (``ode=False``) or probability-flow (``ode=True``) Euler step."""
    l_x, l_e = score_coeffs(p["a_x"], p["a_e"], lv.alpha_t, lv.sigma_t)
    c = lv.clock / 2 if ode else lv.clock
    drift = lv.clock / 2 if kind == "vp" else 0.0
    z = lv.noise_coef if noise and not ode else 0.0
    return combo(x=1.0 + drift + c * l_x, e=c * l_e, z=z)


def corrector_alpha(schedule, lv: Level) -> float:
    """Song et al.'s ``alpha_i`` of the Langevin corrector (Algorithm 5) at level ``lv``: 1 on VE
    (Algorithm 4); on VP ``1 - beta_i``, the training schedule's discrete beta at the level's timestep
    (their code: ``alpha = 1 - beta[timestep]``, the timestep truncated to an integer as ``.long()`` does)."""
    if schedule.kind == "ve":
        return 1.0
    return 1.0 - float(schedule.betas[int(lv.t)])


def corrector_row(schedule, p: dict, lv: Level, snr: float, step: int, stage: int) -> Row:
    """One Langevin corrector step ``x' = x + e_i g + sqrt(2 e_i) z``, ``e_i = 2 alpha_i (snr ||z|| / ||g||)^2``
    (Song et al. 2021, Algorithms 4/5): a Langevin row (:mod:`fastdiff.core.plan`, ``k = 2 (r ||z|| / ||g||)^2``)
    with ``r = snr sqrt(alpha_i)``. Where ``alpha_i = 0`` (a beta of 1) the step is 0: the row keeps ``x``
    and still consumes its draw of noise."""
    r = snr * math.sqrt(corrector_alpha(schedule, lv))
    if r == 0.0:
        return Row(**p, out=combo(x=1.0), noise=True, step=step, stage=stage)
    return Row(**p, out=combo(x=1.0, e=1.0, z=1.0), noise=True, snr=r, step=step, stage=stage)


def _plan(name: str, schedule, steps: int, prediction: str, sampling_eps, *, ode: bool, correct_steps: int = 0,
          snr: float = 0.0, snr_norm: str = "batch") -> Plan:
    lvs, init = levels(schedule, steps, sampling_eps)
    rows = []
    for i, lv in enumerate(lvs):
        p = point(schedule, prediction, lv)
        rows += [corrector_row(schedule, p, lv, snr, i, j) for j in range(correct_steps)]
        noise = not ode and i + 1 < steps
        rows.append(Row(**p, out=predictor_out(schedule.kind, p, lv, ode, noise), noise=noise, step=i,
                        stage=correct_steps))
    return Plan(tuple(rows), init_scale=init, sampler=name, prediction=prediction, steps=steps, snr_norm=snr_norm)


@register("sde_ve", kinds=("ve",), options={"sampling_eps": None}, predictions=PREDICTIONS,
          default_prediction="score")
def sde_ve(schedule, steps: int, prediction: str, *, sampling_eps) -> Plan:
    """Reverse-time VE SDE, Euler-Maruyama / reverse diffusion (Song et al. 2021; diffusers' ``ScoreSdeVeScheduler.step_pred``)."""
    return _plan("sde_ve", schedule, steps, prediction, sampling_eps, ode=False)


@register("sde_vp", kinds=("vp",), predictions=PREDICTIONS, default_prediction="score")
def sde_vp(schedule, steps: int, prediction: str) -> Plan:
    """Reverse-time VP SDE, Euler-Maruyama in the clock ``-log abar`` (Song et al. 2021)."""
    return _plan("sde_vp", schedule, steps, prediction, None, ode=False)


@register("pf_ode", kinds=("ve", "vp"), options={"sampling_eps": None}, predictions=PREDICTIONS,
          default_prediction="score")
def pf_ode(schedule, steps: int, prediction: str, *, sampling_eps) -> Plan:
    """Euler steps of the probability-flow ODE in the SDE's variance clock (Song et al. 2021)."""
    return _plan("pf_ode", schedule, steps, prediction, sampling_eps, ode=True)


@register("pc", kinds=("ve", "vp"), predictions=PREDICTIONS, default_prediction="score",
          options={"snr": 0.15, "correct_steps": 1, "sampling_eps": None, "snr_norm": "batch"})
def pc(schedule, steps: int, prediction: str, *, snr: float, correct_steps: int, sampling_eps,
       snr_norm: str) -> Plan:
    """Predictor-corrector sampling: Langevin corrector then reverse-SDE predictor per level (Song et al. 2021, Alg. 2/3).

    Per level, ``correct_steps`` Langevin corrector steps (Algorithm 4 on VE, 5 on VP), each
    ``x' = x + e g + sqrt(2 e) z`` with ``e = 2 alpha_i (snr ||z|| / ||g||)^2`` (norms averaged over the
    batch, or per sample with ``snr_norm="sample"``), ``alpha_i = 1`` on VE and ``1 - beta_i`` on VP
    (:func:`corrector_alpha`), then the reverse-diffusion predictor step of ``sde_ve`` / ``sde_vp``.
    On VE with ``sampling_eps`` this is diffusers' ``ScoreSdeVeScheduler`` step for step.
    """
    snr = check_number("snr", snr, 0.0)
    if isinstance(correct_steps, bool) or not isinstance(correct_steps, int) or correct_steps < 0:
        raise ValueError(f"correct_steps must be an int >= 0, got {correct_steps!r}")
    check_choice("snr_norm", snr_norm, ("batch", "sample"))
    if correct_steps and not snr > 0:
        raise ValueError(f"snr must be > 0 with correct_steps={correct_steps}, got {snr!r}")
    return _plan("pc", schedule, steps, prediction, sampling_eps, ode=False, correct_steps=correct_steps, snr=snr,
                 snr_norm=snr_norm)
