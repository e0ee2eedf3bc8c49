"""The whole sampling loop against its memory floor, stock diffusers and k-diffusion (``fastdiff bench``'s
``floor`` part).

Every loop runs ``steps`` solver steps of classifier-free guidance (scale 7.5) with a *zero-cost*
model: it returns a tensor made once, so what is timed is the loop around the model, the part a
sampler library owns. Per sampler and shape, measured round-robin in one run (one sample of each
method per round, each sample as many whole loops as last about :data:`SAMPLE_S`; the best sample
kept, except for the copy: its median):

- ``fastdiff``: repeated ``fastdiff.sample`` calls (its prepared loop reused); ``fastdiff_cold``:
  the first call after :func:`fastdiff.clear_cache` (the preparation included);
- ``diffusers``: the stock loop of the matching diffusers scheduler (``torch.cat`` of the input,
  ``scale_model_input``, the CFG blend, ``scheduler.step``);
- ``k-diffusion``: its sampler with a CFG-wrapped denoiser (``torch.cat``, the blend), where it has
  the sampler;
- ``copy``: the copy bandwidth of :mod:`fastdiff.bench.timing` (its one definition: median sample,
  outliers listed in ``copy_outliers_gb_s``, not used) at the bytes one row of the loop moves, the
  machine's bandwidth at the size the loop streams at a time.

The loop's memory floor is the bytes the fused loop must move per step (each row reads the state,
its history slots and the model output, both halves under guidance, and writes the state, its
history writes and the next model input: 32 bytes per element for a guided multistep row in fp32)
over that copy bandwidth. ``ops_per_row`` counts the torch operations fastdiff issues per row
outside the model (a ``TorchDispatchMode`` over a short and a long run; per-call set-up cancels).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from .timing import copy_fn, copy_gb_s

SHAPES = [(1, 4, 8, 8), (1, 4, 64, 64), (16, 4, 32, 32), (16, 4, 128, 128)]
"""Shapes of the full run: a toy latent, an SD 512² latent, a batch of 16 small latents, a batch of
16 SDXL-size latents."""
SAMPLERS = ("dpmpp_2m", "dpmpp_2m_sde", "euler", "euler_ancestral", "ddim", "unipc", "heun")
"""Samplers of the full run (deterministic and stochastic, multistep and two-stage)."""
GUIDANCE = 7.5
SAMPLE_S = 0.02
"""Each timed sample of a method runs whole loops for about this long (short loops are repeated)."""
SD_CONFIG = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

DIFFUSERS = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
}
"""The stock diffusers scheduler (class name, config over :data:`SD_CONFIG`) each sampler mirrors; fastdiff
runs the same config (:func:`config_for`). DDIM and DDPM as Stable Diffusion configures them (no clipping)."""


def config_for(sampler: str) -> dict:
    """The scheduler config both fastdiff and the stock loop run for ``sampler``."""
    return {**SD_CONFIG, **DIFFUSERS.get(sampler, ("", {}))[1]}
K_DIFFUSION = {"dpmpp_2m": "sample_dpmpp_2m", "dpmpp_2m_sde": "sample_dpmpp_2m_sde", "euler": "sample_euler",
               "euler_ancestral": "sample_euler_ancestral", "heun": "sample_heun", "lms": "sample_lms"}
"""The k-diffusion sampler function each sampler mirrors (where k-diffusion has one)."""


def _diffusers_loop(sampler: str, shape, steps: int, out: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        import diffusers
    except ImportError:
        return None
    if sampler not in DIFFUSERS:
        return None
    cls = getattr(diffusers, DIFFUSERS[sampler][0])
    cfg = config_for(sampler)

    def run(noise: torch.Tensor) -> torch.Tensor:
        sch = cls(**cfg)
        sch.set_timesteps(steps)
        gen = torch.Generator().manual_seed(0)
        x = noise * sch.init_noise_sigma
        kw = {"generator": gen} if "generator" in sch.step.__code__.co_varnames else {}
        for t in sch.timesteps:
            xin = sch.scale_model_input(torch.cat([x] * 2), t)
            o = out  # the zero-cost model: its output, made once
            u, c = o.chunk(2)
            e = u + GUIDANCE * (c - u)
            x = sch.step(e, t, x, **kw).prev_sample
        del xin
        return x

    return run


K_STUB = "_fastdiff_kdiffusion_stub"
"""The package name under which :func:`k_module` loads k-diffusion's modules."""


