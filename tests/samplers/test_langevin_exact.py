"""Langevin samplers (``sgld``, ``annealed_langevin``, ``pc``'s corrector) on targets whose answer is exact.

- Gaussian data: every step is the AR(1) recursion ``x' - m = rho (x - m) + sqrt(a) z``,
  ``rho = 1 - a / (2V)``, so the law after any number of steps, from the initial law, is Gaussian
  with a closed-form mean, variance and covariance with the initial noise (:func:`ar1`). The
  samplers' outputs must match it to 5 standard errors.
- The 2-D ring of 8 blobs: sliced Wasserstein-2 against exact samples, within 25% of the floor that
  exact samples reach themselves (:func:`w2_ratio`), and each blob's share within 5 standard errors.
- ``pc`` on VP against a hand-written Song et al. (2021) Algorithm 5, on the same Philox noise.
"""

import math

import pytest
import torch

from fastdiff.core import rng, schedules
from fastdiff import samplers
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.models import GaussianMixture
from fastdiff.core.plan import combo

from ._harness import rel_err


def _schedule(kind: str):
    return schedules.VESchedule(sigma_min=0.01, sigma_max=10.0) if kind == "ve" else schedules.from_config({})


def ar1(m: torch.Tensor, v: float, c: float, mu: torch.Tensor, V: float, a: float, n: int):
    """Law after ``n`` steps ``x' = x + (a/2) (-(x - mu)/V) + sqrt(a) z`` of a chain with mean ``m``,
    variance ``v`` and covariance ``c`` with the initial noise: ``(m, v, c)`` afterwards.

    ``x_n - mu = rho^n (x_0 - mu) + sqrt(a) sum_k rho^k z_k``, ``rho = 1 - a/(2V)``: mean
    ``mu + rho^n (m - mu)``, variance ``rho^(2n) v + a (1 - rho^(2n)) / (1 - rho^2)`` (stationary
    ``V / (1 - a/(4V))``), covariance ``rho^n c``."""
    rho = 1 - a / (2 * V)
    r = rho**n
    return mu + r * (m - mu), r * r * v + a * (1 - r * r) / (1 - rho * rho), r * c


def tweedie(m, v, c, mu, s2: float, V: float):
    """``E[x0 | x] = mu + (s^2/V)(x - mu)`` applied to the law ``(m, v, c)``."""
    k = s2 / V
    return mu + k * (m - mu), k * k * v, k * c


def assert_gaussian_law(out: torch.Tensor, x0: torch.Tensor, m: torch.Tensor, v: float, c: float):
    """Per element, ``out ~ N(m, v)`` with ``Cov(out, x0) = c`` (``x0 ~ N(0, v0)`` iid): the mean, the
    second moment and the correlation of the standardised residuals, each to 5 standard errors."""
    n = out.numel()
    r = ((out - m) / math.sqrt(v)).reshape(-1)
    z0 = (x0 / x0.std()).reshape(-1)
    corr = c / math.sqrt(v * float(x0.var()))
    assert abs(float(r.mean())) < 5 / math.sqrt(n), float(r.mean())
    assert abs(float((r * r).mean()) - 1) < 5 * math.sqrt(2 / n), (float((r * r).mean()), v)
    got = float((r * z0).mean())
    assert abs(got - corr) < 5 * math.sqrt((1 + corr * corr) / n), (got, corr)


