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
    ("EulerDiscreteScheduler", "euler", "AdaptiveProjectedGuidance",  # per-channel norms: a derived slot
     dict(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=2.0,
          eta=0.4, adaptive_projected_guidance_norm_dim=1)),
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


def _stock_cfg_loop(sched, model, noise, cond, uncond, scale_at, inside=lambda sigma: True):
    """The stock loop with diffusers' CFG guider whose scale is set before every step (a schedule)."""
    guider = diffusers.guiders.ClassifierFreeGuidance()
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        sigma = float(sched.sigmas[i])
        guider.guidance_scale = scale_at(i, sigma) if inside(sigma) else 1.0
        guider.set_state(i, STEPS, t)
        u = sched.scale_model_input(x, t)
        tt = t.to(torch.float32).expand(x.shape[0])
        pred = guider.forward(model(u, tt, cond), model(u, tt, uncond)).pred
        x = sched.step(pred, t, x).prev_sample
    return x


@pytest.mark.parametrize("schedule_kind", ["sequence", "callable", "interval"])
def test_scheduled_weights_and_interval_match_stock(schedule_kind):
    shape = (2, 3, 4, 5)
    model, _ = _models(shape)
    g = torch.Generator().manual_seed(5)
    noise, cond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    uncond = torch.zeros(shape)
    seq = [7.0, 6.0, 5.0, 4.5, 4.0, 3.0, 2.0, 1.5]
    kw = {}
    if schedule_kind == "sequence":
        guider, scale_at = fastdiff.guiders.Guider(scale=seq), (lambda i, s: seq[i])
    elif schedule_kind == "callable":
        f = lambda i, s: 1.0 + 0.5 * s  # noqa: E731
        guider, scale_at = fastdiff.guiders.Guider(scale=f), f
    else:
        guider, scale_at = fastdiff.guiders.Guider(scale=5.0), (lambda i, s: 5.0)
        kw["guidance_interval"] = (0.5, 5.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.EulerDiscreteScheduler()
        inside = (lambda s: 0.5 <= s <= 5.0) if "guidance_interval" in kw else (lambda s: True)
        ref = _stock_cfg_loop(copy.deepcopy(sched), model, noise, cond, uncond, scale_at, inside)
        got = fastdiff.sample(model, noise, sampler="euler", steps=STEPS, schedule=sched.config, guidance=guider,
                              cond=cond, uncond=uncond, backend="cpu", seed=0, **kw)
    assert rel_err(got, ref) <= 1e-5


def test_classifier_guidance_adds_to_a_guider_as_to_guidance_scale():
    shape = (2, 3, 4, 5)
    model, _ = _models(shape)
    g = torch.Generator().manual_seed(6)
    noise, cond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    w = torch.randn(60, 3, generator=g, dtype=torch.float64)

    def classifier(u, t):
        return u.reshape(u.shape[0], -1) @ w.to(u.dtype)

    y = torch.tensor([0, 2])
    kw = dict(sampler="dpmpp_2m", steps=6, schedule={"num_train_timesteps": 1000}, cond=cond,
              uncond=torch.zeros(shape), classifier=classifier, classifier_scale=2.0, classifier_y=y, seed=1,
              backend="cpu")
    a = fastdiff.sample(model, noise, guidance_scale=4.0, **kw)
    b = fastdiff.sample(model, noise, guidance=fastdiff.guiders.Guider(scale=4.0), **kw)
    c = fastdiff.sample(model, noise, guidance_scale=4.0, **{**kw, "classifier": None, "classifier_y": None})
    assert rel_err(b, a) <= 1e-5
    assert rel_err(c, a) > 1e-3  # the classifier term is there


def test_scheduled_weight_checks():
    with pytest.raises(ValueError, match="scale\\[1\\]"):
        fastdiff.guiders.Guider(scale=[1.0, float("nan")])
    g = fastdiff.guiders.Guider(scale=[2.0, 3.0])
    with pytest.raises(ValueError, match="has 2 entries"):
        g.at(2, 1.0)
    assert g.at(1, 1.0).scale == 3.0
