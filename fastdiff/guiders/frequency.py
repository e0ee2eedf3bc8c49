"""Frequency-decoupled guidance (Sadat et al. 2025), diffusers' ``FrequencyDecoupledGuidance``: CFG
applied per level of a Laplacian pyramid of the predictions, each level with its own scale, window,
parallel-component weight and rescale, then the pyramid collapsed back.

The pyramid (kornia's ``build_laplacian_pyramid`` and ``pyrup``, which diffusers calls, written here
in torch ops: a 5x5 binomial blur with reflect borders, bilinear resampling) is built outside the
fused step, but only below full resolution where it can be: the pyramid is linear, so with level 0
(full resolution) an ordinary CFG level the guided prediction is

    pred = base + w_0 (c - u) + Q,    Q = pyrup(R_1 - G_1(base) - w_0 (G_1(c) - G_1(u)))

(``G_1`` the first Gaussian level, ``R_1`` the guided pyramid collapsed from level 1): the step blends
``u``, ``c`` and the correction ``Q`` (a derived slot, :data:`FDG`), and the full-resolution work
outside is one blur-and-downsample of each branch and one upsample-and-blur. Data-space guidance
rescale folds into the blend (its standard deviations come from the step's Gram pass). Where level 0
projects its shift (a parallel weight other than 1) or rescales in frequency space, the whole
prediction is computed outside and the step takes it as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .methods import COND, DERIVED, UNCOND, Guider, StepBlend, _window, constant

FDG = DERIVED
"""The derived slot of frequency-decoupled guidance: the pyramid's correction ``Q`` (or the whole
prediction), computed from the branches after the model calls, before the step."""

_KERNEL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_kernels: dict = {}


def _blur(x: torch.Tensor) -> torch.Tensor:
    """kornia's ``filter2d`` with its pyramid kernel: reflect-padded 5x5 binomial correlation per channel."""
    c = x.shape[1]
    k = _kernels.get((x.device, x.dtype))
    if k is None:  # made once per device and dtype (an upload every call would wait for a GPU's stream)
        k = _kernels[x.device, x.dtype] = (_KERNEL[:, None] * _KERNEL[None, :] / 256.0).to(device=x.device,
                                                                                             dtype=x.dtype)
    return F.conv2d(F.pad(x, [2, 2, 2, 2], mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def pyrdown(x: torch.Tensor) -> torch.Tensor:
    """Blur, then bilinear downsampling to ``floor(side / 2)`` (kornia's ``pyrdown``)."""
    h, w = x.shape[-2:]
    return F.interpolate(_blur(x), size=[int(float(h) / 2.0), int(float(w) / 2.0)], mode="bilinear",
                         align_corners=False)


def pyrup(x: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling to twice the size, then blur (kornia's ``pyrup``)."""
    h, w = x.shape[-2:]
    return _blur(F.interpolate(x, size=(h * 2, w * 2), mode="bilinear", align_corners=False))


def gaussian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``[x, pyrdown(x), ...]``, ``levels`` entries."""
    out = [x]
    for _ in range(levels - 1):
        out.append(pyrdown(out[-1]))
    return out


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """kornia's ``build_laplacian_pyramid`` for sizes it does not pad: level ``i`` is Gaussian level ``i``
    minus ``pyrup`` of level ``i + 1``, the last the last Gaussian level."""
    g = gaussian_pyramid(x, levels)
    return [g[i] - pyrup(g[i + 1]) for i in range(levels - 1)] + [g[-1]]


def collapse(pyramid: list[torch.Tensor]) -> torch.Tensor:
    """diffusers' ``build_image_from_pyramid``: ``pyrup`` and add, from the coarsest level."""
    img = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        img = pyrup(img) + level
    return img


def check_shape(shape, levels: int) -> None:
    """Refuse a state the pyramid cannot take as diffusers (kornia) takes it: not ``[B, C, H, W]``, a size
    kornia would pad (its output would be the padded size: diffusers' pipelines would fail on it), or a
    level too small for the blur's reflect border."""
    if len(shape) != 4:
        raise ValueError(f"frequency-decoupled guidance takes [B, C, H, W] predictions, got shape {tuple(shape)}")
    h, w = int(shape[2]), int(shape[3])

    def pow2(v):
        return v > 0 and not v & (v - 1)

    stride = 1 << (levels - 1)
    if not (pow2(h) or pow2(w)) or (levels > 1 and (h % stride or w % stride)):
        raise ValueError(f"frequency-decoupled guidance with {levels} levels: height and width {h}x{w} must be "
                         f"multiples of {stride}, one of them a power of two (kornia pads other sizes, and "
                         "diffusers' guider then returns a prediction of the padded size)")
    if min(h, w) >> (levels - 1) < 3:
        raise ValueError(f"frequency-decoupled guidance: {levels} levels of {h}x{w} leave a level under 3 pixels "
                         "(its blur's reflect border needs 3)")


def _project(v0: torch.Tensor, v1: torch.Tensor, upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``project``: the components of ``v0`` parallel and orthogonal to ``v1``, per sample."""
    dims = list(range(1, v0.dim()))
    dt = v0.dtype
    if upcast:
        v0, v1 = v0.double(), v1.double()
    v1 = F.normalize(v1, dim=dims)
    par = (v0 * v1).sum(dim=dims, keepdim=True) * v1
    orth = v0 - par
    return (par.to(dt), orth.to(dt)) if upcast else (par, orth)


def _rescale(pred: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """diffusers' ``rescale_noise_cfg``."""
    dims = list(range(1, cond.dim()))
    r = pred * (cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
    return phi * r + (1 - phi) * pred


@dataclass(frozen=True)
class FrequencyDecoupled(Guider):
    """diffusers' ``FrequencyDecoupledGuidance``. Per-level sequences (level 0 the highest frequency)
    of equal length: ``scales`` (diffusers' ``guidance_scales``), ``rescales``, ``parallel_weights``,
    ``starts``, ``stops``; ``rescale_space`` ``"data"`` (the first level's rescale, applied to the
    collapsed prediction) or ``"freq"`` (each level's, applied to that level); ``upcast``: the
    projections in float64. The guider's own ``start``/``stop`` are the widest window, as diffusers'."""

    scales: tuple[float, ...] = (10.0, 5.0)
    rescales: tuple[float, ...] | None = None
    parallel_weights: tuple[float, ...] | None = None
    starts: tuple[float, ...] | None = None
    stops: tuple[float, ...] | None = None
    rescale_space: str = "data"
    upcast: bool = True

    def __post_init__(self) -> None:
        from ..core import validate

        n = len(self.scales)
        if n < 1:
            raise ValueError("FrequencyDecoupled.scales must have at least one level")
        for name, default in (("rescales", 0.0), ("parallel_weights", 1.0), ("starts", self.start),
                              ("stops", self.stop)):
            v = getattr(self, name)
            v = (default,) * n if v is None else (v,) * n if isinstance(v, (int, float)) else tuple(v)
            if len(v) != n:
                raise ValueError(f"FrequencyDecoupled.{name} has {len(v)} entries but scales has {n} levels")
            object.__setattr__(self, name, tuple(validate.real(f"FrequencyDecoupled.{name}[{i}]", x)
                                                 for i, x in enumerate(v)))
        object.__setattr__(self, "scales", tuple(validate.real(f"FrequencyDecoupled.scales[{i}]", x, float32=True)
                                                 for i, x in enumerate(self.scales)))
        if self.rescale_space not in ("data", "freq"):
            raise ValueError(f"FrequencyDecoupled.rescale_space must be 'data' or 'freq', got {self.rescale_space!r}")
        object.__setattr__(self, "start", min(self.starts))
        object.__setattr__(self, "stop", max(self.stops))
        # the data-space rescale folds into the blend where the step blends (see blend)
        object.__setattr__(self, "rescale", self.rescales[0] if self._linear_top and self.rescale_space == "data"
                           and self.rescales[0] > 0 else 0.0)
        super().__post_init__()

    def _weights(self) -> tuple[str, ...]:
        return ()  # per-level sequences, not per-step schedules

    @property
    def _linear_top(self) -> bool:
        """Whether level 0 is an ordinary CFG level (no projection, no frequency-space rescale)."""
        return math.isclose(self.parallel_weights[0], 1.0) and not (
            self.rescale_space == "freq" and self.rescales[0] > 0)

    def active(self, step: int, steps: int | None) -> bool:
        neutral = 0.0 if self.original else 1.0
        return (self.enabled and _window(self.start, self.stop, step, steps)
                and not all(math.isclose(s, neutral) for s in self.scales))

    def _level_on(self, k: int, step: int, steps: int | None) -> bool:
        neutral = 0.0 if self.original else 1.0
        return (self.enabled and _window(self.starts[k], self.stops[k], step, steps)
                and not math.isclose(self.scales[k], neutral))

    def _level(self, k: int, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """The guided level ``k`` from its conditional and unconditional levels (diffusers' loop body)."""
        shift = c - u
        if not math.isclose(self.parallel_weights[k], 1.0):
            par, orth = _project(shift, c, self.upcast)
            shift = self.parallel_weights[k] * par + orth
        pred = (c if self.original else u) + self.scales[k] * shift
        if self.rescale_space == "freq" and self.rescales[k] > 0.0:
            pred = _rescale(pred, c, self.rescales[k])
        return pred

    def blend(self, step, steps):
        if not self.active(step, steps):
            return None
        on = [self._level_on(k, step, steps) for k in range(len(self.scales))]
        n = len(self.scales)

        if not self._linear_top:  # the whole prediction outside; the step takes it as it is
            def whole(branches):
                c, u = branches[COND], branches[UNCOND]
                check_shape(c.shape, n)
                cp, up = laplacian_pyramid(c, n), laplacian_pyramid(u, n)
                pred = collapse([self._level(k, cp[k], up[k]) if on[k] else cp[k] for k in range(n)])
                if self.rescale_space == "data" and self.rescales[0] > 0.0:
                    pred = _rescale(pred, c, self.rescales[0])
                return pred

            return StepBlend((UNCOND, COND, FDG, None), constant(0.0, 0.0, 1.0), derive=whole)
        w0 = self.scales[0] if on[0] else 0.0
        base_is_c = self.original or not on[0]
        p = (-w0, 1.0 + w0) if base_is_c else (1.0 - w0, w0)
        if n == 1:
            return StepBlend((UNCOND, COND, None, None), constant(*p))

        def correction(branches):
            c, u = branches[COND], branches[UNCOND]
            check_shape(c.shape, n)
            gc, gu = gaussian_pyramid(c, n), gaussian_pyramid(u, n)
            lc = [gc[k] - pyrup(gc[k + 1]) for k in range(1, n - 1)] + [gc[-1]]
            lu = [gu[k] - pyrup(gu[k + 1]) for k in range(1, n - 1)] + [gu[-1]]
            rest = collapse([self._level(k + 1, lc[k], lu[k]) if on[k + 1] else lc[k] for k in range(n - 1)])
            base1 = gc[1] if base_is_c else gu[1]
            return pyrup(rest - base1 - w0 * (gc[1] - gu[1]))

        return StepBlend((UNCOND, COND, FDG, None), constant(*p, 1.0), derive=correction)
