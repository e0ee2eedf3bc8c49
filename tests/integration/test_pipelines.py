"""fastdiff.diffusers.accelerate / restore on tiny pipelines built offline (random weights).

Stock and accelerated calls get the same arguments and equally seeded generators; the outputs
must agree to a relative error of 1e-5 (fp32). Why that tolerance: the fused step evaluates the
same formulas as diffusers in a different order (CFG blend, parameterization and update in one
fp32 expression, coefficients in fp64), a difference of a few fp32 roundings (~1e-7) per step,
which the random nonlinear networks carry through 4-8 steps and the VAE; any algorithmic
difference (a wrong coefficient, a skipped noise draw, a misplaced guidance blend) is >= 1e-3.
"""

import pytest
import torch

from tests.samplers._harness import rel_err

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fastdiff.diffusers as fdd  # noqa: E402
from fastdiff.bench.timing import SyncCounter  # noqa: E402

from . import _tiny  # noqa: E402

TOL = 1e-5
PROMPT = dict(prompt="a photo of a cat", negative_prompt="blurry, dark")


@pytest.fixture(scope="module")
def pipes():
    torch.set_num_threads(1)
    return {"sd": _tiny.sd(diffusers.DDIMScheduler(**_tiny.SD_BETAS, clip_sample=False)),
            "sdxl": _tiny.sdxl(diffusers.EulerDiscreteScheduler(**_tiny.SD_BETAS)),
            "sd3": _tiny.sd3(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))}


def _gen(seed, n=1):
    gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    return gens[0] if n == 1 else gens


def compare(pipe, scheduler, seed, n_gen=1, global_seed=False, **kw):
    """Stock and accelerated outputs of the same call; returns the worst relative error."""
    pipe.scheduler = scheduler
    outs = []
    for accelerated in (False, True):
        if accelerated:
            fdd.accelerate(pipe)
        try:
            if global_seed:  # the stock loop draws step noise from torch's global RNG
                torch.manual_seed(seed + 100)
            outs.append(pipe(**kw, generator=_gen(seed, n_gen)).images)
        finally:
            if accelerated:
                fdd.restore(pipe)
    assert type(pipe) is getattr(diffusers, type(pipe).__name__)  # restored
    err = rel_err(outs[1], outs[0])
    assert err <= TOL, f"{type(pipe).__name__} + {type(scheduler).__name__}: relative error {err:.3g}"
    return err


SD = _tiny.SD_BETAS
SD_SCHEDULERS = [
    ("DPMSolverMultistepScheduler", {}), ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    ("EulerAncestralDiscreteScheduler", {}), ("DDIMScheduler", {"clip_sample": False}), ("HeunDiscreteScheduler", {}),
    ("UniPCMultistepScheduler", {"solver_order": 3}), ("DDPMScheduler", {"clip_sample": False}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}),
]


@pytest.mark.parametrize("name, cfg", SD_SCHEDULERS, ids=[f"{n}-{c}" for n, c in SD_SCHEDULERS])
def test_sd_matches_stock(pipes, name, cfg, seed):
    compare(pipes["sd"], getattr(diffusers, name)(**SD, **cfg), seed, num_inference_steps=5, output_type="latent",
            **PROMPT)


@pytest.mark.parametrize("name, cfg", [("EulerAncestralDiscreteScheduler", {}), ("DDPMScheduler", {"clip_sample": False}),
                                       ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})])
def test_sd_without_a_generator_matches_stock_under_the_same_global_seed(pipes, name, cfg, seed):
    """No generator: the stock loop draws the latents and every step's noise from torch's global RNG; the
    accelerated loop draws the step noise in the same calls, so the same torch.manual_seed gives the stock
    image (and leaves the RNG where the stock call leaves it)."""
    pipe = pipes["sd"]
    pipe.scheduler = getattr(diffusers, name)(**SD, **cfg)
    outs = []
    for accelerated in (False, True):
        if accelerated:
            fdd.accelerate(pipe)
        try:
            torch.manual_seed(seed)
            outs.append((pipe(**PROMPT, num_inference_steps=5, output_type="latent").images, torch.randn(2)))
        finally:
            if accelerated:
                fdd.restore(pipe)
    (a, ra), (b, rb) = outs
    assert rel_err(b, a) <= TOL and torch.equal(rb, ra)


