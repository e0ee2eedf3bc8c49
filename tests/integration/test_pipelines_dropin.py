"""The scheduler drop-in (``pipe.scheduler = fastdiff.diffusers.from_diffusers(pipe.scheduler)``) inside the
diffusers pipelines that use a supported scheduler, on tiny pipelines built offline from configs with random
weights (``_tiny``; prompt embeddings are passed directly where a text encoder would need files).

Each case runs the same call twice, with equally seeded generators: once with the stock scheduler, once
with its drop-in, and requires (1) the outputs (latents) within ``TOL = 1e-5`` relative (fp32: the fused
step evaluates the stock formulas in another order, a few float32 roundings per step; an algorithmic
difference is >= 1e-3) and (2) that every ``step`` call of the drop-in ran the fused step
(``fastdiff.runtime.ops.step``, counted as in the other drop-in tests): as many fused steps as the stock
run made ``step`` calls, and at least one.

Also here: parity of the CogVideoX schedulers' drop-ins (added with this file) with the stock classes' own
``step``, ``add_noise`` / ``scale_noise`` of the drop-ins equal to the stock ones part-way into a run
(img2img, inpainting), and one bf16 pipeline.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest
import torch

from tests.samplers._harness import SHAPE, count_fused_steps, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
import fastdiff.diffusers as fdd  # noqa: E402

from . import _tiny  # noqa: E402

TOL = 1e-5
CLASSES = ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
"""Scheduler classes whose drop-ins were added with this file (compared with stock below)."""

SD = _tiny.SD_BETAS
FM = diffusers.FlowMatchEulerDiscreteScheduler


def flux_scheduler():
    """FLUX.1-dev's scheduler: dynamic shifting, so the pipeline passes ``mu`` to ``set_timesteps``."""
    return FM(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
              max_image_seq_len=4096, shift=3.0)


def wan_unipc():
    """Wan 2.1's scheduler: UniPC on flow sigmas, predicting the velocity."""
    return diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                             num_train_timesteps=1000)


def cog_ddim():
    """CogVideoX-2b's scheduler (v prediction, zero terminal SNR, trailing timesteps)."""
    return diffusers.CogVideoXDDIMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                            timestep_spacing="trailing", clip_sample=False, snr_shift_scale=3.0)


def cog_dpm():
    """CogVideoX-5b's scheduler."""
    return diffusers.CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                           timestep_spacing="trailing", clip_sample=False, snr_shift_scale=1.0,
                                           beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def sd_scheduler():
    """The SD builders' own scheduler (every test sets its own): a config the SD pipelines do not rewrite."""
    return diffusers.DDIMScheduler(**SD, steps_offset=1, clip_sample=False)


BUILD = {
    "flux": lambda: _tiny.flux(flux_scheduler()),
    "flux-img2img": lambda: _tiny.flux(flux_scheduler(), "FluxImg2ImgPipeline"),
    "flux-fill": lambda: _tiny.flux(flux_scheduler(), "FluxFillPipeline", in_channels=12),
    "flux-kontext": lambda: _tiny.flux(flux_scheduler(), "FluxKontextPipeline"),
    "wan": lambda: _tiny.wan(wan_unipc()),
    "wan-i2v": lambda: _tiny.wan_i2v(wan_unipc()),
    "ltx": lambda: _tiny.ltx(FM()),
    "hunyuan": lambda: _tiny.hunyuan_video(FM(shift=7.0)),
    "cogvideox": lambda: _tiny.cogvideox(cog_ddim()),
    "qwen": lambda: _tiny.qwen_image(FM()),
    "chroma": lambda: _tiny.chroma(flux_scheduler()),
    "pixart": lambda: _tiny.pixart_sigma(diffusers.DPMSolverMultistepScheduler()),
    "sana": lambda: _tiny.sana(diffusers.DPMSolverMultistepScheduler()),
    "sd-img2img": lambda: _tiny.sd_variant("StableDiffusionImg2ImgPipeline", sd_scheduler()),
    "sd-inpaint": lambda: _tiny.sd_variant("StableDiffusionInpaintPipeline", sd_scheduler()),
    "sd-inpaint9": lambda: _tiny.sd_variant("StableDiffusionInpaintPipeline", sd_scheduler(), unet_in_channels=9),
    "sd-controlnet": lambda: _tiny.sd_variant("StableDiffusionControlNetPipeline", sd_scheduler()),
    "sdxl-img2img": lambda: _tiny.sdxl_variant("StableDiffusionXLImg2ImgPipeline", sd_scheduler()),
    "sdxl-inpaint": lambda: _tiny.sdxl_variant("StableDiffusionXLInpaintPipeline", sd_scheduler()),
}


