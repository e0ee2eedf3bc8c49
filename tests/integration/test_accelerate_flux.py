"""fastdiff.diffusers.accelerate on a tiny FluxPipeline built offline (random weights): the accelerated
call equals the stock one (same arguments, equally seeded generators) to 1e-5 relative in fp32, with
true CFG (a negative prompt, both branches batched in one transformer call and blended in the
step), the guidance embedding, dynamic shifting, several images per prompt, a step-end callback
and an interrupt, decoded output; and the fused steps are counted."""

from __future__ import annotations

import pytest
import torch

from tests.samplers._harness import rel_err

from ._accel import recording_callback, stock_and_accelerated

diffusers = pytest.importorskip("diffusers")
import fastdiff.diffusers as fdd  # noqa: E402

from . import _tiny  # noqa: E402

TOL = 1e-5
STEPS = 4


def _pipe(guidance_embeds: bool = False):
    pipe = _tiny.flux(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5,
                                                                max_shift=1.15))
    if guidance_embeds:
        torch.manual_seed(1)
        tr = pipe.transformer
        pipe.transformer = diffusers.FluxTransformer2DModel(**{**tr.config, "guidance_embeds": True}).eval()
    return pipe


def _embeds(batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, 6, 32, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 32, generator=g))


def _negative(batch: int = 1):
    e = _embeds(batch, seed=9)
    return dict(negative_prompt_embeds=e["prompt_embeds"], negative_pooled_prompt_embeds=e["pooled_prompt_embeds"])


@pytest.mark.parametrize("case", ["true_cfg", "no_cfg", "guidance_embeds", "two_images", "decoded"])
def test_flux_matches_stock(case):
    pipe = _pipe(guidance_embeds=case == "guidance_embeds")
    kw = dict(height=8, width=8, num_inference_steps=STEPS, output_type="latent", **_embeds())
    if case != "no_cfg":
        kw.update(true_cfg_scale=4.0, **_negative())
    if case == "two_images":
        kw.update(_embeds(2), **_negative(2), num_images_per_prompt=1)
    if case == "decoded":
        kw["output_type"] = "pt"
    if case == "guidance_embeds":
        kw["guidance_scale"] = 5.0
    stock, ours, n = stock_and_accelerated(pipe, **kw)
    assert n >= STEPS
    assert stock.shape == ours.shape
    assert rel_err(ours, stock) <= TOL, f"{case}: {rel_err(ours, stock):.3g}"


def test_flux_callback_and_interrupt_as_stock():
    pipe = _pipe()
    seen = {}
    stock, ours, _ = stock_and_accelerated(pipe, seed=1, callback=recording_callback(seen, 1, lambda x: x * 0.9),
                                           height=8, width=8, num_inference_steps=STEPS, output_type="latent",
                                           true_cfg_scale=3.0, **_embeds(), **_negative())
    assert [s[:2] for s in seen[True]] == [s[:2] for s in seen[False]] and len(seen[True]) == 2
    for a, b in zip(seen[True], seen[False]):
        assert rel_err(a[2], b[2]) <= TOL
    assert rel_err(ours, stock) <= TOL


def test_flux_refuses_what_it_does_not_run():
    pipe = fdd.accelerate(_pipe())
    with pytest.raises(TypeError, match="ip_adapter_image"):
        pipe(height=8, width=8, num_inference_steps=2, output_type="latent", ip_adapter_image=torch.zeros(1, 3, 8, 8),
             **_embeds())
    with pytest.raises(ValueError, match="num_images_per_prompt=2"):  # stock's transformer fails on this batch
        pipe(height=8, width=8, num_inference_steps=2, output_type="latent", num_images_per_prompt=2, **_embeds())