@pytest.mark.parametrize("kw", [
    dict(output_type="pt", guidance_scale=6.0),
    dict(output_type="latent", guidance_scale=7.5, guidance_rescale=0.7),
    dict(output_type="latent", guidance_scale=1.0),  # no CFG: one unguided forward per step
    dict(output_type="latent", eta=0.6, num_images_per_prompt=2),
], ids=["image", "rescale", "no-cfg", "eta-2-images"])
def test_sd_call_arguments(pipes, kw, seed):
    compare(pipes["sd"], diffusers.DDIMScheduler(**SD, clip_sample=False), seed,
            n_gen=kw.get("num_images_per_prompt", 1), num_inference_steps=4, **PROMPT, **kw)


@pytest.mark.parametrize("cfg, kw", [
    ({}, dict(eta=0.0)),
    ({}, dict(eta=0.6, guidance_rescale=0.7)),
    ({"thresholding": True, "dynamic_thresholding_ratio": 0.9}, dict(eta=0.3)),
], ids=["default", "default-eta-rescale", "threshold"])
def test_sd_ddim_default_clipping(pipes, cfg, kw, seed):
    """DDIM at diffusers' default clip_sample=True mixes the clipped x0 with the unclipped (guided,
    rescaled) eps; the accelerated loop runs it as plan rows. The clipping must matter here: the stock
    output with clipping off is far from the stock output with it.

    4 steps: this mixing amplifies rounding, so much that over 5 steps the stock fp32 pipeline is up
    to ~1.6e-5 from the same pipeline in fp64 (~7e-7 with clip_sample=False); over 4 the accelerated
    run stays within ~5e-6 of the stock one."""
    pipe = pipes["sd"]
    call = dict(num_inference_steps=4, output_type="latent", **PROMPT, **kw)
    pipe.scheduler = diffusers.DDIMScheduler(**SD, clip_sample=False)
    unclipped = pipe(**call, generator=_gen(seed)).images
    pipe.scheduler = diffusers.DDIMScheduler(**SD, **cfg)
    clipped = pipe(**call, generator=_gen(seed)).images
    assert rel_err(clipped, unclipped) > 1e-3
    compare(pipe, diffusers.DDIMScheduler(**SD, **cfg), seed, **call)


def test_sd_prompt_embeds_latents_and_custom_timesteps(pipes, seed):
    g = torch.Generator().manual_seed(seed)
    pe, ne = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    compare(pipes["sd"], diffusers.DPMSolverMultistepScheduler(**SD, solver_order=3), seed, prompt_embeds=pe,
            negative_prompt_embeds=ne, latents=lat, timesteps=[999, 800, 620, 400, 150, 20], output_type="latent")


@pytest.mark.parametrize("name, cfg, kw", [
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"output_type": "pt"}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {"guidance_rescale": 0.5}),
    ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, {"denoising_end": 0.6}),
], ids=["euler-karras-image", "dpm-sde-rescale", "euler-a-denoising-end"])
def test_sdxl_matches_stock(pipes, name, cfg, kw, seed):
    kw = {"output_type": "latent", **kw}
    compare(pipes["sdxl"], getattr(diffusers, name)(**SD, **cfg), seed, num_inference_steps=5, **PROMPT, **kw)


@pytest.mark.parametrize("cfg, kw", [
    ({"shift": 3.0}, {"output_type": "pt"}),
    ({"shift": 3.0, "stochastic_sampling": True}, {"output_type": "latent"}),
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, {"output_type": "latent"}),
], ids=["shift3-image", "stochastic", "dynamic-shift"])
def test_sd3_matches_stock(pipes, cfg, kw, seed):
    compare(pipes["sd3"], diffusers.FlowMatchEulerDiscreteScheduler(**cfg), seed, global_seed=True,
            num_inference_steps=5, **PROMPT, **kw)


