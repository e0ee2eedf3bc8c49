"""Whole sampling loops with a guider: ``fastdiff.sample(..., guidance=guider)`` against the stock
diffusers loop (``scale_model_input`` / guider ``set_state`` + ``forward`` / scheduler ``step``)
with the same guider, model and initial noise, free-running, ≤ 1e-5 relative at the end; the fused
step is counted (one per row), and stateful guiders (APG's momentum) and windows are included."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastdiff
from tests._optional import diffusers
from tests.samplers._harness import count_fused_steps, rel_err, toy_model

STEPS = 8


def _models(shape):
    f = toy_model(3, shape)
    pf = toy_model(4, shape, gain=0.9)

    def model(u, t, cond):
        return f(u, t) + 0.2 * cond

    def perturbed(u, t, cond):
        return 0.7 * f(u, t) + 0.3 * pf(u, t) + 0.2 * cond

    return model, perturbed


def _stock(sched, guider, model, perturbed, noise, cond, uncond):
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        guider.set_state(i, STEPS, t)
        if i == 0 and hasattr(guider, "momentum_buffer"):
            from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

            m = guider.adaptive_projected_guidance_momentum
            guider.momentum_buffer = MomentumBuffer(m) if m is not None else None
        u = sched.scale_model_input(x, t)
        tt = t.to(torch.float32).expand(x.shape[0])
        c, un, p = model(u, tt, cond), model(u, tt, uncond), perturbed(u, tt, cond)
        name = type(guider).__name__
        if name in ("PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance"):
            pred = guider.forward(c, un, p).pred
        elif name == "AutoGuidance":
            pred = guider.forward(c, p).pred
        else:
            pred = guider.forward(c, un).pred
        x = sched.step(pred, t, x).prev_sample
    return x


CASES = [
    ("EulerDiscreteScheduler", "euler", "ClassifierFreeGuidance", dict(guidance_scale=6.0, guidance_rescale=0.5)),
    ("EulerDiscreteScheduler", "euler", "ClassifierFreeZeroStarGuidance", dict(guidance_scale=5.0, zero_init_steps=1)),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "AdaptiveProjectedGuidance",
     dict(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=3.0,
          eta=0.2)),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "AdaptiveProjectedMixGuidance",
     dict(adaptive_projected_guidance_start_step=2, adaptive_projected_guidance_rescale=4.0)),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "TangentialClassifierFreeGuidance", dict(guidance_scale=4.0)),
    ("EulerDiscreteScheduler", "euler", "SkipLayerGuidance",
     dict(guidance_scale=5.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.1,
          skip_layer_guidance_stop=0.7, skip_layer_guidance_layers=[0], start=0.0, stop=0.9)),
    ("EulerDiscreteScheduler", "euler", "AutoGuidance",
     dict(guidance_scale=3.0, auto_guidance_layers=[0], dropout=0.1, use_original_formulation=True)),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", "MagnitudeAwareGuidance", dict(guidance_scale=6.0, alpha=2.0)),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sched_name,sampler,guider_name,cfg", CASES, ids=[c[2] for c in CASES])
def test_guided_loop_matches_stock(sched_name, sampler, guider_name, cfg, backend):
    if backend == "cpu":
        from fastdiff.backends import cpu

        if not cpu.available()[0]:
            pytest.skip("cpu extension not built")
    shape = (2, 12, 5) if guider_name == "MagnitudeAwareGuidance" else (2, 3, 4, 5)  # (stock's norm: 3-D only)
    model, perturbed = _models(shape)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(shape, generator=g)
    cond = torch.randn(shape, generator=g)
    uncond = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guider = getattr(diffusers.guiders, guider_name)(**cfg)
        sched = getattr(diffusers, sched_name)()
        ref = _stock(sched, copy.deepcopy(guider), model, perturbed, noise, cond, uncond)
        with count_fused_steps() as counted:
            got = fastdiff.sample(model, noise, sampler=sampler, steps=STEPS, schedule=sched.config, guidance=guider,
                                  cond=cond, uncond=uncond, perturbed_model=perturbed, backend=backend, seed=0)
    assert counted.n >= STEPS
    err = rel_err(got, ref)
    assert err <= 1e-5, f"{guider_name} with {sched_name}: {err:.3g} from the stock loop"


def test_guidance_refuses_what_it_does_not_take():
    model, _ = _models((1, 2, 3))
    x = torch.randn(1, 2, 3)
    g = fastdiff.guiders.Guider(scale=3.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        fastdiff.sample(model, x, guidance=g, guidance_scale=2.0, cond=x, uncond=x)
    with pytest.raises(ValueError, match="callback"):
        fastdiff.sample(model, x, guidance=g, callback=lambda *a: None, cond=x, uncond=x)
    with pytest.raises(ValueError, match="give guidance="):
        fastdiff.sample(model, x, perturbed_model=model, cond=x)
    with pytest.raises(ValueError, match="perturbed_model"):
        fastdiff.sample(model, x, steps=3, guidance=fastdiff.guiders.Perturbed(perturbed_start=0.0, perturbed_stop=1.0),
                        cond=x, uncond=x)


def test_non_finite_model_output_is_reported_with_its_step():
    model, _ = _models((1, 2, 3))
    x = torch.randn(1, 2, 3)

    def bad(u, t, cond):
        y = model(u, t, cond)
        return y * float("nan") if float(t[0]) < 500 else y

    with pytest.raises(fastdiff.NonFiniteError, match="step"):
        fastdiff.sample(bad, x, steps=4, sampler="euler", guidance=fastdiff.guiders.APG(scale=3.0, momentum=-0.5),
                        cond=x, uncond=torch.zeros_like(x), schedule={"num_train_timesteps": 1000})
