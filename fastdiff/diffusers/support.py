"""What the diffusers drop-in supports: the class table, each class's config options and ``step``
arguments, and the schedules built from a scheduler's own arrays (:data:`SUPPORT`,
:func:`support_table`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import samplers
from ..core.plan import MAX_READS, Plan, Row, check_prediction, combo
from ..core.schedules import FlowSchedule, VPSchedule
from ..samplers.plans import OwnGrid


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
            do not depend on earlier ones), ``slice`` (re-plan the multistep run from there on the
            scheduler's arrays, with the options of the sampler's restart rule,
            :class:`fastdiff.samplers.Restart`, shared with ``fastdiff.sample``'s img2img),
            ``stock`` (diffusers' own step, with a warning).
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
        needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS,
        check=_check_flow_sigmas, note=_DPM_NOTE, model_output=_dpm_model_output, array_model_output=True,
        noise_shape=_dpm_noise_shape),
    "UniPCMultistepScheduler": _Spec(
        _named("unipc"), "multistep",
        ("solver_order", "solver_type", "lower_order_final", "disable_corrector", "predict_x0", "solver_p",
         *_THRESH),
        restart="slice", needs_set_timesteps=True,
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


