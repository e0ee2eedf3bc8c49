"""ddpm: trajectories vs diffusers' DDPMScheduler (variances, clipping, thresholding, spacings)."""

import pytest

from fastdiff import samplers

from ._harness import SD, compare_with_diffusers, toy_model

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1},
    {**SD, "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {"beta_schedule": "squaredcos_cap_v2"},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_matches_diffusers(cfg, pred, variance, seed):
    sched = diffusers.DDPMScheduler(**cfg, prediction_type=pred, variance_type=variance, clip_sample=False)
    compare_with_diffusers(sched, "ddpm", 30, seed)


@pytest.mark.parametrize("clip", [dict(clip_sample=True), dict(clip_sample=True, clip_sample_range=0.7),
                                  dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
def test_ddpm_clipping_matches_diffusers(clip, seed):
    sched = diffusers.DDPMScheduler(**clip)
    compare_with_diffusers(sched, "ddpm", 30, seed, model=toy_model(seed, gain=2.5))


def test_ddpm_fixed_small_log_and_zero_snr_match_diffusers(seed):
    sched = diffusers.DDPMScheduler(**SD, variance_type="fixed_small_log", clip_sample=False,
                                    rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                    prediction_type="v_prediction")
    compare_with_diffusers(sched, "ddpm", 30, seed)


def test_ddpm_noise_flags_and_errors():
    plan = samplers.build("ddpm", {"timestep_spacing": "linspace"}, 10)
    # diffusers draws noise at every step except t == 0
    assert [r.noise for r in plan.rows] == [r.t > 0 for r in plan.rows] and not plan.rows[-1].noise
    assert all(r.clip == "static" for r in plan.rows)  # DDPMScheduler's default clip_sample=True
    assert all(r.clip == "dynamic" for r in samplers.build("ddpm", {"thresholding": True}, 5).rows)
    with pytest.raises(ValueError, match="variance_type"):
        samplers.build("ddpm", {"variance_type": "learned_range"}, 10)
    with pytest.raises(ValueError, match="sample_max_value"):
        samplers.build("ddpm", None, 10, thresholding=True, sample_max_value=0.5)
