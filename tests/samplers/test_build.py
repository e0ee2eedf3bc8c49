"""The sampler registry: names, option resolution from configs, and errors that name the culprit."""

import numpy as np
import pytest

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.core.plan import Plan

MINE = ["ddim", "ddpm", "euler", "euler_ancestral", "flow_euler", "flow_heun", "heun", "lms"]


def test_available_lists_every_family():
    assert set(MINE) <= set(samplers.available())
    for name in MINE:
        si = samplers.info(name)
        assert si.doc and si.kinds and si.default_prediction in si.predictions


@pytest.mark.parametrize("name", MINE)
@pytest.mark.parametrize("steps", [1, 2, 13])
def test_every_sampler_builds_valid_plans_from_defaults(name, steps):
    plan = samplers.build(name, None, np.int64(steps))  # diffusers' defaults (DDIM: clip_sample=True)
    assert isinstance(plan, Plan) and plan.sampler == name and plan.steps == steps
    assert [r.step for r in plan.rows] == sorted(r.step for r in plan.rows)
    assert {r.step for r in plan.rows} == set(range(steps))
    sig = [r.sigma for r in plan.rows if r.stage == 0]
    assert all(a > b for a, b in zip(sig, sig[1:]))  # noise levels descend


def test_options_come_from_caller_then_config_then_default():
    cfg = {"clip_sample": False, "prediction_type": "v_prediction", "variance_type": "fixed_large"}
    plan = samplers.build("ddpm", cfg, 5)
    assert plan.prediction == "v" and all(r.clip is None for r in plan.rows)
    assert samplers.build("ddpm", cfg, 5, prediction="x0", clip_sample=True).rows[0].clip == "static"
    large = samplers.build("ddpm", cfg, 5).rows[0].out[-1]
    small = samplers.build("ddpm", cfg, 5, variance_type="fixed_small").rows[0].out[-1]
    assert large > small > 0
    # a config's keys for other samplers are ignored, as diffusers' from_config does
    assert samplers.build("euler", {"solver_order": 3, "clip_sample": True}, 5).sampler == "euler"


def test_schedule_argument_forms_agree():
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    a = samplers.build("euler", cfg, 7)
    b = samplers.build("euler", schedules.from_config(cfg), 7)
    assert a.rows == b.rows and a.init_scale == b.init_scale


@pytest.mark.parametrize("call, match", [
    (lambda: samplers.build("nope", None, 5), "nope"),
    (lambda: samplers.build("euler", None, 5, etaa=1.0), "etaa"),
    (lambda: samplers.build("euler", None, 0), "steps"),
    (lambda: samplers.build("euler", None, 2.5), "steps"),
    (lambda: samplers.build("euler", None, True), "steps"),
    (lambda: samplers.build("euler", None, 5, prediction="score"), "score"),
    (lambda: samplers.build("euler_ancestral", None, 5, prediction="flow"), "flow"),
    (lambda: samplers.build("flow_euler", None, 5, prediction="v"), "'v'"),
    (lambda: samplers.build("heun", schedules.FlowSchedule(), 5), "flow schedule"),
    (lambda: samplers.build("ddpm", {"variance_type": "learned"}, 5), "variance_type"),
    (lambda: samplers.build("euler", {"timestep_type": "continuous"}, 5), "timestep_type"),
])
def test_errors_name_the_bad_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_alpha_sigma_accepts_model_time_tensors():
    import torch

    for sch in (schedules.from_config({}), schedules.FlowSchedule(), schedules.VESchedule()):
        t = torch.tensor([sch.discretize(4).timesteps[1]] * 3, dtype=torch.float32)
        a, s = sch.alpha_sigma(t)
        assert np.shape(a) == (3,) and np.all(np.asarray(s) > 0)
