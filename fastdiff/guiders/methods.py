"""Guidance methods as per-sample linear blends of model branches.

Each guider of ``diffusers.guiders`` computes ``pred = sum_k p_k[b] M_k`` over its branches ``M_k``
(unconditional, conditional, perturbed or weak-model, and APG's momentum buffer) with per-sample
weights ``p_k`` that are constants or functions of the branches' dot products
(:class:`fastdiff.guiders.stats.Stats`). A guider here says, for one solver step, which branch
goes in which slot of the fused step (``m, m_c, m_2, m_3``: :class:`fastdiff.core.args.StepArgs`)
and how to compute the weights; the step then blends inside the kernel.

Windows, scales and formulations follow diffusers exactly: ``start``/``stop`` are fractions of the
step count (active where ``int(start * steps) <= step < int(stop * steps)``), a scale of 1 (0 with
``original``) disables guidance, ``original`` is diffusers' ``use_original_formulation`` (the
blend starts from the conditional prediction), ``rescale`` its ``guidance_rescale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .stats import Stats

UNCOND, COND, PERTURBED, MODALITY, MOMENTUM, DERIVED = "uncond", "cond", "perturbed", "modality", "momentum", "fdg"
"""Branch names: the model without conditioning, with it, with it and a perturbation (PAG, SEG, SLG,
STG, or AutoGuidance's weak model), LTX-2's modality-isolated prediction, APG's momentum buffer
(not a model call: a history slot the step reads and writes), and a slot derived from the branches
after the model calls (:attr:`StepBlend.derive`: frequency-decoupled guidance's correction)."""

Plain = Callable[[Stats | None, int, torch.device], torch.Tensor]


@dataclass(frozen=True)
class StepBlend:
    """One solver step's blend.

    Attributes:
        slots: the branch in each of the step's slots ``(m, m_c, m_2, m_3)``, ``None`` where empty.
            Slot 0 is the base of the difference form the kernel computes; slot 3 enters as it is.
        plain: ``plain(stats, B, device)`` -> float64 ``[B, 4]``: the weight of each slot in
            ``pred`` (``stats`` is ``None`` unless ``needs_stats``), an array of the statistics' kind
            (numpy from the CPU extension, else a torch tensor on ``device``: ``stats.ops``).
        needs_stats: whether ``plain`` reads the branches' :class:`Stats`.
        write: the plain weights (constants) of the momentum update the step writes to the
            momentum buffer, or ``None``.
        derive: ``derive(branches) -> tensor``: the derived slot (frequency-decoupled guidance's
            pyramid correction, :data:`fastdiff.guiders.frequency.FDG`) from the evaluated branches
            (``{name: [B, ...] tensor}``), computed after the model calls, before the step; or ``None``.
    """

    slots: tuple[str | None, str | None, str | None, str | None]
    plain: Plain
    needs_stats: bool = False
    write: tuple[float, float, float, float] | None = None
    derive: Callable[[dict], torch.Tensor] | None = None

    @property
    def branches(self) -> tuple[str, ...]:
        """The model branches this step evaluates (the momentum buffer and a derived slot are not)."""
        return tuple(s for s in self.slots if s is not None and s not in (MOMENTUM, DERIVED))


def constant(*weights: float) -> Plain:
    """Plain weights that are the same for every sample."""
    w = list(weights) + [0.0] * (4 - len(weights))

    def plain(stats, b, device):
        if stats is not None:  # the statistics' kind (numpy from the CPU extension)
            return stats.ops.zeros(b, stats.gram) + stats.ops.array(w, stats.gram)
        from .stats import device_constant

        return device_constant(w, device).expand(b, 4)

    plain.weights = tuple(float(v) for v in w)  # (the host's shortcut: apply.coefficients)
    return plain


def _window(start: float, stop: float, step: int, steps: int | None, strict_start: bool = False) -> bool:
    if steps is None:
        return True
    lo, hi = int(start * steps), int(stop * steps)
    return (lo < step if strict_start else lo <= step) and step < hi


def _off(scale: float, original: bool) -> bool:
    return math.isclose(scale, 0.0) if original else math.isclose(scale, 1.0)


@dataclass(frozen=True)
class Guider:
    """Classifier-free guidance (Ho & Salimans 2022) as diffusers' ``ClassifierFreeGuidance``:
    ``pred = u + w (c - u)`` (``original``: ``c + w (c - u)``).

    Every weight (``scale``, and a subclass's ``perturbed_scale``, ``apg_scale``, ``eta``, ...) may be a
    float, one value per solver step, or ``f(step, sigma) -> float`` (:meth:`at` resolves it per row).

    Attributes:
        scale: the guidance scale ``w``.
        rescale: ``guidance_rescale`` φ (Lin et al. 2023): ``pred <- (φ std(c) / std(pred) + 1 - φ) pred``
            per sample (where ``std(pred) = 0`` the factor is 1: diffusers would give NaN); any finite
            value, as diffusers takes it (0 to 1 is the paper's range).
        start, stop: the active window, fractions of the step count.
        original: diffusers' ``use_original_formulation``.
        enabled: ``False``: the conditional prediction alone at every step.
    """

    scale: float = 7.5
    rescale: float = 0.0
    start: float = 0.0
    stop: float = 1.0
    original: bool = False
    enabled: bool = True

    uses_momentum = False
    """Whether the guider keeps a momentum buffer (a history slot the fused step updates)."""

    def __post_init__(self) -> None:
        from ..core import validate

        for name in ("rescale", "start", "stop"):
            validate.real(f"{type(self).__name__}.{name}", getattr(self, name))
        for name in self._weights():
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                object.__setattr__(self, name, tuple(v.tolist()) if v.dim() == 1 else float(v))
                v = getattr(self, name)
            if isinstance(v, list):
                object.__setattr__(self, name, v := tuple(v))
            if isinstance(v, tuple):
                for i, x in enumerate(v):
                    validate.real(f"{type(self).__name__}.{name}[{i}]", x, float32=True)
            elif not callable(v):
                validate.real(f"{type(self).__name__}.{name}", v, float32=True)


    def _weights(self) -> tuple[str, ...]:
        """The guider's weights: floats, or per-step schedules (one value per step, or ``f(step, sigma)``)."""
        return tuple(n for n in ("scale", "perturbed_scale", "apg_scale", "stg_scale", "modality_scale", "eta",
                                 "alpha", "momentum", "norm_threshold") if hasattr(self, n))

    def at(self, step: int, sigma: float) -> "Guider":
        """This guider with every scheduled weight (a sequence, one value per step, or ``f(step, sigma)``)
        replaced by its value at ``step`` (noise level ``sigma``); itself when none is scheduled."""
        from dataclasses import replace

        changes = {}
        for name in self._weights():
            v = getattr(self, name)
            if isinstance(v, tuple):
                if not 0 <= step < len(v):
                    raise ValueError(f"{type(self).__name__}.{name} has {len(v)} entries; step {step} has none")
                changes[name] = float(v[step])
            elif callable(v):
                from ..core import validate

                changes[name] = validate.real(f"{type(self).__name__}.{name}({step}, {sigma:g})", v(step, sigma),
                                              float32=True)
        return replace(self, **changes) if changes else self

    def active(self, step: int, steps: int | None) -> bool:
        """Whether guidance runs at ``step`` (diffusers' ``_is_cfg_enabled``)."""
        return self.enabled and _window(self.start, self.stop, step, steps) and not _off(self.scale, self.original)

    def blend(self, step: int, steps: int | None) -> StepBlend | None:
        """The blend at ``step`` of ``steps``, or ``None`` where the prediction is the conditional
        branch alone (guidance off: only that branch is evaluated)."""
        if not self.active(step, steps):
            return None
        w = self.scale
        return StepBlend((UNCOND, COND, None, None), constant(-w, 1 + w) if self.original else constant(1 - w, w))


@dataclass(frozen=True)
class CFGZeroStar(Guider):
    """CFG-Zero* (Fan et al. 2025), diffusers' ``ClassifierFreeZeroStarGuidance``: the unconditional
    prediction scaled by ``alpha = <c, u> / (|u|^2 + 1e-8)`` per sample, and a zero prediction for
    the first ``zero_init_steps`` steps."""

    zero_init_steps: int = 1

    def blend(self, step, steps):
        if self.enabled and step < self.zero_init_steps:
            return StepBlend((COND, None, None, None), constant(0.0))
        if not self.active(step, steps):
            return None
        w, orig = self.scale, self.original

        def plain(stats, b, device):
            g = stats.gram
            alpha = g[:, 1, 0] / (g[:, 0, 0] + 1e-8)
            p = stats.ops.zeros(b, g)
            p[:, 0] = -w * alpha if orig else (1 - w) * alpha
            p[:, 1] = 1 + w if orig else w
            return p

        return StepBlend((UNCOND, COND, None, None), plain, needs_stats=True)


@dataclass(frozen=True)
class TangentialCFG(Guider):
    """Tangential CFG (Sadat et al. 2025), diffusers' ``TangentialClassifierFreeGuidance``: the
    unconditional prediction projected on the first right singular vector of ``[c; u]`` per
    sample before the CFG blend. The projection is ``y_u (y_c c + y_u u)`` with ``y`` the top
    eigenvector of the 2x2 Gram matrix of ``(c, u)`` (closed form; diffusers runs an SVD)."""

    def blend(self, step, steps):
        if not self.active(step, steps):
            return None
        w, orig = self.scale, self.original

        def plain(stats, b, device):
            g = stats.gram
            yc, yu = _top_eigenvector(g[:, 1, 1], g[:, 1, 0], g[:, 0, 0], stats.ops)
            pu, pc = yu * yu, yu * yc  # u' = pc c + pu u
            p = stats.ops.zeros(b, g)
            if orig:  # c + w (c - u')
                p[:, 0], p[:, 1] = -w * pu, 1 + w - w * pc
            else:  # u' + w (c - u')
                p[:, 0], p[:, 1] = (1 - w) * pu, (1 - w) * pc + w
            return p

        return StepBlend((UNCOND, COND, None, None), plain, needs_stats=True)


def _top_eigenvector(p, q, r, ops=None):
    """The unit eigenvector of ``[[p, q], [q, r]]`` (per sample: float64 ``[B]`` tensors, or numpy
    arrays with ``ops`` the numpy functions) with the largest eigenvalue, in the numerically stable
    of its two closed forms; ``(1, 0)`` where the matrix is diagonal with ``p >= r``."""
    from .stats import TorchOps

    ops = ops or TorchOps
    half = (p - r) / 2
    lam = (p + r) / 2 + ops.sqrt(half * half + q * q)
    first = p >= r  # (lam - r, q) has the larger entries there, (q, lam - p) otherwise
    v0 = ops.where(first, lam - r, q)
    v1 = ops.where(first, q, lam - p)
    norm = ops.sqrt(v0 * v0 + v1 * v1)
    zero = norm == 0
    v0 = ops.where(zero, ops.as_float(first), v0 / ops.where(zero, 1.0, norm))
    v1 = ops.where(zero, ops.as_float(~first), v1 / ops.where(zero, 1.0, norm))
    return v0, v1


@dataclass(frozen=True)
class MagnitudeAware(Guider):
    """Magnitude-aware guidance (MAMBO-G), diffusers' ``MagnitudeAwareGuidance``: the scale damped per
    sample by ``exp(-alpha |c - u| / |u|)`` (where ``c = u`` the ratio is 0: diffusers' 0/0 gives NaN
    when ``u = 0`` too)."""

    scale: float = 10.0
    alpha: float = 8.0

    def blend(self, step, steps):
        if not self.active(step, steps):
            return None
        w, orig, alpha = self.scale, self.original, self.alpha

        def plain(stats, b, device):
            g, ops = stats.gram, stats.ops
            diff2 = ops.clamp_min(g[:, 1, 1] - 2 * g[:, 1, 0] + g[:, 0, 0], 0.0)
            # c = u: no guidance direction, so the damped scale multiplies 0 and its value does not matter;
            # ratio 0 there instead of diffusers' 0/0 (NaN where u = 0 too), and no damping at alpha = 0
            # (diffusers' 0 * inf where u = 0)
            ratio = ops.where(diff2 > 0, ops.sqrt(diff2) / ops.sqrt(g[:, 0, 0]), 0.0)
            damp = ops.exp(-alpha * ratio) if alpha != 0 else ops.ones_like(ratio)
            gs = w * damp if orig else 1.0 + (w - 1.0) * damp
            p = ops.zeros(b, g)
            p[:, 0], p[:, 1] = (-gs, 1 + gs) if orig else (1 - gs, gs)
            return p

        return StepBlend((UNCOND, COND, None, None), plain, needs_stats=True)


@dataclass(frozen=True)
class APG(Guider):
    """Adaptive projected guidance (Sadat et al. 2024), diffusers' ``AdaptiveProjectedGuidance``:
    the guidance direction ``c - u`` averaged with momentum, its norm capped at ``norm_threshold``,
    and its component parallel to ``c`` weighted by ``eta``.

    Attributes:
        momentum: the running-average factor β (``None``: no momentum buffer); the buffer is the
            step's slot ``m_3``, updated in the same kernel (``H <- c - u + β H``) and reset to 0 at
            the loop's first step, as diffusers resets its ``MomentumBuffer``.
        norm_threshold: diffusers' ``adaptive_projected_guidance_rescale`` (0: no cap).
        eta: weight of the parallel component.
        norm_dim: diffusers' ``adaptive_projected_guidance_norm_dim``: the dimensions the norms and
            projections reduce over (``None``: each whole sample, blended in the step from its Gram
            pass). Others (per pixel, per channel) are computed as diffusers computes them, outside the
            step, which takes the guided prediction as a derived slot and still updates the momentum.
    """

    momentum: float | None = None
    norm_threshold: float = 15.0
    eta: float = 1.0
    norm_dim: tuple[int, ...] | None = None

    @property
    def uses_momentum(self) -> bool:  # type: ignore[override]
        return self.momentum is not None

    def __post_init__(self) -> None:
        if self.norm_dim is not None:
            dims = (self.norm_dim,) if isinstance(self.norm_dim, int) else tuple(self.norm_dim)
            if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
                raise ValueError(f"{type(self).__name__}.norm_dim must be an int or a non-empty tuple of ints, got "
                                 f"{self.norm_dim!r}")
            object.__setattr__(self, "norm_dim", dims)
        super().__post_init__()

    def blend(self, step, steps):
        if not self.active(step, steps):
            return None
        if self.norm_dim is not None:
            return _apg_eager(self.scale, self.momentum, self.norm_threshold, self.eta, self.original, self.norm_dim)
        return _apg_blend(self.scale, self.momentum, self.norm_threshold, self.eta, self.original)


def _apg_eager(w: float, beta: float | None, thr: float, eta: float, orig: bool, dims: tuple[int, ...]) -> StepBlend:
    """APG reducing over ``dims`` (diffusers' ``normalized_guidance`` with ``norm_dim``), computed as
    diffusers computes it; the step takes the prediction (a derived slot) and writes the momentum."""

    def pred(branches):
        c, u = branches[COND], branches[UNCOND]
        diff = c - u
        if beta is not None:
            diff = diff + beta * branches[MOMENTUM]
        for d in dims:
            if not -c.dim() <= d < c.dim():
                raise ValueError(f"APG norm_dim {dims} does not fit predictions of shape {tuple(c.shape)}")
        if thr > 0:
            diff = diff * torch.minimum(torch.ones_like(diff), thr / diff.norm(p=2, dim=list(dims), keepdim=True))
        v0, v1 = diff.double(), torch.nn.functional.normalize(c.double(), dim=list(dims))
        par = (v0 * v1).sum(dim=list(dims), keepdim=True) * v1
        update = (v0 - par).to(diff.dtype) + eta * par.to(diff.dtype)
        return (c if orig else u) + w * update

    slots = (UNCOND, COND, DERIVED, MOMENTUM if beta is not None else None)
    return StepBlend(slots, constant(0.0, 0.0, 1.0), write=(-1.0, 1.0, 0.0, float(beta)) if beta is not None else None,
                     derive=pred)


def _apg_blend(w: float, beta: float | None, thr: float, eta: float, orig: bool) -> StepBlend:
    """diffusers' ``normalized_guidance``: ``v = H' = c - u (+ β H)``, ``v *= min(1, thr / |v|)``,
    ``pred = base + w (v - (1 - eta) <v, c> / |c|^2 c)``."""
    b0 = 0.0 if beta is None else float(beta)

    def plain(stats, b, device):
        ops = stats.ops
        v = ops.zeros(b, stats.gram)  # H' in plain weights over (u, c, -, H)
        v[:, 0], v[:, 1], v[:, 3] = -1.0, 1.0, b0
        cvec = ops.zeros(b, stats.gram)
        cvec[:, 1] = 1.0
        s = ops.ones_like(v[:, 1])
        if thr > 0:
            norm = ops.sqrt(ops.clamp_min(stats.quad(v), 0.0))
            s = ops.minimum(s, thr / norm)
        cnorm = ops.clamp_min(ops.sqrt(stats.gram[:, 1, 1]), 1e-12)  # F.normalize's eps
        k = s * stats.quad(v, cvec) / (cnorm * cnorm)
        p = (w * s)[:, None] * v
        p[:, 1] -= w * (1.0 - eta) * k
        p[:, 0 if not orig else 1] += 1.0
        return p

    slots = (UNCOND, COND, None, MOMENTUM if beta is not None else None)
    return StepBlend(slots, plain, needs_stats=True, write=(-1.0, 1.0, 0.0, b0) if beta is not None else None)


@dataclass(frozen=True)
class APGMix(APG):
    """diffusers' ``AdaptiveProjectedMixGuidance``: CFG (updating the momentum buffer) up to step
    ``apg_start_step``, APG with ``apg_scale`` after it (APG's momentum, threshold and eta, with
    diffusers' defaults for this guider)."""

    scale: float = 3.5
    apg_scale: float = 10.0
    momentum: float | None = -0.5
    norm_threshold: float = 10.0
    eta: float = 0.0
    apg_start_step: int = 5

    def __post_init__(self) -> None:
        if self.norm_dim is not None:
            raise ValueError("APGMix.norm_dim: diffusers' AdaptiveProjectedMixGuidance projects over whole samples")
        super().__post_init__()

    def blend(self, step, steps):
        if not self.active(step, steps):
            return None
        if step > self.apg_start_step and not _off(self.apg_scale, self.original):
            return _apg_blend(self.apg_scale, self.momentum, self.norm_threshold, self.eta, self.original)
        w = self.scale
        plain = constant(-w, 1 + w) if self.original else constant(1 - w, w)
        if self.momentum is None:
            return StepBlend((UNCOND, COND, None, None), plain)
        b0 = float(self.momentum)
        return StepBlend((UNCOND, COND, None, MOMENTUM), plain, write=(-1.0, 1.0, 0.0, b0))


@dataclass(frozen=True)
class Perturbed(Guider):
    """CFG plus a perturbed-branch term: diffusers' ``PerturbedAttentionGuidance``,
    ``SkipLayerGuidance`` and ``SmoothedEnergyGuidance`` (one math, three perturbations):
    ``pred = u + w (c - u) + s (c - p)`` with ``p`` the conditional prediction of the perturbed
    model, the ``s`` term active where ``int(perturbed_start * steps) < step <
    int(perturbed_stop * steps)`` (strictly after the start step, as diffusers)."""

    perturbed_scale: float = 2.8
    perturbed_start: float = 0.01
    perturbed_stop: float = 0.2

    def perturbed_active(self, step: int, steps: int | None) -> bool:
        """Whether the perturbed term runs at ``step`` (diffusers' ``_is_slg_enabled``)."""
        return (self.enabled and _window(self.perturbed_start, self.perturbed_stop, step, steps, strict_start=True)
                and not math.isclose(self.perturbed_scale, 0.0))

    def blend(self, step, steps):
        cfg, pert = self.active(step, steps), self.perturbed_active(step, steps)
        w, s, orig = self.scale, self.perturbed_scale, self.original
        if cfg and pert:  # (u, c, p)
            p = (-w, 1 + w + s, -s) if orig else (1 - w, w + s, -s)
            return StepBlend((UNCOND, COND, PERTURBED, None), constant(*p))
        if pert:  # (p, c)
            return StepBlend((PERTURBED, COND, None, None), constant(-s, 1 + s) if orig else constant(1 - s, s))
        return super().blend(step, steps)


@dataclass(frozen=True)
class AutoGuidance(Guider):
    """AutoGuidance (Karras et al. 2024), diffusers' ``AutoGuidance``: CFG's blend with a weak model's
    conditional prediction (the perturbed branch) in place of the unconditional one."""

    def blend(self, step, steps):
        sb = super().blend(step, steps)
        return None if sb is None else StepBlend((PERTURBED, COND, None, None), sb.plain)


@dataclass(frozen=True)
class LTX2(Guider):
    """diffusers' ``LTX2Guidance``: ``pred = c + (w - 1)(c - u) + stg (c - p) + (mod - 1)(c - q)``,
    each term where its scale is not neutral, all in one window."""

    scale: float = 1.0
    stg_scale: float = 0.0
    modality_scale: float = 1.0

    def blend(self, step, steps):
        if not (self.enabled and _window(self.start, self.stop, step, steps)):
            return None
        cfg, stg, mod = (not math.isclose(self.scale, 1.0), not math.isclose(self.stg_scale, 0.0),
                         not math.isclose(self.modality_scale, 1.0))
        if not (cfg or stg or mod):
            return None
        # plain weights over (slot 0, c, p, q); slot 0 is u when CFG runs, else c again
        wc, ws, wm = (self.scale - 1.0) if cfg else 0.0, self.stg_scale if stg else 0.0, \
            (self.modality_scale - 1.0) if mod else 0.0
        pc = 1.0 + wc + ws + wm
        slots = (UNCOND if cfg else COND, COND if cfg else None, PERTURBED if stg else None, MODALITY if mod else None)
        p = (-wc, pc, -ws, -wm) if cfg else (pc, 0.0, -ws, -wm)
        return StepBlend(slots, constant(*p))


GUIDERS: dict[str, type[Guider]] = {
    "cfg": Guider, "cfg_zero_star": CFGZeroStar, "tangential": TangentialCFG, "magnitude_aware": MagnitudeAware,
    "apg": APG, "apg_mix": APGMix, "perturbed": Perturbed, "auto_guidance": AutoGuidance, "ltx2": LTX2,
}
"""The native guiders by name."""

__all__ = ["APG", "APGMix", "AutoGuidance", "CFGZeroStar", "GUIDERS", "Guider", "LTX2", "MagnitudeAware",
           "Perturbed", "StepBlend", "TangentialCFG", "constant"]
