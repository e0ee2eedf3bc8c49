"""Pipeline benchmark row: a tiny diffusers pipeline's denoising loop, stock vs ``fastdiff.diffusers.accelerate``.

The pipeline is built offline from configs with random weights (tiny CLIP text encoder and
byte-level tokenizer, tiny UNet, tiny VAE), so the benchmark needs no download. Each run calls
the pipeline with precomputed prompt embeddings and ``output_type="latent"``; the loop is timed
from the first UNet call to the end of the call (so prompt handling, ``set_timesteps`` and latent
preparation are left out). The model's own time is measured with forward hooks on the UNet; the
rest of the loop is the scheduler's share (CFG blend, scheduler step, loop overhead) — the part
fastdiff replaces.

The component builders here are also what the integration tests build their tiny pipelines from.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from .step import SD_SCHEDULE

# ------------------------------------------------------------------------------------- tiny parts

TEXT_LEN = 16
"""Token length of the tiny tokenizer and text encoders."""


def tiny_tokenizer(max_length: int = TEXT_LEN):
    """A CLIP tokenizer over the 256 byte-level symbols (no merges): real tokenization, no download."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in sorted(ByteLevel.alphabet()):
            vocab.setdefault(c + suffix, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_clip(projection: bool = False, hidden: int = 32, projection_dim: int = 32, seed: int = 0):
    """A 2-layer CLIP text encoder with random weights (``CLIPTextModelWithProjection`` if ``projection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=514, projection_dim=projection_dim,
                         max_position_embeddings=TEXT_LEN)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def tiny_vae(levels: int = 2, seed: int = 0, **overrides):
    """A tiny ``AutoencoderKL`` (``2 ** (levels - 1)`` spatial downscale, 4 latent channels)."""
    from diffusers import AutoencoderKL

    cfg = dict(block_out_channels=[8, 16, 16, 16][:levels], in_channels=3, out_channels=3, latent_channels=4,
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               norm_num_groups=4, layers_per_block=1)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return AutoencoderKL(**cfg).eval()


def tiny_unet(sample_size: int = 8, cross_attention_dim: int = 32, seed: int = 0, **overrides):
    """A tiny ``UNet2DConditionModel`` (two levels, one cross-attention block each way)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(block_out_channels=(8, 16), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
               attention_head_dim=4, norm_num_groups=4)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**cfg).eval()


SD_BETAS = SD_SCHEDULE
"""Stable Diffusion's noise schedule."""


def tiny_sd_pipeline(scheduler=None, sample_size: int = 8, seed: int = 0):
    """A ``StableDiffusionPipeline`` with random tiny components (latents ``sample_size``², images 2x that)."""
    import diffusers

    sched = scheduler or diffusers.DPMSolverMultistepScheduler(**SD_BETAS)
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(seed=seed), text_encoder=tiny_clip(seed=seed), tokenizer=tiny_tokenizer(),
        unet=tiny_unet(sample_size, seed=seed), scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------- benchmark


@dataclass
class PipelineRow:
    """One line of the pipeline benchmark: the same tiny pipeline, stock and accelerated.

    Times are per denoising step (µs), each the minimum over the timed calls: the whole step, the
    model's forward, and the rest (``*_sched_*``: CFG blend, scheduler step, loop overhead);
    ``*_sched_share`` is the rest over the whole step.
    """

    pipeline: str
    scheduler: str
    backend: str
    latent: tuple[int, ...]
    steps: int
    guidance_scale: float
    stock_us_per_step: float
    stock_model_us_per_step: float
    stock_sched_us_per_step: float
    stock_sched_share: float
    fused_us_per_step: float
    fused_model_us_per_step: float
    fused_sched_us_per_step: float
    fused_sched_share: float

    @property
    def sched_speedup(self) -> float:
        """How much faster the non-model part of a step is in the accelerated loop."""
        f = self.fused_sched_us_per_step
        return self.stock_sched_us_per_step / f if f > 0 else float("inf")


