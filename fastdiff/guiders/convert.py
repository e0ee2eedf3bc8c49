"""A diffusers guider (``diffusers.guiders``) read into the native guider that blends as it does."""

from __future__ import annotations

from typing import Any

from .frequency import FrequencyDecoupled
from .methods import APG, LTX2, APGMix, AutoGuidance, CFGZeroStar, Guider, MagnitudeAware, Perturbed, TangentialCFG


def _common(g: Any) -> dict:
    return dict(scale=float(g.guidance_scale), rescale=float(g.guidance_rescale), start=float(g._start),
                stop=float(g._stop), enabled=bool(g._enabled))


def _orig(g: Any) -> dict:
    return dict(original=bool(g.use_original_formulation))


def _apg(g: Any) -> APG:
    m = g.adaptive_projected_guidance_momentum
    return APG(**_common(g), **_orig(g), momentum=None if m is None else float(m),
               norm_threshold=float(g.adaptive_projected_guidance_rescale), eta=float(g.eta),
               norm_dim=g.adaptive_projected_guidance_norm_dim)


def _apg_mix(g: Any) -> APGMix:
    m = g.adaptive_projected_guidance_momentum
    return APGMix(**_common(g), **_orig(g), apg_scale=float(g.adaptive_projected_guidance_scale),
                  momentum=None if m is None else float(m), norm_threshold=float(g.adaptive_projected_guidance_rescale),
                  eta=float(g.eta), apg_start_step=int(g.adaptive_projected_guidance_start_step))


def _perturbed(scale: str, start: str, stop: str):
    def conv(g: Any) -> Perturbed:
        return Perturbed(**_common(g), **_orig(g), perturbed_scale=float(getattr(g, scale)),
                         perturbed_start=float(getattr(g, start)), perturbed_stop=float(getattr(g, stop)))
    return conv


_CONVERTERS = {
    "ClassifierFreeGuidance": lambda g: Guider(**_common(g), **_orig(g)),
    "ClassifierFreeZeroStarGuidance": lambda g: CFGZeroStar(**_common(g), **_orig(g),
                                                            zero_init_steps=int(g.zero_init_steps)),
    "TangentialClassifierFreeGuidance": lambda g: TangentialCFG(**_common(g), **_orig(g)),
    "MagnitudeAwareGuidance": lambda g: MagnitudeAware(**_common(g), **_orig(g), alpha=float(g.alpha)),
    "AdaptiveProjectedGuidance": _apg,
    "AdaptiveProjectedMixGuidance": _apg_mix,
    "PerturbedAttentionGuidance": _perturbed("skip_layer_guidance_scale", "skip_layer_guidance_start",
                                             "skip_layer_guidance_stop"),
    "SkipLayerGuidance": _perturbed("skip_layer_guidance_scale", "skip_layer_guidance_start",
                                    "skip_layer_guidance_stop"),
    "SmoothedEnergyGuidance": _perturbed("seg_guidance_scale", "seg_guidance_start", "seg_guidance_stop"),
    "AutoGuidance": lambda g: AutoGuidance(**_common(g), **_orig(g)),
    "FrequencyDecoupledGuidance": lambda g: FrequencyDecoupled(
        scales=tuple(float(v) for v in g.guidance_scales), rescales=tuple(float(v) for v in g.guidance_rescale),
        parallel_weights=tuple(float(v) for v in g.parallel_weights), starts=tuple(float(v) for v in g.guidance_start),
        stops=tuple(float(v) for v in g.guidance_stop), rescale_space=str(g.guidance_rescale_space),
        upcast=bool(g.upcast_to_double), original=bool(g.use_original_formulation), enabled=bool(g._enabled)),
    "LTX2Guidance": lambda g: LTX2(**_common(g), stg_scale=float(g.stg_scale), modality_scale=float(g.modality_scale)),
}
SUPPORTED = tuple(_CONVERTERS)
"""The diffusers guider classes :func:`from_diffusers` reads."""


def from_diffusers(guider: Any) -> Guider:
    """The native guider blending as the diffusers guider ``guider`` does, read from its current
    attributes (scales, window, momentum, eta, norm threshold, ``use_original_formulation``,
    ``guidance_rescale``, zero-init steps). The perturbed branch of PAG, SLG, SEG, AutoGuidance and
    LTX-2 is the model run under the guider's own hooks (``guider.prepare_models``); this reads only
    how the branches are blended. Raises ``TypeError`` for a class it does not know (naming it and
    the supported ones) and ``ValueError`` for an option the fused blend does not cover."""
    for cls in type(guider).__mro__:
        conv = _CONVERTERS.get(cls.__name__)
        if conv is not None and cls.__module__.startswith("diffusers"):
            return conv(guider)
    raise TypeError(f"{type(guider).__name__} is not a supported diffusers guider; supported: {', '.join(SUPPORTED)}")


def _hooks(guider: Any):
    """``(configs, apply)``: the diffusers guider's perturbation hook configurations and the function
    diffusers applies each with (``apply(denoiser, config, name)``)."""
    name = type(guider).__name__
    if name in ("SkipLayerGuidance", "PerturbedAttentionGuidance"):
        from diffusers.hooks.layer_skip import _apply_layer_skip_hook

        return guider.skip_layer_config, _apply_layer_skip_hook
    if name == "AutoGuidance":
        from diffusers.hooks.layer_skip import _apply_layer_skip_hook

        return guider.auto_guidance_config, _apply_layer_skip_hook
    if name == "SmoothedEnergyGuidance":
        from diffusers.hooks.smoothed_energy_guidance_utils import _apply_smoothed_energy_guidance_hook

        sigma = guider.seg_blur_sigma
        return guider.seg_guidance_config, lambda m, c, name: _apply_smoothed_energy_guidance_hook(m, c, sigma,
                                                                                                     name=name)
    raise TypeError(f"{name} has no perturbed branch; perturbed_model is for PerturbedAttentionGuidance, "
                    "SkipLayerGuidance, SmoothedEnergyGuidance and AutoGuidance")


def perturbed_model(guider: Any, denoiser: Any, model: Any = None):
    """The perturbed (PAG, SLG, SEG) or weak (AutoGuidance) branch of a diffusers guider, as a
    callable for :func:`fastdiff.sample`'s ``perturbed_model=``: ``model(*args, **kwargs)`` (default:
    ``denoiser`` itself) run with the guider's own hooks (its layer-skip or smoothed-energy
    configurations) applied to ``denoiser`` for the call and removed after it, as diffusers' guider
    applies them for its perturbed batch."""
    configs, apply = _hooks(guider)
    from diffusers.hooks import HookRegistry

    run = denoiser if model is None else model

    def perturbed(*args, **kwargs):
        names = []
        try:
            for i, config in enumerate(configs):
                apply(denoiser, config, name=f"fastdiff_perturbed_{i}")
                names.append(f"fastdiff_perturbed_{i}")
            return run(*args, **kwargs)
        finally:
            registry = HookRegistry.check_if_exists_or_initialize(denoiser)
            for n in names:
                registry.remove_hook(n, recurse=True)

    return perturbed
