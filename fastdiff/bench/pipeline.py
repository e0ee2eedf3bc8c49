"""Pipeline benchmark rows: tiny diffusers pipelines' denoising loops, stock vs ``fastdiff.diffusers.accelerate``.

Three pipelines (:data:`KINDS`), built offline from configs with random weights so the benchmark
needs no download: a ``StableDiffusionPipeline`` (tiny CLIP text encoder and byte-level tokenizer,
UNet, VAE), a Flux-like ``FluxPipeline`` (an image DiT: one double and one single block) and a
Wan-like ``WanPipeline`` (a video DiT: one block). Each run calls the pipeline with precomputed
prompt embeddings and ``output_type="latent"``; the loop is timed from the first model call to the
end of the call (so prompt handling, ``set_timesteps`` and latent preparation are left out). The
model's own time is measured with forward hooks on the UNet or transformer; the rest of the loop is
the scheduler's share (CFG blend, scheduler step, loop overhead) — the part fastdiff replaces.
:func:`time_calls` is also the clock of ``fastdiff profile --pipeline``.

The component builders here are also what the integration tests build their tiny pipelines from.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
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


FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)
"""FLUX.1's ``FlowMatchEulerDiscreteScheduler`` config (dynamic shift from the token count)."""
FLUX_TEXT_DIM = 32
"""Width of the tiny Flux transformer's text tokens and of its pooled text embedding."""


def tiny_flux_vae(seed: int = 0):
    """Flux's ``AutoencoderKL`` with one level (no downscale: pixel size = latent size), 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                         shift_factor=0.0609, scaling_factor=1.5035).eval()


def tiny_flux_transformer(seed: int = 0, **overrides):
    """A ``FluxTransformer2DModel`` with one double and one single block, 2 heads of 16 (rope axes 4 + 4 + 8),
    taking the 4 latent channels packed 2x2 (16 channels per token) and text :data:`FLUX_TEXT_DIM` wide."""
    from diffusers import FluxTransformer2DModel

    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
               num_attention_heads=2, joint_attention_dim=FLUX_TEXT_DIM, pooled_projection_dim=FLUX_TEXT_DIM,
               axes_dims_rope=(4, 4, 8))
    cfg.update(overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**cfg).eval()


def tiny_flux_pipeline(scheduler=None, latent: int = 32, seed: int = 0):
    """A ``FluxPipeline`` with random tiny components and no text encoders (pass ``prompt_embeds`` and
    ``pooled_prompt_embeds``, :data:`FLUX_TEXT_DIM` wide; true CFG: ``true_cfg_scale > 1`` with negative ones).

    Args:
        scheduler: default ``FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)``.
        latent: the default height and width (even), in pixels and latents alike (the VAE has one level):
            latents ``latent x latent`` with 4 channels, packed into ``(latent / 2)²`` tokens of 16.
        seed: seeds the random weights.
    """
    import diffusers

    sched = scheduler or diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    pipe = diffusers.FluxPipeline(scheduler=sched, vae=tiny_flux_vae(seed), text_encoder=None, tokenizer=None,
                                  text_encoder_2=None, tokenizer_2=None, transformer=tiny_flux_transformer(seed))
    pipe.default_sample_size = latent  # a call without height/width: latent x latent (vae_scale_factor 1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
"""Wan 2.1's ``UniPCMultistepScheduler`` config."""
WAN_TEXT_DIM = 32
"""Width of the tiny Wan transformer's text tokens."""


def tiny_wan_transformer(seed: int = 0, **overrides):
    """A one-block ``WanTransformer3DModel`` (patch 1x2x2, 2 heads of 12, 4 latent channels, text
    :data:`WAN_TEXT_DIM` wide)."""
    from diffusers import WanTransformer3DModel

    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
               text_dim=WAN_TEXT_DIM, freq_dim=32, ffn_dim=32, num_layers=1, rope_max_seq_len=1024)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**cfg).eval()


def tiny_wan_pipeline(scheduler=None, seed: int = 0):
    """A ``WanPipeline`` (text to video) with a tiny random transformer, no VAE and no text encoder: call it
    with ``output_type="latent"`` and ``prompt_embeds`` (and ``negative_prompt_embeds`` for CFG),
    :data:`WAN_TEXT_DIM` wide. Without a VAE the pipeline keeps the real one's 8x spatial and 4x temporal
    factors: ``height`` and ``width`` ``8 * L`` (``L`` even) and ``num_frames`` ``4 * (F - 1) + 1`` give
    latents ``4 x F x L x L``.

    Args:
        scheduler: default ``UniPCMultistepScheduler(**WAN_SCHEDULER)``.
        seed: seeds the random weights.
    """
    import diffusers

    sched = scheduler or diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=sched,
                                 transformer=tiny_wan_transformer(seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


KINDS = ("sd", "flux", "wan")
"""The tiny pipelines :func:`bench_pipeline` builds: ``sd`` (:func:`tiny_sd_pipeline`), ``flux``
(:func:`tiny_flux_pipeline`, an image DiT) and ``wan`` (:func:`tiny_wan_pipeline`, a video DiT)."""
_DEFAULT_SCHEDULER = {"sd": ("DPMSolverMultistepScheduler", SD_BETAS),
                      "flux": ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER),
                      "wan": ("UniPCMultistepScheduler", WAN_SCHEDULER)}


