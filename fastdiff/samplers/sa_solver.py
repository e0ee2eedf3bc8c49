"""SA-Solver (Xue et al. 2023): stochastic Adams predictor-corrector, diffusers' ``SASolverScheduler``.

Step ``i`` evaluates the model at the predictor's ``x_i`` (estimate ``D_i``: data, or noise with
``algorithm_type="noise_prediction"``), corrects the state (stochastic Adams-Moulton over
``D_i, D_{i-1}, ...`` from the previous corrected state ``x^c_{i-1}`` with the previous step's noise
``z_{i-1}``), then predicts ``x_{i+1}`` (stochastic Adams-Bashforth over ``D_i, D_{i-1}, ...`` from
``x^c_i`` with fresh noise ``z_i``). Each update is ``x_t = A x_s + sum_k c_k D_{i-k} + s z``, with the
``c_k`` integrals of Lagrange polynomials through the log-SNRs against ``exp((1 + tau^2) lambda)``
(``exp(-lambda)`` for noise prediction), and diffusers' order-2 modifications.

Everything is linear, so one step is one row: the corrected state ``x^c_i = Q_i + c^C_0 D_i`` is known
once ``D_i`` is, where ``Q_i`` (all corrector terms but ``D_i``'s) is written by row ``i - 1`` into
history slot 0, since it needs ``x^c_{i-1}``, ``z_{i-1}`` and older estimates only. The estimates
live in a ring of history slots after it. Noise is drawn at every step, as diffusers draws it.

``tau_func(t) -> tau``: the stochasticity at model time ``t``, called with a 0-d int64 tensor as
diffusers' step calls it (default: diffusers' ``1`` for ``200 <= t <= 800``, else ``0``); ``taus``: the
values per step instead (as a ``tau_func`` returned them; entries past ``steps`` are not read), which
``fastdiff.diffusers`` passes where the timesteps a run is given are not the grid's. Row ``i`` reads
the taus of steps ``i - 1`` (its corrector) and ``i`` (its predictor).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.plan import Plan, Row, Write, combo
from . import register
from ._common import check_choice, clip_settings, eps_coeffs
from ._multistep import Grid, multistep_grid

_PREDICTIONS = ("eps", "v", "x0", "flow")


def default_tau(t) -> float:
    """diffusers' default ``tau_func``: 1 for timesteps in [200, 800], else 0."""
    return 1 if t >= 200 and t <= 800 else 0


def sa_grid(schedule, steps: int, lambda_min_clipped: float = -math.inf) -> Grid:
    """The grid of ``SASolverScheduler.set_timesteps``: DPM-Solver's timesteps, ending at the lowest
    training noise level (Karras / exponential grids: at their own last sigma, repeated), or the
    schedule's own grid (``fastdiff.diffusers``)."""
    if getattr(schedule, "own_multistep_grid", None) is not None:
        return schedule.own_multistep_grid(steps)
    if schedule.kind != "vp":
        raise ValueError(f"sa_solver needs a vp schedule, got a {schedule.kind} schedule")
    # UniPC's grid rules on Karras / exponential grids (rounded Karras timesteps, own last sigma),
    # DPM-Solver's elsewhere (lambda_min_clipped), both ending at sigma_min, never at 0
    flavor = "dpmsolver" if schedule.sigma_grid == "default" else "unipc"
    return multistep_grid(schedule.replace(final_sigma="sigma_min"), steps, flavor=flavor,
                          lambda_min_clipped=lambda_min_clipped)


def _moment(j: int, s: float, e: float, a: float) -> float:
    """``int_s^e lam^j exp(a lam) dlam`` (diffusers' ``get_coefficients_exponential_*`` closed forms)."""
    def prim(lam: float) -> float:
        return math.exp(a * lam) * sum((-1) ** m * math.factorial(j) / math.factorial(j - m) * lam ** (j - m)
                                       / a ** (m + 1) for m in range(j + 1))

    return prim(e) - prim(s)


def _lagrange(lams: list[float]) -> list[np.ndarray]:
    """Monomial coefficients (highest power first) of the Lagrange basis polynomials through ``lams``."""
    out = []
    for k, lk in enumerate(lams):
        others = [lm for m, lm in enumerate(lams) if m != k]
        out.append(np.poly(others) / np.prod([lk - lm for lm in others]) if others else np.array([1.0]))
    return out


def _weights(lams: list[float], s: float, e: float, a: float) -> list[float]:
    """``int_s^e l_k(lam) exp(a lam) dlam`` for each Lagrange basis polynomial ``l_k`` through ``lams``."""
    p = len(lams)
    return [float(sum(c * _moment(p - 1 - j, s, e, a) for j, c in enumerate(poly))) for poly in _lagrange(lams)]


