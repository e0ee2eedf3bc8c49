"""Trajectory-comparison utilities for sampler tests (shared by every tests/samplers/test_*.py).

- :func:`toy_model`: a small deterministic nonlinear model ``f(u, t)`` (any prediction type).
- :func:`ours`: run a plan with the reference backend, recording the state after every row.
- :func:`diffusers_loop`: the stock diffusers loop (``scale_model_input`` / ``step``), recording
  the state after every ``step`` call, with the same model, initial state and generator noise.
- :func:`k_sampling` / :func:`k_external`: k-diffusion's ``sampling.py`` / ``external.py``
  loaded WITHOUT its package ``__init__`` (which imports torchvision, wandb, ...): a stub parent
  package provides ``utils.append_dims``. For the SDE samplers pass ``noise_sampler=`` so that
  k-diffusion does not build a BrownianTree, and feed the same draws to ``ours(noise=...)``.
- :class:`NoiseTape`: a list of pre-drawn noise tensors handed out in order (a k-diffusion
  ``noise_sampler`` and a ``torch.randn_like`` replacement) and by row (our ``noise_fn``).
- :func:`assert_close_traj`: per-step relative error ``||a - b|| / ||b||`` below a tolerance.
"""

from __future__ import annotations

import inspect
import math
import types

import torch

from fastdiff.core import schedules
from fastdiff.runtime.loop import LoopOptions, run_plan
from fastdiff.core.plan import Plan

SHAPE = (2, 3, 4, 5)
"""Batch of 2, odd feature sizes."""


