"""The pytest-benchmark suite: fused step per sampler x backend x shape x dtype, and whole loops.

Two modes, chosen by ``FASTDIFF_BENCH``:

* ``smoke`` (the default, what ``python -m pytest -q`` runs in CI): one tiny shape, float32, a few
  rounds per benchmark and no results table, so the suite runs in seconds and cannot rot;
* ``full``: the real sizes and dtypes with pytest-benchmark's own calibration, for
  ``--benchmark-save`` / ``--benchmark-compare`` / ``pytest-benchmark compare`` across commits::

      FASTDIFF_BENCH=full python -m pytest benchmarks --benchmark-save=mychange

The shapes of the full mode can be replaced with ``FASTDIFF_BENCH_SHAPES="1,4,64,64;2,3,512,512"``.
Without pytest-benchmark installed the benchmarks skip (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import os

import pytest
import torch

MODE = os.environ.get("FASTDIFF_BENCH", "smoke").strip().lower() or "smoke"
if MODE not in ("smoke", "full"):
    raise pytest.UsageError(f"FASTDIFF_BENCH must be 'smoke' or 'full', got {MODE!r}")
SMOKE = MODE == "smoke"
SMOKE_ROUNDS = 2


def _env_shapes(default):
    text = os.environ.get("FASTDIFF_BENCH_SHAPES", "")
    if not text:
        return default
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";") if part.strip()]


STEP_SHAPES = [(2, 4, 8, 8)] if SMOKE else _env_shapes([(1, 4, 64, 64), (4, 4, 128, 128), (2, 3, 512, 512)])
"""Shapes of the step benchmarks (SD latents at 512² and 1024², a 512² image)."""
STEP_DTYPES = [torch.float32] if SMOKE else [torch.float32, torch.float16, torch.bfloat16]
LOOP_SHAPE = (2, 4, 8, 8) if SMOKE else (16, 4, 32, 32)
LOOP_STEPS = 3 if SMOKE else 20
UNET_LATENT = 8 if SMOKE else 32
UNET_STEPS = 3 if SMOKE else 20
UNET_SAMPLERS = ["dpmpp_2m", "euler_ancestral"] if SMOKE else ["dpmpp_2m", "euler_ancestral", "ddim", "unipc"]


def devices() -> list[str]:
    """``cpu``, and ``cuda`` where a GPU is visible."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_backends() -> list[tuple[str, str]]:
    """Every ``(device, backend)`` pair to benchmark: reference everywhere, the fused backends on their device."""
    pairs = [("cpu", "reference"), ("cpu", "cpu")]
    if torch.cuda.is_available():
        pairs += [("cuda", "reference"), ("cuda", "triton"), ("cuda", "cuda")]
    return pairs


def pytest_configure(config):
    # smoke numbers (tiny size, three rounds) are not results: do not print pytest-benchmark's table
    if SMOKE and not _opt(config, "benchmark_verbose"):
        if _opt(config, "benchmark_quiet") is not None:
            config.option.benchmark_quiet = True
        session = getattr(config, "_benchmarksession", None)
        if session is not None:
            session.quiet = True


def _opt(config, name):
    try:
        return config.getoption(name)
    except ValueError:  # pytest-benchmark is not installed
        return None


def need_backend(name: str) -> None:
    """Skip the test when ``name`` cannot run here (the reason is the backend's own)."""
    from fastdiff.runtime import ops

    ok, why = ops.backend_status(name)
    if not ok:
        pytest.skip(f"backend {name!r} unavailable: {why}")


@pytest.fixture(autouse=SMOKE)
def _one_thread():
    """Smoke mode runs torch on one thread: on a loaded 2-core CI machine a 2-thread parallel
    region waits for a descheduled thread (tens of ms per op), which would only slow CI down."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def bench(request):
    """``bench(fn, **extra_info)``: pytest-benchmark's ``benchmark`` of ``fn`` (a few rounds in smoke mode).

    ``fn`` must leave the device idle when it returns (CUDA work is synchronised inside it).
    """
    try:
        benchmark = request.getfixturevalue("benchmark")
    except pytest.FixtureLookupError:
        pytest.skip("pytest-benchmark is not installed (pip install -e '.[bench]')")

    def run(fn, group: str, **extra):
        benchmark.group = group
        benchmark.extra_info.update(mode=MODE, torch=torch.__version__, threads=torch.get_num_threads(), **extra)
        if SMOKE:
            return benchmark.pedantic(fn, rounds=SMOKE_ROUNDS, iterations=1, warmup_rounds=1)
        return benchmark(fn)

    return run
