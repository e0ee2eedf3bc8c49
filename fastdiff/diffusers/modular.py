"""diffusers' modular pipelines (``*ModularPipeline``) with fused components: their scheduler swapped for
the drop-in (:func:`fastdiff.diffusers.from_diffusers`) and their guider made to blend its branches in
one fused step (:func:`fused_guider`).

A modular pipeline's denoising blocks call ``components.guider(guider_state)`` (the guider's
``forward`` over the branch predictions) and then ``components.scheduler.step``; both stay where they
are, so every modular pipeline whose blocks use these two components takes them (SDXL, SD3, Flux,
Wan, Qwen-Image, LTX, ... in diffusers 0.42), with whatever blocks (text-to-image, img2img,
inpainting, ControlNet) it is assembled from. The guider's own ``prepare_inputs`` / ``prepare_models``
(which batches it asks for, and the perturbation hooks of PAG, SLG, SEG and AutoGuidance) are
untouched: only the blend is replaced.
"""

from __future__ import annotations

from typing import Any

_FUSED: dict[type, type] = {}

_PERTURBED_INPUT = {"PerturbedAttentionGuidance": "pred_cond_skip", "SkipLayerGuidance": "pred_cond_skip",
                    "SmoothedEnergyGuidance": "pred_cond_seg", "LTX2Guidance": "pred_cond_stg"}
"""The ``forward`` argument holding the perturbed branch, per diffusers guider class."""


def _stock_class(guider: Any) -> type:
    return getattr(type(guider), "_fd_stock_guider", type(guider))


def _fused_forward(self, pred_cond, pred_uncond=None, *more, **named):
    """The stock guider's ``forward``, its blend computed by one fused step
    (:func:`fastdiff.guiders.guide`) from the guider's current settings and state."""
    from diffusers.guiders.guider_utils import GuiderOutput

    from ..guiders import from_diffusers, guide

    stock = _stock_class(self)
    names = [n for n in getattr(stock, "_input_predictions", ())][2:]
    extra = dict(zip(names, more))
    extra.update(named)
    ours = from_diffusers(self)
    branches = {"cond": pred_cond, "uncond": pred_uncond}
    name = stock.__name__
    if name == "AutoGuidance":  # its second batch is the weak model's conditional prediction
        branches = {"cond": pred_cond, "perturbed": pred_uncond}
    elif name in _PERTURBED_INPUT:
        branches["perturbed"] = extra.get(_PERTURBED_INPUT[name])
        if name == "LTX2Guidance":
            branches["modality"] = extra.get("pred_cond_modality")
    step = getattr(self, "_step", 0) or 0
    steps = getattr(self, "_num_inference_steps", None)
    momentum = None
    if ours.uses_momentum:  # the momentum buffer, reset at the first step as the stock prepare_inputs resets it
        momentum = self.__dict__.get("_fd_momentum")
        if step == 0 or momentum is None or momentum.shape != pred_cond.shape or momentum.dtype != pred_cond.dtype \
                or momentum.device != pred_cond.device:
            import torch

            momentum = torch.zeros_like(pred_cond)
            self.__dict__["_fd_momentum"] = momentum
    pred = guide(ours, step, steps, momentum=momentum, backend=self.__dict__.get("_fd_backend", "auto"), **branches)
    if momentum is not None and getattr(self, "momentum_buffer", None) is not None:
        self.momentum_buffer.running_average = momentum  # the stock state, for whoever reads it
    return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)


def fused_guider(guider: Any, backend: str = "auto") -> Any:
    """Make a diffusers guider (``diffusers.guiders``) blend its branches in one fused step: its class
    becomes a subclass whose ``forward`` calls :func:`fastdiff.guiders.guide` with the guider's current
    settings (read at every call, so a changed scale is taken) and state (step, momentum); everything
    else is the stock guider's. Raises what :func:`fastdiff.guiders.from_diffusers` raises for a guider
    it does not cover, before changing anything. Returns ``guider`` (changed in place); undone by
    :func:`stock_guider`."""
    from ..guiders import from_diffusers
    from ..runtime import ops

    ops.requested_backend(backend)
    from_diffusers(guider)  # refuses an unsupported class or option now
    cls = _stock_class(guider)
    if cls not in _FUSED:
        _FUSED[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "_fd_stock_guider": cls,
                                                 "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    guider.__class__ = _FUSED[cls]
    guider.__dict__["_fd_backend"] = backend
    guider.__dict__.pop("_fd_momentum", None)
    return guider


def stock_guider(guider: Any) -> Any:
    """Undo :func:`fused_guider`. Returns ``guider``."""
    cls = getattr(type(guider), "_fd_stock_guider", None)
    if cls is None:
        raise ValueError(f"{type(guider).__name__} was not made fused by fastdiff.diffusers.fused_guider")
    guider.__class__ = cls
    for k in ("_fd_backend", "_fd_momentum"):
        guider.__dict__.pop(k, None)
    return guider


def is_modular(pipe: Any) -> bool:
    """Whether ``pipe`` is a diffusers modular pipeline."""
    try:
        from diffusers.modular_pipelines import ModularPipeline
    except ImportError:  # a diffusers without modular pipelines
        return False
    return isinstance(pipe, ModularPipeline)


def accelerate_modular(pipe: Any, backend: str = "auto") -> Any:
    """:func:`fastdiff.diffusers.accelerate` for a modular pipeline: its ``scheduler`` component becomes
    the drop-in and its ``guider`` component a :func:`fused_guider` (each where the pipeline has one;
    a pipeline with neither is refused). Both are checked before either is changed. Returns ``pipe``."""
    from .scheduler import _check_scheduler, from_diffusers

    sched = getattr(pipe, "scheduler", None)
    guider = getattr(pipe, "guider", None)
    if sched is None and guider is None:
        raise TypeError(f"fastdiff.diffusers.accelerate: {type(pipe).__name__} has no scheduler or guider component")
    if guider is not None:
        from ..guiders import from_diffusers as read_guider

        read_guider(guider)  # refuses before anything changes
    new = {}
    if sched is not None and not hasattr(type(sched), "_fd_spec"):
        _check_scheduler(sched)
        new["scheduler"] = from_diffusers(sched, backend=backend)
        pipe.__dict__["_fd_stock_scheduler"] = sched
    if guider is not None:
        fused_guider(guider, backend)
    if new:
        pipe.update_components(**new)
    return pipe


def restore_modular(pipe: Any) -> Any:
    """Undo :func:`accelerate_modular`: the stock scheduler back, the guider's own blend. Returns ``pipe``."""
    sched = pipe.__dict__.pop("_fd_stock_scheduler", None)
    guider = getattr(pipe, "guider", None)
    fused = guider is not None and hasattr(type(guider), "_fd_stock_guider")
    if sched is None and not fused:
        raise ValueError(f"{type(pipe).__name__} was not accelerated by fastdiff.diffusers.accelerate")
    if fused:
        stock_guider(guider)
    if sched is not None:
        pipe.update_components(scheduler=sched)
    return pipe
