"""Step benchmarks: one fused step against what it replaces, per sampler, and on a GPU.

Three measurements, each a list of JSON-ready dicts (the fields are documented in
:mod:`fastdiff.bench`, which gathers them for ``fastdiff bench``):

* :func:`bench_case` — one CFG DPM-Solver++(2M) step on CPU (``e = m_u + w (m_c - m_u)``,
  ``d = a_x x + a_e e``, ``x' = c_x x + c_d d + c_h h0``, ``h1 = d``; state updated in place),
  by every method that can run it, in one process:

  ``reference``     fastdiff's reference backend (plain torch, op by op)
  ``diffusers``     the pipeline's CFG blend + ``DPMSolverMultistepScheduler.step`` (diffusers' own)
  ``compiled``      ``torch.compile`` of the reference step (compile time reported separately)
  ``cpu``           the fused kernel (``fastdiff.backends.cpu.step`` on prepared arguments)
  ``cpu+dispatch``  the same through ``fastdiff.runtime.ops.step`` (validation + backend choice)

  It reports the median µs per step (and the best sample), GB/s counting minimum bytes (each input
  read once, each output written once), the copy bandwidth of the step's bytes sampled with the
  methods (the one definition of :mod:`fastdiff.bench.timing`: median, outliers listed, not used),
  the fraction of it, and the speedup of ``cpu`` over each method.
* :func:`bench_samplers` — a real plan row per sampler (the middle row of
  ``fastdiff.make_plan(sampler, 10, ...)``, with CFG) through ``fastdiff.runtime.ops.step`` on each backend.
* :func:`bench_gpu` — the fused ``cuda`` and ``triton`` steps (their prepared programs, what the
  loop runs) against the reference step and ``torch.compile`` of it on a CUDA device: device time
  inside a CUDA graph with cold L2 against a copy of the same bytes timed alike (the bandwidth
  floor), and host time per call.

On a shared 2-core machine other processes stall 2-thread parallel regions (torch's and ours) for
whole scheduler slices: samples are taken round-robin across methods, and both the median and the
best sample are kept; :func:`machine` records the load average.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from ..runtime import ops
from ..core.args import StepArgs, clip_code, pack_row
from ..backends import reference
from ..core.plan import Row, Write, combo
from .timing import copy_fn, copy_gb_s, round_robin

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (16, 4, 128, 128), (2, 3, 512, 512), (4096, 2)]
"""Shapes of the CPU step benchmark (SD latents at 512² and 1024², a batch of 16, a 512² image, 2-D points)."""
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GUIDANCE = 7.5
"""Classifier-free guidance scale of every benchmarked row."""
SD_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
FLOW_SCHEDULE = {"shift": 3.0}


def schedule_for(sampler: str):
    """The schedule benchmarks use for ``sampler``: Stable Diffusion's betas (a config dict) for VP
    samplers, SD3's flow shift for flow samplers, the default :class:`~fastdiff.core.schedules.VESchedule`
    for VE-only samplers."""
    from .. import samplers
    from ..core import schedules

    kinds = samplers.info(sampler).kinds
    if "vp" in kinds:
        return dict(SD_SCHEDULE)
    if "flow" in kinds:
        return dict(FLOW_SCHEDULE)
    return schedules.VESchedule()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(dtype).replace("torch.", "")


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------------------------- timing


def time_all(fns: dict[str, Callable[[], object]], repeats: int, budget_s: float = 2e-3) -> dict:
    """Seconds per call of each function: ``{name: (median, best)}`` over ``repeats`` samples taken
    round-robin (:func:`fastdiff.bench.timing.round_robin`), so that a change in machine load hits
    every method alike."""
    return {name: (statistics.median(v), min(v)) for name, v in round_robin(fns, repeats, budget_s).items()}


def machine() -> dict:
    """CPU model, cores, torch and thread counts, the CPU kernel's SIMD level, load average, GPU."""
    from ..backends import cpu

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    c = getattr(cpu, "_C", None)
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "simd": c.simd_level() if c else None,
            "kernel_threads": c.num_threads() if c else None,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


# ------------------------------------------------------------------------------------- the CPU step vs what it replaces


def cfg_row() -> Row:
    """A mid-schedule DPM-Solver++(2M) row (eps prediction) with one history read and write,
    contracting so that repeating it in place keeps the state bounded."""
    return Row(t=500.0, sigma=1.0, in_scale=1.0, a_x=1.25, a_e=-0.6,  # x0 = (x - sigma*eps)/alpha
               out=combo(x=0.6, d=0.45, h=(-0.05,)), reads=(0,), writes=(Write(1, combo(d=1.0)),))


