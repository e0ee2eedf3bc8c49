"""Frequency-decoupled guidance (:mod:`fastdiff.guiders.frequency`) against diffusers'
``FrequencyDecoupledGuidance`` (which builds its pyramid with kornia): each step's guided prediction
to 1e-6 relative on fresh random branches, over levels, scales, windows, parallel weights, both
rescale spaces and the original formulation, non-square sizes and float64; a whole loop against
the stock loop to 1e-5; the pyramid against kornia's; and the shapes it refuses, by name."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastdiff
from fastdiff.guiders import FrequencyDecoupled, from_diffusers, guide
from fastdiff.guiders import frequency
from tests._optional import diffusers
from tests.samplers._harness import count_fused_steps, rel_err

CONFIGS = [
    dict(),
    dict(guidance_scales=[7.0, 3.0, 2.0]),
    dict(parallel_weights=[0.5, 1.0]),
    dict(parallel_weights=[1.0, 0.3, 0.5], guidance_scales=[4.0, 6.0, 2.0]),
    dict(guidance_rescale=[0.7, 0.0]),
    dict(guidance_rescale=[0.5, 0.3], guidance_rescale_space="freq"),
    dict(guidance_rescale=[0.0, 0.6], guidance_rescale_space="freq"),
    dict(use_original_formulation=True, guidance_scales=[3.0, 2.0]),
    dict(start=0.2, stop=0.8, guidance_scales=[4.0, 3.0]),
    dict(guidance_scales=[6.0]),
    dict(parallel_weights=0.2, upcast_to_double=False, guidance_scales=[5.0, 2.0, 3.0, 4.0]),
]

OFF_LEVELS = [
    dict(guidance_scales=[1.0, 5.0]),
    dict(guidance_scales=[5.0, 1.0, 3.0]),
    dict(start=[0.0, 0.5], stop=[0.5, 1.0]),
    dict(use_original_formulation=True, guidance_scales=[2.0, 0.0], parallel_weights=[0.5, 1.0]),
]
"""Configurations with a level switched off at some step (a neutral scale, or outside its window),
where diffusers' ``forward`` raises: ``UnboundLocalError`` at level 0, a shape mismatch at a later
level (it appends the previous level's conditional band instead of this level's)."""


def _stock(cfg):
    pytest.importorskip("kornia")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return diffusers.guiders.FrequencyDecoupledGuidance(**cfg)


def _backends():
    from fastdiff.backends import cpu

    return ["reference"] + (["cpu"] if cpu.available()[0] else [])


@pytest.mark.parametrize("shape,dtype", [((2, 4, 16, 16), torch.float32), ((3, 2, 32, 16), torch.float32),
                                         ((1, 3, 16, 48), torch.float64)], ids=["square", "tall", "wide_f64"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_each_step_equals_the_diffusers_guider(cfg, shape, dtype):
    g = _stock(cfg)
    ours = from_diffusers(g)
    levels = len(g.guidance_scales)
    if min(shape[2:]) >> (levels - 1) < 3:
        pytest.skip("too many levels for this size")
    gen = torch.Generator().manual_seed(len(str(cfg)) + shape[2])
    for step in (0, 3, 7):
        g.set_state(step, 8, None)
        c = torch.randn(shape, generator=gen, dtype=dtype)
        u = c + 0.5 * torch.randn(shape, generator=gen, dtype=dtype)
        want = g.forward(c, u).pred
        for backend in _backends():
            got = guide(ours, step, 8, cond=c, uncond=u, backend=backend)
            assert got.dtype == dtype and got.shape == want.shape
            assert rel_err(got, want) <= 1e-6, f"{cfg} step {step} {backend}: {rel_err(got, want):.3g}"


@pytest.mark.parametrize("cfg", OFF_LEVELS, ids=[str(i) for i in range(len(OFF_LEVELS))])
def test_a_level_switched_off_is_its_conditional_band(cfg):
    """Where diffusers raises (see ``OFF_LEVELS``), the guided pyramid takes the level's conditional
    band (the paper's intent, and what diffusers' code means to append): checked against a pyramid
    built and collapsed with kornia's own functions."""
    kornia = pytest.importorskip("kornia")
    g = _stock(cfg)
    ours = from_diffusers(g)
    levels = len(g.guidance_scales)
    gen = torch.Generator().manual_seed(3)
    raised = False
    for step in range(8):
        g.set_state(step, 8, None)
        c = torch.randn(2, 3, 16, 16, generator=gen)
        u = c + 0.5 * torch.randn(2, 3, 16, 16, generator=gen)
        on = [g._is_fdg_enabled_for_level(k) for k in range(levels)]
        if not g._is_fdg_enabled():
            want = c
        else:
            try:
                g.forward(c, u)
            except (UnboundLocalError, RuntimeError):
                raised = True
            cp = kornia.geometry.transform.build_laplacian_pyramid(c, levels)
            up = kornia.geometry.transform.build_laplacian_pyramid(u, levels)
            guided = []
            for k in range(levels):
                if not on[k]:
                    guided.append(cp[k])
                    continue
                shift = cp[k] - up[k]
                if g.parallel_weights[k] != 1.0:
                    from diffusers.guiders.frequency_decoupled_guidance import project

                    par, orth = project(shift, cp[k], g.upcast_to_double)
                    shift = g.parallel_weights[k] * par + orth
                guided.append((cp[k] if g.use_original_formulation else up[k]) + g.guidance_scales[k] * shift)
            want = guided[-1]
            for lv in reversed(guided[:-1]):
                want = kornia.geometry.pyrup(want) + lv
        for backend in _backends():
            got = guide(ours, step, 8, cond=c, uncond=u, backend=backend)
            assert rel_err(got, want) <= 1e-6, f"{cfg} step {step} {backend}: {rel_err(got, want):.3g}"
    assert raised, "diffusers no longer raises here: compare with its forward instead"


