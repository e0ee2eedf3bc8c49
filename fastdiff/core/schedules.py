"""Noise schedules and their discretizations, as data (float64 numpy arrays).

Three schedule families, each a frozen dataclass with the same small interface:

- :class:`VPSchedule` — discrete variance-preserving (DDPM) schedule from betas. Model time ``t``
  is the diffusers timestep (fractional between training steps); ``u = alpha x0 + sigma eps`` with
  ``alpha = sqrt(alphas_cumprod[t])``.
- :class:`VESchedule` — k-diffusion / EDM style: ``t = sigma``, ``alpha = 1``.
- :class:`FlowSchedule` — rectified flow: ``t = s * num_train_timesteps`` (as diffusers passes
  it), ``u = (1 - s) x0 + s eps``.

Interface every schedule provides (what samplers and models use):

- ``kind``: ``"vp"``, ``"ve"`` or ``"flow"``.
- ``alpha_sigma(t) -> (alpha, sigma)``: the model-input convention at model time ``t`` (scalar or
  array; float64).
- ``discretize(steps, spacing_default=...) -> Discretization``: the sigma grid of Euler-type
  samplers, exactly as diffusers' ``EulerDiscreteScheduler`` / ``FlowMatchEulerDiscreteScheduler``
  ``set_timesteps`` builds it (float32 values stored as float64 where diffusers is float32).
- ``state(sigma) -> (in_scale, alpha, sigma_m)``: the sampler state at noise level ``sigma`` of
  the grid (k-diffusion sigma for vp/ve, flow sigma ``s`` for flow) relates to the model input as
  ``u = in_scale * x`` with ``u = alpha * x0 + sigma_m * eps``.
- ``sigma_to_t(sigma)``: model time of a noise level (diffusers' ``_sigma_to_t`` for vp).
- ``options``: the sampler options of the diffusers config it came from (``prediction_type``,
  ``clip_sample``, ``solver_order``, ...): samplers take their defaults from here.
- ``replace(**changes)``: a copy with fields changed (dataclasses.replace).

:class:`VPSchedule` also exposes ``betas``, ``alphas_cumprod`` (computed in float32 torch ops
exactly as diffusers does, then stored as float64), ``train_sigmas``, ``log_sigmas`` and
``timesteps(steps, spacing_default)`` (the integer timesteps of DDPM/DDIM).

Pure grid functions for samplers with their own grids (DPM-Solver, UniPC):
:func:`spaced_timesteps`, :func:`karras_sigmas`, :func:`exponential_sigmas`, :func:`ve_sigmas`,
:func:`shift_flow_sigmas`, :func:`vp_betas`, :func:`rescale_betas_zero_snr`;
:func:`check_trained_betas` refuses malformed ``trained_betas`` by name (diffusers takes them and
fails later, or samples NaN).

:func:`from_config` reads a diffusers scheduler config (dict or ``scheduler.config``). Keys are
sorted into schedule keys (consumed here), sampler keys (:data:`SAMPLER_CONFIG_KEYS`, kept in
``options``), and keys that do not change the maths (:data:`IGNORED_CONFIG_KEYS`). Anything else,
or a supported key with a value we do not implement, raises ``ValueError`` naming the key. A
sampler module that starts reading a new diffusers key adds it to :data:`SAMPLER_CONFIG_KEYS`.

Grid keys that are missing from a config (``timestep_spacing``) take the default of the diffusers
scheduler the sampler mirrors (``leading`` for DDPM/DDIM, ``linspace`` for Euler-type), as
diffusers' ``from_config`` does. Sampler options and ``timestep_spacing`` listed in a config's
``_use_default_values`` count as missing, also as in diffusers; the keys that define the noise
schedule (betas, ``num_train_timesteps``, ``shift``) are always taken as given, since they are
what that scheduler uses. Deliberate difference: grid settings (Karras/exponential sigmas,
``final_sigmas_type``, ``sigma_min``/``sigma_max``) apply to every Euler-type sampler, also to
those whose diffusers class lacks the option (``EulerAncestralDiscreteScheduler``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import torch

SPACINGS = ("leading", "trailing", "linspace")
"""Timestep spacings of diffusers' ``timestep_spacing``."""
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
"""Beta schedules of diffusers' ``beta_schedule`` (plus ``trained_betas``)."""
SIGMA_GRIDS = ("default", "karras", "exponential")
"""How a sigma grid is placed: the spacing's own sigmas, Karras et al. (rho), or log-uniform."""