def _update(grid: Grid, i: int, order: int, tau, x0: bool, corrector: bool) -> tuple[float, list[float], float]:
    """``(A, [c_0..c_{order-1}], s)`` of the update from point ``i`` to ``i + 1``:
    ``x_{i+1} = A x_i + sum_k c_k D_{j-k} + s z`` with ``j = i + 1`` (corrector: the estimates end
    at the target point) or ``j = i`` (predictor)."""
    tau = float(tau)
    lam_s, lam_t = grid.lambdas[i], grid.lambdas[i + 1]
    h = lam_t - lam_s
    a_t, s_t, a_s, s_s = grid.alphas[i + 1], grid.stds[i + 1], grid.alphas[i], grid.stds[i]
    c = 1.0 + tau * tau
    top = i + 1 if corrector else i
    lams = [grid.lambdas[top - k] for k in range(order)]
    w = _weights(lams, lam_s, lam_t, c if x0 else -1.0)
    if not x0:
        return a_t / a_s, [-c * a_t * wk for wk in w], tau * s_t * math.sqrt(math.expm1(2 * h))
    if order == 2:  # diffusers' modification for few-step sampling (as UniPC's)
        core = math.exp(c * lam_t) * ((h / 2 if corrector else h * h / 2) - (h * c - 1 + math.exp(-c * h)) / (
            c * c * (h if corrector else 1.0)))
        adj = core if corrector else core / (lam_s - grid.lambdas[i - 1])
        w = [w[0] + adj, w[1] - adj]
    g = c * s_t * math.exp(-tau * tau * lam_t)
    noise = s_t * math.sqrt(-math.expm1(-2 * tau * tau * h))
    return math.exp(-tau * tau * h) * s_t / s_s, [g * wk for wk in w], noise


def _alpha_sigma32(sigma, flow: bool):
    # diffusers' _sigma_to_alpha_sigma_t on a float32 sigma
    if flow:
        return 1 - sigma, sigma
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


def _lagrange32(lams: list) -> list[list]:
    """diffusers' ``lagrange_polynomial_coefficient``, expression for expression (float32 tensors)."""
    n = len(lams)
    if n == 1:
        return [[1]]
    if n == 2:
        l0, l1 = lams
        return [[1 / (l0 - l1), -l1 / (l0 - l1)], [1 / (l1 - l0), -l0 / (l1 - l0)]]
    if n == 3:
        l0, l1, l2 = lams
        d1, d2, d3 = (l0 - l1) * (l0 - l2), (l1 - l0) * (l1 - l2), (l2 - l0) * (l2 - l1)
        return [[1 / d1, (-l1 - l2) / d1, l1 * l2 / d1], [1 / d2, (-l0 - l2) / d2, l0 * l2 / d2],
                [1 / d3, (-l0 - l1) / d3, l0 * l1 / d3]]
    l0, l1, l2, l3 = lams
    d1 = (l0 - l1) * (l0 - l2) * (l0 - l3)
    d2 = (l1 - l0) * (l1 - l2) * (l1 - l3)
    d3 = (l2 - l0) * (l2 - l1) * (l2 - l3)
    d4 = (l3 - l0) * (l3 - l1) * (l3 - l2)
    return [[1 / d1, (-l1 - l2 - l3) / d1, (l1 * l2 + l1 * l3 + l2 * l3) / d1, (-l1 * l2 * l3) / d1],
            [1 / d2, (-l0 - l2 - l3) / d2, (l0 * l2 + l0 * l3 + l2 * l3) / d2, (-l0 * l2 * l3) / d2],
            [1 / d3, (-l0 - l1 - l3) / d3, (l0 * l1 + l0 * l3 + l1 * l3) / d3, (-l0 * l1 * l3) / d3],
            [1 / d4, (-l0 - l1 - l2) / d4, (l0 * l1 + l0 * l2 + l1 * l2) / d4, (-l0 * l1 * l2) / d4]]


def _moment32(j: int, s, e, tau, x0: bool):
    """diffusers' ``get_coefficients_exponential_positive`` (``x0``) / ``_negative``, as written there."""
    if x0:
        ec, sc = (1 + tau**2) * e, (1 + tau**2) * s
        polys = (lambda v: 1, lambda v: v - 1, lambda v: v**2 - 2 * v + 2, lambda v: v**3 - 3 * v**2 + 6 * v - 6)
        if j == 0:
            return torch.exp(ec) * (1 - torch.exp(-(ec - sc))) / (1 + tau**2)
        return torch.exp(ec) * (polys[j](ec) - polys[j](sc) * torch.exp(-(ec - sc))) / ((1 + tau**2) ** (j + 1))
    polys = (None, lambda v: v + 1, lambda v: v**2 + 2 * v + 2, lambda v: v**3 + 3 * v**2 + 6 * v + 6)
    if j == 0:
        return torch.exp(-e) * (torch.exp(e - s) - 1)
    return torch.exp(-e) * (polys[j](s) * torch.exp(e - s) - polys[j](e))


