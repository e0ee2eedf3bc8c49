"""Where each sampling step's time goes: model, guidance, noise, solver update, host overhead, syncs.

``fastdiff.bench.profile(...)`` runs the same sampling loop up to three ways in one process — through
the stock diffusers scheduler (if diffusers is installed and mirrors the sampler), through the
``reference`` backend, and through the fused backend — and reports per step and in total the time
in each part, the host-sync count and the sampler's share of the step, against diffusers' own rule
of thumb (scheduler under 1% of the step is healthy, over 5% is not). It can write a Chrome trace.

``profile_pipeline(pipe, call_kwargs)`` does the same for a whole diffusers pipeline: its stock loop
against ``fastdiff.diffusers.accelerate``, per step the model's forward time and the rest (CFG blend,
scheduler step, loop overhead), timed by forward hooks as the ``pipeline`` part of ``fastdiff bench``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..runtime import ops
from ..api import make_plan
from ..models.denoisers import as_model
from ..core.guidance import Guidance
from ..runtime.loop import LoopOptions, run_plan
from ..models import GaussianMixture
from ..core.rng import expand_seeds
from .step import schedule_for
from ..core.schedules import from_config, is_schedule
from .timing import RegionTimer, SyncCounter

PARTS = ("model", "guidance", "noise", "step", "host")
"""Report columns: model forward, guidance (blend / reductions), noise draws, solver update, host."""
HEALTHY_SHARE = 0.01
"""diffusers' rule of thumb: a scheduler under 1% of the step is healthy ..."""
UNHEALTHY_SHARE = 0.05
"""... and over 5% is not."""

DIFFUSERS_EQUIVALENT: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpmpp_3m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow_heun": ("FlowMatchHeunDiscreteScheduler", {}),
}
"""The stock diffusers scheduler (class name, extra config) each sampler mirrors."""


@dataclass
class VariantReport:
    """One way of running the loop. Times are µs per model evaluation (row) unless named total."""

    name: str
    backend: str
    rows: int
    total_us: float
    parts_us: dict[str, float]
    per_row_us: list[dict[str, float]]
    syncs: int
    sync_ops: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def sampler_share(self) -> float:
        """Fraction of the step that is not the model forward."""
        return 1.0 - self.parts_us.get("model", 0.0) / self.total_us if self.total_us > 0 else 0.0


