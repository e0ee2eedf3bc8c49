"""Tiny diffusers pipelines built offline from configs with random weights (no download).

Prompts are real strings: the tokenizer is a CLIP BPE over the 256 byte-level symbols
(:func:`fastdiff.bench.pipeline.tiny_tokenizer`). SD3's T5 encoder is left out (the pipeline
then uses zero T5 embeddings, as diffusers does when ``text_encoder_3`` is None).
"""

from __future__ import annotations

import torch

from fastdiff.bench.pipeline import SD_BETAS, tiny_clip, tiny_sd_pipeline, tiny_tokenizer, tiny_unet, tiny_vae

__all__ = ["SD_BETAS", "sd", "sdxl", "sd3"]


def sd(scheduler, seed: int = 0):
    """``StableDiffusionPipeline``: 8x8 latents, 16x16 images."""
    return tiny_sd_pipeline(scheduler, sample_size=8, seed=seed)


def sdxl(scheduler, seed: int = 0):
    """``StableDiffusionXLPipeline``: two CLIP encoders (32 + 32 -> cross-attention 64), text_time embedding."""
    import diffusers

    unet = tiny_unet(8, cross_attention_dim=64, seed=seed, addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(seed=seed), text_encoder=tiny_clip(seed=seed), text_encoder_2=tiny_clip(True, seed=seed + 1),
        tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3(scheduler, seed: int = 0):
    """``StableDiffusion3Pipeline``: one-layer SD3 transformer, two CLIP encoders, no T5."""
    import diffusers

    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    vae = tiny_vae(levels=2, seed=seed, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                   scaling_factor=1.5035)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=tiny_clip(True, seed=seed),
        tokenizer=tiny_tokenizer(), text_encoder_2=tiny_clip(True, seed=seed + 1), tokenizer_2=tiny_tokenizer(),
        text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------ transformer pipelines (scheduler drop-in tests)
# Text encoders are left out (None): the tests pass prompt embeddings directly, which every one of these
# pipelines accepts in place of a prompt. VAEs are built only where the pipeline encodes an image or
# reads the VAE's config for the latent shape.


def flux_vae(seed: int = 0):
    """Flux's ``AutoencoderKL`` at its tiniest: one level (no downscale), one latent channel."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035).eval()


def flux(scheduler, cls_name: str = "FluxPipeline", in_channels: int = 4, seed: int = 0, dtype=torch.float32):
    """A Flux-family pipeline (``FluxPipeline``, ``FluxImg2ImgPipeline``, ``FluxFillPipeline``: ``in_channels=12``,
    ``FluxKontextPipeline``): one double and one single transformer block, the one-level VAE of
    :func:`flux_vae` (so 8x8 pixels are 8x8 latents, 16 packed tokens); no text encoders (pass
    ``prompt_embeds`` 32 wide and ``pooled_prompt_embeds`` 32 wide)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8]).eval()
    pipe = getattr(diffusers, cls_name)(
        scheduler=scheduler, vae=flux_vae(seed), text_encoder=None, tokenizer=None, text_encoder_2=None,
        tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype)


WAN_Z = 4
"""Latent channels of the tiny Wan VAE (and of the tiny Wan transformers' latents)."""


def wan_transformer(in_channels: int = WAN_Z, seed: int = 0, **overrides):
    """A one-block ``WanTransformer3DModel`` (2 heads of 12, text 32 wide)."""
    import diffusers

    torch.manual_seed(seed)
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
               out_channels=WAN_Z, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    cfg.update(overrides)
    return diffusers.WanTransformer3DModel(**cfg).eval()


def wan_vae(seed: int = 0):
    """A tiny ``AutoencoderKLWan`` (8x spatial, 4x temporal compression as the real one; 4 latent channels)."""
    import diffusers

    torch.manual_seed(seed)
    return diffusers.AutoencoderKLWan(base_dim=3, z_dim=WAN_Z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                      temperal_downsample=[False, True, True], latents_mean=[0.0] * WAN_Z,
                                      latents_std=[1.0] * WAN_Z).eval()