class _ModelClock:
    """Wall time spent inside a module's forward (hooks; synchronises CUDA at both ends)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.spent, self.first, self._t0 = 0.0, None, 0.0
        self.cuda = device.type == "cuda"
        self._hooks = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, *args) -> None:
        self._sync()
        self._t0 = time.perf_counter()
        if self.first is None:
            self.first = self._t0

    def _post(self, *args) -> None:
        self._sync()
        self.spent += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


def bench_pipeline(scheduler: str = "DPMSolverMultistepScheduler", steps: int = 20, latent: int = 32, batch: int = 1,
                   guidance_scale: float = 7.5, backend: str = "auto", repeats: int = 3,
                   device: str | torch.device = "cpu", pipe=None) -> PipelineRow:
    """Time a tiny ``StableDiffusionPipeline``'s denoising loop, stock and accelerated.

    Args:
        scheduler: a diffusers scheduler class name supported by :func:`fastdiff.diffusers.from_diffusers`
            (configured with Stable Diffusion's betas).
        steps: ``num_inference_steps``.
        latent: latent height and width (``batch x 4 x latent x latent``).
        batch: images per call.
        guidance_scale: > 1 runs the batched CFG ``[uncond; cond]`` forward.
        backend: fused-step backend of the accelerated run.
        repeats: timed calls per variant, alternating stock and accelerated, after one warm-up each.
        device: where the pipeline runs.
        pipe: a ready ``StableDiffusionPipeline`` to use instead of the tiny one.

    Returns:
        A :class:`PipelineRow`.
    """
    import diffusers

    from ..diffusers import accelerate, restore

    device = torch.device(device)
    if pipe is None:
        sched = getattr(diffusers, scheduler)(**SD_BETAS)
        pipe = tiny_sd_pipeline(sched, sample_size=latent).to(device)
    g = torch.Generator("cpu").manual_seed(0)
    dim = pipe.text_encoder.config.hidden_size
    pe = torch.randn(batch, TEXT_LEN, dim, generator=g).to(device)
    ne = torch.randn(batch, TEXT_LEN, dim, generator=g).to(device)
    lat = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    kw = dict(prompt_embeds=pe, negative_prompt_embeds=ne, latents=lat, num_inference_steps=steps,
              guidance_scale=guidance_scale, output_type="latent", generator=torch.Generator("cpu").manual_seed(1))
    best: dict[str, list[float]] = {"stock": [], "fused": []}  # [total, model, total - model], minima
    clock = _ModelClock(pipe.unet, device)
    try:
        # stock and accelerated calls alternate, so a change in machine load hits both alike
        for rep in range(repeats + 1):
            for mode in ("stock", "fused"):
                if mode == "fused":
                    accelerate(pipe, backend=backend)
                try:
                    clock.spent, clock.first = 0.0, None
                    kw["generator"] = torch.Generator("cpu").manual_seed(1)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    pipe(**kw)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    total = time.perf_counter() - clock.first  # from the first model call: the loop
                finally:
                    if mode == "fused":
                        restore(pipe)
                if rep == 0:
                    continue  # warm-up
                b = best[mode]
                best[mode] = [min(v, w) for v, w in zip(b, (total, clock.spent, total - clock.spent))] if b else \
                    [total, clock.spent, total - clock.spent]
    finally:
        clock.remove()
    per = 1e6 / steps
    (st, sm, ss), (ft, fm, fs) = best["stock"], best["fused"]
    return PipelineRow(type(pipe).__name__, type(pipe.scheduler).__name__, backend, (batch, 4, latent, latent), steps,
                       guidance_scale, st * per, sm * per, ss * per, ss / st, ft * per, fm * per, fs * per, fs / ft)


def format_row(r: PipelineRow) -> str:
    """Two table lines (stock, fastdiff) for one :class:`PipelineRow`."""
    head = f"{'pipeline loop':<30}{'µs/step':>11}{'model':>11}{'scheduler':>11}{'share':>8}"
    lines = [head, "-" * len(head)]
    for name, tot, mod, rest, share in (
            ("stock", r.stock_us_per_step, r.stock_model_us_per_step, r.stock_sched_us_per_step, r.stock_sched_share),
            (f"fastdiff ({r.backend})", r.fused_us_per_step, r.fused_model_us_per_step, r.fused_sched_us_per_step,
             r.fused_sched_share)):
        lines.append(f"{name:<30}{tot:>11.1f}{mod:>11.1f}{rest:>11.1f}{share:>8.1%}")
    lines.append(f"{r.pipeline} + {r.scheduler}, latent {r.latent}, {r.steps} steps, CFG {r.guidance_scale}: "
                 f"scheduler part {r.sched_speedup:.2f}x faster")
    return "\n".join(lines)


def as_dict(r: PipelineRow) -> dict:
    """JSON-ready dict of a row (with the speedup)."""
    return {**asdict(r), "sched_speedup": r.sched_speedup}
