"""The control flow of ``cuda_graph=True`` on CPU: argument checks, the warm-up / capture sequence
of ``fastdiff.runtime.graphs.capture`` and the capture-once, replay-many logic of
``Executor.run_graphed``, against a recording stand-in for ``torch.cuda`` whose "replay" runs the
captured loop body again (on CPU tensors).

Nothing here runs a CUDA graph (tests/runtime/test_cuda_graph.py does, on a GPU): it checks the order of
calls PyTorch's CUDA-graph rules ask for, which streams they use, the errors, that inputs reach the
static buffers a graph reads, and when a graph is captured again.
"""

import types
from contextlib import contextmanager

import pytest
import torch

import fastdiff
from fastdiff.runtime import graphs
from fastdiff.runtime.executor import Call, Executor
from fastdiff.core.guidance import Guidance
from fastdiff.runtime.loop import GraphCaptureError

from ..backends._fake_cuda import FakeExt
from .._plans import edm_euler


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
                self.fd_body()  # what the recorded graph would do

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


def _recording_body(fake, fail_in=None):
    calls = []

    def body():
        mode = "capture" if fake.capturing else "eager"
        calls.append((mode, fake.current))
        fake.log.append(("body", mode, fake.current))
        if fail_in == mode:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    return body, calls


def test_warm_up_once_on_a_side_stream_then_capture_on_it_and_nothing_replayed():
    fake = FakeCuda()
    body, calls = _recording_body(fake)
    graph = graphs.capture(body, torch.device("cpu"), cuda=fake)
    assert [c[0] for c in calls] == ["eager"] * graphs.GRAPH_WARMUP_PASSES + ["capture"]
    assert graphs.GRAPH_WARMUP_PASSES == 1
    side = calls[0][1]
    assert side.startswith("side") and calls[-1][1] == side  # capture on the warm-up stream
    events = [e for e in fake.log if e[0] != "device"]
    assert events == [
        ("new_stream", side, "cpu"),
        ("wait", side, "caller"),  # the side stream waits for the caller's work (static inputs, tables)
        ("body", "eager", side),
        ("wait", "caller", side),  # and the caller waits for the warm-up
        ("capture_begin", side),
        ("body", "capture", side),
        ("capture_end",),
    ]
    assert fake.log[0] == ("device", "cpu")  # everything under the device
    assert graph.fd_body is body and fake.current == "caller"


def test_capture_failure_names_the_root_cause_not_the_end_of_capture_error():
    fake = FakeCuda(end_error=RuntimeError("CUDA error: operation failed due to a previous error during capture"))
    body, calls = _recording_body(fake, fail_in="capture")
    with pytest.raises(GraphCaptureError, match="operation not permitted when stream is capturing") as info:
        graphs.capture(body, torch.device("cpu"), cuda=fake)
    assert "previous error during capture" not in str(info.value)
    assert fake.current == "caller"  # the caller's stream is current again


def test_warm_up_errors_are_not_reported_as_capture_errors():
    fake = FakeCuda()
    body, calls = _recording_body(fake, fail_in="eager")
    with pytest.raises(RuntimeError) as info:
        graphs.capture(body, torch.device("cpu"), cuda=fake)
    assert not isinstance(info.value, GraphCaptureError)
    assert not any(e[0] == "capture_begin" for e in fake.log)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, c):
        return torch.tanh(self.lin(x)) * 0.5 + c[:, :1] * 0.1 + 0.01 * t[:, None]


def _executor(plan, **kw):
    return Executor(plan, (3, 4), torch.float32, "cpu", guidance=Guidance(2.5), **kw)


def _captures(fake):
    return sum(1 for e in fake.log if e[0] == "capture_begin")


