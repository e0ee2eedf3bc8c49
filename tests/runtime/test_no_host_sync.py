"""The sampling loop issues no host-syncing operation from the first model call on (CPU stand-in for a GPU bug).

On a GPU a ``.item()``, ``if t.any():``, ``.tolist()``, ``nonzero`` ... inside the loop stalls every
step and breaks CUDA-graph capture; on CPU it costs nothing, so only a probe sees it
(tests/runtime/_sync_probe.py records them at the ATen and the Python level). The loop runs through
``fastdiff.sample`` with a model that switches the probe on at its first call, for samplers with
ancestral noise, multistep history and dynamic thresholding, guided (with and without guidance
rescale) and unguided, ``check_finite`` on and off, on three programs: the ``reference`` backend
(every step in torch), the ``cpu`` extension, and the CUDA backend's program over a stand-in for
``_C_cuda`` (``cuda-path``: what runs in torch around the kernel on a GPU: model-output slicing, the
guidance-rescale and threshold reductions).

By design there is one sync after the loop: the non-finite flags are read once
(``Executor._finish``: ``flags.nonzero()`` and ``int(...)`` on a GPU). It is left out of the recording
and checked on its own.
"""

from __future__ import annotations

import types

import pytest
import torch

import fastdiff
from fastdiff.backends import cpu as cpu_backend
from fastdiff.backends import cuda as cb
from fastdiff.runtime import executor as executor_mod
from fastdiff.runtime import ops

from ._sync_probe import SyncProbe

B, SHAPE = 2, (2, 3, 4)


class _Net(torch.nn.Module):
    def __init__(self, probe: SyncProbe):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.probe = probe

    def forward(self, x, t, c):
        self.probe.on = True  # from the first model call on
        return torch.tanh(self.lin(x)) * 0.5 + c[:, :1, None, None] * 0.1 + 0.01 * t[:, None, None, None]


class _FakeCudaExt:
    """``_C_cuda`` with a ``Program`` that records launches and runs nothing (the kernel is not the point)."""

    class Program:
        def __init__(self, max_blocks: int = 0) -> None:
            self.rows, self.launches = 0, []

        def add(self, *args) -> int:
            self.rows += 1
            return self.rows - 1

        def set(self, i, which, ptr) -> None:
            pass

        def run(self, i, m, stream) -> None:
            self.launches.append((i, m, stream))


def _cuda_path_prepare(rows, backend="auto", reductions=None):
    prog = cb.CudaProgram(rows, reductions or [None] * len(rows), module=_FakeCudaExt)
    prog.stream = lambda: 0  # no torch.cuda here
    prog._py.extension = False  # the reductions in torch, as on CUDA tensors (not the CPU extension)
    return prog


def _finish_unrecorded(probe: SyncProbe, monkeypatch) -> list:
    """Switch the probe off inside ``Executor._finish`` (the one sync by design) and back on after it."""
    finishes = []
    orig = executor_mod.Executor._finish

    def finish(self, ws):
        was, probe.on = probe.on, False
        try:
            finishes.append(was)
            return orig(self, ws)
        finally:
            probe.on = was

    monkeypatch.setattr(executor_mod.Executor, "_finish", finish)
    return finishes


PLANS = {
    "euler_ancestral": dict(sampler="euler_ancestral"),  # ancestral: noise every step
    "dpmpp_2m": dict(sampler="dpmpp_2m"),  # multistep history
    "dpmpp_2m_sde": dict(sampler="dpmpp_2m_sde"),  # multistep and noise
    "ddim_threshold": dict(sampler="ddim", thresholding=True, clip_sample=False),  # dynamic threshold reduction
}
GUIDANCE = {"unguided": dict(), "cfg": dict(guidance_scale=3.0), "cfg_rescale": dict(guidance_scale=3.0,
                                                                                       guidance_rescale=0.7)}


def _sample(probe, backend, plan, guidance, check_finite, monkeypatch):
    if backend == "cpu" and cpu_backend._C is None:
        pytest.skip("the CPU extension is not built")
    if backend == "cuda-path":
        monkeypatch.setattr(ops, "prepare", _cuda_path_prepare)
    net = _Net(probe)
    torch.manual_seed(0)
    x = torch.randn(B, *SHAPE)
    kw = dict(PLANS[plan], **GUIDANCE[guidance])
    cond = dict(cond=torch.randn(B, 2), uncond=torch.randn(B, 2)) if "guidance_scale" in kw else dict(
        cond=torch.randn(B, 2))
    return fastdiff.sample(net, x, steps=4, seed=[3, 4], backend="reference" if backend == "cuda-path" else backend,
                           check_finite=check_finite, **cond, **kw)


