"""A guider's blend as the fused step's operands: the per-sample coefficients ``a`` of a blend row
(:class:`fastdiff.core.args.StepArgs`), and :func:`guide`, one guided prediction computed by the
fused step (what a diffusers guider's ``forward`` returns)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.args import N_COEF, StepArgs
from ..core.plan import N_OPERANDS, OP_E
from .methods import COND, DERIVED, MOMENTUM, Guider, StepBlend
from .stats import Stats, device_constant, gram, ops_of


def plain_to_rows(p, slots):
    """Plain per-slot weights ``p`` (float64 ``[B, 4]``, a torch tensor or numpy array: ``pred =
    sum_k p_k M_k``) as the kernel's difference form (float64 ``[4, B]``, the same kind): ``b = sum of
    the weights of slots 0..2`` (on ``m``), ``a_1 = p_1``, ``a_2 = p_2`` (on ``m_c - m``, ``m_2 - m``),
    ``a_3 = p_3`` (on ``m_3``)."""
    ops = ops_of(p)
    present = ops.array([float(s is not None) for s in slots[:3]], p)
    rows = ops.copy(p.T)
    rows[0] = (p[:, :3] * present).sum(1)
    return rows


def _difference_form(p, slots) -> list[float]:
    """:func:`plain_to_rows` of weights that are the same for every sample (host floats)."""
    return [sum(v for v, s in zip(p[:3], slots[:3]) if s is not None), p[1], p[2], p[3]]


def coefficients(sb: StepBlend, slots: list[torch.Tensor | None], rescale: float = 0.0,
                 extension: bool = True) -> torch.Tensor:
    """The float32 blend coefficients ``a`` (``[4, B]``, or ``[8, B]`` with a momentum write) of the
    step blend ``sb`` for the branch tensors in its ``slots`` order; ``rescale`` is diffusers'
    ``guidance_rescale`` (the factor ``φ std(c) / std(pred) + 1 - φ`` per sample, 1 where
    ``std(pred) = 0``), folded into the weights of ``pred`` (not of the momentum write). The
    per-sample weights are computed in float64, in numpy where the CPU extension gives the
    statistics (as IEEE arithmetic: a division by zero is inf, not an error), else in torch on the
    branches' device."""
    ref = next(t for t in slots if t is not None)
    b, dev = ref.shape[0], ref.device
    const = getattr(sb.plain, "weights", None)
    if const is not None and not rescale:  # the same for every sample: computed on the host, one upload
        rows = _difference_form(const, sb.slots) + (_difference_form(sb.write, sb.slots) if sb.write else [])
        return device_constant([[float(v)] * b for v in rows], dev, torch.float32)  # (fills: no upload)
    stats = gram(slots, extension=extension) if sb.needs_stats or rescale > 0 else None
    if stats is not None and isinstance(stats.gram, torch.Tensor) and stats.gram.device != dev:
        stats = Stats(stats.gram.to(dev), stats.sums.to(dev), stats.n)
    with np.errstate(all="ignore"):
        p = sb.plain(stats, b, dev)
        if isinstance(p, torch.Tensor):
            p = p.to(torch.float64)
        ops = ops_of(p)
        if rescale > 0:
            unit = ops.zeros(b, p)
            unit[:, sb.slots.index(COND)] = 1.0
            std_c, std_p = stats.std(unit), stats.std(p)
            ratio = ops.where(std_p > 0, std_c / ops.where(std_p > 0, std_p, 1.0), 1.0)
            p = p * (rescale * ratio + (1.0 - rescale))[:, None]
        rows = plain_to_rows(p, sb.slots)
        if sb.write is not None:
            rows = ops.cat([rows, plain_to_rows(ops.zeros(b, p) + ops.array(sb.write, p), sb.slots)])
    if isinstance(rows, np.ndarray):
        return torch.from_numpy(rows.astype(np.float32)).to(dev)
    return rows.to(torch.float32).contiguous()


def identity_coef() -> tuple[float, ...]:
    """Packed coefficients of a row whose result is its guided output: ``x' = e`` (``d = e``)."""
    c = [0.0] * N_COEF
    c[1] = 1.0  # a_e: d = e
    c[2 + OP_E] = 1.0  # out = e
    assert N_OPERANDS + 2 <= N_COEF
    return tuple(c)


def guide(guider: Guider, step: int, steps: int | None, *, cond: torch.Tensor, uncond: torch.Tensor | None = None,
          perturbed: torch.Tensor | None = None, modality: torch.Tensor | None = None,
          momentum: torch.Tensor | None = None, sigma: float = math.nan, backend: str = "auto") -> torch.Tensor:
    """The guided prediction of ``guider`` at ``step`` of ``steps`` (diffusers' ``set_state(step,
    steps)`` then ``forward``), blended by ONE fused step.

    Args:
        cond, uncond, perturbed, modality: the branch predictions (``[B, ...]``, one shape and dtype);
            those the step does not use may be ``None``.
        momentum: the guider's momentum buffer (zeros before the first step) where it keeps one;
            updated in place by the same step.
        sigma: the step's noise level, for weights scheduled as ``f(step, sigma)`` (:meth:`Guider.at`).
        backend: the fused step's backend.
    Returns a new tensor: ``cond`` itself (a copy) where guidance is off at this step.
    """
    from ..runtime import ops

    guider = guider.at(step, sigma)  # scheduled weights: their value at this step
    rescale = guider.rescale
    sb = guider.blend(step, steps)
    if sb is None:
        return cond.clone()
    named = {"uncond": uncond, "cond": cond, "perturbed": perturbed, "modality": modality, MOMENTUM: momentum}
    for s in sb.slots:
        if s is not None and s != DERIVED and named[s] is None:
            raise ValueError(f"{type(guider).__name__} at step {step} needs the {s} branch, got None")
    for s in set(sb.slots) - {None, DERIVED}:  # what the blend (and a derived slot) reads
        t = named[s]
        if t is not None and (t.shape != cond.shape or t.dtype != cond.dtype or t.device != cond.device):
            raise ValueError(f"the {s} branch must have cond's shape {tuple(cond.shape)}, dtype {cond.dtype} and "
                             f"device {cond.device}, got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if sb.derive is not None:  # a slot derived from the branches (frequency-decoupled guidance, APG per dims)
        named[DERIVED] = sb.derive(named).to(cond.dtype).contiguous()
    slots = []
    for s in sb.slots:
        t = None if s is None else named[s]
        if t is not None and (t.shape != cond.shape or t.dtype != cond.dtype or t.device != cond.device):
            raise ValueError(f"the {s} branch must have cond's shape {tuple(cond.shape)}, dtype {cond.dtype} and "
                             f"device {cond.device}, got {tuple(t.shape)}, {t.dtype}, {t.device}")
        slots.append(t)
    a = coefficients(sb, slots, rescale)
    m = slots[0]
    out = torch.empty_like(cond)
    ops.step(StepArgs(x=m, out=out, m=m, m_c=slots[1], m_2=slots[2], m_3=slots[3], a=a,
                      m_w=momentum if sb.write is not None else None, coef=identity_coef()), backend=backend)
    return out
