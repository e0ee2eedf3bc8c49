"""Maths shared by the exponential-integrator multistep samplers (DPM-Solver++, UniPC).

Log-SNR ``lambda = log(alpha / sigma)``, the phi functions of exponential integrators, and the
sigma grids of diffusers' ``DPMSolverMultistepScheduler`` / ``UniPCMultistepScheduler`` (which
differ from the Euler-type grid of :meth:`fastdiff.core.schedules.VPSchedule.discretize`). Plain float64
host scalars; no tensors.

The state of these samplers is the model input itself (``in_scale = 1``): diffusers' ``sample`` on
a VP schedule (``x = alpha x0 + sigma eps``, ``alpha = 1/sqrt(1 + s^2)``, ``sigma = s alpha`` at
k-diffusion noise level ``s``), k-diffusion's ``x = x0 + s eps`` on a VE schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..core import schedules as S
from ..core.plan import Row, Write, combo
from ._common import check_choice, data_coeffs, eps_coeffs


def log_snr(alpha: float, sigma: float) -> float:
    """``lambda = log(alpha) - log(sigma)``; ``+inf`` at ``sigma = 0`` (the data end of the grid)."""
    if sigma == 0.0:
        return math.inf
    if alpha <= 0.0 or sigma < 0.0:
        raise ValueError(f"log-SNR needs alpha > 0 and sigma >= 0, got alpha={alpha!r}, sigma={sigma!r}")
    return math.log(alpha) - math.log(sigma)


def phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_j z^j / (j + k)!`` (``phi_0 = e^z``, ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``).

    Series for ``|z| < 1`` (no cancellation for small steps), recursion from ``expm1`` otherwise;
    ``phi_k(-inf) = 0`` for ``k >= 1``.
    """
    if k == 0:
        return math.exp(z)
    if z == -math.inf:
        return 0.0
    if abs(z) < 1.0:
        term, total, j = 1.0 / math.factorial(k), 0.0, 0
        while True:
            total += term
            j += 1
            term *= z / (j + k)
            if abs(term) < 1e-17 * abs(total):
                return total
    val = math.expm1(z) / z  # phi_1
    for m in range(1, k):
        val = (val - 1.0 / math.factorial(m)) / z
    return val


def divided_differences(r: Sequence[float]) -> list[list[float]]:
    """DPM-Solver's ``D1``/``D2`` as coefficient rows over ``(d_i, d_{i-1}, d_{i-2})``.

    ``r = (r0,)`` gives ``[D1]`` with ``D1 = (d_i - d_{i-1}) / r0``; ``r = (r0, r1)`` gives
    ``[D1, D2]`` with ``D1_0 = (d_i - d_{i-1})/r0``, ``D1_1 = (d_{i-1} - d_{i-2})/r1``,
    ``D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0 + r1)`` (Lu et al. 2022).
    """
    if len(r) == 1:
        return [[1 / r[0], -1 / r[0], 0.0]]
    r0, r1 = r
    d10 = np.array([1 / r0, -1 / r0, 0.0])
    d11 = np.array([0.0, 1 / r1, -1 / r1])
    d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    return [list(map(float, d1)), list(map(float, d2))]


@dataclass(frozen=True)
class Grid:
    """The points of a multistep run: model evaluations at ``0..steps-1``, the end at ``steps``.

    Attributes:
        timesteps: model time ``t`` at each evaluation (``[steps]``).
        sigmas: k-diffusion noise level ``s`` of each point (``[steps + 1]``; ``Row.sigma``).
        alphas, stds: the state is ``alpha x0 + std eps`` at each point (``[steps + 1]``).
        lambdas: log-SNR of each point (``+inf`` where ``std = 0``).
        init_scale: the initial state is ``init_scale * noise``.
    """

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]
    alphas: tuple[float, ...]
    stds: tuple[float, ...]
    lambdas: tuple[float, ...]
    init_scale: float
    kind: str

    @property
    def steps(self) -> int:
        """Number of solver steps."""
        return len(self.timesteps)

    def h(self, i: int) -> float:
        """Log-SNR step ``lambda_{i+1} - lambda_i`` of step ``i``."""
        return self.lambdas[i + 1] - self.lambdas[i]

    def point(self, i: int, prediction: str) -> dict:
        """Row fields of the model evaluation at point ``i`` (the state is the model input,
        ``alpha_t = alphas[i]``, ``sigma_t = stds[i]``)."""
        a_x, a_e = data_coeffs(self.kind, prediction, self.alphas[i], self.stds[i], 1.0,
                               where=f"step {i}, sigma={self.sigmas[i]:g}")
        return dict(t=self.timesteps[i], sigma=self.sigmas[i], in_scale=1.0, a_x=a_x, a_e=a_e,
                    alpha_t=float(self.alphas[i]), sigma_t=float(self.stds[i]))


