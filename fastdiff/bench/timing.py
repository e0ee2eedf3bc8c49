"""Low-level timing used by the profiler: named regions per plan row, and a host-sync counter.

A :class:`RegionTimer` is handed to the loop (``LoopOptions.timer``); the loop wraps the model
call, the guidance reductions, external noise draws and the fused step in ``timer.region(name)``.
On CPU a region is a wall clock; on CUDA it is a pair of CUDA events (device time) plus the host
time spent launching. :class:`SyncCounter` counts the operations that force a value onto the host
(``.item()``, ``bool(t)``, ``.tolist()``, ``.cpu()`` of a device tensor, ...), which on a GPU
are host-device synchronisations.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager

import torch
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
