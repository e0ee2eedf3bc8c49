"""fastdiff.api: ``sample`` and ``Sampler`` as users call them. The prepared sampler computes what a
plain Python loop over the plan's rows computes (the reference backend's step), the cache serves
repeated calls without re-preparing, and seeds make every sample reproducible on its own.
Argument refusals are in test_api_errors.py."""

import pytest
import torch

import fastdiff
from fastdiff import api
from fastdiff.backends import reference
from fastdiff.core.args import StepArgs, clip_code, pack_row

from ._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)


def _model(u, t):
    return torch.tanh(u) * 0.5 + 0.01 * torch.as_tensor(t, dtype=u.dtype).reshape(-1, *([1] * (u.dim() - 1)))


def _loop(model, noise, plan):
    """The plan run by hand, one reference step per row (no executor, no cache, no buffers reuse)."""
    x = noise * plan.init_scale
    hist = [torch.zeros_like(x) for _ in range(plan.n_slots)]
    for r in plan.rows:
        m = model(x * r.in_scale, torch.full((x.shape[0],), r.t, dtype=x.dtype))
        out = torch.empty_like(x)
        writes = [torch.empty_like(x) for _ in r.writes]
        s = torch.full((x.shape[0],), plan.clip_range, dtype=torch.float32) if r.clip == "static" else None
        reference.step(StepArgs(x=x, out=out, m=m, coef=pack_row(r, fold=True), h_read=[hist[k] for k in r.reads],
                                h_write=writes, clip=clip_code(r), s=s))
        for w, buf in zip(r.writes, writes):
            hist[w.slot] = buf
        x = out
    return x * plan.out_scale


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "lms", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_is_the_plan_run_row_by_row(seed, sampler, dtype):
    noise = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    plan = fastdiff.make_plan(sampler, 7)
    want = _loop(_model, noise, plan)
    for backend in ("reference", "auto"):
        got = fastdiff.sample(_model, noise, sampler=sampler, steps=7, backend=backend)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=backend)


def test_sampler_prepared_once_equals_sample(seed):
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(2, 4, 6, generator=g) for _ in range(3)]
    s = fastdiff.Sampler(_model, shape=(2, 4, 6), sampler="euler_ancestral", steps=6)
    for i, n in enumerate(noises):
        want = fastdiff.sample(_model, n, sampler="euler_ancestral", steps=6, seed=[i, i + 10])
        assert torch.equal(s(n, seed=[i, i + 10]), want)


def test_repeated_calls_are_served_from_the_cache(monkeypatch):
    calls = []
    real = api._Prepared.__init__

    def counting(self, *a, **k):
        calls.append(1)
        real(self, *a, **k)

    fastdiff.clear_cache()
    monkeypatch.setattr(api._Prepared, "__init__", counting)
    x = torch.randn(1, 3, 4)
    a = fastdiff.sample(_model, x, sampler="dpmpp_2m", steps=5)
    b = fastdiff.sample(_model, x, sampler="dpmpp_2m", steps=5)
    assert len(calls) == 1 and torch.equal(a, b)
    fastdiff.sample(_model, x, sampler="dpmpp_2m", steps=6)  # another configuration
    assert len(calls) == 2
    fastdiff.clear_cache()
    fastdiff.sample(_model, x, sampler="dpmpp_2m", steps=5)
    assert len(calls) == 3


def test_each_sample_depends_on_its_own_seed_only(seed):
    """A sample's noise is keyed by its seed, not its place in the batch or the batch size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 5, generator=g)
    batch = fastdiff.sample(_model, x, sampler="euler_ancestral", steps=5, seed=[7, 8, 9])
    alone = fastdiff.sample(_model, x[1:2], sampler="euler_ancestral", steps=5, seed=[8])
    assert torch.equal(batch[1:2], alone)
    again = fastdiff.sample(_model, x, sampler="euler_ancestral", steps=5, seed=[7, 8, 9])
    assert torch.equal(batch, again)
    other = fastdiff.sample(_model, x, sampler="euler_ancestral", steps=5, seed=[7, 5, 9])
    assert not torch.equal(other[1], batch[1]) and torch.equal(other[0], batch[0])


def test_caller_tensors_are_left_as_they_were(seed):
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed))
    keep = x.clone()
    out = fastdiff.sample(_model, x, sampler="heun", steps=4)
    assert torch.equal(x, keep) and out.data_ptr() != x.data_ptr()
