"""fastdiff.diffusers.accelerate on a tiny WanPipeline built offline (random weights): the accelerated
call equals the stock one (same arguments, equally seeded generators) to 1e-5 relative in fp32, with
CFG (the two branches batched in one transformer call and blended in the step), without it, and as
Wan 2.2 with two experts (``boundary_ratio``: ``transformer`` and ``guidance_scale`` at and above the
boundary timestep, ``transformer_2`` and ``guidance_scale_2`` below), with a step-end callback; the
fused steps are counted."""

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


def _pipe(two_experts: bool = False, scheduler=None):
    sched = scheduler or diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                           flow_shift=3.0)
    pipe = _tiny.wan(sched)
    if two_experts:
        pipe.register_modules(transformer_2=_tiny.wan_transformer(seed=7))
        pipe.register_to_config(boundary_ratio=0.6)
    return pipe


def _embeds(batch=1):
    g = torch.Generator().manual_seed(2)
    return dict(prompt_embeds=torch.randn(batch, 5, 32, generator=g),
                negative_prompt_embeds=torch.randn(batch, 5, 32, generator=g))


@pytest.mark.parametrize("case", ["cfg", "no_cfg", "two_experts", "two_experts_scale_2", "euler", "two_videos"])
def test_wan_matches_stock(case):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0) if case == "euler" else None
    pipe = _pipe(two_experts=case.startswith("two_experts"), scheduler=sched)
    kw = dict(height=16, width=16, num_frames=5, num_inference_steps=STEPS, output_type="latent", guidance_scale=5.0,
              **_embeds(2 if case == "two_videos" else 1))
    if case == "no_cfg":
        kw["guidance_scale"] = 1.0
    if case == "two_experts_scale_2":
        kw["guidance_scale_2"] = 2.0
    stock, ours, n = stock_and_accelerated(pipe, "frames", seed=4, **kw)
    assert n >= STEPS
    assert stock.shape == ours.shape
    assert rel_err(ours, stock) <= TOL, f"{case}: {rel_err(ours, stock):.3g}"


def test_wan_callback_as_stock():
    seen = {}
    stock, ours, _ = stock_and_accelerated(_pipe(two_experts=True), "frames", seed=1,
                                           callback=recording_callback(seen, change=lambda x: x + 0.01), height=16,
                                           width=16, num_frames=5, num_inference_steps=STEPS, output_type="latent",
                                           guidance_scale=4.0, guidance_scale_2=1.5, **_embeds())
    assert [s[:2] for s in seen[True]] == [s[:2] for s in seen[False]] and len(seen[True]) == STEPS
    for a, b in zip(seen[True], seen[False]):
        assert rel_err(a[2], b[2]) <= TOL
    assert rel_err(ours, stock) <= TOL


def test_wan_refuses_what_it_does_not_run():
    pipe = fdd.accelerate(_pipe())
    with pytest.raises(TypeError, match="callback_on_step_end_tensor_inputs"):
        pipe(height=16, width=16, num_frames=5, num_inference_steps=2, output_type="latent",
             callback_on_step_end=lambda p, i, t, k: k, callback_on_step_end_tensor_inputs=["prompt_embeds"],
             **_embeds())