@pytest.mark.parametrize("check_finite", [True, False], ids=["check_finite", "no_check"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda-path"])
def test_the_loop_body_issues_no_host_sync(backend, plan, guidance, check_finite, monkeypatch):
    probe = SyncProbe()
    finishes = _finish_unrecorded(probe, monkeypatch)
    with probe.installed():
        out = _sample(probe, backend, plan, guidance, check_finite, monkeypatch)
    assert probe.on, "the model was never called"
    assert out.shape == (B, *SHAPE)
    assert finishes == [True]  # the loop ran, then _finish once, recorded around
    assert probe.records == [], "host syncs in the loop body:\n" + "\n".join(f"  {op} at {at}"
                                                                            for op, at in probe.records)


def test_the_cuda_path_launched_every_row(monkeypatch):
    """(The stand-in program really ran the loop: one launch per row, on the stream it was given.)"""
    launches = []
    orig = _FakeCudaExt.Program.run
    monkeypatch.setattr(_FakeCudaExt.Program, "run", lambda self, i, m, s: (launches.append((i, s)), orig(self, i, m, s)))
    probe = SyncProbe()
    with probe.installed():
        _sample(probe, "cuda-path", "dpmpp_2m", "cfg_rescale", True, monkeypatch)
    assert launches == [(i, 0) for i in range(4)]


INJECTIONS = {
    "if isnan(x).any()": lambda t: bool(torch.isnan(t).any()),
    "item": lambda t: t.flatten()[0].item(),
    "tolist": lambda t: t[:1, :1, :1, :1].tolist(),
    "cpu": lambda t: t.cpu(),
    "equal": lambda t: torch.equal(t, t),
    "allclose": lambda t: torch.allclose(t, t),
    "nonzero": lambda t: t.nonzero(),
    "torch.tensor(data)": lambda t: torch.tensor([1.0, 2.0]),
    "float(max)": lambda t: float(t.abs().max()),
    "print": lambda t: f"{t.flatten()[0]:.3f}",
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(INJECTIONS))
def test_the_probe_catches_a_sync_added_to_the_loop(name, backend, monkeypatch):
    """Self-test: a sync put in the loop body (here in ``Executor._taken``, on every row's hot path) is
    reported, with the line it came from."""
    probe = SyncProbe()
    _finish_unrecorded(probe, monkeypatch)
    orig = executor_mod.Executor._taken
    inject = INJECTIONS[name]

    def taken(self, ws, out, i, watch):
        inject(out)  # e.g. `if torch.isnan(out).any(): ...`
        return orig(self, ws, out, i, watch)

    monkeypatch.setattr(executor_mod.Executor, "_taken", taken)
    with probe.installed():
        _sample(probe, backend, "euler_ancestral", "cfg", True, monkeypatch)
    assert probe.records, f"{name} inside the loop was not caught"
    # the injected line, and the loop's line that led there (as a sync in fastdiff itself would be named)
    assert all(at.startswith("test_no_host_sync.py:") and " via runtime/executor.py:" in at and at.endswith("(_rows)")
               for _, at in probe.records), probe.records


def test_the_one_sync_by_design_is_the_flag_read_after_the_loop(monkeypatch):
    """With the GPU's flag read (no CPU extension to read the flags), the whole run's only syncs are
    in ``Executor._finish``: ``nonzero`` and its ``_local_scalar_dense``, once, after the last row."""
    probe = SyncProbe()
    with probe.installed():
        _sample(probe, "reference", "dpmpp_2m_sde", "cfg_rescale", True, monkeypatch)
        assert probe.records == []
        probe.on = False  # (the model switches it on again at its first call)
        monkeypatch.setattr(cpu_backend, "_C", None)  # _finish then reads the flags as on a GPU
        _sample(probe, "reference", "dpmpp_2m_sde", "cfg_rescale", True, monkeypatch)
    ops_seen = [op for op, _ in probe.records]
    # (the read is executor.raise_flagged, which Executor._finish and the guided loop's _finish call)
    assert "aten.nonzero" in ops_seen and all("executor.py" in at and "raise_flagged" in at
                                              for _, at in probe.records), probe.records
    assert len({at for _, at in probe.records}) <= 3  # nz = flags.nonzero(); nz.numel(); int(nz[0, 0]) when set


def _guiders():
    from fastdiff import guiders as G

    return {"cfg": G.Guider(scale=3.0), "cfg_rescale": G.Guider(scale=3.0, rescale=0.5),
            "cfg_zero_star": G.CFGZeroStar(scale=3.0), "apg": G.APG(scale=3.0)}


@pytest.mark.parametrize("guider", ["cfg", "cfg_rescale", "cfg_zero_star", "apg"])
def test_the_guided_loop_issues_no_host_sync(guider):
    probe = SyncProbe()
    net = _Net(probe)
    torch.manual_seed(0)
    with probe.installed():  # check_finite off: its flag read after the loop is a sync by design
        fastdiff.sample(net, torch.randn(B, *SHAPE), sampler="dpmpp_2m", steps=4, seed=[3, 4], backend="reference",
                        cond=torch.randn(B, 2), uncond=torch.randn(B, 2), guidance=_guiders()[guider],
                        check_finite=False)
    assert probe.on, "the model was never called"
    assert probe.records == [], "host syncs in the guided loop:\n" + "\n".join(f"  {op} at {at}"
                                                                              for op, at in sorted(set(probe.records)))