def make_diffusers_step(m_u: torch.Tensor, m_c: torch.Tensor, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The pipeline's CFG blend + ``DPMSolverMultistepScheduler.step`` at a fixed mid-schedule step."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    sch.set_timesteps(20)
    mid = 10
    for i in range(mid + 1):  # fill its model-output history
        sch.step(m_u, sch.timesteps[i], x, return_dict=False)
    t_mid = sch.timesteps[mid]

    def step():
        e = m_u + GUIDANCE * (m_c - m_u)
        sch._step_index = mid  # stay mid-schedule: every call is a second-order step
        return sch.step(e, t_mid, x, return_dict=False)[0]

    return step


def compile_reference(args: StepArgs, fresh: bool = True) -> Callable[[], None]:
    """``torch.compile`` of the reference step on ``args`` (coefficients and row are constants of the graph).

    Returns a zero-argument callable; the first call (which compiles) is left to the caller.
    """
    coef, row, clip = args.coef, args.row, args.clip

    def ref_step(x, out, m, m_c, w, s, seeds, h_read, h_write):
        reference.step(StepArgs(x=x, out=out, m=m, m_c=m_c, w=w, s=s, seeds=seeds, coef=coef, row=row, clip=clip,
                                h_read=tuple(h_read), h_write=tuple(h_write)))

    if fresh:
        torch._dynamo.reset()  # a fresh compile per case, so the first call takes the full compile time
    fn = torch.compile(ref_step)
    a = args
    return lambda: fn(a.x, a.out, a.m, a.m_c, a.w, a.s, a.seeds, list(a.h_read), list(a.h_write))


def bench_case(shape: Sequence[int], dtype: torch.dtype = torch.float32, repeats: int = 25,
               with_compile: bool = True) -> list[dict]:
    """Time the CFG DPM++(2M) step (:func:`cfg_row`) by every available method at one shape and dtype.

    Returns one dict per method (see :mod:`fastdiff.bench` for the fields). A method that cannot
    run here (no compiled extension, no diffusers, a failing compile) gets a row with ``error``.
    """
    from ..backends import cpu

    shape = tuple(int(s) for s in shape)
    b, n = shape[0], numel(shape)
    gen = torch.Generator().manual_seed(0)
    model_out = torch.randn((2 * b, *shape[1:]), generator=gen).to(dtype)  # [uncond; cond] batch
    m_u, m_c = model_out.chunk(2)
    x, h0 = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    h1 = torch.empty_like(x)
    w = torch.full((b,), GUIDANCE)
    coef = pack_row(cfg_row())

    def args_for(xx, hh0, hh1):
        return StepArgs(x=xx, out=xx, m=m_u, m_c=m_c, w=w, coef=coef, h_read=(hh0,), h_write=(hh1,))

    args = args_for(x, h0, h1)
    ops.validate(args)
    methods: dict[str, Callable[[], object]] = {"reference": lambda: reference.step(args)}
    errors: dict[str, str] = {}
    try:
        methods["diffusers"] = make_diffusers_step(m_u, m_c, x.clone())
    except ImportError as exc:
        errors["diffusers"] = f"diffusers is not installed ({exc})"
    except Exception as exc:  # noqa: BLE001 - a diffusers version we do not know: report, go on
        errors["diffusers"] = f"{type(exc).__name__}: {exc}"[:300]
    ok, why = cpu.available()
    if ok and cpu.supports(args):
        try:  # correctness before timing: cpu equals reference on this row
            xr, h1r = x.clone(), torch.empty_like(x)
            reference.step(args_for(xr, h0, h1r))
            xc, h1c = x.clone(), torch.empty_like(x)
            cpu.step(args_for(xc, h0, h1c))
            err = float((xc.double() - xr.double()).norm() / xr.double().norm())
            tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
            if not err <= tol:
                raise AssertionError(f"cpu != reference on the benchmark row: {err:.2e} > {tol:.0e}")
            methods["cpu"] = lambda: cpu.step(args)
            methods["cpu+dispatch"] = lambda: ops.step(args, backend="cpu")
        except Exception as exc:  # noqa: BLE001 - a kernel being rebuilt must not stop the benchmark
            errors["cpu"] = errors["cpu+dispatch"] = f"{type(exc).__name__}: {exc}"[:300]
    else:
        errors["cpu"] = errors["cpu+dispatch"] = why if not ok else "cpu backend does not support this row"
    compile_s = None
    if with_compile:
        try:
            compiled = compile_reference(args)
            t0 = time.perf_counter()
            compiled()
            compile_s = time.perf_counter() - t0
            methods["compiled"] = compiled
        except Exception as exc:  # noqa: BLE001 - inductor needs a C++ compiler; report, go on
            errors["compiled"] = f"{type(exc).__name__}: {exc}"[:300]

    esize = x.element_size()
    min_bytes = 6 * n * esize + 4 * b  # read x, m_u, m_c, h0, w; write x', h1
    # the yardstick (fastdiff.bench.timing): a copy moving the step's bytes, sampled with the methods
    samples = round_robin({"copy": copy_fn(min_bytes), **methods}, repeats)
    copy = copy_gb_s(min_bytes, samples.pop("copy"))
    times = {name: (statistics.median(v), min(v)) for name, v in samples.items()}
    copy_gbs = copy["gb_s"]
    common = {"shape": list(shape), "dtype": dtype_name(dtype), "min_bytes": min_bytes, "copy_gb_s": copy_gbs,
              "copy_gb_s_best": copy["gb_s_best"], "copy_outliers_gb_s": copy["outliers_gb_s"]}
    t_cpu, b_cpu = times["cpu"] if "cpu" in times else (None, None)
    t_ref, b_ref = times["reference"]
    rows = []
    for name in ("reference", "diffusers", "compiled", "cpu", "cpu+dispatch"):
        if name in errors:
            rows.append({**common, "method": name, "error": errors[name]})
            continue
        if name not in times:
            continue  # compile not asked for
        t, best = times[name]
        gbs = min_bytes / t / 1e9
        rows.append({**common, "method": name, "us": t * 1e6, "us_best": best * 1e6, "gb_s": gbs,
                     "frac_of_copy": gbs / copy_gbs, "frac_of_copy_best": min_bytes / best / 1e9 / copy["gb_s_best"],
                     "cpu_speedup": t / t_cpu if t_cpu else None, "cpu_speedup_best": best / b_cpu if b_cpu else None,
                     "vs_reference": t_ref / t, "vs_reference_best": b_ref / best,
                     "compile_s": compile_s if name == "compiled" else None})
    return rows


# ------------------------------------------------------------------------------------- real plan rows per sampler


def plan_row_args(sampler: str, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu", steps: int = 10, guidance: float | None = GUIDANCE,
                  row: int | None = None, seed: int = 0) -> StepArgs:
    """The arguments of one real plan row: row ``row`` (default: the middle one) of
    ``fastdiff.make_plan(sampler, steps, schedule_for(sampler))``, on random tensors.

    Element tensors are ``shape``-shaped ``dtype`` tensors on ``device``: ``x``, the model output
    ``m`` (and ``m_c`` with ``w`` = ``guidance`` under CFG), one random tensor per history read and
    a separate output tensor per history write and for ``x'``, so that repeating the step runs the
    same arithmetic on the same inputs (no drift to Inf over thousands of calls). Noise rows draw
    in-kernel Philox noise keyed by ``seeds``; clipping rows get ``s`` = the plan's clip range.
    """
    from ..api import make_plan

    device = torch.device(device)
    shape = tuple(int(s) for s in shape)
    plan = make_plan(sampler, steps, schedule_for(sampler))
    i = len(plan.rows) // 2 if row is None else row
    r = plan.rows[i]
    g = torch.Generator().manual_seed(seed)

    def rnd():
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    b = shape[0]
    x = rnd()
    guided = guidance is not None and guidance != 1.0
    clip = clip_code(r)
    return StepArgs(
        x=x, out=torch.empty_like(x), m=rnd(), m_c=rnd() if guided else None, coef=pack_row(r), row=i,
        h_read=tuple(rnd() for _ in r.reads), h_write=tuple(torch.empty_like(x) for _ in r.writes),
        w=torch.full((b,), float(guidance), device=device) if guided else None,
        s=torch.full((b,), float(plan.clip_range), device=device) if clip else None, clip=clip,
        seeds=torch.arange(seed, seed + b, dtype=torch.int64, device=device) if r.noise else None)


def step_bytes(args: StepArgs) -> int:
    """Minimum bytes one step moves: each element tensor read once, each output written once."""
    reads = [args.x, args.m, args.m_c, args.z, args.z2, args.mask, args.known, args.g, *args.h_read]
    n = sum(t is not None for t in reads) + 1 + len(args.h_write)
    per_sample = sum(t is not None for t in (args.w, args.r, args.s)) * 4 + (8 if args.seeds is not None else 0)
    return n * args.x.numel() * args.x.element_size() + per_sample * args.x.shape[0]


def bench_samplers(sampler_names: Sequence[str] | None = None, backends: Sequence[str] | None = None,
                   shapes: Sequence[Sequence[int]] = ((1, 4, 64, 64),), dtype: torch.dtype = torch.float32,
                   repeats: int = 10, progress: bool = True) -> list[dict]:
    """Time one real plan row per sampler (:func:`plan_row_args`) on each backend, through ``ops.step``.

    The step runs as the loop runs it: validated once, then ``ops.step(..., check=False)``.
    Returns one dict per sampler x shape x backend; a backend that cannot run a row gets ``error``.
    """
    from .. import samplers

    names = list(sampler_names or samplers.available())
    if backends is None:
        backends = [b for b in ("reference", "cpu") if ops.backend_status(b)[0]]
    cases = [(n, tuple(s)) for s in shapes for n in names]
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="step per sampler", leave=False)
    rows = []
    for name, shape in it:
        args = plan_row_args(name, shape, dtype)
        ops.validate(args)
        fns, errors = {}, {}
        for be in backends:
            try:
                ops.step(args, backend=be)  # resolves (raises if the backend cannot run the row)
                fns[be] = (lambda b_=be: ops.step(args, backend=b_, check=False))
            except Exception as exc:  # noqa: BLE001 - report the backend, time the others
                errors[be] = f"{type(exc).__name__}: {exc}"[:300]
        times = time_all(fns, repeats) if fns else {}
        nbytes = step_bytes(args)
        t_ref, b_ref = times.get("reference", (None, None))
        for be in backends:
            r = {"sampler": name, "backend": be, "shape": list(shape), "dtype": dtype_name(dtype), "row": args.row,
                 "min_bytes": nbytes}
            if be in errors:
                r["error"] = errors[be]
            else:
                t, best = times[be]
                r.update(us=t * 1e6, us_best=best * 1e6, gb_s=nbytes / t / 1e9,
                         vs_reference=t_ref / t if t_ref else None, vs_reference_best=b_ref / best if b_ref else None)
            rows.append(r)
    return rows


