"""Whole sampling loops: ``fastdiff.sample`` with the built-in Gaussian mixture and with a tiny UNet.

The Gaussian-mixture model is the default model of ``fastdiff bench`` (exact for its schedule, cheap,
so the loop's own cost shows); the tiny UNet is the offline ``UNet2DConditionModel`` of
:mod:`fastdiff.bench.pipeline` under classifier-free guidance (a real model call per step, batched
``[uncond; cond]``). Grouped per model and sampler so the backends sit side by side.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import make_plan, sample, samplers
from fastdiff.bench.step import schedule_for
from fastdiff.models import GaussianMixture
from fastdiff.core.schedules import from_config, is_schedule

from .conftest import LOOP_SHAPE, LOOP_STEPS, UNET_LATENT, UNET_SAMPLERS, UNET_STEPS, need_backend

CPU_BACKENDS = ["reference", "cpu"]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sampler", samplers.available())
def test_loop_gmm(bench, sampler, backend):
    need_backend(backend)
    sched = schedule_for(sampler)
    plan = make_plan(sampler, LOOP_STEPS, sched)
    gm = GaussianMixture.default(LOOP_SHAPE[1:], components=4)
    schedule = sched if is_schedule(sched) else from_config(sched)
    model = gm.model(schedule.alpha_sigma, plan.prediction, times=[r.t for r in plan.rows])
    noise = torch.randn(LOOP_SHAPE, generator=torch.Generator().manual_seed(0))
    out = bench(lambda: sample(model, noise, plan=plan, seed=0, backend=backend),
                group=f"loop gmm {sampler} {'x'.join(map(str, LOOP_SHAPE))}", sampler=sampler, backend=backend,
                shape=list(LOOP_SHAPE), steps=LOOP_STEPS, rows=len(plan.rows))
    assert torch.isfinite(out).all()


@pytest.fixture(scope="module")
def tiny_unet():
    pytest.importorskip("diffusers")
    from fastdiff.bench.pipeline import tiny_unet as build
    from fastdiff.models.denoisers import from_diffusers

    return from_diffusers(build(sample_size=UNET_LATENT))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("sampler", UNET_SAMPLERS)
def test_loop_tiny_unet(bench, tiny_unet, sampler, backend):
    need_backend(backend)
    plan = make_plan(sampler, UNET_STEPS, schedule_for(sampler))
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, UNET_LATENT, UNET_LATENT)
    noise = torch.randn(shape, generator=g)
    cond, uncond = torch.randn(2, 1, 16, 32, generator=g)  # text-encoder states [B, tokens, 32]

    def run():
        with torch.no_grad():
            return sample(tiny_unet, noise, plan=plan, seed=0, backend=backend, guidance_scale=7.5, cond=cond,
                          uncond=uncond)

    out = bench(run, group=f"loop tiny-unet {sampler} {'x'.join(map(str, shape))}", sampler=sampler,
                backend=backend, shape=list(shape), steps=UNET_STEPS, guidance_scale=7.5)
    assert torch.isfinite(out).all()