def test_one_fused_kernel_per_step_with_the_blend_inside_and_no_host_sync(pipes, monkeypatch):
    """Every model evaluation is followed by exactly one backend step that receives both CFG halves
    (the blend happens in the kernel), and the loop never reads a device value on the host."""
    pipe = pipes["sd"]
    pipe.scheduler = diffusers.HeunDiscreteScheduler(**SD)
    from fastdiff.backends import cpu, reference

    from fastdiff.runtime import ops

    calls = []
    for mod in (cpu, reference):  # rows of the general path (host hooks) run through the backend's step
        orig = mod.step
        monkeypatch.setattr(mod, "step", lambda args, _o=orig: (calls.append(args), _o(args))[1])

    class Counted:  # the prepared program of the executor's fast path, each row run counted
        run_ptr = None

        def __init__(self, prog):
            self.prog, self.rows = prog, prog.rows

        def run(self, i, m):
            calls.append(self.rows[i])
            self.prog.run(i, m)

        def set(self, *a):
            self.prog.set(*a)

    prepare = ops.prepare
    monkeypatch.setattr(ops, "prepare", lambda *a, **k: Counted(prepare(*a, **k)))
    loop = fdd.pipelines.run_plan
    syncs = []

    def counted(plan, model, x, opts, **kw):
        with SyncCounter() as c:
            out = loop(plan, model, x, opts, **kw)
        syncs.append(c.where)
        return out

    monkeypatch.setattr(fdd.pipelines, "run_plan", counted)
    forwards = []
    hook = pipe.unet.register_forward_hook(lambda mod, a, out: forwards.append(a[0].shape[0]))
    try:
        fdd.accelerate(pipe)
        pipe(num_inference_steps=4, output_type="latent", generator=_gen(0), **PROMPT)
    finally:
        hook.remove()
        fdd.restore(pipe)
    assert len(calls) == len(forwards) == 2 * 4 - 1  # Heun: two rows per step, Euler into sigma = 0
    assert all(b == 2 for b in forwards)  # one batched [uncond; cond] forward
    assert all(a.m_c is not None and a.w is not None for a in calls)
    assert syncs == [[]]


def test_restore_gives_back_the_stock_pipeline(pipes, seed):
    pipe = pipes["sd"]
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**SD)
    kw = dict(num_inference_steps=3, output_type="latent", **PROMPT)
    before = pipe(**kw, generator=_gen(seed)).images
    stock_cls = type(pipe)
    assert fdd.accelerate(pipe) is pipe and type(pipe) is not stock_cls and isinstance(pipe, stock_cls)
    assert type(pipe.scheduler) is diffusers.EulerDiscreteScheduler  # the pipeline's scheduler is left alone
    assert fdd.restore(pipe) is pipe and type(pipe) is stock_cls
    assert torch.equal(pipe(**kw, generator=_gen(seed)).images, before)
    with pytest.raises(ValueError, match="not accelerated"):
        fdd.restore(pipe)


