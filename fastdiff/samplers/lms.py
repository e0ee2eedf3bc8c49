"""Linear multistep sampler (diffusers' LMSDiscreteScheduler, k-diffusion's ``sample_lms``)."""

from __future__ import annotations

import functools
import numbers

import numpy as np
import torch

from ..core.plan import MAX_READS, Plan, Row, Write, combo
from ..core.schedules import Schedule
from . import Restart, register
from ._common import RowLimitError, check_choice, grid_point


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Adams–Bashforth weights in sigma: ``c_j = ∫_{s_i}^{s_i+1} prod_{k≠j} (τ - s_{i-k})/(s_{i-j} - s_{i-k}) dτ``.

    Gauss–Legendre quadrature with ``order`` nodes (exact for these polynomials of degree
    ``order - 1``) of the product form: no expansion into monomials, whose evaluation cancels
    badly between close sigmas (1e-8 relative off where the last sigmas differ by 0.3%).
    diffusers and k-diffusion integrate the same product form with ``scipy.integrate.quad``.
    """
    s = [float(v) for v in sigmas]
    a, b = s[i], s[i + 1]
    nodes, weights = np.polynomial.legendre.leggauss(max(order, 1))
    tau = 0.5 * (b - a) * nodes + 0.5 * (a + b)
    out = []
    for j in range(order):
        basis = np.ones_like(tau)
        for k in range(order):
            if k != j:
                basis = basis * (tau - s[i - k]) / (s[i - j] - s[i - k])
        out.append(float(0.5 * (b - a) * np.dot(weights, basis)))
    return out


def lms_coefficients32(sigmas, i: int, order: int) -> list[float]:
    """:func:`lms_coefficients` as diffusers' ``LMSDiscreteScheduler.get_lms_coefficient`` computes them:
    ``scipy.integrate.quad`` (``epsrel=1e-4``) of the product form evaluated in float32 on its float32
    sigmas. Where the sigmas span decades (a cosine schedule's first sigma ~ 1e4) that float32 integrand
    puts the weights ~1e-4 off exact ones, and diffusers' step follows them."""
    return list(_lms_weights32(tuple(float(v) for v in sigmas[i - order + 1:i + 2]), order))


@functools.lru_cache(maxsize=4096)
def _lms_weights32(window: tuple[float, ...], order: int) -> tuple[float, ...]:
    """The weights of :func:`lms_coefficients32` from ``window = (s_{i-order+1}, ..., s_i, s_{i+1})`` (cached:
    each is ``order`` adaptive quadratures of a float32 integrand, and a plan is built more than once)."""
    from scipy import integrate

    s = torch.tensor(window, dtype=torch.float32)
    i = order - 1  # s_i in the window

    def basis(j: int):
        def f(tau):
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - s[i - k]) / (s[i - j] - s[i - k])
            return prod

        return f

    return tuple(float(integrate.quad(basis(j), s[i], s[i + 1], epsrel=1e-4)[0]) for j in range(order))


_WEIGHTS = {"exact": lms_coefficients, "diffusers": lms_coefficients32}
"""The ``weights`` option: exact ones (float64 Gauss–Legendre), or diffusers' (its float32 quadrature)."""


@register("lms", options={"order": 4, "weights": "exact"}, restart=lambda options, start, steps: Restart())
def lms(schedule: Schedule, steps: int, prediction: str, *, order: int, weights: str) -> Plan:
    """Linear multistep method on the probability-flow ODE in sigma (Karras et al. 2022 / k-diffusion).

    Step ``i`` combines its derivative ``D_i = (x_i - d_i)/sigma_i`` with the ``min(i, order - 1)``
    before it. Up to order ``MAX_READS + 1`` a row reads them all (slot ``j % ring``). Above, it reads
    ``MAX_READS - 1`` of them and one pre-summed slot ``S_i`` holding the terms of the older ones,
    which row ``i - MAX_READS`` writes (it has ``D_{i-4}`` and reads the three before): that reaches
    order ``2 MAX_READS = 8``; a step of higher order is refused (:class:`~._common.RowLimitError`).
    ``weights="diffusers"`` (the diffusers drop-in) takes diffusers' weights (:func:`lms_coefficients32`),
    ``"exact"`` exact ones (:func:`lms_coefficients`).
    """
    if isinstance(order, bool) or not isinstance(order, numbers.Integral) or order < 1:
        raise ValueError(f"order must be an int >= 1, got {order!r}")
    disc = schedule.discretize(steps)
    sig = disc.sigmas
    ring = order - 1 if order - 1 <= MAX_READS else MAX_READS - 1  # D_k of step k lives in slot k % ring
    lag = ring + 1  # S_i (the terms of D_{i-j}, j >= lag) is written by row i - lag, into slot ring + i % lag
    curs = [min(i + 1, int(order)) for i in range(steps)]
    weigh = _WEIGHTS[check_choice("weights", weights, tuple(_WEIGHTS))]
    coefs = [weigh(sig, i, cur) for i, cur in enumerate(curs)]
    rows = []
    for i in range(steps):
        s, c = float(sig[i]), coefs[i]
        if curs[i] > 2 * lag:
            raise RowLimitError(f"lms step {i} (order {curs[i]}) combines {curs[i] - 1} earlier derivatives: a plan "
                                f"row reads at most {MAX_READS} history buffers ({ring} of them and one sum of "
                                f"{lag} older ones, written {lag} rows before), so orders up to {2 * lag} fit")
        own = min(curs[i] - 1, ring)
        reads = [(i - j) % ring for j in range(1, own + 1)] + ([ring + i % lag] if curs[i] - 1 > ring else [])
        out = combo(x=1 + c[0] / s, d=-c[0] / s, h=tuple(c[1:own + 1]) + ((1.0,) if curs[i] - 1 > ring else ()))
        writes = [Write(i % ring, combo(x=1 / s, d=-1 / s))] if ring and i + 1 < steps else []
        if i + lag < steps and curs[i + lag] - 1 > ring:  # S_{i+lag}: its D_{i+lag-j} is this row's D_{i-(j-lag)}
            w = coefs[i + lag][lag:]
            writes.append(Write(ring + i % lag, combo(x=w[0] / s, d=-w[0] / s, h=tuple(w[1:]))))
        rows.append(Row(**grid_point(schedule, prediction, s, disc.timesteps[i]), out=out, reads=tuple(reads),
                        writes=tuple(writes), step=i))
    n_slots = ring + (lag if order - 1 > ring else 0)
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=n_slots, sampler="lms", prediction=prediction,
                steps=steps)
