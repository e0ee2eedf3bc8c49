"""Argument checks shared by the entry points (``fastdiff.sample``, ``fastdiff.Sampler``, the
executor's calls): each refuses a bad value by name, saying what was expected, before any work is
done. Nothing here is silently converted: a string is not a sequence of seeds, a bool is not a
number, a list is not a conditioning tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

FLOAT32_MAX = 3.4028234663852886e38
MAX_STEPS = 1_000_000
"""Most solver steps a plan may have (a larger count is a typo, not a schedule)."""
SEED_RANGE = (-(2**63), 2**64)
"""Seeds are 64-bit words: signed or unsigned, nothing wider (no silent wrap-around)."""


def _what(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}"
    r = repr(v)
    return f"{type(v).__name__} {r[:60] + '...' if len(r) > 60 else r}"


def _number(name: str, v, kind: type, what: str, dtype_ok):
    """``v`` itself if it is a ``kind`` number (a bool is not), or the value of a one-element tensor
    whose dtype passes ``dtype_ok`` (never a bool tensor); else a TypeError naming ``name``."""
    if isinstance(v, kind) and not isinstance(v, bool):
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool and dtype_ok(v.dtype):
        return v.item()
    raise TypeError(f"{name} must be {what}, got {_what(v)}")


def real(name: str, v, *, lo: float | None = None, hi: float | None = None, finite: bool = True,
         float32: bool = False) -> float:
    """``v`` as a float: a real number (not a bool, not a string), finite unless ``finite`` is false,
    within ``[lo, hi]``, and representable in float32 where ``float32`` (what kernels compute in)."""
    v = _number(name, v, numbers.Real, "a real number", lambda dt: not dt.is_complex)
    f = float(v)
    if math.isnan(f) or (finite and math.isinf(f)):
        raise ValueError(f"{name} must be a finite number, got {f}")
    if float32 and math.isfinite(f) and abs(f) > FLOAT32_MAX:
        raise ValueError(f"{name} = {f:g} is beyond float32's range (the step computes in float32)")
    if (lo is not None and f < lo) or (hi is not None and f > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {f}")
    return f


def integer(name: str, v, *, lo: int | None = None, hi: int | None = None) -> int:
    """``v`` as an int: an integral number (not a bool, not a float such as 1.5, not a string)."""
    v = _number(name, v, numbers.Integral, "an int", lambda dt: not dt.is_floating_point and not dt.is_complex)
    i = int(v)
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {i}")
    return i


def steps(v) -> int:
    """A solver step count: an int in ``[1, MAX_STEPS]``."""
    return integer("steps", v, lo=1, hi=MAX_STEPS)


def flag(name: str, v) -> bool:
    """A yes/no option: a bool (or numpy bool, or the ints 0 and 1); a string such as ``"no"`` is
    refused, not taken as true."""
    if isinstance(v, bool):
        return v
    if type(v).__name__ == "bool_" or (isinstance(v, numbers.Integral) and v in (0, 1)):
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {_what(v)}")


def plan_args(sampler, schedule) -> None:
    """``sampler`` is a name and ``schedule`` is something a plan can be built on: ``None``, a
    fastdiff schedule, a diffusers config (a mapping) or an object with a ``config`` mapping (a
    diffusers scheduler)."""
    from .schedules import is_schedule

    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a sampler name (a str, see fastdiff.samplers.available()), got {_what(sampler)}")
    if schedule is None or is_schedule(schedule) or isinstance(schedule, Mapping) \
            or isinstance(getattr(schedule, "config", None), Mapping):
        return
    raise TypeError(f"schedule must be a fastdiff schedule, a diffusers scheduler config (a dict) or a diffusers "
                    f"scheduler, got {_what(schedule)}")


def state(name: str, x) -> torch.Tensor:
    """A ``[B, ...]`` floating tensor with data (not a meta tensor), ``B >= 1``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_what(x)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must be [B, ...] with B >= 1, got shape {tuple(x.shape)}")
    if x.is_meta:
        raise ValueError(f"{name} is a meta tensor (shape only, no data); give a tensor on a real device")
    return x


