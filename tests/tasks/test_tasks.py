"""Image tasks: inpainting through the fused mask blend (known pixels re-noised each step, exact at
the end), RePaint's resampling jumps, starting part-way (img2img / SDEdit, denoising a noisy image
from its noise level) and ILVR super-resolution."""

import inspect
import math
import random

import pytest
import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.core import schedules
from fastdiff import tasks
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.tasks import with_known_region

from .._plans import edm_euler, edm_euler_ancestral
from ..samplers._harness import SD, rel_err, toy_model


def _model(x, t, c=None):
    return torch.tanh(x) * 0.7


@pytest.mark.parametrize("make", [edm_euler, edm_euler_ancestral])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_region_is_exact_at_the_end_and_renoised_on_the_way(make, dtype):
    plan = make(12)
    B, C, H, W = 3, 4, 12, 13  # ~900 known elements: the residual checks below sit at > 7 standard errors
    known = torch.randn(B, C, H, W, dtype=dtype)
    mask = (torch.rand(B, 1, H, W) > 0.5).to(dtype)  # broadcast over channels, explicitly expanded
    seen = []
    out = fastdiff.sample(_model, torch.randn(B, C, H, W, dtype=dtype), plan=plan, seed=7, mask=mask, known=known,
                          backend="reference", callback=lambda i, s, x, x0: seen.append(x.clone()))
    keep = mask.expand_as(known) == 0
    assert torch.equal(out[keep], known[keep])
    # after row i the known region sits at row i+1's level: known + sigma_{i+1} * z2 (unit normal noise)
    i = 4
    resid = (seen[i][keep] - known[keep]) / plan.rows[i + 1].sigma_t
    assert abs(float(resid.mean())) < 0.25 and 0.75 < float(resid.std()) < 1.25
    gen = mask.expand_as(known) == 1
    assert not torch.equal(out[gen], known[gen])


def test_generator_mode_draws_the_renoising_noise():
    plan = edm_euler(5)
    known = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    a = fastdiff.sample(_model, torch.randn(2, 4), plan=plan, generator=torch.Generator().manual_seed(3),
                        mask=mask, known=known, backend="reference")
    assert torch.equal(a[mask == 0], known[mask == 0])


def test_mask_errors():
    plan = edm_euler(3)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mask and known go together"):
        fastdiff.sample(_model, x, plan=plan, mask=torch.ones(2, 1, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        fastdiff.sample(_model, x, plan=plan, mask=torch.ones(1, 3, 4), known=x)
    with pytest.raises(ValueError, match="rebuilds its state from history"):
        with_known_region(fastdiff.make_plan("unipc", 4))


# ------------------------------------------------------------------------------------------------
# Tasks: starting part-way (img2img / SDEdit), RePaint jumps, ILVR super-resolution
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def seed() -> int:
    """A fresh seed per test (printed; FASTDIFF_TEST_SEED replays one)."""
    import os

    s = int(os.environ.get("FASTDIFF_TEST_SEED", random.randrange(2**31)))
    print(f"seed={s}")
    return s


def _elementwise(u, t, *unused):
    """A nonlinear model that acts element by element (results cannot depend on the batch or on other pixels)."""
    tt = torch.as_tensor(t, dtype=u.dtype).reshape((-1,) + (1,) * (u.dim() - 1))
    return 0.8 * torch.tanh(u) + 0.05 * torch.cos(tt / 7.0)


def _diffusers_img2img(sched, model, image, noise, steps, strength, generator):
    """The img2img part of diffusers' pipelines: set_timesteps, t_start from strength, set_begin_index,
    add_noise at timesteps[t_start * order], then the stock loop from there."""
    sched.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    t_start = max(steps - init, 0)
    ts = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    if hasattr(sched, "scale_noise"):  # flow matching (SD3 img2img)
        x = sched.scale_noise(image, ts[:1].repeat(image.shape[0]), noise)
    else:
        x = sched.add_noise(image, noise, ts[:1].repeat(image.shape[0]))
    takes_gen = "generator" in inspect.signature(sched.step).parameters
    for t in ts:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = model(u, t.to(torch.float32).expand(x.shape[0]))
        x = sched.step(m, t, x, **({"generator": generator} if takes_gen else {})).prev_sample
    return x, len(ts)


IMG2IMG = [
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}, 10, 0.6),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}, 20, 0.55),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3,
                                                 "timestep_spacing": "trailing"}, 12, 0.75),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, 12, 0.7),
    ("unipc", "UniPCMultistepScheduler", {}, 10, 0.5),
    ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, 16, 0.8),
    ("euler", "EulerDiscreteScheduler", {}, 10, 0.6),
    ("euler_ancestral", "EulerAncestralDiscreteScheduler", {}, 10, 0.6),
    ("heun", "HeunDiscreteScheduler", {}, 8, 0.5),
    ("ddim", "DDIMScheduler", {"clip_sample": False, "steps_offset": 1}, 10, 0.6),
    ("ddpm", "DDPMScheduler", {"clip_sample": False}, 10, 0.5),
    ("flow_euler", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 10, 0.7),
]