class _Pipes(dict):
    """Pipelines built on first use, once per module."""

    def __missing__(self, key):
        self[key] = BUILD[key]()
        return self[key]


@pytest.fixture(scope="module")
def pipes():
    return _Pipes()


def _gen(seed: int, n: int = 1):
    gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
    return gens[0] if n == 1 else gens


def run_both(pipe, scheduler, seed: int, *, n_gen: int = 1, **kw):
    """The call ``pipe(**kw)`` with ``scheduler`` (stock), then with ``from_diffusers(scheduler)``, each with
    a fresh generator seeded ``seed``. Returns ``(stock output, drop-in output, fused steps the drop-in
    ran, step calls of the stock run)``; the pipeline gets the stock scheduler back."""
    fused = fdd.from_diffusers(scheduler)  # (before the counting wrapper, which its copy must not inherit)
    stock_step, calls = scheduler.step, []

    @functools.wraps(stock_step)  # (pipelines inspect the signature for eta / generator)
    def counted(*a, **k):
        calls.append(1)
        return stock_step(*a, **k)

    scheduler.step = counted
    outs, fused_steps = [], 0
    try:
        for s in (scheduler, fused):
            pipe.scheduler = s
            with count_fused_steps() as n:
                out = pipe(**kw, generator=_gen(seed, n_gen))
            fused_steps = n.n  # (the drop-in's run: the last)
            outs.append(out.frames if hasattr(out, "frames") else out.images)
    finally:
        del scheduler.step
        pipe.scheduler = scheduler
    return outs[0], outs[1], fused_steps, len(calls)


def check(pipe, scheduler, seed: int, tol: float = TOL, **kw) -> float:
    """:func:`run_both`, asserting equal outputs (``tol`` relative) and one fused step per step call."""
    ref, got, fused_steps, stock_calls = run_both(pipe, scheduler, seed, **kw)
    what = f"{type(pipe).__name__} + {type(scheduler).__name__}"
    assert stock_calls > 0 and fused_steps == stock_calls, f"{what}: {fused_steps} fused steps, {stock_calls} calls"
    assert got.shape == ref.shape and got.dtype == ref.dtype, (what, got.shape, ref.shape, got.dtype, ref.dtype)
    err = rel_err(got, ref)
    assert err <= tol, f"{what}: relative error {err:.3g}"
    return err