def tiny_scheduler(kind: str, name: str | None = None):
    """The scheduler of a tiny ``kind`` pipeline: its default class and config, or the class ``name``
    with the keys of that config its constructor takes (``sd``: Stable Diffusion's betas)."""
    import inspect

    import diffusers

    default, cfg = _DEFAULT_SCHEDULER[_check_kind(kind)]
    cls = getattr(diffusers, name or default, None)
    if not isinstance(cls, type) or not hasattr(cls, "step"):
        raise ValueError(f"scheduler {name!r} is not a diffusers scheduler class")
    # not from_config across classes: it carries keys such as Wan's prediction_type="flow_prediction"
    # into a class (FlowMatchEulerDiscreteScheduler) whose checks then refuse them
    takes = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in cfg.items() if k in takes})


def tiny_pipeline(kind: str, scheduler=None, latent: int = 8, seed: int = 0):
    """The tiny pipeline of ``kind`` (see :data:`KINDS`) with ``scheduler`` (default: :func:`tiny_scheduler`)."""
    scheduler = scheduler or tiny_scheduler(kind)
    if _check_kind(kind) == "sd":
        return tiny_sd_pipeline(scheduler, sample_size=latent, seed=seed)
    if kind == "flux":
        return tiny_flux_pipeline(scheduler, latent=latent, seed=seed)
    return tiny_wan_pipeline(scheduler, seed=seed)


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind


def call_kwargs(kind: str, pipe, latent: int = 8, frames: int = 2, batch: int = 1, steps: int = 20,
                guidance_scale: float = 7.5, text_len: int = TEXT_LEN, seed: int = 0) -> dict:
    """``pipe(**call_kwargs(...))`` arguments for a tiny ``kind`` pipeline: random prompt embeddings (no
    text encoder runs), CFG at ``guidance_scale`` (Flux: ``true_cfg_scale`` with negative embeddings),
    ``output_type="latent"`` and a seeded ``generator``.

    Args:
        kind: ``sd``, ``flux`` or ``wan``.
        pipe: the pipeline (the embeddings' widths are read from its text encoder or transformer).
        latent: latent height and width (``flux``, ``wan``: even).
        frames: latent frames (``wan``).
        batch: images or videos per call.
        steps: ``num_inference_steps``.
        guidance_scale: > 1 runs CFG (both branches per step).
        text_len: text tokens.
        seed: seeds the embeddings, the latents (``sd``: given as ``latents``) and the generator.
    """
    g = torch.Generator("cpu").manual_seed(seed)
    kw = dict(num_inference_steps=steps, output_type="latent")
    if _check_kind(kind) in ("flux", "wan") and (latent < 2 or latent % 2):
        raise ValueError(f"latent must be even and >= 2 for {kind}, got {latent}")
    if kind == "sd":
        dim = pipe.text_encoder.config.hidden_size
        kw.update(prompt_embeds=torch.randn(batch, text_len, dim, generator=g),
                  negative_prompt_embeds=torch.randn(batch, text_len, dim, generator=g),
                  latents=torch.randn(batch, pipe.unet.config.in_channels, latent, latent, generator=g),
                  guidance_scale=guidance_scale)
    elif kind == "flux":
        cfg = pipe.transformer.config
        scale = pipe.vae_scale_factor
        e = [torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
             torch.randn(batch, cfg.pooled_projection_dim, generator=g)]
        n = [torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
             torch.randn(batch, cfg.pooled_projection_dim, generator=g)]
        kw.update(prompt_embeds=e[0], pooled_prompt_embeds=e[1], negative_prompt_embeds=n[0],
                  negative_pooled_prompt_embeds=n[1], true_cfg_scale=guidance_scale, height=latent * scale,
                  width=latent * scale)
    else:
        dim = pipe.transformer.config.text_dim
        kw.update(prompt_embeds=torch.randn(batch, text_len, dim, generator=g),
                  negative_prompt_embeds=torch.randn(batch, text_len, dim, generator=g),
                  guidance_scale=guidance_scale, height=latent * pipe.vae_scale_factor_spatial,
                  width=latent * pipe.vae_scale_factor_spatial,
                  num_frames=pipe.vae_scale_factor_temporal * (frames - 1) + 1)
    kw["generator"] = torch.Generator("cpu").manual_seed(seed + 1)
    return kw


