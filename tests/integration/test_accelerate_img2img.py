"""fastdiff.diffusers.accelerate on tiny image-to-image pipelines built offline (random weights): the run
starts where ``strength`` cuts the schedule (multistep history, ancestral noise and the generator's
draws included) and equals the stock call (same arguments and generator) to 1e-5 relative in fp32;
the fused steps are counted."""

from __future__ import annotations

import pytest
import torch

from tests.samplers._harness import rel_err

from ._accel import recording_callback, stock_and_accelerated

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fastdiff.diffusers as fdd  # noqa: E402

from . import _tiny  # noqa: E402

TOL = 1e-5
SCHEDULERS = [("DPMSolverMultistepScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
              ("DDIMScheduler", {"clip_sample": False}), ("UniPCMultistepScheduler", {})]


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("name,cfg", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_sd_img2img_matches_stock(name, cfg, strength):
    pipe = _tiny.sd_variant("StableDiffusionImg2ImgPipeline", getattr(diffusers, name)(**_tiny.SD_BETAS, **cfg))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a cat", negative_prompt="a dog", image=image, strength=strength, num_inference_steps=6,
              guidance_scale=5.0, output_type="latent")
    stock, ours, n = stock_and_accelerated(pipe, seed=1, **kw)
    steps = int(6 * strength)
    assert n >= steps
    assert rel_err(ours, stock) <= TOL, f"{name} strength {strength}: {rel_err(ours, stock):.3g}"


def test_sd_img2img_callback_sees_the_cut_schedule():
    pipe = _tiny.sd_variant("StableDiffusionImg2ImgPipeline", diffusers.EulerDiscreteScheduler(**_tiny.SD_BETAS))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    seen = {}
    stock_and_accelerated(pipe, seed=1, callback=recording_callback(seen), prompt="a cat", image=image, strength=0.5,
                          num_inference_steps=6, output_type="latent")
    assert [s[:2] for s in seen[True]] == [s[:2] for s in seen[False]] and len(seen[True]) == 3


@pytest.mark.parametrize("name,cfg", SCHEDULERS[:2], ids=[s[0] for s in SCHEDULERS[:2]])
def test_sdxl_img2img_matches_stock(name, cfg):
    pipe = _tiny.sdxl_variant("StableDiffusionXLImg2ImgPipeline", getattr(diffusers, name)(**_tiny.SD_BETAS, **cfg))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a cat", negative_prompt="a dog", image=image, strength=0.7, num_inference_steps=5,
              guidance_scale=5.0, output_type="latent", guidance_rescale=0.3)
    stock, ours, n = stock_and_accelerated(pipe, seed=1, **kw)
    assert n >= 3
    assert rel_err(ours, stock) <= TOL, f"{name}: {rel_err(ours, stock):.3g}"


def test_img2img_refuses_what_it_does_not_run():
    pipe = fdd.accelerate(_tiny.sdxl_variant("StableDiffusionXLImg2ImgPipeline",
                                             diffusers.EulerDiscreteScheduler(**_tiny.SD_BETAS)))
    with pytest.raises(TypeError, match="denoising_start"):
        pipe(prompt="a cat", image=torch.rand(1, 3, 16, 16), denoising_start=0.5, output_type="latent")


INPAINT = [("EulerAncestralDiscreteScheduler", {}, 4), ("DPMSolverMultistepScheduler", {}, 4),
           ("DDIMScheduler", {"clip_sample": False}, 4), ("EulerDiscreteScheduler", {}, 9),
           ("DPMSolverMultistepScheduler", {}, 9)]


@pytest.mark.parametrize("strength", [0.7, 1.0])
@pytest.mark.parametrize("name,cfg,channels", INPAINT, ids=[f"{s[0]}-{s[2]}ch" for s in INPAINT])
def test_sd_inpaint_matches_stock(name, cfg, channels, strength):
    """A 4-channel UNet (the known region re-noised to the next timestep after every step) and a
    9-channel one (mask and masked image latents concatenated to the model input)."""
    pipe = _tiny.sd_variant("StableDiffusionInpaintPipeline", getattr(diffusers, name)(**_tiny.SD_BETAS, **cfg),
                            unet_in_channels=channels)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float()
    kw = dict(prompt="a cat", negative_prompt="a dog", image=image, mask_image=mask, strength=strength,
              num_inference_steps=5, guidance_scale=5.0, output_type="latent", height=16, width=16)
    stock, ours, n = stock_and_accelerated(pipe, seed=1, **kw)
    assert n >= 3
    assert rel_err(ours, stock) <= TOL, f"{name} {channels}ch: {rel_err(ours, stock):.3g}"


@pytest.mark.parametrize("name,cfg", SCHEDULERS[:2], ids=[s[0] for s in SCHEDULERS[:2]])
def test_sdxl_inpaint_matches_stock(name, cfg):
    pipe = _tiny.sdxl_variant("StableDiffusionXLInpaintPipeline", getattr(diffusers, name)(**_tiny.SD_BETAS, **cfg))
    g = torch.Generator().manual_seed(0)
    kw = dict(prompt="a cat", negative_prompt="a dog", image=torch.rand(1, 3, 16, 16, generator=g),
              mask_image=(torch.rand(1, 1, 16, 16, generator=g) > 0.5).float(), height=16, width=16, strength=0.8,
              num_inference_steps=5, guidance_scale=5.0, guidance_rescale=0.2, output_type="latent")
    stock, ours, n = stock_and_accelerated(pipe, seed=1, **kw)
    assert n >= 3
    assert rel_err(ours, stock) <= TOL, f"{name}: {rel_err(ours, stock):.3g}"
