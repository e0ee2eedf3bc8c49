"""The sampling loop and fastdiff.sample: guidance batching, noise keying, errors, callbacks."""

import pytest
import torch

import fastdiff
from fastdiff.core.guidance import Guidance, dynamic_threshold, rescale_factor
from fastdiff.runtime.loop import LoopOptions, NonFiniteError, run_plan
from fastdiff.core.plan import Plan, Row, combo

from .._plans import edm_euler, edm_euler_ancestral


class Recorder:
    """A nonlinear conditional x0-model that records the batch of every call."""

    def __init__(self, dim):
        self.w = torch.randn(dim, dim) / dim**0.5
        self.calls = []

    def __call__(self, x, t, cond=None):
        self.calls.append((x.shape[0], None if cond is None else cond.clone()))
        out = torch.tanh(x.flatten(1) @ self.w.to(x.dtype)).reshape(x.shape) * t.reshape(-1, *[1] * (x.dim() - 1)).clamp(max=1)
        if cond is not None:
            out = out + cond.to(x.dtype).reshape(x.shape[0], -1)[:, :1].reshape(-1, *[1] * (x.dim() - 1))
        return out


def manual_cfg(plan, model, x, cond, uncond, w):
    for r in plan.rows:
        t = torch.full((x.shape[0],), r.t, dtype=x.dtype)  # the loop's model time: float64 for a float64 state
        mu, mc = model(x, t, uncond), model(x, t, cond)
        e = mu + w * (mc - mu)
        d = r.a_x * x + r.a_e * e
        x = r.out[0] * x + r.out[1] * d
    return x


def test_cfg_is_one_batched_call_and_matches_manual_blend():
    B, D = 3, 6
    m = Recorder(D)
    plan = edm_euler(8)
    cond, uncond = torch.randn(B, 1), torch.randn(B, 1)
    noise = torch.randn(B, D, dtype=torch.float64)
    out = fastdiff.sample(m, noise, plan=plan, guidance_scale=4.5, cond=cond.double(), uncond=uncond.double(),
                          backend="reference")
    assert [c[0] for c in m.calls] == [2 * B] * 8
    assert torch.equal(m.calls[0][1], torch.cat([uncond, cond]).double())
    ref = manual_cfg(plan, Recorder.__call__.__get__(m), noise * plan.init_scale, cond.double(), uncond.double(), 4.5)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_guidance_interval_skips_unconditional_half():
    B, D = 2, 4
    m = Recorder(D)
    plan = edm_euler(10)
    lo, hi = 0.3, 3.0
    fastdiff.sample(m, torch.randn(B, D), plan=plan, guidance_scale=3.0, guidance_interval=(lo, hi),
                    cond=torch.randn(B, 1), uncond=torch.randn(B, 1), backend="reference")
    want = [2 * B if lo <= r.sigma <= hi else B for r in plan.rows]
    assert [c[0] for c in m.calls] == want
    assert B in want and 2 * B in want


def test_guidance_scale_forms():
    plan = edm_euler(5)
    assert Guidance(2.0).scales(plan) == [2.0] * 5
    assert Guidance([1, 2, 3, 4, 5]).scales(plan) == [1, 2, 3, 4, 5]
    assert Guidance(lambda i, s: 1 + i).scales(plan) == [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="guidance_scale has 3 entries but the plan has 5 steps"):
        Guidance([1, 2, 3]).scales(plan)
    with pytest.raises(ValueError, match="guidance_rescale"):
        Guidance(2.0, rescale=1.5)


def test_rescale_matches_diffusers():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    mu, mc = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    w, phi = 7.5, 0.7
    cfg = mu + w * (mc - mu)
    want = rescale_noise_cfg(cfg, mc, guidance_rescale=phi)
    r = rescale_factor(mu, mc, torch.full((4,), w), phi)
    got = r.reshape(-1, 1, 1, 1) * cfg
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dynamic_threshold_matches_diffusers():
    from diffusers import DDPMScheduler

    sch = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.7)
    d = torch.randn(5, 3, 7, 7) * 2
    want = sch._threshold_sample(d.clone())
    s = dynamic_threshold(d, 0.9, 1.7).reshape(-1, 1, 1, 1)
    got = torch.minimum(torch.maximum(d, -s), s) / s
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_seeded_sample_is_batch_invariant():
    D = 5
    m = Recorder(D)
    plan = edm_euler_ancestral(6)
    noise = torch.randn(8, D)
    seeds = [int(s) for s in torch.randint(0, 2**62, (8,))]
    full = fastdiff.sample(m, noise, plan=plan, seed=seeds, backend="reference")
    alone = fastdiff.sample(m, noise[3:4], plan=plan, seed=[seeds[3]], backend="reference")
    assert torch.allclose(full[3:4], alone, rtol=1e-6, atol=1e-6)
    again = fastdiff.sample(m, noise, plan=plan, seed=seeds, backend="reference")
    assert torch.equal(full, again)