# ------------------------------------------------------------------------------------- GPU rows

GPU_SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (16, 4, 128, 128), (2, 3, 512, 512)]
GPU_VARIANTS = ("multistep_cfg", "ancestral_cfg")
"""A guided multistep update (CFG, one history read and write), and the same plus in-kernel Philox noise."""
GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""Storage types of the GPU benchmark."""
GPU_TENSORS = 6
"""Element tensors a GPU benchmark step moves: read x, m_u, m_c, h0; write x, h_new."""


def gpu_row(variant: str) -> tuple[float, ...]:
    """Packed coefficients of a contracting row (values stay bounded over thousands of steps)."""
    if variant not in GPU_VARIANTS:
        raise ValueError(f"variant must be one of {GPU_VARIANTS}, got {variant!r}")
    noise = variant == "ancestral_cfg"
    row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.5, a_e=0.5,
              out=combo(x=0.6, d=0.2, h=(0.2,), z=0.1 if noise else 0.0), reads=(0,),
              writes=(Write(1, combo(d=1.0)),), noise=noise)
    return pack_row(row)


def gpu_step_args(shape: Sequence[int], dtype: torch.dtype, variant: str, device: str = "cuda",
                  seed: int = 0) -> StepArgs:
    """In-place step arguments of a :func:`gpu_row` on ``device`` (CFG scale 5, seeds ``0..B-1``)."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(int(s) for s in shape)

    def t():
        return torch.randn(shape, generator=g, device=device).to(dtype)

    b = shape[0]
    x = t()
    return StepArgs(x=x, out=x, m=t(), m_c=t(), h_read=(t(),), h_write=(t(),), coef=gpu_row(variant), row=3,
                    w=torch.full((b,), 5.0, device=device), seeds=torch.arange(b, dtype=torch.int64, device=device))


