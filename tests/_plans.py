"""Hand-built plans for loop tests that must not depend on any sampler module."""

import math

from fastdiff.core.plan import Plan, Row, combo


def edm_euler(steps: int, sigma_max: float = 10.0, sigma_min: float = 0.05, rho: float = 7.0) -> Plan:
    """Euler on Karras sigmas, k-space, x0-prediction: x' = x + (s' - s) (x - d) / s."""
    ramp = [i / (steps - 1) if steps > 1 else 0.0 for i in range(steps)]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sig = [(a + r * (b - a)) ** rho for r in ramp] + [0.0]
    rows = []
    for i in range(steps):
        s, s1 = sig[i], sig[i + 1]
        h = (s1 - s) / s
        rows.append(Row(t=s, sigma=s, in_scale=1.0, a_x=0.0, a_e=1.0, out=combo(x=1 + h, d=-h), step=i,
                        alpha_t=1.0, sigma_t=s))
    return Plan(tuple(rows), init_scale=sig[0], sampler="edm_euler", prediction="x0", steps=steps)


def edm_euler_ancestral(steps: int, sigma_max: float = 10.0, sigma_min: float = 0.05) -> Plan:
    """Euler ancestral (eta=1) on the same grid: draws noise every step."""
    base = edm_euler(steps, sigma_max, sigma_min)
    rows = []
    for i, r in enumerate(base.rows):
        s = r.sigma
        s1 = base.rows[i + 1].sigma if i + 1 < steps else 0.0
        up = min(s1, math.sqrt(max(s1**2 * (s**2 - s1**2) / s**2, 0.0)))
        down = math.sqrt(max(s1**2 - up**2, 0.0))
        h = (down - s) / s
        rows.append(Row(t=s, sigma=s, in_scale=1.0, a_x=0.0, a_e=1.0, out=combo(x=1 + h, d=-h, z=up), noise=True, step=i,
                        alpha_t=1.0, sigma_t=s))
    return Plan(tuple(rows), init_scale=base.init_scale, sampler="edm_euler_a", prediction="x0", steps=steps)