def _randn(seed: int, *shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _image(seed: int, size: int) -> torch.Tensor:
    """An image batch in [0, 1] (the pipelines' tensor input convention)."""
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _mask(seed: int, size: int) -> torch.Tensor:
    return (torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


# ------------------------------------------------------------------ 1. Flux


def _flux_call(seed: int, dtype=torch.float32) -> dict:
    return dict(prompt_embeds=_randn(seed, 1, 8, 32, dtype=dtype), pooled_prompt_embeds=_randn(seed + 1, 1, 32,
                                                                                               dtype=dtype),
                height=8, width=8, num_inference_steps=3, output_type="latent")


FLUX_CASES = {
    "flux": ("flux", lambda s: {}),
    "flux-true-cfg": ("flux", lambda s: dict(true_cfg_scale=2.0, negative_prompt_embeds=_randn(s + 2, 1, 8, 32),
                                             negative_pooled_prompt_embeds=_randn(s + 3, 1, 32))),
    # strength: the run starts part-way (set_begin_index), the latents noised with scheduler.scale_noise
    "flux-img2img": ("flux-img2img", lambda s: dict(image=_image(s, 8), strength=0.6, num_inference_steps=4)),
    "flux-fill": ("flux-fill", lambda s: dict(image=_image(s, 8), mask_image=_mask(s, 8))),
    "flux-kontext": ("flux-kontext", lambda s: dict(image=_image(s, 8), max_area=64, _auto_resize=False)),
}


@pytest.mark.parametrize("case", list(FLUX_CASES))
def test_flux_family(pipes, case, seed):
    """Flux, Flux img2img / fill / Kontext on FLUX.1-dev's dynamically shifted FlowMatchEuler (``mu``)."""
    key, extra = FLUX_CASES[case]
    check(pipes[key], flux_scheduler(), seed, **{**_flux_call(seed), **extra(seed)})


def test_flux_bf16_within_bf16_rounding_of_stock(seed):
    """FluxPipeline in bf16. Stock and drop-in do not round alike: diffusers' FlowMatchEuler step computes
    ``dt * model_output`` in bf16 (a 0-d float32 ``dt`` does not promote a bf16 tensor) and adds it to the
    float32 sample, rounding twice; the fused step rounds the float32 update once. So:

    - per step (from the same state): elementwise ``|ours - stock| <= 2^-7 (|stock| + |dt m|)``, one bf16
      spacing (``2^-7`` relative) of each rounded term, and equal to the once-rounded float32 update
      within one bf16 spacing;
    - over the pipeline (3 steps through the random transformer, which carries those last-bit differences
      on): relative error to the stock bf16 output at most ``2^-7`` (bf16's epsilon; observed <= 3.2e-3
      over 12 seeds), and no further from the fp32 stock output than twice the stock bf16 output is
      (both are ~3-5e-3 from it; a wrong coefficient is >= 1e-2)."""
    eps = 2.0**-7
    pipe = _tiny.flux(flux_scheduler(), dtype=torch.bfloat16)
    ref, got, fused_steps, calls = run_both(pipe, flux_scheduler(), seed, **_flux_call(seed, torch.bfloat16))
    assert got.dtype == ref.dtype == torch.bfloat16 and calls == fused_steps == 3
    pipe32 = _tiny.flux(flux_scheduler())
    ref32 = pipe32(**_flux_call(seed), generator=_gen(seed)).images
    assert rel_err(got, ref) <= eps, rel_err(got, ref)
    assert rel_err(got, ref32) <= 2 * rel_err(ref, ref32), (rel_err(got, ref32), rel_err(ref, ref32))
    # per step
    stock, fused = flux_scheduler(), fdd.from_diffusers(flux_scheduler())
    for s in (stock, fused):
        s.set_timesteps(4, mu=0.8)
    x = _randn(seed, 1, 16, 64, dtype=torch.bfloat16)
    for i, t in enumerate(stock.timesteps):
        m = _randn(seed + 10 + i, 1, 16, 64, dtype=torch.bfloat16)
        a = stock.step(m, t, x, return_dict=False)[0]
        with count_fused_steps() as n:
            b = fused.step(m, t, x, return_dict=False)[0]
        assert n.n == 1 and b.dtype == a.dtype == torch.bfloat16
        dt = float(stock.sigmas[i + 1] - stock.sigmas[i])
        dm = (dt * m.double()).abs()
        assert ((b.double() - a.double()).abs() <= eps * (a.double().abs() + dm)).all(), i
        once = (x.float() + torch.tensor(dt, dtype=torch.float32) * m.float()).bfloat16()
        assert ((b.double() - once.double()).abs() <= eps * once.double().abs() + 1e-30).all(), i
        x = a


# ------------------------------------------------------------------ 2-3. video


@pytest.mark.parametrize("sched", ["unipc-flow", "flow-euler"])
def test_wan_text_to_video(pipes, sched, seed):
    s = wan_unipc() if sched == "unipc-flow" else FM(shift=5.0)
    check(pipes["wan"], s, seed, prompt_embeds=_randn(seed, 1, 8, 32),
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), height=32, width=32, num_frames=5, num_inference_steps=3,
          output_type="latent")


def test_wan_image_to_video(pipes, seed):
    """Wan 2.1 I2V: a tiny CLIP vision encoder (image tokens) and the tiny Wan VAE (condition latents)."""
    check(pipes["wan-i2v"], wan_unipc(), seed, image=_image(seed, 32), prompt_embeds=_randn(seed, 1, 8, 32),
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), height=32, width=32, num_frames=5,
          num_inference_steps=3, output_type="latent")


def test_ltx(pipes, seed):
    """LTX-Video's scheduler: dynamic shifting (``mu`` from the video's token count) with a terminal shift."""
    s = FM(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
           max_image_seq_len=4096, shift_terminal=0.1)
    mask = torch.ones(1, 8)
    check(pipes["ltx"], s, seed, prompt_embeds=_randn(seed, 1, 8, 32), prompt_attention_mask=mask,
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), negative_prompt_attention_mask=mask, height=64, width=64,
          num_frames=9, num_inference_steps=3, output_type="latent")


def test_hunyuan_video(pipes, seed):
    """HunyuanVideo passes its own ``sigmas`` to ``set_timesteps`` (shifted by the scheduler's ``shift``)."""
    check(pipes["hunyuan"], FM(shift=7.0), seed, prompt_embeds=_randn(seed, 1, 8, 16),
          pooled_prompt_embeds=_randn(seed + 1, 1, 8), prompt_attention_mask=torch.ones(1, 8), height=32, width=32,
          num_frames=5, num_inference_steps=3, output_type="latent")


@pytest.mark.parametrize("sched", ["ddim-2b", "dpm-5b", "ddim-default", "dpm-default"])
def test_cogvideox(pipes, sched, seed):
    """CogVideoX with both of its schedulers (CogVideoX-2b's DDIM, 5b's DPM-Solver++(2M) SDE whose previous
    estimate the pipeline keeps and passes back) and with their default configs (epsilon, leading)."""
    s = {"ddim-2b": cog_ddim, "dpm-5b": cog_dpm, "ddim-default": diffusers.CogVideoXDDIMScheduler,
         "dpm-default": diffusers.CogVideoXDPMScheduler}[sched]()
    check(pipes["cogvideox"], s, seed, prompt_embeds=_randn(seed, 1, 8, 32),
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), height=32, width=32, num_frames=5, num_inference_steps=4,
          output_type="latent")


