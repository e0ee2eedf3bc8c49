"""Every row of every registered sampler says what its model input is: ``alpha_t``, ``sigma_t``.

The model sees ``u = in_scale * x = alpha_t x0 + sigma_t eps`` at a row. Checked here, registry-wide:

- set and finite, ``alpha_t > 0`` except where the schedule itself has ``alpha = 0`` (zero
  terminal SNR at the last training step), ``sigma_t >= 0``;
- the same numbers as the row's data estimate: ``(a_x, a_e) = x0_coeffs(prediction, alpha_t,
  sigma_t, in_scale)`` (``eps_coeffs`` where the row's estimate is eps: UniPC ``predict_x0=False``),
  and ``Row.sigma`` is the schedule's own noise level of them (``sigma_t / alpha_t`` for VP and VE,
  ``sigma_t`` for flow, where ``alpha_t = 1 - sigma_t``);
- the schedule's convention at the row's model time: ``schedule.alpha_sigma(row.t)`` to float32
  rounding on VE, flow and VP grids that sit on training steps (trailing spacing). On other VP
  grids diffusers calls the model at a time that is only near the state's noise level (fractional
  Euler timesteps with sigmas interpolated linearly in sigma, multistep Karras timesteps rounded
  to an integer, zero-SNR's sigma 4096 at t = 999): there ``row.t`` must lie within half a training
  step of the noise level, ``|sigma_to_t(sigma_t / alpha_t) - t| <= 0.5``. So must rows that churn
  above the top training sigma (their model time saturates at ``T - 1``, as in k-diffusion).
"""

import math

import numpy as np
import pytest

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.core.plan import x0_coeffs
from fastdiff.samplers._common import eps_coeffs

from ._harness import SD

F32 = 2e-6  # float32 grids (timesteps and sigmas stored as float32, as diffusers does)

SCHEDULES = {
    # name: (schedule, exact): exact = alpha_sigma(row.t) agrees to float32 rounding
    "vp-trailing": (schedules.from_config({"timestep_spacing": "trailing"}), True),
    "vp-sd": (schedules.from_config(SD), False),
    "vp-sd-karras": (schedules.from_config({**SD, "use_karras_sigmas": True}), False),
    "vp-zero-snr": (schedules.from_config({**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}),
                    False),
    "ve-karras": (schedules.VESchedule(sigma_min=0.01, sigma_max=30.0), True),
    "ve-exponential": (schedules.VESchedule(sigma_grid="exponential"), True),
    "flow-shift3": (schedules.FlowSchedule(shift=3.0), True),
    "flow-dynamic": (schedules.FlowSchedule(use_dynamic_shifting=True, mu=0.8), True),
}

VARIANTS = {
    # extra option sets per sampler (the defaults are always built)
    "ddim": [{"clip_sample": True}, {"clip_sample": True, "use_clipped_model_output": True}, {"eta": 0.5}],
    "unipc": [{"predict_x0": False, "solver_order": 3}],
    "euler": [{"s_churn": 2.0}],
    "heun": [{"s_churn": 2.0}],
}

# refusals that are the point of other tests (a prediction a schedule kind has no meaning for)
REFUSED = ("needs a vp schedule", "needs a flow schedule", "where alpha = 0", "sigma = 0")


def _plans(name: str):
    si = samplers.info(name)
    for sname, (sch, exact) in SCHEDULES.items():
        if sch.kind not in si.kinds:
            continue
        for pred in si.predictions:
            for opts in [{}] + VARIANTS.get(name, []):
                s = sch
                if name == "unipc" and opts.get("predict_x0") is False and sch.kind == "vp":
                    s = sch.replace(final_sigma="sigma_min")  # diffusers has no finite update into 0 then
                for steps in (1, 7, 25):
                    try:
                        plan = samplers.build(name, s, steps, prediction=pred, **opts)
                    except ValueError as err:
                        if any(r in str(err) for r in REFUSED):
                            continue
                        raise
                    yield f"{sname} {pred} {opts} steps={steps}", s, exact, plan, opts


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(1.0, abs(b))


