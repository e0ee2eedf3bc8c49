"""heun: trajectories vs diffusers' HeunDiscreteScheduler and k-diffusion's sample_heun."""

import pytest
import torch

from fastdiff import samplers
from fastdiff.core import schedules

from ._harness import (SD, NoiseTape, assert_close_traj, compare_with_diffusers, initial_noise, k_problem, k_sampling,
                       k_states, ours, patched_randn_like, per_step, gaussian_order)

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1},
    {**SD, "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {**SD, "use_karras_sigmas": True},
    {**SD, "use_exponential_sigmas": True},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_heun_matches_diffusers(cfg, pred, seed):
    sched = diffusers.HeunDiscreteScheduler(**cfg, prediction_type=pred)
    compare_with_diffusers(sched, "heun", 30, seed)


def test_heun_clip_sample_matches_diffusers(seed):
    # a large model output makes the clip bite
    from ._harness import toy_model

    sched = diffusers.HeunDiscreteScheduler(**SD, prediction_type="sample", clip_sample=True, clip_sample_range=0.5)
    compare_with_diffusers(sched, "heun", 30, seed, model=toy_model(seed, gain=2.0))


@pytest.mark.parametrize("kind, pred", [("ve", "x0"), ("vp", "eps"), ("vp", "v")])
@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_heun_matches_k_diffusion(kind, pred, churn, seed):
    sch, f, den = k_problem(kind, pred, seed)
    n = 30
    opts = dict(s_churn=churn, s_tmin=0.05, s_tmax=10.0) if churn else {}
    plan = samplers.build("heun", sch, n, prediction=pred, **opts)
    sig = torch.tensor(sch.discretize(n).sigmas, dtype=torch.float32)
    tape = NoiseTape(n, seed=seed + 7)
    x = initial_noise(seed, float(sig[0]))
    with patched_randn_like(tape):
        ref = k_states(k_sampling().sample_heun, den, x, sig, **opts)
    x0 = x + max(plan.init_scale**2 - float(sig[0]) ** 2, 0.0) ** 0.5 * tape.z[0]
    got = ours(plan, f, x0, noise_fn=lambda i, xx: tape.z[plan.rows[i].step + 1])
    assert_close_traj(per_step(plan, got), ref, 1e-5, what=f"heun {kind} {pred} churn={churn} seed={seed}")


def test_heun_rows_and_history():
    sch = schedules.from_config(SD)
    plan = samplers.build("heun", sch, 10)
    assert len(plan) == 19 and plan.n_slots == 1  # 2 rows per step, Euler into sigma = 0
    assert [r.stage for r in plan.rows[:4]] == [0, 1, 0, 1] and plan.rows[-1].stage == 0
    assert all(r.writes for r in plan.rows[:-1:2]) and all(r.reads == (0,) for r in plan.rows[1::2])
    # final_sigmas_type="sigma_min": the last step is a full Heun step
    last = samplers.build("heun", sch.replace(final_sigma="sigma_min"), 10)
    assert len(last) == 20 and last.rows[-1].t == 0.0


def test_heun_converges_at_second_order():
    # EDM grid down to sigma_min = 0.002: the closing Euler step into 0 adds only O(sigma_min^2)
    slope, errs = gaussian_order("heun", schedules.VESchedule(), "x0", [8, 16, 32, 64])
    assert 1.7 <= slope <= 2.4, (slope, errs)