def test_cogvideox_dpm_two_videos_generator_list(pipes, seed):
    """Two prompts, one generator each: CogVideoX-5b's DPM scheduler draws its noise (twice per second-order
    step) from each video's generator."""
    check(pipes["cogvideox"], cog_dpm(), seed, n_gen=2, prompt_embeds=_randn(seed, 2, 8, 32),
          negative_prompt_embeds=_randn(seed + 1, 2, 8, 32), height=32, width=32, num_frames=5,
          num_inference_steps=3, output_type="latent")


# ------------------------------------------------------------------ 4. image transformers


def test_qwen_image(pipes, seed):
    """Qwen-Image's scheduler: exponential time shift with a terminal shift, ``mu`` from the image size;
    true CFG with a negative prompt."""
    s = FM(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
           shift_terminal=0.02, time_shift_type="exponential")
    mask = torch.ones(1, 8, dtype=torch.long)
    check(pipes["qwen"], s, seed, prompt_embeds=_randn(seed, 1, 8, 16), prompt_embeds_mask=mask,
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 16), negative_prompt_embeds_mask=mask, true_cfg_scale=3.0,
          height=64, width=64, num_inference_steps=3, output_type="latent")


def test_chroma(pipes, seed):
    """Chroma: Flux's dynamically shifted FlowMatchEuler, with CFG on a negative prompt."""
    mask = torch.ones(1, 8)
    check(pipes["chroma"], flux_scheduler(), seed, prompt_embeds=_randn(seed, 1, 8, 32), prompt_attention_mask=mask,
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), negative_prompt_attention_mask=mask, height=8, width=8,
          num_inference_steps=3, output_type="latent")


@pytest.mark.parametrize("name, sched", [
    ("pixart", lambda: diffusers.DPMSolverMultistepScheduler()),
    ("sana", lambda: diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                           flow_shift=3.0)),
], ids=["pixart-sigma", "sana-flow-dpm"])
def test_pixart_sigma_and_sana(pipes, name, sched, seed):
    size = 64 if name == "pixart" else 256  # 8x8 latents (no VAE: the pipelines take 8x and 32x compression)
    mask = torch.ones(1, 8)
    check(pipes[name], sched(), seed, prompt_embeds=_randn(seed, 1, 8, 32), prompt_attention_mask=mask,
          negative_prompt_embeds=_randn(seed + 1, 1, 8, 32), negative_prompt_attention_mask=mask, negative_prompt=None,
          height=size, width=size, num_inference_steps=3, output_type="latent", use_resolution_binning=False)


# ------------------------------------------------------------------ 5. Stable Diffusion img2img / inpaint / ControlNet

PROMPT = dict(prompt="a photo of a cat", negative_prompt="blurry, dark", output_type="latent", num_inference_steps=4)
_LMS_LATE = pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="documented fallback (fastdiff.diffusers, scheduler.py _fd_plan): an LMSDiscreteScheduler run that starts "
           "part-way (set_begin_index, img2img) runs diffusers' own step, with a RuntimeWarning, because diffusers' "
           "LMS then truncates its multistep coefficients in a way no plan row expresses; the output equals stock, "
           "but no fused step runs")
I2I_SCHEDULERS = [
    ("DDIMScheduler", {"clip_sample": False}), ("DDPMScheduler", {"clip_sample": False}),
    ("EulerDiscreteScheduler", {}),
    ("EulerAncestralDiscreteScheduler", {}), ("HeunDiscreteScheduler", {}), ("KDPM2DiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", {}), ("UniPCMultistepScheduler", {}), ("PNDMScheduler", {"skip_prk_steps": True}),
    pytest.param("LMSDiscreteScheduler", {}, marks=_LMS_LATE),
]


def _ids(cases):
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


@pytest.mark.parametrize("name, cfg", I2I_SCHEDULERS, ids=_ids(I2I_SCHEDULERS))
def test_sd_img2img(pipes, name, cfg, seed):
    """strength 0.6 of 4 steps: the run starts at step 2 (set_begin_index; DDIM / DDPM / PNDM by the
    timestep values given), from latents noised with ``scheduler.add_noise``."""
    check(pipes["sd-img2img"], getattr(diffusers, name)(**SD, **cfg), seed, image=_image(seed, 16), strength=0.6,
          **PROMPT)


