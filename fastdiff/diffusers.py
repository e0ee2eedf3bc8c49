"""Drop into diffusers: schedulers whose ``step`` is fastdiff's fused kernel, and accelerated pipelines.

Schedulers::

    from fastdiff.diffusers import from_diffusers
    pipe.scheduler = from_diffusers(pipe.scheduler)          # same config, same timesteps, fused step

:func:`from_diffusers` returns an instance of a dynamic subclass of the scheduler's own class
(same class name and module, so configs and ``save_pretrained`` stay diffusers'). Everything except
``step`` is diffusers' code: ``set_timesteps`` (every grid option diffusers has, custom
``timesteps``/``sigmas``/``mu``), ``scale_model_input``, ``add_noise``, ``set_begin_index``,
``timesteps``, ``sigmas``, ``init_noise_sigma``, ``order``, ``config``. After ``set_timesteps`` the
plan rows are built from the scheduler's OWN arrays (``timesteps``, ``sigmas``), so ``step`` call
``i`` of a run runs row ``i`` (Heun's two calls per step are two rows). Multistep history lives on
the scheduler object (``fastdiff_history``).

Noise: with ``generator`` (or ``variance_noise``) the noise is drawn exactly as diffusers draws it
(same shape, dtype and generator calls), so trajectories match the stock scheduler. Without one,
diffusers would draw from torch's global RNG; the fused step instead generates counter-based
Philox noise inside the kernel, keyed by a seed drawn from torch's global RNG at the first noisy
step after ``set_timesteps`` (so ``torch.manual_seed`` still makes runs reproducible, and the
noise does not depend on the device or the batch size — but it is not the stock scheduler's noise).
DDPM with a learned variance scales its noise per element before the kernel, so without a
generator it draws from torch's global RNG exactly as diffusers does.

``step`` returns what diffusers' step returns: its output class (``DDIMSchedulerOutput``, ...) or,
with ``return_dict=False``, a tuple of the same length. Where that includes ``pred_original_sample``
(DDPM, DDIM, Euler, Euler ancestral, Heun, LMS) the data estimate is computed only when it is read
(attribute, key, ``to_tuple``, tuple entry 1): the fused kernel does not write it, so a loop that
reads ``prev_sample`` only (every pipeline's ``step(...)[0]``) pays one pass over the tensors.

Supported classes, config options and ``step`` arguments are listed in :data:`SUPPORT` (see
:func:`support_table`). Any other config key or value, or a ``step`` argument the fused step
cannot honour, raises ``ValueError`` naming it. ``step``'s ``model_output``, ``timestep`` and
``sample`` are checked before anything runs: what diffusers' own step accepts is accepted with the
same result (a model output that broadcasts against the sample, 0-d tensors, a one-element timestep
tensor, a numpy model output in the classes whose arithmetic takes one); what makes it fail with an
unrelated error (a string or a list, several timesteps, a first timestep not in
``scheduler.timesteps``, shapes that do not broadcast, tensors on two devices) raises a
``TypeError`` / ``ValueError`` naming the argument. The one fallback: ``LMSDiscreteScheduler`` runs
that start later than step 0 (``set_begin_index``, img2img) use diffusers' own step, with a
warning, because diffusers' LMS then truncates its coefficient set in a way no plan row expresses.

Pipelines::

    from fastdiff.diffusers import accelerate, restore
    accelerate(pipe)     # pipe(...) now runs fastdiff's loop: one fused kernel per step, CFG blend inside
    restore(pipe)        # back to the stock __call__

Supported: ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``StableDiffusion3Pipeline``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import ops, samplers
from .args import StepArgs, clip_code, pack_row
from .guidance import Guidance, threshold_bound
from .executor import StopSampling
from .loop import LoopOptions, draw_noise, run_plan
from .plan import MAX_READS, Plan, Row, check_prediction, combo
from .plans import OwnGrid
from .rng import expand_seeds
from .samplers._multistep import Grid, log_snr
from .schedules import Discretization, FlowSchedule, VPSchedule

__all__ = ["from_diffusers", "accelerate", "restore", "support_table", "SUPPORT"]

# ------------------------------------------------------------------------------------- schedules


@dataclass(frozen=True, eq=False)
class _OwnVP(OwnGrid, VPSchedule):
    arrays: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class _OwnFlow(OwnGrid, FlowSchedule):
    arrays: Mapping[str, Any] = field(default_factory=dict)


def _host(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float64).numpy()
    return np.asarray(t, dtype=np.float64)


# ------------------------------------------------------------------------------------- class table

_GRID_KEYS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
    "timestep_spacing", "steps_offset", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
    "sigma_min", "sigma_max", "final_sigmas_type", "interpolation_type", "timestep_type", "use_lu_lambdas",
    "lambda_min_clipped", "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift", "base_shift",
    "max_shift", "base_image_seq_len", "max_image_seq_len", "shift_terminal", "use_flow_sigmas",
})
"""Config keys consumed by diffusers' own ``set_timesteps``: any value diffusers accepts is supported,
because the rows are built from the arrays it computes (``use_flow_sigmas`` also sets how DPM-Solver
and UniPC read those sigmas: ``alpha = 1 - s``, ``sigma_t = s``; the rows do the same)."""

_META_KEYS = frozenset({"_class_name", "_diffusers_version", "_use_default_values", "_name_or_path"})

_CLIP = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
_THRESH = ("thresholding", "dynamic_thresholding_ratio", "sample_max_value")


@dataclass(frozen=True)
class _Spec:
    """How one diffusers scheduler class maps onto a fastdiff sampler.

    Attributes:
        sampler: config -> registered sampler name.
        grid: how the scheduler's arrays become the sampler's grid: ``timesteps`` (integer
            timesteps: DDPM, DDIM), ``sigmas`` (Euler-type), ``heun`` (interleaved Heun arrays),
            ``multistep`` (DPM-Solver / UniPC) or ``flow``.
        options: config keys handed to the sampler (which validates their values).
        only: config key -> the only values supported.
        step_options: ``step()`` argument -> sampler option it sets.
        step_only: ``step()`` argument -> the only value supported.
        step_ignored: ``step()`` arguments diffusers accepts and does not use (or that only matter
            together with an argument in ``step_only``).
        fixed: sampler options always set.
        noise_dtype: dtype diffusers draws noise in (``None``: the model output's).
        out_dtype: the dtype of diffusers' ``prev_sample``: ``promote`` (of the sample and the model
            output), ``model`` (the model output's: diffusers casts to it) or ``sample`` (the
            sample's); a callable ``config -> one of those`` where it depends on the config.
        indexed: keeps ``step_index`` (else the row follows the timestep value: DDPM, DDIM).
        restart: how a run starting after row 0 (``set_begin_index``) is planned: ``rows`` (rows
            do not depend on earlier ones), ``slice`` (re-plan the multistep run from there),
            ``stock`` (diffusers' own step, with a warning).
        slice_options: ``(config, start, n) -> options`` for a run over rows ``start..n-1``.
        needs_set_timesteps: diffusers' step refuses to run before ``set_timesteps`` (others run
            on the grid their constructor sets, and so does the drop-in).
        predictions: the ``prediction_type`` values diffusers' step implements for the class.
        check: ``config -> None``, raising ``ValueError`` for a combination of values it refuses.
        note: what :func:`support_table` says about ``check``.
        step_plan: ``step()`` arguments that change the plan through ``adjust`` (any value).
        x0_float32: diffusers computes ``pred_original_sample`` from the sample upcast to float32.
        build: ``(scheduler, arrays, prediction, options) -> plan`` where the rows are not (only)
            a registered sampler's (``None``: build the sampler's plan).
        model_output: ``(config, model_output) -> the part of it the step uses``.
        no_integer_timestep: diffusers' step refuses integer timesteps (indices by mistake).
        plan_key: ``step() arguments -> key`` of the plan they select (``()``: the plain plan).
        adjust: ``(scheduler, plan, dict(key), start) -> plan``: the rows those arguments ask for.
        array_model_output: diffusers' step also takes a numpy ``model_output`` (its arithmetic
            mixes it with tensors); the drop-in converts it (elsewhere diffusers' step fails, and
            the drop-in refuses it by name).
        noise_shape: the shape diffusers draws a step's noise in: ``model_output`` (the model
            output's own, which broadcasts against the sample), ``sample``, or ``broadcast`` (of the
            two); a callable ``config -> one of those`` where it depends on the config.
    """

    sampler: Callable[[Mapping], str]
    grid: str
    options: tuple[str, ...] = ()
    only: Mapping[str, tuple] = field(default_factory=dict)
    step_options: Mapping[str, str] = field(default_factory=dict)
    step_only: Mapping[str, Any] = field(default_factory=dict)
    step_ignored: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    noise_dtype: torch.dtype | None = None
    out_dtype: str | Callable[[Mapping], str] = "promote"
    indexed: bool = True
    restart: str = "rows"
    slice_options: Callable[[Mapping, int, int], dict] | None = None
    needs_set_timesteps: bool = False
    predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    check: Callable[[Mapping], None] | None = None
    note: str = ""
    step_plan: tuple[str, ...] = ()
    x0_float32: bool = False
    build: Callable[[Any, dict, str, dict], Plan | None] | None = None
    model_output: Callable[[Mapping, torch.Tensor], torch.Tensor] | None = None
    no_integer_timestep: bool = False
    plan_key: Callable[[Mapping], tuple] | None = None
    adjust: Callable[[Any, Plan, dict, int], Plan] | None = None
    array_model_output: bool = False
    noise_shape: str | Callable[[Mapping], str] = "model_output"


def _named(name: str) -> Callable[[Mapping], str]:
    return lambda cfg: name


_DPM_NAMES = {("dpmsolver++", 1): "dpmpp_1", ("dpmsolver++", 2): "dpmpp_2m", ("dpmsolver++", 3): "dpmpp_3m",
              ("sde-dpmsolver++", 1): "dpmpp_1_sde", ("sde-dpmsolver++", 2): "dpmpp_2m_sde",
              ("sde-dpmsolver++", 3): "dpmpp_3m_sde",
              ("dpmsolver", 1): "dpmsolver_1", ("dpmsolver", 2): "dpmsolver_2m", ("dpmsolver", 3): "dpmsolver_3m",
              ("sde-dpmsolver", 1): "dpmsolver_1_sde", ("sde-dpmsolver", 2): "dpmsolver_2m_sde"}


def _dpm_sampler(cfg: Mapping) -> str:
    return _DPM_NAMES[(cfg["algorithm_type"], int(cfg["solver_order"]))]


def _dpm_out_dtype(cfg: Mapping) -> str:
    # diffusers casts prev_sample to the dtype of the CONVERTED model output: the model output itself
    # where that is the estimate (x0 from prediction_type="sample" for dpmsolver++, eps from "epsilon"
    # for dpmsolver without thresholding, which converts through x0), else computed with the sample
    if cfg.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver"):
        own = cfg.get("prediction_type") == "epsilon" and not cfg.get("thresholding")
    else:
        own = cfg.get("prediction_type") == "sample"
    return "model" if own else "promote"


def _dpm_noise_shape(cfg: Mapping) -> str:
    # diffusers draws the SDE noise in the shape of the CONVERTED model output: the model output itself
    # where that is the estimate (as for the output dtype), else computed with the sample (broadcast)
    return "model_output" if _dpm_out_dtype(cfg) == "model" else "broadcast"


def _check_flow_sigmas(cfg: Mapping) -> None:
    """DPM-Solver / UniPC: ``flow_prediction`` is the velocity on a flow grid (``use_flow_sigmas``);
    ``v_prediction`` has no meaning there (diffusers computes ``(1 - s) x - s v``), nor noise estimates
    from a velocity (diffusers raises for them)."""
    p, flow = cfg.get("prediction_type"), bool(cfg.get("use_flow_sigmas", False))
    if p == "flow_prediction" and not flow:
        raise ValueError(f"prediction_type='flow_prediction' with use_flow_sigmas={flow!r} is not supported by "
                         "fastdiff.diffusers: a velocity needs the flow grid (use_flow_sigmas=True)")
    if p == "v_prediction" and flow:
        raise ValueError("prediction_type='v_prediction' with use_flow_sigmas=True is not supported by "
                         "fastdiff.diffusers (v needs alpha^2 + sigma^2 = 1; use flow_prediction)")
    if p == "flow_prediction" and (cfg.get("predict_x0") is False
                                   or cfg.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver")):
        raise ValueError("prediction_type='flow_prediction' needs a data-prediction solver (predict_x0=True, "
                         "algorithm_type dpmsolver++ / sde-dpmsolver++), as diffusers' step does")
    if cfg.get("algorithm_type") == "sde-dpmsolver" and cfg.get("solver_order") == 3:
        raise ValueError("algorithm_type='sde-dpmsolver' with solver_order=3 is not supported by fastdiff.diffusers: "
                         "diffusers has no third-order sde-dpmsolver update (its step fails there)")


_FLOW_NOTE = ("prediction_type=flow_prediction only with use_flow_sigmas=True and a data-prediction solver "
              "(predict_x0=True, algorithm_type *dpmsolver++); v_prediction not with use_flow_sigmas=True")
_DPM_NOTE = ("variance_type learned/learned_range: channels [:3] of an epsilon output, as diffusers slices; "
             + _FLOW_NOTE
             + "; not algorithm_type=sde-dpmsolver with solver_order=3 (diffusers has no such update)")
_UNIPC_NOTE = ("solver_p None; into sigma 0 (final_sigmas_type=zero) only predict_x0=True with a first-order last "
               "step (lower_order_final=True; diffusers returns NaN otherwise); " + _FLOW_NOTE)


_TIMESTEP_NOTE = ("step(timestep) one of scheduler.timesteps (a run may start at any of them); prediction_type="
                  "epsilon not where alpha_cumprod = 0 (zero terminal SNR: diffusers divides by 0 there)")


def _dpm_model_output(cfg: Mapping, m: torch.Tensor) -> torch.Tensor:
    # diffusers' convert_model_output: with a learned variance an epsilon output keeps channels [:3]
    # (hard-coded: pixel-space models); other prediction types are taken whole
    if cfg.get("variance_type") in ("learned", "learned_range") and cfg.get("prediction_type", "epsilon") == "epsilon":
        return m[:, :3]
    return m


def _dpm_slice(cfg: Mapping, start: int, n: int) -> dict:
    # diffusers lowers the order of the last two steps when the WHOLE run has < 15 steps; a sliced
    # plan sees fewer, so the rule is decided here on the full length.
    return {"lower_order_final": bool(cfg["lower_order_final"]) and n < 15}


def _unipc_slice(cfg: Mapping, start: int, n: int) -> dict:
    return {"disable_corrector": [int(k) - start for k in (cfg.get("disable_corrector") or ())]}


_MULTISTEP_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")
_PREDICTION_ALIASES = {"original_sample": "sample"}  # EulerDiscreteScheduler's second name for "sample"

_EULER_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


def _ddpm_learned(sched, arrays: dict, prediction: str, options: dict) -> Plan | None:
    """DDPMScheduler with ``variance_type="learned"`` / ``"learned_range"`` (DeepFloyd IF): the model
    output carries the variance in a second set of channels. The mean rows are ``fixed_small``'s with
    noise coefficient 1; the step passes the noise already scaled by the learned standard deviation,
    ``exp(0.5 (f log beta + (1 - f) log beta~))`` with ``f = (v + 1) / 2`` (``learned_range``) or
    ``sqrt(v)`` (``learned``), computed per element from the variance channels ``v`` as diffusers does.
    The rows record ``(log beta~, log beta)`` per step (``plan.meta["learned_variance"]``)."""
    vt = options.get("variance_type")
    if vt not in ("learned", "learned_range"):
        return None
    plan = samplers.build("ddpm", sched._fd_schedule(arrays), arrays["steps"], prediction=prediction,
                          **dict(options, variance_type="fixed_small"))
    acp, ts = _host(sched.alphas_cumprod), [int(t) for t in arrays["timesteps"]]
    logs, rows = [], []
    for i, row in enumerate(plan.rows):
        t, prev = ts[i], ts[i + 1] if i + 1 < len(ts) else -1
        a_t = float(np.float32(acp[t]))
        a_p = float(np.float32(acp[prev])) if prev >= 0 else 1.0
        beta = 1.0 - a_t / a_p
        var = max((1.0 - a_p) / (1.0 - a_t) * beta, 1e-20)
        logs.append((math.log(var), math.log(beta) if beta > 0 else -math.inf))
        rows.append(dataclasses.replace(row, out=row.out[:-1] + (1.0,)) if row.noise else row)
    return dataclasses.replace(plan, rows=tuple(rows), meta={**plan.meta, "learned_variance": (vt, tuple(logs))})


def _flow_inverted(sched, arrays: dict, prediction: str, options: dict) -> Plan | None:
    """FlowMatchEulerDiscreteScheduler with ``invert_sigmas=True``: the sigmas rise from 0 to 1, and
    diffusers' step is ``x' = x + (s' - s) v`` (``stochastic_sampling``: ``(1 - s') (x - s v) + s' z``),
    the formulas of the usual direction. Rows of those formulas (the Euler rows of ``flow_euler``
    divide by ``s``, which starts at 0 here)."""
    if not options.pop("invert_sigmas", False):
        return None
    disc = arrays["disc"]
    sig, ts, rows = disc.sigmas, disc.timesteps, []
    for i in range(len(ts)):
        s, s1 = float(sig[i]), float(sig[i + 1])
        # the data estimate of the model input (1 - s) x0 + s eps, as diffusers' stochastic step has it
        point = dict(t=float(ts[i]), sigma=s, in_scale=1.0, a_x=1.0, a_e=-s, alpha_t=1.0 - s, sigma_t=s)
        if options.get("stochastic_sampling"):
            rows.append(Row(**point, out=combo(d=1.0 - s1, z=s1), noise=True, step=i))
        else:
            rows.append(Row(**point, out=combo(x=1.0, e=s1 - s), step=i))
    return Plan(tuple(rows), init_scale=disc.init_sigma, sampler="flow_euler", prediction=prediction,
                steps=len(rows), meta={"invert_sigmas": True})


def _euler_churn_key(a: Mapping) -> tuple:
    # without churn the other three arguments have no effect: the plain plan serves every value
    if a.get("s_churn", 0.0) == 0:
        return ()
    return tuple((k, float(a[k])) for k in _EULER_CHURN if k in a)


def _euler_churn(sched, plan: Plan, args: dict, start: int) -> Plan:
    """diffusers' ``EulerDiscreteScheduler.step(s_churn=...)`` as rows.

    With ``gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax``
    and ``sigma_hat = sigma (1 + gamma)``, diffusers evaluates the model at ``sigma`` (as without
    churn), moves the sample to ``y = x + s_noise sqrt(sigma_hat^2 - sigma^2) z`` (noise drawn only
    where ``gamma > 0``) and takes the Euler step from ``sigma_hat``: ``x' = r y + (1 - r) x0(y, m)``,
    ``r = sigma_next / sigma_hat``, with its data estimate ``x0 = A y + B m`` (epsilon: ``A = 1``,
    ``B = -sigma_hat``; v: ``A = 1/(sigma^2 + 1)``, ``B = -sigma/sqrt(sigma^2 + 1)``; sample: ``A = 0``,
    ``B = 1``). That is linear in ``x``, ``m`` and ``z``: one row (``c_d = 0``).
    """
    s_churn = float(args.get("s_churn", 0.0))
    s_tmin, s_tmax, s_noise = (float(args.get(k, d)) for k, d in (("s_tmin", 0.0), ("s_tmax", math.inf),
                                                                   ("s_noise", 1.0)))
    sig = sched.sigmas.detach().to("cpu", torch.float32).numpy()
    gamma = min(s_churn / (len(sig) - 1), 2**0.5 - 1)
    pred = _PREDICTION_ALIASES.get(sched.config.prediction_type, sched.config.prediction_type)
    lo, hi = np.float32(s_tmin), np.float32(s_tmax)  # diffusers compares float32 sigmas
    rows = list(plan.rows)
    churned = {}  # row -> (A, B, c): diffusers' pred_original_sample is A (x + c z) + B m there
    for k, row in enumerate(rows):
        i = start + k
        s32 = sig[i]
        if gamma == 0 or not lo <= s32 <= hi:
            continue
        s = float(s32)
        s_hat = float(s32 * np.float32(gamma + 1))  # a float32 product in diffusers
        if s_hat <= 0.0:
            raise ValueError(f"EulerDiscreteScheduler.step(s_churn={s_churn!r}): sigma_hat = sigma * (1 + gamma) = "
                             f"{s_hat:g} at step {i}, where diffusers divides by it (NaN)")
        r = float(sig[i + 1]) / s_hat
        if pred == "epsilon":
            a, b = 1.0, -s_hat
        elif pred == "v_prediction":
            a, b = 1.0 / (s * s + 1.0), -s / math.sqrt(s * s + 1.0)
        else:
            a, b = 0.0, 1.0
        cy = r + (1.0 - r) * a
        c = s_noise * math.sqrt(s_hat * s_hat - s * s) if gamma > 0 else 0.0
        rows[k] = dataclasses.replace(row, out=combo(x=cy, e=(1.0 - r) * b, z=cy * c), noise=gamma > 0)
        churned[k] = (a, b, c)
    return dataclasses.replace(plan, rows=tuple(rows), meta={**plan.meta, "churn_x0": churned})


SUPPORT: dict[str, _Spec] = {
    "DDPMScheduler": _Spec(_named("ddpm"), "timesteps", ("variance_type", *_CLIP), indexed=False, build=_ddpm_learned,
                           note="variance_type in (fixed_small, fixed_small_log, fixed_large, learned, "
                                "learned_range: the variance channels of the model output, noise then drawn as "
                                "diffusers draws it also without a generator); " + _TIMESTEP_NOTE),
    "DDIMScheduler": _Spec(
        _named("ddim"), "timesteps", ("set_alpha_to_one", *_CLIP),
        step_options={"eta": "eta", "use_clipped_model_output": "use_clipped_model_output"}, indexed=False,
        needs_set_timesteps=True, note=_TIMESTEP_NOTE, array_model_output=True),
    "EulerDiscreteScheduler": _Spec(
        _named("euler"), "sigmas", step_plan=_EULER_CHURN, plan_key=_euler_churn_key, adjust=_euler_churn,
        out_dtype="model", x0_float32=True, no_integer_timestep=True,
        predictions=("epsilon", "v_prediction", "sample", "original_sample")),
    # diffusers' step raises NotImplementedError for prediction_type="sample"
    "EulerAncestralDiscreteScheduler": _Spec(_named("euler_ancestral"), "sigmas", out_dtype="model", x0_float32=True,
                                             no_integer_timestep=True,
                                             predictions=("epsilon", "v_prediction")),
    "HeunDiscreteScheduler": _Spec(_named("heun"), "heun", ("clip_sample", "clip_sample_range"),
                                   array_model_output=True),
    "LMSDiscreteScheduler": _Spec(_named("lms"), "sigmas", step_options={"order": "order"}, restart="stock",
                                  array_model_output=True,
                                  note=f"step(order) up to {MAX_READS + 1} (a row reads at most {MAX_READS} "
                                       "earlier derivatives)"),
    "DPMSolverMultistepScheduler": _Spec(
        _dpm_sampler, "multistep",
        ("solver_type", "lower_order_final", "euler_at_final", *_THRESH),
        only={"algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver"),
              "solver_order": (1, 2, 3), "variance_type": (None, "learned", "learned_range")},
        fixed={"flavor": "diffusers"}, noise_dtype=torch.float32, out_dtype=_dpm_out_dtype, restart="slice",
        slice_options=_dpm_slice, needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS,
        check=_check_flow_sigmas, note=_DPM_NOTE, model_output=_dpm_model_output, array_model_output=True,
        noise_shape=_dpm_noise_shape),
    "UniPCMultistepScheduler": _Spec(
        _named("unipc"), "multistep",
        ("solver_order", "solver_type", "lower_order_final", "disable_corrector", "predict_x0", "solver_p",
         *_THRESH),
        restart="slice", slice_options=_unipc_slice, needs_set_timesteps=True,
        predictions=_MULTISTEP_PREDICTIONS, out_dtype="sample", check=_check_flow_sigmas,
        note=_UNIPC_NOTE, array_model_output=True),
    "FlowMatchEulerDiscreteScheduler": _Spec(
        _named("flow_euler"), "flow", ("stochastic_sampling", "invert_sigmas"), build=_flow_inverted,
        step_only={"per_token_timesteps": None}, step_ignored=("s_churn", "s_tmin", "s_tmax", "s_noise"),
        noise_dtype=torch.float32, out_dtype="model", predictions=(), no_integer_timestep=True,
        noise_shape="sample"),
}
"""Supported diffusers scheduler classes (by name) and how each maps onto a fastdiff sampler."""


def support_table() -> str:
    """A plain-text table of the supported classes, config options and ``step`` arguments."""
    lines = [f"config keys handled by diffusers' own set_timesteps (any value): {', '.join(sorted(_GRID_KEYS))}"]
    for name, s in SUPPORT.items():
        only = ", ".join(f"{k} in {v}" for k, v in s.only.items())
        step = [f"{k} (any)" for k in (*s.step_options, *s.step_plan)]
        step += [f"{k}={v!r} only" for k, v in s.step_only.items()]
        step += [f"{k} (no effect)" for k in s.step_ignored]
        pred = (f"prediction_type in ({', '.join(s.predictions)})",) if s.predictions else ()
        lines.append(f"{name}: {', '.join(pred + s.options)}"
                     f"{'; only ' + only if only else ''}; step: {', '.join(step) or '-'}"
                     f"{'; generator noise in float32' if s.noise_dtype is not None else ''}"
                     f"{'; ' + s.note if s.note else ''}")
    return "\n".join(lines)


def _stock_class(cls: type) -> type:
    return getattr(cls, "_fd_stock", cls)


def _spec_of(cls: type) -> _Spec:
    import diffusers

    name = cls.__name__
    if name not in SUPPORT or getattr(diffusers, name, None) is not cls:
        raise TypeError(f"fastdiff.diffusers does not support scheduler class {cls.__module__}.{name}; "
                        f"supported: {', '.join(SUPPORT)}")
    return SUPPORT[name]


def _check_config(cls_name: str, spec: _Spec, cfg: Mapping) -> None:
    """Raise ``ValueError`` naming any config key (or value) the fused step does not implement."""
    for k, v in cfg.items():
        if k in _META_KEYS or k in _GRID_KEYS or k in spec.options or k == "prediction_type":
            continue
        if k in spec.only:
            if v not in spec.only[k]:
                raise ValueError(f"{cls_name} config {k}={v!r} is not supported by fastdiff.diffusers "
                                 f"(supported: {', '.join(map(repr, spec.only[k]))})")
            continue
        raise ValueError(f"{cls_name} config key {k!r} (value {v!r}) is not supported by fastdiff.diffusers; "
                         "it may change the step, so it is not ignored")
    if "prediction_type" in cfg:
        p = cfg["prediction_type"]
        if p not in spec.predictions:
            raise ValueError(f"{cls_name} config prediction_type={p!r} is not supported by fastdiff.diffusers "
                             f"(supported: {', '.join(map(repr, spec.predictions))}, as diffusers' step)")
        check_prediction(_PREDICTION_ALIASES.get(p, p))
    if spec.check is not None:
        spec.check(cfg)


# ------------------------------------------------------------------------------------- runs


@dataclass
class _Run:
    """One sampling run of a drop-in scheduler: its plan, first row and history ring."""

    plan: Plan | None  # None: diffusers' own step runs (documented fallback)
    start: int
    key: tuple
    index: dict = field(default_factory=dict)  # timestep value -> row (non-indexed classes)
    hist: list | None = None  # allocated at the run's first step


class _FusedScheduler:
    """Methods shared by every drop-in scheduler class (mixed in before the diffusers class)."""

    _fd_spec: _Spec
    _fd_stock: type

    # -- set-up --------------------------------------------------------------------------------

    _fd_ready = False  # set once the instance is a complete drop-in (not while diffusers' __init__ runs)

    def _fd_init(self, backend: str) -> None:
        self.fastdiff_backend = backend
        self._fd_reset()
        self._fd_ready = True

    def __reduce__(self):
        # the class has diffusers' name (pickle would find the stock class by it): rebuild this one
        return _new_fused, (self._fd_stock,), self.__dict__

    def _fd_reset(self) -> None:
        self._fd_plans: dict = {}
        self._fd_run: _Run | None = None
        self._fd_seed: int | None = None  # Philox key, drawn from torch's global RNG when first needed
        self._fd_seeds: tuple | None = None

    @property
    def fastdiff_history(self) -> list[torch.Tensor]:
        """The history ring of the current run (tensors shaped like the sample)."""
        return [] if self._fd_run is None or self._fd_run.hist is None else self._fd_run.hist

    def fastdiff_plan(self, start: int = 0, **step_args) -> Plan:
        """The plan of a run from row ``start`` with these ``step()`` arguments (``eta``, ``order``)."""
        run = self._fd_plan(start, self._fd_key(step_args))
        if run.plan is None:
            raise ValueError(f"{type(self).__name__} has no plan for a run from row {start} (stock step)")
        return run.plan

    def _fd_key(self, a: Mapping) -> tuple:
        spec = self._fd_spec
        key = tuple((k, a[k]) for k in spec.step_options if k in a)
        return key + spec.plan_key(a) if spec.plan_key is not None else key

    def _fd_arrays(self, start: int) -> tuple[dict, int]:
        spec = self._fd_spec
        ts = _host(self.timesteps)
        if spec.grid == "timesteps":
            return {"timesteps": ts, "steps": len(ts)}, len(ts)
        sig = _host(self.sigmas)
        if spec.grid == "heun":  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0] -> one entry per solver step
            ts, sig = np.concatenate([ts[:1], ts[1::2]]), np.concatenate([sig[:1], sig[1::2]])
        # step i moves sigmas[i] -> sigmas[i + 1]; entries past len(timesteps) + 1 are never used
        # (diffusers' Euler interpolation_type="log_linear" keeps one more)
        ts, sig = ts[start:], sig[start:len(ts) + 1]
        n = len(ts)
        if spec.grid == "multistep":
            if self.config.get("use_flow_sigmas", False):
                # diffusers' _sigma_to_alpha_sigma_t with use_flow_sigmas: alpha = 1 - s, sigma_t = s
                # (the state is the flow interpolation (1 - s) x0 + s eps)
                alphas = tuple(1.0 - float(s) for s in sig)
                stds, kind = tuple(float(s) for s in sig), "flow"
            else:
                # alpha = 1/sqrt(s^2 + 1), sigma_t = s * alpha
                alphas = tuple(1.0 / math.sqrt(s * s + 1.0) for s in sig)
                stds, kind = tuple(float(s) * a for s, a in zip(sig, alphas)), "vp"
            grid = Grid(tuple(map(float, ts)), tuple(map(float, sig)), alphas, stds,
                        tuple(log_snr(a, s) for a, s in zip(alphas, stds)), 1.0, kind)
            return {"grid": grid, "steps": n}, n
        init = float(getattr(self, "init_noise_sigma", 1.0)) if start == 0 else float(sig[0])
        disc = Discretization(sigmas=sig, timesteps=ts, init_sigma=init)
        return {"disc": disc, "steps": n}, n

    def _fd_schedule(self, arrays: dict):
        if self._fd_spec.grid == "flow":
            return _OwnFlow(num_train_timesteps=int(self.config.num_train_timesteps), arrays=arrays)
        acp = _host(self.alphas_cumprod)
        # trained_betas longer than num_train_timesteps: diffusers keeps them all, and DDIM's step jumps
        # num_train_timesteps // steps, not len(betas) // steps
        T = int(self.config.num_train_timesteps)
        return _OwnVP(betas=_host(self.betas), alphas_cumprod=acp, arrays=arrays,
                      train_timesteps=T if 2 <= T < len(acp) else None)

    def _fd_plan(self, start: int, key: tuple) -> _Run:
        spec = self._fd_spec
        name = type(self).__name__
        if spec.restart == "rows":
            start = 0  # rows do not depend on earlier rows: row i of the full plan serves any start
        cached = self._fd_plans.get((start, key))
        if cached is not None:
            return _Run(cached.plan, start, key, cached.index)
        if start > 0 and spec.restart == "stock":
            warnings.warn(f"fastdiff.diffusers: {name} run starting at step {start} (set_begin_index) uses "
                          "diffusers' own step (its LMS coefficients at a late start have no plan-row form)",
                          RuntimeWarning, stacklevel=4)
            run = _Run(None, start, key)
            self._fd_plans[(start, key)] = run
            return run
        cfg = self.config
        arrays, steps = self._fd_arrays(start)
        if spec.grid == "timesteps" and len(arrays["timesteps"]):
            n, top = len(self.alphas_cumprod), int(np.max(arrays["timesteps"]))
            if top >= n:  # diffusers' own step would index alphas_cumprod[top] and fail with an IndexError
                raise ValueError(f"{name}: timestep {top} has no beta: trained_betas has {n} entries but "
                                 f"num_train_timesteps is {cfg.num_train_timesteps}; give a beta for every training "
                                 "timestep")
        options = {k: cfg[k] for k in spec.options if k in cfg}
        options.update(spec.fixed)
        options.update({spec.step_options[k]: v for k, v in key if k in spec.step_options})
        if spec.slice_options is not None:
            options.update(spec.slice_options(cfg, start, start + steps))
        prediction = cfg.get("prediction_type") or ("flow" if spec.grid == "flow" else "eps")
        prediction = _PREDICTION_ALIASES.get(prediction, prediction)
        plan = spec.build(self, arrays, prediction, options) if spec.build is not None else None
        if plan is None:
            plan = samplers.build(spec.sampler(cfg), self._fd_schedule(arrays), steps, prediction=prediction,
                                  **options)
        if spec.adjust is not None and any(k in spec.step_plan for k, _ in key):
            plan = spec.adjust(self, plan, dict(key), start)
        want = _host(self.timesteps)[start:].astype(np.float32)
        got = np.array([r.t for r in plan.rows]).astype(np.float32)
        if len(got) != len(want) or not np.array_equal(got, want):
            raise RuntimeError(f"fastdiff.diffusers: the {plan.sampler} plan for {name} has {len(got)} rows that "
                               f"do not follow scheduler.timesteps ({len(want)} from row {start}); this is a bug")
        index = {}
        if not spec.indexed:
            for i, t in enumerate(_host(self.timesteps)):
                index.setdefault(float(t), i)
        run = _Run(plan, start, key, index)
        self._fd_plans[(start, key)] = run
        return _Run(plan, start, key, index)

    # -- step ----------------------------------------------------------------------------------

    def _fd_args(self, a: dict) -> dict:
        """``step``'s ``model_output``, ``timestep`` and ``sample`` checked before anything runs: where
        diffusers' own step fails on them with an unrelated error, a ``TypeError`` / ``ValueError``
        naming the argument; what it accepts passes (a numpy model output where its arithmetic takes
        one, a zero-dimensional CPU tensor beside a tensor on another device)."""
        spec = self._fd_spec
        name = type(self).__name__
        m, t, x = a["model_output"], a["timestep"], a["sample"]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}.step: sample must be a torch.Tensor, got {type(x).__name__} {_short(x)}")
        if isinstance(m, np.ndarray) and spec.array_model_output:
            try:
                m = torch.as_tensor(m, device=x.device)
            except (TypeError, RuntimeError) as exc:
                raise TypeError(f"{name}.step: model_output must be a tensor of numbers, got a numpy array of "
                                f"dtype {m.dtype} ({exc})") from None
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"{name}.step: model_output must be a torch.Tensor, got {type(m).__name__} {_short(m)}")
        if m.device != x.device:
            if m.dim() == 0 and m.device.type == "cpu":  # a CPU scalar mixes with any device, as in torch
                m = m.to(x.device)
            elif x.dim() == 0 and x.device.type == "cpu":
                x = x.to(m.device)
            else:
                raise ValueError(f"{name}.step: model_output is on {m.device} but sample is on {x.device}")
        if isinstance(t, (torch.Tensor, np.ndarray)):
            if isinstance(t, np.ndarray):
                n, real = t.size, t.dtype.kind in "iuf"
            else:
                n, real = t.numel(), not (t.dtype == torch.bool or t.is_complex())
            if n != 1:
                raise ValueError(f"{name}.step: timestep must be one value (one of scheduler.timesteps), got a "
                                 f"{type(t).__name__} of shape {tuple(t.shape)}")
            if not real:
                raise TypeError(f"{name}.step: timestep must be a real number (one of scheduler.timesteps), got a "
                                f"{t.dtype} {type(t).__name__}")
        elif not isinstance(t, numbers.Real):
            raise TypeError(f"{name}.step: timestep must be a number or a one-element tensor (one of "
                            f"scheduler.timesteps), got {type(t).__name__} {_short(t)}")
        return dict(a, model_output=m, sample=x)

    def _fd_shape(self, m: torch.Tensor, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of the step's result: ``model_output`` and ``sample`` broadcast together, as
        diffusers' arithmetic does (usually they are equal), else a ``ValueError`` naming both."""
        if m.shape == x.shape:
            return tuple(x.shape)
        try:
            return tuple(torch.broadcast_shapes(m.shape, x.shape))
        except RuntimeError:
            raise ValueError(f"{type(self).__name__}.step: model_output {tuple(m.shape)} does not match sample "
                             f"{tuple(x.shape)} (nor broadcasts against it, as diffusers' step would need)") from None

    def _fd_step(self, a: dict):
        spec = self._fd_spec
        name = type(self).__name__
        a = self._fd_args(a)
        for k, v in spec.step_only.items():
            val = a.get(k)
            if not (val is v or (isinstance(val, (int, float)) and val == v)):
                raise ValueError(f"{name}.step({k}={_short(val)}) is not supported by the fused step "
                                 f"(supported: {k}={v!r}); use the stock scheduler for it")
        if spec.no_integer_timestep and isinstance(a["timestep"], (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` "
                             "as a timestep.")
        if spec.needs_set_timesteps and self.num_inference_steps is None:
            raise ValueError(f"{name}: number of inference steps is None; call set_timesteps before step")
        key = self._fd_key(a)
        m, timestep, x = a["model_output"], a["timestep"], a["sample"]
        run = self._fd_run
        if spec.indexed:
            if self.step_index is None:
                if getattr(self, "begin_index", None) is None and np.ndim(timestep) > 1:  # diffusers' lookup fails
                    raise ValueError(f"{name}.step: timestep must be a single value of shape () or (1,) (one of "
                                     f"scheduler.timesteps), got shape {tuple(np.shape(timestep))}")
                try:
                    self._init_step_index(timestep)  # diffusers' bookkeeping: begin_index or timestep lookup
                except IndexError:  # diffusers' lookup found no such timestep (its error names nothing)
                    raise ValueError(f"{name}.step(timestep={_short(timestep)}): the first step of a run needs one "
                                     "of scheduler.timesteps (its position is looked up by value)") from None
            i = self.step_index
            if run is None:
                run = self._fd_run = self._fd_plan(i, key)
            elif run.key != key:
                raise ValueError(f"{name}.step arguments {dict(key)} differ from earlier steps of this run "
                                 f"{dict(run.key)}; call set_timesteps to start a new run")
        else:
            if run is None or run.key != key:
                run = self._fd_run = self._fd_plan(0, key)
            t = float(timestep.item() if isinstance(timestep, torch.Tensor) else np.asarray(timestep).reshape(-1)[0])
            if t not in run.index:
                raise ValueError(f"{name}.step(timestep={t:g}): the fused step needs one of scheduler.timesteps")
            i = run.index[t]
        if run.plan is None:
            return self._fd_stock.step(**a)
        k = i - run.start
        plan = run.plan
        if not 0 <= k < len(plan.rows):
            last = run.start + len(plan.rows) - 1
            raise IndexError(f"{name}.step: step index {i} is outside this run (rows {run.start}..{last}); "
                             "call set_timesteps first")
        row = plan.rows[k]
        if spec.model_output is not None:
            m = spec.model_output(self.config, m)
            a = dict(a, model_output=m)
        learned = plan.meta.get("learned_variance")
        if learned is not None:  # DDPM learned variances: [mean; variance] channels, as diffusers splits them
            c = x.shape[1] if x.dim() > 1 else 0
            if x.dim() < 2 or m.dim() < 2 or m.shape[1] != 2 * c:
                raise ValueError(f"{name}(variance_type={learned[0]!r}).step needs the model output's variance "
                                 f"channels: model_output.shape[1] == 2 * sample.shape[1], got {tuple(m.shape)} for a "
                                 f"sample of {tuple(x.shape)}")
            m, var_out = torch.split(m, c, dim=1)
            a = dict(a, model_output=m)
        shape = self._fd_shape(m, x)  # the result's shape
        work = shape if shape else (1,)  # the kernel's: a batch dimension (diffusers also takes 0-d tensors)
        how = spec.noise_shape(self.config) if callable(spec.noise_shape) else spec.noise_shape
        draw = {"model_output": tuple(m.shape), "sample": tuple(x.shape)}.get(how, shape)  # diffusers' noise shape
        if row.noise and a.get("variance_noise") is None and not draw:
            raise ValueError(f"{name}.step: this step draws noise, which diffusers draws per batch row: the "
                             f"{how.replace('_', ' ')} needs a batch dimension (got a 0-d tensor)")
        dt = torch.promote_types(x.dtype, m.dtype)
        if run.hist is None:
            if row.stage != 0:
                raise ValueError(f"{name}: a run cannot start at step index {i}, the second stage of a solver step")
            run.hist = [torch.zeros(work, dtype=dt, device=x.device) for _ in range(plan.n_slots)]
        elif run.hist:
            h = run.hist[0]
            if h.shape != work or h.device != x.device:
                raise ValueError(f"{name}.step: sample changed to {shape} on {x.device} in the middle of a "
                                 f"run (was {tuple(h.shape)} on {h.device}); call set_timesteps to start a new run")
            # the dtype may change mid-run (diffusers casts prev_sample to a half-precision model output's
            # dtype): compute in the wider of the two, as diffusers mixes the history it keeps with the new one
            wide = torch.promote_types(h.dtype, dt)
            if wide != h.dtype:
                run.hist[:] = [t.to(wide) for t in run.hist]
            dt = wide
        xx = x.to(dt).expand(shape).reshape(work).contiguous()
        mm = m.to(dt).expand(shape).reshape(work).contiguous()
        if learned is not None and row.noise:
            gen = a.get("generator")  # (torch's RNG without one)
            z = draw_noise(tuple(m.shape), gen if gen is None else _generator(name, gen), m.dtype, m.device)
            lo, hi = learned[1][k]
            v = var_out.to(torch.float64 if dt == torch.float64 else torch.float32)
            if learned[0] == "learned_range":
                f = (v + 1) / 2
                std = torch.exp(0.5 * (f * hi + (1 - f) * lo))
            else:
                std = v**0.5
            z, seeds = (std * z.to(std.dtype)).to(dt).expand(shape).reshape(work).contiguous(), None
        else:
            z, seeds = self._fd_noise(row, a, mm, m.dtype, draw, shape)
        out, bound = _run_row(row, plan, i, xx, mm, run.hist, z=z, seeds=seeds, backend=self.fastdiff_backend)
        how = spec.out_dtype(self.config) if callable(spec.out_dtype) else spec.out_dtype
        out = out.to({"model": m.dtype, "sample": x.dtype}.get(how, torch.promote_types(x.dtype, m.dtype)))
        out = out.reshape(shape)
        self._fd_after(row, i)
        out_cls = _output_class(self._fd_stock)
        if "pred_original_sample" not in {f.name for f in dataclasses.fields(out_cls)}:
            return out_cls(prev_sample=out) if a.get("return_dict", True) else (out,)
        # the stock step also returns its data estimate: computed only if read (one more pass)
        x0 = functools.partial(_reshaped, shape, functools.partial(
            _data_estimate, row, plan, k, xx, mm, z, bound, x.dtype, m.dtype, spec.x0_float32, type(self).__name__))
        if not a.get("return_dict", True):
            return _StepTuple(out, x0)
        return _lazy_output(out_cls, out, x0)

    def _fd_noise(self, row: Row, a: Mapping, m: torch.Tensor, model_dtype: torch.dtype,
                  draw: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None):
        """The step's noise: ``(z, None)`` (``z`` in ``m``'s compute dtype and shape) or ``(None, philox seeds)``.

        diffusers draws in the dtype of the model output AS GIVEN (``model_dtype``, which may be
        narrower than the compute dtype of a float32 sample), or in float32 (``noise_dtype``), and in
        the shape ``draw`` (usually ``m``'s), broadcast to the result's ``shape``.
        """
        if not row.noise:
            return None, None
        name = type(self).__name__
        draw = tuple(m.shape) if draw is None else draw
        shape = tuple(m.shape) if shape is None else shape
        nd = self._fd_spec.noise_dtype
        ext = a.get("variance_noise")
        if ext is not None:
            if not isinstance(ext, torch.Tensor):
                raise TypeError(f"{name}.step: variance_noise must be a torch.Tensor, got {type(ext).__name__}")
            ext = ext.to(device=m.device, dtype=nd) if nd is not None else ext.to(device=m.device)
            try:
                ext = ext.expand(shape)
            except RuntimeError:
                raise ValueError(f"{name}.step: variance_noise {tuple(ext.shape)} does not broadcast to the sample's "
                                 f"shape {shape}") from None
            return ext.to(m.dtype).reshape(m.shape).contiguous(), None
        gen = a.get("generator")
        if gen is not None:
            z = draw_noise(draw, _generator(name, gen), nd or model_dtype, m.device)
            return z.to(m.dtype).expand(shape).reshape(m.shape).contiguous(), None
        b = m.shape[0]
        if self._fd_seed is None:
            self._fd_seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
        if self._fd_seeds is None or self._fd_seeds[0] != (b, m.device):
            s = torch.tensor(expand_seeds(self._fd_seed, b), dtype=torch.int64, device=m.device)
            self._fd_seeds = ((b, m.device), s)
        return None, self._fd_seeds[1]

    def _fd_after(self, row: Row, i: int) -> None:
        """Keep the stock scheduler's public state what diffusers' step would leave."""
        if self._fd_spec.indexed:
            self._step_index += 1
        if hasattr(self, "lower_order_nums"):
            self.lower_order_nums = min(self.lower_order_nums + 1, int(self.config.solver_order))
        if self._fd_spec.grid == "heun":  # state_in_first_order is `dt is None`
            self.dt = (self.sigmas[i + 1] - self.sigmas[i]) if row.stage == 0 else None


def _short(v) -> str:
    if isinstance(v, torch.Tensor):  # its value only where reading it costs nothing (a CPU scalar)
        one = v.numel() == 1 and v.device.type == "cpu" and not v.is_complex()
        return f"{v.item()!r}" if one else f"<tensor {tuple(v.shape)}>"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _generator(name: str, gen):
    """``step(generator=...)`` where noise is drawn: a ``torch.Generator`` or a list of them (per sample)."""
    gens = gen if isinstance(gen, (list, tuple)) else [gen]
    if not gens or not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(f"{name}.step: generator must be a torch.Generator (or a list of them, one per sample), "
                        f"got {_short(gen)}")
    return gen


def _reshaped(shape: tuple[int, ...], fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    return fn().reshape(shape)


def _run_row(row: Row, plan: Plan, i: int, x: torch.Tensor, m: torch.Tensor, hist: list, *, z, seeds,
             backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One fused step of ``row`` from ``x`` with model output ``m`` into a new tensor; also the
    per-sample clip bound the row used (``None`` without clipping)."""
    h_read = tuple(hist[k] for k in row.reads)
    coef = pack_row(row, fold=True)
    clip = clip_code(row)
    s = None
    if clip == 1:
        s = torch.full((x.shape[0],), float(plan.clip_range), dtype=torch.float32, device=x.device)
    elif clip == 2:
        s = threshold_bound(x, m, None, None, None, coef, plan.threshold_ratio, plan.threshold_max)
    out = torch.empty_like(x)
    args = StepArgs(x=x, out=out, m=m, coef=coef, row=i, h_read=h_read,
                    h_write=tuple(hist[w.slot] for w in row.writes), s=s, clip=clip, seeds=seeds, z=z)
    ops.step(args, backend)
    return out, s


def _data_estimate(row: Row, plan: Plan, k: int, x: torch.Tensor, m: torch.Tensor, z, bound, x_dtype, m_dtype,
                   upcast32: bool, name: str) -> torch.Tensor:
    """diffusers' ``pred_original_sample`` of the step row ``k`` of ``plan`` ran (clipped as the row
    clips it), in the dtype diffusers returns it in."""
    if plan.prediction == "x0" and row.clip is None:
        return m.to(m_dtype)  # diffusers hands the model output itself back
    cdt = torch.float64 if torch.float64 in (x.dtype, m.dtype) else torch.float32
    xc, mc = x.to(cdt), m.to(cdt)
    churn = plan.meta.get("churn_x0", {}).get(k)
    if churn is not None:  # Euler with churn: the estimate of the churned sample y = x + c z
        a, b, c = churn
        if c:
            if z is None:
                raise ValueError(f"{name}: pred_original_sample of a step with s_churn > 0 needs the step's noise; "
                                 "pass a generator (without one the noise is drawn inside the fused kernel)")
            xc = xc + c * z.to(cdt)
        d = a * xc + b * mc
    else:
        d = row.a_x * xc + row.a_e * mc
    if row.clip is not None:
        s = bound.to(device=d.device, dtype=cdt).reshape((-1,) + (1,) * (d.dim() - 1))
        d = torch.minimum(torch.maximum(d, -s), s)
        if row.clip == "dynamic":
            d = d / s
    if plan.prediction == "x0":
        return d.to(m_dtype)
    return d.to(torch.promote_types(torch.float32 if upcast32 else x_dtype, m_dtype))


def _output_class(cls: type) -> type:
    """The output dataclass diffusers' ``cls.step`` returns (``<Class>Output`` of its module, else
    ``SchedulerOutput``)."""
    import sys

    out = getattr(sys.modules.get(cls.__module__), cls.__name__ + "Output", None)
    if out is None:
        from diffusers.schedulers.scheduling_utils import SchedulerOutput

        out = SchedulerOutput
    return out


class _StepTuple(tuple):
    """``(prev_sample, pred_original_sample)`` as diffusers' ``step(return_dict=False)`` returns it,
    with the second entry computed on first access (pipelines read ``[0]`` only)."""

    def __new__(cls, prev: torch.Tensor, x0: Callable[[], torch.Tensor]):
        t = super().__new__(cls, (prev, None))
        t._fd_x0 = x0
        return t

    def _entries(self) -> tuple:
        if self._fd_x0 is not None:
            self._fd_value, self._fd_x0 = self._fd_x0(), None
        return (tuple.__getitem__(self, 0), self._fd_value)

    def __getitem__(self, i):
        if isinstance(i, int) and i in (0, -2):
            return tuple.__getitem__(self, 0)
        return self._entries()[i]

    def __iter__(self):
        yield tuple.__getitem__(self, 0)
        yield self._entries()[1]

    def __eq__(self, other):
        return self._entries() == other

    def __ne__(self, other):
        return not self == other

    __hash__ = tuple.__hash__

    def __repr__(self) -> str:
        return repr(self._entries())

    def __reduce__(self):
        return tuple, (self._entries(),)

    def count(self, value) -> int:
        return self._entries().count(value)

    def index(self, value, *args) -> int:
        return self._entries().index(value, *args)


_LAZY_OUTPUTS: dict[type, type] = {}


def _lazy_output(out_cls: type, prev: torch.Tensor, x0: Callable[[], torch.Tensor]):
    """An ``out_cls`` (diffusers' step output) whose ``pred_original_sample`` is computed on first
    access (attribute, key, iteration, ``to_tuple``)."""
    lazy = _LAZY_OUTPUTS.get(out_cls)
    if lazy is None:
        def force(self):
            fn = self.__dict__.get("_fd_x0")
            if fn is not None:
                self.__dict__["_fd_x0"] = None
                v = fn()
                self.__dict__["_fd_value"] = v
                OrderedDict.__setitem__(self, "pred_original_sample", v)

        def getter(self):
            force(self)
            return self.__dict__.get("_fd_value")

        def setter(self, v):
            self.__dict__["_fd_value"] = v

        def forcing(name):
            base = getattr(out_cls, name)

            def method(self, *args, **kwargs):
                force(self)
                return base(self, *args, **kwargs)

            method.__name__ = name
            return method

        ns = {"__module__": __name__, "__qualname__": out_cls.__qualname__, "__doc__": out_cls.__doc__,
              "pred_original_sample": property(getter, setter),
              **{n: forcing(n) for n in ("__getitem__", "keys", "values", "items", "to_tuple", "__iter__", "__len__",
                                         "__contains__", "__repr__", "__eq__", "get", "__reduce__")}}
        lazy = _LAZY_OUTPUTS[out_cls] = type(out_cls.__name__, (out_cls,), ns)
    out = lazy(prev_sample=prev)
    out.__dict__["_fd_x0"] = x0
    return out


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """The drop-in subclass of diffusers scheduler class ``cls`` (made once per class)."""
    if cls in _FUSED_CLASSES:
        return _FUSED_CLASSES[cls]
    spec = _spec_of(cls)
    stock_set, stock_step = cls.set_timesteps, cls.step
    step_sig = inspect.signature(stock_step)

    stock_init = cls.__init__

    @functools.wraps(stock_init)
    def __init__(self, *args, **kwargs):
        # FusedClass(**config), FusedClass.from_config(...) / from_pretrained(...): a drop-in as well
        stock_init(self, *args, **kwargs)
        _check_config(cls.__name__, spec, self.config)
        self._fd_init("auto")

    @functools.wraps(stock_set)
    def set_timesteps(self, *args, **kwargs):
        stock_set(self, *args, **kwargs)
        self._fd_reset()
        if self._fd_ready:  # (diffusers' __init__ sets a grid of its own first: planned when used)
            self._fd_plan(0, ())  # build now: a config the rows cannot express fails here, not mid-run

    @functools.wraps(stock_step)
    def step(self, *args, **kwargs):
        bound = step_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        return self._fd_step(bound.arguments)

    ns = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_fd_spec": spec, "_fd_stock": cls,
          "__init__": __init__, "set_timesteps": set_timesteps, "step": step,
          "__doc__": f"{cls.__name__} whose step runs fastdiff's fused kernel (see fastdiff.diffusers).\n\n"
                     f"{cls.__doc__ or ''}"}
    fused = type(cls.__name__, (_FusedScheduler, cls), ns)
    _FUSED_CLASSES[cls] = fused
    return fused


def _new_fused(stock_cls: type):
    """An empty instance of the drop-in class of ``stock_cls`` (unpickling fills its state)."""
    fused = _fused_class(stock_cls)
    return fused.__new__(fused)


def _check_scheduler(scheduler: Any) -> _Spec:
    cls = _stock_class(type(scheduler))
    spec = _spec_of(cls)
    _check_config(cls.__name__, spec, scheduler.config)
    return spec


def from_diffusers(scheduler: Any, backend: str = "auto"):
    """A drop-in copy of a diffusers ``scheduler`` whose ``step`` runs fastdiff's fused kernel.

    Args:
        scheduler: a configured diffusers scheduler of a class in :data:`SUPPORT` (its state,
            including timesteps already set, is copied; the original is not changed).
        backend: ``auto``, ``reference``, ``cpu``, ``triton`` or ``cuda`` for every ``step``.

    Returns:
        An instance of a subclass of ``type(scheduler)`` with the same config and attributes.

    Raises:
        TypeError: the class is not supported.
        ValueError: a config key or value the fused step does not implement (named in the message).
    """
    _check_scheduler(scheduler)
    ops.requested_backend(backend)  # validates the name
    cls = _stock_class(type(scheduler))
    fused = _fused_class(cls).__new__(_fused_class(cls))
    state = {k: v for k, v in scheduler.__dict__.items() if not k.startswith("_fd_")}
    fused.__dict__.update(copy.deepcopy(state))
    fused._fd_init(backend)
    if getattr(scheduler, "num_inference_steps", None) is not None:
        try:
            fused._fd_plan(0, ())
        except ValueError:
            # the grid in place may be the one the constructor set (Heun, LMS: every training timestep),
            # which pipelines replace with set_timesteps before stepping; a config that no grid can serve
            # fails there, and a step on this grid raises the same error
            fused._fd_plans = {}
    return fused


# ------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class _PipeSpec:
    """How one pipeline class is accelerated.

    Attributes:
        supported: ``__call__`` arguments the accelerated loop honours (all others must keep
            their default values).
        prepare: ``(pipe, args, do_cfg) -> (model, cond, uncond, latents, extra)``.
        finish: ``(pipe, latents, args, extra) -> pipeline output``.
        step_generator: whether the stock loop hands ``generator`` to ``scheduler.step`` (else
            the stock step draws from torch's global RNG, and so do we).
    """

    supported: frozenset
    prepare: Callable
    finish: Callable
    step_generator: bool = True


_COMMON = frozenset({"prompt", "height", "width", "num_inference_steps", "guidance_scale", "negative_prompt",
                     "num_images_per_prompt", "generator", "latents", "prompt_embeds", "negative_prompt_embeds",
                     "output_type", "return_dict", "clip_skip", "callback_on_step_end",
                     "callback_on_step_end_tensor_inputs"})


def _sd_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

    h = a["height"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if not isinstance(pipe.unet.config.sample_size, int) and not (a["height"] and a["width"]):
        h, w = (pipe.unet.config.sample_size[0] * pipe.vae_scale_factor,
                pipe.unet.config.sample_size[1] * pipe.vae_scale_factor)
    pipe.check_inputs(a["prompt"], h, w, None, a["negative_prompt"], a["prompt_embeds"], a["negative_prompt_embeds"])
    device = pipe._execution_device
    lora_scale = (a["cross_attention_kwargs"] or {}).get("scale")
    pe, ne = pipe.encode_prompt(a["prompt"], device, a["num_images_per_prompt"], do_cfg, a["negative_prompt"],
                                prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                                lora_scale=lora_scale, clip_skip=a["clip_skip"])
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(pe.shape[0], pipe.unet.config.in_channels, h, w, pe.dtype, device,
                                   a["generator"], a["latents"])
    cak = a["cross_attention_kwargs"]

    def model(x, t, **cond):
        return pipe.unet(x, t, cross_attention_kwargs=cak, return_dict=False, **cond)[0]

    cond = {"encoder_hidden_states": pe}
    uncond = {"encoder_hidden_states": ne} if do_cfg else None
    return model, cond, uncond, latents, {"dtype": pe.dtype, "device": device}


def _sd_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput

    if a["output_type"] != "latent":
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=a["generator"])[0]
        image, nsfw = pipe.run_safety_checker(image, extra["device"], extra["dtype"])
    else:
        image, nsfw = latents, None
    denorm = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    image = pipe.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denorm)
    pipe.maybe_free_model_hooks()
    if not a["return_dict"]:
        return image, nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def _sdxl_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

    h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], h, w, None, a["negative_prompt"], a["negative_prompt_2"],
                      a["prompt_embeds"], a["negative_prompt_embeds"], a["pooled_prompt_embeds"],
                      a["negative_pooled_prompt_embeds"])
    device = pipe._execution_device
    lora_scale = (a["cross_attention_kwargs"] or {}).get("scale")
    pe, ne, pp, npp = pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], device=device, num_images_per_prompt=a["num_images_per_prompt"],
        do_classifier_free_guidance=do_cfg, negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], lora_scale=lora_scale,
        clip_skip=a["clip_skip"])
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, a["timesteps"], a["sigmas"])
    latents = pipe.prepare_latents(pe.shape[0], pipe.unet.config.in_channels, h, w, pe.dtype, device,
                                   a["generator"], a["latents"])
    proj = (int(pp.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim)
    ids = pipe._get_add_time_ids(a["original_size"] or (h, w), a["crops_coords_top_left"], a["target_size"] or (h, w),
                                 dtype=pe.dtype, text_encoder_projection_dim=proj)
    if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
        nids = pipe._get_add_time_ids(a["negative_original_size"], a["negative_crops_coords_top_left"],
                                      a["negative_target_size"], dtype=pe.dtype, text_encoder_projection_dim=proj)
    else:
        nids = ids
    n = pe.shape[0]
    cak = a["cross_attention_kwargs"]

    def model(x, t, **cond):
        return pipe.unet(x, t, cross_attention_kwargs=cak, return_dict=False, **cond)[0]

    def pack(e, pooled, time_ids):
        return {"encoder_hidden_states": e.to(device),
                "added_cond_kwargs": {"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(n, 1)}}

    uncond = pack(ne, npp, nids) if do_cfg else None
    return model, pack(pe, pp, ids), uncond, latents, {"dtype": pe.dtype, "device": device}


def _sdxl_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput

    if a["output_type"] == "latent":
        image = latents
    else:
        upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if upcast:
            pipe.upcast_vae()
            latents = latents.to(next(iter(pipe.vae.post_quant_conv.parameters())).dtype)
        mean = getattr(pipe.vae.config, "latents_mean", None)
        std = getattr(pipe.vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / pipe.vae.config.scaling_factor + mean
        else:
            latents = latents / pipe.vae.config.scaling_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        if upcast:
            pipe.vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=image) if a["return_dict"] else (image,)


def _sd3_prepare(pipe, a: dict, do_cfg: bool):
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

    h = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    w = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], a["prompt_3"], h, w, negative_prompt=a["negative_prompt"],
                      negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
                      prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                      pooled_prompt_embeds=a["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                      max_sequence_length=a["max_sequence_length"])
    device = pipe._execution_device
    lora_scale = (a["joint_attention_kwargs"] or {}).get("scale")
    pe, ne, pp, npp = pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"], negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
        do_classifier_free_guidance=do_cfg, prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device, clip_skip=a["clip_skip"],
        num_images_per_prompt=a["num_images_per_prompt"], max_sequence_length=a["max_sequence_length"],
        lora_scale=lora_scale)
    # the stock batch: given prompt_embeds are NOT repeated num_images_per_prompt times by SD3's
    # encode_prompt, while the latents are drawn for batch_size * num_images_per_prompt
    if isinstance(a["prompt"], str):
        batch = 1
    elif isinstance(a["prompt"], list):
        batch = len(a["prompt"])
    else:
        batch = a["prompt_embeds"].shape[0]
    latents = pipe.prepare_latents(batch * a["num_images_per_prompt"], pipe.transformer.config.in_channels, h, w,
                                   pe.dtype, device, a["generator"], a["latents"])
    if pe.shape[0] != latents.shape[0]:
        raise ValueError(f"fastdiff.diffusers.accelerate: StableDiffusion3Pipeline with prompt_embeds of batch "
                         f"{pe.shape[0]} and num_images_per_prompt={a['num_images_per_prompt']} gives "
                         f"{latents.shape[0]} latents: the stock pipeline does not repeat given prompt_embeds (it relies "
                         "on broadcasting, or fails); the accelerated loop does not broadcast. Repeat the embeddings "
                         "(prompt_embeds.repeat_interleave(n, 0), and the pooled/negative ones) or restore(pipe)")
    kw = {}
    cfg = pipe.scheduler.config
    if cfg.get("use_dynamic_shifting", None) and a["mu"] is None:
        p = pipe.transformer.config.patch_size
        kw["mu"] = calculate_shift((latents.shape[2] // p) * (latents.shape[3] // p),
                                   cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                   cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    elif a["mu"] is not None:
        kw["mu"] = a["mu"]
    retrieve_timesteps(pipe.scheduler, a["num_inference_steps"], device, sigmas=a["sigmas"], **kw)
    jak = a["joint_attention_kwargs"]

    def model(x, t, **cond):
        return pipe.transformer(hidden_states=x, timestep=t, joint_attention_kwargs=jak, return_dict=False, **cond)[0]

    def pack(e, pooled):
        return {"encoder_hidden_states": e, "pooled_projections": pooled}

    uncond = pack(ne, npp) if do_cfg else None
    return model, pack(pe, pp), uncond, latents, {"dtype": pe.dtype, "device": device}


def _sd3_finish(pipe, latents, a: dict, extra: dict):
    from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput

    if a["output_type"] == "latent":
        image = latents
    else:
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        image = pipe.vae.decode(latents, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if a["return_dict"] else (image,)


_SDXL_EXTRA = {"prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
               "original_size", "crops_coords_top_left", "target_size", "negative_original_size",
               "negative_crops_coords_top_left", "negative_target_size", "denoising_end"}
PIPELINES: dict[str, _PipeSpec] = {
    "StableDiffusionPipeline": _PipeSpec(
        _COMMON | {"timesteps", "sigmas", "eta", "cross_attention_kwargs", "guidance_rescale"}, _sd_prepare,
        _sd_finish),
    "StableDiffusionXLPipeline": _PipeSpec(
        _COMMON | _SDXL_EXTRA | {"timesteps", "sigmas", "eta", "cross_attention_kwargs", "guidance_rescale"},
        _sdxl_prepare, _sdxl_finish),
    "StableDiffusion3Pipeline": _PipeSpec(
        _COMMON | {"prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "pooled_prompt_embeds",
                   "negative_pooled_prompt_embeds", "sigmas", "joint_attention_kwargs", "max_sequence_length", "mu"},
        _sd3_prepare, _sd3_finish, step_generator=False),
}
"""Pipelines :func:`accelerate` supports, by class name."""


def _accelerated_call(self, *args, **kwargs):
    """The accelerated ``__call__`` (see :func:`accelerate`)."""
    stock = self._fd_stock_pipeline
    spec = PIPELINES[stock.__name__]
    sig = inspect.signature(stock.__call__)
    bound = sig.bind(self, *args, **kwargs)
    given = dict(bound.arguments)
    bound.apply_defaults()
    a = dict(bound.arguments)
    for name, value in given.items():
        p = sig.parameters[name]
        if name == "self" or name in spec.supported:
            continue
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            if value:
                raise TypeError(f"fastdiff.diffusers.accelerate: {stock.__name__}.__call__ arguments {sorted(value)} "
                                "are not supported by the accelerated loop; restore(pipe) to use them")
            continue
        if not _is_default(value, p.default):
            raise TypeError(f"fastdiff.diffusers.accelerate: {stock.__name__}.__call__ argument {name}={_short(value)} "
                            "is not supported by the accelerated loop; call fastdiff.diffusers.restore(pipe) to use it")
    with torch.no_grad():
        return _accelerated_run(self, spec, a)


def _is_default(value, default) -> bool:
    if value is default:
        return True
    try:
        return bool(value == default)
    except Exception:  # tensors and other objects without a plain truth value
        return False


def _accelerated_run(pipe, spec: _PipeSpec, a: dict):
    backend = pipe._fd_backend
    gs = float(a["guidance_scale"])
    pipe._guidance_scale = gs
    pipe._guidance_rescale = float(a.get("guidance_rescale") or 0.0)
    pipe._clip_skip = a["clip_skip"]
    pipe._cross_attention_kwargs = a.get("cross_attention_kwargs")
    pipe._joint_attention_kwargs = a.get("joint_attention_kwargs")
    pipe._interrupt = False
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if getattr(denoiser.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("fastdiff.diffusers.accelerate: a UNet with time_cond_proj_dim (guidance embedding, LCM) "
                         "is not supported")
    do_cfg = pipe.do_classifier_free_guidance
    _check_scheduler(pipe.scheduler)  # before the pipeline touches it
    model, cond, uncond, latents, extra = spec.prepare(pipe, a, do_cfg)
    if len(pipe.scheduler.timesteps) == 0:  # e.g. custom sigmas=[s]: the stock loop runs no step
        pipe._num_timesteps = 0
        return spec.finish(pipe, latents, a, extra)
    sched = from_diffusers(pipe.scheduler, backend=backend)  # after the pipeline's own set_timesteps
    step_args = {"eta": a["eta"]} if "eta" in a and "eta" in sched._fd_spec.step_options else {}
    plan = sched.fastdiff_plan(0, **step_args)
    if plan.meta.get("learned_variance") or sched.config.get("variance_type") in ("learned", "learned_range"):
        raise ValueError(f"fastdiff.diffusers.accelerate: {type(sched).__name__}(variance_type="
                         f"{sched.config.get('variance_type')!r}) reads variance channels of the model output, which "
                         "the accelerated loop does not; use a fixed variance type or restore(pipe)")
    de = a.get("denoising_end")
    if de is not None and isinstance(de, float) and 0 < de < 1:  # the stock test and cut-off, verbatim
        n_train = pipe.scheduler.config.num_train_timesteps
        cut = int(round(n_train - (de * n_train)))
        keep = len([t for t in pipe.scheduler.timesteps if t >= cut])
        plan = dataclasses.replace(plan, rows=plan.rows[:keep])
    gen = a["generator"]
    noise_dtype = sched._fd_spec.noise_dtype
    noise_fn = seeds = None
    if gen is not None or not spec.step_generator:
        g = gen if spec.step_generator else None

        def draw(i, x):  # exactly the stock step's randn_tensor call
            return draw_noise(tuple(x.shape), g, noise_dtype or x.dtype, x.device)

        noise_fn = draw
    elif any(r.noise for r in plan.rows):
        seeds = expand_seeds(int(torch.randint(0, 2**62, (1,), dtype=torch.int64)), latents.shape[0])
    guidance = Guidance(gs if do_cfg else None, None, pipe._guidance_rescale if do_cfg else 0.0)
    progress = not getattr(pipe, "_progress_bar_config", {}).get("disable", False)
    pipe._num_timesteps = len(sched.timesteps)
    post_step = _step_end_hook(pipe, a, sched.timesteps)
    opts = LoopOptions(guidance=guidance, cond=cond, uncond=uncond, seeds=seeds, noise_fn=noise_fn, backend=backend,
                       progress=progress, check_finite=pipe._fd_check_finite, post_step=post_step)
    # a callback that sets pipe._interrupt ends the loop there (StopSampling): the latents so far come back
    latents = run_plan(plan, model, latents, opts, in_place=False)
    return spec.finish(pipe, latents, a, extra)


class _Interrupted(StopSampling):
    """Raised by the step-end hook when a callback sets ``pipe._interrupt``: the loop returns the
    latents after that step."""


def _step_end_hook(pipe, a: dict, timesteps) -> Callable | None:
    """The pipeline's ``callback_on_step_end(pipe, i, t, {"latents": ...})`` as a loop ``post_step``.

    As in the stock loop it runs after every scheduler step, gets the latents after that step and
    may return new ones (or change them in place); setting ``pipe._interrupt`` skips the remaining
    steps. Only ``"latents"`` can be a tensor input: the other inputs (prompt embeddings, ...) feed
    the batched model call, which the accelerated loop prepares once.
    """
    cb = a.get("callback_on_step_end")
    if cb is None:
        return None
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    names = list(cb.tensor_inputs if isinstance(cb, (PipelineCallback, MultiPipelineCallbacks))
                 else a.get("callback_on_step_end_tensor_inputs") or [])
    bad = [k for k in names if k != "latents"]
    if bad:
        raise TypeError(f"fastdiff.diffusers.accelerate: callback_on_step_end_tensor_inputs {bad} are not supported "
                        "by the accelerated loop (only 'latents'); call fastdiff.diffusers.restore(pipe) to use them")
    allowed = getattr(pipe, "_callback_tensor_inputs", ["latents"])

    def post_step(i: int, x: torch.Tensor) -> None:
        kwargs = {"latents": x.clone()} if "latents" in names else {}
        out = cb(pipe, i, timesteps[i], kwargs) or {}
        changed = sorted(k for k in out if k != "latents" and k in allowed and out[k] is not None)
        if changed:
            raise TypeError(f"fastdiff.diffusers.accelerate: callback_on_step_end returned {changed}; the accelerated "
                            "loop can only take new 'latents'")
        new = out.get("latents", kwargs.get("latents"))
        if new is not None:
            if tuple(new.shape) != tuple(x.shape):
                raise ValueError(f"callback_on_step_end returned latents of shape {tuple(new.shape)}, "
                                 f"expected {tuple(x.shape)}")
            x.copy_(new)
        if getattr(pipe, "_interrupt", False):
            raise _Interrupted
    return post_step


_ACCEL_CLASSES: dict[type, type] = {}


def accelerate(pipe: Any, backend: str = "auto", check_finite: bool = False):
    """Make ``pipe(...)`` run fastdiff's loop: one fused kernel per step with the CFG blend inside it.

    The pipeline's own components do the rest (prompt encoding, ``set_timesteps`` of its
    scheduler, latent preparation, decoding), so ``pipe(...)`` with the same arguments and
    generator gives the stock image (within float rounding). The loop performs no host-device
    synchronisation. The scheduler must be supported by :func:`from_diffusers` (checked now and at
    every call, so a scheduler swapped in later is picked up).

    ``__call__`` keeps its signature; arguments outside the common set (the deprecated ``callback``,
    IP-adapter images, skip-layer guidance, ...) raise ``TypeError`` naming them unless left at
    their defaults. ``callback_on_step_end`` runs after every step as in the stock loop, with
    ``"latents"`` as its only tensor input (new latents it returns feed the next step, and
    ``pipe._interrupt`` stops the loop); other tensor inputs raise ``TypeError``.
    Without a ``generator``, solver noise is in-kernel Philox seeded from torch's global RNG
    (``StableDiffusion3Pipeline`` draws from the global RNG as its stock loop does).

    Args:
        pipe: a ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
            ``StableDiffusion3Pipeline``.
        backend: fused-step backend (``auto``, ``reference``, ``cpu``, ``triton``, ``cuda``).
        check_finite: raise :class:`fastdiff.NonFiniteError` after the loop if the model returned
            NaN/Inf (one extra reduction per step; off by default, as in the stock loop).

    Returns:
        ``pipe`` (changed in place: its class becomes an accelerated subclass).
    """
    cls = getattr(type(pipe), "_fd_stock_pipeline", type(pipe))
    import diffusers

    if cls.__name__ not in PIPELINES or getattr(diffusers, cls.__name__, None) is not cls:
        raise TypeError(f"fastdiff.diffusers.accelerate does not support {cls.__module__}.{cls.__name__}; "
                        f"supported: {', '.join(PIPELINES)}")
    ops.requested_backend(backend)
    _check_scheduler(pipe.scheduler)  # fails now for an unsupported scheduler (and again at every call)
    if cls not in _ACCEL_CLASSES:
        call = functools.wraps(cls.__call__)(lambda self, *a, **k: _accelerated_call(self, *a, **k))
        ns = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__call__": call,
              "_fd_stock_pipeline": cls}
        _ACCEL_CLASSES[cls] = type(cls.__name__, (cls,), ns)
    pipe.__class__ = _ACCEL_CLASSES[cls]
    object.__setattr__(pipe, "_fd_backend", backend)
    object.__setattr__(pipe, "_fd_check_finite", bool(check_finite))
    return pipe


def restore(pipe: Any):
    """Undo :func:`accelerate`: ``pipe(...)`` runs the stock loop again. Returns ``pipe``."""
    stock = getattr(type(pipe), "_fd_stock_pipeline", None)
    if stock is None:
        raise ValueError(f"{type(pipe).__name__} was not accelerated by fastdiff.diffusers.accelerate")
    pipe.__class__ = stock
    for k in ("_fd_backend", "_fd_check_finite"):
        pipe.__dict__.pop(k, None)
    return pipe
