"""The ``cuda`` backend launches on the caller's current stream (no GPU needed).

Every launch of fastdiff/backends/cuda.py passes ``torch.cuda.current_stream(device).cuda_stream`` of
the tensors' own device, read at the launch (not cached): ``step`` (one row), ``CudaProgram.run``
(a prepared row; its reductions run as torch operations, which use the current stream anyway) and
``philox_words`` (the kernel's raw Philox stream). A launch on another stream than the caller's
would race with the caller's work and escape a CUDA-graph capture. ``_C_cuda`` has no other
launching entry point (no Gram or reduction kernels: those run in torch on CUDA).

Stand-ins: a ``_C_cuda`` that records the stream argument, and ``torch.cuda.current_stream`` /
``torch.cuda.device`` that hand out a distinct fake stream per device and per ``with stream(...)``.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from fastdiff.backends import cuda as cb
from fastdiff.core.args import C_OUT, N_COEF, StepArgs
from fastdiff.core.plan import OP_X
from fastdiff.runtime import ops

from ._fake_cuda import FakeExt

DEV = torch.device("cuda", 1)  # what the tensors say they are on (the fake current_stream is asked for it)


class FakeStreams:
    """``torch.cuda.current_stream`` / ``device`` / ``stream``: stream handles differ by device and by
    the ``stream(...)`` context in force, so a launch on the wrong one is seen."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.asked: list[str] = []
        self.device_ctx: list[str] = []

    class Stream:
        def __init__(self, handle: int) -> None:
            self.cuda_stream = handle

    def current_stream(self, device=None):
        key = str(torch.device(device)) if device is not None else "default"
        self.asked.append(key)
        return self.Stream(self.current.get(key, 0x1000 + 0x100 * len(key)))

    @contextmanager
    def device(self, dev):
        self.device_ctx.append(str(dev))
        yield

    @contextmanager
    def stream(self, key: str, handle: int):
        prev = self.current.get(key)
        self.current[key] = handle
        try:
            yield
        finally:
            if prev is None:
                del self.current[key]
            else:
                self.current[key] = prev


@pytest.fixture
def fakes(monkeypatch):
    streams, ext = FakeStreams(), FakeExt()
    monkeypatch.setattr(cb, "_C_cuda", ext)
    monkeypatch.setattr(torch.cuda, "current_stream", streams.current_stream)
    monkeypatch.setattr(torch.cuda, "device", streams.device)
    return streams, ext


def _row(x: torch.Tensor, m_c: torch.Tensor | None = None, w=None, r=None) -> StepArgs:
    coef = [0.0] * N_COEF
    coef[C_OUT + OP_X] = 1.0
    return StepArgs(x=x, out=x, m=x, m_c=m_c, w=w, r=r, coef=tuple(coef))


class _OnDevice(torch.Tensor):
    """A CPU tensor that says it is on ``DEV`` (only ``device`` is asked of ``args.x``)."""

    @property
    def device(self):
        return DEV


def _x(*shape) -> torch.Tensor:
    return torch.randn(*shape).as_subclass(_OnDevice)


def test_step_launches_on_the_current_stream_of_the_tensors_device(fakes):
    streams, ext = fakes
    x = _x(2, 8)
    cb.step(_row(x))
    with streams.stream("cuda:1", 0xBEEF):  # the caller switched streams (torch.cuda.stream(s))
        cb.step(_row(x))
    cb.step(_row(x))
    default = streams.current_stream(DEV).cuda_stream
    assert ext.launches == [("step", default), ("step", 0xBEEF), ("step", default)]
    assert streams.device_ctx == ["cuda:1"] * 3  # under the tensors' device
    assert set(streams.asked) == {"cuda:1"}  # never the process's current device


def test_a_prepared_program_reads_the_current_stream_at_every_run(fakes):
    streams, ext = fakes
    x, m_c = _x(2, 8), _x(2, 8)
    rows = [_row(x), _row(x, m_c=m_c, w=torch.full((2,), 3.0), r=torch.ones(2))]
    prog = cb.CudaProgram(rows, [None, ops.Reduction(rescale=0.7)], module=ext)
    out = torch.randn(4, 8)
    prog.run(0, out[:2])
    with streams.stream("cuda:1", 0xCAFE):
        prog.run(1, out)  # (its guidance-rescale reduction runs in torch first, on the current stream)
    prog.run(0, out[:2])
    default = streams.current_stream(DEV).cuda_stream
    assert ext.launches == [("run 0", default), ("run 1", 0xCAFE), ("run 0", default)]
    assert set(streams.asked) == {"cuda:1"}


def test_philox_words_launch_on_the_current_stream(fakes, monkeypatch):
    streams, ext = fakes
    seeds = torch.arange(3, dtype=torch.int64).as_subclass(_OnDevice)
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: real_empty(*a, **k))  # (no CUDA memory here)
    with streams.stream("cuda:1", 0xF00D):
        words = cb.philox_words(seeds, row=5, stream=0, numel=10)
    assert words.shape == (3, 12)
    assert ext.launches == [("bits", 0xF00D)] and streams.device_ctx == ["cuda:1"]
