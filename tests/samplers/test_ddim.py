"""ddim: trajectories vs diffusers' DDIMScheduler (any eta, spacings, clipping, thresholding)."""

import pytest

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.core.plan import OP_E

from ._harness import (SD, compare_with_diffusers, diffusers_loop, gaussian_order, initial_noise, ours, rel_err,
                       toy_model)

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

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


CLIPS = [dict(), dict(clip_sample_range=0.8), dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)]
"""diffusers' DEFAULT config (clip_sample=True, range 1), another range, and dynamic thresholding."""

CLIP_STEPS = 12
"""Steps of the default-clipping comparisons. Mixing the clipped x0 with the unclipped eps amplifies
rounding: with this model diffusers' own fp32 loop drifts from its fp64 loop by up to ~5e-5 over 30
eps steps (~4e-6 over 12), so over 30 steps 1e-5 would measure diffusers' rounding, not the formula.
A wrong formula is off by O(1) (see test_ddim_clipping_tests_discriminate)."""


@pytest.mark.parametrize("clip", CLIPS, ids=["default", "range0.8", "threshold"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_ddim_default_clipping_matches_diffusers(clip, pred, eta, seed):
    """diffusers' default use_clipped_model_output=False: the CLIPPED x0 with the eps of the UNCLIPPED
    x0 (the model output itself for eps models), which a row expresses with the e operand."""
    sched = diffusers.DDIMScheduler(prediction_type=pred, **clip)
    worst = compare_with_diffusers(sched, "ddim", CLIP_STEPS, seed, model=toy_model(seed, gain=2.5), eta=eta,
                                   step_kwargs={"eta": eta})
    print(f"ddim {clip} {pred} eta={eta}: worst per-step relative error {worst:.3g}")


@pytest.mark.parametrize("clip", CLIPS[1:], ids=["range0.8", "threshold"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddim_clipping_matches_diffusers_with_clipped_model_output(clip, pred, seed):
    sched = diffusers.DDIMScheduler(prediction_type=pred, **clip)
    compare_with_diffusers(sched, "ddim", 30, seed, model=toy_model(seed, gain=2.5), eta=0.3,
                           use_clipped_model_output=True, step_kwargs={"eta": 0.3, "use_clipped_model_output": True})


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_ddim_clipping_tests_discriminate(pred, seed):
    """The model above does clip: the three readings of diffusers' step differ by far more than the
    parity tolerance, and only the one diffusers takes by default is what the default plan runs."""
    model, steps = toy_model(seed, gain=2.5), CLIP_STEPS
    trajs = {}
    for name, cfg, kw in [("default", {}, {}), ("no-clip", {"clip_sample": False}, {}),
                          ("clipped-eps", {}, {"use_clipped_model_output": True})]:
        sched = diffusers.DDIMScheduler(prediction_type=pred, **cfg)
        sched.set_timesteps(steps)
        trajs[name] = diffusers_loop(sched, model, initial_noise(seed, 1.0), steps, **kw)[-1]
    assert rel_err(trajs["default"], trajs["no-clip"]) > 1e-3
    assert rel_err(trajs["default"], trajs["clipped-eps"]) > 1e-3
    plan = samplers.build("ddim", diffusers.DDIMScheduler(prediction_type=pred).config, steps)
    assert all(r.clip == "static" for r in plan.rows) and all(r.out[OP_E] != 0 for r in plan.rows[:-1])
    x = ours(plan, model, initial_noise(seed, 1.0))[-1]
    assert rel_err(x, trajs["default"]) <= 1e-5


def test_ddim_refuses_what_the_contract_cannot_express():
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
    sch = {}  # diffusers' default config (clip_sample=True)
    assert not any(r.noise for r in samplers.build("ddim", sch, 10).rows)
    assert all(r.noise for r in samplers.build("ddim", sch, 10, eta=0.5).rows)


def test_ddim_converges_at_first_order():
    # trailing spacing with T/n integral: diffusers' prev = t - T//n is then the next grid point
    # (with other spacings DDIM jumps off its own grid and does not converge to the ODE solution)
    sch = schedules.from_config({"timestep_spacing": "trailing", "clip_sample": False})
    slope, errs = gaussian_order("ddim", sch, "eps", [10, 20, 40, 50])
    assert 0.8 <= slope <= 1.3, (slope, errs)