@pytest.mark.parametrize("name", samplers.available())
def test_rows_carry_alpha_t_sigma_t_consistent_with_coefficients_and_schedule(name):
    kinds_built, variants_built = set(), set()
    for what, sch, exact, plan, opts in _plans(name):
        kinds_built.add(sch.kind)
        variants_built.add(repr(opts))
        estimate = plan.estimate
        assert all(r.alpha_t is not None and r.sigma_t is not None for r in plan.rows), (name, what)
        sched_a, sched_s = (np.atleast_1d(v) for v in sch.alpha_sigma(np.array([r.t for r in plan.rows])))
        ks = np.array([r.sigma_t / r.alpha_t if r.alpha_t > 0 else 1e30 for r in plan.rows])
        times = np.atleast_1d(sch.sigma_to_t(ks)) if sch.kind == "vp" else None
        for n, r in enumerate(plan.rows):
            where = f"{name} {what} row step={r.step} stage={r.stage} t={r.t:g}"
            assert math.isfinite(r.alpha_t) and math.isfinite(r.sigma_t) and r.sigma_t >= 0, where
            a_s, s_s = float(sched_a[n]), float(sched_s[n])
            if a_s > 0:
                assert r.alpha_t > 0, where
            # the row's own coefficients are built from these numbers
            coeffs = eps_coeffs if estimate == "eps" else x0_coeffs
            a_x, a_e = coeffs(plan.prediction, r.alpha_t, r.sigma_t, r.in_scale)
            assert _close(r.a_x, a_x, 1e-12) and _close(r.a_e, a_e, 1e-12), (where, (r.a_x, r.a_e), (a_x, a_e))
            if sch.kind == "flow":
                assert _close(r.alpha_t, 1.0 - r.sigma_t, 1e-12) and _close(r.sigma, r.sigma_t, 1e-12), where
            elif r.alpha_t > 0:
                assert _close(r.sigma, r.sigma_t / r.alpha_t, F32), (where, r.sigma, r.sigma_t / r.alpha_t)
            if sch.kind == "vp":
                assert _close(r.alpha_t**2 + r.sigma_t**2, 1.0, 1e-12), where
            # ... and are the schedule's convention at the model time the row passes
            k = r.sigma_t / r.alpha_t if r.alpha_t > 0 else math.inf
            # churn above the top training sigma: the model time saturates at T - 1 (sigma_to_t clamps)
            beyond = sch.kind == "vp" and k > float(sch.train_sigmas[-1]) * (1 + F32)
            if exact and not beyond:
                ok = _close(r.alpha_t, a_s, F32) and _close(r.sigma_t, s_s, F32)
                assert ok, (where, (r.alpha_t, r.sigma_t), (a_s, s_s))
            else:
                gap = abs(float(times[n]) - r.t)
                assert gap <= 0.5 + 1e-6, (where, "model time vs noise level", gap)
    assert kinds_built == set(samplers.info(name).kinds), (name, kinds_built)
    assert variants_built == {repr(o) for o in [{}] + VARIANTS.get(name, [])}, (name, variants_built)


@pytest.mark.parametrize("pred", ["eps", "v", "x0", "flow"])
def test_eps_coeffs_give_the_noise_of_the_unclipped_data_estimate(pred):
    """``eps_coeffs`` (DDIM's unclipped eps, UniPC's noise estimates) against the definitions."""
    import random

    rng = random.Random(7)
    for _ in range(20):
        x0, eps, in_scale = rng.gauss(0, 1), rng.gauss(0, 1), rng.uniform(0.2, 1.5)
        if pred == "flow":
            sigma = rng.uniform(0.01, 0.99)
            alpha = 1 - sigma
        else:
            sigma = rng.uniform(0.01, 0.99)
            alpha = math.sqrt(1 - sigma * sigma)
        u = alpha * x0 + sigma * eps
        x = u / in_scale
        e = {"eps": eps, "v": alpha * eps - sigma * x0, "x0": x0, "flow": eps - x0}[pred]
        b_x, b_e = eps_coeffs(pred, alpha, sigma, in_scale)
        assert b_x * x + b_e * e == pytest.approx(eps, rel=1e-12, abs=1e-12)
        a_x, a_e = x0_coeffs(pred, alpha, sigma, in_scale)
        assert a_x * x + a_e * e == pytest.approx(x0, rel=1e-12, abs=1e-12)
    assert eps_coeffs("eps", 0.3, 0.9) == (0.0, 1.0)  # exact: DDIM's eps model output is used as given