def _grid_from_sigmas(kind: str, timesteps, sigmas, init_scale: float) -> Grid:
    sig = [float(s) for s in sigmas]
    if kind == "vp":
        # diffusers' _sigma_to_alpha_sigma_t: alpha = 1/sqrt(s^2 + 1), sigma = s * alpha
        alphas = [1.0 / math.sqrt(s * s + 1.0) for s in sig]
        stds = [s * a for s, a in zip(sig, alphas)]
    else:
        alphas, stds = [1.0] * len(sig), sig
    lams = [log_snr(a, s) for a, s in zip(alphas, stds)]
    return Grid(tuple(float(t) for t in timesteps), tuple(sig), tuple(alphas), tuple(stds), tuple(lams),
                float(init_scale), kind)


def multistep_grid(schedule, steps: int, *, flavor: str = "dpmsolver", lambda_min_clipped: float = -math.inf,
                   use_lu_lambdas: bool = False) -> Grid:
    """The grid of diffusers' ``DPMSolverMultistepScheduler`` (``flavor="dpmsolver"``) or
    ``UniPCMultistepScheduler`` (``flavor="unipc"``) ``set_timesteps`` on a VP schedule, values
    rounded to float32 where diffusers stores float32; a VE (k-diffusion) schedule's own grid.
    """
    check_choice("flavor", flavor, ("dpmsolver", "unipc"))
    own = getattr(schedule, "own_multistep_grid", None)
    if own is not None:  # a grid given as arrays (fastdiff.diffusers: the scheduler's own set_timesteps)
        return own(steps)
    if schedule.kind == "ve":
        if use_lu_lambdas:
            raise ValueError("use_lu_lambdas=True needs a vp schedule (a ve schedule has its own sigma grid)")
        disc = schedule.discretize(steps)
        return _grid_from_sigmas("ve", disc.timesteps, disc.sigmas, disc.init_sigma)
    if schedule.kind != "vp":
        raise ValueError(f"multistep grids need a vp or ve schedule, got a {schedule.kind} schedule")
    if use_lu_lambdas and schedule.sigma_grid != "default":
        raise ValueError(f"use_lu_lambdas=True cannot be combined with sigma_grid={schedule.sigma_grid!r}")
    T = schedule.num_train_timesteps
    acp32 = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32)
    last_t = T
    if flavor == "dpmsolver" and lambda_min_clipped != -math.inf:
        lam = torch.log(torch.sqrt(acp32)) - torch.log(torch.sqrt(1 - acp32))
        last_t = T - int(torch.searchsorted(torch.flip(lam, [0]), float(lambda_min_clipped)))
    spacing = schedule.spacing or "linspace"
    # both schedulers take steps + 1 integer timesteps and drop the last one (not the Euler grid)
    if spacing == "linspace":
        ts = np.linspace(0, last_t - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ratio = last_t // (steps + 1)
        ts = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    elif spacing == "trailing":
        ts = np.arange(last_t, 0, -T / steps).round().astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {S.SPACINGS}, got {spacing!r}")
    train = schedule.train_sigmas  # float32 values, as diffusers computes them
    smin_cfg, smax_cfg = schedule.sigma_min, schedule.sigma_max
    lo = float(smin_cfg) if smin_cfg is not None else float(train[0])
    hi = float(smax_cfg) if smax_cfg is not None else float(train[-1])
    cosine = _is_cosine(schedule)
    if schedule.sigma_grid == "karras":
        sig = S.karras_sigmas(steps, lo, hi, schedule.rho)
        ts = schedule.sigma_to_t(sig)
        ts = ts if (flavor == "dpmsolver" and cosine) else np.round(ts)
    elif schedule.sigma_grid == "exponential":
        sig = S.exponential_sigmas(steps, lo, hi)
        ts = schedule.sigma_to_t(sig)
    elif use_lu_lambdas:
        ls = np.log(train.astype(np.float32))  # float32 log, as diffusers' np.log of float32 sigmas
        sig = np.exp(np.linspace(float(ls[-1]), float(ls[0]), steps))
        ts = schedule.sigma_to_t(sig)
        ts = ts if cosine else np.round(ts)
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    ts = np.asarray(ts, dtype=np.float64).astype(np.int64)  # diffusers stores int64 timesteps (truncation)
    if schedule.final_sigma == "zero":
        last = 0.0
    elif flavor == "unipc" and schedule.sigma_grid != "default":
        last = float(sig[-1])  # UniPC ends Karras/exponential grids at their own last sigma
    else:
        last = float(train[0])
    sigmas = np.append(sig, last).astype(np.float32).astype(np.float64)
    return _grid_from_sigmas("vp", ts.astype(np.float64), sigmas, 1.0)


def _is_cosine(schedule) -> bool:
    """Whether the betas are diffusers' ``squaredcos_cap_v2`` (DPM-Solver does not round its timesteps).

    Decided on the betas (a schedule does not keep the config's name): rescaled zero-SNR cosine
    betas are not recognised, where diffusers (which reads ``beta_schedule``) skips the rounding.
    """
    T = schedule.num_train_timesteps
    ref = S.vp_betas("squaredcos_cap_v2", T).double().numpy()
    return bool(np.array_equal(np.asarray(schedule.betas), ref))


def dpmsolver_orders(grid: Grid, order: int, flavor: str, lower_order_final: bool, euler_at_final: bool) -> list[int]:
    """Order of every step of a DPM-Solver(++) multistep run: warm-up from 1, and the libraries'
    lower-order rules at the end (``flavor`` ``diffusers`` or ``k-diffusion``)."""
    n, out = grid.steps, []
    for i in range(n):
        if flavor == "k-diffusion":
            out.append(1 if grid.sigmas[i + 1] == 0.0 else min(i + 1, order))
            continue
        # diffusers' DPMSolverMultistepScheduler.step (final_sigmas_type "zero" forces first order)
        last = i == n - 1 and (euler_at_final or (lower_order_final and n < 15) or grid.sigmas[-1] == 0.0)
        second = i == n - 2 and lower_order_final and n < 15
        out.append(1 if (order == 1 or i < 1 or last) else 2 if (order == 2 or i < 2 or second) else 3)
    return out


def dpmsolver_restart(options, start: int, steps: int):
    """The :class:`~fastdiff.samplers.Restart` of a DPM-Solver(++) multistep run started at step
    ``start`` of ``steps``: the sliced grid is diffusers' DPM-Solver grid (with the run's
    ``use_lu_lambdas``/``lambda_min_clipped``), and ``lower_order_final`` applies only when the WHOLE
    run has < 15 steps, as diffusers decides it (a sliced plan sees fewer steps)."""
    from . import Restart

    grid = {"flavor": "dpmsolver"}
    for key in ("use_lu_lambdas", "lambda_min_clipped"):
        if key in options:
            grid[key] = options[key]
    over = {"lower_order_final": bool(options["lower_order_final"]) and steps < 15} if "lower_order_final" in options else {}
    return Restart(grid=grid, options=over)


def alpha_sigma32(grid: Grid, i: int) -> tuple[float, float, float]:
    """``(alpha, sigma_t, sigma)`` at point ``i`` as diffusers computes them in float32 from its float32
    sigma (``_sigma_to_alpha_sigma_t``): float32 ``alpha^2 + sigma_t^2`` is not exactly 1, which matters
    where a step cancels (a cosine schedule's ``alpha ~ 3e-5``). A grid whose alphas are ``1 - s`` is
    diffusers' ``use_flow_sigmas`` grid also where its kind is ``vp`` (the drop-in's grid for v on a flow
    grid, which diffusers reads as ``alpha x - sigma v``)."""
    s = torch.tensor(grid.sigmas[i], dtype=torch.float32)
    if grid.kind == "flow" or grid.alphas[i] == 1.0 - grid.sigmas[i]:
        a, sg = 1 - s, s
    elif grid.kind == "ve":
        a, sg = torch.ones_like(s), s
    else:
        a = 1 / ((s**2 + 1) ** 0.5)
        sg = s * a
    return float(a), float(sg), float(s)


def estimate32(grid: Grid, i: int, prediction: str, noise_form: bool, clip) -> tuple[dict, dict]:
    """diffusers' ``convert_model_output`` with its float32 ``alpha``, ``sigma`` at point ``i``: the row
    fields ``(a_x, a_e, alpha_t, sigma_t)`` of ``d`` and the estimate ``m = m_x x + m_d d`` the update
    combines (data prediction: ``x0``; noise prediction: ``eps``, through the clipped ``x0`` with
    ``thresholding``). float32 ``alpha^2 + sigma^2`` is not exactly 1, which matters where a step cancels."""
    a, sg, s = alpha_sigma32(grid, i)
    if not noise_form:
        ax, ae = {"eps": (1.0 / a, -sg / a), "x0": (0.0, 1.0), "v": (a, -sg), "flow": (1.0, -s)}[prediction]
        return dict(a_x=ax, a_e=ae, alpha_t=a, sigma_t=sg), {"x": 0.0, "d": 1.0}
    bx, be = {"eps": (0.0, 1.0), "x0": (1.0 / sg, -a / sg), "v": (sg, a)}[prediction]
    if clip is None:
        return dict(a_x=bx, a_e=be, alpha_t=a, sigma_t=sg), {"x": 0.0, "d": 1.0}
    # x0 = (x - sigma eps) / alpha, clipped, then eps = (x - alpha x0) / sigma
    return dict(a_x=(1.0 - sg * bx) / a, a_e=-sg * be / a, alpha_t=a, sigma_t=sg), {"x": 1.0 / sg, "d": -a / sg}


def estimate64(point: dict, prediction: str, noise_form: bool, clip, alpha: float, sigma: float) -> tuple[dict, dict]:
    """:func:`estimate32` in float64 on a grid point's row fields ``point`` (``alpha``, ``sigma``: the
    grid's at the point): ``(point, m)`` with ``d`` the data estimate (data prediction), the noise
    estimate itself (noise prediction, unclipped), or the clipped data estimate converted back,
    ``eps = (x - alpha d) / sigma`` (noise prediction with a clip), and ``m = m_x x + m_d d``."""
    if not noise_form:
        return point, {"x": 0.0, "d": 1.0}
    if clip is None:
        b_x, b_e = eps_coeffs(prediction, point["alpha_t"], point["sigma_t"], point["in_scale"])
        return dict(point, a_x=b_x, a_e=b_e), {"x": 0.0, "d": 1.0}
    return point, {"x": 1.0 / sigma, "d": -alpha / sigma}


def multistep_row(point: dict, i: int, p: int, ring: int, cx: float, w: Sequence[float], m: dict, write: bool,
                  clip, **fields) -> Row:
    """Row ``i`` of a multistep solver of order ``p`` that keeps its estimate ``m = m_x x + m_d d`` in
    the history ring (slot ``i % ring``, written where ``write``): ``x' = cx x + w_0 m + sum_k w_k
    m_{i-k}``, the earlier estimates read from slots ``(i - k) % ring``. ``fields``: further Row fields."""
    z = fields.pop("z", 0.0)
    out = combo(x=cx + w[0] * m["x"], d=w[0] * m["d"], h=tuple(w[1:p]), z=z)
    writes = (Write(i % ring, combo(x=m["x"], d=m["d"])),) if write else ()
    return Row(**point, out=out, reads=tuple((i - k) % ring for k in range(1, p)), writes=writes, clip=clip, step=i,
               **fields)