SAMPLER_CONFIG_KEYS = frozenset({
    "prediction_type", "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value", "variance_type", "set_alpha_to_one", "stochastic_sampling",
    # DPM-Solver(++) / UniPC family
    "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "use_lu_lambdas", "lambda_min_clipped", "predict_x0", "disable_corrector", "solver_p",
    # LCM / TCD (original_inference_steps: their timestep grid) and SA-Solver
    "original_inference_steps", "timestep_scaling", "predictor_order", "corrector_order", "tau_func",
    # PNDM's warm-up switch (read by the pndm sampler; every other sampler ignores it, as diffusers' from_config does)
    "skip_prk_steps",
})
"""Diffusers config keys that are sampler options: kept in ``schedule.options`` for samplers."""

IGNORED_CONFIG_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values", "_name_or_path",
})
"""Diffusers config keys that do not change any sampler we implement."""

_VP_KEYS = {
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
    "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "sigma_min", "sigma_max", "final_sigmas_type", "interpolation_type", "timestep_type",
    "use_flow_sigmas", "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal",
}
# flow keys that diffusers' VP schedulers (DPM-Solver, UniPC, DEIS) carry in their configs: harmless
# at these values (time_shift_type only matters with dynamic shifting), refused otherwise
_VP_FLOW_OFF = {"use_dynamic_shifting": (False, None), "shift_terminal": (None,)}
_FLOW_KEYS = {
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type",
}
_FLOW_ONLY = {"shift", "use_dynamic_shifting", "base_shift", "max_shift", "invert_sigmas", "shift_terminal",
              "time_shift_type"}
_PER_CLASS_DEFAULTS = SAMPLER_CONFIG_KEYS | {"timestep_spacing"}
_VP_ONLY = {"beta_start", "beta_end", "beta_schedule", "trained_betas"}
# key -> the only values we implement (anything else changes results in a way we do not support)
_ONLY = {
    "use_beta_sigmas": (False, None),
    "interpolation_type": ("linear", None),
    "timestep_type": ("discrete", None),
    "use_flow_sigmas": (False, None),
    "invert_sigmas": (False, None),
}


@dataclass(frozen=True)
class Discretization:
    """A descending grid of noise levels for one sampling run.

    Attributes:
        sigmas: float64 ``[steps + 1]``: noise level of the state before each step and the final
            one (usually 0). k-diffusion sigma for vp/ve schedules, flow sigma ``s`` for flow.
        timesteps: float64 ``[steps]``: model time ``t`` at ``sigmas[:-1]``.
        init_sigma: the initial state is ``init_sigma * noise`` (diffusers' ``init_noise_sigma``).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_sigma: float

    @property
    def steps(self) -> int:
        """Number of steps (``len(timesteps)``)."""
        return len(self.timesteps)


# ----------------------------------------------------------------------------- grid functions


def _f32(a) -> np.ndarray:
    """Round to float32 (as diffusers stores it) and hold as float64."""
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def _check_steps(steps: Any, limit: int | None = None) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if limit is not None and steps > limit:
        raise ValueError(f"steps={steps} is larger than num_train_timesteps={limit}")
    return int(steps)


def spaced_timesteps(num_train_timesteps: int, steps: int, spacing: str, steps_offset: int = 0,
                     *, integer: bool = True) -> np.ndarray:
    """Descending diffusers timesteps for ``steps`` inference steps (float64 array ``[steps]``).

    ``integer=True`` reproduces DDPM/DDIM (``linspace`` rounded to ints), ``integer=False`` the
    Euler-type schedulers (``linspace`` kept fractional, float32). ``steps_offset`` is added for
    ``leading`` only, as in diffusers.
    """
    T = int(num_train_timesteps)
    n = _check_steps(steps)
    if spacing == "linspace":
        if integer:
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        else:
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ratio = T // n
        ts = (np.arange(0, n) * ratio).round()[::-1]
        ts = ts.astype(np.int64) if integer else ts.astype(np.float32)
        ts = ts + (np.int64(steps_offset) if integer else np.float32(steps_offset))
    elif spacing == "trailing":
        ratio = T / n
        ts = np.round(np.arange(T, 0, -ratio))
        ts = ts.astype(np.int64) - 1 if integer else ts.astype(np.float32) - np.float32(1)
    else:
        raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {spacing!r}")
    return np.ascontiguousarray(ts, dtype=np.float64)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) noise levels, float64 ``[n]`` descending (no trailing zero)."""
    _check_sigma_range(sigma_min, sigma_max)
    ramp = np.linspace(0, 1, _check_steps(n))
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Log-uniform noise levels from ``sigma_max`` to ``sigma_min``, float64 ``[n]``."""
    _check_sigma_range(sigma_min, sigma_max)
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), _check_steps(n)))


def ve_sigmas(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """VE (Song et al. 2021) geometric noise levels ``sigma_min (sigma_max/sigma_min)^(1-i/(n-1))``."""
    return exponential_sigmas(n, sigma_min, sigma_max)


def _check_sigma_range(sigma_min: float, sigma_max: float) -> None:
    if not (0 < sigma_min <= sigma_max and math.isfinite(sigma_max)):
        raise ValueError(f"need 0 < sigma_min <= sigma_max < inf, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}")


def shift_flow_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Flow-matching time shift ``shift * s / (1 + (shift - 1) * s)`` (SD3)."""
    s = np.asarray(sigmas, dtype=np.float64)
    return shift * s / (1 + (shift - 1) * s)


