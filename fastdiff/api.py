"""``fastdiff.sample`` and ``fastdiff.Sampler``: sample any PyTorch denoiser with a fused step per
model evaluation.

``Sampler`` is the prepared form: built once for a sampler, schedule, guidance setting, state
shape, dtype and device (plan, packed rows, persistent buffers, backend), then called with noise
as often as needed. ``sample`` keeps such prepared loops in a small cache keyed by everything but
the model, the noise and the per-call inputs, so repeated calls with one configuration pay the
preparation once (:data:`CACHE_SIZE` entries, least recently used dropped; :func:`clear_cache`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .runtime import ops
from .core import validate
from .models.denoisers import as_model
from .runtime.executor import Call, Executor
from .core.guidance import Guidance, Scale
from .core.plan import Plan
from .samplers.plans import make_plan, noised_state, plan_from_step, resolve_start, with_known_region
from .core.rng import expand_seeds

CACHE_SIZE = 8
"""Prepared loops ``fastdiff.sample`` keeps. Each holds its plan and a buffer set (state, history
ring, model input: ``2 + n_slots`` to ``3 + n_slots`` times the state's size) per caller running at
once, two of them kept between calls (``executor.MAX_IDLE_WORKSPACES``); a configuration with a
callable ``guidance_scale`` or a scheduler object as ``schedule`` is prepared on every call."""

_cache: OrderedDict = OrderedDict()
_plans: OrderedDict = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Drop every prepared loop ``fastdiff.sample`` keeps (and the buffers they hold), the plans of
    guided calls and their prepared runs (:mod:`fastdiff.guiders.loop`), and the executors the
    accelerated pipelines keep (:func:`fastdiff.runtime.loop.run_plan`)."""
    from .guiders import loop
    from .runtime.loop import clear_kept

    clear_kept()
    with _cache_lock:
        _cache.clear()
        _plans.clear()
    with loop._runs_lock:
        loop._runs.clear()


class _Uncacheable(Exception):
    pass


class _Identity:
    """Hashes and compares by the identity of the object it holds (and keeps it alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Identity) and other.obj is self.obj


_SCALARS = (type(None), bool, int, float, str, bytes, torch.dtype, torch.device)


def _freeze(v):
    """A hashable stand-in for an option value that compares equal exactly when the values do."""
    if type(v) in _SCALARS:
        return (type(v).__name__, v)
    if isinstance(v, Mapping) and all(type(e) in _SCALARS for e in v.values()):  # a config: flat, one pass
        return ("map", tuple(sorted((str(k), type(e).__name__, e) for k, e in v.items())))
    if type(v) in (tuple, list) and all(type(e) in _SCALARS for e in v):  # a shape, a scale list
        return ("seq", tuple((type(e).__name__, e) for e in v))
    if isinstance(v, Guidance):
        return ("guidance", _freeze(v.scale), _freeze(v.interval), _freeze(v.rescale))
    if isinstance(v, (list, tuple)):
        return ("seq", tuple(_freeze(e) for e in v))
    if isinstance(v, Mapping):  # dicts, diffusers' FrozenDict configs
        return ("map", tuple(sorted((str(k), _freeze(e)) for k, e in v.items())))
    if isinstance(v, np.ndarray):
        return ("nd", str(v.dtype), v.shape, v.tobytes())
    if isinstance(v, np.generic):
        return ("np", str(v.dtype), v.item())
    if isinstance(v, torch.Tensor):
        if v.device.type != "cpu" or v.numel() > 1 << 16:
            raise _Uncacheable
        return ("t", str(v.dtype), tuple(v.shape), v.detach().contiguous().numpy().tobytes()
                if v.dtype != torch.bfloat16 else v.float().numpy().tobytes())
    if isinstance(v, Plan):
        return ("plan", _Identity(v))  # by identity, kept alive by the key (hashing every row would cost)
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return ("dc", type(v).__qualname__, tuple((f.name, _freeze(getattr(v, f.name)))
                                                  for f in dataclasses.fields(v)))
    # anything else (a callable guidance scale, which may return other values on the next call; a
    # scheduler object; ...) is not keyed: that call prepares its loop afresh
    raise _Uncacheable


class _Prepared:
    """Everything of a configuration but the model: its plan(s) and executors (one per variant:
    plain, inpainting)."""

    def __init__(self, build: Callable[[], Plan], shape, dtype, device, guidance: Guidance, backend: str,
                 check_finite: bool, classifier_scale: float | None, cuda_graph: bool) -> None:
        self.plan = build()
        self.kw = dict(guidance=guidance, backend=backend, check_finite=check_finite,
                       classifier_scale=classifier_scale)
        self.shape, self.dtype, self.device = tuple(shape), dtype, torch.device(device)
        self.cuda_graph = cuda_graph
        self._executors: dict[bool, Executor] = {}
        self._lock = threading.Lock()

    def executor(self, masked: bool) -> Executor:
        ex = self._executors.get(masked)
        if ex is None:
            with self._lock:
                ex = self._executors.get(masked)
                if ex is None:
                    plan = self.plan
                    if masked:
                        plan = with_known_region(plan)
                    ex = Executor(plan, self.shape, self.dtype, self.device, masked=masked, **self.kw)
                    self._executors[masked] = ex
        return ex


def _plan_builder(sampler, steps, schedule, prediction, start, options) -> Callable[[], Plan]:
    if start is not None:
        return lambda: plan_from_step(sampler, steps, start, schedule, prediction, **options)
    return lambda: make_plan(sampler, steps, schedule, prediction, **options)


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
    guidance: Any = None,
    perturbed_model: Callable | None = None,
    **sampler_options,
) -> torch.Tensor:
    """Sample from ``model`` starting at unit-variance ``noise``; returns the final sample.

    Args:
        model: any callable ``model(x, t)`` / ``model(x, t, cond)`` / ``model(x, t, **cond)``
            returning a tensor shaped like ``x`` (or a diffusers output with ``.sample``, or a tuple).
            ``t`` is a ``[B]`` tensor of model times, float32 (float64 for a float64 ``noise``):
            diffusers timesteps for VP schedules, sigma for k-style schedules. See
            :mod:`fastdiff.models.denoisers` for diffusers and k-diffusion models.
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
            bit-identical on the reference, cpu and cuda backends and at any batch size (triton:
            to a few float32 ulps; see the README's Reproducibility).
        generator: a ``torch.Generator`` (or one per sample): noise drawn as diffusers draws it.
            Exclusive with ``seed``. With neither, seeds are drawn from torch's global RNG.
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda`` (``FASTDIFF_BACKEND``
            overrides ``auto``).
        callback: ``callback(step, sigma, x, x0)`` after every model evaluation, with that step's
            own state ``x`` (a copy: keeping it is safe, changing it changes nothing) and data
            estimate ``x0``. To change the state, use ``post_step``.
        progress: show a tqdm progress bar.
        check_finite: raise :class:`fastdiff.runtime.loop.NonFiniteError` naming the step if the model
            returns NaN/Inf (checked on the device; reported after the loop).
        cuda_graph: capture the whole loop (model included) as ONE CUDA graph and replay it: after
            an eager warm-up pass (lazy initialisation, Triton autotuning), every model call,
            guidance reduction and fused step of the run is recorded and launched at once. Needs
            CUDA tensors (conditioning, ``mask`` and ``known`` on the noise's device) and ``seed=``
            noise, no ``callback``/``progress``/``post_step``/classifier guidance, and must not be
            called inside another graph capture (``ValueError`` listing every cause); raises
            :class:`fastdiff.runtime.loop.GraphCaptureError` naming the first error when the model cannot
            be captured (host syncs such as ``.item()``). The graph is captured on the first call
            and replayed by later calls of the same configuration (see :class:`Sampler`).
        plan: a prebuilt :class:`~fastdiff.core.plan.Plan` (then ``sampler``, ``steps``, ``schedule``,
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
        guidance: a guider, blended inside the fused step: a :class:`fastdiff.guiders.Guider` (CFG,
            CFG-Zero*, APG, tangential, magnitude-aware, perturbed-branch, AutoGuidance) or a diffusers
            guider object (``diffusers.guiders``; its configuration is read by
            :func:`fastdiff.guiders.from_diffusers`). Windows count solver steps, as diffusers'
            ``set_state(step, num_inference_steps)``; every weight may be scheduled per step
            (:meth:`fastdiff.guiders.Guider.at`); ``guidance_interval`` limits it to a sigma interval
            and classifier guidance adds to it. Exclusive with ``guidance_scale`` and
            ``guidance_rescale`` (the guider has its own); with it, ``callback``, ``post_step``,
            ``mask``/``known``, ``image`` and ``cuda_graph`` are not taken (each is refused by name):
            rows run one by one (:mod:`fastdiff.guiders.loop`).
        perturbed_model: the perturbed (PAG, SEG, SLG) or weak (AutoGuidance) model, called like
            ``model`` with ``cond``, for guiders with a perturbed branch.
        **sampler_options: sampler-specific options (``eta``, ``s_noise``, ...).

    Returns:
        The final sample, shaped and typed like ``noise``.
    """
    from .samplers.cfgpp import GUIDED_LOOP

    via = "guidance="
    loop_only = sampler in GUIDED_LOOP if plan is None else (
        isinstance(plan, Plan) and any(r.write_u_slot is not None for r in plan.rows))
    if guidance is None and loop_only:  # CFG++ with history: the guided loop
        from .guiders import Guider

        name = sampler if plan is None else plan.sampler
        via = f"{name} (a CFG++ sampler that runs on the guided loop)"
        if guidance_rescale:
            raise ValueError(f"guidance_rescale does not combine with {via}")
        validate.check_guidance_scale(guidance_scale)
        guidance = Guider(scale=1.0 if guidance_scale is None else guidance_scale)
        guidance_scale = None
    if guidance is not None:
        return _sample_guided(model, noise, guidance, perturbed_model, sampler=sampler, steps=steps, schedule=schedule,
                              prediction=prediction, cond=cond, uncond=uncond, seed=seed, generator=generator,
                              backend=backend, progress=progress, check_finite=check_finite, plan=plan,
                              sampler_options=sampler_options, via=via,
                              interval=guidance_interval, classifier=classifier,
                              classifier_scale=classifier_scale, classifier_y=classifier_y,
                              refused={"guidance_scale": guidance_scale is not None,
                                       "guidance_rescale": guidance_rescale != 0.0, "callback": callback is not None,
                                       "post_step": post_step is not None,
                                       "mask": mask is not None, "known": known is not None,
                                       "image": image is not None, "strength": strength is not None,
                                       "start_step": start_step is not None, "cuda_graph": bool(cuda_graph)})
    if perturbed_model is not None:
        raise ValueError("perturbed_model is the perturbed branch of a guider: give guidance= too")
    seeds = validate.sample_args(noise, seed=seed, generator=generator, cond=cond, uncond=uncond, callback=callback,
                                 post_step=post_step, classifier=classifier, classifier_scale=classifier_scale,
                                 classifier_y=classifier_y, mask=mask, known=known, image=image, plan=plan,
                                 check_finite=check_finite)
    for name, v in (("progress", progress), ("check_finite", check_finite), ("cuda_graph", cuda_graph)):
        validate.flag(name, v)
    if plan is None:
        validate.plan_args(sampler, schedule)
    if image is None and (strength is not None or start_step is not None):
        raise ValueError("strength/start_step start part-way from an image: give image=")
    start = None
    if plan is None:
        validate.steps(steps)
        if image is not None:
            start = resolve_start(steps, strength, start_step)
    elif sampler_options:
        raise ValueError(f"sampler options {sorted(sampler_options)} are ignored when plan= is given")
    elif strength is not None or start_step is not None:
        raise ValueError("strength/start_step are ignored when plan= is given (build it with "
                         "fastdiff.tasks.plan_from_step)")
    if (mask is None) != (known is None):
        raise ValueError("mask and known go together (inpainting): give both or neither")
    if mask is not None:
        mask, known = _inpaint_tensors(mask, known, noise)
    guidance = Guidance(guidance_scale, guidance_interval, guidance_rescale)
    backend = ops.requested_backend(backend)
    cls_scale = float(classifier_scale) if classifier is not None else None
    config = (sampler, steps, schedule, prediction, sampler_options, start, plan, guidance, backend, bool(check_finite),
              bool(cuda_graph), cls_scale, tuple(noise.shape), noise.dtype, noise.device)
    prepared = _lookup(config, lambda: _Prepared(
        (lambda p=plan: p) if plan is not None else _plan_builder(sampler, steps, schedule, prediction, start,
                                                                 sampler_options),
        noise.shape, noise.dtype, noise.device, guidance, backend, check_finite, cls_scale, cuda_graph))
    return _call(prepared, as_model(model), noise, seeds=seeds, generator=generator, cond=cond, uncond=uncond,
                 callback=callback, progress=progress, classifier=classifier, classifier_y=classifier_y,
                 mask=mask, known=known, image=image, post_step=post_step)


def _sample_guided(model, noise, guidance, perturbed_model, *, sampler, steps, schedule, prediction, cond, uncond,
                   seed, generator, backend, progress, check_finite, plan, sampler_options, refused, interval,
                   classifier, classifier_scale, classifier_y, via="guidance=") -> torch.Tensor:
    """:func:`sample` with ``guidance=`` (a guider): checks, then :func:`fastdiff.guiders.loop.run_guided`."""
    from .guiders import Guider, from_diffusers
    from .guiders.loop import run_guided

    given = [k for k, v in refused.items() if v]
    if given:
        raise ValueError(f"{via} does not combine with {', '.join(given)}" + (
            " (give the guider's own settings, or use guidance_scale= without guidance=)" if via == "guidance=" else
            ""))
    guider = guidance if isinstance(guidance, Guider) else from_diffusers(guidance)
    if perturbed_model is not None and not callable(perturbed_model):
        raise TypeError(f"perturbed_model must be callable, got {type(perturbed_model).__name__}")
    seeds = validate.sample_args(noise, seed=seed, generator=generator, cond=cond, uncond=uncond, callback=None,
                                 post_step=None, classifier=classifier, classifier_scale=classifier_scale,
                                 classifier_y=classifier_y, mask=None, known=None, image=None, plan=plan,
                                 check_finite=check_finite)
    validate.check_guidance_interval(interval)
    validate.flag("progress", progress)
    validate.flag("check_finite", check_finite)
    if plan is None:
        validate.plan_args(sampler, schedule)
        validate.steps(steps)
        plan = _cached_plan(sampler, steps, schedule, prediction, sampler_options)
    elif sampler_options:
        raise ValueError(f"sampler options {sorted(sampler_options)} are ignored when plan= is given")
    b = noise.shape[0]
    if generator is None and seeds is None:
        seeds = expand_seeds([int(s) for s in torch.randint(0, 2**62, (b,), dtype=torch.int64)], b)
    with torch.no_grad():
        x = noise * plan.init_scale
        return run_guided(plan, as_model(model), x, guider, cond=cond, uncond=uncond,
                          perturbed_model=None if perturbed_model is None else as_model(perturbed_model),
                          seeds=seeds, generator=generator, backend=ops.requested_backend(backend),
                          check_finite=check_finite, progress=progress, interval=interval, classifier=classifier,
                          classifier_scale=float(classifier_scale), classifier_y=classifier_y)


def _cached_plan(sampler, steps, schedule, prediction, options) -> Plan:
    """The plan of a guided call, built once per configuration and kept as :func:`_lookup` keeps
    prepared loops."""
    return _lookup((sampler, steps, schedule, prediction, options),
                   _plan_builder(sampler, steps, schedule, prediction, None, options), _plans)


def _lookup(config: tuple, build: Callable[[], Any], cache: OrderedDict | None = None) -> Any:
    """The cached entry of ``config`` in ``cache`` (the prepared loops by default), built (and cached,
    if its options can be keyed) on a miss; the last ``CACHE_SIZE`` entries are kept."""
    from .runtime.kept import kept

    try:
        key = _freeze(config)
        hash(key)
    except Exception:  # noqa: BLE001 - an option that cannot be keyed (or whose attributes raise): no caching
        return build()
    return kept(_cache if cache is None else cache, _cache_lock, key, build, CACHE_SIZE)


def _call(prepared: _Prepared, model: Callable, noise: torch.Tensor, *, seeds, generator, cond, uncond, callback,
          progress, classifier, classifier_y, mask, known, image, post_step) -> torch.Tensor:
    ex = prepared.executor(mask is not None)
    ex.check_state(noise)
    b = noise.shape[0]
    if generator is None and seeds is None:  # neither: seeds from torch's global RNG
        seeds = expand_seeds([int(s) for s in torch.randint(0, 2**62, (b,), dtype=torch.int64)], b)
    call = Call(cond=cond, uncond=uncond, seeds=seeds, generator=generator, callback=callback, progress=progress,
                classifier=classifier, classifier_y=classifier_y, mask=mask, known=known, post_step=post_step)
    with torch.no_grad():
        if image is not None:
            x = noised_state(ex.plan, image, noise)
        else:
            x = noise * ex.plan.init_scale
    if prepared.cuda_graph:  # refuses what a graph cannot capture before any model call
        return ex.run_graphed(model, x, call)
    return ex.run(model, x, call)


class Sampler:
    """A prepared sampler: the plan, packed rows, persistent buffers and backend of one
    configuration, built once and called with noise as often as needed (what :func:`sample` keeps
    in its cache, with the model held here).

    Build-time arguments are :func:`sample`'s (``sampler``, ``steps``, ``schedule``, ``prediction``,
    guidance, ``backend``, ``check_finite``, ``cuda_graph``, ``plan``, ``classifier`` and
    ``classifier_scale``, ``strength``/``start_step`` for img2img, sampler options) plus the state's
    ``shape``, ``dtype`` and ``device``; call-time arguments are the noise and :func:`sample`'s
    per-call ones (``cond``, ``uncond``, ``seed``/``generator``, ``callback``, ``progress``, ``mask``
    and ``known``, ``image``, ``classifier_y``, ``post_step``). A call with noise of another shape,
    dtype or device raises, naming it. Every call returns a new tensor; concurrent calls from
    several threads are safe (each takes its own buffers). A callable ``guidance_scale`` is
    evaluated once, when the sampler is built.

    Example::

        s = fastdiff.Sampler(unet_fn, sampler="dpmpp_2m", steps=30, schedule=cfg, guidance_scale=7.5,
                             shape=(1, 4, 64, 64))
        for seed in range(100):
            img = s(torch.randn(1, 4, 64, 64), cond=emb, uncond=neg, seed=seed)
    """

    def __init__(self, model: Callable, *, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", sampler: str = "dpmpp_2m", steps: int = 30, schedule: Any = None,
                 prediction: str | None = None, guidance_scale: Scale = None,
                 guidance_interval: tuple[float, float] | None = None, guidance_rescale: float = 0.0,
                 backend: str = "auto", check_finite: bool = True, cuda_graph: bool = False, plan: Plan | None = None,
                 classifier: Callable | None = None, classifier_scale: float = 1.0, strength: float | None = None,
                 start_step: int | None = None, **sampler_options) -> None:
        self.model = as_model(model)
        validate.hook("classifier", classifier)
        self.classifier = classifier
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
            raise TypeError(f"shape must be a sequence of ints (B, ...), got {shape!r}")
        shape = tuple(validate.integer(f"shape[{i}]", s, lo=0) for i, s in enumerate(shape))
        if len(shape) < 1 or shape[0] < 1:
            raise ValueError(f"shape must be (B, ...) with B >= 1, got {shape}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        guidance = Guidance(guidance_scale, guidance_interval, guidance_rescale)  # (it checks its settings)
        for name, v in (("check_finite", check_finite), ("cuda_graph", cuda_graph)):
            validate.flag(name, v)
        if classifier is not None:
            validate.real("classifier_scale", classifier_scale, float32=True)
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a fastdiff.core.plan.Plan (fastdiff.make_plan builds one), got {plan!r}")
        start = None
        if plan is None:
            validate.steps(steps)
            if strength is not None or start_step is not None:
                start = resolve_start(steps, strength, start_step)
        elif sampler_options or strength is not None or start_step is not None:
            raise ValueError("plan= was given: sampler options, strength and start_step are not used with it")
        self.img2img = start is not None
        self.prepared = _Prepared(
            (lambda p=plan: p) if plan is not None else _plan_builder(sampler, steps, schedule, prediction, start,
                                                                     sampler_options),
            shape, dtype, device, guidance, ops.requested_backend(backend), check_finite,
            float(classifier_scale) if classifier is not None else None, cuda_graph)
        self.prepared.executor(False)  # prepared (and checked) now

    @property
    def plan(self) -> Plan:
        """The plan this sampler runs (without inpainting rows)."""
        return self.prepared.plan

    def __call__(self, noise: torch.Tensor, *, cond: torch.Tensor | dict | None = None,
                 uncond: torch.Tensor | dict | None = None, seed: int | Sequence[int] | None = None,
                 generator: torch.Generator | list | None = None, callback: Callable | None = None,
                 progress: bool = False, mask: torch.Tensor | None = None, known: torch.Tensor | None = None,
                 image: torch.Tensor | None = None, classifier_y: torch.Tensor | None = None,
                 post_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Sample from unit-variance ``noise`` (shaped, typed and placed as prepared); see :func:`sample`."""
        validate.flag("progress", progress)
        seeds = validate.sample_args(noise, seed=seed, generator=generator, cond=cond, uncond=uncond,
                                     callback=callback, post_step=post_step, classifier_y=classifier_y, mask=mask,
                                     known=known, image=image, check_finite=self.prepared.kw["check_finite"])
        if self.img2img != (image is not None):
            raise ValueError("this sampler was prepared with strength/start_step: give image=" if self.img2img
                             else "image= starts part-way: prepare the Sampler with strength= or start_step=")
        if (mask is None) != (known is None):
            raise ValueError("mask and known go together (inpainting): give both or neither")
        if mask is not None:
            mask, known = _inpaint_tensors(mask, known, noise)
        return _call(self.prepared, self.model, noise, seeds=seeds, generator=generator, cond=cond, uncond=uncond,
                     callback=callback, progress=progress, classifier=self.classifier, classifier_y=classifier_y,
                     mask=mask, known=known, image=image, post_step=post_step)


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
