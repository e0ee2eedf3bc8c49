"""Hostile inputs to the guiders: odd shapes and layouts, half precision, zero predictions, missing
branches and bad schedules, diffusers guiders in mutated states, and repeated calls.

Each check runs on fresh random inputs against the stock diffusers guider (its ``forward`` or its
loop) or against the reference backend, and every refusal must come before the first model call.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastdiff
from fastdiff.guiders import (APG, LTX2, AutoGuidance, CFGZeroStar, Guider, MagnitudeAware, Perturbed, from_diffusers,
                              guide)
from tests._optional import diffusers
from tests.guiders.test_guided_loop import _models, _stock
from tests.samplers._harness import rel_err

STOCK = {
    "ClassifierFreeGuidance": dict(guidance_scale=5.0, guidance_rescale=0.5),
    "ClassifierFreeZeroStarGuidance": dict(guidance_scale=5.0, zero_init_steps=1),
    "AdaptiveProjectedGuidance": dict(guidance_scale=5.0, adaptive_projected_guidance_rescale=3.0, eta=0.3,
                                      adaptive_projected_guidance_momentum=-0.5),
    "MagnitudeAwareGuidance": dict(guidance_scale=6.0, alpha=2.0),
}


def _backends():
    from fastdiff.backends import cpu

    return ["reference", "cpu"] if cpu.available()[0] else ["reference"]


def _stock_step(name, shape, mk=None, dtype=torch.float32, step=2, steps=4, seed=0):
    """(stock prediction, fastdiff guider, c, u) for one step of diffusers' guider ``name``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = getattr(diffusers.guiders, name)(**STOCK[name])
    gen = torch.Generator().manual_seed(seed)
    c = torch.randn(shape, generator=gen)
    u = c + 0.3 * torch.randn(shape, generator=gen)
    c, u = c.to(dtype), u.to(dtype)
    if mk is not None:
        c, u = mk(c, u)
    g.set_state(step, steps, torch.tensor(500))
    if getattr(g, "momentum_buffer", None) is not None or hasattr(g, "momentum_buffer"):
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

        m = g.adaptive_projected_guidance_momentum
        g.momentum_buffer = MomentumBuffer(m) if m is not None else None
    return g.forward(c, u).pred, from_diffusers(g), c, u


LAYOUTS = {
    "contiguous": None,
    "transposed": lambda c, u: (c.transpose(-1, -2), u.transpose(-1, -2)),
    "channels_last": lambda c, u: (c.contiguous(memory_format=torch.channels_last),
                                   u.contiguous(memory_format=torch.channels_last)),
    "expanded": lambda c, u: (c[:1].expand_as(c), u),
    "sliced": lambda c, u: (c[..., ::2], u[..., ::2]),
}


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", ["ClassifierFreeGuidance", "ClassifierFreeZeroStarGuidance",
                                  "AdaptiveProjectedGuidance"])
def test_guide_any_layout_matches_stock(name, layout, backend):
    ref, ours, c, u = _stock_step(name, (2, 3, 4, 6), LAYOUTS[layout])
    m = torch.zeros(c.shape) if ours.uses_momentum else None
    got = guide(ours, 2, 4, cond=c, uncond=u, momentum=m, backend=backend)
    assert rel_err(got, ref) <= 1e-6


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", [(1, 7), (1, 2, 2, 2, 3), (3, 1, 1)])
@pytest.mark.parametrize("name", ["ClassifierFreeZeroStarGuidance", "AdaptiveProjectedGuidance"])
def test_guide_odd_shapes_match_stock(name, shape, backend):
    ref, ours, c, u = _stock_step(name, shape)
    m = torch.zeros(shape) if ours.uses_momentum else None
    assert rel_err(guide(ours, 2, 4, cond=c, uncond=u, momentum=m, backend=backend), ref) <= 1e-6


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2), (torch.float64, 1e-6)])
@pytest.mark.parametrize("name", list(STOCK))
def test_guide_low_and_double_precision(name, dtype, tol, backend):
    """Within rounding of the stock guider run in float64 on the same (rounded) inputs."""
    shape = (2, 12, 5) if name == "MagnitudeAwareGuidance" else (2, 3, 4, 5)  # (stock's norm: 3-D only)
    _, ours, c, u = _stock_step(name, shape, dtype=dtype)
    ref, _, _, _ = _stock_step(name, shape, mk=lambda *_: (c.double(), u.double()))
    m = torch.zeros(shape, dtype=dtype) if ours.uses_momentum else None
    got = guide(ours, 2, 4, cond=c, uncond=u, momentum=m, backend=backend)
    assert got.dtype == dtype
    assert rel_err(got, ref) <= tol