def vp_betas(beta_schedule: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
             beta_end: float = 0.02, trained_betas=None) -> torch.Tensor:
    """Betas exactly as diffusers computes them: a float32 tensor ``[num_train_timesteps]``."""
    if trained_betas is not None:
        return check_trained_betas(trained_betas)
    T = int(num_train_timesteps)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        def abar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float32)
    raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES} (or give trained_betas), got {beta_schedule!r}")


def rescale_betas_zero_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023) Algorithm 1: betas with zero terminal SNR (float32 ops, as diffusers)."""
    abar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    a0, aT = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt -= aT
    abar_sqrt *= a0 / (a0 - aT)
    abar = abar_sqrt**2
    alphas = torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# ----------------------------------------------------------------------------- schedules


def _host(t) -> np.ndarray | float:
    """``t`` as float64 host data (torch tensors on any device, arrays, scalars)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return t


def _frozen(a) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class VPSchedule:
    """Discrete variance-preserving schedule (Ho et al. 2020) with diffusers' grid options.

    Build it with :func:`vp` or :func:`from_config`. Grid fields (``None`` = the default of the
    diffusers scheduler the sampler mirrors):

    Attributes:
        betas, alphas_cumprod: float64 ``[num_train_timesteps]`` (float32 values, as diffusers).
        spacing: ``leading``, ``trailing``, ``linspace`` or ``None``.
        steps_offset: added to ``leading`` timesteps.
        sigma_grid: ``default``, ``karras`` or ``exponential`` (Euler-type samplers).
        sigma_min, sigma_max: ends of Karras/exponential grids (``None`` = the spacing's own).
        final_sigma: ``zero`` or ``sigma_min`` (diffusers' ``final_sigmas_type``).
        rho: Karras rho (diffusers fixes 7).
        options: sampler options from a diffusers config (see module docstring).
        train_timesteps: diffusers' ``num_train_timesteps`` where it is smaller than ``len(betas)``
            (``trained_betas`` longer than it: diffusers keeps every beta, and spaces its timestep
            grids over the first ``num_train_timesteps``); ``None``: ``len(betas)``.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    spacing: str | None = None
    steps_offset: int = 0
    sigma_grid: str = "default"
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigma: str = "zero"
    rho: float = 7.0
    options: Mapping[str, Any] = field(default_factory=dict)
    train_timesteps: int | None = None

    kind = "vp"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", _frozen(self.betas))
        object.__setattr__(self, "alphas_cumprod", _frozen(self.alphas_cumprod))
        if self.train_timesteps is not None:
            n = _check_train_timesteps(self.train_timesteps, "train_timesteps")
            if n > len(self.betas):
                raise ValueError(f"train_timesteps={n} is more than the {len(self.betas)} betas")
            object.__setattr__(self, "train_timesteps", n)
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {self.spacing!r}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {self.sigma_grid!r}")
        if self.final_sigma not in ("zero", "sigma_min"):
            raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {self.final_sigma!r}")
        acp = self.alphas_cumprod
        # k-diffusion sigmas of the training steps, float32 as diffusers' Euler-type schedulers
        # compute them; zero terminal SNR gets alphas_cumprod[-1] = 2**-24 there, as in diffusers.
        a32 = torch.tensor(acp, dtype=torch.float32)
        if a32[-1] == 0:
            a32[-1] = 2**-24
        sig = (((1 - a32) / a32) ** 0.5).numpy()
        object.__setattr__(self, "_train_sigmas", _frozen(sig))
        object.__setattr__(self, "_log_sigmas", _frozen(np.log(sig)))

    @property
    def num_train_timesteps(self) -> int:
        """Number of training timesteps ``T`` (diffusers' ``num_train_timesteps``): ``len(betas)``, or
        ``train_timesteps`` where the betas run longer."""
        return self.train_timesteps if self.train_timesteps is not None else len(self.betas)

    @property
    def train_sigmas(self) -> np.ndarray:
        """k-diffusion sigma ``sqrt((1 - abar) / abar)`` of every training step (float32 values)."""
        return self._train_sigmas

    @property
    def log_sigmas(self) -> np.ndarray:
        """``log(train_sigmas)`` (float32 values, as diffusers' ``_sigma_to_t`` uses them)."""
        return self._log_sigmas

    def replace(self, **changes) -> VPSchedule:
        """A copy with fields changed."""
        return dataclasses.replace(self, **changes)

    def alpha_sigma(self, t):
        """``(alpha, sigma)`` at diffusers timestep ``t`` (scalar or array, float64).

        Integer ``t``: ``(sqrt(abar[t]), sqrt(1 - abar[t]))``. Fractional ``t``: log-sigma linear
        interpolation between the neighbouring training steps (the inverse of diffusers'
        ``_sigma_to_t``), then ``alpha = 1/sqrt(1+s^2)``, ``sigma = s/sqrt(1+s^2)``.
        """
        t = _host(t)
        tt = np.asarray(t, dtype=np.float64)
        T = len(self.alphas_cumprod)  # every training step has a beta (diffusers' grids may reach past T)
        if np.any(tt < 0) or np.any(tt > T - 1) or not np.all(np.isfinite(tt)):
            raise ValueError(f"t must be within [0, {T - 1}], got {t!r}")
        lo = np.floor(tt).astype(np.int64)
        hi = np.minimum(lo + 1, T - 1)
        w = tt - lo
        s = np.exp((1 - w) * self._log_sigmas[lo] + w * self._log_sigmas[hi])
        alpha, sigma = 1 / np.sqrt(1 + s * s), s / np.sqrt(1 + s * s)
        exact = w == 0
        acp = self.alphas_cumprod[lo]
        alpha = np.where(exact, np.sqrt(acp), alpha)
        sigma = np.where(exact, np.sqrt(1 - acp), sigma)
        if np.ndim(t) == 0:
            return float(alpha), float(sigma)
        return alpha, sigma

    def t_to_sigma(self, t):
        """k-diffusion sigma at diffusers timestep ``t`` (log-sigma interpolation)."""
        a, s = self.alpha_sigma(t)
        return np.asarray(s) / np.asarray(a) if np.ndim(t) else s / a

    def sigma_to_t(self, sigma):
        """Fractional diffusers timestep of k-diffusion ``sigma`` (diffusers' ``_sigma_to_t``)."""
        sig = np.asarray(sigma, dtype=np.float64)
        log_sigma = np.log(np.maximum(sig, 1e-10))
        ls = self._log_sigmas
        dists = log_sigma - ls[:, np.newaxis]
        low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=ls.shape[0] - 2)
        lo, hi = ls[low], ls[low + 1]
        w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
        t = ((1 - w) * low + w * (low + 1)).reshape(sig.shape)
        return float(t) if np.ndim(sigma) == 0 else t

    def state(self, sigma: float) -> tuple[float, float, float]:
        """k-space state ``x = x0 + sigma eps``: ``(in_scale, alpha, sigma_m) = (c, c, sigma c)``, ``c = 1/sqrt(1+sigma^2)``."""
        c = 1.0 / math.sqrt(1.0 + sigma * sigma)
        return c, c, sigma * c

    def timesteps(self, steps: int, spacing_default: str = "leading") -> np.ndarray:
        """Integer diffusers timesteps of DDPM/DDIM ``set_timesteps`` (float64 ``[steps]``, descending)."""
        n = _check_steps(steps, self.num_train_timesteps)
        return spaced_timesteps(self.num_train_timesteps, n, self.spacing or spacing_default, self.steps_offset,
                                integer=True)

    def discretize(self, steps: int, spacing_default: str = "linspace") -> Discretization:
        """The sigma grid of diffusers' ``EulerDiscreteScheduler.set_timesteps`` (also Heun, LMS, Euler a)."""
        n = _check_steps(steps)
        spacing = self.spacing or spacing_default
        ts = spaced_timesteps(self.num_train_timesteps, n, spacing, self.steps_offset, integer=False)
        train = self._train_sigmas
        sig = np.interp(ts, np.arange(len(train)), train)
        if self.sigma_grid != "default":
            lo = self.sigma_min if self.sigma_min is not None else float(sig[-1])
            hi = self.sigma_max if self.sigma_max is not None else float(sig[0])
            sig = karras_sigmas(n, lo, hi, self.rho) if self.sigma_grid == "karras" else exponential_sigmas(n, lo, hi)
            ts = self.sigma_to_t(sig)
        last = float(train[0]) if self.final_sigma == "sigma_min" else 0.0
        sigmas = _f32(np.append(sig, last))
        smax = np.float32(sigmas.max())
        init = smax if spacing in ("linspace", "trailing") else (smax**2 + np.float32(1)) ** np.float32(0.5)
        return Discretization(sigmas=_frozen(sigmas), timesteps=_frozen(_f32(ts)), init_sigma=float(init))


@dataclass(frozen=True, eq=False)
class VESchedule:
    """Variance-exploding / EDM (Karras et al. 2022) schedule: ``t = sigma``, ``u = x0 + sigma eps``.

    Attributes:
        sigma_min, sigma_max: ends of the grid.
        sigma_grid: ``karras`` (rho) or ``exponential`` (geometric, the VE grid of Song et al.).
        rho: Karras rho.
        options: sampler options (see module docstring).
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_grid: str = "karras"
    rho: float = 7.0
    options: Mapping[str, Any] = field(default_factory=dict)

    kind = "ve"

    def __post_init__(self) -> None:
        _check_sigma_range(self.sigma_min, self.sigma_max)
        if self.sigma_grid not in ("karras", "exponential"):
            raise ValueError(f"sigma_grid must be 'karras' or 'exponential' for a VE schedule, got {self.sigma_grid!r}")

    def replace(self, **changes) -> VESchedule:
        """A copy with fields changed."""
        return dataclasses.replace(self, **changes)

    def alpha_sigma(self, t):
        """``(1, t)``: the model time is the noise level."""
        t = _host(t)
        tt = np.asarray(t, dtype=np.float64)
        return (1.0, float(tt)) if np.ndim(t) == 0 else (np.ones_like(tt), tt)

    def sigma_to_t(self, sigma):
        """Identity: ``t = sigma``."""
        return sigma

    def state(self, sigma: float) -> tuple[float, float, float]:
        """``(1, 1, sigma)``: the state is the model input."""
        return 1.0, 1.0, float(sigma)

    def discretize(self, steps: int, spacing_default: str = "") -> Discretization:
        """Karras or exponential sigmas from ``sigma_max`` to ``sigma_min``, then 0 (float64)."""
        n = _check_steps(steps)
        f = karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho) if self.sigma_grid == "karras" \
            else exponential_sigmas(n, self.sigma_min, self.sigma_max)
        sig = np.append(f, 0.0)
        return Discretization(sigmas=_frozen(sig), timesteps=_frozen(sig[:-1]), init_sigma=float(sig[0]))


@dataclass(frozen=True, eq=False)
class FlowSchedule:
    """Rectified-flow schedule (Liu et al. 2022; SD3 shift, Esser et al. 2024), as diffusers'
    ``FlowMatchEulerDiscreteScheduler``: ``u = (1 - s) x0 + s eps``, ``t = s * num_train_timesteps``.

    Attributes:
        num_train_timesteps: ``T``.
        shift: static time shift (ignored with ``use_dynamic_shifting``).
        use_dynamic_shifting, mu, time_shift_type: resolution-dependent shift (Flux): ``mu`` must
            be given (diffusers passes it to ``set_timesteps``).
        shift_terminal: stretch the grid so that it ends at this sigma.
        sigma_grid: ``default``, ``karras`` or ``exponential``.
        options: sampler options (``stochastic_sampling``, ...).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    mu: float | None = None
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    sigma_grid: str = "default"
    rho: float = 7.0
    options: Mapping[str, Any] = field(default_factory=dict)

    kind = "flow"

    def __post_init__(self) -> None:
        if isinstance(self.num_train_timesteps, bool) or int(self.num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift!r}")
        if self.sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid must be one of {SIGMA_GRIDS}, got {self.sigma_grid!r}")
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(f"time_shift_type must be 'exponential' or 'linear', got {self.time_shift_type!r}")

    def replace(self, **changes) -> FlowSchedule:
        """A copy with fields changed (e.g. ``mu=`` for dynamic shifting)."""
        return dataclasses.replace(self, **changes)

    def alpha_sigma(self, t):
        """``(1 - s, s)`` with ``s = t / num_train_timesteps``."""
        t = _host(t)
        s = np.asarray(t, dtype=np.float64) / self.num_train_timesteps
        return (float(1 - s), float(s)) if np.ndim(t) == 0 else (1 - s, s)

    def sigma_to_t(self, sigma):
        """``t = s * num_train_timesteps``."""
        return sigma * self.num_train_timesteps

    def state(self, sigma: float) -> tuple[float, float, float]:
        """``(1, 1 - s, s)``: the state is the model input."""
        return 1.0, 1.0 - float(sigma), float(sigma)

    def _train_range(self) -> tuple[float, float]:
        # sigma_max / sigma_min of diffusers' __init__: shifted training sigmas in float32
        T = self.num_train_timesteps
        s = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy()) / T
        if not self.use_dynamic_shifting:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        return s[0].item(), s[-1].item()

    def discretize(self, steps: int, spacing_default: str = "") -> Discretization:
        """The grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (float32 values)."""
        n = _check_steps(steps)
        T = self.num_train_timesteps
        smax, smin = self._train_range()
        s = np.linspace(smax * T, smin * T, n) / T
        if self.use_dynamic_shifting:
            if self.mu is None:
                raise ValueError("use_dynamic_shifting needs mu (diffusers passes it to set_timesteps); "
                                 "use schedule.replace(mu=...)")
            em = math.exp(self.mu) if self.time_shift_type == "exponential" else self.mu
            s = em / (em + (1 / s - 1))
        else:
            s = shift_flow_sigmas(s, self.shift)
        if self.shift_terminal:
            if n < 2:
                raise ValueError(f"shift_terminal={self.shift_terminal} needs steps >= 2 (the stretch is 0/0 at one step)")
            one_minus = 1 - s
            s = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        if self.sigma_grid == "karras":
            s = karras_sigmas(n, float(s[-1]), float(s[0]), self.rho)
        elif self.sigma_grid == "exponential":
            s = exponential_sigmas(n, float(s[-1]), float(s[0]))
        s32 = np.asarray(s, dtype=np.float32)
        ts = (s32 * np.float32(T)).astype(np.float64)
        sigmas = np.append(s32.astype(np.float64), 0.0)
        return Discretization(sigmas=_frozen(sigmas), timesteps=_frozen(ts), init_sigma=1.0)


