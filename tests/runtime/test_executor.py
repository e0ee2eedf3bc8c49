"""The prepared loop (fastdiff.runtime.executor, fastdiff.Sampler, the cache of fastdiff.sample): one model
call and one step per row, the model input written by the step, the non-finite flag, reuse without
aliasing, concurrent calls, and the torch operations fastdiff issues per row."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastdiff
from fastdiff.runtime import ops
from fastdiff.runtime.executor import Call, Executor, NonFiniteError, StopSampling
from fastdiff.core.guidance import Guidance

from .._fixtures import seed  # noqa: F401

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
BACKENDS = [b for b in ("reference", "cpu", "triton") if ops.backend_status(b)[0]]


def _model(x, t, c):
    """A model whose output depends on its input, time and conditioning (so halves differ)."""
    return torch.tanh(x * 0.7) + 0.05 * c[:, :1, None, None] + 1e-4 * t.reshape(-1, 1, 1, 1)


def _inputs(**kw):
    g = torch.Generator().manual_seed(kw.pop("seed", 0))
    b = kw.pop("b", 2)
    shape = (b, 3, 5, 7)
    return (torch.randn(shape, generator=g), torch.randn(b, 2, generator=g), torch.randn(b, 2, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", ["uncond", "cond", "unguided"])
def test_non_finite_model_output_names_its_step(backend, half):
    noise, c, u = _inputs()
    bad_row = 3
    calls = []

    def model(x, t, cc):
        out = _model(x, t, cc)
        if len(calls) == bad_row:
            b = noise.shape[0]
            where = {"uncond": (0, 1, 2, 3), "cond": (b + 1, 0, 4, 6), "unguided": (1, 2, 0, 0)}[half]
            out[where] = float("nan") if half != "cond" else float("inf")
        calls.append(1)
        return out

    kw = dict(sampler="dpmpp_2m", steps=6, cond=c, seed=1, backend=backend)
    if half != "unguided":
        kw.update(guidance_scale=4.0, uncond=u)
    plan = fastdiff.make_plan("dpmpp_2m", 6)
    with pytest.raises(NonFiniteError, match=f"at step {plan.rows[bad_row].step} \\(row {bad_row},"):
        fastdiff.sample(model, noise, **kw)
    assert len(calls) == len(plan.rows)  # reported after the loop, not by a sync inside it
    assert torch.isfinite(fastdiff.sample(_model, noise, **kw)).all()  # the next call (same buffers) starts clean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler", "ddim", "heun"])
def test_model_input_written_by_the_step_is_in_scale_times_the_state_twice(backend, sampler):
    # the fast path's inputs (written by the kernel) equal the general path's, which are torch's
    # in_scale * x from the state after each row (a callback forces the general path)
    noise, c, u = _inputs()
    seen = {"fast": [], "general": []}
    for path in seen:
        def model(x, t, cc, _log=seen[path]):
            _log.append(x.clone())
            return _model(x, t, cc)

        cb = (lambda *a: None) if path == "general" else None
        fastdiff.sample(model, noise, sampler=sampler, steps=5, schedule=SD, guidance_scale=3.0, cond=c, uncond=u,
                        seed=2, backend=backend, callback=cb)
    b = noise.shape[0]
    plan = fastdiff.make_plan(sampler, 5, SD)
    assert len(seen["fast"]) == len(seen["general"]) == len(plan.rows)
    for i, (a, g) in enumerate(zip(seen["fast"], seen["general"])):
        assert a.shape[0] == 2 * b and torch.equal(a[:b], a[b:]), i
        assert torch.equal(a, g), (i, (a - g).abs().max())
    assert torch.equal(seen["fast"][0][:b], noise * plan.init_scale * plan.rows[0].in_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_guidance_interval_mixes_guided_and_unguided_inputs(backend):
    noise, c, u = _inputs()
    shapes = []

    def model(x, t, cc):
        shapes.append((x.shape[0], cc.shape[0]))
        return _model(x, t, cc)

    plan = fastdiff.make_plan("euler", 8)
    sig = sorted(r.sigma for r in plan.rows)
    out = fastdiff.sample(model, noise, plan=plan, guidance_scale=3.0, guidance_interval=(sig[2], sig[5]), cond=c,
                          uncond=u, seed=0, backend=backend)
    ref = fastdiff.sample(_model, noise, plan=plan, guidance_scale=3.0, guidance_interval=(sig[2], sig[5]), cond=c,
                          uncond=u, seed=0, backend="reference", callback=lambda *a: None)
    assert sorted(set(shapes)) == [(2, 2), (4, 4)]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_that_writes_into_its_input_or_returns_it(backend):
    noise, c, u = _inputs()
    kw = dict(sampler="dpmpp_2m_sde", steps=6, guidance_scale=2.0, cond=c, uncond=u, seed=3, backend=backend)
    want = fastdiff.sample(_model, noise, **kw)

    def scribbler(x, t, cc):
        out = _model(x, t, cc)
        x.mul_(-3.0).add_(7.0)  # the next row's input is written anew by the step
        return out

    def in_place(x, t, cc):
        out = _model(x, t, cc)
        return x.copy_(out)  # the output IS the input buffer

    for model in (scribbler, in_place):
        assert torch.equal(fastdiff.sample(model, noise, **kw), want), model.__name__


def test_identity_model_on_a_flat_state():
    # the model returns its input itself (a view of the executor's buffer)
    x = torch.randn(4, 16)
    kw = dict(sampler="euler_ancestral", steps=5, seed=[1, 2, 3, 4])
    want = fastdiff.sample(lambda u, t: u.clone(), x, backend="reference", **kw)
    for backend in BACKENDS:
        torch.testing.assert_close(fastdiff.sample(lambda u, t: u, x, backend=backend, **kw), want, rtol=1e-6,
                                   atol=1e-6)


def test_repeated_calls_are_bit_identical_and_never_alias():
    noise, c, u = _inputs()
    s = fastdiff.Sampler(_model, shape=noise.shape, sampler="dpmpp_2m_sde", steps=7, schedule=SD, guidance_scale=5.0)
    a = s(noise, cond=c, uncond=u, seed=11)
    a0 = a.clone()
    b = s(noise, cond=c, uncond=u, seed=11)
    assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    s(noise + 1, cond=c, uncond=u, seed=12)
    assert torch.equal(a, a0)  # an earlier result is not an executor buffer
    assert torch.equal(a, fastdiff.sample(_model, noise, sampler="dpmpp_2m_sde", steps=7, schedule=SD,
                                          guidance_scale=5.0, cond=c, uncond=u, seed=11))


def test_prepared_sampler_refuses_another_shape_dtype_or_device_by_name():
    s = fastdiff.Sampler(_model, shape=(2, 3, 5, 7), sampler="euler", steps=3)
    noise, c, _ = _inputs()
    with pytest.raises(ValueError, match=r"noise has shape \(3, 3, 5, 7\) but this sampler was prepared for"):
        s(torch.randn(3, 3, 5, 7), cond=torch.randn(3, 2))
    with pytest.raises(ValueError, match="noise has dtype torch.float64 but this sampler was prepared for torch.float32"):
        s(noise.double(), cond=c)
    with pytest.raises(ValueError, match="noise is a meta tensor"):
        s(noise.to("meta"), cond=c)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        fastdiff.Sampler(_model, shape=(2, 3), dtype=torch.int64)
    with pytest.raises(ValueError, match="shape must be"):
        fastdiff.Sampler(_model, shape=())


def test_sample_cache_is_bounded_keyed_and_clearable(monkeypatch):
    from fastdiff import api

    fastdiff.clear_cache()
    builds = []
    real = api._Prepared

    class Counting(real):
        def __init__(self, *a, **k):
            builds.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(api, "_Prepared", Counting)
    monkeypatch.setattr(api, "CACHE_SIZE", 3)
    noise, c, u = _inputs()
    kw = dict(sampler="euler", steps=4, cond=c, seed=0)
    for _ in range(3):
        fastdiff.sample(_model, noise, **kw)
    assert len(builds) == 1
    fastdiff.sample(_model, noise, guidance_scale=2.0, uncond=u, **kw)  # another configuration
    fastdiff.sample(_model, noise.double(), **{**kw, "cond": c.double()})  # another dtype
    n2, c2, _ = _inputs(b=3)
    fastdiff.sample(_model, n2, **{**kw, "cond": c2})  # another batch size
    assert len(builds) == 4 and len(api._cache) == 3  # bounded: the first was dropped
    fastdiff.sample(_model, noise, **kw)
    assert len(builds) == 5
    fastdiff.clear_cache()
    assert len(api._cache) == 0
    fastdiff.sample(_model, noise, **{**kw, "steps": 4, "eta": 0.0} if False else kw)
    assert len(builds) == 6


def test_uncacheable_options_still_run():
    noise, c, _ = _inputs()
    scale = lambda step, sigma: 1.0 + step  # noqa: E731  (hashable: kept by identity)
    a = fastdiff.sample(_model, noise, sampler="euler", steps=4, cond=c, uncond=c, guidance_scale=scale, seed=0)
    b = fastdiff.sample(_model, noise, sampler="euler", steps=4, cond=c, uncond=c, guidance_scale=[1, 2, 3, 4], seed=0)
    assert torch.equal(a, b)


def test_concurrent_calls_from_threads_match_sequential_ones():
    noise, c, u = _inputs(b=3)
    kw = dict(sampler="dpmpp_2m_sde", steps=8, schedule=SD, guidance_scale=4.0, cond=c, uncond=u)
    want = [fastdiff.sample(_model, noise, seed=k, **kw) for k in range(8)]
    got = [None] * 8
    errors = []

    def work(k):
        try:
            for _ in range(3):
                got[k] = fastdiff.sample(_model, noise, seed=k, **kw)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_post_step_may_stop_the_loop_and_the_state_so_far_comes_back():
    noise, c, _ = _inputs()
    plan = fastdiff.make_plan("euler", 6)
    states = []

    def cb(step, sigma, x, x0):
        states.append(x.clone())

    full = fastdiff.sample(_model, noise, plan=plan, cond=c, seed=0, callback=cb)

    def stop(i, x):
        if i == 2:
            raise StopSampling

    out = fastdiff.sample(_model, noise, plan=plan, cond=c, seed=0, post_step=stop)
    assert torch.equal(out, states[2]) and not torch.equal(out, full)


def test_executor_checks_its_call():
    plan = fastdiff.make_plan("euler_ancestral", 3)
    ex = Executor(plan, (2, 4), torch.float32, "cpu", guidance=Guidance(2.0))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="needs uncond"):
        ex.run(lambda u, t, c: u, x, Call(cond=torch.randn(2, 1), seeds=[1, 2]))
    with pytest.raises(ValueError, match="draws noise: give seed"):
        ex.run(lambda u, t, c: u, x, Call(cond=torch.randn(2, 1), uncond=torch.randn(2, 1)))
    with pytest.raises(ValueError, match=r"cond must be \[B, ...\] with B = 2"):
        ex.run(lambda u, t, c: u, x, Call(cond=torch.randn(3, 1), uncond=torch.randn(3, 1), seeds=[1, 2]))
    with pytest.raises(ValueError, match="prepared without inpainting"):
        ex.run(lambda u, t, c: u, x, Call(cond=torch.randn(2, 1), uncond=torch.randn(2, 1), seeds=[1, 2],
                                          mask=torch.ones(2, 4), known=x))
    with pytest.raises(ValueError, match=r"model output at step 0 has shape \(2, 4\), expected \(4, 4\)"):
        ex.run(lambda u, t, c: u[:2], x, Call(cond=torch.randn(2, 1), uncond=torch.randn(2, 1), seeds=[1, 2]))


# ------------------------------------------------------------------------------------------
# what fastdiff issues per row outside the model


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_per_row(sampler, inpaint=False, backend="cpu"):
    noise, c, u = _inputs()
    b = noise.shape[0]
    out = torch.randn(2 * b, *noise.shape[1:])
    counts, rows = [], []
    for steps in (4, 12):
        kw = dict(sampler=sampler, steps=steps, schedule=SD, guidance_scale=4.0, cond=c, uncond=u, seed=0,
                  backend=backend)
        if inpaint:
            kw.update(mask=(torch.rand(b, 1, 5, 7) > 0.5).float(), known=torch.randn_like(noise))
        fastdiff.sample(lambda x, t, cc: out, noise, **kw)  # prepared and cached outside the count
        with _CountOps() as n:
            fastdiff.sample(lambda x, t, cc: out, noise, **kw)
        counts.append(len(n.ops))
        rows.append(len(fastdiff.make_plan(sampler, steps, SD).rows))
    return (counts[1] - counts[0]) / (rows[1] - rows[0]), counts[0]


@pytest.mark.parametrize("sampler, inpaint", [("dpmpp_2m", False), ("unipc", False), ("dpmpp_2m_sde", False),
                                              ("euler_ancestral", False), ("dpmpp_2m", True), ("heun", False),
                                              ("ddim", True)])
def test_at_most_two_torch_ops_per_row(sampler, inpaint):
    per_row, per_call = _ops_per_row(sampler, inpaint)
    assert per_row <= 2, per_row
    assert per_call <= 40, per_call  # set-up: noise scaling, seeds, conditioning, the first model input


def test_callback_gets_each_steps_own_state():
    noise, c, _ = _inputs()
    kept = []
    out = fastdiff.sample(_model, noise, sampler="euler", steps=5, cond=c, seed=0,
                          callback=lambda step, sigma, x, x0: kept.append(x))
    assert len(kept) == 5 and torch.equal(kept[-1], out)
    assert all(not torch.equal(a, b) for a, b in zip(kept, kept[1:]))  # not five references to one state
    kept[2].fill_(1e6)  # changing a kept state changes nothing
    assert torch.equal(fastdiff.sample(_model, noise, sampler="euler", steps=5, cond=c, seed=0), out)


# ------------------------------------------------------------------------------------------
# found by a hostile review of the prepared loop


def test_a_call_under_inference_mode_does_not_break_later_calls():
    noise, c, u = _inputs()
    kw = dict(sampler="dpmpp_2m", steps=4, cond=c, seed=0, guidance_scale=2.0, uncond=u)
    fastdiff.clear_cache()
    with torch.inference_mode():
        a = fastdiff.sample(_model, noise, **kw)
    b = fastdiff.sample(_model, noise, **kw)  # the same (cached) configuration, outside inference mode
    with torch.no_grad():
        c2 = fastdiff.sample(_model, noise, **kw)
    assert torch.equal(a, b) and torch.equal(b, c2)
    with torch.inference_mode():
        s = fastdiff.Sampler(_model, shape=noise.shape, sampler="euler", steps=3)
    assert torch.isfinite(s(noise, cond=c)).all()


def test_a_diffusers_scheduler_object_as_schedule():
    diffusers = pytest.importorskip("diffusers")
    noise, c, _ = _inputs()
    sch = diffusers.DDIMScheduler(clip_sample=False)
    a = fastdiff.sample(_model, noise, sampler="ddim", steps=4, schedule=sch, cond=c, seed=0)
    b = fastdiff.sample(_model, noise, sampler="ddim", steps=4, schedule=dict(sch.config), cond=c, seed=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_model_that_keeps_its_inputs_keeps_what_it_was_given(backend):
    noise, c, u = _inputs()
    for guided in (False, True):
        kept, copies = [], []

        def model(x, t, cc):
            kept.append(x)  # as a forward hook that stashes inputs would
            copies.append(x.clone())
            return _model(x, t, cc)

        kw = dict(guidance_scale=3.0, uncond=u) if guided else {}
        out = fastdiff.sample(model, noise, sampler="euler", steps=5, cond=c, seed=0, backend=backend, **kw)
        assert len(kept) == 5 and all(torch.equal(a, b) for a, b in zip(kept, copies))
        assert torch.equal(out, fastdiff.sample(_model, noise, sampler="euler", steps=5, cond=c, seed=0,
                                                backend=backend, **kw))


def test_a_model_that_writes_into_its_time_tensor_spoils_only_that_call():
    noise, c, _ = _inputs(b=1)
    seen = []

    def model(x, t, cc):
        seen.append(float(t[0]))
        t.mul_(2)
        return _model(x, t, cc)

    for _ in range(3):
        fastdiff.sample(model, noise, sampler="euler", steps=3, cond=c, seed=0)
    assert seen[:3] == seen[3:6] == seen[6:]


def test_a_stateful_guidance_scale_callable_is_asked_on_every_call():
    noise, c, u = _inputs()

    class Scale:
        w = 2.0

        def __call__(self, step, sigma):
            return self.w

    sc = Scale()
    a = fastdiff.sample(_model, noise, sampler="euler", steps=4, cond=c, uncond=u, guidance_scale=sc, seed=0)
    sc.w = 8.0
    b = fastdiff.sample(_model, noise, sampler="euler", steps=4, cond=c, uncond=u, guidance_scale=sc, seed=0)
    assert torch.equal(b, fastdiff.sample(_model, noise, sampler="euler", steps=4, cond=c, uncond=u,
                                          guidance_scale=8.0, seed=0))
    assert not torch.equal(a, b)


def test_stop_sampling_raised_by_the_model_returns_the_state_before_that_row():
    noise, c, _ = _inputs()
    plan = fastdiff.make_plan("euler", 6)
    states = []
    fastdiff.sample(_model, noise, plan=plan, cond=c, seed=0, callback=lambda s, sg, x, x0: states.append(x))
    for msg in ((), ("a message",)):
        calls = []

        def model(x, t, cc):
            calls.append(1)
            if len(calls) == 4:
                raise StopSampling(*msg)
            return _model(x, t, cc)

        assert torch.equal(fastdiff.sample(model, noise, plan=plan, cond=c, seed=0), states[2])

    def hook(i, x):
        if i == 1:
            raise StopSampling("enough")

    assert torch.equal(fastdiff.sample(_model, noise, plan=plan, cond=c, seed=0, post_step=hook), states[1])


def test_empty_samples_and_layouts():
    for backend in BACKENDS:
        out = fastdiff.sample(lambda x, t: x * 0.5, torch.randn(2, 0), sampler="euler", steps=3, seed=0,
                              backend=backend)
        assert out.shape == (2, 0)
    noise = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    out = fastdiff.sample(lambda x, t: torch.tanh(x), noise, sampler="euler", steps=3, seed=0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, fastdiff.sample(lambda x, t: torch.tanh(x), noise.contiguous(), sampler="euler", steps=3,
                                            seed=0))


def test_a_model_output_without_memory_is_refused_by_name():
    with pytest.raises((ValueError, RuntimeError), match="meta"):
        fastdiff.sample(lambda x, t: torch.empty(x.shape, device="meta"), torch.randn(2, 4), sampler="euler",
                        steps=2, seed=0)


def _score_model(x, t):
    return -x / (1.0 + t.reshape(-1, *[1] * (x.dim() - 1)) ** 2)  # the score of N(0, (1 + sigma^2) I)


@pytest.mark.parametrize("snr_norm", ["batch", "sample"])
@pytest.mark.parametrize("external", [False, True])
def test_langevin_rows_run_in_the_extension_as_in_torch(snr_norm, external):
    if not ops.backend_status("cpu")[0]:
        pytest.skip("no cpu backend")
    from fastdiff.runtime.loop import LoopOptions, run_plan

    plan = fastdiff.make_plan("pc", 4, prediction="score")
    import dataclasses

    plan = dataclasses.replace(plan, snr_norm=snr_norm)
    x = torch.randn(3, 2, 9, 7) * plan.init_scale
    g = torch.Generator().manual_seed(5)
    noise = [torch.randn(3, 2, 9, 7, generator=g) for _ in plan.rows]
    kw = dict(noise_fn=lambda i, xx: noise[i]) if external else dict(seeds=[4, 5, 6])
    ref = run_plan(plan, _score_model, x.clone(), LoopOptions(backend="reference", **kw))
    got = run_plan(plan, _score_model, x.clone(), LoopOptions(backend="cpu", **kw))
    assert ((got - ref).norm() / ref.norm()) < 1e-5
    if snr_norm == "sample" and not external:  # a sample's result does not depend on the batch
        alone = run_plan(plan, _score_model, x[1:2].clone(), LoopOptions(backend="cpu", seeds=[5]))
        assert torch.equal(alone[0], got[1])


def test_langevin_rows_issue_no_torch_ops():
    if not ops.backend_status("cpu")[0]:
        pytest.skip("no cpu backend")
    x = torch.randn(2, 3, 5, 7)
    score = -0.5 * torch.randn(2, 3, 5, 7)
    counts = []
    for steps in (3, 6):
        kw = dict(sampler="pc", steps=steps, prediction="score", seed=0)
        fastdiff.sample(lambda u, t: score, x, **kw)
        with _CountOps() as c:
            fastdiff.sample(lambda u, t: score, x, **kw)
        counts.append((len(c.ops), len(fastdiff.make_plan("pc", steps, prediction="score").rows)))
    per_row = (counts[1][0] - counts[0][0]) / (counts[1][1] - counts[0][1])
    assert per_row <= 2, per_row
