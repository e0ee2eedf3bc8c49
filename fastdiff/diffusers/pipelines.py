"""Accelerated pipelines: :func:`accelerate` swaps a supported pipeline's ``__call__`` for fastdiff's
loop (one fused kernel per step, the CFG blend inside); :func:`restore` puts the stock one back."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core.guidance import Guidance
from ..runtime import ops
from ..runtime.executor import StopSampling
from ..runtime.loop import LoopOptions, draw_noise, run_plan
from .scheduler import _check_scheduler, _short, from_diffusers
from .support import noise_dtype_for


# ------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class _PipeSpec:
    """How one pipeline class is accelerated.

    Attributes:
        supported: ``__call__`` arguments the accelerated loop honours (all others must keep
            their default values).
        prepare: ``(pipe, args, do_cfg) -> (model, cond, uncond, latents, extra)``.
        finish: ``(pipe, latents, args, extra) -> pipeline output``.
        step_generator: whether the stock loop hands ``generator`` to ``scheduler.step`` (else
            the stock step draws from torch's global RNG, and so do we).
        cfg: ``(pipe, args) -> (do_cfg, scale)``: whether and how strongly the loop blends an
            unconditional branch (``None``: the pipeline's ``do_classifier_free_guidance`` and
            ``guidance_scale``; Flux: ``true_cfg_scale`` with a negative prompt, its
            ``guidance_scale`` being an embedding the model takes).
    """

    supported: frozenset
    prepare: Callable
    finish: Callable
    step_generator: bool = True
    cfg: Callable | None = None


_COMMON = frozenset({"prompt", "height", "width", "num_inference_steps", "guidance_scale", "negative_prompt",
                     "num_images_per_prompt", "generator", "latents", "prompt_embeds", "negative_prompt_embeds",
                     "output_type", "return_dict", "clip_skip", "callback_on_step_end",
                     "callback_on_step_end_tensor_inputs"})


def _batch(a: dict) -> int:
    """The prompts' batch, as every stock ``__call__`` counts it (a string, a list, or the embeddings)."""
    if isinstance(a["prompt"], str):
        return 1
    if isinstance(a["prompt"], list):
        return len(a["prompt"])
    return a["prompt_embeds"].shape[0]


def _unet_model(pipe, a: dict):
    """The UNet as the loop's model: ``model(x, t, **cond)`` with the call's ``cross_attention_kwargs``."""
    cak = a["cross_attention_kwargs"]

    def model(x, t, **cond):
        return pipe.unet(x, t, cross_attention_kwargs=cak, return_dict=False, **cond)[0]
    return model


def _sd_encode(pipe, a: dict, do_cfg: bool, device):
    """Stable Diffusion's ``encode_prompt`` with the call's arguments: ``(pe, ne)``."""
    return pipe.encode_prompt(a["prompt"], device, a["num_images_per_prompt"], do_cfg, a["negative_prompt"],
                              prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                              lora_scale=(a["cross_attention_kwargs"] or {}).get("scale"), clip_skip=a["clip_skip"])


def _sdxl_encode(pipe, a: dict, do_cfg: bool, device):
    """SDXL's ``encode_prompt`` with the call's arguments: ``(pe, ne, pp, npp)``."""
    return pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], device=device, num_images_per_prompt=a["num_images_per_prompt"],
        do_classifier_free_guidance=do_cfg, negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
        lora_scale=(a["cross_attention_kwargs"] or {}).get("scale"), clip_skip=a["clip_skip"])


