"""Classifier-free guidance: scale schedules, guidance intervals, rescale and x0 thresholding.

Everything here is decided per plan row on the host before the loop starts (scales become one
``[rows, batch]`` device tensor), except the two per-sample reductions that must see the data:
the guidance-rescale std ratio and the dynamic-thresholding quantile. Those run on the device,
before the fused step, and hand it one scalar per sample: on CPU tensors as one pass of the
compiled extension (``_C.rescale``, ``_C.threshold``), elsewhere as torch operations.
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
        from . import validate

        validate.check_guidance_scale(self.scale)
        if isinstance(self.scale, torch.Tensor):  # one number, or one per step: as Python floats
            sc = self.scale.tolist()
            object.__setattr__(self, "scale", tuple(sc) if isinstance(sc, list) else sc)
        validate.check_guidance_interval(self.interval)
        validate.real("guidance_rescale", self.rescale, lo=0.0, hi=1.0)

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
                from . import validate

                w = validate.real(f"guidance_scale({r.step}, {r.sigma:g})", sc(r.step, r.sigma), float32=True)
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


def cfgpp_scale(row, coef, w: float) -> float:
    """The guidance scale that makes a CFG++ row (``row.out_u != 0``) an ordinary guided row.

    ``x' = C_x x + C_e e + out_u (d_u - d)`` with ``e = m + w (m_c - m)``, ``d = a_x x + a_e e`` and
    ``d_u - d = -a_e w (m_c - m)`` is ``C_x x + C_e (m + w' (m_c - m))`` with
    ``w' = w (1 - out_u a_e / C_e)``; ``C_e`` is the packed (folded) ``e`` coefficient of ``x'``
    (``coef``: :func:`fastdiff.core.args.pack_row`). Unguided (``w == 1``): ``d_u = d``, ``w`` itself.
    Raises ``ValueError`` where ``C_e == 0`` (no ``e`` term to carry the unconditional one)."""
    from .args import C_OUT
    from .plan import OP_E

    if not row.out_u or w == 1.0:
        return w
    c_e = coef[C_OUT + OP_E]
    if c_e == 0.0:
        raise ValueError(f"CFG++ row at step {row.step}: its update has no e term to fold the unconditional "
                         "estimate into")
    return w * (1.0 - row.out_u * row.a_e / c_e)


def _extension(*tensors: torch.Tensor | None):
    """The CPU backend module when its extension is built and every given tensor is a contiguous CPU
    tensor, else ``None`` (callers check the dtypes themselves)."""
    from ..backends import cpu

    if cpu._C is None:
        return None
    ts = [t for t in tensors if t is not None]
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in ts):
        return None
    return cpu


def _pointers(**named) -> list[int]:
    from .args import PTR_NAMES

    ptrs = [0] * len(PTR_NAMES)
    for k, t in named.items():
        if t is not None:
            ptrs[PTR_NAMES.index(k)] = t.data_ptr()
    return ptrs


def rescale_factor(m_u: torch.Tensor, m_c: torch.Tensor, w: torch.Tensor, phi: float,
                   extension: bool = True) -> torch.Tensor:
    """Per-sample factor ``r`` so that ``r * (m_u + w (m_c - m_u))`` is diffusers' rescaled CFG.

    ``r = phi * std(m_c) / std(cfg) + (1 - phi)``, std over all but the batch dimension (float32);
    ``r = 1`` for a sample whose guided output is constant (``std(cfg) = 0``). On CPU tensors the
    extension computes it in one pass (standard deviations accumulated in float64) unless
    ``extension`` is false (the reference backend's plain torch).
    """
    b = m_c.shape[0]
    ext = _extension(m_u, m_c, w) if extension else None
    if (ext is not None and m_u.shape == m_c.shape and m_u.dtype == m_c.dtype and m_u.dtype in ext.DTYPE_CODES
            and m_u.numel() and w.dtype == torch.float32 and w.shape == (b,)):
        r = torch.empty(b, dtype=torch.float32)
        n = m_u.numel()
        ext._C.rescale(_pointers(m=m_u, m_c=m_c, w=w, r=r), n, n // b, ext.DTYPE_CODES[m_u.dtype], float(phi))
        return r
    # flattened per sample: a [B] state has no dims to reduce, and std(dim=()) would reduce the batch
    mu, mc = m_u.float().reshape(b, -1), m_c.float().reshape(b, -1)
    cfg = mu + w.reshape(-1, 1) * (mc - mu)
    std_c = mc.std(dim=1)
    std_g = cfg.std(dim=1)
    # a constant guided output (std 0) has no scale to match: leave it as it is (r = 1) instead of
    # diffusers' 0/0 = NaN, which would silently fill the sample with NaN
    ratio = torch.where(std_g > 0, std_c / std_g, torch.ones_like(std_g))
    return (phi * ratio + (1.0 - phi)).to(torch.float32)


def threshold_bound(x: torch.Tensor, m: torch.Tensor, m_c: torch.Tensor | None, w: torch.Tensor | None,
                    r: torch.Tensor | None, coef, ratio: float, max_value: float,
                    g: torch.Tensor | None = None, extension: bool = True) -> torch.Tensor:
    """A row's dynamic-threshold bounds ``s`` (float32 ``[B]``): :func:`dynamic_threshold` of its
    data estimate ``d = a_x x + a_e e``, computed as the step computes it (``e`` guided, rescaled by
    ``r``, plus ``c_g g``; ``coef`` the packed row, :func:`fastdiff.core.args.pack_row`). On CPU tensors
    the extension computes ``d`` and selects the quantile in one pass, without sorting, unless
    ``extension`` is false (the reference backend's plain torch)."""
    from .args import C_AE, C_AX, C_G, compute_dtype

    b = x.shape[0]
    ext = _extension(x, m, m_c, w, r, g) if extension else None
    if ext is not None and x.dtype in ext.DTYPE_CODES and x.numel():
        s = torch.empty(b, dtype=torch.float32)
        n = x.numel()
        ext._C.threshold(_pointers(x=x, m=m, m_c=m_c, w=w, r=r, g=g, s=s), n, n // b, ext.DTYPE_CODES[x.dtype],
                         list(coef), float(ratio), float(max_value))
        return s
    dt = compute_dtype(x.dtype)
    e = guided_output(m, m_c, w, r, g, coef[C_G], dt)
    return dynamic_threshold(coef[C_AX] * x.to(dt) + coef[C_AE] * e, ratio, max_value)


def guided_output(m: torch.Tensor, m_c: torch.Tensor | None, w: torch.Tensor | None, r: torch.Tensor | None,
                  g: torch.Tensor | None, c_g: float, dt: torch.dtype) -> torch.Tensor:
    """The step's ``e`` in torch, in the compute dtype ``dt``: ``m`` blended with ``m_c`` by ``w``
    (per sample), times ``r``, plus ``c_g g`` (each where given), in the kernels' order."""
    col = (-1,) + (1,) * (m.dim() - 1)
    e = m.to(dt)
    if m_c is not None:
        e = e + w.to(dt).reshape(col) * (m_c.to(dt) - e)
    if r is not None:
        e = r.to(dt).reshape(col) * e
    if g is not None:
        e = e + c_g * g.to(dt)
    return e


def dynamic_threshold(d: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Per-sample bound ``s = clamp(quantile(|d|, ratio), 1, max_value)`` (Imagen; diffusers' rule)."""
    flat = d.reshape(d.shape[0], -1).float().abs()
    s = torch.quantile(flat, ratio, dim=1)
    return torch.clamp(s, min=1.0, max=max_value).to(torch.float32)
