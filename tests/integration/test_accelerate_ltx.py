"""fastdiff.diffusers.accelerate on a tiny LTXPipeline built offline (random weights): the accelerated
call equals the stock one (same arguments, equally seeded generators) to 1e-5 relative in fp32, with
CFG (the stock loop's own batched ``[negative; positive]`` call, blended in the step), with
``guidance_rescale``, without CFG and with two videos; the fused steps are counted."""

from __future__ import annotations

import pytest
import torch

from tests.samplers._harness import rel_err

from ._accel import stock_and_accelerated

diffusers = pytest.importorskip("diffusers")

from . import _tiny  # noqa: E402

TOL = 1e-5
STEPS = 4


def _embeds(batch=1):
    g = torch.Generator().manual_seed(5)
    mask = torch.ones(batch, 6, dtype=torch.long)
    mask[:, 4:] = 0  # padded tokens: the attention mask matters
    return dict(prompt_embeds=torch.randn(batch, 6, 32, generator=g), prompt_attention_mask=mask,
                negative_prompt_embeds=torch.randn(batch, 6, 32, generator=g), negative_prompt_attention_mask=mask)


@pytest.mark.parametrize("case", ["cfg", "rescale", "no_cfg", "two_videos"])
def test_ltx_matches_stock(case):
    pipe = _tiny.ltx(diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True))
    kw = dict(height=64, width=64, num_frames=9, num_inference_steps=STEPS, output_type="latent", guidance_scale=4.0,
              **_embeds(2 if case == "two_videos" else 1))
    if case == "rescale":
        kw["guidance_rescale"] = 0.6
    if case == "no_cfg":
        kw["guidance_scale"] = 1.0
    stock, ours, n = stock_and_accelerated(pipe, "frames", seed=6, **kw)
    assert n >= STEPS
    assert stock.shape == ours.shape
    assert rel_err(ours, stock) <= TOL, f"{case}: {rel_err(ours, stock):.3g}"