def wan(scheduler, seed: int = 0):
    """``WanPipeline`` (text to video): no VAE (``output_type="latent"``; the pipeline then takes the real
    VAE's 8x spatial / 4x temporal factors), no text encoder (pass ``prompt_embeds`` 32 wide)."""
    import diffusers

    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                                 transformer=wan_transformer(seed=seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v(scheduler, seed: int = 0, vision_size: int = 16):
    """``WanImageToVideoPipeline`` as Wan 2.1 I2V: a tiny CLIP vision encoder (its penultimate hidden states are
    the transformer's image tokens) with a ``CLIPImageProcessor`` built from arguments, and the tiny Wan VAE
    (it encodes the conditioning video); the transformer takes latents, the 4-channel frame mask and the
    condition latents (``3 * WAN_Z`` channels)."""
    import diffusers
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                              num_hidden_layers=2, image_size=vision_size, patch_size=8,
                                              projection_dim=8)).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": vision_size},
                                   crop_size={"height": vision_size, "width": vision_size})
    tr = wan_transformer(in_channels=3 * WAN_Z, seed=seed, image_dim=8, added_kv_proj_dim=24)
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=wan_vae(seed), scheduler=scheduler,
                                             image_processor=processor, image_encoder=vision, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _bare(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ltx(scheduler, seed: int = 0):
    """``LTXPipeline``: one-block ``LTXVideoTransformer3DModel`` (8 latent channels, patch 1), no VAE (the
    pipeline takes the real VAE's 32x spatial / 8x temporal compression), no text encoder (``prompt_embeds``
    32 wide with ``prompt_attention_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                              num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                                              num_layers=1, caption_channels=32).eval()
    return _bare(diffusers.LTXPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                       transformer=tr))


def hunyuan_video(scheduler, seed: int = 0):
    """``HunyuanVideoPipeline``: one double, one single and one refiner block, no VAE (8x spatial, 4x temporal
    defaults), no text encoders (``prompt_embeds`` 16 wide, ``pooled_prompt_embeds`` 8, ``prompt_attention_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    return _bare(diffusers.HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=None,
                                                scheduler=scheduler, text_encoder_2=None, tokenizer_2=None))


def cogvideox(scheduler, seed: int = 0):
    """``CogVideoXPipeline`` (rotary positions, as CogVideoX-5b): one-block transformer, no VAE (8x spatial, 4x
    temporal defaults), no text encoder (``prompt_embeds`` 32 wide)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=32,
        num_layers=1, sample_width=4, sample_height=4, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8, use_rotary_positional_embeddings=True).eval()
    return _bare(diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                             scheduler=scheduler))


def qwen_image(scheduler, seed: int = 0):
    """``QwenImagePipeline``: one-block transformer, no VAE (8x), no text encoder (``prompt_embeds`` 16 wide with
    ``prompt_embeds_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                               attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                               axes_dims_rope=(4, 6, 6)).eval()
    return _bare(diffusers.QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                                             transformer=tr))


def pixart_sigma(scheduler, seed: int = 0):
    """``PixArtSigmaPipeline``: one-block ``PixArtTransformer2DModel`` (learned sigma: 8 output channels), no VAE
    (8x), no text encoder (``prompt_embeds`` 32 wide with ``prompt_attention_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=1, norm_num_groups=4, cross_attention_dim=16, sample_size=8,
                                            patch_size=2, caption_channels=32).eval()
    return _bare(diffusers.PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                               scheduler=scheduler))


def sana(scheduler, seed: int = 0):
    """``SanaPipeline``: one-block ``SanaTransformer2DModel``, no VAE (32x), no text encoder (``prompt_embeds``
    32 wide with ``prompt_attention_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                          num_layers=1, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                          cross_attention_dim=16, caption_channels=32, sample_size=8).eval()
    return _bare(diffusers.SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tr,
                                        scheduler=scheduler))


def sd_variant(cls_name: str, scheduler, seed: int = 0, unet_in_channels: int = 4):
    """A ``StableDiffusion*Pipeline`` (img2img, inpaint: ``unet_in_channels`` 4 (the legacy loop that re-noises
    the known region with ``scheduler.add_noise`` every step) or 9, ControlNet) over the components of
    :func:`sd`: 8x8 latents, 16x16 images. The ControlNet is as small as the UNet, its conditioning
    embedding downscaling 2x (16x16 control images)."""
    import diffusers

    base = sd(scheduler, seed)
    parts = dict(base.components)
    if unet_in_channels != 4:
        parts["unet"] = tiny_unet(8, seed=seed, in_channels=unet_in_channels)
    if cls_name == "StableDiffusionControlNetPipeline":
        torch.manual_seed(seed)
        parts["controlnet"] = diffusers.ControlNetModel(
            block_out_channels=(8, 16), layers_per_block=1, in_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=4, conditioning_embedding_out_channels=(4, 8)).eval()
    pipe = getattr(diffusers, cls_name)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_variant(cls_name: str, scheduler, seed: int = 0):
    """A ``StableDiffusionXL*Pipeline`` (img2img, inpaint with the 4-channel UNet) over the components of
    :func:`sdxl` (``requires_aesthetics_score=False``: the UNet's text_time embedding is SDXL base's)."""
    import diffusers

    parts = dict(sdxl(scheduler, seed).components)
    pipe = getattr(diffusers, cls_name)(**parts, requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
                                        add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def chroma(scheduler, seed: int = 0):
    """``ChromaPipeline``: one double and one single block (Flux-like, with Chroma's modulation approximator),
    the one-level VAE of :func:`flux_vae`, no text encoder (``prompt_embeds`` 32 wide with
    ``prompt_attention_mask``)."""
    import diffusers

    torch.manual_seed(seed)
    tr = diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1).eval()
    return _bare(diffusers.ChromaPipeline(scheduler=scheduler, vae=flux_vae(seed), text_encoder=None, tokenizer=None,
                                          transformer=tr))


__all__ += ["flux_vae", "flux", "WAN_Z", "wan_transformer", "wan_vae", "wan", "wan_i2v", "ltx", "hunyuan_video",
            "cogvideox", "qwen_image", "pixart_sigma", "sana", "sd_variant", "sdxl_variant", "chroma"]