def _run_gaussian(plan, sch, pred, mu, s, seed, B):
    f = GaussianMixture(mu, [s]).model(sch.alpha_sigma, pred, times=sorted({r.t for r in plan.rows}))
    x0 = torch.randn(B, mu.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x0 * plan.init_scale
    out = run_plan(plan, f, x.clone(), LoopOptions(seeds=torch.arange(B) + seed, backend="reference"))
    return out, x


@pytest.mark.parametrize("kind, pred, s, steps, opts", [
    ("ve", "score", 0.5, 20, {"sigma": 0.5, "step_size": 0.1, "denoise": False}),
    ("ve", "x0", 0.5, 30, {"denoise": False}),  # the default rule: sigma = 0.5, a = sigma^2
    ("ve", "eps", 0.5, 30, {}),  # ... and the final Tweedie step
    ("vp", "eps", 1.0, 30, {"denoise": False}),  # unit-variance data: the default forgets the start to e^-3
    ("vp", "v", 0.5, 40, {"sigma": 0.3, "step_size": 0.05}),
])
def test_sgld_matches_the_chains_exact_law(kind, pred, s, steps, opts, seed):
    """Data ``N(mu, s^2 I)``; at noise level sigma the state ``x = x0 + sigma eps`` targets
    ``N(mu, V)``, ``V = s^2 + sigma^2`` (on VP too: the model sees ``x / sqrt(1 + sigma^2)``). The
    output after ``steps`` steps from ``N(0, 1 + sigma^2)`` against :func:`ar1` (and :func:`tweedie`)."""
    g = torch.Generator().manual_seed(seed)
    D, B = 16, 4096
    mu = torch.randn(1, D, generator=g, dtype=torch.float64) * 0.5
    sch = _schedule(kind)
    plan = samplers.build("sgld", sch, steps, prediction=pred, **opts)
    sigma, a = plan.meta["sigma"], plan.meta["step_size"]
    denoise = opts.get("denoise", True)
    assert len(plan.rows) == steps + denoise and plan.init_scale == pytest.approx(math.sqrt(1 + sigma**2))
    out, x = _run_gaussian(plan, sch, pred, mu, s, seed, B)
    V = s * s + sigma * sigma
    law = ar1(torch.zeros_like(mu), plan.init_scale**2, plan.init_scale**2, mu, V, a, steps)
    if denoise:
        law = tweedie(*law, mu, s * s, V)
    assert_gaussian_law(out, x, *law)
    if s == 1.0 and not opts.get("sigma"):  # the rule's promise: exp(-3) of the initial noise left
        assert (1 - a / (2 * V)) ** steps <= math.exp(-3)


@pytest.mark.parametrize("kind, pred", [("ve", "score"), ("ve", "x0"), ("vp", "eps"), ("vp", "v")])
def test_annealed_langevin_matches_the_chains_exact_law(kind, pred, seed):
    """Data ``N(mu, s^2 I)``: level ``i`` is :func:`ar1` with ``V_i = s^2 + sigma_i^2`` and
    ``a_i = step_lr sigma_i^2 / sigma_L^2``; the levels compose exactly (few steps per level, far
    from each level's equilibrium), then Tweedie at ``sigma_L``."""
    g = torch.Generator().manual_seed(seed)
    D, B, s = 16, 4096, 0.5
    mu = torch.randn(1, D, generator=g, dtype=torch.float64) * 0.5
    sch = _schedule(kind)
    plan = samplers.build("annealed_langevin", sch, 4, prediction=pred, n_steps_each=5, sigma_max=4.0, sigma_min=0.1)
    sig = plan.meta["sigmas"]
    assert sig == pytest.approx([4.0, 4.0 * 40 ** (-1 / 3), 4.0 * 40 ** (-2 / 3), 0.1], rel=1e-12)
    assert plan.meta["step_lr"] == pytest.approx(0.2 * 0.1**2, rel=1e-12)
    out, x = _run_gaussian(plan, sch, pred, mu, s, seed, B)
    law = (torch.zeros_like(mu), plan.init_scale**2, plan.init_scale**2)
    for si in sig:
        law = ar1(*law, mu, s * s + si * si, plan.meta["step_lr"] * si * si / sig[-1] ** 2, 5)
    law = tweedie(*law, mu, s * s, s * s + sig[-1] ** 2)
    assert_gaussian_law(out, x, *law)


# ----------------------------------------------------------------------------- 2-D mixture, sliced W2

RING = GaussianMixture.default((2,))  # 8 blobs of std 0.3 on a circle of radius 2


def sliced_w2(a: torch.Tensor, b: torch.Tensor, n_proj: int = 64) -> float:
    """Sliced Wasserstein-2 between two equal-size 2-D point sets (directions evenly spaced on [0, pi))."""
    th = torch.arange(n_proj, dtype=torch.float64) * (math.pi / n_proj)
    d = torch.stack([th.cos(), th.sin()], 1)
    pa, pb = (a.double() @ d.T).sort(0).values, (b.double() @ d.T).sort(0).values
    return float(((pa - pb) ** 2).mean().sqrt())


def blob(x: torch.Tensor) -> torch.Tensor:
    """Index of the ring blob nearest to each point (by angle)."""
    return (torch.atan2(x[:, 1], x[:, 0]) / (math.pi / 4)).round().remainder(8).long()


def exact_like(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    """Exact draws from the ring (blob std ``std``) with as many points per blob as ``x`` has."""
    k = torch.repeat_interleave(torch.arange(8), torch.bincount(blob(x), minlength=8))
    return RING.means[k] + std * torch.randn(len(k), 2, generator=g, dtype=torch.float64)


def w2_ratio(out: torch.Tensor, std: float, g: torch.Generator, chunks: int = 4) -> float:
    """Sliced W2 of ``out`` to exact samples, over the floor exact samples reach, at the same n.

    A set's distance to exact samples fluctuates by ~30% whatever n, mostly through the blobs'
    shares (checked apart); both sides are therefore taken against exact draws with the same
    per-blob counts, averaged over ``chunks`` sets of ``n = len(out) / chunks`` (the floor over
    ``4 chunks`` exact sets): an exact sampler scores 1 +- 0.05."""
    n = len(out) // chunks
    got = sum(sliced_w2(c, exact_like(c, std, g)) for c in out[: n * chunks].split(n)) / chunks
    mix = GaussianMixture(RING.means, torch.full((8,), std, dtype=torch.float64))
    floor = sum(sliced_w2(e, exact_like(e, std, g)) for e in (mix.sample(n, g) for _ in range(4 * chunks)))
    return got / (floor / (4 * chunks))


@pytest.mark.parametrize("name, kind, pred, steps, opts", [
    ("annealed_langevin", "ve", "score", 10, {}),  # 10.0 .. 0.01: 10 levels, ratio 2.15
    ("annealed_langevin", "vp", "eps", 15, {}),  # 157 .. 0.01: 15 levels, ratio 2.0
    ("sgld", "ve", "x0", 200, {"denoise": False}),  # p_sigma at the default sigma = 0.176
])
def test_samples_the_ring_within_25_percent_of_the_w2_floor(name, kind, pred, steps, opts, seed):
    """Defaults (NCSN's T = 100 and step; sgld's rule) on the ring: sliced W2 within 25% of the exact
    floor (:func:`w2_ratio`), and every blob's share within 5 standard errors of 1/8. sgld targets
    ``p_sigma``: blobs of std ``sqrt(0.3^2 + sigma^2)``."""
    sch = _schedule(kind)
    plan = samplers.build(name, sch, steps, prediction=pred, **opts)
    f = RING.model(sch.alpha_sigma, pred, times=sorted({r.t for r in plan.rows}))
    N = 2000
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * plan.init_scale
    out = run_plan(plan, f, x, LoopOptions(seeds=torch.arange(N) + seed)).double()
    share = torch.bincount(blob(out), minlength=8).double() / N
    assert (share - 0.125).abs().max() < 5 * math.sqrt(0.125 * 0.875 / N), share
    std = math.sqrt(0.09 + plan.meta["sigma"] ** 2) if name == "sgld" else 0.3
    ratio = w2_ratio(out, std, torch.Generator().manual_seed(seed + 1))
    assert ratio < 1.25, ratio


# ----------------------------------------------------------------------------- VP corrector


@pytest.mark.parametrize("pred, snr_norm", [("score", "batch"), ("eps", "sample")])
def test_vp_pc_is_song_algorithm_5(pred, snr_norm, seed):
    """``pc`` on VP, step for step, against a plain torch loop of Song et al.'s Algorithm 5 (Langevin
    corrector, ``e = 2 alpha_i (r ||z|| / ||g||)^2``, ``alpha_i = 1 - beta[timestep]``) and the
    reverse-diffusion predictor of :mod:`fastdiff.samplers.score_sde`, fed the same Philox draws
    (``fastdiff.core.rng``: row ``k`` of the plan draws ``randn(shape, seeds, row=k)``)."""
    sch = schedules.from_config({})
    steps, C, snr = 5, 2, 0.16
    plan = samplers.build("pc", sch, steps, prediction=pred, snr=snr, correct_steps=C, snr_norm=snr_norm)
    gm = GaussianMixture.default((3, 4), components=3, seed=seed % 1000)
    B = 4
    seeds = [seed + 11 * b for b in range(B)]
    x = torch.randn(B, 3, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    f = gm.model(sch.alpha_sigma, pred)
    got = run_plan(plan, f, x.clone(), LoopOptions(seeds=seeds, backend="reference"))

    disc = sch.discretize(steps)
    row = 0
    for i in range(steps):
        t, s, s_next = float(disc.timesteps[i]), float(disc.sigmas[i]), float(disc.sigmas[i + 1])
        tt = torch.full((B,), t, dtype=torch.float64)
        std = s / math.sqrt(1 + s * s)  # sqrt(1 - abar) at the grid's sigma

        def score(u, tt):  # the model's score, s = -eps / std for an eps model (as Song et al.'s code)
            return f(u, tt) if pred == "score" else -f(u, tt) / std

        alpha = 1.0 - float(sch.betas[int(t)])  # Song et al.'s code: alpha = 1 - beta[timestep]
        for _ in range(C):  # Algorithm 5
            g = score(x, tt)
            z = rng.randn(x.shape, seeds, row=row, dtype=torch.float64)
            row += 1
            gn, zn = g.reshape(B, -1).norm(dim=1), z.reshape(B, -1).norm(dim=1)
            if snr_norm == "batch":
                gn, zn = gn.mean(), zn.mean()
            e = (2 * alpha * (snr * zn / gn) ** 2).reshape(-1, 1, 1)
            x = x + e * g + (2 * e).sqrt() * z
        b = math.log1p(s * s) - math.log1p(s_next * s_next)  # predictor: -log abar clock
        x = (1 + b / 2) * x + b * score(x, tt)
        if i + 1 < steps:
            x = x + math.sqrt(b) * rng.randn(x.shape, seeds, row=row, dtype=torch.float64)
        row += 1
    assert row == len(plan.rows)
    # 1e-10 here (the kernel takes the per-sample step e as float32); without alpha_i: 1e-4
    assert rel_err(got, x) < 1e-7, rel_err(got, x)


def test_corrector_rows_carry_alpha():
    """The plan's Langevin rows hold ``r = snr sqrt(alpha_i)`` (``k = 2 (r ||z|| / ||g||)^2`` in the
    loop): ``alpha_i = 1 - beta[int(t)]`` on VP, exactly 1 on VE (diffusers' ScoreSdeVeScheduler)."""
    vp = schedules.from_config({})
    rows = [r for r in samplers.build("pc", vp, 4, snr=0.16).rows if r.snr]
    assert len(rows) == 4 and rows[0].t == 999.0
    for r in rows:
        assert r.snr == pytest.approx(0.16 * math.sqrt(1 - vp.betas[int(r.t)]), rel=1e-15)
    assert rows[0].snr == pytest.approx(0.16 * math.sqrt(0.98), rel=1e-7)  # beta_999 = 0.02
    ve = schedules.VESchedule(sigma_min=0.01, sigma_max=50.0, sigma_grid="exponential")
    assert all(r.snr == 0.16 for r in samplers.build("pc", ve, 4, snr=0.16).rows[::2])
    zsnr = schedules.from_config({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"})
    first = samplers.build("pc", zsnr, 4, prediction="v").rows[0]  # beta_999 = 1: alpha = 0, no step
    assert first.snr == 0.0 and first.out == combo(x=1.0) and first.noise