@pytest.mark.parametrize("name, cfg", [("EulerAncestralDiscreteScheduler", {}),
                                       ("DDPMScheduler", {"clip_sample": False}),
                                       ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"})],
                         ids=["EulerAncestral", "DDPM", "DPM-SDE"])
def test_sd_img2img_two_images_generator_list(pipes, name, cfg, seed):
    """Two images per prompt with one generator each: the steps' noise is drawn per sample from its own
    generator, as diffusers draws it."""
    check(pipes["sd-img2img"], getattr(diffusers, name)(**SD, **cfg), seed, n_gen=2, image=_image(seed, 16),
          strength=0.6, num_images_per_prompt=2, **PROMPT)


INPAINT = [("sd-inpaint", "DDIMScheduler", {"clip_sample": False}), ("sd-inpaint", "EulerDiscreteScheduler", {}),
           ("sd-inpaint", "DPMSolverMultistepScheduler", {}), ("sd-inpaint", "HeunDiscreteScheduler", {}),
           ("sd-inpaint9", "DPMSolverMultistepScheduler", {}), ("sd-inpaint9", "EulerAncestralDiscreteScheduler", {})]


@pytest.mark.parametrize("key, name, cfg", INPAINT, ids=[f"{k}-{n}" for k, n, _ in INPAINT])
def test_sd_inpaint(pipes, key, name, cfg, seed):
    """The 4-channel UNet's loop re-noises the known region every step with ``scheduler.add_noise`` at the
    next timestep (strength 0.7: from part-way); the 9-channel one feeds mask and masked image to the UNet."""
    check(pipes[key], getattr(diffusers, name)(**SD, **cfg), seed, image=_image(seed, 16),
          mask_image=_mask(seed + 1, 16), strength=0.7 if key == "sd-inpaint" else 1.0, **PROMPT)


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DDIMScheduler"])
def test_sd_controlnet(pipes, name, seed):
    check(pipes["sd-controlnet"], getattr(diffusers, name)(**SD), seed, image=_image(seed, 16), **PROMPT)


SDXL = [("EulerDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", {}),
        ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}), ("HeunDiscreteScheduler", {})]


@pytest.mark.parametrize("denoising_start", [None, 0.3], ids=["strength", "denoising-start"])
@pytest.mark.parametrize("name, cfg", SDXL, ids=[n for n, _ in SDXL])
def test_sdxl_img2img(pipes, name, cfg, denoising_start, seed):
    """strength 0.5, or a refiner-style ``denoising_start`` (the timesteps cut by value, set_begin_index)."""
    check(pipes["sdxl-img2img"], getattr(diffusers, name)(**SD, **cfg), seed, image=_image(seed, 16), strength=0.5,
          denoising_start=denoising_start, **PROMPT)


@pytest.mark.parametrize("name, cfg", [("EulerDiscreteScheduler", {}), ("DDIMScheduler", {"clip_sample": False}),
                                       ("DPMSolverMultistepScheduler", {}), ("HeunDiscreteScheduler", {})],
                         ids=["Euler", "DDIM", "DPM", "Heun"])
def test_sdxl_inpaint(pipes, name, cfg, seed):
    check(pipes["sdxl-inpaint"], getattr(diffusers, name)(**SD, **cfg), seed, image=_image(seed, 16),
          mask_image=_mask(seed + 1, 16), strength=0.7, **PROMPT)


NOISERS = [("DDIMScheduler", SD), ("DDPMScheduler", SD), ("EulerDiscreteScheduler", SD),
           ("EulerAncestralDiscreteScheduler", SD), ("HeunDiscreteScheduler", SD), ("KDPM2DiscreteScheduler", SD),
           ("DPMSolverMultistepScheduler", SD), ("UniPCMultistepScheduler", SD), ("LMSDiscreteScheduler", SD),
           ("PNDMScheduler", {**SD, "skip_prk_steps": True}), ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}),
           ("CogVideoXDDIMScheduler", {}), ("CogVideoXDPMScheduler", {})]


