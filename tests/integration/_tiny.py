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