def _sdxl_conds(pe, ne, pp, npp, ids, nids, n: int, device, do_cfg: bool):
    """SDXL's conditioning of the two branches: the embeddings and ``added_cond_kwargs`` (pooled
    embeddings, time ids repeated over the ``n`` images)."""
    def pack(e, pooled, time_ids):
        return {"encoder_hidden_states": e.to(device),
                "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(n, 1)}}

    return pack(pe, pp, ids), pack(ne, npp, nids) if do_cfg else None


def _sdxl_aesthetic_ids(pipe, a: dict, latents, pooled, dtype):
    """SDXL img2img's and inpainting's ``_get_add_time_ids`` (with aesthetic scores) for the call: sizes
    default to the latents' in pixels, the negative ones to the positive ones. ``(ids, negative ids)``."""
    h, w = (v * pipe.vae_scale_factor for v in latents.shape[-2:])
    orig, target = a["original_size"] or (h, w), a["target_size"] or (h, w)
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    return pipe._get_add_time_ids(orig, a["crops_coords_top_left"], target, a["aesthetic_score"],
                                  a["negative_aesthetic_score"], a["negative_original_size"] or orig,
                                  a["negative_crops_coords_top_left"], a["negative_target_size"] or target,
                                  dtype=dtype, text_encoder_projection_dim=proj)


def _check_batch(name: str, n: int, **embeds) -> None:
    """Refuse embeddings whose batch is not the latents' ``n``: the accelerated loop does not broadcast."""
    for key, e in embeds.items():
        if e is not None and e.shape[0] != n:
            raise ValueError(f"fastdiff.diffusers.accelerate: {name} with {key} of batch {e.shape[0]} gives {n} "
                             "latents; the accelerated loop does not broadcast")


def _sd_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    h = a["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if not isinstance(pipe.unet.config.sample_size, int) and not (a["height"] and a["width"]):
        h, w = (pipe.unet.config.sample_size[0] * pipe.vae_scale_factor,
                pipe.unet.config.sample_size[1] * pipe.vae_scale_factor)
    pipe.check_inputs(a["prompt"], h, w, None, a["negative_prompt"], a["prompt_embeds"], a["negative_prompt_embeds"])
    device = pipe._execution_device
    pe, ne = _sd_encode(pipe, a, do_cfg, device)
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(pe.shape[0], pipe.unet.config.in_channels, h, w, pe.dtype, device,
                                   a["generator"], a["latents"])
    model = _unet_model(pipe, a)

    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None
    return model, cond, uncond, latents, {"dtype": pe.dtype, "device": device}


def _sd_img2img_prepare(pipe, a: dict, do_cfg: bool):
    """StableDiffusionImg2ImgPipeline's set-up, as its ``__call__`` does it: the schedule cut by
    ``strength`` (the run starts at the scheduler's begin index, ``extra["start"]``) and the latents
    the encoded image noised to the first timestep by the pipeline's own ``prepare_latents``."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_timesteps

    pipe.check_inputs(a["prompt"], a["strength"], None, a["negative_prompt"], a["prompt_embeds"],
                      a["negative_prompt_embeds"], None, None, a["callback_on_step_end_tensor_inputs"])
    batch = _batch(a)
    device = pipe._execution_device
    pe, ne = _sd_encode(pipe, a, do_cfg, device)
    image = pipe.image_processor.preprocess(a["image"])
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    timesteps, _ = pipe.get_timesteps(a["num_inference_steps"], a["strength"], device)
    latent_timestep = timesteps[:1].repeat(batch * a["num_images_per_prompt"])
    latents = pipe.prepare_latents(image, latent_timestep, batch, a["num_images_per_prompt"], pe.dtype, device,
                                   a["generator"])
    model = _unet_model(pipe, a)

    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None
    start = len(pipe.scheduler.timesteps) - len(timesteps)
    return model, cond, uncond, latents, {"dtype": pe.dtype, "device": device, "start": start}


def _inpaint_state(pipe, a: dict, do_cfg: bool, timesteps, n: int, h: int, w: int, dtype, device, sdxl: bool):
    """What the SD and SDXL inpainting pipelines prepare after their schedule (their own calls, in their
    order): the latents and noise, the mask and masked-image latents. Returns ``(latents, wrap, extra)``:
    ``wrap(model)`` concatenates ``[x, mask, masked latents]`` to the input of a 9-channel UNet, and
    ``extra`` holds the decode's inputs and, for a 4-channel UNet, the ``post_step`` putting the known
    region back after every step, re-noised to the next timestep by the scheduler's own ``add_noise``
    (at the step index the stock loop's stepped scheduler has, which its ``add_noise`` reads)."""
    if a["padding_mask_crop"] is not None:
        crops = pipe.mask_processor.get_crop_region(a["mask_image"], w, h, pad=a["padding_mask_crop"])
        resize_mode = "fill"
    else:
        crops, resize_mode = None, "default"
    init_image = pipe.image_processor.preprocess(a["image"], height=h, width=w, crops_coords=crops,
                                                 resize_mode=resize_mode).to(dtype=torch.float32)
    mask_condition = pipe.mask_processor.preprocess(a["mask_image"], height=h, width=w, resize_mode=resize_mode,
                                                    crops_coords=crops)
    channels = pipe.unet.config.in_channels
    extra_kw = {"add_noise": True} if sdxl else {}
    outs = pipe.prepare_latents(n, pipe.vae.config.latent_channels, h, w, dtype, device, a["generator"], a["latents"],
                                image=init_image, timestep=timesteps[:1].repeat(n), is_strength_max=a["strength"] == 1.0,
                                return_noise=True, return_image_latents=channels == 4, **extra_kw)
    latents, noise = outs[0], outs[1]
    if a["masked_image_latents"] is not None:
        masked = a["masked_image_latents"]
    elif sdxl and init_image.shape[1] == 4:
        masked = None
    else:
        masked = init_image * (mask_condition < 0.5)
    mask, masked_latents = pipe.prepare_mask_latents(mask_condition, masked, n, h, w, dtype, device, a["generator"],
                                                     do_cfg)
    if channels == 9:
        if pipe.vae.config.latent_channels + mask.shape[1] + masked_latents.shape[1] != channels:
            raise ValueError(f"fastdiff.diffusers.accelerate: the UNet takes {channels} channels, the latents, mask "
                             f"and masked image give {pipe.vae.config.latent_channels + mask.shape[1]}"
                             f" + {masked_latents.shape[1]}")
    elif channels != 4:
        raise ValueError(f"The unet {pipe.unet.__class__} should have either 4 or 9 input channels, not {channels}.")

    def wrap(model):
        if channels != 9:
            return model

        def with_mask(x, t, **cond):  # (mask and masked latents are doubled for the CFG batch: the first k fit)
            k = x.shape[0]
            return model(torch.cat([x, mask[:k], masked_latents[:k]], dim=1), t, **cond)
        return with_mask

    start = len(pipe.scheduler.timesteps) - len(timesteps)
    extra = {"dtype": dtype, "device": device, "start": start, "init_image": init_image,
             "mask_condition": mask_condition, "masked_latents": masked_latents, "crops": crops}
    if channels == 4:
        image_latents = outs[2]
        init_mask = mask.chunk(2)[0] if do_cfg else mask
        stock = pipe.scheduler
        rows = len(timesteps)

        def put_back(i: int, x: torch.Tensor) -> None:
            proper = image_latents
            if hasattr(stock, "_step_index"):  # where the stock loop's stepped scheduler is (its add_noise reads it)
                stock._step_index = start + i + 1
            if i < rows - 1:
                proper = stock.add_noise(image_latents, noise, torch.tensor([timesteps[i + 1]]))
            x.copy_((1 - init_mask) * proper + init_mask * x)

        extra["post_step"] = put_back
    return latents, wrap, extra


def _inpaint_schedule(pipe, a: dict, device, retrieve_timesteps):
    """The inpainting pipelines' schedule: ``set_timesteps``, then cut by ``strength``."""
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    timesteps, n_steps = pipe.get_timesteps(num_inference_steps=a["num_inference_steps"], strength=a["strength"],
                                            device=device, **({"denoising_start": None} if "denoising_start" in a
                                                              else {}))
    if n_steps < 1:
        raise ValueError(f"After adjusting the num_inference_steps by strength parameter: {a['strength']}, the number "
                         f"of pipelinesteps is {n_steps} which is < 1 and not appropriate for this pipeline.")
    return timesteps


def _sd_inpaint_prepare(pipe, a: dict, do_cfg: bool):
    """StableDiffusionInpaintPipeline's set-up, as its ``__call__`` does it (:func:`_inpaint_state`)."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint import retrieve_timesteps

    h = a["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["image"], a["mask_image"], h, w, a["strength"], None, a["output_type"],
                      a["negative_prompt"], a["prompt_embeds"], a["negative_prompt_embeds"], None, None,
                      a["callback_on_step_end_tensor_inputs"], a["padding_mask_crop"])
    batch = _batch(a)
    device = pipe._execution_device
    pe, ne = _sd_encode(pipe, a, do_cfg, device)
    timesteps = _inpaint_schedule(pipe, a, device, retrieve_timesteps)
    latents, wrap, extra = _inpaint_state(pipe, a, do_cfg, timesteps, batch * a["num_images_per_prompt"], h, w,
                                          pe.dtype, device, sdxl=False)
    model = _unet_model(pipe, a)

    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None
    return wrap(model), cond, uncond, latents, extra


def _sdxl_inpaint_prepare(pipe, a: dict, do_cfg: bool):
    """StableDiffusionXLInpaintPipeline's set-up, as its ``__call__`` does it (:func:`_inpaint_state`, with
    SDXL's two text encoders and its aesthetic-score time ids)."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_inpaint import retrieve_timesteps

    h = a["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], a["image"], a["mask_image"], h, w, a["strength"], None,
                      a["output_type"], a["negative_prompt"], a["negative_prompt_2"], a["prompt_embeds"],
                      a["negative_prompt_embeds"], None, None, a["callback_on_step_end_tensor_inputs"],
                      a["padding_mask_crop"])
    pipe._denoising_end, pipe._denoising_start = None, None
    batch = _batch(a)
    device = pipe._execution_device
    pe, ne, pp, npp = _sdxl_encode(pipe, a, do_cfg, device)
    timesteps = _inpaint_schedule(pipe, a, device, retrieve_timesteps)
    n = batch * a["num_images_per_prompt"]
    latents, wrap, extra = _inpaint_state(pipe, a, do_cfg, timesteps, n, h, w, pe.dtype, device, sdxl=True)
    ids, nids = _sdxl_aesthetic_ids(pipe, a, latents, pp, pe.dtype)
    model = _unet_model(pipe, a)

    cond, uncond = _sdxl_conds(pe, ne, pp, npp, ids, nids, n, device, do_cfg)
    return wrap(model), cond, uncond, latents, extra


def _sdxl_inpaint_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    if a["output_type"] == "latent":  # (stock returns the output class here whatever return_dict says)
        pipe.maybe_free_model_hooks()
        return StableDiffusionXLPipelineOutput(images=latents)
    out = _sdxl_finish(pipe, latents, a, extra)
    if a["output_type"] == "latent" or a["padding_mask_crop"] is None:
        return out
    images = out.images if a["return_dict"] else out[0]
    images = [pipe.image_processor.apply_overlay(a["mask_image"], a["image"], i, extra["crops"]) for i in images]
    return StableDiffusionXLPipelineOutput(images=images) if a["return_dict"] else (images,)


def _sd_inpaint_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.models import AsymmetricAutoencoderKL
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    if a["output_type"] != "latent":
        kw = {}
        if isinstance(pipe.vae, AsymmetricAutoencoderKL):
            dt = extra["masked_latents"].dtype
            init = extra["init_image"].to(device=extra["device"], dtype=dt)
            kw = {"image": init.clone(), "mask": extra["mask_condition"].to(device=extra["device"], dtype=dt)}
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False, generator=a["generator"],
                                **kw)[0]
        image, nsfw = pipe.run_safety_checker(image, extra["device"], extra["dtype"])
    else:
        image, nsfw = latents, None
    denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    image = pipe.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denorm)
    if a["padding_mask_crop"] is not None:
        image = [pipe.image_processor.apply_overlay(a["mask_image"], a["image"], i, extra["crops"]) for i in image]
    pipe.maybe_free_model_hooks()
    if not a["return_dict"]:
        return image, nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def _sd_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    if a["output_type"] != "latent":
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=a["generator"])[0]
        image, nsfw = pipe.run_safety_checker(image, extra["device"], extra["dtype"])
    else:
        image, nsfw = latents, None
    denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    image = pipe.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denorm)
    pipe.maybe_free_model_hooks()
    if not a["return_dict"]:
        return image, nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def _sdxl_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], h, w, None, a["negative_prompt"], a["negative_prompt_2"],
                      a["prompt_embeds"], a["negative_prompt_embeds"], a["pooled_prompt_embeds"],
                      a["negative_pooled_prompt_embeds"])
    device = pipe._execution_device
    pe, ne, pp, npp = _sdxl_encode(pipe, a, do_cfg, device)
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(pe.shape[0], pipe.unet.config.in_channels, h, w, pe.dtype, device,
                                   a["generator"], a["latents"])
    proj = (int(pp.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
    ids = pipe._get_add_time_ids(a["original_size"] or (h, w), a["crops_coords_top_left"], a["target_size"] or (h, w),
                                 dtype=pe.dtype, text_encoder_projection_dim=proj)
    if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
        nids = pipe._get_add_time_ids(a["negative_original_size"], a["negative_crops_coords_top_left"],
                                      a["negative_target_size"], dtype=pe.dtype, text_encoder_projection_dim=proj)
    else:
        nids = ids
    n = pe.shape[0]
    model = _unet_model(pipe, a)

    cond, uncond = _sdxl_conds(pe, ne, pp, npp, ids, nids, n, device, do_cfg)
    return model, cond, uncond, latents, {"dtype": pe.dtype, "device": device}


def _sdxl_img2img_prepare(pipe, a: dict, do_cfg: bool):
    """StableDiffusionXLImg2ImgPipeline's set-up, as its ``__call__`` does it: the schedule cut by
    ``strength`` (the run starts at ``extra["start"]``), the image encoded and noised by the pipeline's
    own ``prepare_latents`` (or the given ``latents``), its aesthetic-score time ids."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img import retrieve_timesteps

    pipe.check_inputs(a["prompt"], a["prompt_2"], a["strength"], a["num_inference_steps"], None, a["negative_prompt"],
                      a["negative_prompt_2"], a["prompt_embeds"], a["negative_prompt_embeds"], None, None,
                      a["callback_on_step_end_tensor_inputs"])
    pipe._denoising_end, pipe._denoising_start = None, None
    batch = _batch(a)
    device = pipe._execution_device
    pe, ne, pp, npp = _sdxl_encode(pipe, a, do_cfg, device)
    image = pipe.image_processor.preprocess(a["image"])
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    timesteps, _ = pipe.get_timesteps(a["num_inference_steps"], a["strength"], device, denoising_start=None)
    latents = a["latents"]
    if latents is None:
        latents = pipe.prepare_latents(image, timesteps[:1].repeat(batch * a["num_images_per_prompt"]), batch,
                                       a["num_images_per_prompt"], pe.dtype, device, a["generator"], True)
    ids, nids = _sdxl_aesthetic_ids(pipe, a, latents, pp, pe.dtype)
    n = batch * a["num_images_per_prompt"]
    model = _unet_model(pipe, a)

    cond, uncond = _sdxl_conds(pe, ne, pp, npp, ids, nids, n, device, do_cfg)
    start = len(pipe.scheduler.timesteps) - len(timesteps)
    return model, cond, uncond, latents.to(device=device, dtype=pe.dtype), \
        {"dtype": pe.dtype, "device": device, "start": start}


def _sdxl_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    if a["output_type"] == "latent":
        image = latents
    else:
        upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        mean = getattr(pipe.vae.config, "latents_mean", None)
        std = getattr(pipe.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / pipe.vae.config.scaling_factor + mean
        else:
            latents = latents / pipe.vae.config.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if upcast:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=image) if a["return_dict"] else (image,)


def _sd3_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], a["prompt_3"], h, w, negative_prompt=a["negative_prompt"],
                      negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
                      prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                      pooled_prompt_embeds=a["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                      max_sequence_length=a["max_sequence_length"])
    device = pipe._execution_device
    lora_scale = (a["joint_attention_kwargs"] or {}).get("scale")
    pe, ne, pp, npp = pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"], negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
        do_classifier_free_guidance=do_cfg, prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device, clip_skip=a["clip_skip"],
        num_images_per_prompt=a["num_images_per_prompt"], max_sequence_length=a["max_sequence_length"],
        lora_scale=lora_scale)
    # the stock batch: given prompt_embeds are NOT repeated num_images_per_prompt times by SD3's
    # encode_prompt, while the latents are drawn for batch_size * num_images_per_prompt
    batch = _batch(a)
    latents = pipe.prepare_latents(batch * a["num_images_per_prompt"], pipe.transformer.config.in_channels, h, w,
                                   pe.dtype, device, a["generator"], a["latents"])
    if pe.shape[0] != latents.shape[0]:
        raise ValueError(f"fastdiff.diffusers.accelerate: StableDiffusion3Pipeline with prompt_embeds of batch "
                         f"{pe.shape[0]} and num_images_per_prompt={a['num_images_per_prompt']} gives "
                         f"{latents.shape[0]} latents: the stock pipeline does not repeat given prompt_embeds (it relies "
                         "on broadcasting, or fails); the accelerated loop does not broadcast. Repeat the embeddings "
                         "(prompt_embeds.repeat_interleave(n, 0), and the pooled/negative ones) or restore(pipe)")
    kw = {}
    cfg = pipe.scheduler.config
    if cfg.get("use_dynamic_shifting", None) and a["mu"] is None:
        p = pipe.transformer.config.patch_size
        kw["mu"] = calculate_shift((latents.shape[2] // p) * (latents.shape[3] // p),
                                   cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                   cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    elif a["mu"] is not None:
        kw["mu"] = a["mu"]
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, sigmas=a["sigmas"], **kw)
    jak = a["joint_attention_kwargs"]

    def model(x, t, **cond):
        return pipe.transformer(hidden_states=x, timestep=t, joint_attention_kwargs=jak, return_dict=False, **cond)[0]

    def pack(e, pooled):
        return {"encoder_hidden_states": e, "pooled_projections": pooled}

    uncond = pack(ne, npp) if do_cfg else None
    return model, pack(pe, pp), uncond, latents, {"dtype": pe.dtype, "device": device}


def _sd3_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    if a["output_type"] == "latent":
        image = latents
    else:
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if a["return_dict"] else (image,)


def _flux_cfg(pipe, a: dict) -> tuple[bool, float]:
    has_neg = a["negative_prompt"] is not None or (
        a["negative_prompt_embeds"] is not None and a["negative_pooled_prompt_embeds"] is not None)
    return a["true_cfg_scale"] > 1 and has_neg, float(a["true_cfg_scale"])


def _flux_prepare(pipe, a: dict, do_cfg: bool):
    """FluxPipeline's set-up, as its ``__call__`` does it; the model is the transformer with the
    timestep over 1000, the guidance embedding and the text/image position ids (shared by both
    branches: not batched) bound, and the true-CFG branches batched ``[negative; positive]`` (the stock
    loop calls the transformer once per branch)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], h, w, negative_prompt=a["negative_prompt"],
                      negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
                      negative_prompt_embeds=a["negative_prompt_embeds"],
                      pooled_prompt_embeds=a["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                      callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
                      max_sequence_length=a["max_sequence_length"])
    batch = _batch(a)
    device = pipe._execution_device
    jak = a["joint_attention_kwargs"] or {}
    lora_scale = jak.get("scale")
    if do_cfg and a["prompt_embeds"] is not None and a["negative_prompt_embeds"] is not None \
            and a["prompt_embeds"].shape != a["negative_prompt_embeds"].shape:
        raise ValueError("`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed directly, "
                         f"but got: `prompt_embeds` {a['prompt_embeds'].shape} != `negative_prompt_embeds` "
                         f"{a['negative_prompt_embeds'].shape}.")
    n = a["num_images_per_prompt"]
    pe, pp, text_ids = pipe.encode_prompt(prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_embeds=a["prompt_embeds"],
                                          pooled_prompt_embeds=a["pooled_prompt_embeds"], device=device,
                                          num_images_per_prompt=n, max_sequence_length=a["max_sequence_length"],
                                          lora_scale=lora_scale)
    ne = npp = None
    if do_cfg:
        ne, npp, _ = pipe.encode_prompt(prompt=a["negative_prompt"], prompt_2=a["negative_prompt_2"],
                                        prompt_embeds=a["negative_prompt_embeds"],
                                        pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device,
                                        num_images_per_prompt=n, max_sequence_length=a["max_sequence_length"],
                                        lora_scale=lora_scale)
    latents, image_ids = pipe.prepare_latents(batch * n, pipe.transformer.config.in_channels // 4, h, w, pe.dtype,
                                              device, a["generator"], a["latents"])
    for name, e in (("prompt_embeds", pe), ("negative_prompt_embeds", ne)):
        if e is not None and e.shape[0] != latents.shape[0]:
            raise ValueError(f"fastdiff.diffusers.accelerate: FluxPipeline with {name} of batch {e.shape[0]} and "
                             f"num_images_per_prompt={n} gives {latents.shape[0]} latents: the stock pipeline does not "
                             "repeat given embeddings (its transformer then fails); repeat them "
                             "(e.repeat_interleave(n, 0), and the pooled ones) or restore(pipe)")
    sigmas = np.linspace(1.0, 1 / a["num_inference_steps"], a["num_inference_steps"]) if a["sigmas"] is None \
        else a["sigmas"]
    cfg = pipe.scheduler.config
    if getattr(cfg, "use_flow_sigmas", False):
        sigmas = None
    mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, sigmas=sigmas, mu=mu)
    pipe.scheduler.set_begin_index(0)
    embed = None
    if pipe.transformer.config.guidance_embeds:
        embed = torch.full([1], float(a["guidance_scale"]), device=device, dtype=torch.float32)
    pipe._joint_attention_kwargs = jak

    def model(x, t, **cond):
        g = None if embed is None else embed.expand(x.shape[0])
        return pipe.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, guidance=g, txt_ids=text_ids,
                                img_ids=image_ids, joint_attention_kwargs=jak, return_dict=False, **cond)[0]

    def pack(e, pooled):
        return {"encoder_hidden_states": e, "pooled_projections": pooled}

    return model, pack(pe, pp), pack(ne, npp) if do_cfg else None, latents, {"h": h, "w": w}


