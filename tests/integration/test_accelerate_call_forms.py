"""The call forms every accelerated pipeline takes as stock does (issue 18): several images per prompt
with a list of generators, ``output_type="latent"``, a ``callback_on_step_end`` that sees and changes
the latents, and ``pipe._interrupt`` set by it, on the tiny Flux, Wan, LTX, SD img2img and SD inpaint
pipelines; each against the stock call to 1e-5 relative (fp32)."""

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


def _flux():
    g = torch.Generator().manual_seed(0)
    pipe = _tiny.flux(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    kw = dict(height=8, width=8, prompt_embeds=torch.randn(2, 6, 32, generator=g),
              pooled_prompt_embeds=torch.randn(2, 32, generator=g), true_cfg_scale=3.0,
              negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
              negative_pooled_prompt_embeds=torch.randn(2, 32, generator=g))
    return pipe, kw, "images"


def _wan():
    g = torch.Generator().manual_seed(0)
    pipe = _tiny.wan(diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                       flow_shift=3.0))
    kw = dict(height=16, width=16, num_frames=5, guidance_scale=4.0, prompt_embeds=torch.randn(1, 5, 32, generator=g),
              negative_prompt_embeds=torch.randn(1, 5, 32, generator=g), num_videos_per_prompt=2)  # (broadcast)
    return pipe, kw, "frames"


def _ltx():
    g = torch.Generator().manual_seed(0)
    pipe = _tiny.ltx(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    mask = torch.ones(2, 6, dtype=torch.long)  # (stock LTX fails on one embedding for two videos)
    kw = dict(height=64, width=64, num_frames=9, guidance_scale=4.0, prompt_embeds=torch.randn(2, 6, 32, generator=g),
              prompt_attention_mask=mask, negative_prompt_embeds=torch.randn(2, 6, 32, generator=g),
              negative_prompt_attention_mask=mask)
    return pipe, kw, "frames"


def _img2img():
    pipe = _tiny.sd_variant("StableDiffusionImg2ImgPipeline",
                            diffusers.EulerAncestralDiscreteScheduler(**_tiny.SD_BETAS))
    kw = dict(prompt="a cat", negative_prompt="a dog", image=torch.rand(1, 3, 16, 16,
                                                                        generator=torch.Generator().manual_seed(0)),
              strength=0.8, guidance_scale=5.0, num_images_per_prompt=2)
    return pipe, kw, "images"


def _inpaint():
    g = torch.Generator().manual_seed(0)
    pipe = _tiny.sd_variant("StableDiffusionInpaintPipeline", diffusers.DPMSolverMultistepScheduler(**_tiny.SD_BETAS))
    kw = dict(prompt="a cat", negative_prompt="a dog", image=torch.rand(1, 3, 16, 16, generator=g),
              mask_image=(torch.rand(1, 1, 16, 16, generator=g) > 0.5).float(), height=16, width=16,
              guidance_scale=5.0, num_images_per_prompt=2)
    return pipe, kw, "images"


PIPES = {"flux": _flux, "wan": _wan, "ltx": _ltx, "sd_img2img": _img2img, "sd_inpaint": _inpaint}


@pytest.mark.parametrize("name", list(PIPES))
def test_generator_list_callback_and_interrupt_as_stock(name):
    pipe, kw, field = PIPES[name]()
    seen = {}
    stock, ours, _ = stock_and_accelerated(pipe, field, seed=10, generators=2,
                                           callback=recording_callback(seen, 2, lambda x: x * 0.95),
                                           num_inference_steps=5, output_type="latent", **kw)
    assert [s[:2] for s in seen[True]] == [s[:2] for s in seen[False]]
    assert len(seen[True]) == 3  # interrupted after the third step, as stock
    for a, b in zip(seen[True], seen[False]):
        assert rel_err(a[2], b[2]) <= TOL
    assert stock.shape == ours.shape and stock.shape[0] == 2
    assert rel_err(ours, stock) <= TOL, f"{name}: {rel_err(ours, stock):.3g}"


def test_a_repeated_call_reuses_its_prepared_rows():
    """The second accelerated call with the same settings runs on the executor the first prepared (no
    row is prepared again) and gives the same output; other settings get their own."""
    from fastdiff.runtime import loop

    pipe, kw, field = PIPES["sd_img2img"]()
    fdd.accelerate(pipe)
    try:
        loop.clear_kept()

        def call(steps=5):
            return getattr(pipe(**kw, num_inference_steps=steps, output_type="latent",
                                generator=[torch.Generator().manual_seed(10 + j) for j in range(2)]), field)

        a = call()
        kept = list(loop._executors.values())
        b = call()
        assert len(kept) == 1 and list(loop._executors.values()) == kept
        assert torch.equal(a, b)
        call(steps=4)
        assert len(loop._executors) == 2
    finally:
        fdd.restore(pipe)
