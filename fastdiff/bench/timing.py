"""Low-level timing: round-robin samples and the copy-bandwidth yardstick of every benchmark, and,
for the profiler, named regions per plan row and a host-sync counter.

A :class:`RegionTimer` is handed to the loop (``LoopOptions.timer``); the loop wraps the model
call, the guidance reductions, external noise draws and the fused step in ``timer.region(name)``.
On CPU a region is a wall clock; on CUDA it is a pair of CUDA events (device time) plus the host
time spent launching. :class:`SyncCounter` counts the operations that force a value onto the host
(``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` of a device tensor, ...), which on a GPU
are host-device synchronisations.

**Copy bandwidth**, the one definition the benchmarks use as the ceiling of a memory-bound kernel
(``copy_gb_s`` in the ``step`` and ``floor`` rows of ``fastdiff bench``, ``benchmarks/bench_cpu_half.py``;
the GPU's ``gpu_copy_gbps`` is the same quotient at a fixed 1 GiB):

* what: ``dst.copy_(src)`` of two contiguous float32 tensors of ``nbytes // 8`` elements each, where
  ``nbytes`` is what the measured kernel moves (its bytes read plus written), so the copy streams
  the same amount through the same level of the cache hierarchy (a copy of a few MB stays in L3,
  of a few hundred MB does not, and the two differ several times over); float32 whatever the
  kernel's dtype, as torch's byte-wise copy_ is slower (uint8: 43 against 53 GB/s at 25 MB, 1
  thread, AMD EPYC) and a yardstick must not depend on the element type;
* GB/s: bytes read plus bytes written (:func:`copy_bytes`) over the time of one copy;
* threads: torch's current thread count, which the benchmarks set to the measured kernels' own;
* sampled: round-robin with the measured methods (:func:`round_robin`: one sample of each per
  round, each sample as many calls as last about ``budget_s``), so a change of machine load hits
  the copy and the kernels alike;
* the value: the median sample (:func:`summarize`). Samples further from it than
  :data:`OUTLIER_MADS` scaled median absolute deviations (and more than 10 %) are outliers: they
  are listed (``copy_outliers_gb_s``) so a reader sees a disturbed run, and used for nothing.
"""

from __future__ import annotations

import contextvars
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

OUTLIER_MADS = 5.0
"""A sample is an outlier when it is further from the median than this many scaled median absolute
deviations (1.4826 MAD: one standard deviation of normal noise) and more than 10 % of the median."""


def round_robin(fns: dict[str, Callable[[], object]], repeats: int, budget_s: float = 2e-3) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, taken round-robin (one sample of
    each function per round). Each sample runs as many calls as last about ``budget_s`` (calibrated
    after three warm-up calls), so short functions are not timed at the clock's resolution."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            k = calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return samples


def outliers(samples: list[float]) -> list[int]:
    """Indices of the samples further from the median than :data:`OUTLIER_MADS` scaled MADs and 10 %."""
    med = statistics.median(samples)
    mad = 1.4826 * statistics.median(abs(s - med) for s in samples)
    lim = max(OUTLIER_MADS * mad, 0.1 * med)
    return [i for i, s in enumerate(samples) if abs(s - med) > lim]


def summarize(samples: list[float]) -> dict:
    """``{"median": s, "best": s, "outliers": [indices]}`` of samples in seconds: the median (which
    outliers cannot move) is the value, the best sample the least disturbed one."""
    return {"median": statistics.median(samples), "best": min(samples), "outliers": outliers(samples)}