Schedule = Union[VPSchedule, VESchedule, FlowSchedule]
"""Any fastdiff schedule."""


def is_schedule(obj: Any) -> bool:
    """Whether ``obj`` is a fastdiff schedule object (not a config)."""
    return isinstance(obj, (VPSchedule, VESchedule, FlowSchedule))


def _check_train_timesteps(value: Any, name: str = "num_train_timesteps") -> int:
    """``value`` as an int >= 2 (an int, or a float holding one, as JSON configs may), else ``ValueError``."""
    ok = not isinstance(value, bool) and (
        isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()))
    if not ok or int(value) < 2:
        raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    return int(value)


def check_trained_betas(trained_betas: Any) -> torch.Tensor:
    """``trained_betas`` as diffusers reads them (``torch.tensor(trained_betas, dtype=torch.float32)``),
    refused by name unless they are a non-empty 1-D sequence of numbers in ``(0, 1]``.

    ``1`` is allowed: zero terminal SNR ends on it. diffusers itself takes any array: strings and
    2-D arrays fail later with unrelated errors, and NaN, zero, negative or > 1 betas give NaN or
    meaningless samples.
    """
    if isinstance(trained_betas, (str, bytes)) or not hasattr(trained_betas, "__len__"):
        raise TypeError(f"trained_betas must be a 1-D sequence of numbers (betas in (0, 1]), got "
                        f"{type(trained_betas).__name__} {_short(trained_betas)}")
    try:
        if isinstance(trained_betas, torch.Tensor):
            if trained_betas.is_complex():
                raise TypeError("complex")
            betas = trained_betas.detach().to("cpu", torch.float32)
        else:
            betas = torch.tensor(trained_betas, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"trained_betas must be a 1-D sequence of numbers (betas in (0, 1]), got "
                        f"{_short(trained_betas)} ({' '.join(str(exc).split())})") from None
    if betas.dim() != 1:
        raise ValueError(f"trained_betas must be 1-D, got shape {tuple(betas.shape)}")
    if betas.numel() == 0:
        raise ValueError("trained_betas is empty: give one beta per training timestep")
    bad = ~((betas > 0) & (betas <= 1))  # NaN compares False: bad
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"trained_betas[{i}] = {float(betas[i]):g}: betas must lie in (0, 1] "
                         f"({int(bad.sum())} of {betas.numel()} do not)")
    return betas


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def vp(beta_schedule: str = "linear", *, num_train_timesteps: int | None = None, beta_start: float = 0.0001,
       beta_end: float = 0.02, trained_betas=None, rescale_betas_zero_snr: bool = False,
       **grid) -> VPSchedule:
    """A :class:`VPSchedule` from diffusers' beta arguments; ``grid`` sets the grid fields
    (``spacing``, ``steps_offset``, ``sigma_grid``, ``sigma_min``, ``sigma_max``, ``final_sigma``,
    ``rho``, ``options``).

    ``num_train_timesteps``: ``None`` means 1000, or ``len(trained_betas)`` when those are given.
    With both, as in a diffusers config: fewer betas than ``num_train_timesteps`` raise
    ``ValueError`` (diffusers indexes a beta per training timestep: its DDPM/DDIM step fails with
    an ``IndexError``, its Euler-type and multistep grids clamp or turn NaN); more are kept, as
    diffusers keeps them, with the grids spaced over ``num_train_timesteps`` (``train_timesteps``).
    """
    if trained_betas is not None:
        betas = check_trained_betas(trained_betas)
        n = betas.numel()
        if n < 2:
            raise ValueError(f"trained_betas must have at least 2 entries (one per training timestep), got {n}")
        T = n if num_train_timesteps is None else _check_train_timesteps(num_train_timesteps)
        if n < T:
            raise ValueError(f"trained_betas has {n} entries but num_train_timesteps is {T}: diffusers needs a "
                             f"beta for every training timestep 0..{T - 1} (its DDPM/DDIM step fails with an "
                             f"IndexError, its other schedulers clamp or give NaN); give {T} betas or "
                             f"num_train_timesteps={n}")
    else:
        T = 1000 if num_train_timesteps is None else _check_train_timesteps(num_train_timesteps)
        betas = vp_betas(beta_schedule, T, beta_start, beta_end)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(f"betas must lie in (0, 1]: beta_schedule={beta_schedule!r} with beta_start="
                             f"{beta_start!r}, beta_end={beta_end!r} gives betas from {float(betas.min()):g} to "
                             f"{float(betas.max()):g}")
    if rescale_betas_zero_snr:
        betas = _rescale(betas)
    acp = torch.cumprod(1.0 - betas, dim=0)
    if T != len(betas):
        grid = {**grid, "train_timesteps": T}
    return VPSchedule(betas=betas.double().numpy(), alphas_cumprod=acp.double().numpy(), **grid)