@pytest.mark.parametrize("name,cls,cfg,steps,strength", IMG2IMG)
def test_strength_matches_diffusers_img2img(name, cls, cfg, steps, strength, seed):
    diffusers = pytest.importorskip("diffusers")
    cfg = cfg if name.startswith("flow") else {**SD, **cfg}
    sched = getattr(diffusers, cls)(**cfg)
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4, 5)
    image = torch.randn(shape, generator=g) * 0.8
    noise = torch.randn(shape, generator=g)
    model = toy_model(seed % 1000)
    ref, n_run = _diffusers_img2img(sched, model, image, noise, steps, strength,
                                    torch.Generator().manual_seed(seed + 1))
    seen = []
    got = fastdiff.sample(model, noise, image=image, strength=strength, sampler=name, steps=steps,
                          schedule={**cfg, "_class_name": cls}, generator=torch.Generator().manual_seed(seed + 1),
                          backend="reference", callback=lambda *a: seen.append(a[0]))
    assert len(seen) == n_run  # one model evaluation per diffusers step call
    assert rel_err(got, ref) < 1e-5, (name, cfg, rel_err(got, ref))


def test_multistep_restart_warms_up_from_first_order():
    steps = 10
    for name, order in (("dpmpp_2m", 2), ("dpmpp_3m", 3), ("unipc", 2)):
        full = fastdiff.make_plan(name, steps)
        part = tasks.plan_from_step(name, steps, 4)
        assert part.steps == 6 and part.meta["start_step"] == 4
        assert [r.t for r in part.rows] == [r.t for r in full.rows[4:]]
        assert part.meta["orders"][0] == 1 and part.meta["orders"][1] == 2
        assert len(part.rows[0].reads) == 0 or name == "unipc"
        assert full.meta["orders"][4] == order  # the full run is at full order there
    # history-free samplers are sliced: the same rows (renumbered)
    full, part = fastdiff.make_plan("heun", 8), tasks.plan_from_step("heun", 8, 3)
    first = next(i for i, r in enumerate(full.rows) if r.step == 3)
    assert [(r.out, r.t) for r in part.rows] == [(r.out, r.t) for r in full.rows[first:]]
    assert part.rows[0].step == 0 and part.steps == 5


