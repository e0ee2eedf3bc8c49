"""fastdiff.sample(..., cuda_graph=True): the whole loop as one CUDA graph (GPU parts skip without one)."""

import pytest
import torch

import fastdiff
from fastdiff.runtime.loop import GraphCaptureError

from .._plans import edm_euler, edm_euler_ancestral

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: graph capture needs one")


def _fused(name: str):
    """``name`` as a parameter that skips where that backend cannot run (no extension, no triton)."""
    from fastdiff.runtime import ops

    ok, why = ops.backend_status(name) if torch.cuda.is_available() else (False, "no CUDA device")
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: {why}"))


FUSED = [_fused("cuda"), _fused("triton")]
"""The GPU backends every graph and no-sync test runs on: both must hold each property."""


def _model(x, t, c=None):
    return torch.tanh(x * 0.5) + 0.1 * t.reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype).clamp(max=1)


def test_cuda_graph_errors_name_the_cause_on_cpu():
    plan = edm_euler(3)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        fastdiff.sample(_model, torch.randn(2, 3), plan=plan, seed=0, cuda_graph=True)


@needs_gpu
def test_cuda_graph_refuses_host_side_hooks():
    plan = edm_euler(3)
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="cannot capture callback"):
        fastdiff.sample(_model, x, plan=plan, seed=0, cuda_graph=True, callback=lambda *a: None)
    with pytest.raises(ValueError, match="cannot capture generator"):
        fastdiff.sample(_model, x, plan=plan, cuda_graph=True, generator=torch.Generator("cuda"))


@needs_gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_ancestral", "dpmpp_2m_sde", "unipc", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", FUSED)
def test_graph_replay_equals_eager(sampler, dtype, backend):
    noise = torch.randn(3, 4, 9, 7, device="cuda", dtype=dtype)
    cond, uncond = torch.randn(3, 1, device="cuda", dtype=dtype), torch.randn(3, 1, device="cuda", dtype=dtype)
    kw = dict(sampler=sampler, steps=12, seed=[11, 12, 13], guidance_scale=3.0, cond=cond, uncond=uncond,
              backend=backend)
    eager = fastdiff.sample(_model, noise, **kw)
    graphed = fastdiff.sample(_model, noise, cuda_graph=True, **kw)
    assert torch.equal(eager, graphed)


@needs_gpu
def test_graph_capture_of_a_syncing_model_raises_a_clear_error():
    def syncing(x, t):
        if float(x.abs().max()) > 1e9:  # a host sync: not capturable
            raise AssertionError
        return x * 0.5

    with pytest.raises(GraphCaptureError, match="could not be captured as one CUDA graph"):
        fastdiff.sample(syncing, torch.randn(2, 8, device="cuda"), plan=edm_euler_ancestral(4), seed=0,
                        cuda_graph=True)


@needs_gpu
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "unipc"])
@pytest.mark.parametrize("backend", FUSED)
def test_loop_never_syncs_with_the_host(sampler, backend):
    # From the first model call on (the loop; set-up copies before it are allowed), every step runs
    # under sync_debug_mode("error"): any host-device synchronisation inside the loop raises.
    noise = torch.randn(2, 4, 8, 8, device="cuda")
    cond, uncond = torch.randn(2, 1, device="cuda"), torch.randn(2, 1, device="cuda")

    def model(x, t, c):
        torch.cuda.set_sync_debug_mode("error")
        return _model(x, t) + 0.01 * c.reshape(-1, 1, 1, 1)

    try:
        out = fastdiff.sample(model, noise, sampler=sampler, steps=8, seed=[1, 2], check_finite=False,
                              guidance_scale=4.0, cond=cond, uncond=uncond, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out).all()