def gpu_copy_gbps(nbytes: int = 2**30, device: str = "cuda") -> float:
    """Device copy bandwidth (GB/s): :mod:`fastdiff.bench.timing`'s definition (bytes read + written
    by ``copy_`` over the median of 10 samples) at a fixed size, ``nbytes`` per tensor, timed by CUDA
    events."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def compiled_reference_gpu() -> Callable[[StepArgs], None]:
    """``run(args)``: ``torch.compile`` of the reference step, one compiled function per coefficient row."""
    fns: dict = {}

    def run(args: StepArgs) -> None:
        key = (args.coef, args.row)
        if key not in fns:  # coefficients are constants in the graph; shapes are dynamic
            def ref_step(x, m, m_c, h0, hw, w, seeds, _c=args.coef, _r=args.row):
                reference.step(StepArgs(x=x, out=x, m=m, m_c=m_c, h_read=(h0,), h_write=(hw,), coef=_c, row=_r,
                                        w=w, seeds=seeds))
            fns[key] = torch.compile(ref_step, dynamic=True)
        fns[key](args.x, args.m, args.m_c, args.h_read[0], args.h_write[0], args.w, args.seeds)

    return run


GPU_GRAPH_NODES = 240
"""Steps captured in one timing graph (spread over the rotating argument sets)."""
GPU_MAX_SETS = 48
"""Most argument sets a timing rotates through (tiny shapes then stay L2-resident: ``cold_l2`` false)."""


def l2_bytes(device: int | str | torch.device = 0) -> int:
    """The device's L2 cache size in bytes (50 MiB, an H100's, where torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)


