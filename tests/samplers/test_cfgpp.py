"""CFG++ samplers (``euler_cfg_pp``, ``euler_ancestral_cfg_pp``) against their published update
(Chung et al. 2024, as ComfyUI's ``sample_euler_cfg_pp`` / ``sample_euler_ancestral_cfg_pp`` write
it): ``x' = d + s' (x - d_u) / s (+ s_noise sigma_up z)``, ``d`` the guided data estimate and
``d_u`` the unconditional one, run as a hand-written loop with the same model, noise and plan grid."""

from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.samplers._common import ancestral_step
from tests.samplers._harness import SHAPE, rel_err, toy_model

CFG = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _setup(dtype):
    f = toy_model(3, SHAPE)

    def model(u, t, cond):
        return f(u, t) + 0.2 * cond

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(SHAPE, generator=g).to(dtype)
    cond = torch.randn(SHAPE, generator=g).to(dtype)
    return model, noise, cond, torch.zeros(SHAPE, dtype=dtype)


def _formula(name, plan, model, noise, cond, uncond, w, prediction, eta=1.0, s_noise=1.0, generator=None):
    x = noise * plan.init_scale
    old_du = None
    sig = [r.sigma for r in plan.rows] + [0.0]
    for i, r in enumerate(plan.rows):
        u = x * r.in_scale
        t = torch.full((x.shape[0],), r.t, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        eu, ec = model(u, t, uncond), model(u, t, cond)
        eg = eu + w * (ec - eu)
        du, dg = r.a_x * x + r.a_e * eu, r.a_x * x + r.a_e * eg
        s, s1 = sig[i], sig[i + 1]
        if name == "euler_cfg_pp":
            x = dg + (s1 / s) * (x - du)
        elif name == "dpmpp_2m_cfg_pp":  # ComfyUI's sample_dpmpp_2m_cfg_pp, t = -log sigma
            eh = s1 / s
            if i == 0 or s1 == 0:
                mix = -eh * du
            else:
                h, h_last = math.log(s / s1), math.log(sig[i - 1] / s)
                mix = -eh * du - math.expm1(-h) * (1 / (2 * (h_last / h))) * (dg - old_du)
            x = dg + mix + eh * x
            old_du = du
        else:
            down, up = ancestral_step(s, s1, eta)
            z = torch.randn(x.shape, generator=generator).to(x.dtype)
            x = dg + (down / s) * (x - du) + s_noise * up * z
    return x


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("w", [0.6, 1.5, 4.0])
def test_euler_cfg_pp_matches_its_update(w, dtype, backend):
    model, noise, cond, uncond = _setup(dtype)
    for prediction in ("eps", "v"):
        cfg = dict(CFG, prediction_type="epsilon" if prediction == "eps" else "v_prediction")
        plan = fastdiff.make_plan("euler_cfg_pp", 9, schedule=cfg)
        got = fastdiff.sample(model, noise, sampler="euler_cfg_pp", steps=9, schedule=cfg, guidance_scale=w,
                              cond=cond, uncond=uncond, backend=backend, seed=1)
        ref = _formula("euler_cfg_pp", plan, model, noise, cond, uncond, w, prediction)
        # the step's guidance scale is float32 by contract (w), also for a float64 state: the folded
        # CFG++ scale w s / (s - s') carries its float32 rounding (~6e-8) into a float64 run
        tol = 1e-7 if dtype == torch.float64 else 1e-5
        assert rel_err(got, ref) <= tol, (prediction, rel_err(got, ref))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("eta,s_noise", [(1.0, 1.0), (0.5, 0.9)])
def test_euler_ancestral_cfg_pp_matches_its_update(eta, s_noise, backend):
    model, noise, cond, uncond = _setup(torch.float32)
    plan = fastdiff.make_plan("euler_ancestral_cfg_pp", 8, schedule=CFG, eta=eta, s_noise=s_noise)
    got = fastdiff.sample(model, noise, sampler="euler_ancestral_cfg_pp", steps=8, schedule=CFG, guidance_scale=2.0,
                          cond=cond, uncond=uncond, backend=backend, generator=torch.Generator().manual_seed(4),
                          eta=eta, s_noise=s_noise)
    ref = _formula("euler_ancestral_cfg_pp", plan, model, noise, cond, uncond, 2.0, "eps", eta, s_noise,
                   generator=torch.Generator().manual_seed(4))
    assert rel_err(got, ref) <= 1e-5


def test_without_guidance_cfg_pp_is_the_base_sampler():
    model, noise, cond, uncond = _setup(torch.float32)
    for name, base in (("euler_cfg_pp", "euler"), ("euler_ancestral_cfg_pp", "euler_ancestral")):
        a = fastdiff.sample(model, noise, sampler=name, steps=6, schedule=CFG, cond=cond, seed=3, backend="reference")
        b = fastdiff.sample(model, noise, sampler=base, steps=6, schedule=CFG, cond=cond, seed=3, backend="reference")
        assert torch.equal(a, b), name


def test_cfg_pp_refuses_what_it_cannot_fold():
    model, noise, cond, uncond = _setup(torch.float32)
    with pytest.raises(ValueError, match="guidance_rescale"):
        fastdiff.sample(model, noise, sampler="euler_cfg_pp", steps=4, schedule=CFG, guidance_scale=2.0,
                        guidance_rescale=0.5, cond=cond, uncond=uncond)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("w", [0.6, 1.8])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpmpp_2m_cfg_pp_matches_its_update(w, prediction, backend):
    model, noise, cond, uncond = _setup(torch.float32)
    cfg = dict(CFG, prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    plan = fastdiff.make_plan("dpmpp_2m_cfg_pp", 10, schedule=cfg)
    got = fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=10, schedule=cfg, guidance_scale=w,
                          cond=cond, uncond=uncond, backend=backend, seed=1)
    ref = _formula("dpmpp_2m_cfg_pp", plan, model, noise, cond, uncond, w, prediction)
    assert rel_err(got, ref) <= 1e-5


def test_dpmpp_2m_cfg_pp_without_guidance_and_with_a_guider():
    model, noise, cond, uncond = _setup(torch.float32)
    plan = fastdiff.make_plan("dpmpp_2m_cfg_pp", 8, schedule=CFG)
    a = fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=8, schedule=CFG, cond=cond, seed=3,
                        backend="cpu")
    ref = _formula("dpmpp_2m_cfg_pp", plan, model, noise, cond, cond, 1.0, "eps")  # d_u = d without guidance
    assert rel_err(a, ref) <= 1e-5
    b = fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=8, schedule=CFG, cond=cond, uncond=uncond,
                        guidance_scale=1.5, seed=3, backend="cpu")
    c = fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=8, schedule=CFG, cond=cond, uncond=uncond,
                        guidance=fastdiff.guiders.Guider(scale=1.5), seed=3, backend="cpu")
    assert torch.equal(b, c)
    with pytest.raises(ValueError, match="momentum"):
        fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=4, schedule=CFG, cond=cond, uncond=uncond,
                        guidance=fastdiff.guiders.APG(scale=2.0, momentum=-0.5))


