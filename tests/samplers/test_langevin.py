"""Langevin dynamics (``sgld``, ``annealed_langevin``): the plans (NCSN's ladder and steps, sgld's
defaults), annealed Langevin on a Gaussian mixture, and fused == reference. Exact laws on Gaussians
and sliced W2 on the ring: ``test_langevin_exact.py``."""

import math

import pytest
import torch

from fastdiff.runtime import ops
from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.core.plan import OP_E, OP_X, OP_Z

from ._harness import assert_close_traj, initial_noise, ours


def test_annealed_langevin_plan_follows_ncsn():
    sch = schedules.VESchedule(sigma_min=0.01, sigma_max=1.0, sigma_grid="exponential")
    plan = samplers.build("annealed_langevin", sch, 10, n_steps_each=7, step_lr=2e-5)
    # N(0, 1 + sigma_1^2): unit-scale data under the first level's noise (was sigma_max = 1 before the ladder rework)
    assert len(plan.rows) == 10 * 7 + 1 and plan.steps == 10 and plan.init_scale == pytest.approx(math.sqrt(2))
    sig = [float(v) for v in sch.discretize(10).sigmas[:10]]  # an exponential VE grid is NCSN's ladder
    assert plan.meta["sigmas"] == pytest.approx(sig, rel=1e-12)
    for r in plan.rows[:-1]:
        si = sig[r.step]
        a = 2e-5 * si**2 / sig[-1] ** 2  # Song & Ermon's alpha_i = eps sigma_i^2 / sigma_L^2
        assert r.noise and r.t == pytest.approx(si, rel=1e-12) and r.out[OP_Z] == pytest.approx(math.sqrt(a), rel=1e-12)
        assert r.out[OP_X] == 1.0 and r.out[OP_E] == pytest.approx(a / 2, rel=1e-12)  # score model: x + a/2 g
    last = plan.rows[-1]  # the final denoising: Tweedie's E[x0 | x] at the last level
    assert not last.noise and last.sigma == pytest.approx(sig[-1])
    assert last.out[1] == 1.0 and sum(map(abs, last.out)) == 1.0
    no_denoise = samplers.build("annealed_langevin", sch, 10, n_steps_each=7, step_lr=2e-5, denoise=False)
    assert no_denoise.rows == plan.rows[:-1]
    default = samplers.build("annealed_langevin", sch, 10, n_steps_each=7)
    assert default.rows[-2].out[OP_Z] == pytest.approx(math.sqrt(0.2) * sig[-1], rel=1e-12)


def test_annealed_langevin_ladder_is_geometric_on_any_schedule():
    """NCSN's geometric ladder whatever the schedule's own grid (a Karras VE grid; a VP schedule's
    timestep grid, whose last jump at 20 steps was 0.18 -> 0.01): on VP from the last training step's
    sigma (157) to the first's (0.01), the model queried at the timestep of each sigma, seeing
    ``x / sqrt(1 + sigma^2)``."""
    karras = schedules.VESchedule(sigma_min=0.002, sigma_max=80.0)
    sig = samplers.build("annealed_langevin", karras, 20, n_steps_each=1, denoise=False).meta["sigmas"]
    assert sig == pytest.approx([80.0 * (0.002 / 80.0) ** (i / 19) for i in range(20)], rel=1e-12)
    vp = schedules.from_config({})
    plan = samplers.build("annealed_langevin", vp, 20, prediction="eps", n_steps_each=2)
    sig = plan.meta["sigmas"]
    assert sig[0] == float(vp.train_sigmas[-1]) and sig[-1] == pytest.approx(float(vp.train_sigmas[0]), rel=1e-12)
    ratios = [a / b for a, b in zip(sig, sig[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    for r in plan.rows:
        s = sig[r.step]
        assert r.sigma == s and r.t == pytest.approx(float(vp.sigma_to_t(s)), abs=1e-9)
        assert r.in_scale == pytest.approx(1 / math.sqrt(1 + s * s), rel=1e-12)
        a, sd = vp.alpha_sigma(r.t)
        assert sd / a == pytest.approx(s, rel=1e-6)  # the model's noise level is the ladder's
    assert plan.rows[0].t == pytest.approx(999.0) and plan.rows[-1].t == pytest.approx(0.0, abs=1e-9)
    assert plan.init_scale == pytest.approx(math.sqrt(1 + sig[0] ** 2))
    short = samplers.build("annealed_langevin", vp, 5, sigma_max=2.0, sigma_min=0.05).meta["sigmas"]
    assert short[0] == 2.0 and short[-1] == pytest.approx(0.05, rel=1e-12)


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
    """sigma and the step from the number of steps: a = sigma^2, sigma^2 = 6 / (steps - 6), within the
    schedule's range (the old default, the schedule's smallest sigma with a = 0.1 sigma^2, left 200
    steps 0.992 correlated with the initial noise); then Tweedie's E[x0 | x]."""
    vp = schedules.from_config({})
    for steps, sigma in [(30, 0.5), (200, math.sqrt(6 / 194)), (1000, math.sqrt(6 / 994))]:
        plan = samplers.build("sgld", vp, steps, prediction="eps")
        r = plan.rows[0]
        assert plan.meta["sigma"] == pytest.approx(sigma, rel=1e-12) and r.sigma == plan.meta["sigma"]
        assert plan.meta["step_size"] == pytest.approx(sigma**2, rel=1e-12)
        assert r.t == pytest.approx(float(vp.sigma_to_t(sigma)))
        assert r.in_scale == pytest.approx(1 / math.sqrt(1 + sigma**2))
        assert plan.init_scale == pytest.approx(math.sqrt(1 + sigma**2))
        assert len(plan.rows) == steps + 1 and plan.rows[-1].out[1] == 1.0 and not plan.rows[-1].noise
    ve = schedules.VESchedule(sigma_min=0.02, sigma_max=10.0)
    assert samplers.build("sgld", ve, 6).meta["sigma"] == 10.0  # no noise level mixes in 6 steps: the prior's
    assert samplers.build("sgld", ve.replace(sigma_min=0.3), 100).meta["sigma"] == 0.3  # not below the smallest
    assert samplers.build("sgld", ve, 30, sigma=0.3).meta["step_size"] == pytest.approx(0.09)
    assert len(samplers.build("sgld", ve, 30, denoise=False).rows) == 30


@pytest.mark.parametrize("call, match", [
    (lambda: samplers.build("sgld", None, 5, step_size=0.0), "step_size"),
    (lambda: samplers.build("sgld", None, 5, sigma=-1.0), "sigma"),
    (lambda: samplers.build("sgld", None, 5, sigma=math.inf), "sigma"),
    (lambda: samplers.build("annealed_langevin", None, 5, n_steps_each=0), "n_steps_each"),
    (lambda: samplers.build("annealed_langevin", None, 5, step_lr=-1e-5), "step_lr"),
    (lambda: samplers.build("annealed_langevin", schedules.FlowSchedule(), 5), "flow schedule"),
    (lambda: samplers.build("annealed_langevin", None, 5, sigma_min=0.0), "sigma_min"),
    (lambda: samplers.build("annealed_langevin", None, 5, sigma_max=math.inf), "sigma_max"),
    (lambda: samplers.build("annealed_langevin", None, 5, sigma_min=2.0, sigma_max=1.0), "sigma_min <= sigma_max"),
])
def test_errors_name_the_bad_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
