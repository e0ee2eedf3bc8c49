"""fastdiff.sample and fastdiff.runtime.ops.step take tensors of any layout, and the fused backends equal
``reference`` on them (fresh random inputs every run; replay one with FASTDIFF_TEST_SEED).

Regressions: non-contiguous noise (channels_last, transposed, sliced, ...) and non-contiguous
model outputs made ``backend="cpu"`` raise and ``auto`` fall back to the reference; noise that
requires grad crashed in the loop; guidance rescale on a ``[B]`` state reduced over the batch.
"""

import warnings

import pytest
import torch

import fastdiff
from fastdiff.runtime import ops
from fastdiff.core.args import StepArgs, pack_row
from fastdiff.backends import reference
from fastdiff.core.guidance import rescale_factor
from fastdiff.core.plan import Row, combo

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)


def _model(x, t, c=None):
    nd = x.dim()
    y = torch.tanh(x.float() * 0.3) * 0.7 + 0.01 * t.reshape(-1, *[1] * (nd - 1))
    if c is not None:
        y = y + 0.1 * c.float().reshape(-1, *[1] * (nd - 1))
    return y.to(x.dtype)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """``t``'s values in the layout ``how`` (same shape)."""
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "channels_last_3d":
        return t.contiguous(memory_format=torch.channels_last_3d)
    if how == "transposed":
        return t.transpose(0, -1).contiguous().transpose(0, -1)
    if how == "sliced":
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "expanded":
        return t[:1].expand_as(t)
    assert how == "contiguous"
    return t


@pytest.mark.parametrize("how,shape", [
    ("channels_last", (2, 3, 5, 7)), ("channels_last_3d", (1, 2, 3, 5, 3)), ("transposed", (3, 5, 7)),
    ("transposed", (3, 9)), ("sliced", (2, 3, 5)), ("expanded", (3, 4, 5)), ("contiguous", (1, 7)),
])
@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "unipc", "euler_ancestral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_noise_of_any_layout_runs_fused_and_equals_reference(how, shape, sampler, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    noise = _layout(torch.randn(shape, generator=g).to(dtype), how)
    before, strides = noise.clone(), noise.stride()
    kw = dict(sampler=sampler, steps=5, seed=[seed + i for i in range(shape[0])])
    ref = fastdiff.sample(_model, noise, backend="reference", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to the reference
        for backend in ("cpu", "auto"):
            out = fastdiff.sample(_model, noise, backend=backend, **kw)
            assert out.shape == noise.shape and out.dtype == dtype
            assert out.stride() == ref.stride()  # the layout torch gives noise * scale, as reference
            tol = 1e-5 if dtype == torch.float32 else 1e-3
            assert _rel(out, ref) <= tol, (backend, _rel(out, ref))
    assert torch.equal(noise, before) and noise.stride() == strides


@pytest.mark.parametrize("kind", ["channels_last", "transposed", "expanded", "float64", "float16", "input_itself"])
def test_model_output_of_any_layout_or_dtype_runs_fused(kind, seed):
    def model(x, t, c=None):
        y = _model(x, t, c)
        if kind == "channels_last":
            return y.contiguous(memory_format=torch.channels_last)
        if kind == "transposed":
            return y.transpose(1, 3).contiguous().transpose(1, 3)
        if kind == "expanded":
            return y[:, :1].expand_as(y)
        if kind == "input_itself":
            return x
        return y.to(getattr(torch, kind))

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 4, 5, generator=g)
    kw = dict(sampler="dpmpp_2m_sde", steps=4, seed=seed, guidance_scale=2.5, cond=torch.randn(2, 1, generator=g),
              uncond=torch.randn(2, 1, generator=g))
    ref = fastdiff.sample(model, noise, backend="reference", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = fastdiff.sample(model, noise, backend="cpu", **kw)
    assert _rel(out, ref) <= 1e-5


def test_inpainting_mask_and_known_of_any_layout(seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 6, 5, generator=g).contiguous(memory_format=torch.channels_last)
    known = torch.randn(2, 3, 5, 6, generator=g).transpose(2, 3)
    mask = (torch.rand(2, 1, 6, 1, generator=g) > 0.5)  # size-1 dims, bool
    kw = dict(sampler="dpmpp_2m", steps=5, seed=seed, mask=mask, known=known)
    kc, mc = known.clone(), mask.clone()
    ref = fastdiff.sample(_model, noise, backend="reference", **kw)
    out = fastdiff.sample(_model, noise, backend="cpu", **kw)
    assert _rel(out, ref) <= 1e-5
    assert torch.equal(known, kc) and torch.equal(mask, mc)


def test_noise_requiring_grad_or_made_in_inference_mode(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, 3, 7, generator=g)
    kw = dict(sampler="euler_ancestral", steps=4, seed=seed)
    want = fastdiff.sample(_model, base, backend="reference", **kw)
    leaf = base.clone().requires_grad_(True)
    for backend in ("reference", "cpu"):
        out = fastdiff.sample(_model, leaf, backend=backend, **kw)  # was: sum(out=...) autograd error
        assert not out.requires_grad and leaf.grad is None
        assert _rel(out, want) <= 1e-5
        with torch.inference_mode():
            inf_noise = base.clone()
        assert _rel(fastdiff.sample(_model, inf_noise, backend=backend, **kw), want) <= 1e-5
        with torch.inference_mode():
            assert _rel(fastdiff.sample(_model, base, backend=backend, **kw), want) <= 1e-5
    assert torch.equal(leaf.detach(), base)


def test_guidance_rescale_is_per_sample_for_any_rank(seed):
    g = torch.Generator().manual_seed(seed)
    for shape in [(4, 6), (4, 2, 3), (4, 1, 2, 3)]:
        mu, mc = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        w = torch.rand(4, generator=g) * 5
        r = rescale_factor(mu, mc, w, 0.7)
        assert r.shape == (4,)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # std of one element
            assert rescale_factor(mu.reshape(4, -1)[:, 0], mc.reshape(4, -1)[:, 0], w, 0.7).shape == (4,)
        for b in range(4):  # sample b alone gives the same factor
            assert torch.allclose(r[b:b + 1], rescale_factor(mu[b:b + 1], mc[b:b + 1], w[b:b + 1], 0.7))


def test_guidance_rescale_needs_two_elements_per_sample():
    kw = dict(sampler="euler", steps=2, seed=0, guidance_scale=3.0, guidance_rescale=0.5,
              cond=torch.randn(3, 1), uncond=torch.randn(3, 1))
    with pytest.raises(ValueError, match="guidance_rescale needs at least 2 elements per sample"):
        fastdiff.sample(_model, torch.randn(3), **kw)
    def model(x, t, c):  # not saturating: std(m_c) > 0, so the rescale ratio is finite
        return x * 0.01 + 0.1 * c

    noise = torch.randn(3, 2)
    ref = fastdiff.sample(model, noise, backend="reference", **kw)  # [B, 2]: fine
    out = fastdiff.sample(model, noise, backend="cpu", **kw)
    assert torch.isfinite(out).all() and _rel(out, ref) <= 1e-5


def test_one_dim_state_with_guidance_matches_reference_and_is_batch_independent(seed):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(5, generator=g)
    cond, uncond = torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g)
    kw = dict(sampler="dpmpp_2m_sde", steps=6, guidance_scale=2.0)
    seeds = [seed + i for i in range(5)]
    ref = fastdiff.sample(_model, noise, backend="reference", seed=seeds, cond=cond, uncond=uncond, **kw)
    out = fastdiff.sample(_model, noise, backend="cpu", seed=seeds, cond=cond, uncond=uncond, **kw)
    assert _rel(out, ref) <= 1e-5
    alone = fastdiff.sample(_model, noise[3:4], backend="cpu", seed=[seeds[3]], cond=cond[3:4], uncond=uncond[3:4],
                            **kw)
    assert torch.equal(alone[0], out[3])