@pytest.mark.parametrize("name, cfg", NOISERS, ids=[n for n, _ in NOISERS])
def test_add_noise_and_scale_noise_part_way_as_stock(name, cfg, seed):
    """``add_noise`` (``scale_noise`` for flow matching) of a drop-in is diffusers' own, on the same state:
    bit-equal to the stock scheduler's at every timestep of a run started part-way (img2img noises the
    image at the first one, inpainting the known region at each), and after a step has run."""
    stock, fused = getattr(diffusers, name)(**cfg), fdd.from_diffusers(getattr(diffusers, name)(**cfg))
    x0, noise = _randn(seed, 2, 4, 8, 8), _randn(seed + 1, 2, 4, 8, 8)
    for s in (stock, fused):
        s.set_timesteps(6)
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(2 * s.order)
    ts = stock.timesteps[2 * stock.order:]
    for k, t in enumerate(ts):
        tt = t.reshape(1) if k % 2 else t.expand(2)  # (pipelines pass one timestep, or one per sample)
        if name.startswith("FlowMatch"):
            a, b = stock.scale_noise(x0, tt, noise), fused.scale_noise(x0, tt, noise)
        else:
            a, b = stock.add_noise(x0, noise, tt), fused.add_noise(x0, noise, tt)
        assert torch.equal(a, b), (k, float(t))
    if name.startswith("CogVideoX") or name == "PNDMScheduler":
        return  # (their steps take other arguments, or count calls: stepped in the tests above)
    m = _randn(seed + 2, 2, 4, 8, 8)
    t = ts[0]
    gen = "generator" in inspect.signature(stock.step).parameters
    xs = [s.step(m, t, s.add_noise(x0, noise, t.reshape(1)) if not name.startswith("FlowMatch")
                 else s.scale_noise(x0, t.reshape(1), noise), **({"generator": _gen(seed)} if gen else {})).prev_sample
          for s in (stock, fused)]
    assert rel_err(xs[1], xs[0]) <= TOL
    t1 = ts[1]
    if name.startswith("FlowMatch"):
        assert torch.equal(stock.scale_noise(x0, t1.reshape(1), noise), fused.scale_noise(x0, t1.reshape(1), noise))
    else:
        assert torch.equal(stock.add_noise(x0, noise, t1.reshape(1)), fused.add_noise(x0, noise, t1.reshape(1)))


# ------------------------------------------------------------------ CogVideoX schedulers vs their own step

COG_CFGS = {
    "default": {},
    "2b": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               snr_shift_scale=3.0),
    "5b": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
               snr_shift_scale=1.0, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "sample-linear-noalpha1": dict(prediction_type="sample", beta_schedule="linear", set_alpha_to_one=False,
                                   timestep_spacing="linspace"),
    "eps-cosine-offset": dict(beta_schedule="squaredcos_cap_v2", steps_offset=1, snr_shift_scale=2.0),
}


def _cog_step(sched, dpm: bool, m, t, x, old, back, **kw):
    if dpm:
        return sched.step(m, old, t, back, x, **kw)
    return sched.step(m, t, x, **kw)


def _cog_lockstep(name: str, cfg: dict, steps: int, seed: int, *, timesteps=None, **kw) -> int:
    """Stock and drop-in step side by side from the STOCK state (DPM: the previous estimate and timestep
    passed as CogVideoX's pipeline passes them), with equally seeded generators; every ``prev_sample`` and
    ``pred_original_sample`` within ``TOL``, same dtypes, same kind of result; one fused step each.
    Returns the number of steps."""
    dpm = name == "CogVideoXDPMScheduler"
    cls = getattr(diffusers, name)
    stock, fused = cls(**cfg), fdd.from_diffusers(cls(**cfg))
    for s in (stock, fused):
        s.set_timesteps(steps)
    ts = stock.timesteps if timesteps is None else timesteps
    model = toy_model(seed)
    x, old = _randn(seed, *SHAPE), None
    gens = [_gen(seed + 7), _gen(seed + 7)]
    with count_fused_steps() as n:
        for i, t in enumerate(ts):
            m = model(x, torch.as_tensor(t).float().expand(x.shape[0]))
            back = ts[i - 1] if i > 0 else None
            ref = _cog_step(stock, dpm, m, t, x, old, back, generator=gens[0], **kw)
            got = _cog_step(fused, dpm, m, t, x, old, back, generator=gens[1], **kw)
            # (the drop-in's output is a subclass of the stock one, computing pred_original_sample when read)
            assert isinstance(got, type(ref)), (type(got), type(ref))
            entries = [r if isinstance(r, tuple) else r.to_tuple() for r in (got, ref)]
            assert len(entries[0]) == len(entries[1]) == 2
            for a, b in zip(*entries):
                assert a.dtype == b.dtype and a.shape == b.shape, (i, a.dtype, b.dtype)
                assert rel_err(a, b) <= TOL, (i, float(t), rel_err(a, b))
            x, old = ref[0], ref[1]
    assert n.n == len(ts)
    return len(ts)


@pytest.mark.parametrize("cfg", list(COG_CFGS))
@pytest.mark.parametrize("name", CLASSES)
def test_cogvideox_schedulers_match_their_own_step(name, cfg, seed):
    for steps in (1, 3, 7):
        _cog_lockstep(name, COG_CFGS[cfg], steps, seed, return_dict=False)