def copy_fn(nbytes: int, device: torch.device | str = "cpu") -> Callable[[], object]:
    """The yardstick copy for a kernel moving ``nbytes`` (read plus written): ``dst.copy_(src)`` of two
    contiguous float32 tensors of ``nbytes // 8`` elements each (at least 1), ``src`` filled once."""
    src = torch.randn(copy_bytes(nbytes) // 8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bytes(nbytes: int) -> int:
    """Bytes read plus written by :func:`copy_fn` ``(nbytes)``: ``nbytes`` rounded down to whole
    float32 elements of both tensors (at least one each)."""
    return 8 * max(1, nbytes // 8)


def copy_gb_s(nbytes: int, samples: list[float]) -> dict:
    """The copy bandwidth of :func:`copy_fn` ``(nbytes)`` from its ``samples`` (seconds per copy):
    ``gb_s`` (median sample), ``gb_s_best`` (best sample) and ``outliers_gb_s`` (the outlier samples,
    in sample order: shown, not used)."""
    moved = copy_bytes(nbytes)
    s = summarize(samples)
    return {"gb_s": moved / s["median"] / 1e9, "gb_s_best": moved / s["best"] / 1e9,
            "outliers_gb_s": [moved / samples[i] / 1e9 for i in s["outliers"]]}
from torch.overrides import TorchFunctionMode

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fastdiff_timer", default=None)

SYNC_FUNCS = frozenset({"item", "__bool__", "tolist", "__float__", "__int__", "__index__", "numpy", "nonzero",
                        "equal", "allclose", "_local_scalar_dense"})
"""Tensor functions that need a value on the host (a device sync on CUDA)."""


class SyncCounter(TorchFunctionMode):
    """Counts host-sync operations while active (``with SyncCounter() as c: ...; c.count``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.where: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        hit = name in SYNC_FUNCS
        if name in ("cpu", "to") and args and isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu":
            hit = name == "cpu" or any(str(a).startswith("cpu") for a in (*args[1:], *(kwargs or {}).values()))
        if hit:
            self.count += 1
            self.where.append(name)
        return func(*args, **(kwargs or {}))


class RegionTimer:
    """Per-row, per-region times. ``records`` is a list of
    ``[row, region, host_s, start_s, device_s, parent]``, ``parent`` being the name of the region
    the record ran inside (``None`` at the top level): a region timed inside another is part of
    that one's time, and a report that shows it separately takes it out of the parent's.

    On CUDA the device time of each region is resolved by :meth:`finish` from CUDA events.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.row = -1
        self.t0 = time.perf_counter()
        self.records: list[list] = []  # [row, region, host_seconds, start_seconds, device_seconds, parent]
        self._open: list[str] = []  # names of the regions running now, outermost first
        self._events: list[tuple[int, object, object]] = []
        self.row_walls: dict[int, float] = {}
        self._row_start = None

    def start_row(self, i: int) -> None:
        """Mark the start of plan row ``i`` (closes the previous row's wall time)."""
        now = time.perf_counter()
        if self._row_start is not None:
            self.row_walls[self.row] = now - self._row_start
        self.row = i
        self._row_start = now

    def end(self) -> None:
        """Close the last row."""
        if self._row_start is not None:
            self.row_walls[self.row] = time.perf_counter() - self._row_start
            self._row_start = None

    @contextmanager
    def region(self, name: str):
        """Time the enclosed work as region ``name`` of the current row."""
        if self.cuda:
            ev0 = torch.cuda.Event(enable_timing=True)
            ev1 = torch.cuda.Event(enable_timing=True)
            ev0.record()
        parent = self._open[-1] if self._open else None
        self._open.append(name)
        h0 = time.perf_counter()
        token = _ACTIVE.set(self)
        try:
            yield
        finally:
            _ACTIVE.reset(token)
            self._open.pop()
            h1 = time.perf_counter()
            rec = [self.row, name, h1 - h0, h0 - self.t0, h1 - h0, parent]
            if self.cuda:
                ev1.record()
                self._events.append((len(self.records), ev0, ev1))
            self.records.append(rec)

    def finish(self) -> None:
        """Resolve device times (CUDA: one synchronisation, after the loop)."""
        self.end()
        if self.cuda and self._events:
            torch.cuda.synchronize(self.device)
            for idx, ev0, ev1 in self._events:
                self.records[idx][4] = ev0.elapsed_time(ev1) / 1000.0
            self._events.clear()


def active_timer() -> RegionTimer | None:
    """The timer whose region is running now (backends use it to time their sub-phases)."""
    return _ACTIVE.get()
