"""``fastdiff.guiders.perturbed_model``: a diffusers guider's perturbed branch (SLG, AutoGuidance)
on a tiny DiT, against the same guider applying its own hooks for its perturbed batch (diffusers'
``prepare_models`` / ``cleanup_models`` sequence), and the whole guided loop with it against the stock
loop that evaluates the perturbed batch the same way."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import fastdiff
from tests._optional import diffusers
from tests.samplers._harness import rel_err


def _dit(seed: int = 0):
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=8, out_channels=4).eval()


def _guider(name: str):
    """The guiders with explicit hook configurations: diffusers 0.42 builds SLG's, SEG's and
    AutoGuidance's from ``*_layers=[k]`` with an int ``indices`` that its own hook then cannot take,
    and skipping a whole SD3 block swaps its two outputs; the feed-forward skip works on this DiT."""
    g = diffusers.guiders
    from diffusers.hooks import LayerSkipConfig
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceConfig

    ff = LayerSkipConfig([1], fqn="auto", skip_attention=False, skip_ff=True)  # skip block 1's feed-forward
    if name == "SkipLayerGuidance":
        return g.SkipLayerGuidance(guidance_scale=4.0, skip_layer_guidance_scale=2.0, skip_layer_guidance_start=0.0,
                                   skip_layer_guidance_stop=1.0, skip_layer_config=ff)
    if name == "PerturbedAttentionGuidance":
        return g.PerturbedAttentionGuidance(guidance_scale=4.0, perturbed_guidance_scale=2.0,
                                            perturbed_guidance_start=0.0, perturbed_guidance_stop=1.0,
                                            perturbed_guidance_layers=[0])
    if name == "SmoothedEnergyGuidance":
        return g.SmoothedEnergyGuidance(guidance_scale=4.0, seg_guidance_scale=2.0, seg_blur_sigma=2.0,
                                        seg_guidance_config=SmoothedEnergyGuidanceConfig([0], fqn="auto"))
    return g.AutoGuidance(guidance_scale=3.0, auto_guidance_config=ff)


NAMES = ["SkipLayerGuidance", "AutoGuidance"]
"""(On this SD3-style DiT, diffusers' own PAG hook refuses its joint attention processor and its SEG hook
changes nothing, so those two are not compared here; perturbed_model applies their hooks the same way.)"""


def _call(dit, cond):
    def model(u, t, c=None):
        emb, pooled = c if c is not None else cond
        return dit(hidden_states=u, encoder_hidden_states=emb, pooled_projections=pooled, timestep=t).sample
    return model


def _stock_perturbed(guider, dit, x, t, cond, step, steps):
    """The perturbed batch as diffusers' guider runs it: prepare_models before it (the earlier
    batches counted), the call, cleanup_models after it."""
    guider.set_state(step, steps, t)
    batches = 3 if type(guider).__name__ != "AutoGuidance" else 2
    for k in range(batches):
        guider.prepare_models(dit)
        if k == batches - 1 or (type(guider).__name__ == "AutoGuidance" and k == 1):
            out = _call(dit, cond)(x, t)
        guider.cleanup_models(dit)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_perturbed_branch_matches_the_guiders_own_hooks(name):
    dit = _dit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = (torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g))
    t = torch.full((2,), 500.0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        guider = _guider(name)
        plain = _call(dit, cond)(x, t)
        ref = _stock_perturbed(copy.deepcopy(guider), dit, x, t, cond, 1, 4)
        ours = fastdiff.guiders.perturbed_model(guider, dit, _call(dit, cond))(x, t)
        after = _call(dit, cond)(x, t)
    assert rel_err(ref, plain) > 1e-3, "the perturbation changes the output"
    assert torch.equal(ours, ref)
    assert torch.equal(after, plain), "the hooks are removed after the call"


def test_perturbed_model_refuses_a_guider_without_a_perturbed_branch():
    with pytest.raises(TypeError, match="no perturbed branch"):
        fastdiff.guiders.perturbed_model(diffusers.guiders.ClassifierFreeGuidance(), _dit())


def test_skip_layer_guidance_loop_with_the_guiders_hooks_matches_stock():
    dit = _dit(2)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 4, 8, 8, generator=g)
    cond = (torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g))
    uncond = (torch.zeros(1, 5, 16), torch.zeros(1, 8))
    steps = 4
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        guider = _guider("SkipLayerGuidance")
        sched = diffusers.FlowMatchEulerDiscreteScheduler()
        stock, sg = copy.deepcopy(sched), copy.deepcopy(guider)
        stock.set_timesteps(steps)
        x = noise.clone()
        for i, t in enumerate(stock.timesteps):
            tt = t.expand(1)
            c, u = _call(dit, cond)(x, tt), _call(dit, uncond)(x, tt)
            p = _stock_perturbed(sg, dit, x, tt, cond, i, steps)
            sg.set_state(i, steps, t)
            x = stock.step(sg.forward(c, u, p).pred, t, x).prev_sample

        def model(u, t, emb, pooled):
            return _call(dit, (emb, pooled))(u, t)

        got = fastdiff.sample(model, noise, sampler="flow_euler", steps=steps, schedule=sched.config, guidance=guider,
                              cond={"emb": cond[0], "pooled": cond[1]}, uncond={"emb": uncond[0], "pooled": uncond[1]},
                              perturbed_model=fastdiff.guiders.perturbed_model(guider, dit, model), backend="cpu",
                              seed=0)
    assert rel_err(got, x) <= 1e-5