def _flux_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.flux import FluxPipelineOutput

    if a["output_type"] == "latent":
        image = latents
    else:
        latents = pipe._unpack_latents(latents, extra["h"], extra["w"], pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return FluxPipelineOutput(images=image) if a["return_dict"] else (image,)


def _wan_cfg(pipe, a: dict):
    """Wan: CFG where ``guidance_scale > 1`` (the stock ``do_classifier_free_guidance``); with a
    ``boundary_ratio`` (Wan 2.2's two experts) the call's scale is ``guidance_scale`` where the row's
    timestep is at or above the boundary and ``guidance_scale_2`` below it, as the stock loop picks
    its transformer and scale per call."""
    gs, gs2 = float(a["guidance_scale"]), a["guidance_scale_2"]
    ratio = pipe.config.boundary_ratio
    if ratio is None:
        return gs > 1.0, gs
    gs2 = gs if gs2 is None else float(gs2)
    boundary = ratio * pipe.scheduler.config.num_train_timesteps

    def per_row(plan):
        at = {(r.step, r.sigma): r.t for r in plan.rows}
        return lambda step, sigma: gs if at[step, sigma] >= boundary else gs2

    return gs > 1.0, per_row


def _wan_prepare(pipe, a: dict, do_cfg: bool):
    """WanPipeline's set-up, as its ``__call__`` does it; the model casts the (float32) latents to the
    transformer's dtype and calls, per row, the transformer the stock loop calls at that timestep
    (``transformer`` at or above Wan 2.2's boundary, ``transformer_2`` below), the CFG branches batched."""
    pipe.check_inputs(a["prompt"], a["negative_prompt"], a["height"], a["width"], a["prompt_embeds"],
                      a["negative_prompt_embeds"], a["callback_on_step_end_tensor_inputs"], a["guidance_scale_2"])
    frames, h, w = a["num_frames"], a["height"], a["width"]
    tf = pipe.vae_scale_factor_temporal
    if frames % tf != 1:
        frames = frames // tf * tf + 1
    frames = max(frames, 1)
    main = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    patch = main.config.patch_size
    hm, wm = pipe.vae_scale_factor_spatial * patch[1], pipe.vae_scale_factor_spatial * patch[2]
    h, w = h // hm * hm, w // wm * wm
    pipe._guidance_scale_2 = a["guidance_scale_2"] if pipe.config.boundary_ratio is None or \
        a["guidance_scale_2"] is not None else a["guidance_scale"]
    pipe._attention_kwargs = a["attention_kwargs"]
    device = pipe._execution_device
    batch = _batch(a)
    pe, ne = pipe.encode_prompt(prompt=a["prompt"], negative_prompt=a["negative_prompt"],
                                do_classifier_free_guidance=do_cfg, num_videos_per_prompt=a["num_videos_per_prompt"],
                                prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                                max_sequence_length=a["max_sequence_length"], device=device)
    tdt = main.dtype
    pe = pe.to(tdt)
    ne = ne.to(tdt) if ne is not None else None
    pipe.scheduler.set_timesteps(a["num_inference_steps"], device=device)
    latents = pipe.prepare_latents(batch * a["num_videos_per_prompt"], main.config.in_channels, h, w, frames,
                                   torch.float32, device, a["generator"], a["latents"])
    if pe.shape[0] == 1 and latents.shape[0] > 1:  # stock's attention broadcasts one embedding over the batch
        pe = pe.expand(latents.shape[0], *pe.shape[1:])
    if ne is not None and ne.shape[0] == 1 and latents.shape[0] > 1:
        ne = ne.expand(latents.shape[0], *ne.shape[1:])
    _check_batch("WanPipeline", latents.shape[0], prompt_embeds=pe, negative_prompt_embeds=ne)
    pipe.scheduler.set_begin_index(0)
    ratio = pipe.config.boundary_ratio
    boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
    expand = pipe.config.expand_timesteps
    extra = {"calls": 0}
    jak = a["attention_kwargs"]

    def model(x, t, encoder_hidden_states):
        row = extra["plan"].rows[extra["calls"] % len(extra["plan"].rows)]  # one call per row, in order
        extra["calls"] += 1
        current = pipe.transformer if boundary is None or row.t >= boundary else pipe.transformer_2
        ts = t
        if expand:  # Wan 2.2 TI2V: one timestep per latent token (all equal here: no conditioning frame)
            seq = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
            ts = t.reshape(-1, 1).to(torch.float32).expand(-1, seq)
        return current(hidden_states=x.to(tdt), timestep=ts, encoder_hidden_states=encoder_hidden_states,
                       attention_kwargs=jak, return_dict=False)[0]

    return model, {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne} if do_cfg else None, latents, extra


def _wan_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    if a["output_type"] == "latent":
        video = latents
    else:
        vae = pipe.vae
        latents = latents.to(dtype=vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                           latents.dtype)
        std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents.device,
                                                                                              latents.dtype)
        video = vae.decode(latents / std + mean, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return WanPipelineOutput(frames=video) if a["return_dict"] else (video,)


def _ltx_prepare(pipe, a: dict, do_cfg: bool):
    """LTXPipeline's set-up, as its ``__call__`` does it (float32 latents, dynamic shift ``mu`` from the
    video's token count); the model casts the latents to the embeddings' dtype and returns a float32
    prediction, the branches batched ``[negative; positive]`` as in the stock loop."""
    import numpy as np
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift, retrieve_timesteps

    pipe.check_inputs(prompt=a["prompt"], height=a["height"], width=a["width"],
                      callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
                      prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                      prompt_attention_mask=a["prompt_attention_mask"],
                      negative_prompt_attention_mask=a["negative_prompt_attention_mask"])
    pipe._attention_kwargs = a["attention_kwargs"]
    batch = _batch(a)
    device = pipe._execution_device
    pe, pm, ne, nm = pipe.encode_prompt(
        prompt=a["prompt"], negative_prompt=a["negative_prompt"], do_classifier_free_guidance=do_cfg,
        num_videos_per_prompt=a["num_videos_per_prompt"], prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], prompt_attention_mask=a["prompt_attention_mask"],
        negative_prompt_attention_mask=a["negative_prompt_attention_mask"],
        max_sequence_length=a["max_sequence_length"], device=device)
    frames, h, w = a["num_frames"], a["height"], a["width"]
    latents = pipe.prepare_latents(batch * a["num_videos_per_prompt"], pipe.transformer.config.in_channels, h, w,
                                   frames, torch.float32, device, a["generator"], a["latents"])
    _check_batch("LTXPipeline", latents.shape[0], prompt_embeds=pe, negative_prompt_embeds=ne if do_cfg else None)
    lf = (frames - 1) // pipe.vae_temporal_compression_ratio + 1
    lh, lw = h // pipe.vae_spatial_compression_ratio, w // pipe.vae_spatial_compression_ratio
    n = a["num_inference_steps"]
    cfg = pipe.scheduler.config
    mu = calculate_shift(lf * lh * lw, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    retrieve_timesteps(pipe.scheduler, n, device, a["timesteps"], sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    rope = (pipe.vae_temporal_compression_ratio / a["frame_rate"], pipe.vae_spatial_compression_ratio,
            pipe.vae_spatial_compression_ratio)
    jak = a["attention_kwargs"]

    def model(x, t, encoder_hidden_states, encoder_attention_mask):
        return pipe.transformer(hidden_states=x.to(encoder_hidden_states.dtype), encoder_hidden_states=encoder_hidden_states,
                                timestep=t, encoder_attention_mask=encoder_attention_mask, num_frames=lf, height=lh,
                                width=lw, rope_interpolation_scale=rope, attention_kwargs=jak,
                                return_dict=False)[0].float()

    def pack(e, m):
        return {"encoder_hidden_states": e, "encoder_attention_mask": m}

    return model, pack(pe, pm), pack(ne, nm) if do_cfg else None, latents, \
        {"frames": lf, "h": lh, "w": lw, "dtype": pe.dtype, "batch": batch, "device": device}


def _ltx_finish(pipe, latents, a: dict, extra: dict):
    """The stock decode, verbatim (its decode noise drawn from the call's generator after the loop,
    which the loop did not draw from, as the stock one does not)."""
    from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
    from diffusers.utils.torch_utils import randn_tensor

    if a["output_type"] == "latent":
        video = latents
    else:
        latents = pipe._unpack_latents(latents, extra["frames"], extra["h"], extra["w"],
                                       pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
        latents = pipe._denormalize_latents(latents, pipe.vae.latents_mean, pipe.vae.latents_std,
                                            pipe.vae.config.scaling_factor)
        latents = latents.to(extra["dtype"])
        timestep = None
        if pipe.vae.config.timestep_conditioning:
            batch, device = extra["batch"], extra["device"]
            noise = randn_tensor(latents.shape, generator=a["generator"], device=device, dtype=latents.dtype)
            dt = a["decode_timestep"]
            dt = dt if isinstance(dt, list) else [dt] * batch
            dn = a["decode_noise_scale"]
            dn = dt if dn is None else dn if isinstance(dn, list) else [dn] * batch
            timestep = torch.tensor(dt, device=device, dtype=latents.dtype)
            dn = torch.tensor(dn, device=device, dtype=latents.dtype)[:, None, None, None, None]
            latents = (1 - dn) * latents + dn * noise
        video = pipe.vae.decode(latents.to(pipe.vae.dtype), timestep, return_dict=False)[0]
        video = pipe.video_processor.postprocess_video(video, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return LTXPipelineOutput(frames=video) if a["return_dict"] else (video,)


_SDXL_EXTRA = {"prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
               "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
               "negative_crops_coords_top_left", "negative_target_size", "denoising_end"}
PIPELINES: dict[str, _PipeSpec] = {
    "StableDiffusionPipeline": _PipeSpec(
        _COMMON | {"timesteps", "sigmas", "eta", "cross_attention_kwargs", "guidance_rescale"}, _sd_prepare,
        _sd_finish),
    "StableDiffusionImg2ImgPipeline": _PipeSpec(
        (_COMMON - {"height", "width", "latents"}) | {"image", "strength", "timesteps", "sigmas", "eta",
                                                      "cross_attention_kwargs"},
        _sd_img2img_prepare, _sd_finish),
    "StableDiffusionInpaintPipeline": _PipeSpec(
        (_COMMON - {"latents"}) | {"image", "mask_image", "masked_image_latents", "padding_mask_crop", "strength",
                                   "timesteps", "sigmas", "eta", "cross_attention_kwargs", "latents"},
        _sd_inpaint_prepare, _sd_inpaint_finish),
    "StableDiffusionXLPipeline": _PipeSpec(
        _COMMON | _SDXL_EXTRA | {"timesteps", "sigmas", "eta", "cross_attention_kwargs", "guidance_rescale"},
        _sdxl_prepare, _sdxl_finish),
    "StableDiffusionXLImg2ImgPipeline": _PipeSpec(
        (_COMMON - {"height", "width"}) | (_SDXL_EXTRA - {"denoising_end"})
        | {"image", "strength", "timesteps", "sigmas", "eta", "cross_attention_kwargs", "guidance_rescale",
           "aesthetic_score", "negative_aesthetic_score"},
        _sdxl_img2img_prepare, _sdxl_finish),
    "StableDiffusionXLInpaintPipeline": _PipeSpec(
        (_COMMON - {"latents"}) | (_SDXL_EXTRA - {"denoising_end"})
        | {"image", "mask_image", "masked_image_latents", "padding_mask_crop", "strength", "timesteps", "sigmas",
           "eta", "cross_attention_kwargs", "guidance_rescale", "aesthetic_score", "negative_aesthetic_score",
           "latents"},
        _sdxl_inpaint_prepare, _sdxl_inpaint_finish),
    "StableDiffusion3Pipeline": _PipeSpec(
        _COMMON | {"prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "pooled_prompt_embeds",
                   "negative_pooled_prompt_embeds", "sigmas", "joint_attention_kwargs", "max_sequence_length", "mu"},
        _sd3_prepare, _sd3_finish, step_generator=False),
    "FluxPipeline": _PipeSpec(
        frozenset({"prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "true_cfg_scale", "height", "width",
                   "num_inference_steps", "sigmas", "guidance_scale", "num_images_per_prompt", "generator", "latents",
                   "prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                   "output_type", "return_dict", "joint_attention_kwargs", "callback_on_step_end",
                   "callback_on_step_end_tensor_inputs", "max_sequence_length"}),
        _flux_prepare, _flux_finish, step_generator=False, cfg=_flux_cfg),
    "WanPipeline": _PipeSpec(
        frozenset({"prompt", "negative_prompt", "height", "width", "num_frames", "num_inference_steps",
                   "guidance_scale", "guidance_scale_2", "num_videos_per_prompt", "generator", "latents",
                   "prompt_embeds", "negative_prompt_embeds", "output_type", "return_dict", "attention_kwargs",
                   "callback_on_step_end", "callback_on_step_end_tensor_inputs", "max_sequence_length"}),
        _wan_prepare, _wan_finish, step_generator=False, cfg=_wan_cfg),
    "LTXPipeline": _PipeSpec(
        frozenset({"prompt", "negative_prompt", "height", "width", "num_frames", "frame_rate", "num_inference_steps",
                   "timesteps", "guidance_scale", "guidance_rescale", "num_videos_per_prompt", "generator", "latents",
                   "prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds",
                   "negative_prompt_attention_mask", "decode_timestep", "decode_noise_scale", "output_type",
                   "return_dict", "attention_kwargs", "callback_on_step_end", "callback_on_step_end_tensor_inputs",
                   "max_sequence_length"}),
        _ltx_prepare, _ltx_finish, step_generator=False),
}
"""Pipelines :func:`accelerate` supports, by class name."""


def _accelerated_call(self, *args, **kwargs):
    """The accelerated ``__call__`` (see :func:`accelerate`)."""
    stock = self._fd_stock_pipeline
    spec = PIPELINES[stock.__name__]
    sig = inspect.signature(stock.__call__)
    bound = sig.bind(self, *args, **kwargs)
    given = dict(bound.arguments)
    bound.apply_defaults()
    a = dict(bound.arguments)
    for name, value in given.items():
        p = sig.parameters[name]
        if name == "self" or name in spec.supported:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            if value:
                raise TypeError(f"fastdiff.diffusers.accelerate: {stock.__name__}.__call__ arguments {sorted(value)} "
                                "are not supported by the accelerated loop; restore(pipe) to use them")
            continue
        if not _is_default(value, p.default):
            raise TypeError(f"fastdiff.diffusers.accelerate: {stock.__name__}.__call__ argument {name}={_short(value)} "
                            "is not supported by the accelerated loop; call fastdiff.diffusers.restore(pipe) to use it")
    with torch.no_grad():
        return _accelerated_run(self, spec, a)


def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except Exception:  # tensors and other objects without a plain truth value
        return False


def _accelerated_run(pipe, spec: _PipeSpec, a: dict):
    backend = pipe._fd_backend
    gs = float(a["guidance_scale"])
    pipe._guidance_scale = gs  # (the stock do_classifier_free_guidance reads it)
    pipe._guidance_rescale = float(a.get("guidance_rescale") or 0.0)
    pipe._clip_skip = a.get("clip_skip")
    pipe._cross_attention_kwargs = a.get("cross_attention_kwargs")
    pipe._joint_attention_kwargs = a.get("joint_attention_kwargs")
    pipe._interrupt = False
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None) or pipe.transformer_2
    if getattr(denoiser.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("fastdiff.diffusers.accelerate: a UNet with time_cond_proj_dim (guidance embedding, LCM) "
                         "is not supported")
    if spec.cfg is not None:
        do_cfg, gs = spec.cfg(pipe, a)
    else:
        do_cfg = pipe.do_classifier_free_guidance
    _check_scheduler(pipe.scheduler)  # before the pipeline touches it
    model, cond, uncond, latents, extra = spec.prepare(pipe, a, do_cfg)
    start = extra.get("start", 0)  # img2img: the schedule cut by strength
    if len(pipe.scheduler.timesteps) <= start:  # e.g. custom sigmas=[s]: the stock loop runs no step
        pipe._num_timesteps = 0
        return spec.finish(pipe, latents, a, extra)
    sched = from_diffusers(pipe.scheduler, backend=backend)  # after the pipeline's own set_timesteps
    step_args = {"eta": a["eta"]} if "eta" in a and "eta" in sched._fd_spec.step_options else {}
    plan = sched.fastdiff_plan(start, **step_args)
    if start and len(plan.rows) == len(sched.timesteps):  # rows that serve any start: the full plan, cut here
        meta = dict(plan.meta)
        if "refused" in meta:
            meta["refused"] = {k - start: v for k, v in meta["refused"].items() if k >= start}
        plan = dataclasses.replace(plan, rows=plan.rows[start:], meta=meta)
    if plan.meta.get("learned_variance") or sched.config.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"fastdiff.diffusers.accelerate: {type(sched).__name__}(variance_type="
                         f"{sched.config.get('variance_type')!r}) reads variance channels of the model output, which "
                         "the accelerated loop does not; use a fixed variance type or restore(pipe)")
    de = a.get("denoising_end")
    if de is not None and isinstance(de, float) and 0 < de < 1:  # the stock test and cut-off, verbatim
        n_train = pipe.scheduler.config.num_train_timesteps
        cut = int(round(n_train - (de * n_train)))
        keep = len([t for t in pipe.scheduler.timesteps if t >= cut])
        plan = dataclasses.replace(plan, rows=plan.rows[:keep])
    refused = sorted(k for k in plan.meta.get("refused", {}) if k < len(plan.rows))
    if refused:  # a step whose stock result is inf/NaN (fastdiff.diffusers.from_diffusers refuses it when run)
        raise ValueError(f"fastdiff.diffusers.accelerate: {plan.meta['refused'][refused[0]]}")
    hook = sched._fd_spec.before_step
    if hook is not None and hook(sched, plan.rows[0], 0, {"sample": latents, "model_output": latents}) is not None:
        # (the hook also runs the class's own checks of its state: FlowMatchLCM's scale factors)
        raise ValueError(f"fastdiff.diffusers.accelerate: {type(sched).__name__} draws its noise from its own state "
                         "(DPMSolverSDE: a Brownian tree), which the accelerated loop does not; use "
                         "fastdiff.diffusers.from_diffusers(pipe.scheduler) in the stock loop, or restore(pipe)")
    gen = a["generator"]
    noise_dtype = sched._fd_spec.noise_dtype
    g = gen if spec.step_generator else None  # (a loop that hands no generator to step: torch's global RNG)

    def noise_fn(i, x):  # exactly the stock step's randn_tensor call (the model output is cast to the latents)
        return draw_noise(tuple(x.shape), g, noise_dtype_for(noise_dtype, x.dtype, x.dtype), x.device)

    if callable(gs):  # a scale per row, decided from the plan (Wan 2.2's boundary between its experts)
        gs = gs(plan)
    guidance = Guidance(gs if do_cfg else None, None, pipe._guidance_rescale if do_cfg else 0.0)
    extra["plan"] = plan  # (a model that follows the rows, as Wan's choice of transformer does)
    progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe._num_timesteps = len(sched.timesteps) - start
    post_step = _step_end_hook(pipe, a, sched.timesteps[start:])
    before = extra.get("post_step")  # the pipeline's own work after each step (inpainting's known region)
    if before is not None:
        after = post_step

        def post_step(i: int, x: torch.Tensor) -> None:
            before(i, x)
            if after is not None:
                after(i, x)
    opts = LoopOptions(guidance=guidance, cond=cond, uncond=uncond, noise_fn=noise_fn, backend=backend,
                       progress=progress, check_finite=pipe._fd_check_finite, post_step=post_step)
    # a callback that sets pipe._interrupt ends the loop there (StopSampling): the latents so far come back
    latents = run_plan(plan, model, latents, opts, in_place=False, keep=True)  # (a repeated call reuses its rows)
    return spec.finish(pipe, latents, a, extra)


class _Interrupted(StopSampling):
    """Raised by the step-end hook when a callback sets ``pipe._interrupt``: the loop returns the
    latents after that step."""


def _step_end_hook(pipe, a: dict, timesteps) -> Callable | None:
    """The pipeline's ``callback_on_step_end(pipe, i, t, {"latents": ...})`` as a loop ``post_step``.

    As in the stock loop it runs after every scheduler step, gets the latents after that step and
    may return new ones (or change them in place); setting ``pipe._interrupt`` skips the remaining
    steps. Only ``"latents"`` can be a tensor input: the other inputs (prompt embeddings, ...) feed
    the batched model call, which the accelerated loop prepares once.
    """
    cb = a.get("callback_on_step_end")
    if cb is None:
        return None
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    names = list(cb.tensor_inputs if isinstance(cb, (PipelineCallback, MultiPipelineCallbacks))
                 else a.get("callback_on_step_end_tensor_inputs") or [])
    bad = [k for k in names if k != "latents"]
    if bad:
        raise TypeError(f"fastdiff.diffusers.accelerate: callback_on_step_end_tensor_inputs {bad} are not supported "
                        "by the accelerated loop (only 'latents'); call fastdiff.diffusers.restore(pipe) to use them")
    allowed = getattr(pipe, "_callback_tensor_inputs", ["latents"])

    def post_step(i: int, x: torch.Tensor) -> None:
        kwargs = {"latents": x.clone()} if "latents" in names else {}
        out = cb(pipe, i, timesteps[i], kwargs) or {}
        changed = sorted(k for k in out if k != "latents" and k in allowed and out[k] is not None)
        if changed:
            raise TypeError(f"fastdiff.diffusers.accelerate: callback_on_step_end returned {changed}; the accelerated "
                            "loop can only take new 'latents'")
        new = out.get("latents", kwargs.get("latents"))
        if new is not None:
            if tuple(new.shape) != tuple(x.shape):
                raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}, "
                                 f"expected {tuple(x.shape)}")
            x.copy_(new)
        if getattr(pipe, "_interrupt", False):
            raise _Interrupted
    return post_step


_ACCEL_CLASSES: dict[type, type] = {}


def accelerate(pipe: Any, backend: str = "auto", check_finite: bool = False):
    """Make ``pipe(...)`` run fastdiff's loop: one fused kernel per step with the CFG blend inside it.

    The pipeline's own components do the rest (prompt encoding, ``set_timesteps`` of its
    scheduler, latent preparation, decoding), so ``pipe(...)`` with the same arguments and
    generator gives the stock image (within float rounding). The loop performs no host-device
    synchronisation. The scheduler must be supported by :func:`from_diffusers` (checked now and at
    every call, so a scheduler swapped in later is picked up).

    ``__call__`` keeps its signature; arguments outside the common set (the deprecated ``callback``,
    IP-adapter images, skip-layer guidance, ...) raise ``TypeError`` naming them unless left at
    their defaults. ``callback_on_step_end`` runs after every step as in the stock loop, with
    ``"latents"`` as its only tensor input (new latents it returns feed the next step, and
    ``pipe._interrupt`` stops the loop); other tensor inputs raise ``TypeError``.
    Solver noise is drawn as the stock loop's ``scheduler.step`` draws it: from ``generator``, or from
    torch's global RNG without one (and where the stock loop hands the step no generator), so
    ``torch.manual_seed(...)`` gives the stock image too.

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``,
            ``FluxPipeline`` (true CFG with a negative prompt blended in the step, both branches in one
            batched transformer call; the guidance embedding and dynamic shifting as the stock call) or
            ``WanPipeline`` (Wan 2.2's two experts and scales switched at its boundary timestep),
            ``LTXPipeline``, ``StableDiffusionImg2ImgPipeline`` or ``StableDiffusionXLImg2ImgPipeline``
            (the run starts where ``strength`` cuts the schedule), or a modular pipeline.
        backend: fused-step backend (``auto``, ``reference``, ``cpu``, ``triton``, ``cuda``).
        check_finite: raise :class:`fastdiff.NonFiniteError` after the loop if the model returned
            NaN/Inf (one extra reduction per step; off by default, as in the stock loop).

    A diffusers modular pipeline (``*ModularPipeline``) keeps its own blocks: its ``scheduler``
    component becomes the drop-in (:func:`from_diffusers`) and its ``guider`` component blends in one
    fused step (:func:`fastdiff.diffusers.modular.fused_guider`); ``check_finite`` does not apply.

    Returns:
        ``pipe`` (changed in place: its class becomes an accelerated subclass, or, for a modular
        pipeline, its scheduler and guider components are replaced).
    """
    from .modular import accelerate_modular, is_modular

    if is_modular(pipe):  # its scheduler and guider components swapped for fused ones
        ops.requested_backend(backend)
        return accelerate_modular(pipe, backend)
    cls = getattr(type(pipe), "_fd_stock_pipeline", type(pipe))
    import diffusers

    if cls.__name__ not in PIPELINES or getattr(diffusers, cls.__name__, None) is not cls:
        raise TypeError(f"fastdiff.diffusers.accelerate does not support {cls.__module__}.{cls.__name__}; "
                        f"supported: {', '.join(PIPELINES)}")
    ops.requested_backend(backend)
    _check_scheduler(pipe.scheduler)  # fails now for an unsupported scheduler (and again at every call)
    if cls not in _ACCEL_CLASSES:
        call = functools.wraps(cls.__call__)(lambda self, *a, **k: _accelerated_call(self, *a, **k))
        ns = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__call__": call,
              "_fd_stock_pipeline": cls}
        _ACCEL_CLASSES[cls] = type(cls.__name__, (cls,), ns)
    pipe.__class__ = _ACCEL_CLASSES[cls]
    object.__setattr__(pipe, "_fd_backend", backend)
    object.__setattr__(pipe, "_fd_check_finite", bool(check_finite))
    return pipe


def restore(pipe: Any):
    """Undo :func:`accelerate`: ``pipe(...)`` runs the stock loop again. Returns ``pipe``."""
    from .modular import is_modular, restore_modular

    if is_modular(pipe):
        return restore_modular(pipe)
    stock = getattr(type(pipe), "_fd_stock_pipeline", None)
    if stock is None:
        raise ValueError(f"{type(pipe).__name__} was not accelerated by fastdiff.diffusers.accelerate")
    pipe.__class__ = stock
    for k in ("_fd_backend", "_fd_check_finite"):
        pipe.__dict__.pop(k, None)
    return pipe