@pytest.mark.parametrize("backend", _backends())
def test_magnitude_aware_zero_predictions_are_finite(backend):
    """c = u = 0 (diffusers: 0/0 = NaN) blends to 0; alpha = 0 with u = 0 (diffusers: 0 * inf) is plain
    CFG; ordinary inputs still match stock."""
    z = torch.zeros(2, 3, 4)
    c = torch.randn(2, 3, 4)
    g = MagnitudeAware(scale=6.0, alpha=2.0)
    assert torch.equal(guide(g, 0, 4, cond=z, uncond=z, backend=backend), z)
    # u = 0, c != 0: the ratio is infinite, the scale damped to 1: c, as in diffusers
    assert rel_err(guide(g, 0, 4, cond=c, uncond=z, backend=backend), c) <= 1e-7
    got = guide(MagnitudeAware(scale=6.0, alpha=0.0), 0, 4, cond=c, uncond=z, backend=backend)
    assert rel_err(got, 6.0 * c) <= 1e-6
    ref, ours, c, u = _stock_step("MagnitudeAwareGuidance", (2, 12, 5))
    assert rel_err(guide(ours, 2, 4, cond=c, uncond=u, backend=backend), ref) <= 1e-6


def test_magnitude_aware_loop_with_a_zero_model_is_finite():
    x = torch.randn(2, 3, 4)

    def zero(u, t, cond):
        return torch.zeros_like(u)

    for backend in _backends():
        y = fastdiff.sample(zero, x, sampler="euler", steps=3, guidance=MagnitudeAware(scale=3.0), cond=x,
                            uncond=torch.zeros_like(x), seed=0, backend=backend)
        assert torch.isfinite(y).all()


def test_guide_resolves_scheduled_weights_and_checks_branches():
    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    assert torch.equal(guide(Guider(scale=[2.0, 3.0]), 1, 2, cond=c, uncond=u),
                       guide(Guider(scale=3.0), 1, 2, cond=c, uncond=u))
    assert torch.equal(guide(Guider(scale=lambda i, s: 1.0 + s), 0, 2, cond=c, uncond=u, sigma=2.5),
                       guide(Guider(scale=3.5), 0, 2, cond=c, uncond=u))
    assert torch.equal(guide(APG(scale=3.0, eta=[0.1, 0.4]), 1, 2, cond=c, uncond=u),
                       guide(APG(scale=3.0, eta=0.4), 1, 2, cond=c, uncond=u))
    with pytest.raises(ValueError, match="uncond branch must have cond's shape"):
        guide(Guider(scale=3.0), 0, 2, cond=c, uncond=u[:, :4])
    with pytest.raises(ValueError, match="uncond branch .* dtype"):
        guide(APG(scale=3.0), 0, 2, cond=c, uncond=u.double())
    with pytest.raises(ValueError, match="momentum branch"):
        guide(APG(scale=3.0, momentum=-0.5), 0, 2, cond=c, uncond=u, momentum=torch.zeros(2, 5, dtype=torch.float64))


class _Counting:
    def __init__(self):
        self.calls = 0

    def __call__(self, u, t, cond=None):
        self.calls += 1
        return torch.tanh(u) * 0.5 + (0.0 if cond is None else 0.2 * cond)


REFUSED = [
    ("uncond", dict(guidance=Guider(scale=3.0, start=0.5)), dict(cond=True), "give uncond="),
    ("cond", dict(guidance=CFGZeroStar(scale=3.0)), dict(uncond=True), "give cond="),
    ("perturbed", dict(guidance=Perturbed(scale=3.0, perturbed_start=0.3, perturbed_stop=1.0)),
     dict(cond=True, uncond=True), "perturbed_model"),
    ("autoguidance", dict(guidance=AutoGuidance(scale=3.0, start=0.5)), dict(cond=True), "perturbed_model"),
    ("modality", dict(guidance=LTX2(scale=2.0, modality_scale=2.0, start=0.5)), dict(cond=True, uncond=True),
     "modality"),
    ("cfgpp_auto", dict(sampler="euler_cfg_pp", guidance=AutoGuidance(scale=3.0, start=0.5)),
     dict(cond=True, uncond=True, perturbed=True), "no unconditional branch"),
    ("cfgpp_zero_init", dict(sampler="dpmpp_2m_cfg_pp", guidance=CFGZeroStar(scale=3.0, zero_init_steps=2)),
     dict(cond=True, uncond=True), "no unconditional branch"),
    ("short_schedule", dict(guidance=Guider(scale=[2.0, 3.0, 4.0])), dict(cond=True, uncond=True), "3 entries"),
    ("long_schedule", dict(guidance=Guider(scale=[2.0] * 5)), dict(cond=True, uncond=True), "5 entries"),
    ("nan_callable", dict(guidance=Guider(scale=lambda i, s: float("nan") if i == 3 else 2.0)),
     dict(cond=True, uncond=True), "finite"),
]


