"""Score-SDE samplers (``sde_ve``, ``sde_vp``, ``pf_ode``, ``pc``): diffusers' ScoreSdeVeScheduler
parity given the same generator, fused == reference, order 1 of the probability-flow ODE, the
Langevin corrector's data-dependent step size, and distributions on a Gaussian mixture."""

import math

import pytest
import torch

from fastdiff.runtime import ops
from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.core.plan import Plan, Row, combo

from ._harness import assert_close_traj, gaussian_order, initial_noise, ours, rel_err, toy_model

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

SHAPE = (2, 3, 4, 5)


def _ve(sigma_max: float = 50.0, sigma_min: float = 0.01, grid: str = "exponential"):
    return schedules.VESchedule(sigma_min=sigma_min, sigma_max=sigma_max, sigma_grid=grid)


def _score_model(kind: str, sch, seed: int):
    """A score model: the exact score of a Gaussian mixture, or a nonlinear toy (any outputs)."""
    if kind == "toy":
        return toy_model(seed)
    gm = GaussianMixture.default(SHAPE[1:], components=4, seed=seed)
    return gm.model(sch.alpha_sigma, "score")


def diffusers_score_sde(scheduler, model, x: torch.Tensor, steps: int, generator) -> list[torch.Tensor]:
    """diffusers' ScoreSdeVePipeline loop: ``correct_steps`` x ``step_correct`` then ``step_pred``
    per level, the model called at ``scheduler.sigmas[i]``; the state after every step call, the
    last one ``prev_sample_mean`` (what the pipeline returns)."""
    scheduler.set_timesteps(steps)
    scheduler.set_sigmas(steps)
    traj = []
    for i, t in enumerate(scheduler.timesteps):
        sigma_t = scheduler.sigmas[i] * torch.ones(x.shape[0])
        for _ in range(scheduler.config.correct_steps):
            x = scheduler.step_correct(model(x, sigma_t), x, generator=generator).prev_sample
            traj.append(x.clone())
        out = scheduler.step_pred(model(x, sigma_t), t, x, generator=generator)
        x, mean = out.prev_sample, out.prev_sample_mean
        traj.append(x.clone())
    traj[-1] = mean
    return traj


@pytest.mark.parametrize("sigma_max, steps, correct_steps, snr, model", [
    (50.0, 20, 1, 0.15, "gmm"),
    (1348.0, 30, 2, 0.16, "gmm"),  # diffusers' default sigma_max
    (50.0, 12, 1, 0.15, "toy"),
    (50.0, 15, 0, 0.15, "gmm"),  # predictor only
])
def test_pc_matches_diffusers_score_sde_ve(sigma_max, steps, correct_steps, snr, model, seed):
    sch = diffusers.ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=sigma_max, snr=snr, correct_steps=correct_steps)
    ve = _ve(sigma_max)
    f = _score_model(model, ve, seed % 1000)
    plan = samplers.build("pc", ve, steps, snr=snr, correct_steps=correct_steps, sampling_eps=1e-5)
    assert plan.prediction == "score" and len(plan.rows) == steps * (1 + correct_steps)
    assert plan.init_scale == sch.init_noise_sigma
    x = initial_noise(seed, plan.init_scale, SHAPE)
    ref = diffusers_score_sde(sch, f, x.clone(), steps, torch.Generator().manual_seed(seed + 1))
    got = ours(plan, f, x, generator=torch.Generator().manual_seed(seed + 1))
    assert_close_traj(got, ref, 1e-5, what=f"pc sigma_max={sigma_max} C={correct_steps} seed={seed}")


def test_sde_ve_is_pc_without_corrector_and_matches_step_pred(seed):
    ve = _ve(1348.0)
    a = samplers.build("sde_ve", ve, 25, sampling_eps=1e-5)
    b = samplers.build("pc", ve, 25, correct_steps=0, sampling_eps=1e-5)
    assert a.rows == b.rows and a.init_scale == b.init_scale
    sch = diffusers.ScoreSdeVeScheduler(correct_steps=0)
    f = _score_model("gmm", ve, seed % 1000)
    x = initial_noise(seed, a.init_scale, SHAPE)
    ref = diffusers_score_sde(sch, f, x.clone(), 25, torch.Generator().manual_seed(seed))
    assert_close_traj(ours(a, f, x, generator=torch.Generator().manual_seed(seed)), ref, 1e-5, what="sde_ve")


def test_song_grid_mirrors_diffusers_indexing():
    # at 1001+ levels with sampling_eps=1e-3, diffusers' floor(t (N - 1)) skips a level: so do we
    sch = diffusers.ScoreSdeVeScheduler(sampling_eps=1e-3)
    sch.set_timesteps(1200)
    sch.set_sigmas(1200)
    plan = samplers.build("sde_ve", _ve(1348.0), 1200, sampling_eps=1e-3)
    idx = (sch.timesteps * (1200 - 1)).long()
    assert not torch.equal(idx, torch.arange(1199, -1, -1))  # the quirk is there
    for i in (0, 500, 1000, 1199):
        sig, adj = sch.discrete_sigmas[idx[i]], sch.discrete_sigmas[idx[i] - 1] if idx[i] > 0 else torch.tensor(0.0)
        diffusion = (sig**2 - adj**2) ** 0.5
        r = plan.rows[i]
        assert r.t == float(sch.sigmas[i]) and r.out[2] == float(diffusion**2)
        assert r.out[-1] == (float(diffusion) if i < 1199 else 0.0)  # the last step returns the mean


