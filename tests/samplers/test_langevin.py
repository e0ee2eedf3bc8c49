"""Langevin dynamics (``sgld``, ``annealed_langevin``): the stationary law on a known Gaussian,
annealed Langevin on a Gaussian mixture, the plan's step sizes, and fused == reference."""

import math

import pytest
import torch

from fastdiff import ops, samplers, schedules
from fastdiff.loop import LoopOptions, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.plan import OP_E, OP_X, OP_Z

from ._harness import assert_close_traj, initial_noise, ours


@pytest.mark.parametrize("kind, pred", [("ve", "score"), ("ve", "x0"), ("ve", "eps"), ("vp", "eps"), ("vp", "v")])
def test_sgld_reaches_the_noisy_gaussian(kind, pred, seed):
    """Data ``N(mu, s^2)``: at noise level sigma the model input ``u = alpha x0 + sigma_t eps`` has law
    ``N(alpha mu, V)``, ``V = alpha^2 s^2 + sigma_t^2``, and Langevin dynamics with the exact score
    (from a score model or derived from a denoiser) targets it. With step ``a`` the chain
    ``u' - m = (1 - a/(2V)) (u - m) + sqrt(a) z`` is stationary at ``N(m, V / (1 - a/(4V)))``:
    checked to 5 standard errors over 65536 independent chains, and the continuous law within that
    O(a) bias."""
    g = torch.Generator().manual_seed(seed)
    D, B, s = 16, 4096, 0.5
    mu = torch.randn(1, D, generator=g, dtype=torch.float64)
    gm = GaussianMixture(mu, [s])
    sch = schedules.VESchedule(sigma_min=0.01, sigma_max=10.0) if kind == "ve" else schedules.from_config({})
    sigma = 0.5
    alpha = 1.0 if kind == "ve" else 1 / math.sqrt(1 + sigma**2)
    V = alpha**2 * s**2 + (sigma * alpha) ** 2
    a = 0.1 * V
    steps = 300  # contraction (1 - a/(2V))^300 = 0.95^300 = 2e-7
    plan = samplers.build("sgld", sch, steps, prediction=pred, sigma=sigma, step_size=a)
    assert plan.meta["step_size"] == a and len(plan.rows) == steps
    f = gm.model(sch.alpha_sigma, pred, times=[plan.rows[0].t])
    x = torch.randn(B, D, generator=g) * plan.init_scale
    out = run_plan(plan, f, x, LoopOptions(seeds=torch.arange(B) + seed)).double()
    dev = out - alpha * mu
    n = B * D
    mean, var = float(dev.mean()), float((dev**2).mean())
    v_disc = V / (1 - a / (4 * V))
    assert abs(mean) < 5 * math.sqrt(v_disc / n), (mean, v_disc)
    se = v_disc * math.sqrt(2 / n)
    assert abs(var - v_disc) < 5 * se, (var, v_disc, se)
    assert abs(var - V) < (v_disc - V) + 5 * se, (var, V)


def test_annealed_langevin_plan_follows_ncsn():
    sch = schedules.VESchedule(sigma_min=0.01, sigma_max=1.0, sigma_grid="exponential")
    plan = samplers.build("annealed_langevin", sch, 10, n_steps_each=7, step_lr=2e-5)
    assert len(plan.rows) == 10 * 7 + 1 and plan.steps == 10 and plan.init_scale == 1.0
    sig = [float(v) for v in sch.discretize(10).sigmas[:10]]
    for r in plan.rows[:-1]:
        si = sig[r.step]
        a = 2e-5 * si**2 / sig[-1] ** 2  # Song & Ermon's alpha_i = eps sigma_i^2 / sigma_L^2
        assert r.noise and r.t == si and r.out[OP_Z] == pytest.approx(math.sqrt(a), rel=1e-12)
        assert r.out[OP_X] == 1.0 and r.out[OP_E] == pytest.approx(a / 2, rel=1e-12)  # score model: x + a/2 g
    last = plan.rows[-1]  # the final denoising: Tweedie's E[x0 | x] at the last level
    assert not last.noise and last.sigma == sig[-1] and last.out[1] == 1.0 and sum(map(abs, last.out)) == 1.0
    no_denoise = samplers.build("annealed_langevin", sch, 10, n_steps_each=7, step_lr=2e-5, denoise=False)
    assert no_denoise.rows == plan.rows[:-1]
    default = samplers.build("annealed_langevin", sch, 10, n_steps_each=7)
    assert default.rows[-2].out[OP_Z] == pytest.approx(math.sqrt(0.2) * sig[-1], rel=1e-12)


