"""Linear multistep sampler (diffusers' LMSDiscreteScheduler, k-diffusion's ``sample_lms``)."""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from ..plan import MAX_READS, Plan, Row, Write, combo
from ..schedules import Schedule
from . import register
from ._common import grid_point


def lms_coefficients(sigmas, i: int, order: int) -> list[float]:
    """Adams–Bashforth weights in sigma: ``c_j = ∫_{s_i}^{s_i+1} prod_{k≠j} (τ - s_{i-k})/(s_{i-j} - s_{i-k}) dτ``.

    Exact polynomial integration (diffusers and k-diffusion use ``scipy.integrate.quad``, which is
    exact for these polynomials of degree < 4 up to rounding).
    """
    s = [float(v) for v in sigmas]
    out = []
    for j in range(order):
        poly = np.array([1.0])
        for k in range(order):
            if k != j:
                poly = P.polymul(poly, np.array([-s[i - k], 1.0]) / (s[i - j] - s[i - k]))
        integ = P.polyint(poly)
        out.append(float(P.polyval(s[i + 1], integ) - P.polyval(s[i], integ)))
    return out


@register("lms", options={"order": 4})
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