def test_start_step_equals_strength_and_noised_state(seed):
    g = torch.Generator().manual_seed(seed)
    image, noise = torch.randn(3, 2, 6, 6, generator=g, dtype=torch.float64), torch.randn(3, 2, 6, 6, generator=g,
                                                                                           dtype=torch.float64)
    k = tasks.start_step_for_strength(20, 0.35)
    assert k == 20 - int(20 * 0.35)
    a = fastdiff.sample(_elementwise, noise, image=image, strength=0.35, sampler="euler", steps=20, backend="reference")
    b = fastdiff.sample(_elementwise, noise, image=image, start_step=k, sampler="euler", steps=20, backend="reference")
    assert torch.equal(a, b)
    plan = tasks.plan_from_step("euler", 20, k)
    sig = float(fastdiff.core.schedules.from_config({}).discretize(20).sigmas[k])
    # k-space (Euler on a VP schedule): x = image + sigma * noise, as diffusers' EulerDiscrete add_noise
    assert torch.allclose(tasks.noised_state(plan, image, noise), image + sig * noise, rtol=1e-12, atol=1e-12)


def test_denoise_philox_noise_is_keyed_per_sample(seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(3, 2, 4, 4, generator=g)
    seeds = [seed, seed + 11, seed + 5]
    for kw in ({"strength": 0.5}, {"sigma": 0.7}):
        run = dict(sampler="dpmpp_2m_sde", steps=12, backend="reference", **kw)
        full = tasks.denoise(_elementwise, image, seed=seeds, **run)
        assert torch.equal(full[1:2], tasks.denoise(_elementwise, image[1:2], seed=seeds[1:2], **run))
        assert torch.equal(full, tasks.denoise(_elementwise, image, seed=seeds, **run))


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "unipc"])
def test_denoise_noisy_image_from_its_sigma_on_a_gaussian(sampler, seed):
    # single-Gaussian data N(mu, S^2): the probability-flow ODE keeps (x - mu)/sqrt(S^2 + s^2) constant
    # in k-space x = x0 + s eps, so from the start state x_k (noise level s_k) the exact result is known.
    # A Karras grid (small last sigma: the final step into sigma = 0 is first order) and second-order
    # samplers keep the solver's own error well below what a wrong start level or scale would give.
    g = torch.Generator().manual_seed(seed)
    shape, S = (4, 3, 5, 5), 0.5
    mu = torch.randn((1, *shape[1:]), generator=g, dtype=torch.float64) * 0.5
    cfg = {**SD, "use_karras_sigmas": True}
    sch = schedules.from_config(cfg)
    model = GaussianMixture(mu, [S]).model(sch.alpha_sigma, "eps")
    x0 = mu + S * torch.randn(shape, generator=g, dtype=torch.float64)
    sigma = 0.3 + 2.0 * float(torch.rand((), generator=g))
    noisy = x0 + sigma * torch.randn(shape, generator=g, dtype=torch.float64)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    steps = 40
    full = fastdiff.make_plan(sampler, steps, cfg)
    levels = [r.sigma_t / r.alpha_t for r in full.rows if r.stage == 0]
    k = max(i for i, lv in enumerate(levels) if lv >= sigma)
    assert levels[k] >= sigma > (levels[k + 1] if k + 1 < steps else 0.0)
    out = tasks.denoise(model, noisy, sigma=sigma, noise=noise, sampler=sampler, steps=steps, schedule=cfg,
                        seed=seed, backend="reference")
    sk = levels[k]
    xk = noisy + math.sqrt(sk * sk - sigma * sigma) * noise
    exact = mu + S * (xk - mu) / math.sqrt(S * S + sk * sk)
    assert rel_err(out, exact) < 3e-3, rel_err(out, exact)
    with pytest.raises(ValueError, match="above the schedule's largest noise level"):
        tasks.denoise(model, noisy, sigma=levels[0] * 1.01, sampler=sampler, steps=steps, schedule=cfg, seed=1)


def test_denoise_at_a_grid_level_equals_img2img_from_the_clean_image(seed):
    g = torch.Generator().manual_seed(seed)
    x0, n = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g,
                                                                                   dtype=torch.float64)
    sch = schedules.VESchedule(sigma_min=0.02, sigma_max=20.0)
    plan = fastdiff.make_plan("dpmpp_2m", 12, sch)
    k = 5
    s = plan.rows[k].sigma
    a = tasks.denoise(_elementwise, x0 + s * n, sigma=s, sampler="dpmpp_2m", steps=12, schedule=sch, seed=3,
                      backend="reference")
    b = fastdiff.sample(_elementwise, n, image=x0, start_step=k, sampler="dpmpp_2m", steps=12, schedule=sch, seed=3,
                        backend="reference")
    assert rel_err(a, b) < 1e-12