@needs_gpu
def test_failed_capture_leaves_the_callers_stream_current():
    # torch.cuda.graph's __exit__ skips restoring the stream when capture_end() raises
    def syncing(x, t):
        if float(x.abs().max()) > 1e9:
            raise AssertionError
        return x * 0.5

    before = torch.cuda.current_stream()
    with pytest.raises(GraphCaptureError):
        fastdiff.sample(syncing, torch.randn(2, 8, device="cuda"), plan=edm_euler_ancestral(4), seed=0,
                        cuda_graph=True)
    assert torch.cuda.current_stream() == before
    assert not torch.cuda.is_current_stream_capturing()


@needs_gpu
def test_conditioning_on_the_host_is_refused_before_capture():
    x = torch.randn(2, 3, device="cuda")
    with pytest.raises(ValueError, match="needs cond on cuda"):
        fastdiff.sample(_model, x, plan=edm_euler(3), seed=0, cuda_graph=True, cond=torch.randn(2, 1))


@needs_gpu
def test_cuda_graph_true_refuses_to_nest_in_the_callers_capture():
    static = torch.randn(2, 4, 8, 8, device="cuda")
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="while a CUDA graph is being captured"):
        with torch.cuda.graph(g):
            fastdiff.sample(_model, static, sampler="dpmpp_2m_sde", steps=6, seed=[3, 4], cuda_graph=True)


@needs_gpu
def test_graph_on_a_module_with_trainable_parameters():
    # outside torch.no_grad the model output requires grad; the loop runs under no_grad
    lin = torch.nn.Linear(8, 8).cuda()
    noise = torch.randn(2, 8, device="cuda")
    kw = dict(sampler="euler_ancestral", steps=5, seed=[1, 2])
    eager = fastdiff.sample(lambda x, t: lin(x), noise, **kw)
    graphed = fastdiff.sample(lambda x, t: lin(x), noise, cuda_graph=True, **kw)
    assert not graphed.requires_grad
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)  # cuBLAS may pick another kernel under capture


@needs_gpu
def test_repeated_calls_capture_once_and_replay_with_new_inputs(monkeypatch):
    from fastdiff.runtime import graphs

    captures = []
    real = graphs.capture
    monkeypatch.setattr(graphs, "capture", lambda *a, **k: (captures.append(1), real(*a, **k))[1])
    fastdiff.clear_cache()
    lin = torch.nn.Linear(8, 8).cuda()

    def model(x, t, c):
        return torch.tanh(lin(x)) + 0.1 * c

    kw = dict(sampler="dpmpp_2m_sde", steps=6, guidance_scale=3.0)
    for k in range(3):
        noise = torch.randn(2, 8, device="cuda")
        cond, uncond = torch.randn(2, 8, device="cuda"), torch.randn(2, 8, device="cuda")
        eager = fastdiff.sample(model, noise, seed=[k, k + 1], cond=cond, uncond=uncond, **kw)
        graphed = fastdiff.sample(model, noise, seed=[k, k + 1], cond=cond, uncond=uncond, cuda_graph=True, **kw)
        torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert len(captures) == 1
    lin.weight = torch.nn.Parameter(lin.weight.detach() * 0.5)  # replaced, not updated in place: recaptured
    noise = torch.randn(2, 8, device="cuda")
    eager = fastdiff.sample(model, noise, seed=[5, 6], cond=cond, uncond=uncond, **kw)
    graphed = fastdiff.sample(model, noise, seed=[5, 6], cond=cond, uncond=uncond, cuda_graph=True, **kw)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-6)
    assert len(captures) == 2


@needs_gpu
def test_prepared_sampler_graph_replays_faster_than_it_captures():
    # not a timing assertion: only that the second call does not capture (no warm-up pass)
    s = fastdiff.Sampler(_model, shape=(2, 4, 8, 8), device="cuda", sampler="euler_ancestral", steps=5,
                         cuda_graph=True)
    a = s(torch.randn(2, 4, 8, 8, device="cuda"), seed=[1, 2])
    g = s.prepared.executor(False)._graph
    b = s(torch.randn(2, 4, 8, 8, device="cuda"), seed=[1, 2])
    assert s.prepared.executor(False)._graph is g and not torch.equal(a, b)
