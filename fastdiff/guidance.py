"""Classifier-free guidance: scale schedules, guidance intervals, rescale and x0 thresholding.

Everything here is decided per plan row on the host before the loop starts (scales become one
``[rows, batch]`` device tensor), except the two per-sample reductions that must see the data:
the guidance-rescale std ratio and the dynamic-thresholding quantile. Those run on the device,
before the fused step, and hand it one scalar per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .plan import Plan

Scale = float | Sequence[float] | Callable[[int, float], float] | None


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance settings.

    Attributes:
        scale: a float; a sequence with one float per solver step; or ``f(step, sigma) -> float``.
            A scale of exactly 1 means no guidance at that step (the unconditional half is not run).
        interval: ``(sigma_lo, sigma_hi)``: guidance only where ``sigma_lo <= sigma <= sigma_hi``
            (Kynkäänniemi et al. 2024); elsewhere the scale is 1 and only the conditional half runs.
        rescale: diffusers' ``guidance_rescale`` φ in [0, 1] (Lin et al. 2023, std ratio per sample).
    """

    scale: Scale = None
    interval: tuple[float, float] | None = None
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.rescale) <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.rescale!r}")
        if self.interval is not None:
            lo, hi = self.interval
            if not lo <= hi:
                raise ValueError(f"guidance_interval must be (sigma_lo, sigma_hi) with lo <= hi, got {self.interval!r}")

    def scales(self, plan: Plan) -> list[float]:
        """Guidance scale for every row of ``plan`` (1.0 where guidance is off)."""
        out = []
        steps = plan.steps or (max(r.step for r in plan.rows) + 1 if plan.rows else 0)
        sc = self.scale
        if isinstance(sc, Sequence) and not isinstance(sc, (str, bytes)):
            if len(sc) != steps:
                raise ValueError(f"guidance_scale has {len(sc)} entries but the plan has {steps} steps")
        for r in plan.rows:
            if sc is None:
                w = 1.0
            elif callable(sc):
                w = float(sc(r.step, r.sigma))
            elif isinstance(sc, Sequence):
                w = float(sc[r.step])
            else:
                w = float(sc)
            if not math.isfinite(w):
                raise ValueError(f"guidance_scale at step {r.step} is {w}; it must be finite")
            if self.interval is not None and not (self.interval[0] <= r.sigma <= self.interval[1]):
                w = 1.0
            out.append(w)
        return out


def rescale_factor(m_u: torch.Tensor, m_c: torch.Tensor, w: torch.Tensor, phi: float) -> torch.Tensor:
    """Per-sample factor ``r`` so that ``r * (m_u + w (m_c - m_u))`` is diffusers' rescaled CFG.

    ``r = phi * std(m_c) / std(cfg) + (1 - phi)``, std over all but the batch dimension (float32);
    ``r = 1`` for a sample whose guided output is constant (``std(cfg) = 0``).
    """
    b = m_c.shape[0]
    # flattened per sample: a [B] state has no dims to reduce, and std(dim=()) would reduce the batch
    mu, mc = m_u.float().reshape(b, -1), m_c.float().reshape(b, -1)
    cfg = mu + w.reshape(-1, 1) * (mc - mu)
    std_c = mc.std(dim=1)
    std_g = cfg.std(dim=1)
    # a constant guided output (std 0) has no scale to match: leave it as it is (r = 1) instead of
    # diffusers' 0/0 = NaN, which would silently fill the sample with NaN
    ratio = torch.where(std_g > 0, std_c / std_g, torch.ones_like(std_g))
    return (phi * ratio + (1.0 - phi)).to(torch.float32)


def dynamic_threshold(d: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample bound ``s = clamp(quantile(|d|, ratio), 1, max_value)`` (Imagen; diffusers' rule)."""
    flat = d.reshape(d.shape[0], -1).float().abs()
    s = torch.quantile(flat, ratio, dim=1)
    return torch.clamp(s, min=1.0, max=max_value).to(torch.float32)