def toy_model(seed: int = 0, shape: tuple[int, ...] = SHAPE, gain: float = 1.0):
    """A deterministic nonlinear model ``f(u, t)`` shaped like ``u``: tanh of a fixed random linear map
    of the input, modulated by a smooth function of ``t`` (works for t in [0, 1000] or sigma)."""
    d = math.prod(shape[1:])
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(d, generator=g, dtype=torch.float64) * 0.2

    def f(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dt = u.dtype
        tt = torch.as_tensor(t, dtype=dt).reshape(-1, 1)
        lt = torch.log1p(tt.abs())
        h = u.reshape(u.shape[0], -1)
        out = gain * torch.tanh(h @ w.to(dt) * (0.8 + 0.1 * torch.cos(lt)) + b.to(dt)) + c.to(dt) * torch.sin(0.7 * lt)
        return out.reshape(u.shape)

    return f


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_close_traj(ours_traj, ref_traj, tol: float = 1e-5, what: str = "") -> float:
    """Equal lengths and every step within ``tol`` relative error; returns the worst error."""
    assert len(ours_traj) == len(ref_traj), f"{what}: {len(ours_traj)} states vs {len(ref_traj)} in the reference"
    worst = 0.0
    for i, (a, b) in enumerate(zip(ours_traj, ref_traj)):
        e = rel_err(a, b)
        assert e <= tol, f"{what}: step {i} relative error {e:.3g} > {tol:g}"
        worst = max(worst, e)
    return worst


class NoiseTape:
    """Pre-drawn standard normals shaped like ``shape``, handed out in order or by index."""

    def __init__(self, n: int, shape=SHAPE, seed: int = 0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        self.z = [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]
        self.next = 0

    def draw(self, *args, **kwargs) -> torch.Tensor:
        """The next tensor (use as ``noise_sampler(sigma, sigma_next)`` or ``randn_like(x)``)."""
        z = self.z[self.next]
        self.next += 1
        return z.clone()


def ours(plan: Plan, model, x: torch.Tensor, *, generator=None, noise_fn=None, seeds=None,
         backend: str = "reference") -> list[torch.Tensor]:
    """Run ``plan`` from ``x`` (already scaled); the state after every row (the last one scaled by
    ``plan.out_scale``)."""
    traj = []
    opts = LoopOptions(generator=generator, noise_fn=noise_fn, seeds=seeds, backend=backend,
                       callback=lambda step, sigma, xx, x0: traj.append(xx.clone()))
    out = run_plan(plan, model, x.clone(), opts)
    traj[-1] = out.clone()
    return traj


def diffusers_loop(scheduler, model, x: torch.Tensor, steps: int, *, generator=None, **step_kwargs) -> list:
    """The stock diffusers sampling loop; the state after every ``step`` call."""
    scheduler.set_timesteps(steps, **step_kwargs.pop("set_timesteps_kwargs", {}))
    x = x.clone()
    traj = []
    for t in scheduler.timesteps:
        u = scheduler.scale_model_input(x, t) if hasattr(type(scheduler), "scale_model_input") else x
        m = model(u, t.to(torch.float32).expand(x.shape[0]))
        kw = dict(step_kwargs)
        if generator is not None and "generator" in inspect.signature(scheduler.step).parameters:
            kw["generator"] = generator
        x = scheduler.step(m, t, x, **kw).prev_sample
        traj.append(x.clone())
    return traj


def _k_module(name: str) -> types.ModuleType:
    from fastdiff.bench.loop import k_module

    mod = k_module(name)
    if mod is None:
        import pytest

        pytest.skip("k-diffusion is not installed")
    return mod


def k_sampling() -> types.ModuleType:
    """k-diffusion's ``sampling`` module (``sample_euler``, ``sample_lms``, ``sample_dpmpp_2m``, ...)."""
    return _k_module("sampling")


def k_external() -> types.ModuleType:
    """k-diffusion's ``external`` module (``DiscreteEpsDDPMDenoiser``, ``DiscreteVDDPMDenoiser``)."""
    k_sampling()
    return _k_module("external")


class patched_randn_like:
    """Context manager: k-diffusion's ``torch.randn_like`` (used for churn noise) returns ``tape.draw()``."""

    def __init__(self, tape: NoiseTape):
        self.tape = tape

    def __enter__(self):
        mod = k_sampling()
        self.mod, self.orig = mod, mod.torch
        tape = self.tape

        class TorchProxy:
            def __getattr__(self, name):
                return getattr(torch, name)

            @staticmethod
            def randn_like(x, *a, **k):
                return tape.draw().to(x.dtype)

        mod.torch = TorchProxy()
        return self

    def __exit__(self, *exc):
        self.mod.torch = self.orig
        return False


def initial_noise(seed: int, scale: float, shape=SHAPE, dtype=torch.float32) -> torch.Tensor:
    """``scale * N(0, I)`` from a generator of its own (not the step generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * scale


def compare_with_diffusers(scheduler, name: str, steps: int, seed: int, *, prediction=None, model=None,
                           tol: float = 1e-5, step_kwargs=None, set_timesteps_kwargs=None, **options) -> float:
    """Build ``name`` from ``scheduler.config`` and compare its trajectory with the stock loop
    (same model, initial state and generator noise); returns the worst per-step relative error."""
    from fastdiff import samplers

    model = model or toy_model(seed)
    plan = samplers.build(name, scheduler.config, steps, prediction=prediction, **options)
    scheduler.set_timesteps(steps, **(set_timesteps_kwargs or {}))
    init = float(getattr(scheduler, "init_noise_sigma", 1.0))
    assert plan.init_scale == pytest_approx(init), f"init_scale {plan.init_scale} vs diffusers {init}"
    x = initial_noise(seed, init)
    ref = diffusers_loop(scheduler, model, x, steps, generator=torch.Generator().manual_seed(seed + 1),
                         set_timesteps_kwargs=set_timesteps_kwargs or {}, **(step_kwargs or {}))
    got = ours(plan, model, x, generator=torch.Generator().manual_seed(seed + 1))
    return assert_close_traj(got, ref, tol, what=f"{name} seed={seed}")


def pytest_approx(v: float, rel: float = 1e-6):
    import pytest

    return pytest.approx(v, rel=rel)


SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
"""Stable Diffusion's betas."""


def k_states(fn, model, x, sigmas, **kw):
    """k-diffusion's state at the start of every step after the first (after churn), then the result."""
    seen = []
    out = fn(model, x.clone(), sigmas, callback=lambda d: seen.append(d["x"].clone()), disable=True, **kw)
    return seen[1:] + [out]


def per_step(plan, traj):
    """Our state after the last row of every step."""
    return [x for i, x in enumerate(traj) if i + 1 == len(plan.rows) or plan.rows[i + 1].step != plan.rows[i].step]


def k_problem(kind: str, pred: str, seed: int):
    """``(schedule, model f(u, t), k-diffusion denoiser D(x, sigma))`` for one comparison: ``ve``
    (EDM Karras grid, ``x0`` model, ``t = sigma``) or ``vp`` (SD betas on a Karras grid, ``eps``/``v``
    model wrapped by k-diffusion's own ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser``)."""
    f = toy_model(seed)
    if kind == "ve":
        sch = schedules.VESchedule(sigma_min=0.01, sigma_max=30.0)
        return sch, f, (lambda x, sigma: f(x, sigma))
    sch = schedules.from_config({**SD, "use_karras_sigmas": True})
    ext = k_external()
    acp = torch.tensor(sch.alphas_cumprod, dtype=torch.float32)
    wrap = ext.DiscreteEpsDDPMDenoiser if pred == "eps" else ext.DiscreteVDDPMDenoiser
    return sch, f, wrap(f, acp, quantize=False)




def gaussian_order(name: str, schedule, prediction: str, steps, seed: int = 0, **options):
    """Empirical order of convergence on single-Gaussian data, whose probability-flow ODE has an
    exact solution. Returns ``(slope, errors)``: the negated least-squares slope of
    log(final-sample error) against log(steps).

    Data ``x0 ~ N(mu, S^2 I)`` (fastdiff.models.GaussianMixture with one component gives the
    exact denoiser under ``schedule.alpha_sigma``). For ``u = alpha x0 + sigma eps`` the ODE keeps
    ``(u - alpha mu) / sqrt(alpha^2 S^2 + sigma^2)`` constant, so from the first row's model input
    ``u0`` at ``(a0, s0)`` the exact final sample (alpha=1, sigma=0) is
    ``mu + S (u0 - a0 mu) / sqrt(a0^2 S^2 + s0^2)``. States are float64.
    """
    import numpy as np

    from fastdiff import samplers
    from fastdiff.models import GaussianMixture

    g = torch.Generator().manual_seed(seed)
    shape = (4, 3, 5)
    mu = torch.randn((1, *shape), generator=g, dtype=torch.float64) * 0.5
    S = 0.5
    model = GaussianMixture(mu, [S]).model(schedule.alpha_sigma, prediction)
    z = torch.randn((4, *shape), generator=g, dtype=torch.float64)
    errs = []
    for n in steps:
        plan = samplers.build(name, schedule, n, prediction=prediction, **options)
        x = z * plan.init_scale
        r0 = plan.rows[0]
        a0, s0 = schedule.alpha_sigma(r0.t)
        exact = mu + S * (r0.in_scale * x - a0 * mu) / math.sqrt(a0 * a0 * S * S + s0 * s0)
        out = run_plan(plan, model, x.clone(), LoopOptions(backend="reference"))
        errs.append(rel_err(out, exact))
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    return float(slope), errs


class count_fused_steps:
    """Context manager counting fused steps (``.n``): calls of :func:`fastdiff.runtime.ops.step`, the
    fused step each drop-in scheduler row runs through, and rows run by the programs
    :func:`fastdiff.runtime.ops.prepare` makes meanwhile (the guided loop's prepared rows; its kept
    runs are dropped on entry and exit so that every row counted runs through a counted program). A
    test that steps a drop-in shows the fused step ran."""

    def __enter__(self):
        from fastdiff.guiders import loop
        from fastdiff.runtime import ops

        self.n, self.ops, self.orig, self.orig_prepare, self.loop = 0, ops, ops.step, ops.prepare, loop
        counter = self

        def step(*a, **k):
            self.n += 1
            return self.orig(*a, **k)

        class Counted:
            """A prepared program whose rows are counted (no ``run_ptr``: every row goes through ``run``)."""

            run_ptr = None

            def __init__(self, program):
                self.program, self.rows = program, program.rows

            def run(self, i, m):
                counter.n += 1
                self.program.run(i, m)

            def set(self, i, name, t):
                self.program.set(i, name, t)

        def prepare(*a, **k):
            return Counted(self.orig_prepare(*a, **k))

        ops.step, ops.prepare = step, prepare
        loop._runs.clear()
        from fastdiff.runtime.loop import clear_kept

        clear_kept()  # (executors kept by accelerated pipelines were prepared outside this count)
        return self

    def __exit__(self, *exc):
        from fastdiff.runtime.loop import clear_kept

        self.ops.step, self.ops.prepare = self.orig, self.orig_prepare
        self.loop._runs.clear()
        clear_kept()
        return False