_rescale = rescale_betas_zero_snr


# ----------------------------------------------------------------------------- configs


def _as_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config.items())
    if hasattr(config, "config") and isinstance(config.config, Mapping):  # a scheduler object
        return dict(config.config.items())
    raise TypeError(f"config must be a dict or a diffusers scheduler config, got {type(config).__name__}")


def from_config(config: Any) -> Schedule:
    """A schedule from a diffusers scheduler config (dict, ``FrozenDict`` or a scheduler).

    Flow configs (``FlowMatch*`` classes, or a ``shift`` key without betas) give a
    :class:`FlowSchedule`, every other config a :class:`VPSchedule`. Sampler keys go to
    ``options``. Raises ``ValueError`` naming any key that would change results and is not
    supported (unknown keys, ``use_beta_sigmas=True``, ``timestep_type='continuous'``, ...).
    """
    cfg = _as_dict(config)
    defaulted = set(cfg.get("_use_default_values") or ())
    cls = str(cfg.get("_class_name", ""))
    # the kind is decided on the raw keys: a scheduler's own config lists every key as defaulted
    is_flow = cls.startswith("FlowMatch") or (
        not cls and bool(_FLOW_ONLY & set(cfg)) and not (_VP_ONLY & set(cfg)))
    # Defaulted keys take the default of the class the sampler mirrors, as in diffusers' from_config,
    # but only where those defaults differ between classes (options, spacing); the values that
    # define the noise schedule (betas, T, shift) are what the scheduler uses, so they are kept.
    cfg = {k: v for k, v in cfg.items()
           if k not in IGNORED_CONFIG_KEYS and not (k in defaulted and k in _PER_CLASS_DEFAULTS)}
    grid_keys = _FLOW_KEYS if is_flow else _VP_KEYS
    options, grid = {}, {}
    for k, v in cfg.items():
        if k in SAMPLER_CONFIG_KEYS:
            options[k] = v
        elif k in grid_keys:
            only = _ONLY.get(k) or (None if is_flow else _VP_FLOW_OFF.get(k))
            if only is not None and v not in only:
                raise ValueError(f"config key {k}={v!r} is not supported by fastdiff (supported: {only[0]!r})")
            grid[k] = v
        else:
            kind = "flow" if is_flow else "VP"
            raise ValueError(f"config key {k!r} (value {v!r}) is not supported for a {kind} schedule; "
                             "it would change results, so fastdiff refuses to ignore it")
    if options.get("prediction_type") is not None:
        from .plan import check_prediction  # validates the name early

        check_prediction(options["prediction_type"])
    karras, expo = bool(grid.get("use_karras_sigmas")), bool(grid.get("use_exponential_sigmas"))
    if karras and expo:
        raise ValueError("use_karras_sigmas and use_exponential_sigmas cannot both be true")
    sigma_grid = "karras" if karras else "exponential" if expo else "default"
    if is_flow:
        return FlowSchedule(
            num_train_timesteps=int(grid.get("num_train_timesteps", 1000)),
            shift=float(grid.get("shift", 1.0) if grid.get("shift") is not None else 1.0),
            use_dynamic_shifting=bool(grid.get("use_dynamic_shifting", False)),
            time_shift_type=grid.get("time_shift_type") or "exponential",
            shift_terminal=grid.get("shift_terminal"),
            sigma_grid=sigma_grid, options=options,
        )
    bs = grid.get("beta_schedule", "linear")
    if bs not in BETA_SCHEDULES and grid.get("trained_betas") is None:
        raise ValueError(f"config key beta_schedule={bs!r} is not supported (supported: {BETA_SCHEDULES})")
    return vp(
        bs, num_train_timesteps=grid.get("num_train_timesteps", 1000),
        beta_start=float(grid.get("beta_start", 0.0001)), beta_end=float(grid.get("beta_end", 0.02)),
        trained_betas=grid.get("trained_betas"), rescale_betas_zero_snr=bool(grid.get("rescale_betas_zero_snr")),
        spacing=grid.get("timestep_spacing"), steps_offset=int(grid.get("steps_offset") or 0),
        sigma_grid=sigma_grid, sigma_min=grid.get("sigma_min"), sigma_max=grid.get("sigma_max"),
        final_sigma=grid.get("final_sigmas_type") or "zero", options=options,
    )