def finite(name: str, t: torch.Tensor) -> None:
    """Raise naming ``name`` where ``t`` holds NaN or Inf (one pass: the CPU extension's for a
    contiguous CPU tensor, else torch's, with a host sync on a GPU)."""
    if not t.numel() or not t.is_floating_point():
        return
    from ..backends import cpu

    if cpu._C is not None and t.device.type == "cpu" and t.is_contiguous() and t.dtype in cpu.DTYPE_CODES:
        ok = cpu._C.all_finite(t.data_ptr(), t.numel(), cpu.DTYPE_CODES[t.dtype])
    else:
        ok = bool(torch.isfinite(t).all())
    if not ok:
        raise ValueError(f"{name} contains NaN or Inf")


def seeds(seed, batch: int) -> list[int]:
    """One 64-bit seed per sample from an int (``seed + b``) or one int per sample (a sequence or a
    1-D integer tensor); see :func:`fastdiff.core.rng.expand_seeds`. Strings, bools and floats are refused."""
    from .rng import expand_seeds

    if isinstance(seed, (str, bytes)):
        raise TypeError(f"seed must be an int or one int per sample, got {_what(seed)}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool or seed.dim() > 1:
            raise TypeError(f"seed must be an int or one int per sample, got {_what(seed)}")
        if seed.dim() == 1 and seed.shape[0] != batch:
            raise ValueError(f"seed has {seed.shape[0]} entries but the batch has {batch} samples")
        values = seed.reshape(-1).tolist()
        seed = values[0] if seed.dim() == 0 else values
    if isinstance(seed, Sequence):
        values = [integer(f"seed[{i}]", s, lo=SEED_RANGE[0], hi=SEED_RANGE[1] - 1) for i, s in enumerate(seed)]
        if len(values) != batch:
            raise ValueError(f"seed has {len(values)} entries but the batch has {batch} samples")
        return expand_seeds(values, batch)
    s = integer("seed", seed, lo=SEED_RANGE[0], hi=SEED_RANGE[1] - 1)
    if s + batch - 1 >= SEED_RANGE[1]:
        raise ValueError(f"seed {s} + {batch - 1} (one per sample) passes 2**64 - 1; give one seed per sample")
    return expand_seeds(s, batch)


def check_generator(gen, batch: int) -> None:
    """A ``torch.Generator`` or one per sample."""
    if gen is None or isinstance(gen, torch.Generator):
        return
    if isinstance(gen, (list, tuple)):
        bad = [i for i, g in enumerate(gen) if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"generator[{bad[0]}] must be a torch.Generator, got {_what(gen[bad[0]])}")
        if len(gen) != batch:
            raise ValueError(f"generator list has {len(gen)} entries but the batch has {batch} samples")
        return
    raise TypeError(f"generator must be a torch.Generator or a list of them (one per sample), got {_what(gen)}")


def conditioning(name: str, c, batch: int, *, expect: str | None = None, split_lists: str | None = None) -> None:
    """``None``, a ``[B, ...]`` tensor, or a mapping of keyword arguments whose tensors are ``[B, ...]``
    (other values, such as ints or nested mappings, are passed as they are).

    ``expect``: what a tensor's shape must be, as the message says it (default: ``[B, ...]`` with
    the noise's batch). ``split_lists``: when given, a list or tuple among a mapping's values is
    refused with this reason (``fastdiff.distributed`` splits tensors by sample, not lists)."""
    if c is None:
        return
    if isinstance(c, torch.Tensor):
        if c.dim() < 1 or c.shape[0] != batch:
            want = expect or f"be [B, ...] with B = {batch} (the noise's batch; nothing is broadcast)"
            raise ValueError(f"{name} must {want}, got shape {tuple(c.shape)}")
        if c.is_meta:
            raise ValueError(f"{name} is a meta tensor (shape only, no data)")
        return
    if isinstance(c, Mapping):
        for k, v in c.items():
            if not isinstance(k, str):
                raise TypeError(f"{name} keys are keyword arguments of the model and must be strings, got {k!r}")
            if isinstance(v, (torch.Tensor, Mapping)):
                conditioning(f"{name}[{k!r}]", v, batch, expect=expect, split_lists=split_lists)
            elif split_lists is not None and isinstance(v, (list, tuple)):
                raise TypeError(f"{name}[{k!r}] is a {type(v).__name__}: {split_lists.format(type(v).__name__)}")
        return
    raise TypeError(f"{name} must be a tensor [B, ...] or a dict of keyword arguments, got {_what(c)}")


def hook(name: str, fn) -> None:
    """``None`` or a callable."""
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable (or None), got {_what(fn)}")


def check_guidance_scale(v) -> None:
    """``None``, a number, one number per step (a sequence or 1-D tensor), or ``f(step, sigma)``;
    every number finite and within float32 (the kernels blend in float32)."""
    if v is None or callable(v):
        return
    if isinstance(v, (str, bytes)):
        raise TypeError(f"guidance_scale must be a number, one number per step, or f(step, sigma), got {_what(v)}")
    if isinstance(v, torch.Tensor) and v.dim() == 1:
        v = v.tolist()
    if isinstance(v, Sequence):
        for i, w in enumerate(v):
            real(f"guidance_scale[{i}]", w, float32=True)
        return
    real("guidance_scale", v, float32=True)


def check_guidance_interval(v) -> None:
    """``None`` or ``(sigma_lo, sigma_hi)``: two numbers (``inf`` allowed), ``lo <= hi``."""
    if v is None:
        return
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise TypeError(f"guidance_interval must be (sigma_lo, sigma_hi), got {_what(v)}")
    lo = real("guidance_interval[0]", v[0], finite=False)
    hi = real("guidance_interval[1]", v[1], finite=False)
    if not lo <= hi:
        raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with lo <= hi, got {tuple(v)!r}")


def sample_args(noise, *, seed=None, generator=None, cond=None, uncond=None, callback=None, post_step=None,
                classifier=None, classifier_scale=1.0, classifier_y=None, mask=None, known=None, image=None,
                plan=None, check_finite: bool = True) -> list[int] | None:
    """Every per-call argument of ``fastdiff.sample`` / a ``fastdiff.Sampler`` call, checked before any
    work (the guidance settings check themselves: :class:`fastdiff.core.guidance.Guidance`). Returns the
    seeds expanded per sample (``None`` with a generator, or with neither: then the caller draws them)."""
    from .plan import Plan

    state("noise", noise)
    b = noise.shape[0]
    if seed is not None and generator is not None:
        raise ValueError("give either seed (Philox noise) or generator (diffusers-style noise), not both")
    expanded = seeds(seed, b) if seed is not None else None
    check_generator(generator, b)
    conditioning("cond", cond, b)
    conditioning("uncond", uncond, b)
    for name, fn in (("callback", callback), ("post_step", post_step), ("classifier", classifier)):
        hook(name, fn)
    if classifier is not None:
        real("classifier_scale", classifier_scale, float32=True)
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a fastdiff.core.plan.Plan (fastdiff.make_plan builds one), got {_what(plan)}")
    for name, t in (("mask", mask), ("known", known), ("image", image), ("classifier_y", classifier_y)):
        if isinstance(t, torch.Tensor) and t.is_meta:
            raise ValueError(f"{name} is a meta tensor (shape only, no data); give a tensor on a real device")
    if check_finite:  # a NaN in an input is the input's fault, not the model's: say so before the loop
        finite("noise", noise)
        for name, t in (("mask", mask), ("known", known), ("image", image)):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                finite(name, t)
    return expanded


def guided_needs_cond(guided: bool, cond, uncond) -> None:
    """Guidance blends a conditional and an unconditional prediction: both are needed."""
    if not guided:
        return
    if uncond is None:
        raise ValueError("guidance_scale != 1 needs uncond (the unconditional conditioning)")
    if cond is None:
        raise ValueError("guidance_scale != 1 needs cond (the conditioning to guide towards) as well as uncond; "
                         "without it both halves would be the unconditional prediction and guidance would do nothing")


def check_classes(classifier_y: torch.Tensor, n_classes: int) -> None:
    """``classifier_y`` indexes the classifier's ``n_classes`` logits."""
    if classifier_y.numel() and (int(classifier_y.min()) < 0 or int(classifier_y.max()) >= n_classes):
        raise ValueError(f"classifier_y must be class indices in [0, {n_classes}) (the classifier returned "
                         f"{n_classes} logits), got values from {int(classifier_y.min())} to {int(classifier_y.max())}")


__all__ = ["real", "integer", "steps", "flag", "plan_args", "state", "finite", "seeds", "check_generator", "conditioning", "hook",
           "check_guidance_scale", "check_guidance_interval", "sample_args", "guided_needs_cond", "check_classes",
           "MAX_STEPS", "SEED_RANGE"]