def k_module(name: str):
    """k-diffusion's module ``name`` (``sampling``, ``external``) loaded from its file under a stub
    package whose ``utils`` has only ``append_dims``: k-diffusion's own ``__init__`` imports its
    training stack (scikit-image, torchvision, ...), which its samplers do not need. ``None`` when
    k-diffusion is not installed."""
    import importlib.util
    import os
    import sys
    import types

    full = f"{K_STUB}.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = list(spec.submodule_search_locations)[0]
    if K_STUB not in sys.modules:
        pkg = types.ModuleType(K_STUB)
        pkg.__path__ = []  # a namespace with only what we put in it
        utils = types.ModuleType(f"{K_STUB}.utils")

        def append_dims(x, target_dims):
            """k-diffusion's utils.append_dims."""
            dims = target_dims - x.ndim
            if dims < 0:
                raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
            return x[(...,) + (None,) * dims]

        utils.append_dims = append_dims
        pkg.utils = utils
        sys.modules[K_STUB] = pkg
        sys.modules[f"{K_STUB}.utils"] = utils
    mspec = importlib.util.spec_from_file_location(full, os.path.join(root, f"{name}.py"))
    mod = importlib.util.module_from_spec(mspec)
    sys.modules[full] = mod
    mspec.loader.exec_module(mod)
    setattr(sys.modules[K_STUB], name, mod)
    return mod


