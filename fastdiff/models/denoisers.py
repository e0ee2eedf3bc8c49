"""Wrap any PyTorch denoiser into the loop's model form ``f(x, t[, cond]) -> Tensor``.

The loop calls ``f(model_input, t)`` (``t`` a ``[B]`` float32 tensor), ``f(model_input, t, cond)``
for a tensor condition, or ``f(model_input, t, **cond)`` for a dict of conditions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def unwrap_output(out) -> torch.Tensor:
    """The tensor inside a model output: itself, ``.sample`` (diffusers), or the first tuple entry."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample") and isinstance(out.sample, torch.Tensor):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, an object with .sample, or a tuple")


def as_model(model: Callable) -> Callable[..., torch.Tensor]:
    """Any callable ``model(x, t, ...)`` whose output is a tensor, a diffusers output or a tuple."""
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")

    def f(x: torch.Tensor, t: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return unwrap_output(model(x, t, *args, **kwargs))

    f.__wrapped__ = model
    return f


def from_diffusers(unet: Callable, timestep_dtype: torch.dtype | None = None) -> Callable[..., torch.Tensor]:
    """A diffusers model (UNet2DConditionModel, UNet2DModel, transformers): ``cond`` is
    ``encoder_hidden_states`` (a tensor) or a dict of keyword arguments (``encoder_hidden_states``,
    ``added_cond_kwargs``, ...). ``t`` is cast to ``timestep_dtype`` if given.
    """

    def f(x: torch.Tensor, t: torch.Tensor, cond=None, **kwargs) -> torch.Tensor:
        tt = t.to(timestep_dtype) if timestep_dtype is not None else t
        if cond is not None:
            kwargs["encoder_hidden_states"] = cond
        return unwrap_output(unet(x, tt, **kwargs))

    f.__wrapped__ = unet
    return f


def from_k_diffusion(denoiser: Callable) -> Callable[..., torch.Tensor]:
    """A k-diffusion-style denoiser ``D(x, sigma, **extra) -> x0`` (inputs in sigma space, unscaled).

    Use it with a k-style schedule (``t`` is sigma and the model input is ``x`` itself, as
    ``fastdiff.core.schedules``' Karras/EDM schedules emit) and ``prediction="x0"``. A tensor ``cond``
    is passed as ``cond=``, a dict as keyword arguments, as k-diffusion's ``extra_args`` are.
    """

    def f(x: torch.Tensor, sigma: torch.Tensor, cond=None, **kwargs) -> torch.Tensor:
        if cond is not None:
            kwargs["cond"] = cond
        return unwrap_output(denoiser(x, sigma, **kwargs))

    f.__wrapped__ = denoiser
    return f
