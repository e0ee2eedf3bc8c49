"""ddim: trajectories vs diffusers' DDIMScheduler (any eta, spacings, clipping, thresholding)."""

import pytest

from fastdiff import samplers, schedules

from ._harness import SD, compare_with_diffusers, gaussian_order, toy_model

diffusers = pytest.importorskip("diffusers")

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    {**SD, "timestep_spacing": "trailing"},
    {"timestep_spacing": "linspace"},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading"},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_ddim_matches_diffusers(cfg, pred, eta, seed):
    sched = diffusers.DDIMScheduler(**cfg, prediction_type=pred, clip_sample=False)
    compare_with_diffusers(sched, "ddim", 30, seed, eta=eta, step_kwargs={"eta": eta})


def test_ddim_zero_terminal_snr_v_matches_diffusers(seed):
    sched = diffusers.DDIMScheduler(**SD, timestep_spacing="trailing", rescale_betas_zero_snr=True,
                                    prediction_type="v_prediction", clip_sample=False)
    compare_with_diffusers(sched, "ddim", 30, seed, eta=0.5, step_kwargs={"eta": 0.5})


@pytest.mark.parametrize("clip", [dict(clip_sample=True, clip_sample_range=0.8),
                                  dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
@pytest.mark.parametrize("pred", ["epsilon", "sample"])
def test_ddim_clipping_matches_diffusers_with_clipped_model_output(clip, pred, seed):
    sched = diffusers.DDIMScheduler(prediction_type=pred, **clip)
    compare_with_diffusers(sched, "ddim", 30, seed, model=toy_model(seed, gain=2.5), eta=0.3,
                           use_clipped_model_output=True, step_kwargs={"eta": 0.3, "use_clipped_model_output": True})


def test_ddim_refuses_what_the_contract_cannot_express():
    with pytest.raises(ValueError, match="use_clipped_model_output"):
        samplers.build("ddim", {"clip_sample": True}, 10)
    with pytest.raises(ValueError, match="eps"):  # alpha = 0 at the zero-SNR end
        samplers.build("ddim", {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                                "clip_sample": False}, 10, prediction="eps")
    with pytest.raises(ValueError, match="eta"):
        samplers.build("ddim", {"clip_sample": False}, 10, eta=-0.1)
    with pytest.raises(ValueError, match="steps"):
        samplers.build("ddim", {"clip_sample": False}, 1001)
    with pytest.raises(ValueError, match="vp schedule"):
        samplers.build("ddim", schedules.VESchedule(), 10)


def test_ddim_noise_flags():
    sch = {"clip_sample": False}
    assert not any(r.noise for r in samplers.build("ddim", sch, 10).rows)
    assert all(r.noise for r in samplers.build("ddim", sch, 10, eta=0.5).rows)


def test_ddim_converges_at_first_order():
    # trailing spacing with T/n integral: diffusers' prev = t - T//n is then the next grid point
    # (with other spacings DDIM jumps off its own grid and does not converge to the ODE solution)
    sch = schedules.from_config({"timestep_spacing": "trailing", "clip_sample": False})
    slope, errs = gaussian_order("ddim", sch, "eps", [10, 20, 40, 50])
    assert 0.8 <= slope <= 1.3, (slope, errs)