def test_graph_captured_once_and_replayed_with_each_calls_inputs():
    plan = fastdiff.make_plan("dpmpp_2m_sde", 6)
    net = _Net()
    ex = _executor(plan)
    fake = FakeCuda()
    results = []
    for k in range(3):  # new noise, seeds and conditioning each call
        x = torch.randn(3, 4) * plan.init_scale
        c, u = torch.randn(3, 2), torch.randn(3, 2)
        call = dict(cond=c, uncond=u, seeds=[k, k + 1, k + 2])
        got = ex.run_graphed(net, x, Call(**call), cuda=fake)
        want = ex.run(net, x, Call(**call))
        assert torch.equal(got, want), k
        results.append(got)
    assert _captures(fake) == 1 and sum(1 for e in fake.log if e[0] == "replay") == 3
    assert not any(r is ex._graph.result for r in results)  # copies, never the static buffer
    assert not torch.equal(results[0], results[1])


def test_graph_recaptured_when_the_model_or_conditioning_changes():
    plan = fastdiff.make_plan("euler_ancestral", 4)
    net = _Net()
    ex = _executor(plan)
    fake = FakeCuda()
    x = torch.randn(3, 4) * plan.init_scale

    def run(model, c, u):
        got = ex.run_graphed(model, x, Call(cond=c, uncond=u, seeds=[1, 2, 3]), cuda=fake)
        assert torch.equal(got, ex.run(model, x, Call(cond=c, uncond=u, seeds=[1, 2, 3])))

    c, u = torch.randn(3, 2), torch.randn(3, 2)
    run(net, c, u)
    run(fastdiff.models.denoisers.as_model(net), c, u)  # a fresh wrapper of the same module: the same model
    assert _captures(fake) == 1
    with torch.no_grad():
        net.lin.weight.mul_(0.5)  # updated in place: the graph reads the new values
    run(net, c, u)
    assert _captures(fake) == 1
    net.lin.weight = torch.nn.Parameter(net.lin.weight.detach() * 2)  # replaced: captured again
    run(net, c, u)
    assert _captures(fake) == 2
    run(_Net(), c, u)  # another model
    assert _captures(fake) == 3
    run(net, torch.randn(3, 5), torch.randn(3, 5))  # conditioning of another shape
    assert _captures(fake) == 4


def test_graphed_state_shape_dtype_device_refused_by_name():
    ex = _executor(fastdiff.make_plan("euler", 3))
    fake = FakeCuda()
    for bad, what in ((torch.randn(2, 4), "shape"), (torch.randn(3, 4, dtype=torch.float64), "dtype")):
        with pytest.raises(ValueError, match=what):
            ex.run_graphed(_Net(), bad, Call(cond=torch.randn(3, 2), uncond=torch.randn(3, 2)), cuda=fake)
    assert _captures(fake) == 0


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
    with pytest.raises(ValueError) as info:
        graphs.check_graphable(x.device, cond={"emb": torch.randn(2, 4, device="meta"), "n": 3},
                               uncond=torch.randn(2, 4, device="meta"))
    msg = str(info.value)
    assert "needs cond['emb'] on cpu, got meta" in msg and "needs uncond on cpu, got meta" in msg


# --- the real loop body through the capture flow, on meta tensors -----------------------------------
#
# Meta tensors have shapes and dtypes but no data: every operation that would read device data on
# the host (.item(), bool(t), nonzero, .tolist(), printing) raises on them, as it would make a real
# CUDA-graph capture fail. The executor's real loop body (Executor._rows: model calls, the
# guidance-rescale reduction, the steps) runs on them with the reference backend (plain torch) or
# with the CUDA backend's program over a stand-in _C_cuda (whose kernel is not run: it sees no data),
# through graphs.capture with the FakeCuda above, while the host-sync probe (_sync_probe) records
# what meta tensors let through (a tensor made from Python data, .cpu(), ...) during the capture.
# check_finite is off: reading the flags after the replay (Executor._finish) is the loop's one host
# sync by design, outside the graph, and has no meaning on meta tensors.


class _MetaStreams:
    """``torch.cuda.current_stream`` for the backends, answering FakeCuda's current stream."""

    def __init__(self, fake: FakeCuda) -> None:
        self.fake = fake
        self.handles: dict[str, int] = {}

    def __call__(self, device=None):
        name = self.fake.current
        return types.SimpleNamespace(cuda_stream=self.handles.setdefault(name, 0x1000 + len(self.handles)), name=name)