def _cpu_or_skip():
    ok, why = ops.backend_status("cpu")
    if not ok:
        pytest.skip(f"cpu backend unavailable: {why}")


@pytest.mark.parametrize("name, kind, pred, opts", [
    ("sde_ve", "ve", "score", {}),
    ("sde_vp", "vp", "eps", {}),
    ("pf_ode", "ve", "x0", {"sampling_eps": 1e-5}),
    ("pf_ode", "vp", "v", {}),
    ("pc", "ve", "score", {"correct_steps": 2}),
    ("pc", "ve", "x0", {"snr_norm": "sample"}),
    ("pc", "vp", "eps", {}),
])
@pytest.mark.parametrize("noise", ["seeds", "generator"])
def test_fused_cpu_equals_reference(name, kind, pred, opts, noise, seed):
    _cpu_or_skip()
    sch = _ve() if kind == "ve" else schedules.from_config({})
    plan = samplers.build(name, sch, 9, prediction=pred, **opts)
    gm = GaussianMixture.default(SHAPE[1:], components=3, seed=seed % 1000)
    f = gm.model(sch.alpha_sigma, pred)
    x = initial_noise(seed, plan.init_scale, SHAPE)
    kw = lambda: {"seeds": [seed, seed + 7]} if noise == "seeds" else {"generator": torch.Generator().manual_seed(seed)}
    ref = ours(plan, f, x, backend="reference", **kw())
    got = ours(plan, f, x, backend="cpu", **kw())
    assert_close_traj(got, ref, 1e-5, what=f"{name} {kind} {pred} cpu vs reference")


@pytest.mark.parametrize("schedule", [_ve(80.0, 0.002, "karras"), _ve(50.0), schedules.from_config({"timestep_spacing": "trailing"})],
                         ids=["ve-karras", "ve-exponential", "vp-trailing"])
@pytest.mark.parametrize("pred", ["score", "eps", "x0"])
def test_pf_ode_converges_at_first_order(schedule, pred):
    # the variance clock is coarse at the top of a VE grid, so its asymptotic range starts later
    steps = [32, 64, 128, 256] if schedule.kind == "ve" else [8, 16, 32, 64]
    slope, errs = gaussian_order("pf_ode", schedule, pred, steps)
    assert 0.85 <= slope <= 1.3, (slope, errs)


