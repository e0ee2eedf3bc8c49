"""euler, euler_ancestral: trajectories vs diffusers and k-diffusion; convergence order."""

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
    {**SD, "use_exponential_sigmas": True, "timestep_spacing": "trailing"},
    {**SD, "final_sigmas_type": "sigma_min"},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_euler_matches_diffusers(cfg, pred, seed):
    sched = diffusers.EulerDiscreteScheduler(**cfg, prediction_type=pred)
    compare_with_diffusers(sched, "euler", 30, seed)


def test_euler_zero_snr_v_matches_diffusers(seed):
    sched = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                             prediction_type="v_prediction")
    compare_with_diffusers(sched, "euler", 30, seed)


@pytest.mark.parametrize("cfg", GRIDS[:3])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_ancestral_matches_diffusers(cfg, pred, seed):
    sched = diffusers.EulerAncestralDiscreteScheduler(**cfg, prediction_type=pred)
    compare_with_diffusers(sched, "euler_ancestral", 30, seed)


KCASES = [("ve", "x0"), ("vp", "eps"), ("vp", "v")]


@pytest.mark.parametrize("kind, pred", KCASES)
@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_euler_matches_k_diffusion(kind, pred, churn, seed):
    sch, f, den = k_problem(kind, pred, seed)
    n = 30
    opts = dict(s_churn=churn, s_tmin=0.05, s_tmax=10.0) if churn else {}
    plan = samplers.build("euler", sch, n, prediction=pred, **opts)
    sig = torch.tensor(sch.discretize(n).sigmas, dtype=torch.float32)
    tape = NoiseTape(n, seed=seed + 7)
    x = initial_noise(seed, float(sig[0]))
    with patched_randn_like(tape):
        ref = k_states(k_sampling().sample_euler, den, x, sig, **opts)
    # k-diffusion adds step i's churn before its model call; our plan adds it at the end of step i-1
    x0 = x + max(plan.init_scale**2 - float(sig[0]) ** 2, 0.0) ** 0.5 * tape.z[0]
    got = ours(plan, f, x0, noise_fn=lambda i, xx: tape.z[plan.rows[i].step + 1])
    assert_close_traj(per_step(plan, got), ref, 1e-5, what=f"euler {kind} {pred} churn={churn} seed={seed}")


@pytest.mark.parametrize("kind, pred", KCASES)
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_euler_ancestral_matches_k_diffusion(kind, pred, eta, seed):
    sch, f, den = k_problem(kind, pred, seed)
    n = 30
    plan = samplers.build("euler_ancestral", sch, n, prediction=pred, eta=eta)
    sig = torch.tensor(sch.discretize(n).sigmas, dtype=torch.float32)
    tape = NoiseTape(n, seed=seed + 7)
    x = initial_noise(seed, float(sig[0]))
    ref = k_states(k_sampling().sample_euler_ancestral, den, x, sig, eta=eta, noise_sampler=tape.draw)
    assert tape.next == n - 1  # k-diffusion skips the draw into sigma = 0
    got = ours(plan, f, x, noise_fn=lambda i, xx: tape.z[i])
    assert_close_traj(got, ref, 1e-5, what=f"euler_ancestral {kind} {pred} eta={eta} seed={seed}")


def test_euler_options_and_noise_flags():
    sch = schedules.from_config(SD)
    plain = samplers.build("euler", sch, 10)
    assert not any(r.noise for r in plain.rows) and len(plain) == 10
    churned = samplers.build("euler", sch, 10, s_churn=5.0, s_tmin=1.0, s_tmax=5.0)
    sig = sch.discretize(10).sigmas
    # noise is drawn at the end of the step BEFORE each churned step
    assert [r.noise for r in churned.rows] == [bool(1.0 <= sig[i + 1] <= 5.0) and i < 9 for i in range(10)]
    anc = samplers.build("euler_ancestral", sch, 10)
    assert all(r.noise for r in anc.rows) and anc.rows[-1].out[-1] == 0.0
    with pytest.raises(ValueError, match="s_churn"):
        samplers.build("euler", sch, 10, s_churn=-1.0)
    with pytest.raises(ValueError, match="eta"):
        samplers.build("euler_ancestral", sch, 10, eta=float("nan"))
    with pytest.raises(ValueError, match="flow"):
        samplers.build("euler", sch, 10, prediction="flow")
    with pytest.raises(ValueError, match="'v' needs a vp schedule"):
        samplers.build("euler", schedules.VESchedule(), 10, prediction="v")


@pytest.mark.parametrize("schedule, pred", [(schedules.VESchedule(), "x0"),
                                            (schedules.from_config({**SD, "use_karras_sigmas": True}), "eps")])
def test_euler_converges_at_first_order(schedule, pred):
    slope, errs = gaussian_order("euler", schedule, pred, [8, 16, 32, 64])
    assert 0.8 <= slope <= 1.3, (slope, errs)