def _k_diffusion_loop(sampler: str, shape, steps: int, out: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if sampler not in K_DIFFUSION:
        return None
    try:
        ks = k_module("sampling")
    except Exception:  # noqa: BLE001 - its optional dependencies (torchsde, scipy) missing
        return None
    if ks is None:
        return None
    fn = getattr(ks, K_DIFFUSION[sampler])
    sigmas = ks.get_sigmas_karras(steps, 0.0292, 14.61)

    def denoiser(x, sigma):
        torch.cat([x] * 2)
        torch.cat([sigma] * 2)
        u, c = out.chunk(2)
        return u + GUIDANCE * (c - u)

    def run(noise: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)
        return fn(denoiser, noise * sigmas[0], sigmas, disable=True)

    return run


def _fastdiff_loop(sampler: str, shape, steps: int, out: torch.Tensor, cold: bool = False):
    import fastdiff

    b = shape[0]
    cond = torch.zeros(b, 1)

    def model(x, t, c):
        return out

    def run(noise: torch.Tensor) -> torch.Tensor:
        if cold:
            fastdiff.clear_cache()
        return fastdiff.sample(model, noise, sampler=sampler, steps=steps, schedule=config_for(sampler),
                               guidance_scale=GUIDANCE, cond=cond, uncond=cond, seed=0)

    return run


def loop_bytes(sampler: str, shape, steps: int, dtype: torch.dtype = torch.float32) -> tuple[int, int]:
    """``(bytes per step, rows)`` the fused loop must move: per row, every operand read once and every
    output written once (state, history, model output halves, next model input), as prepared."""
    from ..api import make_plan
    from ..runtime.executor import Executor
    from ..core.guidance import Guidance

    plan = make_plan(sampler, steps, config_for(sampler))
    ex = Executor(plan, shape, dtype, "cpu", guidance=Guidance(GUIDANCE))
    ws = ex._idle[0]
    elem = torch.empty((), dtype=dtype).element_size()
    n = ex.numel
    total = 0
    for a in ws.rows:
        reads = 2 + (a.m_c is not None) + len(a.h_read) + 2 * (a.mask is not None) + (a.g is not None)
        writes = 1 + len(a.h_write) + a.u_copies
        total += (reads + writes) * n * elem
    return total // max(plan.steps, 1), len(plan.rows)


def ops_per_row(sampler: str, shape, steps: int = 10) -> float:
    """Torch operations ``fastdiff.sample`` issues per row outside the (zero-cost) model: the
    difference between a run of ``2 * steps`` and one of ``steps`` steps, per extra row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import fastdiff

    from ..api import make_plan

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    b = shape[0]
    out = torch.randn(2 * b, *shape[1:])
    cond = torch.zeros(b, 1)
    noise = torch.randn(shape)
    counts, rows = [], []
    for n in (steps, 2 * steps):
        kw = dict(sampler=sampler, steps=n, schedule=config_for(sampler), guidance_scale=GUIDANCE, cond=cond,
                  uncond=cond, seed=0)
        fastdiff.sample(lambda x, t, c: out, noise, **kw)  # prepared (and cached) outside the count
        with Count() as c:
            fastdiff.sample(lambda x, t, c: out, noise, **kw)
        counts.append(c.n)
        rows.append(len(make_plan(sampler, n, config_for(sampler)).rows))
    return (counts[1] - counts[0]) / (rows[1] - rows[0])


def bench_floor(sampler_names: Sequence[str] = SAMPLERS, shapes: Sequence[Sequence[int]] = SHAPES, steps: int = 30,
                repeats: int = 5, progress: bool = True) -> list[dict]:
    """One row per sampler and shape (see the module docstring); times in µs per solver step."""
    rows = []
    cases = [(s, tuple(sh)) for sh in shapes for s in sampler_names]
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="loop vs floor", leave=False)
    for sampler, shape in it:
        b = shape[0]
        noise = torch.randn(shape)
        out = torch.randn(2 * b, *shape[1:])
        methods = {"fastdiff": _fastdiff_loop(sampler, shape, steps, out),
                   "fastdiff_cold": _fastdiff_loop(sampler, shape, steps, out, cold=True),
                   "diffusers": _diffusers_loop(sampler, shape, steps, out),
                   "k_diffusion": _k_diffusion_loop(sampler, shape, steps, out)}
        methods = {k: v for k, v in methods.items() if v is not None}
        nbytes, nrows = loop_bytes(sampler, shape, steps)
        # the yardstick copy moves what one row of the loop moves (fastdiff.bench.timing), sampled
        # between the loops; a sample is as many copies as last about SAMPLE_S, like the loops'
        row_bytes = nbytes * steps // nrows
        copy = copy_fn(row_bytes)
        copy()
        t0 = time.perf_counter()
        copy()
        copy_reps = max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-7)))

        calls = {}
        for name, fn in methods.items():  # warm-up (allocations, the cache, lazy imports), then calibrate
            fn(noise)
            t0 = time.perf_counter()
            fn(noise)
            calls[name] = max(1, int(SAMPLE_S / max(time.perf_counter() - t0, 1e-6)))
        best = {k: float("inf") for k in methods}
        copy_samples = []
        for _ in range(max(1, repeats)):
            for name, fn in methods.items():
                k = calls[name]
                t0 = time.perf_counter()
                for _ in range(k):
                    fn(noise)
                best[name] = min(best[name], (time.perf_counter() - t0) / k)
            t0 = time.perf_counter()
            for _ in range(copy_reps):
                copy()
            copy_samples.append((time.perf_counter() - t0) / copy_reps)
        per_step = {k: v * 1e6 / steps for k, v in best.items()}
        bw = copy_gb_s(row_bytes, copy_samples)
        floor_us = nbytes / (bw["gb_s"] * 1e9) * 1e6
        fd = per_step["fastdiff"]
        rows.append({
            "sampler": sampler, "shape": list(shape), "dtype": "fp32", "steps": steps, "rows": nrows,
            "fastdiff_us": fd, "fastdiff_cold_us": per_step["fastdiff_cold"],
            "diffusers_us": per_step.get("diffusers"), "k_diffusion_us": per_step.get("k_diffusion"),
            "bytes_per_step": nbytes, "copy_gb_s": bw["gb_s"], "copy_outliers_gb_s": bw["outliers_gb_s"],
            "floor_us": floor_us, "x_floor": fd / floor_us,
            "vs_diffusers": per_step["diffusers"] / fd if "diffusers" in per_step else None,
            "vs_k_diffusion": per_step["k_diffusion"] / fd if "k_diffusion" in per_step else None,
            "ops_per_row": ops_per_row(sampler, shape),
        })
    return rows