def rotation(nbytes: int, l2: int) -> int:
    """Argument sets to rotate through so that each step finds its operands outside L2: the sets
    together at least three times the L2 size (at least 2, at most :data:`GPU_MAX_SETS`)."""
    need = -(-3 * l2 // max(int(nbytes), 1))
    return max(2, min(GPU_MAX_SETS, need))


def graph_time_us(runs: Sequence[Callable[[], None]], nodes: int = GPU_GRAPH_NODES, samples: int = 7) -> float:
    """Device µs per call of ``runs`` (each a zero-argument step), taken round-robin inside one captured
    CUDA graph of about ``nodes`` calls, replayed ``samples`` times between CUDA events: the median
    replay over the calls it holds. Host time (Python, launch) is excluded: a replay is one launch.
    With rotating argument sets (:func:`rotation`) each call reads its operands from memory, not L2.
    The capture is :func:`fastdiff.runtime.graphs.capture`'s (warm-up passes first; a failure raises
    :class:`~fastdiff.runtime.graphs.GraphCaptureError` with the caller's stream current)."""
    from ..runtime.graphs import capture

    reps = max(1, -(-nodes // len(runs)))

    def body() -> None:
        for _ in range(reps):
            for r in runs:
                r()

    graph = capture(body, torch.device("cuda", torch.cuda.current_device()))  # warms up first
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(samples):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times) * 1e3 / (reps * len(runs))


def host_time_us(run: Callable[[], None], calls: int = 100) -> tuple[float, float]:
    """``(host_us, wall_us)`` per call of ``run``: the time to issue ``calls`` back-to-back calls
    (no synchronisation: what the host spends, while the device queue absorbs the work), and the
    time until the device has finished them too."""
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def _prepared(backend: str) -> Callable[[StepArgs], Callable[[], None]]:
    """``make(args)``: one step of ``args`` through the backend's prepared program (what the loop
    executor runs: :func:`fastdiff.runtime.ops.prepare`, then ``run(0, m)`` with the batched model
    output ``[m_u; m_c]`` made once)."""
    from dataclasses import replace

    def make(args: StepArgs) -> Callable[[], None]:
        m = torch.cat([args.m, args.m_c]) if args.m_c is not None else args.m
        prog = ops.prepare([replace(args)], backend=backend)
        return lambda: prog.run(0, m)

    return make


def _plain(fn: Callable[[StepArgs], None]) -> Callable[[StepArgs], Callable[[], None]]:
    return lambda args: (lambda: fn(args))


def gpu_providers() -> tuple[dict[str, Callable[[StepArgs], Callable[[], None]]], dict[str, str]]:
    """``({name: make(args) -> step()}, {name: why not})`` of the GPU providers: the reference step,
    the ``triton`` and ``cuda`` backends' prepared programs (what the loop runs), ``triton`` through
    its unprepared ``step`` (every check at every call), and ``torch.compile`` of the reference."""
    from ..backends import cuda as cuda_backend
    from ..backends import triton as triton_backend

    providers: dict[str, Callable[[StepArgs], Callable[[], None]]] = {"reference": _plain(reference.step)}
    missing = {}
    for name, mod in (("triton", triton_backend), ("cuda", cuda_backend)):
        ok, why = mod.available()
        if ok:
            providers[name] = _prepared(name)
            if name == "triton":
                providers["triton (step)"] = _plain(mod.step)
        else:
            missing[name] = why
    providers["torch.compile(reference)"] = _plain(compiled_reference_gpu())
    return providers, missing


def copy_floor_us(nbytes: int, l2: int) -> float:
    """Device µs of ``copy_`` moving ``nbytes`` (half read, half written) with cold L2, timed as
    :func:`graph_time_us` times a step: the bandwidth floor of a step that must move ``nbytes``."""
    n = max(1, nbytes // 2 // 4)
    pairs = [(torch.empty(n, device="cuda"), torch.empty(n, device="cuda")) for _ in range(rotation(nbytes, l2))]
    return graph_time_us([lambda s=s, d=d: d.copy_(s) for s, d in pairs])


def bench_gpu(shapes: Sequence[Sequence[int]] = GPU_SHAPES, dtypes: Sequence[torch.dtype] = GPU_DTYPES,
              variants: Sequence[str] = GPU_VARIANTS, copy_gbps: float | None = None,
              time_left: Callable[[], float] | None = None, on_row: Callable[[dict], None] | None = None,
              progress: bool = True) -> list[dict]:
    """Time every GPU provider on every variant x dtype x shape (one dict per provider and case).

    ``device_us``: device time per step inside a CUDA graph, rotating through enough argument sets
    that operands come from memory (``cold_l2``; :func:`graph_time_us`), or ``triton.testing.do_bench``
    (cold L2 by a flush, host time not excluded) where the provider cannot be captured (``timing``
    says which); ``floor_us``: a copy of the step's bytes timed alike, and ``x_floor`` the ratio;
    ``host_us``/``wall_us``: :func:`host_time_us`. ``copy_gbps`` (the 1 GiB copy) gives ``frac_of_copy``.
    ``time_left()`` (seconds) lets a short GPU session skip what no longer fits (the first
    ``torch.compile`` needs about a minute); ``on_row`` sees each row as soon as it is measured.
    """
    providers, _ = gpu_providers()
    cases = [(v, d, tuple(s), p) for v in variants for d in dtypes for s in shapes for p in providers]
    it = cases
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(cases, desc="gpu step", leave=False)
    rows = []
    first_compile = True
    l2 = l2_bytes()
    floors: dict = {}
    for variant, dtype, shape, prov in it:
        nbytes = GPU_TENSORS * numel(shape) * torch.empty((), dtype=dtype).element_size()
        r = {"provider": prov, "variant": variant, "dtype": dtype_name(dtype), "shape": list(shape)}
        need = 60.0 if prov.startswith("torch.compile") and first_compile else 3.0
        if time_left is not None and time_left() < need:
            r["error"] = "skipped: time budget spent"
        else:
            try:
                sets = rotation(nbytes, l2)
                runs = [providers[prov](gpu_step_args(shape, dtype, variant, seed=k)) for k in range(sets)]
                try:
                    dev_us, timing = graph_time_us(runs), "graph"
                except Exception as exc:  # noqa: BLE001 - e.g. a provider that cannot be captured
                    torch.cuda.synchronize()
                    import triton.testing

                    dev_us = triton.testing.do_bench(runs[0], warmup=10, rep=40, return_mode="median") * 1e3
                    timing = f"do_bench ({type(exc).__name__})"
                if prov.startswith("torch.compile"):
                    first_compile = False
                host_us, wall_us = host_time_us(runs[0])
                if nbytes not in floors:
                    floors[nbytes] = copy_floor_us(nbytes, l2)
                r.update(device_us=round(dev_us, 2), host_us=round(host_us, 2), wall_us=round(wall_us, 2),
                         gb_s=round(nbytes / (dev_us * 1e-6) / 1e9, 1), min_bytes=nbytes,
                         floor_us=round(floors[nbytes], 2), x_floor=round(dev_us / floors[nbytes], 3),
                         timing=timing, cold_l2=sets * nbytes >= 3 * l2)
                if copy_gbps:
                    r["frac_of_copy"] = round(r["gb_s"] / copy_gbps, 3)
                del runs
            except Exception as exc:  # noqa: BLE001 - every provider is independent
                r["error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(r)
        if on_row is not None:
            on_row(r)
    ref = {(r["variant"], r["dtype"], tuple(r["shape"])): r.get("device_us") for r in rows
           if r["provider"] == "reference"}
    for r in rows:
        base = ref.get((r["variant"], r["dtype"], tuple(r["shape"])))
        r["vs_reference"] = round(base / r["device_us"], 3) if base and r.get("device_us") else None
    return rows
