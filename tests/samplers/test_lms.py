"""lms: trajectories vs diffusers' LMSDiscreteScheduler and k-diffusion's sample_lms; coefficients."""

import numpy as np
import pytest
import torch

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.samplers.lms import lms_coefficients

from ._harness import SD, assert_close_traj, compare_with_diffusers, initial_noise, k_problem, k_sampling, k_states, ours

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1},
    {**SD, "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {**SD, "use_karras_sigmas": True},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_lms_matches_diffusers(cfg, pred, seed):
    sched = diffusers.LMSDiscreteScheduler(**cfg, prediction_type=pred)
    compare_with_diffusers(sched, "lms", 30, seed)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_lms_lower_orders_match_diffusers(order, seed):
    sched = diffusers.LMSDiscreteScheduler(**SD)
    compare_with_diffusers(sched, "lms", 30, seed, order=order, step_kwargs={"order": order})


@pytest.mark.parametrize("kind, pred", [("ve", "x0"), ("vp", "eps"), ("vp", "v")])
def test_lms_matches_k_diffusion(kind, pred, seed):
    sch, f, den = k_problem(kind, pred, seed)
    n = 30
    plan = samplers.build("lms", sch, n, prediction=pred)
    sig = torch.tensor(sch.discretize(n).sigmas, dtype=torch.float32)
    x = initial_noise(seed, float(sig[0]))
    ref = k_states(k_sampling().sample_lms, den, x, sig)
    assert_close_traj(ours(plan, f, x), ref, 1e-5, what=f"lms {kind} {pred} seed={seed}")


def test_lms_coefficients_integrate_polynomials_exactly():
    from scipy import integrate

    sig = np.array([9.0, 5.0, 2.5, 1.1, 0.4, 0.0])
    for i in range(1, 5):
        order = min(i + 1, 4)
        c = lms_coefficients(sig, i, order)
        ref = [integrate.quad(lambda tau, j=j: np.prod([(tau - sig[i - k]) / (sig[i - j] - sig[i - k])
                                                        for k in range(order) if k != j]),
                              sig[i], sig[i + 1], epsabs=1e-14, epsrel=1e-13)[0] for j in range(order)]
        assert np.allclose(c, ref, rtol=1e-12, atol=1e-14)
        # the weights integrate the constant 1 exactly: they sum to the step length
        assert sum(c) == pytest.approx(sig[i + 1] - sig[i], rel=1e-13)


def test_lms_history_ring_and_order_errors():
    plan = samplers.build("lms", schedules.VESchedule(), 8)
    assert plan.n_slots == 3 and plan.rows[0].reads == () and len(plan.rows[3].reads) == 3
    assert plan.rows[-1].writes == ()
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="order"):
            samplers.build("lms", schedules.VESchedule(), 8, order=bad)
    # above order 5 a row reads 3 derivatives and one sum of the older ones: up to order 8
    assert max(len(r.reads) for r in samplers.build("lms", schedules.VESchedule(), 12, order=8).rows) == 4
    with pytest.raises(ValueError, match="lms step 8 \\(order 9\\).*orders up to 8 fit"):
        samplers.build("lms", schedules.VESchedule(), 10, order=9)
