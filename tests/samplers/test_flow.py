"""flow_euler, flow_heun: trajectories vs diffusers' FlowMatchEuler/HeunDiscreteScheduler."""

import pytest

from fastdiff import samplers
from fastdiff.core import schedules

from ._harness import compare_with_diffusers, gaussian_order

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

CONFIGS = [{}, {"shift": 3.0}, {"shift": 3.0, "use_karras_sigmas": True}, {"shift": 2.0, "use_exponential_sigmas": True},
           {"shift": 1.5, "shift_terminal": 0.05}]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_flow_euler_matches_diffusers(cfg, seed):
    compare_with_diffusers(diffusers.FlowMatchEulerDiscreteScheduler(**cfg), "flow_euler", 30, seed)


def test_flow_euler_dynamic_shift_matches_diffusers(seed):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    from ._harness import assert_close_traj, diffusers_loop, initial_noise, ours, toy_model

    f = toy_model(seed)
    plan = samplers.build("flow_euler", schedules.from_config(sched.config).replace(mu=0.9), 30)
    x = initial_noise(seed, 1.0)
    ref = diffusers_loop(sched, f, x, 30, set_timesteps_kwargs={"mu": 0.9})
    assert_close_traj(ours(plan, f, x), ref, 1e-5, what=f"flow_euler mu seed={seed}")


def test_flow_euler_stochastic_matches_diffusers(seed):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, stochastic_sampling=True)
    compare_with_diffusers(sched, "flow_euler", 30, seed)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_matches_diffusers(shift, seed):
    compare_with_diffusers(diffusers.FlowMatchHeunDiscreteScheduler(shift=shift), "flow_heun", 30, seed)


def test_flow_rows_and_errors():
    fl = schedules.FlowSchedule(shift=3.0)
    plan = samplers.build("flow_euler", fl, 10)
    assert plan.prediction == "flow" and plan.init_scale == 1.0 and not any(r.noise for r in plan.rows)
    assert plan.rows[0].sigma == 1.0 and plan.rows[0].t == 1000.0
    assert len(samplers.build("flow_heun", fl, 10)) == 19
    assert samplers.build("flow_euler", fl, 10, prediction="x0").rows[0].a_e == 1.0
    with pytest.raises(ValueError, match="eps"):  # alpha = 1 - s = 0 at the first step
        samplers.build("flow_euler", fl, 10, prediction="eps")
    with pytest.raises(ValueError, match="'v'"):
        samplers.build("flow_euler", fl, 10, prediction="v")
    with pytest.raises(ValueError, match="flow schedule"):
        samplers.build("flow_euler", schedules.from_config({}), 10)


@pytest.mark.parametrize("name, band", [("flow_euler", (0.8, 1.3)), ("flow_heun", (1.7, 2.4))])
def test_flow_samplers_converge_at_their_order(name, band):
    # shift=1 ends the grid at s = 1/1000, so the closing Euler step of flow_heun adds only O(1e-6)
    slope, errs = gaussian_order(name, schedules.FlowSchedule(shift=1.0), "flow", [8, 16, 32, 64])
    assert band[0] <= slope <= band[1], (slope, errs)