@pytest.mark.parametrize("name", CLASSES)
def test_cogvideox_schedulers_call_forms(name, seed):
    """return_dict (DPM: a tuple at a first-order step whatever it says, as diffusers), timesteps off the grid
    (computed from the value, as diffusers), a numpy model output, no generator (DPM: the noise drawn from
    torch's global RNG as diffusers draws it, so equally seeded runs agree)."""
    _cog_lockstep(name, COG_CFGS["2b"], 4, seed)
    _cog_lockstep(name, COG_CFGS["default"], 5, seed, timesteps=torch.tensor([901, 650, 433, 120, 7]))
    dpm = name == "CogVideoXDPMScheduler"
    cls = getattr(diffusers, name)
    stock, fused = cls(), fdd.from_diffusers(cls())
    outs = []
    for s in (stock, fused):
        s.set_timesteps(4)
        torch.manual_seed(seed)
        x, old = _randn(seed, *SHAPE), None
        for i, t in enumerate(s.timesteps):
            m = 0.3 * torch.tanh(x + 1.0)
            back = s.timesteps[i - 1] if i else None
            r = _cog_step(s, dpm, m.numpy(), t, x, old, back, return_dict=False)
            x, old = r[0], r[1]
        outs.append(x)
    assert outs[1].dtype == outs[0].dtype and rel_err(outs[1], outs[0]) <= TOL


def test_cogvideox_dpm_refusals_where_stock_fails(seed):
    """An estimate without ``timestep_back`` (stock: IndexError inside its step) and epsilon prediction at
    zero terminal SNR's t = 999 (stock: inf/NaN) are refused by name; the steps before run."""
    cfg = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    for name in CLASSES:
        dpm = name == "CogVideoXDPMScheduler"
        cls = getattr(diffusers, name)
        stock, fused = cls(**cfg), fdd.from_diffusers(cls(**cfg))
        for s in (stock, fused):
            s.set_timesteps(4)
        x = _randn(seed, 2, 3, 4, 4)
        m = _randn(seed + 1, 2, 3, 4, 4)
        t = stock.timesteps[0]
        assert int(t) == 999 and float(stock.alphas_cumprod[999]) == 0.0
        ref = _cog_step(stock, dpm, m, t, x, None, None, return_dict=False)[0]
        assert not torch.isfinite(ref).all()
        with pytest.raises(ValueError, match="timestep=999.*inf/NaN"):
            _cog_step(fused, dpm, m, t, x, None, None, return_dict=False)
        t1 = stock.timesteps[1]
        torch.manual_seed(seed)  # (DPM without a generator: the noise from torch's global RNG, as diffusers draws it)
        ref = _cog_step(stock, dpm, m, t1, x, None, t if dpm else None, return_dict=False)[0]
        assert torch.isfinite(ref).all()
        torch.manual_seed(seed)
        got = _cog_step(fused, dpm, m, t1, x, None, t if dpm else None, return_dict=False)[0]
        assert rel_err(got, ref) <= TOL
    stock, fused = diffusers.CogVideoXDPMScheduler(), fdd.from_diffusers(diffusers.CogVideoXDPMScheduler())
    for s in (stock, fused):
        s.set_timesteps(4)
    t = stock.timesteps[1]
    with pytest.raises(IndexError):
        stock.step(m, x, t, None, x)
    with pytest.raises(ValueError, match="without timestep_back"):
        fused.step(m, x, t, None, x)


def test_cogvideox_classes_in_the_support_table():
    """Both classes are listed, and a config key the drop-in does not know is refused by name."""
    table = fdd.support_table()
    for name in CLASSES:
        assert name in fdd.SUPPORT and name in table
    s = diffusers.CogVideoXDDIMScheduler()
    s.register_to_config(unknown_key=1)
    with pytest.raises(ValueError, match="config key 'unknown_key'"):
        fdd.from_diffusers(s)


def _cog_dpm_run(sched, mshape, xshape, tform=lambda t: t, steps: int = 4) -> list[torch.Tensor]:
    """CogVideoX's DPM loop with a model output of ``mshape`` for a sample of ``xshape`` and the timesteps
    passed as ``tform`` makes them; the states."""
    sched.set_timesteps(steps)
    g, gm = _gen(0), _gen(1)
    x, old, out = _randn(2, *xshape), None, []
    for i, t in enumerate(sched.timesteps):
        m = 0.3 * torch.tanh(x.mean() + torch.randn(mshape, generator=gm))
        r = sched.step(m, old, tform(t), tform(sched.timesteps[i - 1]) if i else None, x, generator=g)
        x, old = r[0], r[1]
        out.append(x)
    return out


def _same(a_run, b_run):
    assert len(a_run) == len(b_run)
    for i, (a, b) in enumerate(zip(a_run, b_run)):
        assert a.shape == b.shape and a.dtype == b.dtype and rel_err(a, b) <= TOL, (i, a.shape, b.shape, a.dtype,
                                                                                   b.dtype)


