"""The control flow of ``cuda_graph=True`` on CPU: argument checks and the warm-up / capture /
replay sequence of ``fastdiff.loop._run_graphed`` against a recording stand-in for ``torch.cuda``.

Nothing here runs a CUDA graph (tests/test_cuda_graph.py does, on a GPU): it checks the order of
calls PyTorch's CUDA-graph rules ask for, which streams they use, and the errors.
"""

from contextlib import contextmanager

import pytest
import torch

import fastdiff
from fastdiff import loop
from fastdiff.loop import GraphCaptureError, LoopOptions

from ._plans import edm_euler


class FakeCuda:
    """Records what ``_run_graphed`` asks of ``torch.cuda``; ``capturing`` is True inside ``graph``."""

    def __init__(self, end_error=None):
        self.log = []
        self.current = "caller"
        self.capturing = False
        self.end_error = end_error
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.name = f"side{sum(1 for e in fake.log if e[0] == 'new_stream')}"
                fake.log.append(("new_stream", self.name, str(device)))

            def wait_stream(self, other):
                fake.log.append(("wait", self.name, other.name if hasattr(other, "name") else other))

        class Caller:
            name = "caller"

            def wait_stream(self, other):
                fake.log.append(("wait", "caller", other.name))

        class CUDAGraph:
            def replay(self):
                fake.log.append(("replay", fake.current))

        self.Stream, self.CUDAGraph, self._caller = Stream, CUDAGraph, Caller()

    def current_stream(self, device=None):
        return self._caller

    @contextmanager
    def device(self, dev):
        self.log.append(("device", str(dev)))
        yield

    @contextmanager
    def stream(self, s):
        prev, self.current = self.current, s.name
        try:
            yield
        finally:
            self.current = prev

    @contextmanager
    def graph(self, g, stream=None, **kw):
        prev, self.current = self.current, stream.name if stream is not None else "default_capture_stream"
        self.capturing = True
        self.log.append(("capture_begin", self.current))
        try:
            yield
        finally:
            self.capturing = False
            self.log.append(("capture_end",))
            if self.end_error is not None:
                raise self.end_error  # as torch.cuda.graph: capture_end() raises, the stream is not restored
            self.current = prev


def _recording_rows(fake, x, fail_in=None):
    calls = []

    def run_rows(state, it):
        mode = "capture" if fake.capturing else "eager"
        calls.append((mode, fake.current, state is x, state.clone(), list(it)))
        fake.log.append(("run_rows", mode, fake.current))
        if fail_in == mode:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        if mode == "eager":
            state.add_(1.0)  # the warm-up works on a copy: x must not see this

    return run_rows, calls


def test_warm_up_once_on_a_side_stream_then_capture_on_it_then_replay_on_the_caller_stream():
    fake = FakeCuda()
    x = torch.randn(2, 3)
    x0 = x.clone()
    run_rows, calls = _recording_rows(fake, x)
    loop._run_graphed(run_rows, x, 4, cuda=fake)
    assert [c[0] for c in calls] == ["eager"] * loop.GRAPH_WARMUP_PASSES + ["capture"]
    assert loop.GRAPH_WARMUP_PASSES == 1
    warm, cap = calls[0], calls[-1]
    assert not warm[2] and torch.equal(warm[3], x0)  # a copy of the initial state
    assert cap[2] and torch.equal(cap[3], x0)  # x itself, untouched by the warm-up
    assert warm[4] == cap[4] == [0, 1, 2, 3]  # every row, both times
    side = warm[1]
    assert side.startswith("side") and cap[1] == side  # capture on the warm-up stream
    events = [e for e in fake.log if e[0] != "device"]
    assert events == [
        ("new_stream", side, "cpu"),
        ("wait", side, "caller"),  # the side stream waits for the caller's work (x, tables)
        ("run_rows", "eager", side),
        ("wait", "caller", side),  # and the caller waits for the warm-up
        ("capture_begin", side),
        ("run_rows", "capture", side),
        ("capture_end",),
        ("replay", "caller"),
    ]
    assert fake.log[0] == ("device", "cpu")  # everything under x's device


def test_capture_failure_names_the_root_cause_not_the_end_of_capture_error():
    fake = FakeCuda(end_error=RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    x = torch.randn(2, 3)
    run_rows, calls = _recording_rows(fake, x, fail_in="capture")
    with pytest.raises(GraphCaptureError, match="operation not permitted when stream is capturing") as info:
        loop._run_graphed(run_rows, x, 2, cuda=fake)
    assert "previous error during capture" not in str(info.value)
    assert ("replay", "caller") not in fake.log
    assert fake.current == "caller"  # the caller's stream is current again


def test_warm_up_errors_are_not_reported_as_capture_errors():
    fake = FakeCuda()
    x = torch.randn(2, 3)
    run_rows, calls = _recording_rows(fake, x, fail_in="eager")
    with pytest.raises(RuntimeError) as info:
        loop._run_graphed(run_rows, x, 2, cuda=fake)
    assert not isinstance(info.value, GraphCaptureError)
    assert not any(e[0] == "capture_begin" for e in fake.log)


def test_graphable_check_lists_every_cause_before_any_work():
    calls = []

    def model(x, t, c=None):
        calls.append(1)
        return x

    with pytest.raises(ValueError) as info:
        fastdiff.sample(model, torch.randn(2, 3), plan=edm_euler(3), seed=0, cuda_graph=True,
                        callback=lambda *a: None, progress=True, post_step=lambda i, x: None)
    msg = str(info.value)
    for part in ("cuda_graph=True needs CUDA tensors, got noise on cpu", "cannot capture", "callback", "post_step",
                 "progress", "cuda_graph=False"):
        assert part in msg, (part, msg)
    assert not calls  # refused before the first model call


def test_graphable_check_names_conditioning_on_another_device():
    x = torch.randn(2, 3)
    opts = LoopOptions(cond={"emb": torch.randn(2, 4, device="meta"), "n": 3}, uncond=torch.randn(2, 4, device="meta"),
                       cuda_graph=True)
    with pytest.raises(ValueError) as info:
        loop._check_graphable(opts, x)
    msg = str(info.value)
    assert "needs cond['emb'] on cpu, got meta" in msg and "needs uncond on cpu, got meta" in msg