def _update32(grid: Grid, i: int, order: int, tau, x0: bool, corrector: bool) -> tuple[float, list[float], float]:
    """:func:`_update` in float32 with diffusers' expressions and their order (its rounding included:
    at high orders its float32 coefficients are off by up to ~1e-4, and mirroring it needs them)."""
    sig = torch.tensor(grid.sigmas, dtype=torch.float32)
    flow = grid.kind == "flow"

    def lam(k: int):
        a, s = _alpha_sigma32(sig[k], flow)
        return torch.log(a) - torch.log(s)

    a_t, s_t = _alpha_sigma32(sig[i + 1], flow)
    a_s, s_s = _alpha_sigma32(sig[i], flow)
    lam_t, lam_s = torch.log(a_t) - torch.log(s_t), torch.log(a_s) - torch.log(s_s)
    h = lam_t - lam_s
    top = i + 1 if corrector else i
    lams = [lam(top - k) for k in range(order)]
    lag = _lagrange32(lams)
    w = []
    for k in range(order):
        coef = 0
        for j in range(order):
            coef += lag[k][j] * _moment32(order - 1 - j, lam_s, lam_t, tau, x0)
        w.append(coef)
    if not x0:
        cz = tau * s_t * torch.sqrt(torch.exp(2 * h) - 1)
        return float(a_t / a_s), [float(-(1 + tau**2) * a_t * wk) for wk in w], float(cz)
    if order == 2:
        if corrector:
            adj = 1.0 * torch.exp((1 + tau**2) * lam_t) * (
                h / 2 - (h * (1 + tau**2) - 1 + torch.exp((1 + tau**2) * (-h))) / ((1 + tau**2) ** 2 * h))
        else:
            adj = 1.0 * torch.exp((1 + tau**2) * lam_t) * (
                h**2 / 2 - (h * (1 + tau**2) - 1 + torch.exp((1 + tau**2) * (-h))) / ((1 + tau**2) ** 2)) / (
                lam_s - lam(i - 1))
        w[0] += adj
        w[1] -= adj
    cz = s_t * torch.sqrt(1 - torch.exp(-2 * tau**2 * h))
    grad = [float((1 + tau**2) * s_t * torch.exp(-(tau**2) * lam_t) * wk) for wk in w]
    return float(torch.exp(-(tau**2) * h) * (s_t / s_s)), grad, float(cz)


def _orders(steps: int, predictor_order: int, corrector_order: int, lower_order_final: bool) -> list[tuple[int, int]]:
    """Per step ``(predictor order, order of the NEXT step's corrector)``, with diffusers' warm-up."""
    out = []
    cap = max(predictor_order, corrector_order - 1)
    for i in range(steps):
        lower = min(i, cap)  # diffusers' lower_order_nums before step i
        p = min(predictor_order, steps - i) if lower_order_final else predictor_order
        c = min(corrector_order, steps - i + 1) if lower_order_final else corrector_order
        out.append((min(p, lower + 1), min(c, lower + 2)))
    return out


def _tau(tau_func, t: float):
    """``tau_func`` at timestep ``t`` as diffusers' step calls it (a 0-d int64 tensor); its value as returned."""
    return check_tau((tau_func or default_tau)(torch.tensor(int(t), dtype=torch.int64)), t)