def tiny_case(kind: str = "sd", latent: int = 8, frames: int = 2, steps: int = 4, seed: int = 0):
    """``(pipe, call_kwargs)`` of a tiny ``kind`` pipeline: what ``fastdiff profile --pipeline`` takes."""
    pipe = tiny_pipeline(kind, latent=latent, seed=seed)
    return pipe, call_kwargs(kind, pipe, latent=latent, frames=frames, steps=steps, seed=seed)


def sd_case():
    """A tiny ``StableDiffusionPipeline`` call, 32x32 latents (``fastdiff profile --pipeline
    fastdiff.bench.pipeline:sd_case``)."""
    return tiny_case("sd", latent=32)


def flux_case():
    """A tiny ``FluxPipeline`` call with true CFG, 64x64 latents (1024 tokens)."""
    return tiny_case("flux", latent=64)


def wan_case():
    """A tiny ``WanPipeline`` call with CFG, latents 4x5x32x32 (17 frames of 256x256)."""
    return tiny_case("wan", latent=32, frames=5)


# ------------------------------------------------------------------------------------- benchmark


@dataclass
class PipelineRow:
    """One line of the pipeline benchmark: the same tiny pipeline, stock and accelerated.

    Times are per denoising step (µs), each the minimum over the timed calls: the whole step, the
    model's forward, and the rest (``*_sched_*``: CFG blend, scheduler step, loop overhead);
    ``*_sched_share`` is the rest over the whole step. ``latent`` is the shape of the latents the
    loop steps (the pipeline's ``output_type="latent"`` output: Flux's are packed, batch x tokens x
    16); ``model`` is the denoiser's class and ``kind`` the tiny pipeline (:data:`KINDS`).
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
    kind: str = "sd"
    model: str = ""

    @property
    def sched_speedup(self) -> float:
        """How much faster the non-model part of a step is in the accelerated loop."""
        f = self.fused_sched_us_per_step
        return self.stock_sched_us_per_step / f if f > 0 else float("inf")


def denoisers(pipe) -> list[torch.nn.Module]:
    """The modules whose forward is the model's time: ``unet``, ``transformer`` and ``transformer_2``
    (Wan 2.2's second expert) where the pipeline has them; ``ValueError`` if it has none."""
    mods = [m for m in (getattr(pipe, k, None) for k in ("unet", "transformer", "transformer_2"))
            if isinstance(m, torch.nn.Module)]
    if not mods:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer to time")
    return mods


class _ModelClock:
    """Wall-clock spans of the model's forward calls (hooks; synchronises CUDA at both ends)."""

    def __init__(self, modules: Sequence[torch.nn.Module], device: torch.device) -> None:
        self.spans: list[tuple[float, float]] = []
        self._t0 = 0.0
        self.cuda = device.type == "cuda"
        self._hooks = [h for m in modules for h in (m.register_forward_pre_hook(self._pre),
                                                     m.register_forward_hook(self._post))]

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _pre(self, *args) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _post(self, *args) -> None:
        self._sync()
        self.spans.append((self._t0, time.perf_counter()))

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()


@dataclass
class CallRecord:
    """One timed pipeline call (``time.perf_counter`` seconds): its start, the model's forward spans
    ``(start, end)`` in order, its end, the shape and dtype of what it returned (the latents), and
    the length of the scheduler's ``timesteps`` after the call (the loop's iterations)."""

    start: float
    spans: list[tuple[float, float]]
    end: float
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    timesteps: int = 0

    @property
    def loop_s(self) -> float:
        """The denoising loop: from the first model call to the end of the call."""
        return self.end - self.spans[0][0]

    @property
    def model_s(self) -> float:
        """Time inside the model's forward."""
        return sum(b - a for a, b in self.spans)

    @property
    def setup_s(self) -> float:
        """Before the first model call: prompt handling, ``set_timesteps``, latents (and fastdiff's plan)."""
        return self.spans[0][0] - self.start


def _num_timesteps(scheduler) -> int:
    ts = getattr(scheduler, "timesteps", None)
    return 0 if ts is None else len(ts)


def time_calls(pipe, kwargs: dict, backend: str = "auto", repeats: int = 3, warmup: int = 1,
               device: str | torch.device = "cpu") -> dict[str, list[CallRecord]]:
    """Call ``pipe(**kwargs)`` stock and under ``fastdiff.diffusers.accelerate``, timing every model call.

    Stock and accelerated calls alternate (``warmup`` untimed rounds, then ``repeats`` timed ones),
    so a change in machine load hits both alike. A ``generator`` in ``kwargs`` is rewound to its
    state at entry before every call, so every call draws the same latents and noise. The call is
    made with ``return_dict=False``; the pipeline is stock afterwards (and before: an accelerated
    one is restored first).

    Returns:
        ``{"stock": [CallRecord, ...], "fused": [...]}``, ``repeats`` records each.
    """
    from ..diffusers import accelerate, restore

    if getattr(type(pipe), "_fd_stock_pipeline", None) is not None:  # an accelerated pipe: "stock" must be stock
        restore(pipe)
    device = torch.device(device)
    kw = {**kwargs, "return_dict": False}
    gen = kw.get("generator")
    state = gen.get_state() if isinstance(gen, torch.Generator) else None
    clock = _ModelClock(denoisers(pipe), device)
    out: dict[str, list[CallRecord]] = {"stock": [], "fused": []}
    try:
        for rep in range(warmup + repeats):
            for mode in ("stock", "fused"):
                if mode == "fused":
                    accelerate(pipe, backend=backend)
                try:
                    if state is not None:
                        gen.set_state(state)
                    clock.spans = []
                    if clock.cuda:
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    res = pipe(**kw)
                    if clock.cuda:
                        torch.cuda.synchronize()
                    t1 = time.perf_counter()
                finally:
                    if mode == "fused":
                        restore(pipe)
                if not clock.spans:
                    raise ValueError(f"{type(pipe).__name__}({mode}) made no model call: nothing to time")
                if rep >= warmup:
                    lat = res[0] if isinstance(res, (tuple, list)) else res
                    is_t = isinstance(lat, torch.Tensor)
                    out[mode].append(CallRecord(t0, list(clock.spans), t1, tuple(lat.shape) if is_t else (),
                                                lat.dtype if is_t else None,
                                                _num_timesteps(pipe.scheduler)))
    finally:
        clock.remove()
    return out


def bench_pipeline(scheduler: str | None = None, steps: int = 20, latent: int = 32, batch: int = 1,
                   guidance_scale: float = 7.5, backend: str = "auto", repeats: int = 3,
                   device: str | torch.device = "cpu", pipe=None, *, kind: str = "sd", frames: int = 2) -> PipelineRow:
    """Time a tiny pipeline's denoising loop, stock and accelerated.

    The loop is timed from the first model call to the end of the call (prompt handling,
    ``set_timesteps`` and latent preparation left out); the model's share is its forward calls
    (:class:`_ModelClock` on the UNet or transformer), the rest is the scheduler's share.

    Args:
        scheduler: a diffusers scheduler class name supported by :func:`fastdiff.diffusers.from_diffusers`
            (``sd``: configured with Stable Diffusion's betas; ``flux``, ``wan``: from the default's
            config); ``None``: the kind's default (:func:`tiny_scheduler`).
        steps: ``num_inference_steps``.
        latent: latent height and width (``sd``: ``batch x 4 x latent x latent``; ``flux``: packed into
            ``(latent / 2)²`` tokens of 16; ``wan``: ``batch x 4 x frames x latent x latent``).
        batch: images (videos) per call.
        guidance_scale: > 1 runs CFG (``flux``: as ``true_cfg_scale``). The stock ``sd`` loop runs both
            branches in one batched forward, the stock ``flux`` and ``wan`` loops one forward per
            branch; fastdiff's loop always one batched forward.
        backend: fused-step backend of the accelerated run.
        repeats: timed calls per variant, alternating stock and accelerated, after one warm-up each.
        device: where the pipeline runs.
        pipe: a ready pipeline of ``kind`` to use instead of the tiny one.
        kind: ``sd``, ``flux`` or ``wan`` (:data:`KINDS`).
        frames: latent frames (``wan``).

    Returns:
        A :class:`PipelineRow`.
    """
    device = torch.device(device)
    if pipe is None:
        pipe = tiny_pipeline(kind, tiny_scheduler(kind, scheduler), latent=latent)
    pipe = pipe.to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in
          call_kwargs(kind, pipe, latent=latent, frames=frames, batch=batch, steps=steps,
                      guidance_scale=guidance_scale).items()}
    rec = time_calls(pipe, kw, backend=backend, repeats=repeats, warmup=1, device=device)
    per = 1e6 / steps
    best = {}
    for mode, calls in rec.items():  # each part at its minimum over the calls: one stall stays out of it
        best[mode] = [min(c.loop_s for c in calls), min(c.model_s for c in calls),
                      min(c.loop_s - c.model_s for c in calls)]
    (st, sm, ss), (ft, fm, fs) = best["stock"], best["fused"]
    return PipelineRow(type(pipe).__name__, type(pipe.scheduler).__name__, backend, rec["stock"][0].shape, steps,
                       guidance_scale, st * per, sm * per, ss * per, ss / st, ft * per, fm * per, fs * per, fs / ft,
                       kind, type(denoisers(pipe)[0]).__name__)


def format_row(r: PipelineRow) -> str:
    """Two table lines (stock, fastdiff) for one :class:`PipelineRow`, and a summary line."""
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