def test_run_plan_writes_back_into_a_non_contiguous_state(seed):
    from fastdiff.runtime.loop import LoopOptions, run_plan

    from .._plans import edm_euler_ancestral

    plan = edm_euler_ancestral(4)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 3, 4, 5, generator=g)
    ref = run_plan(plan, _model, x0.clone(), LoopOptions(seeds=[1, 2], backend="reference"))
    x = x0.contiguous(memory_format=torch.channels_last)
    out = run_plan(plan, _model, x, LoopOptions(seeds=[1, 2], backend="cpu"))
    assert out is x and x.is_contiguous(memory_format=torch.channels_last)  # in place, layout kept
    assert _rel(x, ref) <= 1e-5
    expanded = x0[:1].expand(2, 3, 4, 5)  # cannot hold two samples: a new tensor comes back
    out = run_plan(plan, _model, expanded, LoopOptions(seeds=[1, 2], backend="cpu"))
    assert out.is_contiguous() and torch.equal(expanded, x0[:1].expand(2, 3, 4, 5))


# ----------------------------------------------------------------------------------------------
# ops.step on views: the fused backend runs on contiguous copies and writes back


def _row(noise=True):
    return Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.3, a_e=0.7, out=combo(x=0.5, d=0.4, e=0.2, z=0.3 if noise else 0.0),
               noise=noise)


