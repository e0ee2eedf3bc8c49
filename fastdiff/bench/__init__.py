"""``fastdiff bench``: what the fused step saves, measured in one run, as a table, JSON and a PNG chart.

Parts (``--parts``; all by default, ``gpu`` only where CUDA is visible):

``loop``      whole ``fastdiff.sample`` runs on the built-in Gaussian-mixture model, per sampler and
              backend; the model's own time is measured separately (wall clock around each call),
              so ``sampler_us_per_step`` is what the sampler adds per step — the part fastdiff replaces.
``floor``     whole CFG loops with a zero-cost model per sampler and shape: repeated ``fastdiff.sample``
              calls against the loop's memory floor, the stock diffusers loop and k-diffusion
              (:func:`fastdiff.bench.loop.bench_floor`).
``step``      one CFG DPM-Solver++(2M) step on CPU by every method: reference, diffusers' CFG blend +
              scheduler step, ``torch.compile`` of the reference step, the fused ``cpu`` kernel, and
              the kernel through ``ops.step`` (:func:`fastdiff.bench.step.bench_case`).
``samplers``  a real plan row of every sampler (the middle row of ``make_plan(sampler, 10)``, CFG)
              through ``ops.step`` on each backend, per shape (:func:`fastdiff.bench.step.bench_samplers`).
``gpu``       the fused ``cuda``/``triton`` steps vs the reference step and ``torch.compile`` of it
              (:func:`fastdiff.bench.step.bench_gpu`).
``pipeline``  tiny offline pipelines' denoising loops, stock vs ``fastdiff.diffusers.accelerate``: a
              ``StableDiffusionPipeline``, a Flux-like ``FluxPipeline`` (image DiT) and a Wan-like
              ``WanPipeline`` (video DiT) (:func:`fastdiff.bench.pipeline.bench_pipeline`).
``guidance``  each diffusers guider's step (its ``forward`` and an eager Euler update) vs the fused
              blend and step (:func:`fastdiff.bench.guidance.bench_guiders`).

JSON (``--json``, default ``bench-results/bench.json``); times are µs, bandwidths GB/s (1e9 B/s).
A row that could not be measured carries ``error`` (a string) instead of its times.

* top level: ``schema`` (3: ``pipeline`` is a list of rows, one per pipeline kind, and each step
  row has one copy yardstick, ``copy_gb_s`` with its best and its outliers; 1 had one ``pipeline``
  dict and three copy ceilings per step row, 2 one of the two changes), ``command`` (the argv),
  ``quick`` (bool), ``machine``, ``settings`` (what each part ran; ``pipeline_latent`` is per
  pipeline kind), ``parts`` (the parts asked for), ``loop``, ``step``, ``samplers``, ``gpu``,
  ``pipeline`` (each ``null`` when the part did not run), ``skipped`` (part -> why not run),
  ``errors`` (part -> the error that stopped it), ``elapsed_s`` (part -> seconds), ``chart`` (PNG
  path or ``null``), ``guidance``.
* ``machine``: ``cpu`` (model name), ``cores``, ``torch``, ``torch_threads``, ``simd`` and
  ``kernel_threads`` (the CPU kernel's, ``null`` without it), ``gpu`` (name or ``null``),
  ``loadavg_start``, ``loadavg_end`` (1, 5, 15-minute load averages: a loaded machine slows
  2-thread regions unevenly).
* ``loop`` rows: ``sampler``, ``backend``, ``shape``, ``dtype``, ``steps`` (solver steps run:
  fewer than asked where a sampler has many rows per step, see :func:`bench_loop`), ``rows`` (model
  evaluations), ``model_us_per_step`` (model calls), ``sampler_us_per_step`` (everything between
  model calls: guidance, the step, loop overhead), ``us_per_step`` (their sum), each call and each
  stretch between calls at its minimum over the repeats; ``vs_reference`` (reference's
  ``sampler_us_per_step`` over this one's: > 1 is faster).
* ``step`` rows: ``shape``, ``dtype``, ``method``, ``us`` (median), ``us_best`` (best sample),
  ``gb_s`` (``min_bytes`` over the median), ``min_bytes`` (each input read once, each output
  written once), ``copy_gb_s`` (the copy bandwidth of :mod:`fastdiff.bench.timing` at the step's
  bytes, sampled round-robin with the methods: the median sample), ``copy_gb_s_best`` (its best
  sample), ``copy_outliers_gb_s`` (its outlier samples: shown, not used), ``frac_of_copy``
  (``gb_s`` over ``copy_gb_s``), ``frac_of_copy_best`` (best over best), ``cpu_speedup`` (this
  method's time over ``cpu``'s: how much faster the fused kernel is), ``vs_reference``
  (reference's time over this one's), ``cpu_speedup_best`` and ``vs_reference_best`` (the same
  ratios of best samples: on a loaded machine the less disturbed estimate), ``compile_s`` (first
  call of the compiled step; ``null`` for the others).
* ``samplers`` rows: ``sampler``, ``backend``, ``shape``, ``dtype``, ``row`` (plan row index),
  ``min_bytes``, ``us``, ``us_best``, ``gb_s``, ``vs_reference`` (median over median),
  ``vs_reference_best`` (best sample over best sample).
* ``gpu``: ``copy_gb_s`` (device copy, 1 GiB) and ``rows``: ``provider`` (``triton`` and ``cuda``:
  the backend's prepared program, what the loop runs; ``triton (step)``: its unprepared ``step``),
  ``variant`` (``multistep_cfg`` or ``ancestral_cfg``), ``dtype``, ``shape``, ``device_us`` (device
  time per step inside a CUDA graph, operands rotated so that L2 is cold: ``cold_l2``; ``timing``
  says ``graph`` or the fallback used), ``floor_us`` (a copy of the same bytes timed alike) and
  ``x_floor`` (``device_us`` over it), ``host_us`` (host time to issue one step, 100 back to back,
  unsynchronised), ``wall_us`` (the same until the device is done), ``gb_s``, ``min_bytes``,
  ``frac_of_copy`` (``gb_s`` over the 1 GiB copy), ``vs_reference`` (by device time).
* ``pipeline`` rows (:class:`fastdiff.bench.pipeline.PipelineRow`), one per pipeline kind:
  ``kind`` (``sd``, ``flux``, ``wan``), ``pipeline``, ``model`` (the denoiser) and ``scheduler``
  (class names), ``backend`` (of the accelerated run), ``latent`` (shape of the latents the loop
  steps: Flux's packed, batch x tokens x channels; Wan's batch x channels x frames x height x
  width), ``steps``, ``guidance_scale`` (Flux: ``true_cfg_scale``; the stock Flux and Wan loops
  call the transformer once per CFG branch, fastdiff's once on the batched branches); per
  denoising step, each the minimum over the timed calls, ``stock_us_per_step``,
  ``stock_model_us_per_step`` (UNet or transformer forward), ``stock_sched_us_per_step`` (the
  rest: CFG blend, scheduler step, loop overhead), ``stock_sched_share`` (the rest over the step),
  the same for the accelerated pipeline (``fused_us_per_step``, ``fused_model_us_per_step``,
  ``fused_sched_us_per_step``, ``fused_sched_share``), and ``sched_speedup``
  (``stock_sched_us_per_step`` over ``fused_sched_us_per_step``); a row that failed has ``kind``,
  ``pipeline`` and ``error``.
* ``guidance`` rows (:func:`fastdiff.bench.guidance.bench_guiders`): ``guider``, ``shape``, ``dtype``,
  ``backend`` (of the fused step), ``stock_us`` and ``fused_us`` (medians of interleaved samples),
  ``stock_us_best``, ``fused_us_best``, ``speedup`` (median over median) and ``speedup_best``.
* ``floor`` rows (µs per solver step, 30 steps of CFG 7.5 with a zero-cost model): ``sampler``,
  ``shape``, ``dtype``, ``steps``, ``rows``, ``fastdiff_us`` (repeated ``fastdiff.sample`` calls),
  ``fastdiff_cold_us`` (the first call after ``clear_cache``), ``diffusers_us`` and
  ``k_diffusion_us`` (the stock loops; ``null`` where the library lacks the sampler),
  ``bytes_per_step`` (what the fused loop must move), ``copy_gb_s`` (the copy bandwidth of
  :mod:`fastdiff.bench.timing` at one row's bytes, same run: the median sample),
  ``copy_outliers_gb_s`` (its outlier samples, not used), ``floor_us`` (``bytes_per_step`` over
  ``copy_gb_s``), ``x_floor`` (``fastdiff_us`` over it),
  ``vs_diffusers`` and ``vs_k_diffusion`` (their time over fastdiff's), ``ops_per_row`` (torch
  operations fastdiff issues per row outside the model).

The PNG (``--png``, default: the JSON path with ``.png``) plots the speedup over ``reference`` of
each fused backend per sampler and shape, the fused step against each method it replaces, the loop's
sampler part per sampler, and GPU rows where present.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from ..runtime import ops
from .. import samplers
from ..api import make_plan, sample
from .loop import SAMPLERS as FLOOR_SAMPLERS
from .loop import SHAPES as FLOOR_SHAPES
from .loop import bench_floor
from .step import (DTYPES, GPU_DTYPES, GPU_SHAPES, GPU_VARIANTS, SHAPES, bench_case, bench_gpu, bench_samplers,
                         dtype_name, gpu_copy_gbps, machine, schedule_for)
from ..models import GaussianMixture
from ..core.schedules import from_config, is_schedule

PARTS = ("loop", "floor", "step", "samplers", "gpu", "pipeline", "guidance")
SCHEMA = 3
FIELDS = {
    "top": ("schema", "command", "quick", "machine", "settings", "parts", "loop", "floor", "step", "samplers", "gpu",
            "pipeline", "guidance", "skipped", "errors", "elapsed_s", "chart"),
    "machine": ("cpu", "cores", "torch", "torch_threads", "simd", "kernel_threads", "gpu", "loadavg_start",
                "loadavg_end"),
    "loop": ("sampler", "backend", "shape", "dtype", "steps", "rows", "us_per_step", "model_us_per_step",
             "sampler_us_per_step", "vs_reference"),
    "floor": ("sampler", "shape", "dtype", "steps", "rows", "fastdiff_us", "fastdiff_cold_us", "diffusers_us",
              "k_diffusion_us", "bytes_per_step", "copy_gb_s", "copy_outliers_gb_s", "floor_us", "x_floor",
              "vs_diffusers", "vs_k_diffusion", "ops_per_row"),
    "step": ("shape", "dtype", "method", "us", "us_best", "gb_s", "min_bytes", "copy_gb_s", "copy_gb_s_best",
             "copy_outliers_gb_s", "frac_of_copy", "frac_of_copy_best", "cpu_speedup",
             "cpu_speedup_best", "vs_reference", "vs_reference_best", "compile_s"),
    "samplers": ("sampler", "backend", "shape", "dtype", "row", "min_bytes", "us", "us_best", "gb_s", "vs_reference",
                 "vs_reference_best"),
    "gpu": ("copy_gb_s", "rows"),
    "gpu_rows": ("provider", "variant", "dtype", "shape", "device_us", "floor_us", "x_floor", "host_us", "wall_us",
                 "gb_s", "min_bytes", "frac_of_copy", "vs_reference", "timing", "cold_l2"),
    "pipeline": ("kind", "pipeline", "model", "scheduler", "backend", "latent", "steps", "guidance_scale",
                 "stock_us_per_step", "stock_model_us_per_step", "stock_sched_us_per_step", "stock_sched_share",
                 "fused_us_per_step", "fused_model_us_per_step", "fused_sched_us_per_step", "fused_sched_share",
                 "sched_speedup"),
    "guidance": ("guider", "shape", "dtype", "backend", "stock_us", "fused_us", "stock_us_best", "fused_us_best",
                 "speedup", "speedup_best"),
}
"""The documented JSON fields, per section (a measured row has them all; a failed one has ``error``)."""


# ------------------------------------------------------------------------------------- loop


@dataclass
class LoopResult:
    """One row of the loop benchmark (µs per solver step)."""

    sampler: str
    backend: str
    shape: tuple[int, ...]
    dtype: str
    steps: int
    rows: int
    us_per_step: float
    model_us_per_step: float
    sampler_us_per_step: float


class _Clock:
    """Per-call model time and the host time between calls (the sampler's share of each step)."""

    def __init__(self, model):
        self.model = model
        self.calls: list[float] = []
        self.gaps: list[float] = []
        self._last = 0.0

    def start(self) -> None:
        self.calls, self.gaps = [], []
        self._last = time.perf_counter()

    def stop(self) -> None:
        self.gaps.append(time.perf_counter() - self._last)  # after the last call: final scaling, checks

    def __call__(self, x, t, *a, **k):
        t0 = time.perf_counter()
        self.gaps.append(t0 - self._last)  # the step before this call (the first: set-up)
        out = self.model(x, t, *a, **k)
        self._last = time.perf_counter()
        self.calls.append(self._last - t0)
        return out


def bench_loop(
    sampler_names: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    shape: Sequence[int] = (16, 4, 32, 32),
    steps: int = 20,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    max_rows: int | None = None,
) -> list[LoopResult]:
    """Time ``fastdiff.sample`` on the Gaussian-mixture model for each sampler x backend (CPU).

    A sampler whose plan has more than ``max_rows`` rows (default ``4 * steps``; annealed Langevin
    runs 100 corrector rows per noise level) runs fewer steps, so that one run stays near that many
    model evaluations; ``steps`` of its result says how many ran, and times are per step either way.

    After one warm-up run, ``repeats`` runs are timed around every model call; each model call
    and each stretch between calls (the sampler's work: guidance, the step, loop overhead, set-up
    before the first call and the end after the last) keeps its minimum over the runs, and those
    minima are summed. Taking the minimum per stretch rather than per run keeps one stall of a
    loaded machine out of the sum.
    """
    names = list(sampler_names or samplers.available())
    if backends is None:
        backends = [b for b in ("reference", "cpu") if ops.backend_status(b)[0]]
    gm = GaussianMixture.default(tuple(shape[1:]), components=4)
    max_rows = max_rows or 4 * steps
    results = []
    combos = [(n, b) for n in names for b in backends]
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="loop", leave=False)
    for name, backend in it:
        sched = schedule_for(name)
        plan = make_plan(name, steps, sched)
        if len(plan.rows) > max_rows:
            plan = make_plan(name, max(1, steps * max_rows // len(plan.rows)), sched)
        s = sched if is_schedule(sched) else from_config(sched)
        clock = _Clock(gm.model(s.alpha_sigma, plan.prediction, times=[r.t for r in plan.rows]))
        noise = torch.randn(tuple(shape), dtype=dtype)
        sample(clock, noise, plan=plan, seed=0, backend=backend)  # warm-up (allocations, first dispatch)
        calls = gaps = None
        for _ in range(max(1, repeats)):
            clock.start()
            sample(clock, noise, plan=plan, seed=0, backend=backend)
            clock.stop()
            calls = clock.calls if calls is None else [min(a, b) for a, b in zip(calls, clock.calls)]
            gaps = clock.gaps if gaps is None else [min(a, b) for a, b in zip(gaps, clock.gaps)]
        per = 1e6 / plan.steps
        model_s, sampler_s = sum(calls), sum(gaps)
        results.append(LoopResult(name, backend, tuple(shape), dtype_name(dtype), plan.steps, len(plan.rows),
                                  (model_s + sampler_s) * per, model_s * per, sampler_s * per))
    return results


def loop_rows(results: Sequence[LoopResult]) -> list[dict]:
    """JSON rows of the loop benchmark, with the sampler-part speedup over ``reference``."""
    ref = {(r.sampler, r.shape, r.dtype): r.sampler_us_per_step for r in results if r.backend == "reference"}
    rows = []
    for r in results:
        base = ref.get((r.sampler, r.shape, r.dtype))
        d = asdict(r)
        d["shape"] = list(r.shape)
        d["vs_reference"] = base / r.sampler_us_per_step if base and r.sampler_us_per_step > 0 else None
        rows.append(d)
    return rows


# ------------------------------------------------------------------------------------- the whole run


def settings(quick: bool, **over) -> dict:
    """What each part runs: the quick or full defaults, with the non-``None`` entries of ``over`` applied."""
    s = {
        "loop_shape": [16, 4, 32, 32], "loop_steps": 4 if quick else 20, "loop_repeats": 1 if quick else 3,
        "floor_samplers": None,
        "floor_shapes": [[1, 4, 8, 8], [1, 4, 64, 64]] if quick else [list(x) for x in FLOOR_SHAPES],
        "floor_steps": 10 if quick else 30, "floor_repeats": 2 if quick else 5,
        "samplers": None, "backends": None,
        "step_shapes": [[1, 4, 64, 64]] if quick else [list(x) for x in SHAPES],
        "step_dtypes": ["fp32"] if quick else ["fp32", "fp16"], "step_repeats": 5 if quick else 25,
        "compile": True,
        "sampler_shapes": [[1, 4, 64, 64]] if quick else [[1, 4, 64, 64], [4, 4, 128, 128], [2, 3, 512, 512]],
        "sampler_repeats": 5 if quick else 15,
        "gpu_shapes": [[2, 3, 512, 512]] if quick else [list(x) for x in GPU_SHAPES],
        # pipeline: latent height = width per kind (Flux: pixels = latents; Wan: plus pipeline_frames latent
        # frames), the largest that keep the full part near 2 minutes on the 2-core machine, 1 thread
        "pipeline_kinds": ["sd", "flux", "wan"], "pipeline_steps": 4 if quick else 20,
        "pipeline_latent": {"sd": 8, "flux": 8, "wan": 8} if quick else {"sd": 96, "flux": 128, "wan": 64},
        "pipeline_frames": 2 if quick else 5, "pipeline_repeats": 1 if quick else 3,
        "guidance_shape": [1, 4, 32, 32] if quick else [16, 4, 128, 128], "guidance_repeats": 3 if quick else 15,
    }
    s.update({k: v for k, v in over.items() if v is not None})
    return s


def run(parts: Sequence[str] = PARTS, quick: bool = False, progress: bool = True, command: str = "",
        log: Callable[[str], None] | None = None, **over) -> dict:
    """Run the parts of ``fastdiff bench`` and return the JSON document (see the module docstring).

    ``over`` overrides entries of :func:`settings` (``loop_shape``, ``samplers``, ``step_shapes``, ...).
    A part that fails is recorded in ``errors`` and the next part runs.
    """
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"parts must be among {PARTS}, got {bad}")
    s = settings(quick, **over)
    log = log or (lambda msg: None)
    doc = {"schema": SCHEMA, "command": command, "quick": quick, "machine": machine(), "settings": s,
           "parts": list(parts), **{p: None for p in PARTS}, "skipped": {}, "errors": {}, "elapsed_s": {},
           "chart": None}

    def do_loop():
        log(f"loop: Gaussian-mixture model, shape {tuple(s['loop_shape'])}, {s['loop_steps']} steps, fp32, "
            f"best of {s['loop_repeats']}")
        return loop_rows(bench_loop(s["samplers"], s["backends"], s["loop_shape"], s["loop_steps"],
                                    s["loop_repeats"], progress=progress))

    def do_floor():
        names = s["floor_samplers"] or s["samplers"] or (["dpmpp_2m", "euler_ancestral"] if quick
                                                         else list(FLOOR_SAMPLERS))
        log(f"floor: CFG loops with a zero-cost model, {len(names)} samplers x {len(s['floor_shapes'])} shapes, "
            f"{s['floor_steps']} steps, fp32, best of {s['floor_repeats']} round-robin rounds")
        return bench_floor(names, s["floor_shapes"], s["floor_steps"], s["floor_repeats"], progress=progress)

    def do_step():
        log(f"step: CFG DPM++(2M) step by method, {len(s['step_shapes'])} shapes x {s['step_dtypes']}, "
            f"median of {s['step_repeats']}")
        cases = [(d, sh) for d in s["step_dtypes"] for sh in s["step_shapes"]]
        it = cases
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(cases, desc="step by method", leave=False)
        rows = []
        for d, sh in it:
            rows += bench_case(sh, DTYPES[d], s["step_repeats"], with_compile=s["compile"])
        return rows

    def do_samplers():
        log(f"samplers: a plan row per sampler through ops.step, shapes {[tuple(x) for x in s['sampler_shapes']]}")
        return bench_samplers(s["samplers"], s["backends"], s["sampler_shapes"], repeats=s["sampler_repeats"],
                              progress=progress)

    def do_gpu():
        log(f"gpu: {torch.cuda.get_device_name(0)}, shapes {[tuple(x) for x in s['gpu_shapes']]}")
        copy = gpu_copy_gbps()
        return {"copy_gb_s": copy, "rows": bench_gpu(s["gpu_shapes"], GPU_DTYPES, GPU_VARIANTS,
                                                     copy_gbps=copy, progress=progress)}

    def do_pipeline():
        from .pipeline import as_dict, bench_pipeline

        kinds = s["pipeline_kinds"]
        log(f"pipeline: tiny {', '.join(kinds)} pipelines, latent {s['pipeline_latent']} "
            f"(wan: {s['pipeline_frames']} frames), {s['pipeline_steps']} steps, CFG 7.5, "
            f"best of {s['pipeline_repeats']}")
        import warnings

        from diffusers.utils import logging as dlogging

        verbosity = dlogging.get_verbosity()
        dlogging.set_verbosity_error()  # the tiny pipelines' config notes are not results
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(kinds), desc="pipeline", leave=False)
        rows = []
        try:
            for kind in kinds:
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", FutureWarning)
                        rows.append(as_dict(bench_pipeline(steps=s["pipeline_steps"], latent=s["pipeline_latent"][kind],
                                                           repeats=s["pipeline_repeats"], kind=kind,
                                                           frames=s["pipeline_frames"])))
                except Exception as exc:  # noqa: BLE001 - one pipeline failing must not lose the others
                    rows.append({"kind": kind, "pipeline": _PIPELINE_NAMES.get(kind, kind),
                                 "error": f"{type(exc).__name__}: {exc}"[:500]})
                if bar is not None:
                    bar.update(1)
        finally:
            dlogging.set_verbosity(verbosity)
            if bar is not None:
                bar.close()
        if rows and all("error" in r for r in rows):
            raise RuntimeError(rows[0]["error"])
        return rows

    def do_guidance():
        from .guidance import bench_guiders

        log(f"guidance: each diffusers guider's step, stock vs fused, shape {tuple(s['guidance_shape'])}, fp32, "
            f"median of {s['guidance_repeats']}")
        return bench_guiders(s["guidance_shape"], s["guidance_repeats"], progress=progress)

    jobs = {"loop": do_loop, "floor": do_floor, "step": do_step, "samplers": do_samplers, "gpu": do_gpu,
            "pipeline": do_pipeline, "guidance": do_guidance}
    for part in parts:
        why = _why_skip(part)
        if why:
            doc["skipped"][part] = why
            log(f"{part}: skipped ({why})")
            continue
        t0 = time.perf_counter()
        try:
            doc[part] = jobs[part]()
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others
            doc["errors"][part] = f"{type(exc).__name__}: {exc}"[:500]
            log(f"{part}: FAILED ({doc['errors'][part]})")
        doc["elapsed_s"][part] = round(time.perf_counter() - t0, 2)
    doc["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return doc


_PIPELINE_NAMES = {"sd": "StableDiffusionPipeline", "flux": "FluxPipeline", "wan": "WanPipeline"}


def _why_skip(part: str) -> str:
    import importlib.util

    if part == "gpu" and not torch.cuda.is_available():
        return "no CUDA device visible"
    if part in ("pipeline", "guidance"):
        need = ("diffusers", "transformers", "tokenizers") if part == "pipeline" else ("diffusers",)
        missing = [m for m in need if importlib.util.find_spec(m) is None]
        if missing:
            return f"not installed: {', '.join(missing)}"
    return ""


# ------------------------------------------------------------------------------------- tables


def _f(v, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _shape(s) -> str:
    return "x".join(map(str, s))


def tables(doc: dict) -> list[tuple[str, list[str], list[list[str]], str]]:
    """The report as ``(title, header, rows, note)`` tables (strings), one per part that ran."""
    out = []
    if doc.get("loop"):
        rows = [[r["sampler"], r["backend"], str(r["steps"]), str(r["rows"]), _f(r["us_per_step"]),
                 _f(r["model_us_per_step"]), _f(r["sampler_us_per_step"]), _x(r["vs_reference"])] for r in doc["loop"]]
        r0 = doc["loop"][0]
        out.append((f"Sampling loop, Gaussian-mixture model, shape {tuple(r0['shape'])}, {r0['dtype']} (µs per step)",
                    ["sampler", "backend", "steps", "rows", "µs/step", "model", "sampler", "vs ref"], rows,
                    "sampler = step minus model: what fastdiff replaces; vs ref = reference's sampler part / this"))
    if doc.get("floor"):
        rows = [[r["sampler"], _shape(r["shape"]), _f(r["fastdiff_us"]), _f(r["fastdiff_cold_us"]),
                 _f(r["diffusers_us"]), _f(r["k_diffusion_us"]), _f(r["floor_us"]), _x(r["x_floor"]),
                 _x(r["vs_diffusers"]), _x(r["vs_k_diffusion"]), _f(r["ops_per_row"], ".0f")] for r in doc["floor"]]
        r0 = doc["floor"][0]
        out.append((f"Whole CFG loop, zero-cost model, {r0['steps']} steps, {r0['dtype']} (µs per step)",
                    ["sampler", "shape", "fastdiff", "cold", "diffusers", "k-diff", "floor", "x floor", "x diffusers",
                     "x k-diff", "ops/row"], rows,
                    "fastdiff: repeated fastdiff.sample calls; cold: the first, preparation included; floor: bytes "
                    "the fused loop moves / copy_ bandwidth at one row's bytes (same run); x diffusers, x k-diff: "
                    "their time / fastdiff's; ops/row: torch ops fastdiff issues per row outside the model"))
    if doc.get("step"):
        rows = []
        for r in doc["step"]:
            if "error" in r:
                rows.append([_shape(r["shape"]), r["dtype"], r["method"], "error: " + r["error"][:60]]
                            + [""] * 10)
                continue
            outl = r.get("copy_outliers_gb_s") or []
            outl_s = " ".join(f"{v:.3g}" for v in outl[:4]) + (" ..." if len(outl) > 4 else "")
            rows.append([_shape(r["shape"]), r["dtype"], r["method"], _f(r["us"]), _f(r["us_best"]), _f(r["gb_s"], ".2f"),
                         _f(r["copy_gb_s"], ".2f"), outl_s,
                         f"{100 * r['frac_of_copy']:.0f}%", f"{100 * r['frac_of_copy_best']:.0f}%",
                         _x(r["cpu_speedup"]), _x(r["cpu_speedup_best"]), _x(r["vs_reference"]), _f(r["compile_s"])])
        out.append(("One CFG DPM++(2M) step on CPU, by method (median µs of round-robin samples)",
                    ["shape", "dtype", "method", "µs/step", "best µs", "GB/s", "copy GB/s", "copy outliers", "%copy",
                     "best %", "cpu x", "best cpu x", "vs ref", "compile s"], rows,
                    "GB/s: minimum bytes / median time; copy GB/s: median of copy_ samples moving the same bytes, "
                    "taken with the methods (outliers: the GB/s of samples left out); "
                    "cpu x: this method's median / the fused kernel's (best: of the best samples)"))
    if doc.get("samplers"):
        backends = list(dict.fromkeys(r["backend"] for r in doc["samplers"]))
        by = {}
        for r in doc["samplers"]:
            by.setdefault((r["sampler"], tuple(r["shape"]), r["dtype"]), {})[r["backend"]] = r
        rows = []
        for (name, shape, dt), cell in by.items():
            line = [name, _shape(shape), dt]
            line += [_f(cell[b].get("us")) if b in cell and "error" not in cell[b] else "error" for b in backends]
            for b in backends:
                if b != "reference":
                    line += [_x(cell[b].get("vs_reference")) if b in cell else "-",
                             _x(cell[b].get("vs_reference_best")) if b in cell else "-"]
            rows.append(line)
        out.append(("Fused step per sampler: the middle plan row, CFG, through ops.step (median µs)",
                    ["sampler", "shape", "dtype", *(f"{b} µs" for b in backends),
                     *(h for b in backends if b != "reference" for h in (f"{b} vs ref", "best vs ref"))], rows,
                    "vs ref: reference's median / this median; best vs ref: the same for the best samples"))
    gpu = doc.get("gpu")
    if gpu and gpu.get("rows"):
        rows = []
        for r in gpu["rows"]:
            if "error" in r:
                rows.append([r["variant"], r["dtype"], _shape(r["shape"]), r["provider"], r["error"][:60],
                             *[""] * 5])
                continue
            rows.append([r["variant"], r["dtype"], _shape(r["shape"]), r["provider"], _f(r["device_us"]),
                         _x(r.get("x_floor")), _f(r.get("host_us")), _f(r["wall_us"]), _f(r["gb_s"], ".0f"),
                         _x(r["vs_reference"])])
        out.append((f"GPU step ({doc['machine'].get('gpu')}; copy {_f(gpu.get('copy_gb_s'), '.0f')} GB/s)",
                    ["variant", "dtype", "shape", "provider", "device µs", "x floor", "host µs", "wall µs", "GB/s",
                     "vs ref"],
                    rows, "device µs: per step inside a CUDA graph, cold L2; x floor: over a copy of the same "
                          "bytes timed alike; host µs: to issue one step; wall µs: until the device is done"))
    if doc.get("pipeline"):
        rows = []
        for p in doc["pipeline"]:
            if "error" in p:
                rows.append([p["pipeline"], "error: " + p["error"][:80], "", "", "", "", "", ""])
                continue
            for loop, pre in (("stock", "stock"), (f"fastdiff ({p['backend']})", "fused")):
                rows.append([p["pipeline"] if pre == "stock" else "", loop,
                             _shape(p["latent"]) if pre == "stock" else "", _f(p[f"{pre}_us_per_step"]),
                             _f(p[f"{pre}_model_us_per_step"]), _f(p[f"{pre}_sched_us_per_step"]),
                             f"{p[f'{pre}_sched_share']:.1%}", _x(p["sched_speedup"]) if pre == "fused" else ""])
        ok = [p for p in doc["pipeline"] if "error" not in p]
        r0 = ok[0] if ok else {}
        out.append((f"Pipeline denoising loop, stock vs fastdiff.diffusers.accelerate ({r0.get('steps')} steps, "
                    f"CFG {r0.get('guidance_scale')}; µs per step)",
                    ["pipeline", "loop", "latent", "µs/step", "model", "scheduler", "share", "sched x"], rows,
                    "tiny random-weight pipelines; scheduler = step minus model forward (CFG blend, scheduler step, "
                    "loop overhead); share = scheduler / step; sched x = stock scheduler part / fastdiff's; "
                    + ", ".join(f"{p['pipeline']}: {p['model']} + {p['scheduler']}" for p in ok)))
    if doc.get("guidance"):
        rows = [[r["guider"], _f(r["stock_us"]), _f(r["fused_us"]), _x(r["speedup"]), _x(r["speedup_best"])]
                for r in doc["guidance"]]
        r0 = doc["guidance"][0]
        out.append((f"Guided step, stock guider + eager Euler vs fused (shape {tuple(r0['shape'])}, {r0['dtype']}, "
                    f"{r0['backend']}; median µs)", ["guider", "stock µs", "fused µs", "speedup", "best"], rows,
                    "stock: the diffusers guider's forward and x + dt * pred; fused: the blend coefficients "
                    "(one Gram pass where needed) and one fused step"))
    return out


def format_plain(doc: dict) -> str:
    """The tables as plain text (what ``fastdiff bench`` prints without rich)."""
    blocks = []
    for title, head, rows, note in tables(doc):
        widths = [max(len(h), *(len(r[i]) if i < len(r) else 0 for r in rows)) for i, h in enumerate(head)]
        line = "  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))
        text = [title, line, "-" * len(line)]
        for r in rows:
            text.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if note:
            text.append(note)
        blocks.append("\n".join(text))
    return "\n\n".join(blocks)


def print_tables(doc: dict, use_rich: bool | None = None, file=None) -> None:
    """Print the report with rich if it is installed (and ``use_rich`` is not ``False``), else plain text."""
    file = file or sys.stdout
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich is False:
        print(format_plain(doc), file=file)
        return
    tty = hasattr(file, "isatty") and file.isatty()
    console = Console(file=file, width=None if tty else 200, soft_wrap=not tty)
    for title, head, rows, note in tables(doc):
        t = Table(title=title, caption=note or None, title_justify="left", caption_justify="left")
        for i, h in enumerate(head):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            t.add_row(*r)
        console.print(t)


# ------------------------------------------------------------------------------------- chart


def write_chart(doc: dict, path: str) -> str:
    """Write the speedup chart as PNG; returns ``""``, or why no chart was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fastdiff[bench]')"
    panels = []
    if doc.get("samplers"):
        panels.append(("samplers", "Fused step vs reference, per sampler and shape (plan row, CFG; best samples)"))
    if doc.get("step"):
        panels.append(("step", "Fused cpu step vs what it replaces (CFG DPM++(2M) step; best samples)"))
    if doc.get("loop"):
        panels.append(("loop", "Whole loop: sampler part vs reference (Gaussian-mixture model)"))
    if doc.get("gpu") and doc["gpu"].get("rows"):
        panels.append(("gpu", "GPU step vs reference (device time)"))
    if not panels:
        return "no measured rows to plot"
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.6 * len(panels)), squeeze=False)
    for ax, (kind, title) in zip(axes[:, 0], panels):
        if kind == "samplers":
            series = {}
            for r in doc["samplers"]:
                if r["backend"] != "reference" and r.get("vs_reference_best"):
                    series.setdefault(f"{r['backend']} {_shape(r['shape'])} {r['dtype']}", {})[r["sampler"]] = \
                        r["vs_reference_best"]
            cats = list(dict.fromkeys(r["sampler"] for r in doc["samplers"]))
        elif kind == "step":
            series = {}
            for r in doc["step"]:
                if r["method"] in ("reference", "diffusers", "compiled") and r.get("cpu_speedup_best"):
                    series.setdefault(f"cpu vs {r['method']}", {})[f"{_shape(r['shape'])}\n{r['dtype']}"] = \
                        r["cpu_speedup_best"]
            cats = list(dict.fromkeys(f"{_shape(r['shape'])}\n{r['dtype']}" for r in doc["step"]))
        elif kind == "loop":
            series = {}
            for r in doc["loop"]:
                if r["backend"] != "reference" and r.get("vs_reference"):
                    series.setdefault(r["backend"], {})[r["sampler"]] = r["vs_reference"]
            cats = list(dict.fromkeys(r["sampler"] for r in doc["loop"]))
        else:
            series = {}
            for r in doc["gpu"]["rows"]:
                if r["provider"] != "reference" and r.get("vs_reference"):
                    series.setdefault(r["provider"], {})[f"{r['variant']}\n{r['dtype']} {_shape(r['shape'])}"] = \
                        r["vs_reference"]
            cats = list(dict.fromkeys(f"{r['variant']}\n{r['dtype']} {_shape(r['shape'])}" for r in doc["gpu"]["rows"]))
        width = min(0.8 / max(1, len(series)), 0.3)
        labelled = len(series) * len(cats) <= 30
        for k, (label, vals) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i, c in enumerate(cats) if c in vals]
            bars = ax.bar(xs, [vals[c] for c in cats if c in vals], width, label=label)
            if labelled:
                ax.bar_label(bars, fmt="%.1f", fontsize=6)
        ax.set_xlim(-0.75, len(cats) - 0.25)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=30 if kind in ("samplers", "loop") else 0, ha="right" if kind in
                           ("samplers", "loop") else "center", fontsize=8)
        ax.set_ylabel("speedup (x)")
        ax.set_title(title, fontsize=10)
        if any(v > 0 for vals in series.values() for v in vals.values()):
            ax.set_yscale("log")
        if series:
            ax.legend(fontsize=7, ncol=min(4, len(series)))
    m = doc.get("machine", {})
    fig.suptitle(f"fastdiff bench: {m.get('cpu')}, {m.get('torch_threads')} threads, torch {m.get('torch')}"
                 + (f", {m['gpu']}" if m.get("gpu") else ""), fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90, format="png")  # PNG at exactly this path, whatever its extension
    plt.close(fig)
    return ""


def write_json(doc: dict, path: str) -> None:
    """Write the document as JSON (creating the folder)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