def test_start_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="give image="):
        fastdiff.sample(_model, x, strength=0.5, steps=4)
    with pytest.raises(ValueError, match="not both"):
        fastdiff.sample(_model, x, image=x, strength=0.5, start_step=1, steps=4)
    with pytest.raises(ValueError, match="ignored when plan= is given"):
        fastdiff.sample(_model, x, image=x, strength=0.5, plan=fastdiff.make_plan("euler", 4))
    with pytest.raises(ValueError, match="runs no step"):
        fastdiff.sample(_model, x, image=x, strength=0.1, steps=4, seed=0)
    with pytest.raises(ValueError, match="start_step must be"):
        tasks.plan_from_step("euler", 4, 4)
    with pytest.raises(ValueError, match="exactly one of"):
        tasks.denoise(_model, x, strength=0.5, sigma=1.0)
    with pytest.raises(ValueError, match="exactly one of"):
        tasks.denoise(_model, x)
    with pytest.raises(ValueError, match="shaped like the noise"):
        fastdiff.sample(_model, x, image=x[:1], strength=0.5, steps=4, seed=0)


# ---------------------------------------------------------------------------------------- RePaint


@pytest.mark.parametrize("n,j,r", [(10, 2, 3), (25, 5, 4), (8, 10, 10), (12, 3, 1), (30, 3, 3)])
def test_repaint_schedule_is_diffusers(n, j, r):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.RePaintScheduler(num_train_timesteps=n * 4)
    sched.set_timesteps(n, jump_length=j, jump_n_sample=r)
    assert (sched.timesteps // 4).tolist() == tasks.repaint_schedule(n, j, r)


def test_repaint_nfe_grows_with_jumps():
    for name, n, j, r in (("ddpm", 20, 3, 4), ("ddim", 12, 2, 2), ("heun", 10, 3, 3), ("euler_ancestral", 9, 10, 5)):
        base = fastdiff.make_plan(name, n)
        plan = tasks.repaint_plan(base, j, r)
        jumps = len(range(0, n - j, j))
        per_step = {s: sum(1 for x in base.rows if x.step == s) for s in range(n)}
        seq = tasks.repaint_schedule(n, j, r)
        downs = [n - 1 - t for i, t in enumerate(seq) if i == 0 or t < seq[i - 1]]
        assert len(downs) == n + (r - 1) * j * jumps
        assert len(plan.rows) == sum(per_step[s] for s in downs)
        if jumps and r > 1:
            assert plan.meta["repaint"]["nfe"] == len(plan.rows) > len(base.rows)
        else:
            assert plan is base
    assert tasks.repaint_plan(base, 3, 1) is base  # jump_n_sample=1: no jumps


def test_repaint_matches_diffusers_repaint_scheduler(seed):
    """RePaintScheduler's step/undo_step loop (T = steps, so undo_step re-noises by exactly one level)
    with an element-wise model: our fused plan, fed the same noise (the step's noise and the undo
    noises of a jump combined into the one draw of the fused row), gives the same generated pixels.
    The known pixels are re-noised with noise of their own (diffusers reuses the step's), and both are
    exact at the end."""
    diffusers = pytest.importorskip("diffusers")
    n, j, r = 30, 3, 3
    eta = random.Random(seed).choice([0.0, 1.0, 0.5])
    rp = diffusers.RePaintScheduler(num_train_timesteps=n, eta=eta, clip_sample=False)
    rp.set_timesteps(n, jump_length=j, jump_n_sample=r)
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 4, 5)
    known = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape, generator=g) > 0.4).to(torch.float64)  # ours: 1 = generate
    x_init = torch.randn(shape, generator=g, dtype=torch.float64)

    def model(u, t):
        return _elementwise(u, t)

    # --- diffusers' RePaintPipeline loop (its mask is 1 where known); the state after each step and its undos
    gen = torch.Generator().manual_seed(seed + 1)
    x, t_last, after = x_init.clone(), int(rp.timesteps[0]) + 1, []
    for t in rp.timesteps:
        t = int(t)
        if t < t_last:
            m = model(x, torch.tensor([float(t)]).expand(2))
            x = rp.step(m, t, x, known, 1.0 - mask, generator=gen).prev_sample
            after.append(x.clone())
        else:
            x = rp.undo_step(x, t_last, generator=gen)
            after[-1] = x.clone()
        t_last = t
    # its draws, replayed: one per step call, one per undo_step call (T = steps: one beta per undo)
    replay = torch.Generator().manual_seed(seed + 1)
    seq, draws = [int(t) for t in rp.timesteps], []
    for i, t in enumerate(seq):
        kind = "step" if i == 0 or t < seq[i - 1] else "undo"
        z = torch.randn(shape, generator=replay, dtype=torch.float64)
        draws.append((kind, t if kind == "step" else seq[i - 1], z))

    # --- ours: the DDIM plan of the same schedule with RePaint's jumps fused in, then the known region
    sch = schedules.vp("linear", num_train_timesteps=n, beta_start=1e-4, beta_end=0.02)
    base = fastdiff.make_plan("ddim", n, sch, eta=eta, clip_sample=False, set_alpha_to_one=True)
    plan = tasks.with_known_region(tasks.repaint_plan(base, j, r))
    assert len(plan.rows) == len(after)
    betas = rp.betas.double()
    # per row: (step noise std * gain of the undos after it) z0 + sum_k w_k z_k, normalised by the row's z coefficient
    combined, k = [], 0
    while k < len(draws):
        _, t, z0 = draws[k]
        std = base.rows[n - 1 - t].out[-1]
        acc = std * z0
        k += 1
        while k < len(draws) and draws[k][0] == "undo":
            _, tl, z = draws[k]
            b = float(betas[tl])
            acc = math.sqrt(1 - b) * acc + math.sqrt(b) * z
            k += 1
        combined.append(acc)
    zs = [c / row.out[-1] if row.out[-1] > 0 else torch.zeros(shape, dtype=torch.float64)
          for c, row in zip(combined, plan.rows)]
    seen = []
    out = run_plan(plan, model, x_init.clone(), LoopOptions(
        noise_fn=lambda i, xx: zs[i], seeds=[seed, seed + 1], mask=mask, known=known, backend="reference",
        callback=lambda s, sg, xx, x0: seen.append(xx.clone())))
    gen_px = mask == 1
    for i, (a, b) in enumerate(zip(seen[:-1], after[:-1])):
        assert rel_err(a[gen_px], b[gen_px]) < 1e-5, (i, rel_err(a[gen_px], b[gen_px]))
    assert rel_err(out[gen_px], after[-1][gen_px]) < 1e-5
    assert torch.equal(out[~gen_px], known[~gen_px]) and torch.allclose(after[-1][~gen_px], known[~gen_px])