@pytest.mark.parametrize("what,kw,conds,match", REFUSED, ids=[r[0] for r in REFUSED])
def test_refusals_come_before_any_model_call(what, kw, conds, match):
    x = torch.randn(2, 3, 4)
    model, pert = _Counting(), _Counting()
    extra = dict(cond=x if conds.get("cond") else None, uncond=torch.zeros_like(x) if conds.get("uncond") else None,
                 perturbed_model=pert if conds.get("perturbed") else None)
    kw = {"sampler": "euler", **kw}
    with pytest.raises(ValueError, match=match):
        fastdiff.sample(model, x, steps=4, seed=0, backend="reference", **kw, **extra)
    assert model.calls == 0 and pert.calls == 0, what


def test_guidance_without_unconditional_branch_needs_no_uncond():
    """AutoGuidance needs only cond (or nothing): no uncond is asked for."""
    x = torch.randn(1, 2, 3)
    model, weak = _Counting(), _Counting()
    y = fastdiff.sample(model, x, sampler="euler", steps=3, guidance=AutoGuidance(scale=2.0), perturbed_model=weak,
                        seed=0, backend="reference")
    assert torch.isfinite(y).all() and model.calls == 3 and weak.calls == 3


@pytest.mark.parametrize("mutate", ["disable", "scale", "tensor_scale", "pag_scale"])
def test_mutated_diffusers_guider_matches_stock_loop(mutate):
    shape = (2, 3, 4, 5)
    model, perturbed = _models(shape)
    g = torch.Generator().manual_seed(21)
    noise, cond = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    uncond = torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mutate == "pag_scale":
            guider = diffusers.guiders.PerturbedAttentionGuidance(
                guidance_scale=3.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
                perturbed_guidance_stop=1.0, perturbed_guidance_layers=[0])
            guider.skip_layer_guidance_scale = 4.0
        else:
            guider = diffusers.guiders.ClassifierFreeZeroStarGuidance(guidance_scale=6.0, zero_init_steps=1)
            if mutate == "disable":
                guider.disable()
            elif mutate == "scale":
                guider.guidance_scale = 2.0
            else:
                guider.guidance_scale = torch.tensor(2.0)
        sched = diffusers.EulerDiscreteScheduler()
        ref = _stock(sched, copy.deepcopy(guider), model, perturbed, noise, cond, uncond)
        got = fastdiff.sample(model, noise, sampler="euler", steps=8, schedule=sched.config, guidance=guider,
                              cond=cond, uncond=uncond, perturbed_model=perturbed, backend="cpu", seed=0)
    assert rel_err(got, ref) <= 1e-5


def test_repeated_guided_calls_do_not_reuse_a_stale_plan():
    x = torch.randn(2, 2, 3)
    c = torch.randn(2, 2, 3)

    def model(u, t, cond):
        return torch.tanh(u) * 0.5 + 0.2 * cond

    base = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    configs = [dict(schedule=base), dict(schedule={**base, "beta_schedule": "linear"}),
               dict(schedule={**base, "use_karras_sigmas": True}), dict(schedule=base, prediction="v"),
               dict(schedule=base, sampler="euler_ancestral", eta=0.5), dict(schedule=base, steps=5)]
    kw = dict(cond=c, uncond=torch.zeros_like(c), seed=0, backend="reference",
              guidance=APG(scale=3.0, momentum=-0.5))
    fresh = []
    for cfg in configs:
        fastdiff.clear_cache()
        fresh.append(fastdiff.sample(model, x, **{"sampler": "euler", "steps": 4, **cfg}, **kw))
    for _ in range(2):
        for cfg, f in zip(configs, fresh):
            assert torch.equal(fastdiff.sample(model, x, **{"sampler": "euler", "steps": 4, **cfg}, **kw), f), cfg