def test_generator_noise_is_drawn_like_diffusers():
    D = 4
    m = Recorder(D)
    plan = edm_euler_ancestral(4)
    noise = torch.randn(2, D, dtype=torch.float64)
    seed = int(torch.randint(0, 10**6, ()))
    out = fastdiff.sample(m, noise, plan=plan, generator=torch.Generator().manual_seed(seed), backend="reference")
    g = torch.Generator().manual_seed(seed)
    x = noise * plan.init_scale
    for r in plan.rows:
        d = m(x, torch.full((2,), r.t, dtype=x.dtype))  # float64 model time for a float64 state
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        x = r.out[0] * x + r.out[1] * d + r.out[-1] * z
    assert torch.allclose(out, x, rtol=1e-10, atol=1e-10)


def test_callback_receives_step_sigma_x_x0():
    seen = []
    plan = edm_euler(4)
    fastdiff.sample(lambda x, t: x * 0.5, torch.randn(2, 3), plan=plan, backend="reference",
                    callback=lambda i, s, x, x0: seen.append((i, s, x.clone(), x0.clone())))
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert [s[1] for s in seen] == [r.sigma for r in plan.rows]
    assert torch.allclose(seen[1][3], seen[0][2] * 0.5)


def test_nan_model_output_names_the_step():
    plan = edm_euler(6)

    def model(x, t):
        return torch.where(t[:, None] < plan.rows[3].sigma + 1e-6, torch.full_like(x, float("nan")), x)

    with pytest.raises(NonFiniteError, match="step 3"):
        fastdiff.sample(model, torch.randn(2, 3), plan=plan, backend="reference")


def test_bad_inputs_name_the_argument():
    plan = edm_euler(3)
    m = lambda x, t, c=None: x  # noqa: E731
    with pytest.raises(TypeError, match="noise must have a floating dtype"):
        fastdiff.sample(m, torch.ones(2, 3, dtype=torch.int64), plan=plan)
    with pytest.raises(ValueError, match=r"uncond must be \[B, ...\] with B = 2 .* got shape \(3, 1\)"):
        fastdiff.sample(m, torch.randn(2, 3), plan=plan, guidance_scale=2.0, cond=torch.randn(2, 1),
                        uncond=torch.randn(3, 1))
    with pytest.raises(ValueError, match="needs uncond"):
        fastdiff.sample(m, torch.randn(2, 3), plan=plan, guidance_scale=2.0, cond=torch.randn(2, 1))
    with pytest.raises(ValueError, match=r"model output at step 0 has shape \(2, 4\), expected \(2, 3\)"):
        fastdiff.sample(lambda x, t: torch.zeros(2, 4), torch.randn(2, 3), plan=plan)
    with pytest.raises(ValueError, match="backend must be one of"):
        fastdiff.sample(m, torch.randn(2, 3), plan=plan, backend="metal")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 1000000\], got 0"):
        fastdiff.make_plan("euler", 0)
    with pytest.raises(ValueError, match="either seed"):
        fastdiff.sample(m, torch.randn(2, 3), plan=plan, seed=1, generator=torch.Generator())


def test_static_and_dynamic_clip_rows():
    # a single x0 row with clipping: the loop supplies s (static range or per-sample quantile)
    B, D = 4, 50
    for clip in ("static", "dynamic"):
        row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.0, a_e=1.0, out=combo(d=1.0), clip=clip)
        plan = Plan((row,), init_scale=1.0, clip_range=0.8, threshold_ratio=0.9, threshold_max=2.5, steps=1)
        e = torch.randn(B, D) * 3
        out = run_plan(plan, lambda x, t: e, torch.randn(B, D), LoopOptions(backend="reference"))
        if clip == "static":
            want = e.clamp(-0.8, 0.8)
        else:
            s = dynamic_threshold(e, 0.9, 2.5)[:, None]
            want = torch.minimum(torch.maximum(e, -s), s) / s
        assert torch.allclose(out, want, atol=1e-6)


def test_step_refuses_a_bad_clip_code_on_every_backend():
    from fastdiff.runtime import ops
    from fastdiff.core.args import StepArgs, pack_row

    x = torch.randn(2, 8)
    row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(d=1.0))
    for backend in ("reference", "cpu"):
        if not ops.backend_status(backend)[0]:
            continue
        for clip in (3, -1, True):
            with pytest.raises(ValueError, match="clip must be 0"):
                ops.step(StepArgs(x=x, out=x.clone(), m=x, coef=pack_row(row), clip=clip, s=torch.ones(2)), backend)
