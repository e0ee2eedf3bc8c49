"""fastdiff.diffusers.accelerate on a diffusers modular pipeline (a tiny StableDiffusionXLModularPipeline
assembled offline from its auto blocks and random-weight components): its scheduler becomes the
drop-in and its guider blends in one fused step, the blocks stay the stock ones; the output equals
the stock modular pipeline's (same arguments and generator) to 1e-5 relative in fp32 for several
guiders (CFG, CFG with rescale, CFG-Zero*, APG with momentum, PAG with its attention hooks) and
schedulers, both fused parts counted; restore puts the stock components back."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.samplers._harness import count_fused_steps, rel_err

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fastdiff.diffusers as fdd  # noqa: E402

from . import _tiny  # noqa: E402

TOL = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def pipe():
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        std = _tiny.sdxl(diffusers.EulerDiscreteScheduler(**_tiny.SD_BETAS))
        p = StableDiffusionXLAutoBlocks().init_pipeline()
        comps = {k: v for k, v in std.components.items() if k not in ("feature_extractor", "image_encoder")}
        p.update_components(**comps)
    p.set_progress_bar_config(disable=True)
    return p


GUIDERS = [
    ("ClassifierFreeGuidance", dict(guidance_scale=5.0)),
    ("ClassifierFreeGuidance", dict(guidance_scale=6.0, guidance_rescale=0.6)),
    ("ClassifierFreeZeroStarGuidance", dict(guidance_scale=4.0)),
    ("AdaptiveProjectedGuidance", dict(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5,
                                       adaptive_projected_guidance_rescale=3.0)),
    ("PerturbedAttentionGuidance", dict(guidance_scale=4.0, perturbed_guidance_scale=2.0, perturbed_guidance_start=0.0,
                                        perturbed_guidance_stop=1.0)),  # (its layer config: _guider)
]


def _guider(name, cfg):
    if name == "PerturbedAttentionGuidance":  # the UNet's attention blocks, named (the auto search is for DiTs)
        from diffusers.hooks import LayerSkipConfig

        cfg = dict(cfg, perturbed_guidance_config=LayerSkipConfig(
            indices=[0], fqn="mid_block.attentions.0.transformer_blocks", skip_attention=False,
            skip_attention_scores=True, skip_ff=False))
    return getattr(diffusers.guiders, name)(**cfg)
SCHEDULERS = [("EulerDiscreteScheduler", {}), ("DPMSolverMultistepScheduler", {}),
              ("EulerAncestralDiscreteScheduler", {})]


def _run(pipe, guider, scheduler, accelerated):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.update_components(guider=guider, scheduler=scheduler)
        if accelerated:
            fdd.accelerate(pipe)
        try:
            return pipe(prompt="a cat", negative_prompt="a dog", num_inference_steps=STEPS, height=16, width=16,
                        generator=torch.Generator().manual_seed(2), output="latents")
        finally:
            if accelerated:
                fdd.restore(pipe)


@pytest.mark.parametrize("sched_name,sched_cfg", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
@pytest.mark.parametrize("guider_name,guider_cfg", GUIDERS, ids=[f"{g[0]}{i}" for i, g in enumerate(GUIDERS)])
def test_modular_sdxl_matches_stock(pipe, guider_name, guider_cfg, sched_name, sched_cfg):
    if sched_name != "EulerDiscreteScheduler" and guider_name not in ("ClassifierFreeGuidance",
                                                                       "AdaptiveProjectedGuidance"):
        pytest.skip("the other guiders run with one scheduler (time)")

    def make():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return (_guider(guider_name, guider_cfg),
                    getattr(diffusers, sched_name)(**_tiny.SD_BETAS, **sched_cfg))

    stock = _run(pipe, *make(), accelerated=False)
    calls = []
    from fastdiff.guiders import apply

    orig = apply.guide
    with count_fused_steps() as counted:
        apply_guide = orig

        def counting(*a, **k):
            calls.append(1)
            return apply_guide(*a, **k)

        import fastdiff.guiders as fg

        fg.guide = counting
        try:
            ours = _run(pipe, *make(), accelerated=True)
        finally:
            fg.guide = orig
    assert len(calls) == STEPS, "the guider's blend did not run fused at every step"
    assert counted.n >= 2 * STEPS  # the fused blend and the fused scheduler step, every step
    assert type(pipe.scheduler) is getattr(diffusers, sched_name)  # restored
    assert type(pipe.guider) is getattr(diffusers.guiders, guider_name)
    assert rel_err(ours, stock) <= TOL, f"{guider_name} + {sched_name}: {rel_err(ours, stock):.3g}"


def test_fused_guider_refuses_and_restores():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = diffusers.guiders.ClassifierFreeGuidance(guidance_scale=3.0)
    assert fdd.fused_guider(g) is g and type(g) is not diffusers.guiders.ClassifierFreeGuidance
    assert isinstance(g, diffusers.guiders.ClassifierFreeGuidance)
    assert fdd.stock_guider(g) is g and type(g) is diffusers.guiders.ClassifierFreeGuidance
    with pytest.raises(ValueError, match="not made fused"):
        fdd.stock_guider(g)
    with pytest.raises(ValueError, match="backend"):
        fdd.fused_guider(g, backend="nope")
    assert type(g) is diffusers.guiders.ClassifierFreeGuidance  # nothing changed