def test_langevin_row_step_size_is_song_snr_rule_with_guidance_folded_in(seed):
    """One corrector row against its definition: the score of the guided output (CFG blend and a
    classifier gradient), k = 2 (snr ||z|| / ||g||)^2 per sample or with batch-mean norms."""
    ve = _ve()
    gm = GaussianMixture.default((6,), components=3, seed=seed % 1000)
    sigma = 0.7
    f_u = gm.model(ve.alpha_sigma, "eps")

    def f(u, t, c=None):  # "conditional" = the eps model shifted, so CFG changes the output
        out = f_u(u, t)
        return out if c is None else out + 0.1 * c

    def classifier(u, t):
        return gm.component_logits(u, torch.ones(u.shape[0]), t.double())

    base = samplers.build("pc", ve, 3, prediction="eps")
    lr = next(r for r in base.rows if r.snr)
    row = Row(t=sigma, sigma=sigma, in_scale=1.0, a_x=1.0, a_e=-sigma, out=combo(x=1.0, e=1.0, z=1.0), noise=True,
              snr=0.2, alpha_t=1.0, sigma_t=sigma)
    assert lr.out == row.out
    B = 5
    x = torch.randn(B, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    cond, uncond = torch.randn(B, 6, dtype=torch.float64), torch.zeros(B, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (B,))
    w, scale = 2.5, 1.5
    from fastdiff.core.guidance import Guidance

    for norm in ("batch", "sample"):
        plan = Plan((row,), init_scale=1.0, sampler="t", prediction="eps", steps=1, snr_norm=norm)
        got = run_plan(plan, f, x.clone(), LoopOptions(
            generator=torch.Generator().manual_seed(seed), guidance=Guidance(scale=w), cond=cond, uncond=uncond,
            classifier=classifier, classifier_scale=scale, classifier_y=y, backend="reference"))
        z = torch.randn(B, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        t = torch.full((B,), sigma, dtype=x.dtype)  # the loop's model time: float64 for a float64 state
        eps = f(x, t, uncond) + w * (f(x, t, cond) - f(x, t, uncond))
        uu = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(torch.log_softmax(classifier(uu, t), 1).gather(1, y[:, None]).sum(), uu)[0]
        g = -eps / sigma + scale * grad  # score of p(u | y) under the guided model
        gn, zn = g.norm(dim=1), z.norm(dim=1)
        if norm == "batch":
            gn, zn = gn.mean(), zn.mean()
        k = (2 * (0.2 * zn / gn) ** 2).reshape(-1, 1)
        k32 = k.float().double()  # the kernel's per-sample scalars are float32 (StepArgs.r)
        want = x + k32 * g + (2 * k).sqrt() * z
        assert rel_err(got, want) < 1e-12, norm


def test_per_sample_snr_norm_does_not_depend_on_the_batch(seed):
    ve = _ve()
    plan = samplers.build("pc", ve, 6, snr_norm="sample", correct_steps=2)
    f = _score_model("gmm", ve, seed % 1000)
    x = initial_noise(seed, plan.init_scale, (4, 3, 4, 5))
    seeds = [seed, seed + 1, seed + 2, seed + 3]
    full = run_plan(plan, f, x.clone(), LoopOptions(seeds=seeds, backend="reference"))
    alone = run_plan(plan, f, x[2:3].clone(), LoopOptions(seeds=seeds[2:3], backend="reference"))
    assert torch.equal(full[2:3], alone)
    batch = samplers.build("pc", ve, 6, correct_steps=2)
    mixed = run_plan(batch, f, x.clone(), LoopOptions(seeds=seeds, backend="reference"))
    assert not torch.equal(mixed[2:3], full[2:3])  # batch-mean norms couple the samples


@pytest.mark.parametrize("name, kind, pred, opts", [
    ("sde_ve", "ve", "score", {}),
    ("pc", "ve", "x0", {}),
    ("sde_vp", "vp", "eps", {}),
    ("pc", "vp", "v", {}),
    ("pf_ode", "vp", "score", {}),
])
def test_samples_the_gaussian_mixture(name, kind, pred, opts, seed):
    """100 steps from the exact score of the 2-D ring of 8 blobs (std 0.3, radius 2): the second
    moment (2.09 I), each blob's share (1/8) and the spread around it, within 5 standard errors of
    4000 samples plus the sampler's own bias."""
    gm = GaussianMixture.default((2,))
    sch = _ve(20.0) if kind == "ve" else schedules.from_config({})
    plan = samplers.build(name, sch, 100, prediction=pred, **opts)
    f = gm.model(sch.alpha_sigma, pred, times=[r.t for r in plan.rows])
    B = 4000
    x = torch.randn(B, 2, generator=torch.Generator().manual_seed(seed)) * plan.init_scale
    out = run_plan(plan, f, x, LoopOptions(seeds=torch.arange(B) + seed)).double()
    second = out.T @ out / B
    assert torch.allclose(second, 2.09 * torch.eye(2, dtype=torch.float64), atol=0.12), second
    k = (torch.atan2(out[:, 1], out[:, 0]) / (2 * math.pi / 8)).round().remainder(8).long()
    share = torch.bincount(k, minlength=8).double() / B
    assert share.min() > 0.125 - 0.027 and share.max() < 0.125 + 0.027, share
    spread = (out - gm.means[k]).std(0)
    assert ((spread > 0.27) & (spread < 0.34)).all(), spread


@pytest.mark.parametrize("call, match", [
    (lambda: samplers.build("sde_ve", _ve(grid="karras"), 10, sampling_eps=1e-5), "sigma_grid='exponential'"),
    (lambda: samplers.build("pf_ode", schedules.from_config({}), 10, sampling_eps=1e-5), "ve schedule"),
    (lambda: samplers.build("sde_ve", _ve(), 1, sampling_eps=1e-5), "steps >= 2"),
    (lambda: samplers.build("sde_ve", _ve(), 5, sampling_eps=0.0), "sampling_eps"),
    (lambda: samplers.build("pc", _ve(), 5, snr=0.0), "snr"),
    (lambda: samplers.build("pc", _ve(), 5, snr=-1.0), "snr"),
    (lambda: samplers.build("pc", _ve(), 5, correct_steps=-1), "correct_steps"),
    (lambda: samplers.build("pc", _ve(), 5, correct_steps=1.5), "correct_steps"),
    (lambda: samplers.build("pc", _ve(), 5, snr_norm="mean"), "snr_norm"),
    (lambda: samplers.build("sde_ve", _ve(), 5, prediction="v"), "needs a vp schedule"),
    (lambda: samplers.build("sde_vp", None, 5, prediction="flow"), "flow"),
    (lambda: Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=1.0, out=combo(x=1.0, e=2.0, z=1.0), noise=True,
                 snr=0.1, alpha_t=1.0, sigma_t=1.0), "Langevin row"),
    (lambda: Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=1.0, out=combo(x=1.0, e=1.0, z=1.0), noise=True,
                 snr=0.1), "Langevin row"),
    (lambda: Plan((), init_scale=1.0, snr_norm="median"), "snr_norm"),
])
def test_errors_name_the_bad_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