@pytest.mark.parametrize("mshape, xshape", [(SHAPE, SHAPE), ((1, *SHAPE[1:]), SHAPE), (SHAPE[2:], SHAPE),
                                            (SHAPE, (1, *SHAPE[1:])), ((SHAPE[0], 1, *SHAPE[2:]), SHAPE)],
                         ids=["same", "batch-1-output", "fewer-dims-output", "batch-1-sample", "one-channel-output"])
def test_cogvideox_dpm_broadcasting_shapes_as_stock(mshape, xshape):
    """The checks test_dropin_errors.py makes of every class with ``step(model_output, timestep, sample)``,
    made here with CogVideoXDPM's own signature: shapes that broadcast run as in stock (the noise drawn in
    the sample's shape, as there)."""
    cls = diffusers.CogVideoXDPMScheduler
    _same(_cog_dpm_run(fdd.from_diffusers(cls()), mshape, xshape), _cog_dpm_run(cls(), mshape, xshape))


FORMS = {"shape-1": lambda t: t.reshape(1), "shape-1-1": lambda t: t.reshape(1, 1), "int": int,
         "numpy-0d": lambda t: np.array(int(t)), "numpy-shape-1": lambda t: np.array([int(t)])}
LENIENT = {"float": float, "float-tensor": lambda t: t.float(), "numpy-float": lambda t: np.float64(t)}


@pytest.mark.parametrize("form", list(FORMS) + list(LENIENT))
def test_cogvideox_dpm_timestep_forms_as_stock(form):
    """One-value timesteps run as in stock, in its dtype (a timestep of shape (1,) indexes scalars with
    dimensions, which promote the result to the float64 of ``alphas_cumprod``); float values, on which
    stock's indexing fails (IndexError), run as their integer (as the drop-in DDIM / DDPM do)."""
    cls = diffusers.CogVideoXDPMScheduler
    ours = _cog_dpm_run(fdd.from_diffusers(cls()), SHAPE, SHAPE, FORMS.get(form) or LENIENT[form])
    if form in LENIENT:
        with pytest.raises(IndexError):
            _cog_dpm_run(cls(), SHAPE, SHAPE, LENIENT[form])
        _same(ours, _cog_dpm_run(cls(), SHAPE, SHAPE))
    else:
        _same(ours, _cog_dpm_run(cls(), SHAPE, SHAPE, FORMS[form]))


MALFORMED = [  # (what, step arguments from (timesteps, x), exception, the argument named)
    ("timestep-str", lambda ts, x: (x, None, "1", None, x), TypeError, "timestep"),
    ("timestep-two-values", lambda ts, x: (x, None, ts[:2], None, x), ValueError, "timestep"),
    ("timestep-back-str", lambda ts, x: (x, x, ts[1], "a", x), TypeError, "timestep_back"),
    ("model-output-none", lambda ts, x: (None, None, ts[0], None, x), TypeError, "model_output"),
    ("sample-list", lambda ts, x: (x, None, ts[0], None, [1.0]), TypeError, "sample"),
    ("shapes-do-not-broadcast", lambda ts, x: (x[:, :2], None, ts[0], None, x), ValueError, "model_output"),
    ("estimate-does-not-broadcast", lambda ts, x: (x, x[:, :2], ts[1], ts[0], x), ValueError,
     "old_pred_original_sample"),
    ("estimate-not-a-tensor", lambda ts, x: (x, [0.0], ts[1], ts[0], x), TypeError, "old_pred_original_sample"),
]


@pytest.mark.parametrize("what, make, exc, arg", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_cogvideox_dpm_malformed_arguments_refused_by_name(what, make, exc, arg):
    """Where stock fails with an unrelated error, the drop-in names the argument; a 0-d sample (stock: an
    IndexError in its noise draw) is refused as a step that draws noise per batch row."""
    cls = diffusers.CogVideoXDPMScheduler
    stock, fused = cls(), fdd.from_diffusers(cls())
    for s in (stock, fused):
        s.set_timesteps(4)
    x = _randn(0, *SHAPE)
    with pytest.raises(Exception):  # noqa: B017, PT011 - stock fails too, with an error of its own
        stock.step(*make(stock.timesteps, x), generator=_gen(0))
    with pytest.raises(exc, match=arg):
        fused.step(*make(fused.timesteps, x), generator=_gen(0))
    with pytest.raises(IndexError):
        stock.step(torch.tensor(0.1), None, stock.timesteps[0], None, torch.tensor(0.2), generator=_gen(0))
    with pytest.raises(ValueError, match="draws noise.*batch dimension"):
        fused.step(torch.tensor(0.1), None, fused.timesteps[0], None, torch.tensor(0.2), generator=_gen(0))