def test_euler_cfg_pp_with_a_guider_equals_guidance_scale():
    model, noise, cond, uncond = _setup(torch.float32)
    kw = dict(sampler="euler_cfg_pp", steps=6, schedule=CFG, cond=cond, uncond=uncond, seed=2, backend="cpu")
    a = fastdiff.sample(model, noise, guidance_scale=1.7, **kw)
    b = fastdiff.sample(model, noise, guidance=fastdiff.guiders.Guider(scale=1.7), **kw)
    assert rel_err(b, a) <= 1e-6


def test_dpmpp_2m_cfg_pp_plan_routes_and_refusals_name_the_sampler():
    model, noise, cond, uncond = _setup(torch.float32)
    plan = fastdiff.make_plan("dpmpp_2m_cfg_pp", 5, schedule=CFG)
    a = fastdiff.sample(model, noise, plan=plan, guidance_scale=1.5, cond=cond, uncond=uncond, seed=3, backend="cpu")
    b = fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=5, schedule=CFG, guidance_scale=1.5, cond=cond,
                        uncond=uncond, seed=3, backend="cpu")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dpmpp_2m_cfg_pp .*does not combine with callback"):
        fastdiff.sample(model, noise, sampler="dpmpp_2m_cfg_pp", steps=5, schedule=CFG, guidance_scale=1.5,
                        cond=cond, uncond=uncond, callback=lambda *a: None)
