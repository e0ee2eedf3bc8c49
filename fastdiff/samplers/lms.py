"""Linear multistep sampler (diffusers' LMSDiscreteScheduler, k-diffusion's ``sample_lms``)."""

from __future__ import annotations

import numpy as np

from ..core.plan import MAX_READS, Plan, Row, Write, combo
from ..core.schedules import Schedule
from . import Restart, register
from ._common import grid_point


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


@register("lms", options={"order": 4}, restart=lambda options, start, steps: Restart())
def lms(schedule: Schedule, steps: int, prediction: str, *, order: int) -> Plan:
    """Linear multistep method on the probability-flow ODE in sigma (Karras et al. 2022 / k-diffusion)."""
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= MAX_READS + 1:
        # order k reads the k - 1 previous derivatives: a row reads at most MAX_READS history slots
        raise ValueError(f"order must be an int in [1, {MAX_READS + 1}], got {order!r}")
    disc = schedule.discretize(steps)
    sig = disc.sigmas
    ring = order - 1  # the derivative D_k = (x_k - d_k)/sigma_k of step k lives in slot k % ring
    rows = []
    for i in range(steps):
        s = float(sig[i])
        cur = min(i + 1, order)
        c = lms_coefficients(sig, i, cur)
        reads = tuple((i - j) % ring for j in range(1, cur))
        writes = (Write(i % ring, combo(x=1 / s, d=-1 / s)),) if ring and i + 1 < steps else ()
        out = combo(x=1 + c[0] / s, d=-c[0] / s, h=tuple(c[1:]))
        rows.append(Row(**grid_point(schedule, prediction, s, disc.timesteps[i]), out=out, reads=reads,
                        writes=writes, step=i))
    return Plan(tuple(rows), init_scale=disc.init_sigma, n_slots=ring, sampler="lms", prediction=prediction,
                steps=steps)