def test_unsupported_arguments_and_components_are_named(pipes):
    pipe = pipes["sd"]
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**SD)
    fdd.accelerate(pipe)
    try:
        with pytest.raises(TypeError, match="prompt_embeds"):
            pipe("x", num_inference_steps=2, callback_on_step_end=lambda *a: {},
                 callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        with pytest.raises(TypeError, match="negative_prompt_embeds"):
            pipe("x", num_inference_steps=2,
                 callback_on_step_end=lambda p, i, t, kw: {"negative_prompt_embeds": torch.zeros(1)})
        with pytest.raises(TypeError, match="ip_adapter_image_embeds"):
            pipe("x", num_inference_steps=2, ip_adapter_image_embeds=[torch.zeros(1, 1, 4)])
        with pytest.raises(TypeError, match=r"\['callback_steps'\]"):
            pipe("x", num_inference_steps=2, callback_steps=1)
        assert "DDIMParallelScheduler" not in fdd.SUPPORT  # a diffusers class the drop-in lacks
        pipe.scheduler = diffusers.DDIMParallelScheduler(**SD)
        with pytest.raises(TypeError, match="DDIMParallelScheduler"):
            pipe("x", num_inference_steps=2)
    finally:
        fdd.restore(pipe)
    with pytest.raises(TypeError, match="DDIMParallelScheduler"):
        fdd.accelerate(pipe)
    p3 = pipes["sd3"]
    p3.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    fdd.accelerate(p3)
    try:
        with pytest.raises(TypeError, match="skip_guidance_layers"):
            p3("x", num_inference_steps=2, skip_guidance_layers=[0])
    finally:
        fdd.restore(p3)
    other = diffusers.StableDiffusionInstructPix2PixPipeline(**pipe.components)  # (img2img is supported now)
    with pytest.raises(TypeError, match="StableDiffusionInstructPix2PixPipeline"):
        fdd.accelerate(other)


def test_bench_pipeline_row():
    from fastdiff.bench.pipeline import as_dict, bench_pipeline, format_row

    r = bench_pipeline("EulerAncestralDiscreteScheduler", steps=2, latent=8, repeats=1, backend="reference")
    assert r.steps == 2 and r.latent == (1, 4, 8, 8) and r.scheduler == "EulerAncestralDiscreteScheduler"
    for pre in ("stock", "fused"):
        tot, mod, rest = (getattr(r, f"{pre}_{k}") for k in ("us_per_step", "model_us_per_step", "sched_us_per_step"))
        assert 0 < mod < tot and rest > 0 and abs(tot - mod - rest) <= 1e-6 * tot
    assert "fastdiff (reference)" in format_row(r) and as_dict(r)["sched_speedup"] > 0


@pytest.mark.parametrize("name, cfg", [("DPMSolverMultistepScheduler", {}), ("HeunDiscreteScheduler", {}),
                                       ("EulerAncestralDiscreteScheduler", {})])
def test_callback_on_step_end_sees_and_changes_latents_and_interrupts_as_stock(pipes, name, cfg, seed):
    """The same callback in both loops: same (i, t) calls, same latents seen; latents it returns
    (or changes in place) feed the next step; pipe._interrupt skips the remaining steps."""
    pipe = pipes["sd"]
    scale, stop = 0.5 + torch.rand(()).item(), 3

    def make(seen):
        def cb(p, i, t, kw):
            lat = kw["latents"]
            seen.append((i, float(t), lat.clone()))
            if i == 1:
                return {"latents": lat * scale}
            if i == 2:
                lat.mul_(1.1)  # in place, not returned: the stock loop keeps it too
                return {}
            if i == stop:
                p._interrupt = True
            return kw
        return cb

    runs = []
    for accelerated in (False, True):
        pipe.scheduler = getattr(diffusers, name)(**SD, **cfg)
        if accelerated:
            fdd.accelerate(pipe)
        seen = []
        try:
            img = pipe(**PROMPT, num_inference_steps=6, generator=_gen(seed), callback_on_step_end=make(seen),
                       output_type="latent").images
        finally:
            if accelerated:
                fdd.restore(pipe)
        runs.append((img, seen))
    (img0, seen0), (img1, seen1) = runs
    assert [(i, t) for i, t, _ in seen1] == [(i, t) for i, t, _ in seen0]
    assert len(seen0) == stop + 1 < len(pipe.scheduler.timesteps)  # interrupted before the end
    for (_, _, a), (_, _, b) in zip(seen1, seen0):
        assert rel_err(a, b) <= TOL
    assert rel_err(img1, img0) <= TOL


def test_sdxl_denoising_end_cutoff_as_stock(pipes, seed):
    """denoising_end cuts the timesteps at int(round(N - denoising_end * N)), the stock expression:
    at 0.1195 that is 880 where N * (1 - denoising_end) rounds to 881, so the step at t = 880 runs."""
    compare(pipes["sdxl"], diffusers.EulerDiscreteScheduler(**SD), seed, timesteps=[999, 880, 500, 100],
            denoising_end=0.1195, output_type="latent", **PROMPT)


def test_zero_step_run_as_stock(pipes, seed):
    """sigmas=[s] gives no timestep: the stock loop runs no step and decodes the initial latents."""
    compare(pipes["sd"], diffusers.EulerDiscreteScheduler(**SD), seed, sigmas=[3.0], output_type="latent", **PROMPT)


def test_sd3_prompt_embeds_with_several_images_per_prompt(pipes, seed):
    """SD3's encode_prompt does not repeat given prompt_embeds num_images_per_prompt times, but draws
    latents for batch * num_images_per_prompt (the stock loop then broadcasts, or fails): the
    accelerated call refuses it by name instead of returning a different batch; repeated embeddings run."""
    pipe = pipes["sd3"]
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pe, ne, pp, npp = pipe.encode_prompt(prompt="a cat", prompt_2=None, prompt_3=None, device="cpu",
                                         negative_prompt="blurry")
    fdd.accelerate(pipe)
    try:
        with pytest.raises(ValueError, match="num_images_per_prompt=3"):
            pipe(prompt_embeds=pe, pooled_prompt_embeds=pp, negative_prompt_embeds=ne,
                 negative_pooled_prompt_embeds=npp, num_images_per_prompt=3, guidance_scale=1.0,
                 num_inference_steps=2, output_type="latent")
    finally:
        fdd.restore(pipe)
    rep = {k: v.repeat_interleave(3, 0) for k, v in dict(prompt_embeds=pe, pooled_prompt_embeds=pp,
                                                         negative_prompt_embeds=ne,
                                                         negative_pooled_prompt_embeds=npp).items()}
    compare(pipe, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), seed, n_gen=3, global_seed=True,
            num_inference_steps=3, output_type="latent", **rep)
