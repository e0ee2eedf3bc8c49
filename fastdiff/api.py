"""``fastdiff.sample``: sample any PyTorch denoiser with a fused step per model evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import samplers
from .denoisers import as_model
from .guidance import Guidance, Scale
from .loop import LoopOptions, run_plan
from .plan import Plan, check_prediction
from .rng import expand_seeds


def make_plan(sampler: str, steps: int, schedule: Any = None, prediction: str | None = None, **options) -> Plan:
    """Build the plan ``fastdiff.sample`` would run (see :func:`fastdiff.samplers.build`)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if prediction is not None:
        prediction = check_prediction(prediction)
    return samplers.build(sampler, schedule, steps, prediction=prediction, **options)


def sample(
    model: Callable,
    noise: torch.Tensor,
    *,
    sampler: str = "dpmpp_2m",
    steps: int = 30,
    schedule: Any = None,
    prediction: str | None = None,
    guidance_scale: Scale = None,
    guidance_interval: tuple[float, float] | None = None,
    guidance_rescale: float = 0.0,
    cond: torch.Tensor | dict | None = None,
    uncond: torch.Tensor | dict | None = None,
    seed: int | Sequence[int] | None = None,
    generator: torch.Generator | list | None = None,
    backend: str = "auto",
    callback: Callable[[int, float, torch.Tensor, torch.Tensor], None] | None = None,
    progress: bool = False,
    check_finite: bool = True,
    cuda_graph: bool = False,
    plan: Plan | None = None,
    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    classifier_scale: float = 1.0,
    classifier_y: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    image: torch.Tensor | None = None,
    strength: float | None = None,
    start_step: int | None = None,
    post_step: Callable[[int, torch.Tensor], None] | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Sample from ``model`` starting at unit-variance ``noise``; returns the final sample.

    Args:
        model: any callable ``model(x, t)`` / ``model(x, t, cond)`` / ``model(x, t, **cond)``
            returning a tensor shaped like ``x`` (or a diffusers output with ``.sample``, or a tuple).
            ``t`` is a ``[B]`` tensor of model times, float32 (float64 for a float64 ``noise``):
            diffusers timesteps for VP schedules, sigma for k-style schedules. See
            :mod:`fastdiff.denoisers` for diffusers and k-diffusion models.
        noise: ``[B, ...]`` floating tensor of unit-variance noise; its dtype is the storage dtype
            of the state. The schedule's initial scale is applied here, ``noise`` is not modified.
        sampler: one of :func:`fastdiff.samplers.available`.
        steps: number of solver steps (>= 1).
        schedule: a fastdiff schedule, a diffusers scheduler config (dict or ``scheduler.config``),
            or ``None`` for the sampler's default.
        prediction: ``eps``, ``v``, ``x0`` (diffusers' ``sample``) or ``flow``; defaults to the
            config's ``prediction_type``, else ``eps`` (``flow`` for flow samplers).
        guidance_scale: classifier-free guidance scale: a float, one float per step, or
            ``f(step, sigma) -> float``. ``None`` or 1 disables guidance. The unconditional and
            conditional halves run in ONE batched model call ``[uncond; cond]``.
        guidance_interval: ``(sigma_lo, sigma_hi)``: guide only inside; outside, the scale is 1
            and the unconditional half is not evaluated.
        guidance_rescale: diffusers' ``guidance_rescale`` (0 = off).
        cond, uncond: conditioning for the model (tensor or dict of tensors), batch ``B`` each.
        seed: int (sample ``b`` gets ``seed + b``) or one int per sample: in-kernel Philox noise,
            identical across devices, backends and batch sizes.
        generator: a ``torch.Generator`` (or one per sample): noise drawn as diffusers draws it.
            Exclusive with ``seed``. With neither, seeds are drawn from torch's global RNG.
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda`` (``FASTDIFF_BACKEND``
            overrides ``auto``).
        callback: ``callback(step, sigma, x, x0)`` after every model evaluation.
        progress: show a tqdm progress bar.
        check_finite: raise :class:`fastdiff.loop.NonFiniteError` naming the step if the model
            returns NaN/Inf (checked on the device; reported after the loop).
        cuda_graph: capture the whole loop (model included) as ONE CUDA graph and replay it: after
            an eager warm-up pass (lazy initialisation, Triton autotuning), every model call,
            guidance reduction and fused step of the run is recorded and launched at once. Needs
            CUDA tensors (conditioning, ``mask`` and ``known`` on the noise's device) and ``seed=``
            noise, no ``callback``/``progress``/``post_step``/classifier guidance, and must not be
            called inside another graph capture (``ValueError`` listing every cause); raises
            :class:`fastdiff.loop.GraphCaptureError` naming the first error when the model cannot
            be captured (host syncs such as ``.item()``). Costs one extra (eager) pass and one
            capture per call: the graph is not kept between calls.
        plan: a prebuilt :class:`~fastdiff.plan.Plan` (then ``sampler``, ``steps``, ``schedule``,
            ``prediction`` and sampler options are not used).
        classifier: classifier guidance (Dhariwal & Nichol 2021): a differentiable noise-conditional
            classifier ``classifier(u, t) -> logits [B, classes]`` on the model input ``u``. The
            gradient of ``log p(y | u)`` enters the fused step as one more term of the row. Combines
            with classifier-free guidance when both are given.
        classifier_scale: the classifier guidance scale (inverse temperature).
        classifier_y: int64 ``[B]`` target classes for the classifier.
        mask, known: inpainting: ``mask`` is 1 where the sample is generated and 0 where ``known``
            (a clean image shaped like ``noise``) is kept; the known region is re-noised to the
            current noise level every step inside the fused kernel and is exact at the end. ``mask``
            may have size-1 dimensions (``[B, 1, H, W]``), which are expanded explicitly; its batch
            must match.
        image, strength, start_step: img2img / SDEdit (:mod:`fastdiff.tasks`): start from the clean
            ``image`` (shaped like ``noise``) noised with ``noise`` to the level of the first step
            run, ``(alpha_t * image + sigma_t * noise) / in_scale``. ``strength`` in (0, 1] starts
            at diffusers' ``t_start = steps - int(steps * strength)``, ``start_step`` at that step,
            neither at step 0. Multistep samplers restart their history there, as in diffusers.
            With ``plan=``, the plan's first row sets the level (see
            :func:`fastdiff.tasks.plan_from_step`).
        post_step: ``post_step(i, x)`` after every row's fused step, changing the state ``x`` in
            place (e.g. :func:`fastdiff.tasks.ilvr`).
        **sampler_options: sampler-specific options (``eta``, ``s_noise``, ...).

    Returns:
        The final sample, shaped and typed like ``noise``.
    """
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must have a floating dtype, got {noise.dtype}")
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must be [B, ...] with B >= 1, got shape {tuple(noise.shape)}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed (Philox noise) or generator (diffusers-style noise), not both")
    if image is None and (strength is not None or start_step is not None):
        raise ValueError("strength/start_step start part-way from an image: give image=")
    if plan is None:
        if image is not None:
            from .tasks import plan_from_step, resolve_start

            plan = plan_from_step(sampler, steps, resolve_start(steps, strength, start_step), schedule, prediction,
                                  **sampler_options)
        else:
            plan = make_plan(sampler, steps, schedule, prediction, **sampler_options)
    elif sampler_options:
        raise ValueError(f"sampler options {sorted(sampler_options)} are ignored when plan= is given")
    elif strength is not None or start_step is not None:
        raise ValueError("strength/start_step are ignored when plan= is given (build it with "
                         "fastdiff.tasks.plan_from_step)")
    b = noise.shape[0]
    if (mask is None) != (known is None):
        raise ValueError("mask and known go together (inpainting): give both or neither")
    if mask is not None:
        from .tasks import with_known_region

        mask, known = _inpaint_tensors(mask, known, noise)
        plan = with_known_region(plan)
    seeds = None
    if generator is None:
        if seed is None:
            seed = [int(s) for s in torch.randint(0, 2**62, (b,), dtype=torch.int64)]
        seeds = expand_seeds(seed, b)
    opts = LoopOptions(
        guidance=Guidance(guidance_scale, guidance_interval, guidance_rescale),
        cond=cond, uncond=uncond, seeds=seeds, generator=generator, backend=backend,
        callback=callback, progress=progress, check_finite=check_finite, cuda_graph=cuda_graph,
        classifier=classifier, classifier_scale=classifier_scale, classifier_y=classifier_y,
        mask=mask, known=known, post_step=post_step,
    )
    if image is not None:
        from .tasks import noised_state

        x = noised_state(plan, image, noise)
    else:
        x = noise * plan.init_scale
    return run_plan(plan, as_model(model), x, opts)


def _inpaint_tensors(mask: torch.Tensor, known: torch.Tensor, noise: torch.Tensor):
    if not isinstance(known, torch.Tensor) or known.shape != noise.shape:
        raise ValueError(f"known must have the noise's shape {tuple(noise.shape)}, got "
                         f"{tuple(known.shape) if isinstance(known, torch.Tensor) else type(known).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != noise.dim() or mask.shape[0] != noise.shape[0] or any(
            m not in (1, n) for m, n in zip(mask.shape, noise.shape)):
        raise ValueError(f"mask must have shape {tuple(noise.shape)} or that with size-1 dimensions, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    mask = mask.to(noise.dtype).expand_as(noise).contiguous()
    return mask, known.to(dtype=noise.dtype, device=noise.device).contiguous()