def _meta_run(program: str, monkeypatch, inject=None):
    from fastdiff.backends import cuda as cb
    from fastdiff.runtime import executor as executor_mod
    from fastdiff.runtime import ops

    from ._sync_probe import SyncProbe

    from fastdiff.core import validate

    # a call's conditioning is refused on meta (it would reach a model as data); checked before the loop,
    # it is not what this test is about
    check = validate.conditioning
    monkeypatch.setattr(validate, "conditioning", lambda name, c, batch, **kw: None if isinstance(
        c, torch.Tensor) and c.is_meta else check(name, c, batch, **kw))
    fake = FakeCuda()
    streams = _MetaStreams(fake)
    monkeypatch.setattr(torch.cuda, "current_stream", streams)
    ext = FakeExt()
    if program == "cuda-path":
        monkeypatch.setattr(ops, "prepare", lambda rows, backend="auto", reductions=None: cb.CudaProgram(
            rows, reductions or [None] * len(rows), module=ext))
    if inject is not None:
        orig = executor_mod.Executor._taken
        monkeypatch.setattr(executor_mod.Executor, "_taken",
                            lambda self, ws, out, i, watch: (inject(out), orig(self, ws, out, i, watch))[1])
    probe = SyncProbe()
    graph_cm = fake.graph

    @contextmanager
    def graph(g, stream=None, **kw):  # record while capturing
        with graph_cm(g, stream=stream, **kw):
            probe.on = True
            try:
                yield
            finally:
                probe.on = False

    monkeypatch.setattr(fake, "graph", graph)
    plan = fastdiff.make_plan("dpmpp_2m_sde", 5)  # multistep history and noise
    ex = Executor(plan, (3, 4), torch.float32, "meta", guidance=Guidance(2.5, rescale=0.7), backend="reference",
                  check_finite=False)
    net = _Net().to("meta")
    meta = dict(device="meta")
    with probe.installed():
        for k in range(2):
            got = ex.run_graphed(net, torch.randn(3, 4, **meta), Call(cond=torch.randn(3, 2, **meta),
                                 uncond=torch.randn(3, 2, **meta), seeds=[k, k + 1, k + 2]), cuda=fake)
            assert got.device.type == "meta" and got.shape == (3, 4)
    return fake, streams, ext, probe, len(plan.rows)


@pytest.mark.parametrize("program", ["reference", "cuda-path"])
def test_the_real_loop_body_on_meta_tensors_captures_without_a_host_sync(program, monkeypatch):
    fake, streams, ext, probe, n = _meta_run(program, monkeypatch)
    assert _captures(fake) == 1 and sum(1 for e in fake.log if e[0] == "replay") == 2
    assert probe.records == [], "host syncs while capturing:\n" + "\n".join(f"  {o} at {a}" for o, a in probe.records)
    if program == "cuda-path":
        side = streams.handles["side0"]
        # warm-up and capture: every row launched once each, on the capture stream (side0), none on the caller's
        assert ext.launches[:2 * n] == [(f"run {i}", side) for i in range(n)] * 2


@pytest.mark.parametrize("program", ["reference", "cuda-path"])
def test_a_host_sync_in_the_loop_body_fails_the_meta_capture(program, monkeypatch):
    # the warm-up pass already reads data (it is eager, not captured): on meta tensors it raises there,
    # as `if torch.isnan(out).any():` would stall every step of an eager GPU loop
    with pytest.raises(Exception, match="meta"):
        _meta_run(program, monkeypatch, inject=lambda out: bool(torch.isnan(out).any()))


@pytest.mark.parametrize("program", ["reference", "cuda-path"])
def test_an_upload_in_the_loop_body_is_caught_while_capturing(program, monkeypatch):
    # a tensor made from Python data (a host-to-device copy on a GPU) passes on meta tensors: the probe sees it
    with pytest.raises(AssertionError, match=r"aten.lift_fresh at test_cuda_graph_flow.py:\d+ \(<lambda>\) via "
                                             r"runtime/executor.py:\d+ \(_rows\)"):
        fake, streams, ext, probe, n = _meta_run(program, monkeypatch, inject=lambda out: torch.tensor([1.0]))
        assert probe.records == [], "host syncs while capturing:\n" + "\n".join(f"{o} at {a}" for o, a in probe.records)