@pytest.mark.parametrize("name", ["ddpm", "euler", "euler_ancestral"])
def test_repaint_jumps_keep_forward_marginals(name, seed):
    """Point-mass data at c with the exact x0 model: every row, jumps included, must leave the state
    at the forward marginal of the next row's level, mean alpha c / in_scale and std sigma / in_scale
    (DDPM's posterior, Euler's exact ODE step and Euler ancestral all keep it exactly)."""
    c = 0.6
    n, j, r = 12, 3, 3
    base = fastdiff.make_plan(name, n, prediction="x0")
    plan = tasks.repaint_plan(base, j, r)
    levels = tasks.levels_after(plan)
    x = torch.randn(4, 4000, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * plan.init_scale
    x += c * plan.rows[0].alpha_t / plan.rows[0].in_scale
    seen = []
    run_plan(plan, lambda u, t: torch.full_like(u, c), x, LoopOptions(
        generator=torch.Generator().manual_seed(seed + 1), backend="reference", callback=lambda s, sg, xx, x0: seen.append(xx.clone())))
    jumped = 0
    for i, (xx, (a, s, inn)) in enumerate(zip(seen, levels)):
        jumped += plan.rows[i].out[-1] != base.rows[min(plan.rows[i].step, n - 1)].out[-1]
        if i == len(seen) - 1:
            break  # the last row scales by out_scale afterwards
        mean, std = a * c / inn, s / inn
        # 16000 draws: standard errors std/126 (mean) and std/179 (std); the bounds are > 6 of them
        assert abs(float(xx.mean()) - mean) < 0.05 * max(std, 0.1), (i, float(xx.mean()), mean)
        assert abs(float(xx.std()) - std) < 0.04 * std + 1e-9, (i, float(xx.std()), std)
    assert jumped >= (r - 1) * len(range(0, n - j, j))


def test_repaint_inpainting_known_pixels_exact(seed):
    g = torch.Generator().manual_seed(seed)
    known = torch.randn(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    calls = []
    out = tasks.repaint(_elementwise, known, mask, jump_length=2, jump_n_sample=3, steps=10, seed=seed,
                        backend="reference", callback=lambda *a: calls.append(a[0]))
    keep = mask.expand_as(known) == 0
    assert torch.equal(out[keep], known[keep]) and not torch.equal(out[~keep], known[~keep])
    assert len(calls) == 10 + 2 * 2 * len(range(0, 8, 2))
    with pytest.raises(ValueError, match="carries history across steps"):
        tasks.repaint(_elementwise, known, mask, jump_length=2, sampler="dpmpp_2m", steps=10, seed=0)
    with pytest.raises(ValueError, match="before with_known_region"):
        tasks.repaint_plan(tasks.with_known_region(fastdiff.make_plan("ddpm", 10)), 2, 2)


# ------------------------------------------------------------------------------------------ ILVR


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "ddpm", "heun"])
def test_ilvr_final_low_frequencies_equal_the_low_res_image(sampler, seed):
    g = torch.Generator().manual_seed(seed)
    f = 2
    y = torch.randn(2, 3, 4, 5, generator=g)
    out = tasks.super_resolution(_elementwise, y, factor=f, sampler=sampler, steps=8, seed=seed, backend="reference")
    assert out.shape == (2, 3, 8, 10)
    # exact but for float32 rounding of x - up(down(x)) + up(y), which scales with |x| (Euler can end at
    # |x| ~ 400 here: 1.5e-5 off, seed 625721980)
    tol = 1e-5 * (1 + y.abs()) + 4 * torch.finfo(torch.float32).eps * out.abs().max()
    assert ((F.avg_pool2d(out, f) - y).abs() <= tol).all()
    # bilinear up: down(up(y)) != y, so only close; still far closer than without the projection
    bil = tasks.super_resolution(_elementwise, y, factor=f, up="bilinear", sampler=sampler, steps=8, seed=seed,
                                 backend="reference")
    free = fastdiff.sample(_elementwise, torch.randn(2, 3, 8, 10, generator=g), sampler=sampler, steps=8, seed=seed,
                           backend="reference")
    assert rel_err(F.avg_pool2d(bil, f), y) < 0.5 * rel_err(F.avg_pool2d(free, f), y)