@pytest.mark.parametrize("pred", ["score", "x0"])
def test_annealed_langevin_samples_the_gaussian_mixture(pred, seed):
    """The 2-D ring of 8 blobs (radius 2, std 0.3): second moment 2.09 I, each blob's share 1/8 and
    the spread around it, within 5 standard errors of 4000 samples (plus a few % of step-size bias
    in the spread)."""
    gm = GaussianMixture.default((2,))
    sch = schedules.VESchedule(sigma_min=0.01, sigma_max=10.0, sigma_grid="exponential")
    plan = samplers.build("annealed_langevin", sch, 10, prediction=pred, n_steps_each=30, step_lr=2e-4)
    f = gm.model(sch.alpha_sigma, pred, times=[r.t for r in plan.rows])
    B = 4000
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(seed)) * plan.init_scale
    out = run_plan(plan, f, x, LoopOptions(seeds=torch.arange(B) + seed)).double()
    assert out.mean(0).abs().max() < 5 * math.sqrt(2.09 / B)
    second = out.T @ out / B
    assert torch.allclose(second, 2.09 * torch.eye(2, dtype=torch.float64), atol=0.1), second
    k = (torch.atan2(out[:, 1], out[:, 0]) / (2 * math.pi / 8)).round().remainder(8).long()
    share = torch.bincount(k, minlength=8).double() / B
    assert share.min() > 0.125 - 0.027 and share.max() < 0.125 + 0.027, share
    spread = (out - gm.means[k]).std(0)
    assert ((spread > 0.285) & (spread < 0.33)).all(), spread


@pytest.mark.parametrize("name, kind, pred, opts", [
    ("annealed_langevin", "ve", "score", {"n_steps_each": 3}),
    ("annealed_langevin", "vp", "x0", {"n_steps_each": 2}),
    ("sgld", "ve", "eps", {"sigma": 0.4, "step_size": 0.02}),
    ("sgld", "vp", "v", {}),
])
@pytest.mark.parametrize("noise", ["seeds", "generator"])
def test_fused_cpu_equals_reference(name, kind, pred, opts, noise, seed):
    ok, why = ops.backend_status("cpu")
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")
    sch = schedules.VESchedule(sigma_min=0.05, sigma_max=5.0) if kind == "ve" else schedules.from_config({})
    plan = samplers.build(name, sch, 6, prediction=pred, **opts)
    gm = GaussianMixture.default((3, 4, 5), components=3, seed=seed % 1000)
    f = gm.model(sch.alpha_sigma, pred)
    x = initial_noise(seed, plan.init_scale, (2, 3, 4, 5))
    kw = lambda: {"seeds": [seed, seed + 3]} if noise == "seeds" else {"generator": torch.Generator().manual_seed(seed)}
    ref = ours(plan, f, x, backend="reference", **kw())
    got = ours(plan, f, x, backend="cpu", **kw())
    assert_close_traj(got, ref, 1e-5, what=f"{name} {kind} {pred} cpu vs reference")


def test_sgld_defaults():
    ve = schedules.VESchedule(sigma_min=0.02, sigma_max=10.0)
    plan = samplers.build("sgld", ve, 4)
    r = plan.rows[0]
    assert r.t == r.sigma == 0.02 and plan.meta["step_size"] == pytest.approx(0.1 * 0.02**2)
    assert plan.init_scale == pytest.approx(math.sqrt(1 + 0.02**2))
    vp = schedules.from_config({})
    r = samplers.build("sgld", vp, 4, prediction="eps").rows[0]
    assert r.sigma == float(vp.train_sigmas[0]) and r.t == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("call, match", [
    (lambda: samplers.build("sgld", None, 5, step_size=0.0), "step_size"),
    (lambda: samplers.build("sgld", None, 5, sigma=-1.0), "sigma"),
    (lambda: samplers.build("sgld", None, 5, sigma=math.inf), "sigma"),
    (lambda: samplers.build("annealed_langevin", None, 5, n_steps_each=0), "n_steps_each"),
    (lambda: samplers.build("annealed_langevin", None, 5, step_lr=-1e-5), "step_lr"),
    (lambda: samplers.build("annealed_langevin", schedules.FlowSchedule(), 5), "flow schedule"),
])
def test_errors_name_the_bad_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