def check_tau(val, t: float):
    """``val``, the tau of the step at timestep ``t``, if it is a finite number (else a ``ValueError``). A
    negative tau is taken as diffusers takes it: its updates read ``tau^2``, and noise prediction's noise
    term ``tau z`` (the same distribution as ``|tau| z``)."""
    try:
        ok = math.isfinite(float(val))
    except (TypeError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise ValueError(f"tau_func({int(t)}) returned {val!r}; expected a finite number")
    return val


@register("sa_solver", kinds=("vp",), predictions=_PREDICTIONS,
          options={"predictor_order": 2, "corrector_order": 2, "tau_func": None, "algorithm_type": "data_prediction",
                   "lower_order_final": True, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
                   "sample_max_value": 1.0, "lambda_min_clipped": -math.inf, "taus": None})
def sa_solver(schedule, steps: int, prediction: str, *, predictor_order: int, corrector_order: int, tau_func,
              algorithm_type: str, lower_order_final: bool, thresholding: bool, dynamic_thresholding_ratio: float,
              sample_max_value: float, lambda_min_clipped: float, taus) -> Plan:
    """Stochastic Adams predictor-corrector solver of the diffusion SDE (Xue et al. 2023)."""
    for name, v in (("predictor_order", predictor_order), ("corrector_order", corrector_order)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 4:
            raise ValueError(f"{name} must be an int in [1, 4] (diffusers' SA-Solver coefficients), got {v!r}")
    check_choice("algorithm_type", algorithm_type, ("data_prediction", "noise_prediction"))
    if tau_func is not None and not callable(tau_func):
        raise ValueError(f"tau_func must be a callable t -> tau or None, got {tau_func!r}")
    x0 = algorithm_type == "data_prediction"
    if not x0 and thresholding:
        raise ValueError("thresholding=True with algorithm_type='noise_prediction' is not supported (diffusers "
                         "thresholds the noise estimate through alpha_t[None], which fails)")
    if not x0 and prediction == "flow":
        raise ValueError("prediction 'flow' needs algorithm_type='data_prediction' (as diffusers' SA-Solver)")
    clip, plan_kw = clip_settings(False, 1.0, thresholding, dynamic_thresholding_ratio, sample_max_value)
    grid = sa_grid(schedule, steps, float(lambda_min_clipped))
    orders = _orders(steps, int(predictor_order), int(corrector_order), bool(lower_order_final))
    if taus is None:
        taus = [_tau(tau_func, t) for t in grid.timesteps]
    elif len(taus) < steps:
        raise ValueError(f"taus must hold a tau for each of the {steps} steps, got {len(taus)}")
    else:  # (the first steps' of a longer run: a prefix of it)
        taus = [check_tau(v, t) for v, t in zip(taus, grid.timesteps)]
    # a schedule's scalar_dtype float32 (fastdiff.diffusers): diffusers' float32 coefficient arithmetic
    update = _update32 if getattr(schedule, "scalar_dtype", None) == torch.float32 else _update
    # slot 0: Q (the next corrector's known part); estimates D_j in ring slots 1 + j % ring
    ring = max([p - 1 for p, _ in orders] + [c - 2 for _, c in orders] + [0])
    q, n_slots = (0, 1 + ring) if steps > 1 else (None, ring)

    def d_slot(j: int) -> int:
        return (0 if q is None else 1) + j % ring

    rows, gamma0 = [], 0.0  # gamma0: the corrector's coefficient on D_i (set by row i - 1)
    for i, (p, c_next) in enumerate(orders):
        point = grid.point(i, prediction)
        if not x0:  # the row's estimate is the noise (Plan.estimate = "eps")
            point["a_x"], point["a_e"] = eps_coeffs(prediction, point["alpha_t"], point["sigma_t"])
        # x^c_i = x (first step) or Q_i + c^C_0 d, as terms over {"x", "d", "Q", j (D_j), "z"}
        xc = {"x": 1.0} if i == 0 else {"Q": 1.0, "d": gamma0}
        cx, cb, cz = update(grid, i, p, taus[i], x0, corrector=False)
        out = {k: cx * v for k, v in xc.items()}
        for k in range(p):
            key = "d" if k == 0 else i - k
            out[key] = out.get(key, 0.0) + cb[k]
        out["z"] = cz
        terms = [out]
        if i + 1 < steps:  # Q_{i+1}: the corrector of step i + 1 without its D_{i+1} term
            ax, cc, az = update(grid, i, c_next, taus[i], x0, corrector=True)
            nxt = {k: ax * v for k, v in xc.items()}
            for k in range(1, c_next):
                key = "d" if k == 1 else i + 1 - k
                nxt[key] = nxt.get(key, 0.0) + cc[k]
            nxt["z"] = az
            terms.append(nxt)
            gamma0 = cc[0]
        reads = sorted({k for t in terms for k in t if isinstance(k, int)}, reverse=True)
        slots = ([q] if i > 0 else []) + [d_slot(j) for j in reads]

        def vec(t: dict) -> tuple:
            h = ([t.get("Q", 0.0)] if i > 0 else []) + [t.get(j, 0.0) for j in reads]
            return combo(x=t.get("x", 0.0), d=t.get("d", 0.0), h=tuple(h), z=t.get("z", 0.0))

        writes = []
        if i + 1 < steps:
            writes.append(Write(q, vec(terms[1])))
            if ring:
                writes.append(Write(d_slot(i), combo(d=1.0)))
        rows.append(Row(**point, out=vec(out), reads=tuple(slots), writes=tuple(writes), clip=clip, noise=True,
                        step=i))
    return Plan(tuple(rows), init_scale=grid.init_scale, n_slots=n_slots, sampler="sa_solver", prediction=prediction,
                steps=steps, estimate="x0" if x0 else "eps",
                meta={"orders": orders, "taus": tuple(float(t) for t in taus), "algorithm_type": algorithm_type},
                **plan_kw)