def test_post_step_runs_after_every_row_before_the_callback():
    plan = edm_euler(5)
    order = []

    def hook(i, x):
        order.append(("post", i))
        x.mul_(0.5)

    def cb(step, sigma, x, x0):
        order.append(("cb", step))

    x = torch.randn(2, 3)
    out = fastdiff.sample(_model, x, plan=plan, seed=1, post_step=hook, callback=cb, backend="reference")
    assert order == [(k, i) for i in range(5) for k in ("post", "cb")]
    ref = x * plan.init_scale
    for r in plan.rows:  # the Euler row on x0-prediction, then the hook's halving
        d = _model(ref, None)
        ref = (r.out[0] * ref + r.out[1] * d) * 0.5
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_ilvr_on_a_gaussian_mixture_picks_the_component_of_the_low_res_image(seed):
    """Components whose low-resolution means differ: conditioned on a low-resolution image of a draw
    from component k, ILVR's samples come from component k, and their high frequencies still vary."""
    g = torch.Generator().manual_seed(seed)
    K, f, shape = 4, 4, (1, 8, 8)
    while True:  # components whose low-resolution means differ clearly (ILVR cannot tell close ones apart:
        # about 2% of unconstrained draws put two of them within 0.9 and the hit rate then drops to 0.67-0.88)
        low = torch.randn(K, 1, 2, 2, generator=g, dtype=torch.float64) * 1.5
        dist = torch.cdist(low.flatten(1), low.flatten(1)) + torch.eye(K, dtype=torch.float64) * 1e9
        if dist.min() >= 1.5:
            break
    high = torch.randn(K, *shape, generator=g, dtype=torch.float64) * 0.4
    means = F.interpolate(low, scale_factor=f, mode="nearest") + high - F.interpolate(
        F.avg_pool2d(high, f), scale_factor=f, mode="nearest")
    gm = GaussianMixture(means, [0.15] * K)
    sch = schedules.from_config({})
    model = gm.model(sch.alpha_sigma, "eps")
    B = 24
    comp = torch.randint(0, K, (B,), generator=g)
    x_true = means[comp] + 0.15 * torch.randn(B, *shape, generator=g, dtype=torch.float64)
    y = F.avg_pool2d(x_true, f)
    out = tasks.super_resolution(model, y, factor=f, sampler="dpmpp_2m", steps=25, seed=seed, backend="reference")
    assert torch.allclose(F.avg_pool2d(out, f), y, atol=1e-10)
    d = ((out[:, None] - means[None]) ** 2).flatten(2).sum(-1)
    hit = (d.argmin(1) == comp).double().mean()
    assert hit >= 0.9, float(hit)
    hf = out - F.interpolate(F.avg_pool2d(out, f), scale_factor=f, mode="nearest")
    # the generated high frequencies: the component's own, plus within-component spread (std 0.15)
    resid = hf - (means[comp] - F.interpolate(F.avg_pool2d(means[comp], f), scale_factor=f, mode="nearest"))
    assert 0.05 < float(resid.std()) < 0.3


def test_ilvr_errors():
    y = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="rebuilds its state from history"):
        tasks.super_resolution(_elementwise, y, factor=2, sampler="unipc", steps=4, seed=0)
    with pytest.raises(ValueError, match="factor must be"):
        tasks.super_resolution(_elementwise, y, factor=0, steps=4, seed=0)
    with pytest.raises(ValueError, match="up must be"):
        tasks.super_resolution(_elementwise, y, factor=2, up="cubic", steps=4, seed=0)


def test_ilvr_and_repaint_with_a_generator(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 3, 3, 4, generator=g)
    runs = [tasks.super_resolution(_elementwise, y, factor=3, sampler="euler_ancestral", steps=6, backend="reference",
                                   generator=torch.Generator().manual_seed(seed)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]) and torch.allclose(F.avg_pool2d(runs[0], 3), y, atol=1e-5)
    known, mask = torch.randn(2, 5, generator=g), torch.tensor([[1.0, 0, 1, 0, 1], [0, 1, 1, 0, 0]])
    out = tasks.repaint(_elementwise, known, mask, jump_length=2, jump_n_sample=2, steps=8, backend="reference",
                        generator=torch.Generator().manual_seed(seed))
    assert torch.equal(out[mask == 0], known[mask == 0])