@dataclass
class ProfileReport:
    """What :func:`profile` measured (see :meth:`table`, :meth:`to_json`, :meth:`write_trace`)."""

    sampler: str
    steps: int
    shape: tuple[int, ...]
    dtype: str
    device: str
    guidance_scale: float | None
    variants: list[VariantReport]
    skipped: dict[str, str]
    trace_events: list[dict] = field(default_factory=list, repr=False)

    def table(self) -> str:
        """A plain-text table: µs per step per part, syncs, sampler share and its health."""
        head = f"{'variant':<22}" + "".join(f"{p:>10}" for p in PARTS) + f"{'total':>10}{'syncs':>7}{'share':>8}  verdict"
        lines = [f"fastdiff profile: {self.sampler}, {self.steps} steps, shape {self.shape}, {self.dtype}, "
                 f"{self.device}, guidance {self.guidance_scale}", "µs per model evaluation", head, "-" * len(head)]
        for v in self.variants:
            share = v.sampler_share
            verdict = "healthy" if share < HEALTHY_SHARE else ("not healthy" if share > UNHEALTHY_SHARE else "borderline")
            lines.append(f"{v.name:<22}" + "".join(f"{v.parts_us.get(p, 0.0):>10.1f}" for p in PARTS)
                         + f"{v.total_us:>10.1f}{v.syncs:>7}{share:>7.1%}  {verdict}")
        lines.append(f"reference line: scheduler share < {HEALTHY_SHARE:.0%} healthy, > {UNHEALTHY_SHARE:.0%} not "
                     "(diffusers' rule of thumb)")
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The documented JSON form (``fastdiff profile --json``)."""
        return {
            "sampler": self.sampler, "steps": self.steps, "shape": list(self.shape), "dtype": self.dtype,
            "device": self.device, "guidance_scale": self.guidance_scale, "parts": list(PARTS),
            "variants": [dict(asdict(v), sampler_share=v.sampler_share) for v in self.variants],
            "skipped": self.skipped,
        }

    def write_trace(self, path: str) -> None:
        """Write a Chrome trace (chrome://tracing, Perfetto) of every variant's regions."""
        with open(path, "w") as f:
            json.dump({"traceEvents": self.trace_events, "displayTimeUnit": "ms"}, f)


def _import_spec(spec: str, what: str):
    """``(object, attr)`` named by ``module:attr`` (``attr`` may be dotted); a ``ValueError`` naming ``what``
    and ``spec`` for a malformed spec, a module that does not import or a missing attribute."""
    mod, sep, attr = spec.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"{what} must be 'module:attr', got {spec!r}")
    try:
        obj = importlib.import_module(mod)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import {mod!r} ({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {type(obj).__name__} {getattr(obj, '__name__', '')!r} "
                             f"has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj, attr


def load_model(spec: str) -> Callable:
    """Import ``module:attr`` (a callable model, or a zero-argument factory named ``make_*``;
    ``attr`` may be dotted). Every failure is a ``ValueError`` naming ``spec``."""
    obj, attr = _import_spec(spec, "model")
    if attr.rsplit(".", 1)[-1].startswith("make_"):
        obj = obj()
    if not callable(obj):
        raise ValueError(f"model {spec!r} is a {type(obj).__name__}, not a callable model(x, t)")
    return obj


def _check_model(fn: Callable, noise: torch.Tensor, t: float) -> None:
    """Call a user's model once, as the loop will, so that a model that cannot run fails with a
    ``ValueError`` before anything is timed."""
    x = noise.clone()
    tt = torch.full((x.shape[0],), float(t), dtype=torch.float32, device=x.device)
    try:
        out = fn(x, tt)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's model is reported as such
        raise ValueError(f"model(x, t) failed on x of shape {tuple(x.shape)} ({type(exc).__name__}: {exc})") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(x.shape):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model(x, t) must return a tensor of x's shape {tuple(x.shape)}, got {got}")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that can hold and return real tensors, else ``ValueError``."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"device {str(device)!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA device visible")
    try:
        (torch.zeros(1, device=dev) + 1).cpu()
    except Exception as exc:  # noqa: BLE001 - any failure means the device cannot be profiled
        raise ValueError(f"device {str(device)!r} cannot run tensors here ({type(exc).__name__}: {exc})") from None
    return dev


VARIANTS = ("diffusers", "reference", "fused")


def _summarise(name: str, backend: str, timer: RegionTimer, nrows: int, syncs: SyncCounter, note: str = ""):
    use_device = timer.cuda
    per_row = [{p: 0.0 for p in PARTS} for _ in range(nrows)]
    for row, region, host_s, _start, dev_s, parent in timer.records:
        if not 0 <= row < nrows:
            continue
        secs = dev_s if use_device else host_s
        if parent is not None:  # a region inside another (the reference step's phases, wherever that
            # step runs: in "step", or in "guidance" for a Langevin corrector's step size) moves its
            # time out of the enclosing region's part into its own
            per_row[row][_part(parent)] -= secs
        per_row[row][_part(region)] += secs
    for i in range(nrows):
        wall = timer.row_walls.get(i, 0.0)
        busy = sum(v for k, v in per_row[i].items() if k != "host")
        per_row[i]["host"] += max(wall - busy, 0.0)
    total = sum(sum(r.values()) for r in per_row)
    parts = {p: 1e6 * sum(r[p] for r in per_row) / nrows for p in PARTS}
    rows_us = [{p: 1e6 * r[p] for p in PARTS} for r in per_row]
    return VariantReport(name, backend, nrows, 1e6 * total / nrows, parts, rows_us, syncs.count,
                         sorted(set(syncs.where)), note)


def _part(region: str) -> str:
    """The report column of a region: ``"step/noise"`` -> ``noise``; names outside :data:`PARTS` -> ``host``."""
    part = region.rsplit("/", 1)[-1]
    return part if part in PARTS else "host"


def _trace(events: list, pid: int, name: str, timer: RegionTimer) -> None:
    events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
    for row, region, host_s, start_s, dev_s, _parent in timer.records:
        events.append({"name": region, "ph": "X", "pid": pid, "tid": 0, "ts": start_s * 1e6,
                       "dur": (dev_s if timer.cuda else host_s) * 1e6, "args": {"row": row}})


def _run_fastdiff(plan, model, noise, seeds, backend, guidance, cond, uncond):
    timer = RegionTimer(noise.device)
    opts = LoopOptions(guidance=guidance, cond=cond, uncond=uncond, seeds=seeds, backend=backend, timer=timer)
    with SyncCounter() as syncs:
        run_plan(plan, model, noise * plan.init_scale, opts)
    timer.finish()
    return timer, syncs


def _run_diffusers(sampler, schedule_config, steps, model, noise, guidance_scale, cond, uncond, generator):
    import diffusers

    cls_name, extra = DIFFUSERS_EQUIVALENT[sampler]
    sch = getattr(diffusers, cls_name).from_config({**schedule_config, **extra})
    sch.set_timesteps(steps, device=noise.device)
    timer = RegionTimer(noise.device)
    # as the stock pipelines do: flow-matching schedulers have neither an initial noise scale nor
    # scale_model_input, and only the stochastic schedulers' step takes a generator
    x = noise * getattr(sch, "init_noise_sigma", 1.0)
    scale_input = getattr(sch, "scale_model_input", lambda sample, t: sample)
    step_kw = {"generator": generator} if "generator" in inspect.signature(sch.step).parameters else {}
    guided = guidance_scale is not None and guidance_scale != 1.0
    cin = torch.cat([uncond, cond]) if guided and cond is not None else cond
    with SyncCounter() as syncs:
        for i, t in enumerate(sch.timesteps):
            timer.start_row(i)
            with timer.region("step"):
                xin = scale_input(torch.cat([x, x]) if guided else x, t)
            with timer.region("model"):
                tt = t.reshape(1).expand(xin.shape[0]).to(torch.float32)
                out = model(xin, tt) if cin is None else model(xin, tt, cin)
            if guided:
                with timer.region("guidance"):
                    u, c = out.chunk(2)
                    out = u + guidance_scale * (c - u)
            with timer.region("step"):
                x = sch.step(out, t, x, **step_kw).prev_sample
    timer.finish()
    return timer, syncs, len(sch.timesteps)


def profile(
    model: Callable | str | None = None,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    shape: Sequence[int] = (2, 4, 64, 64),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    schedule: dict | None = None,
    guidance_scale: float | None = 7.5,
    variants: Sequence[str] = ("diffusers", "reference", "fused"),
    trace: str | None = None,
    warmup: int = 1,
    seed: int = 0,
) -> ProfileReport:
    """Profile one sampling loop per variant and report where each step's time goes.

    Args:
        model: a callable ``model(x, t[, cond])``, ``"module:attr"``, or ``None`` for the built-in
            Gaussian-mixture model (exact for the schedule; conditioning shifts it slightly so
            guidance has something to blend).
        sampler, steps, schedule: what to run (``schedule`` is a diffusers-style config dict; by
            default the benchmarks' schedule for the sampler, :func:`fastdiff.bench.step.schedule_for`).
        shape, dtype, device: the noise.
        backend: the fused backend (``auto`` picks the fastest available for ``device``).
        guidance_scale: CFG scale (``None`` or 1 disables guidance and conditioning).
        variants: any of ``diffusers``, ``reference``, ``fused``.
        trace: path of a Chrome trace to write, or ``None``.
        warmup: untimed runs of each variant first.
        seed: seeds the noise, conditioning and in-kernel noise.

    Returns:
        A :class:`ProfileReport`; ``print(report.table())`` shows it.
    """
    device = check_device(device)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (batch, *sample_shape) with every size >= 1, got {shape}")
    variants = tuple(dict.fromkeys(variants))
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be among {VARIANTS}, got {bad[0] if bad else 'none'}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    fused_name = ops.requested_backend(backend)
    config = dict(schedule) if schedule else schedule_for(sampler)
    plan = make_plan(sampler, steps, config)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    guided = guidance_scale is not None and guidance_scale != 1.0
    cond = uncond = None
    if model is None:
        gm = GaussianMixture.default(shape[1:], components=4, seed=seed)
        sched = config if is_schedule(config) else from_config(config)
        base = gm.model(sched.alpha_sigma, plan.prediction, times=[r.t for r in plan.rows])

        def default_model(x, t, c=None):
            out = base(x, t)
            return out if c is None else out + 0.01 * c.reshape((-1,) + (1,) * (x.dim() - 1)).to(out.dtype)

        fn = default_model
        if guided:
            cond = torch.ones(shape[0], device=device)
            uncond = torch.zeros(shape[0], device=device)
    else:
        if guided:
            raise ValueError("guidance_scale needs the built-in model (or pass guidance_scale=None for your model)")
        fn = as_model(load_model(model) if isinstance(model, str) else model)
        _check_model(fn, noise * plan.init_scale, plan.rows[0].t)
    seeds = expand_seeds(seed, shape[0])
    guidance = Guidance(guidance_scale) if guided else None
    fused_be, fused_skip = None, ""
    if "fused" in variants:  # before anything runs: a backend asked for by name must run here
        probe, why = _probe_backend(fused_name, noise)
        if probe is None and fused_name != "auto":
            raise ValueError(why)  # "backend NAME was requested but is not available: ..."
        if probe is None or probe == "reference":
            fused_skip = ("the reference backend is the reference variant" if fused_name == "reference" else
                          f"no fused backend available for {device.type} {noise.dtype} tensors "
                          f"({why or ops.available_backends()})")
        else:
            fused_be = probe
    reports, skipped, events = [], {}, []
    for vname in variants:
        if vname == "diffusers":
            if sampler not in DIFFUSERS_EQUIVALENT:
                skipped[vname] = f"no diffusers scheduler mirrors {sampler!r}"
                continue
            try:
                import diffusers  # noqa: F401
            except ImportError:
                skipped[vname] = "diffusers is not installed"
                continue
            for _ in range(warmup):
                _run_diffusers(sampler, config, steps, fn, noise, guidance_scale if guided else None, cond, uncond,
                               torch.Generator(device).manual_seed(seed))
            timer, syncs, n = _run_diffusers(sampler, config, steps, fn, noise, guidance_scale if guided else None,
                                             cond, uncond, torch.Generator(device).manual_seed(seed))
            rep = _summarise("diffusers scheduler", "diffusers", timer, n, syncs)
        elif vname in ("reference", "fused"):
            be = "reference" if vname == "reference" else fused_be
            if be is None:
                skipped[vname] = fused_skip
                continue
            for _ in range(warmup):
                _run_fastdiff(plan, fn, noise, seeds, be, guidance, cond, uncond)
            timer, syncs = _run_fastdiff(plan, fn, noise, seeds, be, guidance, cond, uncond)
            rep = _summarise(f"fastdiff {be}", be, timer, len(plan.rows), syncs)
        reports.append(rep)
        _trace(events, len(reports), rep.name, timer)
    report = ProfileReport(sampler, steps, shape, str(dtype).replace("torch.", ""), str(device),
                           guidance_scale if guided else None, reports, skipped, events)
    if trace:
        report.write_trace(trace)
    return report


def _probe_backend(name: str, noise: torch.Tensor) -> tuple[str | None, str]:
    """``(backend, "")``: which backend ``name`` resolves to for tensors like ``noise``; ``(None, why)``
    if it cannot run them."""
    try:
        return ops.backend_for(name, noise), ""
    except RuntimeError as exc:
        return None, str(exc)



# ------------------------------------------------------------------------------------- pipelines

PIPELINE_PARTS = ("model", "rest")
"""Columns of a pipeline profile: the model's forward calls, and the rest of the step (CFG blend,
scheduler step, loop overhead: what ``fastdiff.diffusers.accelerate`` replaces)."""
DEFAULT_PROMPT = "a photo of an astronaut riding a horse"
"""The prompt of a pipeline profiled without call arguments."""


def load_pipeline(spec: str) -> tuple[Any, dict]:
    """Import ``module:attr`` (``attr`` may be dotted) as ``(pipeline, call_kwargs)``.

    ``attr`` is a diffusers pipeline (then ``call_kwargs`` is ``{}``: it is called with a prompt) or a
    zero-argument callable returning a pipeline or ``(pipeline, call_kwargs)``. Every failure is a
    ``ValueError`` naming ``spec``.
    """
    obj, attr = _import_spec(spec, "pipeline")
    if not _is_pipeline(obj):
        if not callable(obj):
            raise ValueError(f"pipeline {spec!r} is a {type(obj).__name__}, not a diffusers pipeline or a "
                             "zero-argument callable returning one")
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 - any failure of the user's factory is reported as such
            raise ValueError(f"pipeline {spec!r}: calling it failed ({type(exc).__name__}: {exc})") from exc
    pipe, kwargs = (obj if isinstance(obj, tuple) and len(obj) == 2 else (obj, {}))
    if not _is_pipeline(pipe) or not isinstance(kwargs, dict):
        got = f"({type(pipe).__name__}, {type(kwargs).__name__})" if isinstance(obj, tuple) else type(obj).__name__
        raise ValueError(f"pipeline {spec!r} gave {got}, not a diffusers pipeline or (pipeline, call kwargs dict)")
    return pipe, kwargs


def _is_pipeline(obj) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(obj, DiffusionPipeline)


@dataclass
class PipelineVariantReport:
    """One way of running a pipeline's loop; times are µs per ``unit`` (a step: one iteration of the
    denoising loop, all its model calls; or, where the model calls do not divide evenly into the
    loop's iterations, one model call)."""

    name: str
    backend: str
    unit: str
    rows: int
    model_calls: int
    setup_us: float
    total_us: float
    parts_us: dict[str, float]
    per_row_us: list[dict[str, float]]

    @property
    def sampler_share(self) -> float:
        """Fraction of the step that is not the model forward."""
        return self.parts_us["rest"] / self.total_us if self.total_us > 0 else 0.0


@dataclass
class PipelineProfile:
    """What :func:`profile_pipeline` measured (see :meth:`table`, :meth:`to_json`).

    JSON (``fastdiff profile --pipeline ... --json``; times in µs): ``pipeline``, ``scheduler`` and
    ``model`` (class names), ``steps`` (the loop's iterations: the scheduler's timesteps), ``latent``
    (shape of the ``output_type="latent"`` output), ``dtype``, ``device``, ``call_kwargs`` (the
    argument names the pipeline was called with), ``parts`` (``model``, ``rest``) and ``variants``
    (stock, then accelerated), each with ``name``, ``backend`` (``diffusers`` for the stock loop),
    ``unit`` (``step``, or ``model call`` where the calls do not divide evenly into steps), ``rows``
    (units), ``model_calls``, ``setup_us`` (the call before its first model call), ``total_us``,
    ``parts_us`` (per unit, averaged), ``per_row_us`` (per unit: a step runs from its first model call
    to the next step's, the last to the end of the call) and ``sampler_share`` (``rest`` over
    ``total_us``).
    """

    pipeline: str
    scheduler: str
    model: str
    steps: int
    latent: tuple[int, ...]
    dtype: str
    device: str
    call_kwargs: list[str]
    variants: list[PipelineVariantReport]

    def table(self) -> str:
        """A plain-text table: µs per step in the model and the rest, the share, then step by step."""
        head = (f"{'variant':<22}{'calls/step':>11}{'setup':>11}{'model':>11}{'rest':>11}{'total':>11}{'share':>8}"
                "  verdict")
        lines = [f"fastdiff profile: {self.pipeline} ({self.model}) + {self.scheduler}, {self.steps} steps, "
                 f"latent {self.latent}, {self.dtype}, {self.device}",
                 f"µs per {self.variants[0].unit}; setup: the call before its first model call (µs, once); rest: "
                 "CFG blend, scheduler step, loop overhead", head, "-" * len(head)]
        for v in self.variants:
            share = v.sampler_share
            verdict = ("healthy" if share < HEALTHY_SHARE else
                       "not healthy" if share > UNHEALTHY_SHARE else "borderline")
            lines.append(f"{v.name:<22}{v.model_calls / max(v.rows, 1):>11.2g}{v.setup_us:>11.1f}"
                         f"{v.parts_us['model']:>11.1f}{v.parts_us['rest']:>11.1f}{v.total_us:>11.1f}"
                         f"{share:>7.1%}  {verdict}")
        lines.append(f"reference line: scheduler share < {HEALTHY_SHARE:.0%} healthy, > {UNHEALTHY_SHARE:.0%} not "
                     "(diffusers' rule of thumb)")
        n = max(v.rows for v in self.variants)
        short = ["stock" if v.backend == "diffusers" else "fastdiff" for v in self.variants]
        head2 = f"{self.variants[0].unit:>10}" + "".join(f"{s + ' ' + p:>16}" for s in short for p in PIPELINE_PARTS)
        lines += ["", f"per {self.variants[0].unit} (µs; the last runs to the end of the call)", head2,
                  "-" * len(head2)]
        for i in range(n):
            cells = "".join(f"{v.per_row_us[i][p]:>16.1f}" if i < v.rows else f"{'':>16}" for v in self.variants
                            for p in PIPELINE_PARTS)
            lines.append(f"{i:>10}{cells}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        """The documented JSON form (``fastdiff profile --pipeline ... --json``)."""
        return {"pipeline": self.pipeline, "scheduler": self.scheduler, "model": self.model, "steps": self.steps,
                "latent": list(self.latent), "dtype": self.dtype, "device": self.device,
                "call_kwargs": self.call_kwargs, "parts": list(PIPELINE_PARTS),
                "variants": [dict(asdict(v), sampler_share=v.sampler_share) for v in self.variants]}


def _pipeline_variant(name: str, backend: str, rec) -> PipelineVariantReport:
    """Per-step model and rest times of one call: a step runs from its first model call to the next
    step's (the last: to the end of the call)."""
    n, iters = len(rec.spans), rec.timesteps
    k, unit = (n // iters, "step") if iters and n % iters == 0 else (1, "model call")
    starts = [rec.spans[i][0] for i in range(0, n, k)] + [rec.end]
    rows = []
    for g in range(n // k):
        model = sum(b - a for a, b in rec.spans[g * k:(g + 1) * k])
        rows.append({"model": 1e6 * model, "rest": 1e6 * (starts[g + 1] - starts[g] - model)})
    parts = {p: sum(r[p] for r in rows) / len(rows) for p in PIPELINE_PARTS}
    return PipelineVariantReport(name, backend, unit, len(rows), n, 1e6 * rec.setup_s, sum(parts.values()), parts,
                                 rows)


def profile_pipeline(pipe, call_kwargs: dict | None = None, *, steps: int | None = 20, backend: str = "auto",
                     device: str | torch.device = "cpu", warmup: int = 1, seed: int = 0) -> PipelineProfile:
    """Profile a diffusers pipeline's denoising loop, stock and under ``fastdiff.diffusers.accelerate``.

    Each variant is called ``warmup`` times untimed, then once timed, alternating, with
    ``call_kwargs`` plus ``output_type="latent"`` (decoding is no part of the loop) and
    ``num_inference_steps=steps`` (unless ``None``); without a ``generator`` one seeded with ``seed``
    is added, so both variants draw the same latents and noise. The model's forward calls (the
    ``unet``, ``transformer`` and ``transformer_2``) are timed by forward hooks; the rest of each
    step is the CFG blend, the scheduler step and the loop's overhead.

    Args:
        pipe: a pipeline :func:`fastdiff.diffusers.accelerate` supports, with a supported scheduler.
        call_kwargs: the call's arguments (default: ``prompt=DEFAULT_PROMPT``, which needs the
            pipeline's text encoders); tensors are moved to ``device``.
        steps: ``num_inference_steps``.
        backend: the fused backend of the accelerated call.
        device: where the pipeline runs (it is moved there).
        warmup: untimed calls of each variant first.
        seed: seeds the added generator.

    Returns:
        A :class:`PipelineProfile`; ``print(report.table())`` shows it.
    """
    from ..diffusers import accelerate, restore
    from .pipeline import denoisers, time_calls

    device = check_device(device)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    name = ops.requested_backend(backend)
    probe, why = _probe_backend(name, torch.zeros(1, device=device))
    if probe is None and name != "auto":
        raise ValueError(why)  # "backend NAME was requested but is not available: ..."
    if not _is_pipeline(pipe):
        raise ValueError(f"pipeline must be a diffusers pipeline, got {type(pipe).__name__}")
    try:  # before anything runs: the class and its scheduler must be ones accelerate supports
        denoisers(pipe)
        accelerate(pipe, backend=backend)
        restore(pipe)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pipeline {type(pipe).__name__}: {exc}") from None
    kw = dict(call_kwargs) if call_kwargs else {"prompt": DEFAULT_PROMPT}
    kw["output_type"] = "latent"
    if steps is not None:
        kw["num_inference_steps"] = steps
    if kw.get("generator") is None:
        kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # a progress bar would be timed as loop overhead
    rec = time_calls(pipe, kw, backend=backend, repeats=1, warmup=warmup, device=device)
    stock, fused = rec["stock"][0], rec["fused"][0]
    like = torch.zeros(1, dtype=fused.dtype or torch.float32, device=device)
    be, _ = _probe_backend(name, like)
    variants = [_pipeline_variant("diffusers (stock loop)", "diffusers", stock),
                _pipeline_variant(f"fastdiff {be or name}", be or name, fused)]
    return PipelineProfile(type(pipe).__name__, type(pipe.scheduler).__name__, type(denoisers(pipe)[0]).__name__,
                           stock.timesteps, stock.shape, str(stock.dtype).replace("torch.", ""), str(device),
                           sorted(kw), variants)