@pytest.mark.parametrize("how", ["transposed", "sliced", "expanded_w", "in_place_transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ops_step_on_views_equals_reference(how, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def f(*s):
        return torch.randn(*s, generator=g).to(dtype)

    x, m, m_c = f(3, 4, 5), f(3, 4, 5), f(3, 4, 5)
    w = torch.rand(3, generator=g) * 4
    seeds = torch.randint(-(2**62), 2**62, (3,), generator=g)
    if how in ("transposed", "in_place_transposed"):
        x, m = _layout(x, "transposed"), _layout(m, "transposed")
    elif how == "sliced":
        m_c = _layout(m_c, "sliced")
    else:
        w = w[:1].expand(3)
    x_before = x.clone()

    def args(xx, out):
        return StepArgs(x=xx, out=out, m=m, m_c=m_c, w=w, seeds=seeds, coef=pack_row(_row()), row=7)

    if how == "in_place_transposed":
        want, got = x.clone(), _layout(x.clone(), "transposed")
        reference.step(args(want, want))
        ops.step(args(got, got), backend="cpu")
        assert got.stride() == x.stride()
    else:
        want, got = torch.empty_like(x), torch.full_like(x, float("nan"))
        reference.step(args(x, want))
        ops.step(args(x, got), backend="cpu")
        assert torch.equal(x, x_before)
    tol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert _rel(got, want) <= tol


@pytest.mark.parametrize("offset", [1, -3])
def test_ops_step_output_partly_overlapping_an_input(offset, seed):
    g = torch.Generator().manual_seed(seed)
    n = 2 * 9
    buf = torch.randn(3 * n, generator=g)

    def args(b):
        x = b[:n].view(2, 9) if offset > 0 else b[2 * n:].view(2, 9)
        return StepArgs(x=x, out=b[n + offset:2 * n + offset].view(2, 9), m=b[n:2 * n].view(2, 9),
                        coef=pack_row(_row(noise=False)))

    want, got = buf.clone(), buf.clone()
    reference.step(args(want))
    ops.step(args(got), backend="cpu")  # reads every input before writing, as reference
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_classifier_guidance_under_inference_mode(seed):
    # autograd records nothing under inference_mode; the classifier gradient used to fail there
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(12, 4)

    def clf(u, t):
        return lin(u.reshape(u.shape[0], -1)) * (1 + 0.01 * t[:, None])

    noise = torch.randn(2, 3, 4, generator=g)
    kw = dict(sampler="ddim", steps=3, seed=seed, classifier=clf, classifier_y=torch.tensor([1, 2]),
              classifier_scale=2.0)
    want = fastdiff.sample(_model, noise, backend="reference", **kw)
    for backend in ("reference", "cpu"):
        with torch.inference_mode():
            out = fastdiff.sample(_model, noise, backend=backend, **kw)
        assert _rel(out, want) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_module_with_trainable_parameters_outside_no_grad(backend, seed):
    # its output requires grad: the finite check's sum(out=...) raised before the loop ran under no_grad
    torch.manual_seed(seed)
    lin = torch.nn.Linear(6, 6)
    noise = torch.randn(3, 6)
    kw = dict(sampler="dpmpp_2m_sde", steps=4, seed=seed, guidance_scale=2.0, cond=torch.randn(3, 6),
              uncond=torch.randn(3, 6))
    with torch.no_grad():
        want = fastdiff.sample(lambda x, t, c: lin(x + c), noise, backend="reference", **kw)
    out = fastdiff.sample(lambda x, t, c: lin(x + c), noise, backend=backend, **kw)
    assert not out.requires_grad and lin.weight.grad is None
    assert _rel(out, want) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_guidance_rescale_of_a_constant_guided_output_is_no_rescale(backend, seed):
    # std(cfg) = 0 per sample: diffusers' ratio is 0/0 = NaN, which silently filled the sample with NaN
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(2, 3, 5, generator=g)

    def model(x, t, c):
        return torch.zeros_like(x) + c.reshape(-1, 1, 1)

    kw = dict(sampler="dpmpp_2m", steps=4, seed=seed, guidance_scale=3.0, cond=torch.randn(2, 1, generator=g),
              uncond=torch.randn(2, 1, generator=g), backend=backend)
    out = fastdiff.sample(model, noise, guidance_rescale=0.7, **kw)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fastdiff.sample(model, noise, **kw))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_model_that_enables_grad_inside(backend, seed):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(6, 6)

    def model(x, t):
        with torch.enable_grad():  # e.g. a model that takes a gradient itself: its output requires grad
            return lin(x)

    noise = torch.randn(3, 6)
    with torch.no_grad():
        want = fastdiff.sample(lambda x, t: lin(x), noise, sampler="euler_ancestral", steps=3, seed=seed,
                               backend="reference")
    out = fastdiff.sample(model, noise, sampler="euler_ancestral", steps=3, seed=seed, backend=backend)
    assert not out.requires_grad and _rel(out, want) <= 1e-5