def test_the_pyramid_is_kornias():
    kornia = pytest.importorskip("kornia")
    x = torch.randn(2, 3, 32, 16, generator=torch.Generator().manual_seed(0))
    for levels in (1, 2, 3):
        want = kornia.geometry.transform.build_laplacian_pyramid(x, levels)
        got = frequency.laplacian_pyramid(x, levels)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    y = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(frequency.pyrup(y), kornia.geometry.pyrup(y), rtol=0, atol=0)
    torch.testing.assert_close(frequency.pyrdown(x), kornia.geometry.pyrdown(x), rtol=0, atol=0)


def test_a_whole_loop_equals_the_stock_loop():
    from tests.guiders.test_guided_loop import STEPS, _models, _stock as stock_loop

    shape = (2, 3, 16, 16)
    model, perturbed = _models(shape)
    gen = torch.Generator().manual_seed(5)
    noise, cond, uncond = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), torch.zeros(shape)
    for cfg in (dict(guidance_scales=[5.0, 2.5], guidance_rescale=[0.4, 0.0]),
                dict(guidance_scales=[3.0, 6.0], parallel_weights=[0.3, 1.0], start=0.2, stop=0.9)):
        g = _stock(cfg)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = diffusers.DPMSolverMultistepScheduler()
            want = stock_loop(sched, copy.deepcopy(g), model, perturbed, noise, cond, uncond)
        for backend in _backends():
            with count_fused_steps() as counted:
                got = fastdiff.sample(model, noise, sampler="dpmpp_2m", steps=STEPS, schedule=sched.config, guidance=g,
                                      cond=cond, uncond=uncond, backend=backend, seed=0)
            assert counted.n >= STEPS
            assert rel_err(got, want) <= 1e-5, f"{cfg} {backend}: {rel_err(got, want):.3g}"


def test_what_it_refuses_by_name():
    c = torch.randn(1, 2, 24, 24)
    g = FrequencyDecoupled(scales=(5.0, 2.0))
    with pytest.raises(ValueError, match="24x24"):  # kornia would pad to 32x32
        guide(g, 0, 4, cond=c, uncond=c)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        guide(g, 0, 4, cond=torch.randn(1, 2, 3, 16, 16), uncond=torch.randn(1, 2, 3, 16, 16))
    with pytest.raises(ValueError, match="under 3 pixels"):
        guide(FrequencyDecoupled(scales=(5.0, 2.0, 2.0, 2.0)), 0, 4, cond=torch.randn(1, 2, 16, 16),
              uncond=torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match="parallel_weights has 3 entries"):
        FrequencyDecoupled(scales=(5.0, 2.0), parallel_weights=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="rescale_space"):
        FrequencyDecoupled(scales=(5.0, 2.0), rescale_space="pixel")
    with pytest.raises(ValueError, match="give uncond"):
        fastdiff.sample(lambda x, t, c: x, torch.randn(1, 2, 16, 16), steps=3, guidance=g, cond=c[:, :, :16, :16])
