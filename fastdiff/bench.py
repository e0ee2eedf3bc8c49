"""Loop benchmark: whole sampling runs with the built-in model, µs per step per sampler and backend.

The model's own time is measured separately (wall clock around each call), so the table shows
what the sampler adds per step on top of the model — the part fastdiff replaces.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from . import ops, samplers
from .api import make_plan, sample
from .models import GaussianMixture
from .schedules import from_config


@dataclass
class LoopResult:
    """One row of the loop benchmark."""

    sampler: str
    backend: str
    shape: tuple[int, ...]
    dtype: str
    steps: int
    rows: int
    us_per_step: float
    model_us_per_step: float
    sampler_us_per_step: float


def _timed_model(model):
    spent = [0.0]

    def f(x, t, *a, **k):
        t0 = time.perf_counter()
        out = model(x, t, *a, **k)
        spent[0] += time.perf_counter() - t0
        return out

    return f, spent


def _schedule_for(name: str) -> dict:
    return {"shift": 3.0} if name.startswith("flow") else {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                            "beta_end": 0.012}


def bench_loop(
    sampler_names: Sequence[str] | None = None,
    backends: Sequence[str] | None = None,
    shape: Sequence[int] = (16, 4, 32, 32),
    steps: int = 20,
    repeats: int = 3,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> list[LoopResult]:
    """Time ``fastdiff.sample`` on the Gaussian-mixture model for each sampler x backend (CPU)."""
    names = list(sampler_names or samplers.available())
    if backends is None:
        backends = [b for b in ("reference", "cpu") if ops.backend_status(b)[0]]
    gm = GaussianMixture.default(tuple(shape[1:]), components=4)
    results = []
    combos = [(n, b) for n in names for b in backends]
    it = combos
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(combos, desc="fastdiff bench", leave=False)
    for name, backend in it:
        sched = _schedule_for(name)
        plan = make_plan(name, steps, sched)
        s = from_config(sched)
        pred = plan.prediction
        model, spent = _timed_model(gm.model(s.alpha_sigma, pred, times=[r.t for r in plan.rows]))
        noise = torch.randn(tuple(shape), dtype=dtype)
        sample(model, noise, plan=plan, seed=0, backend=backend)  # warm-up (allocations, first dispatch)
        best = None
        for _ in range(repeats):
            spent[0] = 0.0
            t0 = time.perf_counter()
            sample(model, noise, plan=plan, seed=0, backend=backend)
            total = time.perf_counter() - t0
            if best is None or total < best[0]:
                best = (total, spent[0])
        total, model_s = best
        per = 1e6 / plan.steps
        results.append(LoopResult(name, backend, tuple(shape), str(dtype).replace("torch.", ""), plan.steps,
                                  len(plan.rows), total * per, model_s * per, (total - model_s) * per))
    return results


def format_table(results: Sequence[LoopResult]) -> str:
    """A plain-text table of loop results, with the sampler-part speedup over ``reference``."""
    ref = {(r.sampler, r.shape, r.dtype): r.sampler_us_per_step for r in results if r.backend == "reference"}
    head = f"{'sampler':<16}{'backend':<11}{'rows':>5}{'µs/step':>11}{'model':>11}{'sampler':>11}{'vs ref':>8}"
    lines = [head, "-" * len(head)]
    for r in results:
        base = ref.get((r.sampler, r.shape, r.dtype))
        sp = f"{base / r.sampler_us_per_step:6.2f}x" if base and r.sampler_us_per_step > 0 else "     -"
        lines.append(f"{r.sampler:<16}{r.backend:<11}{r.rows:>5}{r.us_per_step:>11.1f}{r.model_us_per_step:>11.1f}"
                     f"{r.sampler_us_per_step:>11.1f}{sp:>8}")
    return "\n".join(lines)


def write_json(results: Sequence[LoopResult], path: str, extra: dict | None = None) -> None:
    """Write results (and machine details) as JSON."""
    doc = {"torch": torch.__version__, "threads": torch.get_num_threads(), "loop": [asdict(r) for r in results]}
    doc.update(extra or {})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
