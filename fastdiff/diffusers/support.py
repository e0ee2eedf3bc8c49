"""What the diffusers drop-in supports: the class table, each class's config options and ``step``
arguments, and the schedules built from a scheduler's own arrays (:data:`SUPPORT`,
:func:`support_table`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .. import samplers
from ..core.plan import MAX_READS, Plan, Row, Write, check_prediction, combo, x0_coeffs
from ..core.schedules import FlowSchedule, VPSchedule
from ..samplers.plans import OwnGrid
from ..core.schedules import Discretization, VESchedule
from ..samplers import edm
from ..samplers._common import grid_point
from ..samplers._common import INF_SCALE
from ..samplers._multistep import Grid, log_snr


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
            ``multistep`` (DPM-Solver / UniPC), ``flow``, or ``own`` (the ``build`` hook reads the class's
            own arrays, PNDM's and IPNDM's: ``arrays`` has ``timesteps[start:]`` and ``start``).
        options: config keys handed to the sampler (which validates their values).
        only: config key -> the only values supported.
        step_options: ``step()`` argument -> sampler option it sets.
        step_only: ``step()`` argument -> the only value supported.
        step_only_why: ``step()`` argument of ``step_only`` -> why another value is refused (said by the
            refusal and by :func:`support_table`).
        step_ignored: ``step()`` arguments diffusers accepts and does not use (or that only matter
            together with an argument in ``step_only``).
        fixed: sampler options always set.
        noise_dtype: dtype diffusers draws noise in (``None``: the model output's; ``"promote"``: that
            of the sample and the model output together, the dtype of the estimate diffusers draws for;
            ``"float32_model"``: float32 promoted with the model output's, for an estimate of a sample
            diffusers casts to float32 first and the model output, as FlowMatchLCM's).
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
        array_sample: diffusers' step also takes a numpy ``sample`` (every use of it is arithmetic with
            tensors, whose result is a tensor: EDM DPM-Solver, PNDM); the drop-in converts it (elsewhere
            diffusers' step fails, and the drop-in refuses it by name).
        noise_shape: the shape diffusers draws a step's noise in: ``model_output`` (the model
            output's own, which broadcasts against the sample), ``sample``, or ``broadcast`` (of the
            two); a callable ``config -> one of those`` where it depends on the config.
        accepted: config keys read only by the drop-in's own hooks (``model_output``, ``build``):
            any value diffusers accepts is accepted (DPM-Solver's ``variance_type``).
        row_at: ``(scheduler, timestep, prediction, options) -> plan`` of one row, for a step at a
            timestep that is not in ``scheduler.timesteps`` (non-indexed classes whose stock step
            computes the step from the value: DDIM, DDPM on its training grid); ``None`` where diffusers'
            step fails there (the drop-in then refuses it by name).
        prefix_options: sampler options that switch off the end-of-run rules (lower order at the last
            steps), so that a plan of the first ``j`` steps has the rows of the whole run (used where
            a later row of the run cannot be planned, see ``scheduler._FusedScheduler._fd_partial``).
        prefix_exact: ``(config, n, j) -> m``: of a ``j``-step prefix plan of an ``n``-step run, the
            first ``m`` steps are the run's own (``None``: all ``j``).
        before_step: ``(scheduler, row, i, step arguments) -> noise or None``, run at every step before
            the kernel: refuses scheduler state the rows cannot follow (FlowMatchLCM's scale factors)
            and may return the row's noise drawn as diffusers draws it from its own state
            (DPMSolverSDE's Brownian tree, built at the first step as diffusers builds it).
        after_step: ``(scheduler, row, i, sample)``, run after the kernel: the public state diffusers'
            step leaves besides ``step_index`` (KDPM2's ``sample``, whose ``None`` is
            ``state_in_first_order``; DPMSolverSDE's ``mid_point_sigma``; SA-Solver's ``lower_order_nums``).
        counter: the attribute in which diffusers counts a run's ``step`` calls and picks the step by
            (PNDM's ``counter``; the drop-in keeps it): a run is the part of ``scheduler.timesteps`` it is
            given from count 0 (see ``scheduler._FusedScheduler._fd_counted``).
        output: the name of the output class of diffusers' step where it is not ``<Class>Output`` of the
            class's module (DDIMInverseScheduler returns ``DDIMSchedulerOutput``).
        shifted: ``(scheduler, plan, i) -> plan``: the rows of a run whose first call ``i`` is a second
            stage of ``plan``, which diffusers' step (no first stage kept) takes as a first stage
            (KDPM2's; Heun's and FlowMatchHeun's are ``scheduler._FusedScheduler._fd_shifted``'s own).
        step_row: ``(scheduler, run, k, step arguments) -> (plan, k) or None``: the row a call runs where it
            is not row ``k`` of the run's plan (``None``: that row), computed from what the call is given
            (SA-Solver: ``tau_func`` of the timestep as given and of the one given before; CogVideoXDPM: the
            ``timestep_back`` and ``old_pred_original_sample`` given).
        given_history: a ``step()`` argument whose tensor a row reads as history slot 0, copied into the ring
            before the kernel (CogVideoXDPM's ``old_pred_original_sample``: the pipeline keeps the previous
            estimate and passes it back, where other classes keep it on the scheduler).
        scalar_dtype: ``scheduler -> dtype`` of the scalar tensors diffusers' step multiplies by, where that may be
            wider than the sample's (CogVideoX's float64 ``alphas_cumprod`` of ``scaled_linear``): they widen the
            result where the sample and model output are both 0-d, where the timestep given has dimensions
            (shape (1,): so do the scalars indexed by it), or where the model output is a numpy array.
    """

    sampler: Callable[[Mapping], str]
    grid: str
    options: tuple[str, ...] = ()
    only: Mapping[str, tuple] = field(default_factory=dict)
    step_options: Mapping[str, str] = field(default_factory=dict)
    step_only: Mapping[str, Any] = field(default_factory=dict)
    step_only_why: Mapping[str, str] = field(default_factory=dict)
    step_ignored: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    noise_dtype: torch.dtype | str | None = None
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
    array_sample: bool = False
    noise_shape: str | Callable[[Mapping], str] = "model_output"
    accepted: tuple[str, ...] = ()
    row_at: Callable[[Any, int, str, dict], Plan | None] | None = None
    prefix_options: Mapping[str, Any] = field(default_factory=dict)
    prefix_exact: Callable[[Mapping, int, int], int] | None = None
    before_step: Callable[[Any, Row, int, Mapping], torch.Tensor | None] | None = None
    after_step: Callable[[Any, Row, int, torch.Tensor], None] | None = None
    counter: str | None = None
    output: str | None = None
    shifted: Callable[[Any, Plan, int], Plan] | None = None
    step_row: Callable[[Any, Any, int, Mapping], tuple[Plan, int] | None] | None = None
    given_history: str | None = None
    scalar_dtype: Callable[[Any], torch.dtype] | None = None


def _named(name: str) -> Callable[[Mapping], str]:
    return lambda cfg: name


_DPM_NAMES = {("dpmsolver++", 1): "dpmpp_1", ("dpmsolver++", 2): "dpmpp_2m", ("dpmsolver++", 3): "dpmpp_3m",
              ("sde-dpmsolver++", 1): "dpmpp_1_sde", ("sde-dpmsolver++", 2): "dpmpp_2m_sde",
              ("sde-dpmsolver++", 3): "dpmpp_3m_sde",
              ("dpmsolver", 1): "dpmsolver_1", ("dpmsolver", 2): "dpmsolver_2m", ("dpmsolver", 3): "dpmsolver_3m",
              ("sde-dpmsolver", 1): "dpmsolver_1_sde", ("sde-dpmsolver", 2): "dpmsolver_2m_sde"}


def _dpm_sampler(cfg: Mapping) -> str:
    # diffusers' step takes the third-order update for every solver_order above 3
    return _DPM_NAMES[(cfg["algorithm_type"], min(int(cfg["solver_order"]), 3))]


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


def _noise_solver(cfg: Mapping) -> bool:
    """DPM-Solver / UniPC: whether the config solves with noise estimates (``algorithm_type`` dpmsolver /
    sde-dpmsolver, ``predict_x0=False``)."""
    return cfg.get("predict_x0") is False or cfg.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver")


def _check_flow_sigmas(cfg: Mapping, v_on_flow: bool = False) -> None:
    """DPM-Solver / UniPC: ``flow_prediction`` is the velocity on a flow grid (``use_flow_sigmas``);
    ``v_prediction`` has no meaning there (diffusers computes ``(1 - s) x - s v``: taken as such where
    ``v_on_flow``), nor noise estimates from a velocity (diffusers raises for them)."""
    p, flow = cfg.get("prediction_type"), bool(cfg.get("use_flow_sigmas", False))
    if p == "flow_prediction" and not flow:
        raise ValueError(f"prediction_type='flow_prediction' with use_flow_sigmas={flow!r} is not supported by "
                         "fastdiff.diffusers: a velocity needs the flow grid (use_flow_sigmas=True)")
    if p == "v_prediction" and flow and not v_on_flow:
        raise ValueError("prediction_type='v_prediction' with use_flow_sigmas=True is not supported by "
                         "fastdiff.diffusers (v needs alpha^2 + sigma^2 = 1; use flow_prediction)")
    if p == "flow_prediction" and _noise_solver(cfg):
        raise ValueError("prediction_type='flow_prediction' needs a data-prediction solver (predict_x0=True, "
                         "algorithm_type dpmsolver++ / sde-dpmsolver++), as diffusers' step does")
    if cfg.get("algorithm_type") == "sde-dpmsolver" and cfg.get("solver_order") == 3:
        raise ValueError("algorithm_type='sde-dpmsolver' with solver_order=3 is not supported by fastdiff.diffusers: "
                         "diffusers has no third-order sde-dpmsolver update (its step fails there)")


_FLOW_NOTE = ("prediction_type=flow_prediction only with use_flow_sigmas=True and a data-prediction solver "
              "(predict_x0=True, algorithm_type *dpmsolver++); v_prediction not with use_flow_sigmas=True")
_FLOW_V_NOTE = ("prediction_type=flow_prediction only with use_flow_sigmas=True and a data-prediction solver "
                "(predict_x0=True, algorithm_type *dpmsolver++); v_prediction with use_flow_sigmas=True as "
                "diffusers reads it (x0 = (1 - s) x - s v; a noise-prediction solver: eps = s x + (1 - s) v); "
                "noise-prediction solvers (algorithm_type dpmsolver / sde-dpmsolver, predict_x0=False) on a flow "
                "grid take diffusers' float32 coefficients (their first step multiplies x by 1 / alpha, 1e3 for "
                "DPM-Solver, 1e6 for UniPC, and cancels it: diffusers' own float32 result is far from its formula "
                "there, and the drop-in's is no further)")
_DPM_NOTE = ("solver_order any int >= 1 (above 3: third order, as diffusers); variance_type any value "
             "(learned/learned_range: channels [:3] of an epsilon output, as diffusers slices; any other value is "
             "not read, as in diffusers); " + _FLOW_V_NOTE
             + "; not algorithm_type=sde-dpmsolver with solver_order >= 3 (diffusers has no such update)")
_UNIPC_NOTE = (f"solver_p None; coefficients in float32 as diffusers computes them (its float32 linalg.solve), their "
               "finite limit where those are inf/NaN; solver_order any int >= 1: every step up to order "
               f"{MAX_READS}; above, a step that reads more than a plan row's {MAX_READS} history buffers is refused "
               f"when it runs (predictor order {MAX_READS + 1} or more after a corrected step: the corrected sample "
               f"and {MAX_READS} earlier estimates; {MAX_READS + 2} or more after an uncorrected one), the steps "
               f"before it run (with lower_order_final, runs of up to {2 * MAX_READS} steps never reach one); into "
               "sigma 0 (final_sigmas_type=zero) only predict_x0=True with a first-order last step "
               "(lower_order_final=True; diffusers returns NaN otherwise: that step is refused when run); "
               + _FLOW_V_NOTE)


def _check_multistep(cfg: Mapping) -> None:
    """DPMSolverMultistep / UniPCMultistep: :func:`_check_flow_sigmas` (with diffusers' v on a flow grid),
    and DPM-Solver's ``solver_order``: any int >= 1 (diffusers' step runs the third-order update above 3;
    below 1 its history list is empty and its step fails)."""
    _check_flow_sigmas(cfg, v_on_flow=True)
    if "algorithm_type" in cfg:
        order = cfg.get("solver_order")
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"DPMSolverMultistepScheduler config solver_order={order!r} is not supported by "
                             "fastdiff.diffusers (an int >= 1, as diffusers' step needs)")
        if cfg.get("algorithm_type") == "sde-dpmsolver" and order >= 3:
            raise ValueError(f"algorithm_type='sde-dpmsolver' with solver_order={order} is not supported by "
                             "fastdiff.diffusers: diffusers has no third-order sde-dpmsolver update (its step fails)")


def _dpm_prefix_exact(cfg: Mapping, n: int, j: int) -> int:
    # diffusers lowers step n - 2 of a run of < 15 steps to second order (lower_order_final): a third-order
    # prefix plan (its end rules off) differs from the run there
    if int(cfg.get("solver_order", 2)) >= 3 and cfg.get("lower_order_final") and n < 15:
        return min(j, n - 2)
    return j


def _unipc_prefix_exact(cfg: Mapping, n: int, j: int) -> int:
    # lower_order_final: step i of UniPC has order min(solver_order, n - i), so order k drops at step n - k + 1
    k = int(cfg.get("solver_order", 2))
    if k >= 3 and cfg.get("lower_order_final"):
        return min(j, n - k + 1)
    return j


def _dpm_build(sched, arrays: dict, prediction: str, options: dict) -> Plan | None:
    """The build hook of DPMSolverMultistep: a noise-prediction solver on a flow grid (:func:`_noise_solver`,
    ``use_flow_sigmas``) takes diffusers' float32 coefficients (its first point has ``alpha = 1 - s`` of 1e-3,
    and ``x / alpha`` cancels against the estimate: a float64 plan drifts from diffusers' float32 formula
    there, as UniPC's (every UniPC plan takes them: ``_float32_build``)); ``None`` elsewhere (the sampler's
    plan)."""
    cfg = sched.config
    if not (cfg.get("use_flow_sigmas") and _noise_solver(cfg)):
        return None
    return _float32_build(sched._fd_spec.sampler(cfg))(sched, arrays, prediction, options)


_TIMESTEP_NOTE = ("step(timestep) any timestep diffusers' step computes from its value (DDIM: any integer; DDPM: "
                  "one of scheduler.timesteps, any before set_timesteps); coefficients in float32 as diffusers "
                  "computes them; a step whose diffusers result is inf/NaN (prediction_type=epsilon without clipping "
                  "where alpha_cumprod = 0) is refused when it runs")


def _dpm_model_output(cfg: Mapping, m: torch.Tensor) -> torch.Tensor:
    # diffusers' convert_model_output: with a learned variance an epsilon output keeps channels [:3]
    # (hard-coded: pixel-space models); other prediction types are taken whole
    if cfg.get("variance_type") in ("learned", "learned_range") and cfg.get("prediction_type", "epsilon") == "epsilon":
        return m[:, :3]
    return m


_MULTISTEP_PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow_prediction")
_PREDICTION_ALIASES = {"original_sample": "sample"}  # EulerDiscreteScheduler's second name for "sample"

_EULER_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")


_INF_SCALE = INF_SCALE
"""Stands for ``1 / sqrt(alpha_cumprod) = inf`` in an epsilon row that clips its data estimate
(:data:`fastdiff.samplers._common.INF_SCALE`, shared with the LCM rows)."""


def _f32(v) -> torch.Tensor:
    return torch.as_tensor(v, dtype=torch.float32)


def _vp_stock_rows(sched, name: str, ts, prevs, prediction: str, options: dict, ddim: bool,
                   step0: int = 0) -> tuple[list[Row], dict, tuple | None]:
    """Rows of DDPMScheduler / DDIMScheduler steps at timesteps ``ts`` (into ``prevs``), their scalars
    computed as diffusers' step computes them: in float32, in its expression order (the
    ``1 - abar_t / abar_prev`` of a small step keeps diffusers' rounding; elementwise float32
    arithmetic rounds as on diffusers' 0-d tensors, and ``log``/``exp`` run on 0-d tensors as there).
    Returns ``(rows, refused, learned)``: ``refused`` maps a row to the reason it cannot run
    (diffusers' own step gives inf/NaN or fails there; the row itself is a placeholder), ``learned``
    the ``(variance_type, (log var, log beta) per row)`` of DDPM's learned variances (else ``None``)."""
    acp = sched.alphas_cumprod.detach().to("cpu", torch.float32)
    n_acp = len(acp)
    final = _f32(sched.final_alpha_cumprod.detach().cpu()) if ddim else _f32(1.0)
    vt = options.get("variance_type", "fixed_small")
    learned = vt in ("learned", "learned_range")
    eta = float(options.get("eta", 0.0) or 0.0)
    clip = "dynamic" if options.get("thresholding") else "static" if options.get("clip_sample") else None
    clipped_eps = bool(options.get("use_clipped_model_output"))
    ts, prevs = [int(t) for t in ts], [int(p) for p in prevs]
    ok = [-n_acp <= t < n_acp for t in ts]
    a_t = acp[torch.tensor([t if o else 0 for t, o in zip(ts, ok)], dtype=torch.int64)]
    a_p = torch.where(torch.tensor([p >= 0 for p in prevs]),
                      acp[torch.tensor([p if p >= 0 else 0 for p in prevs], dtype=torch.int64)], final)
    # diffusers' expressions, elementwise over the rows (float32, as on its 0-d tensors)
    b_t = 1 - a_t
    sa, sb = a_t**0.5, b_t**0.5
    if ddim:
        var = ((1 - a_p) / b_t) * (1 - a_t / a_p)
        std = eta * var**0.5
        c_eps = (1 - a_p - std**2) ** 0.5
        c_d = a_p**0.5
        cols = {"c_eps": c_eps, "c_d": c_d, "std": std}
    else:
        b_p = 1 - a_p
        cur_a = a_t / a_p
        cur_b = 1 - cur_a
        var = torch.clamp((1 - a_p) / (1 - a_t) * cur_b, min=1e-20)
        cols = {"c_d": (a_p**0.5 * cur_b) / b_t, "c_x": cur_a**0.5 * b_p / b_t}
        if vt == "fixed_large":
            cols["std"] = cur_b**0.5
        elif vt not in ("fixed_small_log", "fixed_large_log"):  # fixed_small, and every value diffusers' _get_variance
            cols["std"] = var**0.5                             # does not name (it falls through to fixed_small)
    col = {k: v.tolist() for k, v in cols.items()}
    alphas, sigmas, a_ts, a_ps = sa.tolist(), sb.tolist(), a_t.tolist(), a_p.tolist()
    rows, refused, logs = [], {}, []
    for k, (t, prev) in enumerate(zip(ts, prevs)):
        what = f"{name}.step(timestep={t})"
        if not ok[k]:
            refused[k] = (f"{what}: alphas_cumprod has {n_acp} entries (none for this timestep), so diffusers' step "
                          "fails there (IndexError); refused")
            rows.append(_placeholder(t, step0 + k))
            logs.append((0.0, 0.0))
            continue
        alpha, sigma = alphas[k], sigmas[k]
        noisy = (eta > 0) if ddim else t > 0
        with np.errstate(all="ignore"):
            if ddim:
                c_eps, c_d, c_x, c_e = col["c_eps"][k], col["c_d"][k], 0.0, 0.0
                if clipped_eps:  # eps re-derived from the clipped x0: (x - sqrt(a) x0) / sqrt(b)
                    c_x, c_d = _div(c_eps, sigma), c_d - _div(c_eps * alpha, sigma)
                elif prediction == "eps":
                    c_e = c_eps
                elif prediction == "v":  # eps = sqrt(a) m + sqrt(b) x
                    c_x, c_e = c_eps * sigma, c_eps * alpha
                else:  # x0: eps = (x - sqrt(a) m) / sqrt(b)
                    c_x, c_e = _div(c_eps, sigma), -_div(c_eps * alpha, sigma)
                z = col["std"][k]
            else:
                c_d, c_x, c_e = col["c_d"][k], col["c_x"][k], 0.0
                if vt == "fixed_small_log":  # log and exp as diffusers runs them: on 0-d tensors
                    z = float(torch.exp(0.5 * torch.log(var[k])))
                elif vt == "fixed_large_log":
                    z = float(torch.log(cur_b[k]) ** 0.5)
                else:
                    z = 1.0 if learned else col["std"][k]
                if learned:
                    logs.append((float(torch.log(var[k])), float(torch.log(cur_b[k]))))
        if prediction == "eps" and alpha == 0.0:
            # x0 = (x - m) / 0: +-inf, which only a static clip makes finite (the dynamic threshold's quantile
            # of infinities interpolates inf - inf: NaN in diffusers)
            a_x, a_e = (_INF_SCALE, -_INF_SCALE * sigma) if clip == "static" else (math.inf, -math.inf)
        elif prediction == "eps":
            a_x, a_e = 1.0 / alpha, -sigma / alpha
        else:
            a_x, a_e = x0_coeffs(prediction, alpha, sigma)
        out = combo(x=c_x, d=c_d, e=c_e, z=z if noisy else 0.0)
        if not all(math.isfinite(v) for v in (a_x, a_e, *out)):
            inf_x0 = alpha == 0.0 and prediction == "eps"
            bad = "alphas_cumprod[t] = 0 (epsilon prediction: x0 = (x - m) / 0)" if inf_x0 \
                else f"alphas_cumprod[t] = {a_ts[k]:.3g}, alphas_cumprod[prev] = {a_ps[k]:.3g} (prev = {prev})"
            how = {None: ", without clipping", "dynamic": ", thresholded (a quantile of infinities)"}.get(clip, "")
            var_note = f" with {vt}" if not ddim and noisy else ""
            refused[k] = (f"{what}: diffusers' step gives inf/NaN here ({bad}{var_note}{how if inf_x0 else ''}); "
                          "refused")
            rows.append(_placeholder(t, step0 + k))
            continue
        ksig = math.sqrt((1.0 - alpha * alpha) / max(alpha * alpha, 2.0**-24))  # k-diffusion sigma, for callbacks
        rows.append(Row(t=float(t), sigma=ksig, in_scale=1.0, a_x=a_x, a_e=a_e, out=out, clip=clip, noise=noisy,
                        step=step0 + k, alpha_t=alpha, sigma_t=sigma))
    return rows, refused, ((vt, tuple(logs)) if learned else None)


def _div(a: float, b: float) -> float:
    """``a / b`` with IEEE results (inf, NaN) for ``b = 0``, as a float32 tensor division gives them."""
    return a / b if b != 0.0 else (math.nan if a == 0.0 or math.isnan(a) else math.copysign(math.inf, a) *
                                   math.copysign(1.0, b))


def _placeholder(t: float, step: int) -> Row:
    """A row that stands for one the drop-in refuses to run (``plan.meta["refused"]``)."""
    return Row(t=float(t), sigma=0.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=1.0), step=step)


def _vp_plan(sched, ts, prevs, prediction: str, options: dict, ddim: bool) -> Plan:
    name = "DDIMScheduler" if ddim else "DDPMScheduler"
    rows, refused, learned = _vp_stock_rows(sched, name, ts, prevs, check_prediction(prediction), options, ddim)
    meta = {}
    if refused:
        meta["refused"] = refused
    if learned is not None:
        meta["learned_variance"] = learned
    return Plan(tuple(rows), init_scale=1.0, sampler="ddim" if ddim else "ddpm",
                prediction=check_prediction(prediction), steps=len(rows), meta=meta)


def _ddpm_stock(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """DDPMScheduler's rows as its step computes them (:func:`_vp_stock_rows`): step ``i`` into
    ``timesteps[i + 1]`` (the last into ``abar = 1``), mean ``c_x x + c_d x0``, noise where ``t > 0``
    with the ``variance_type``'s standard deviation (any value diffusers' ``_get_variance`` does not
    name is ``fixed_small``, as there). ``learned`` / ``learned_range`` (DeepFloyd IF): the model
    output carries the variance in a second set of channels; the rows' noise coefficient is 1 and the
    step passes the noise already scaled by the learned standard deviation, ``exp(0.5 (f log beta +
    (1 - f) log beta~))`` with ``f = (v + 1) / 2`` (``learned_range``) or ``sqrt(v)`` (``learned``),
    computed per element from the variance channels ``v`` as diffusers does; ``(log beta~, log beta)``
    per row in ``plan.meta["learned_variance"]``."""
    ts = [int(t) for t in arrays["timesteps"]]
    return _vp_plan(sched, ts, ts[1:] + [-1], prediction, options, ddim=False)


def _ddim_stock(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """DDIMScheduler's rows as its step computes them (:func:`_vp_stock_rows`): from ``t`` to
    ``t - num_train_timesteps // num_inference_steps`` (``final_alpha_cumprod`` below 0),
    ``x' = sqrt(abar') x0 + sqrt(1 - abar' - std^2) eps + std z``; with clipping ``x0`` is clipped and
    ``eps`` that of the unclipped estimate (or of the clipped one: ``use_clipped_model_output``)."""
    jump = int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
    ts = [int(t) for t in arrays["timesteps"]]
    return _vp_plan(sched, ts, [t - jump for t in ts], prediction, options, ddim=True)


def _ddim_at(sched, t: int, prediction: str, options: dict) -> Plan:
    """DDIMScheduler.step at any integer timestep: diffusers computes it from the value."""
    jump = int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
    return _vp_plan(sched, [t], [t - jump], prediction, options, ddim=True)


def _ddpm_at(sched, t: int, prediction: str, options: dict) -> Plan | None:
    """DDPMScheduler.step at a timestep off its grid: diffusers' ``previous_timestep`` is ``t - 1``
    on the training grid (before ``set_timesteps``); after it, diffusers looks ``t`` up and fails."""
    if getattr(sched, "custom_timesteps", False) or sched.num_inference_steps:
        return None
    return _vp_plan(sched, [t], [t - 1], prediction, options, ddim=False)


def _flow_inverted(sched, arrays: dict, prediction: str, options: dict) -> Plan | None:
    """FlowMatchEulerDiscreteScheduler with ``invert_sigmas=True``: the sigmas rise from 0 to 1, and
    diffusers' step is ``x' = x + (s' - s) v`` (``stochastic_sampling``: ``(1 - s') (x - s v) + s' z``),
    the formulas of the usual direction. Rows of those formulas (the Euler rows of ``flow_euler``
    divide by ``s``, which starts at 0 here). The same rows serve a grid with ``s = 0`` before its end
    (custom ``sigmas`` with a 0), where diffusers' ``x + (s' - s) v`` is finite as well."""
    inverted = bool(options.pop("invert_sigmas", False))
    disc = arrays["disc"]
    if not inverted and all(float(s) != 0.0 for s in disc.sigmas[:len(disc.timesteps)]):
        return None
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
                steps=len(rows), meta={"invert_sigmas": inverted})


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
    refused = plan.meta.get("refused", {})
    for k, row in enumerate(rows):
        i = start + k
        s32 = sig[i]
        if gamma == 0 or not lo <= s32 <= hi or k in refused:
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

def _flow_heun_rows(sched, args: Mapping, phase: int = 0) -> Plan:
    """``FlowMatchHeunDiscreteScheduler.step`` as rows, from its own ``sigmas`` by its own rule: call
    ``i`` is a first stage (``sigmas[i] -> sigmas[i + 1]``) when ``i`` is even and the second stage of
    the step before (``sigmas[i - 1] -> sigmas[i]``) when odd; a run started at an odd index ``phase``
    (its first call, a first stage for diffusers, whose state holds no step) counts from there.

    With ``gamma = min(s_churn / (len(sigmas) - 1), sqrt(2) - 1)`` where ``s_tmin <= sigma <= s_tmax``
    and ``sigma_hat = sigma (1 + gamma)`` (float32, as diffusers), the first stage moves the sample to
    ``y = x + s_noise sqrt(sigma_hat^2 - sigma^2) z`` and takes ``x' = y + (sigma / sigma_hat) dt v``,
    ``dt = sigma_next - sigma_hat``, keeping ``H = y + dt/2 (sigma / sigma_hat) v``; the second stage
    is ``x' = H + dt/2 v'`` (diffusers draws noise there too, with no effect: the row draws it and
    multiplies it by 0). Without churn these are the Heun rows of ``flow_heun``."""
    s_churn = float(args.get("s_churn", 0.0))
    s_tmin, s_tmax, s_noise = (float(args.get(k, d)) for k, d in (("s_tmin", 0.0), ("s_tmax", math.inf),
                                                                   ("s_noise", 1.0)))
    sig = sched.sigmas.detach().to("cpu", torch.float32).numpy()
    ts = _host(sched.timesteps)
    gamma = min(s_churn / (len(sig) - 1), 2**0.5 - 1)
    lo, hi = np.float32(s_tmin), np.float32(s_tmax)  # diffusers compares float32 sigmas
    rows, refused = [], {}
    for i, t in enumerate(ts):
        if i < phase:  # before the run's start: never run
            rows.append(_placeholder(t, 0))
            continue
        stage = (i - phase) % 2
        j = i - stage  # the first stage of this step
        what = f"FlowMatchHeunDiscreteScheduler.step (step index {i}, timestep {float(t):g})"
        if j + 1 >= len(sig):
            refused[i] = f"{what}: needs sigmas[{j + 1}] of a grid of {len(sig)} (diffusers' step fails: IndexError)"
            rows.append(_placeholder(t, i // 2))
            continue
        s32, n32 = sig[j], sig[j + 1]
        g = gamma if (gamma != 0 and lo <= s32 <= hi) else 0.0
        s_hat = s32 * np.float32(g + 1) if g else s32  # float32 products, as diffusers
        dt = float(n32 - s_hat)
        s, sh = float(s32), float(s_hat)
        if sh == 0.0 or (stage == 1 and float(n32) == 0.0):
            refused[i] = f"{what}: diffusers divides by sigma_hat = {sh:g} / sigma_next = {float(n32):g} there (NaN)"
            rows.append(_placeholder(t, i // 2))
            continue
        c = s_noise * float(np.sqrt(s_hat * s_hat - s32 * s32)) if g > 0 else 0.0
        point = dict(t=float(t), in_scale=1.0, a_x=1.0)
        if stage == 0:
            r = s / sh
            writes = (Write(0, combo(x=1.0, e=0.5 * r * dt, z=c)),) if i + 1 < len(ts) else ()
            rows.append(Row(**point, sigma=s, a_e=-s, alpha_t=1.0 - s, sigma_t=s,
                            out=combo(x=1.0, e=r * dt, z=c), writes=writes, noise=g > 0, step=i // 2, stage=0))
        else:
            s1 = float(n32)
            rows.append(Row(**point, sigma=s1, a_e=-s1, alpha_t=1.0 - s1, sigma_t=s1,
                            out=combo(e=0.5 * dt, h=(1.0,)), reads=(0,), noise=g > 0, step=i // 2, stage=1))
    return Plan(tuple(rows), init_scale=1.0, n_slots=1, sampler="flow_heun", prediction="flow",
                steps=(len(ts) + 1) // 2, meta={"refused": refused} if refused else {})


def _flow_heun_churn(sched, plan: Plan, args: dict, start: int) -> Plan:
    return _flow_heun_rows(sched, args)


# ------------------------------------------------ LCM, TCD, flow LCM, EDM, KDPM2 (ancestral), DPM-Solver SDE, SA-Solver


@dataclass(frozen=True, eq=False)
class _OwnVE(OwnGrid, VESchedule):
    arrays: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class _OwnVP32(_OwnVP):
    """An own VP grid whose sampler computes its step scalars in float32 with diffusers' expressions
    (``scalar_dtype``: KDPM2 ancestral's sigma_up / sigma_down, SA-Solver's coefficients)."""

    scalar_dtype: Any = torch.float32


def _f32_scalars(sched, arrays: dict) -> _OwnVP32:
    own = sched._fd_schedule(arrays)
    return _OwnVP32(**{f.name: getattr(own, f.name) for f in dataclasses.fields(own) if f.init})


def _distilled(name: str) -> Callable[[Any, dict, str, dict], Plan]:
    """The build hook of LCMScheduler (``lcm``) / TCDScheduler (``tcd``): the sampler's rows on the
    scheduler's own timesteps. With custom ``timesteps`` and ``strength < 1`` diffusers' step compares
    the step index with ``num_inference_steps``, the length of the WHOLE custom schedule, so the last
    step of the shortened run re-noises as well (LCM: to its own timestep; TCD: with coefficient 0,
    the noise drawn all the same). A step whose diffusers result is inf/NaN (epsilon prediction where
    ``alphas_cumprod = 0``: zero terminal SNR's first timestep, unless LCM clips the estimate) is a
    placeholder refused when it runs (a run started later never reaches it)."""

    def build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
        si = samplers.info(name)  # (the sampler itself, for its partial plans: options resolved as build does)
        plan = si.fn(sched._fd_schedule(arrays), arrays["steps"], check_prediction(prediction),
                     **{**si.options, **options}, partial=True)
        cls = type(sched).__name__
        refused = {k: f"{cls}.step(timestep={int(plan.rows[k].t)}) (step {k}): diffusers' step gives inf/NaN here "
                      f"({why}); refused" for k, why in plan.meta.get("refused", {}).items()}
        if refused:
            plan = dataclasses.replace(plan, meta={**plan.meta, "refused": refused})
        n = sched.num_inference_steps
        if n is None or n <= len(plan.rows):
            return plan
        last = plan.rows[-1]
        if name == "lcm":
            c_skip, c_out, _ = plan.meta["second_output"][-1]
            a = float(_host(sched.alphas_cumprod)[int(last.t)])
            last = dataclasses.replace(last, out=combo(x=math.sqrt(a) * c_skip, d=math.sqrt(a) * c_out,
                                                       z=math.sqrt(1.0 - a)), noise=True)
        elif float(options.get("eta", 0.3)) > 0:
            last = dataclasses.replace(last, noise=True)
        return dataclasses.replace(plan, rows=plan.rows[:-1] + (last,))

    return build


def _flow_lcm_state(sched, row: Row, i: int, args: Mapping) -> None:
    if getattr(sched, "_scale_factors", None) and getattr(sched, "_upscale_mode", None):
        raise ValueError("FlowMatchLCMScheduler with scale factors (config scale_factors or set_scale_factors) resizes "
                         "the data estimate between steps (interpolate): not a row of the fused step; use the stock "
                         "scheduler for it")
    return None


def _edm_sampler(cfg: Mapping) -> str:
    if "algorithm_type" not in cfg:  # EDMEulerScheduler
        return "euler"
    return _DPM_NAMES[(cfg["algorithm_type"], int(cfg["solver_order"]))]


def _edm_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """EDMEulerScheduler / EDMDPMSolverMultistepScheduler: ``euler`` / ``dpmpp_*`` (diffusers flavor)
    on the scheduler's own sigmas as a VE schedule for an ``x0`` model, then EDM's preconditioning
    (:func:`fastdiff.samplers.edm.precondition`) with its ``sigma_data`` and ``prediction_type``."""
    disc, n = arrays["disc"], arrays["steps"]
    sig = tuple(float(v) for v in disc.sigmas[:n + 1])
    grid = Grid(tuple(float(t) for t in disc.timesteps), sig, (1.0,) * len(sig), sig,
                tuple(log_snr(1.0, v) for v in sig), float(disc.init_sigma), "ve")
    plan = samplers.build(sched._fd_spec.sampler(sched.config), _OwnVE(arrays={**arrays, "grid": grid}), n,
                          prediction="x0", **options)
    return edm.precondition(plan, float(sched.config.sigma_data), sched.config.prediction_type,
                            times=[r.t for r in plan.rows])


def _edm_churn(sched, plan: Plan, args: dict, start: int) -> Plan:
    """``EDMEulerScheduler.step(s_churn=...)`` as rows: as :func:`_euler_churn`, with EDM's denoiser at
    ``sigma_hat``, ``D = c_skip(sigma_hat) y + c_out(sigma_hat) m`` (the model saw ``c_in(sigma) x``)."""
    s_churn = float(args.get("s_churn", 0.0))
    s_tmin, s_tmax, s_noise = (float(args.get(k, d)) for k, d in (("s_tmin", 0.0), ("s_tmax", math.inf),
                                                                   ("s_noise", 1.0)))
    sig = sched.sigmas.detach().to("cpu", torch.float32).numpy()
    gamma = min(s_churn / (len(sig) - 1), 2**0.5 - 1)
    lo, hi = np.float32(s_tmin), np.float32(s_tmax)  # diffusers compares float32 sigmas
    sd, pred = float(sched.config.sigma_data), sched.config.prediction_type
    rows, churned = list(plan.rows), {}
    for k, row in enumerate(rows):
        s32 = sig[start + k]
        if gamma == 0 or not lo <= s32 <= hi or k in plan.meta.get("refused", {}):
            continue
        s_hat = float(s32 * np.float32(gamma + 1))  # a float32 product in diffusers
        _, a, b, _ = edm.scalings(s_hat, sd, pred)
        r = float(sig[start + k + 1]) / s_hat
        cy = r + (1.0 - r) * a
        c = s_noise * math.sqrt(max(s_hat * s_hat - float(s32) ** 2, 0.0))
        rows[k] = dataclasses.replace(row, out=combo(x=cy, e=(1.0 - r) * b, z=cy * c), noise=True)
        churned[k] = (a, b, c)
    return dataclasses.replace(plan, rows=tuple(rows), meta={**plan.meta, "churn_x0": churned})


def _check_edm_dpm(cfg: Mapping) -> None:
    if cfg.get("algorithm_type") == "sde-dpmsolver++" and int(cfg.get("solver_order", 2)) == 3:
        raise ValueError("EDMDPMSolverMultistepScheduler algorithm_type='sde-dpmsolver++' with solver_order=3 is not "
                         "supported by fastdiff.diffusers: diffusers has no third-order SDE update there (its step "
                         "fails once it reaches one)")


def _two_stage_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """DPM-Solver SDE: diffusers' interleaved arrays (``timesteps`` ``[t0, m0, t1, m1, ..., t_{n-1}]``,
    ``sigmas`` ``[s0, s1, s1, ..., 0]``) as one entry per solver step, the sampler's rows on them
    (``dpmpp_sde``; scalars in float32 as diffusers computes its ancestral step sizes), and every row at
    diffusers' own model time (its midpoint timesteps come from float32 sigmas)."""
    ts_all, sig_all = _host(sched.timesteps), _host(sched.sigmas)
    ts = ts_all[0::2]
    n = len(ts)
    sig = np.append(sig_all[0::2][:n], float(sig_all[-1]))
    disc = Discretization(sigmas=sig, timesteps=ts, init_sigma=float(sched.init_noise_sigma))
    own = _f32_scalars(sched, {"disc": disc, "steps": n})
    plan = samplers.build(sched._fd_spec.sampler(sched.config), own, n, prediction=prediction, **options)
    per_step = Counter(r.step for r in plan.rows)
    for j in range(n):  # diffusers: two calls per step, one for the last (the sampler's Euler step into 0)
        if per_step[j] != (2 if j + 1 < n else 1):
            raise ValueError(f"{type(sched).__name__}: step {j} (sigma {sig[j]:g} -> {sig[j + 1]:g}) reaches sigma "
                             "0 before the last step, where diffusers' step calls twice; this grid is refused")
    return dataclasses.replace(plan, rows=tuple(dataclasses.replace(r, t=float(t)) for r, t in zip(plan.rows, ts_all)))


def _kdpm2_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """KDPM2 / KDPM2 ancestral: one row per call of diffusers' interleaved grid (``dpm_2`` /
    ``dpm_2_ancestral`` steps), each as diffusers' step computes it from its own float32 arrays
    (:func:`_kdpm2_rows`), so that a call is refused (when run) only where its own step gives inf/NaN:
    a run that starts in the finite part of a grid whose first points are not (alphas_cumprod
    underflowing to 0) runs as stock. A KDPM2 ancestral step before the last whose float32
    ``sigma_down`` is 0 (or NaN) makes its midpoint timestep and diffusers' run NaN from there: such a
    grid is refused."""
    name = type(sched).__name__
    ts = _host(sched.timesteps)
    n = (len(ts) + 1) // 2  # two calls per step, one for the last
    if hasattr(sched, "sigmas_down"):
        sig, down = _host(sched.sigmas)[0::2], _host(sched.sigmas_down)[0::2]  # (entry 2j: step j's)
        for j in range(n - 1):
            if math.isfinite(sig[j]) and math.isfinite(sig[j + 1]) and sig[j + 1] > 0 and not down[j] > 0:
                raise ValueError(f"{name}: step {j} (sigma {sig[j]:g} -> {sig[j + 1]:g}) has sigma_down = 0 in "
                                 "diffusers' float32 arithmetic, which makes its midpoint timestep and its run NaN; "
                                 "this grid is refused (use more steps or another sigma grid)")
    rows = tuple(Row(t=float(t), sigma=0.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=1.0), step=r // 2,
                     stage=r % 2) for r, t in enumerate(np.nan_to_num(ts)))  # (placeholders: _kdpm2_rows)
    plan = Plan(rows, init_scale=float(sched.init_noise_sigma), n_slots=1,
                sampler=sched._fd_spec.sampler(sched.config), prediction=prediction, steps=n)
    return _kdpm2_rows(sched, plan)


def _kdpm2_rows(sched, plan: Plan, i: int = 0) -> Plan:
    """KDPM2 / KDPM2 ancestral: ``plan`` with its rows from call ``i`` on as diffusers' step computes them
    from its interleaved float32 arrays at the call's own index (``sigmas``, ``sigmas_interpol``; KDPM2
    ancestral: ``sigmas_up``, ``sigmas_down``), calls ``(i, i + 1), (i + 2, i + 3), ...`` paired as first
    and second stages. ``i = 0``: the run's own rows (:func:`_kdpm2_build`; diffusers' float32
    ``sigmas_interpol``, which a float64 midpoint misses by up to 5e-7 relative, an error a v-prediction
    second stage over a long interval amplifies past 1e-5). ``i`` odd: a run whose first call is a second
    stage of ``plan`` (``set_begin_index(i)`` or a first timestep found at ``timesteps[i]``): diffusers'
    state keeps no first-stage sample there (``state_in_first_order`` is ``sample is None``), so its step takes call
    ``i`` as a FIRST stage. KDPM2's first stage there moves from ``sigmas[i]`` UP to
    ``sigmas_interpol[i + 1]`` and its second has length 0 (it returns the kept sample); KDPM2
    ancestral's pairs are its steps from the next grid point on, the last of which divides by a
    ``sigmas_interpol`` of 0. A call whose diffusers step gives inf/NaN is refused when run."""
    name = type(sched).__name__
    ancestral = hasattr(sched, "sigmas_up")
    sig, mid = _host(sched.sigmas), _host(sched.sigmas_interpol)
    up, down = (_host(sched.sigmas_up), _host(sched.sigmas_down)) if ancestral else (None, None)
    own, prediction = sched._fd_schedule({}), sched._fd_prediction()
    rows, refused = list(plan.rows), dict(plan.meta.get("refused", {}))
    for r in range(i, len(rows)):
        stage = (r - i) % 2
        if stage == 0:  # x' = x + (x - d)/s (to - s): the model at s = sigmas[r]
            at, s, to = sig[r], sig[r], mid[r] if ancestral else mid[r + 1]
        else:  # x' = H + (x - d)/m (to - s): the model at m = sigmas_interpol, from the kept sample H
            at, s = (mid[r - 1], sig[r - 1]) if ancestral else (mid[r], sig[r - 1])
            to = down[r - 1] if ancestral else sig[r]
        c = (to - s) / at if at != 0.0 else math.nan
        z = float(up[r - 1]) if ancestral and stage == 1 else 0.0
        try:
            if not math.isfinite(c) or not math.isfinite(z):
                raise ArithmeticError(f"sigma {at:g}")
            point = grid_point(own, prediction, float(at), rows[r].t)
        except (ArithmeticError, ValueError) as exc:
            start = f"a run started at step index {i} (a second stage, taken by diffusers as a first stage) reaches "
            refused[r] = (f"{name}.step: {start if i else ''}step index {r}, whose diffusers step gives inf/NaN "
                          f"({exc}); refused")
            continue
        refused.pop(r, None)  # (a row of the run from 0 that this pairing computes finitely)
        if stage == 0:
            rows[r] = Row(**point, out=combo(x=1.0 + c, d=-c), writes=(Write(0, combo(x=1.0)),), step=r // 2)
        else:
            rows[r] = Row(**point, out=combo(x=c, d=-c, h=(1.0,), z=z), reads=(0,), noise=ancestral, step=r // 2,
                          stage=1)
    meta = {**plan.meta, "refused": refused, **({"shifted": i} if i else {})}
    return dataclasses.replace(plan, rows=tuple(rows), n_slots=max(plan.n_slots, 1), meta=meta)


def _first_order_state(sched, row: Row, i: int, sample: torch.Tensor) -> None:
    # KDPM2's state_in_first_order is `sample is None`: a first stage keeps the sample (the last, Euler step too)
    sched.sample = sample if row.stage == 0 else None


def _sde_sigmas(sched, i: int, stage: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPMSolverSDEScheduler.step's ``(sigma_fn(t), sigma_fn(t_next))`` at call ``i``, float32 as there."""
    sig = sched.sigmas
    s, s1 = (sig[i], sig[i + 1]) if stage == 0 else (sig[i - 1], sig[i])
    t, t1 = s.log().neg(), s1.log().neg()
    if stage == 0:
        t1 = t + (t1 - t) * 0.5
    return t.neg().exp(), t1.neg().exp()


def _sde_noise(sched, row: Row, i: int, args: Mapping) -> torch.Tensor | None:
    """DPMSolverSDEScheduler's noise: its Brownian tree (torchsde), built at the first step from the
    sample and ``noise_sampler_seed`` (``None``: a seed from torch's global RNG) as diffusers' step
    builds it, and asked for the increment over ``(sigma, sigma_next)`` of the stage."""
    if sched.noise_sampler is None:
        import sys

        tree = sys.modules[sched._fd_stock.__module__].BrownianTreeNoiseSampler
        lo, hi = sched.sigmas[sched.sigmas > 0].min(), sched.sigmas.max()
        sched.noise_sampler = tree(args["sample"], lo.item(), hi.item(), sched.noise_sampler_seed)
    return sched.noise_sampler(*_sde_sigmas(sched, i, row.stage)) if row.noise else None


def _sde_state(sched, row: Row, i: int, sample: torch.Tensor) -> None:
    # state_in_first_order (`sample is None`) and the midpoint scale_model_input uses after a first stage
    if row.stage == 1:
        sched.sample = sched.mid_point_sigma = None
    elif float(sched.sigmas[i + 1]) != 0.0:  # a two-stage step (the Euler step into 0 keeps no state)
        sched.sample, sched.mid_point_sigma = sample, _sde_sigmas(sched, i, 0)[1]


def _check_sa(cfg: Mapping) -> None:
    vt, alg = cfg.get("variance_type"), cfg.get("algorithm_type")
    if vt in ("learned", "learned_range"):
        raise ValueError(f"SASolverScheduler config variance_type={vt!r} is not supported by fastdiff.diffusers: "
                         "diffusers' step draws its noise shaped like the whole model output (with the variance "
                         "channels) and fails adding it to the sample")
    if alg == "noise_prediction" and cfg.get("thresholding"):
        raise ValueError("SASolverScheduler config thresholding=True with algorithm_type='noise_prediction' is not "
                         "supported by fastdiff.diffusers: diffusers' step indexes alpha_t[None] there and fails")
    p, flow = cfg.get("prediction_type"), bool(cfg.get("use_flow_sigmas", False))
    if p == "flow_prediction" and (not flow or alg != "data_prediction"):
        raise ValueError("SASolverScheduler config prediction_type='flow_prediction' needs use_flow_sigmas=True and "
                         "algorithm_type='data_prediction' in fastdiff.diffusers (diffusers' step raises or computes "
                         "nothing meaningful otherwise)")
    if p == "v_prediction" and flow:
        raise ValueError("SASolverScheduler config prediction_type='v_prediction' with use_flow_sigmas=True is not "
                         "supported by fastdiff.diffusers (v needs alpha^2 + sigma^2 = 1)")


def _sa_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """SASolverScheduler: ``sa_solver`` on the scheduler's own grid, its coefficients in float32 with
    diffusers' expressions (diffusers' own rounding of them reaches 1e-4 at orders 3-4), tau from the
    ``tau_func`` attribute its step calls."""
    return samplers.build("sa_solver", _f32_scalars(sched, arrays), arrays["steps"], prediction=prediction,
                          **options, tau_func=sched.tau_func)


def _sa_shapes(sched, row: Row, i: int, args: Mapping) -> None:
    m, x = args["model_output"], args["sample"]
    try:
        wide = torch.broadcast_shapes(m.shape, x.shape) != x.shape
    except RuntimeError:  # shapes that do not broadcast: refused by name by the drop-in's own check
        return None
    if wide:
        raise ValueError(f"SASolverScheduler.step: model_output {tuple(m.shape)} broadcasts the sample "
                         f"{tuple(x.shape)} to a larger shape, which diffusers' step cannot add into a sample-shaped "
                         "result (it fails)")
    return None


def _sa_tau(sched, t, what: str):
    """``sched.tau_func`` of timestep ``t`` as given (as diffusers' step calls it), checked as the rows need it."""
    from ..samplers.sa_solver import check_tau, default_tau

    val = (sched.tau_func or default_tau)(t)
    try:
        return check_tau(val, 0)
    except ValueError:
        raise ValueError(f"SASolverScheduler.step(timestep={_num(t):g}): tau_func of the {what} timestep returned "
                         f"{val!r}, where diffusers' step needs a finite number (its result is not finite, or "
                         "it fails)") from None


def _num(t) -> float:
    return float(t.item() if isinstance(t, torch.Tensor) else np.asarray(t).reshape(-1)[0])


def _sa_row(sched, run, k: int, args: Mapping) -> tuple[Plan, int] | None:
    """SASolverScheduler: diffusers' step takes ``tau_func`` of the timestep AS GIVEN (its predictor) and of
    the one given at the call before (``timestep_list[-1]``: its corrector, from a run's second call on;
    kept as diffusers keeps it, by :func:`_sa_state` once the step ran); the rows take them at
    ``scheduler.timesteps``. Where a value differs (a first timestep off the grid, which diffusers runs as
    the last step; any value given later), the row of the run's plan with the taus as given (``taus``),
    built once per pair of values."""
    t = args.get("timestep")  # (the accelerated pipelines' loop steps at the grid's own timesteps: none given)
    if t is None:
        return None
    sched._fd_sa_given = t
    prev = sched.timestep_list[-1]
    cur = _sa_tau(sched, t, "given")
    now = [cur] if k == 0 or prev is None else [_sa_tau(sched, prev, "previous"), cur]
    grid = run.plan.meta.get("taus")
    if grid is None or [float(v) for v in now] == list(grid[k + 1 - len(now):k + 1]):
        return None
    ident = tuple((float(v), str(getattr(v, "dtype", type(v).__name__))) for v in now)
    cache = ("taus", run.start, run.key, k, ident)
    plan = sched._fd_plans.get(cache)
    if plan is None:
        taus = list(grid)
        taus[k + 1 - len(now):k + 1] = now
        plan = sched._fd_plans[cache] = sched._fd_rows(run.start, run.key, {"taus": taus})
    return plan, k


def _sa_state(sched, row: Row, i: int, sample: torch.Tensor) -> None:
    cap = max(int(sched.config.predictor_order), int(sched.config.corrector_order) - 1)
    sched.lower_order_nums = min(sched.lower_order_nums + 1, cap)
    given = sched.__dict__.pop("_fd_sa_given", None)  # (set by _sa_row)
    if given is not None:  # diffusers' timestep_list: the timesteps given, newest last
        sched.timestep_list[:-1] = sched.timestep_list[1:]
        sched.timestep_list[-1] = given


_DISTILLED_NOTE = "step(generator) noise drawn as diffusers draws it: model output's shape, estimate's dtype"
_EDM_NOTE = ("sigma_data, sigma_schedule, rho: EDM's preconditioning as rows (in_scale c_in, model time c_noise, "
             "D = c_skip x + c_out F)")


# ------------------------------------------------ PNDM, IPNDM, DEIS, DPM-Solver singlestep, DDIM / DPM-Solver inversion


def _pndm_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """PNDMScheduler: :func:`fastdiff.samplers.pndm.pndm_rows` on the timesteps a run is given from
    diffusers' call counter 0 (``timesteps[start:]``), with the scheduler's own ``prk_timesteps`` and
    its float32 coefficient arithmetic (``abar ~ 1e-9`` at a cosine schedule's last timestep)."""
    from ..samplers.pndm import pndm_rows

    skip = bool(options.get("skip_prk_steps", False))
    prk = () if skip else [int(v) for v in _host(sched.prk_timesteps)]
    return pndm_rows(_f32_scalars(sched, arrays), check_prediction(prediction), [int(v) for v in arrays["timesteps"]],
                     int(sched.num_inference_steps), prk, skip, bool(options.get("set_alpha_to_one", False)))


def _ipndm_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """IPNDMScheduler: :func:`fastdiff.samplers.pndm.ipndm_rows` on its own grid, whose ``betas`` are the
    sigmas of the states (``alphas = sqrt(1 - betas^2)``, ``alpha = 0`` at the first point) and whose
    model output is read as v (diffusers' ``ets = sample * beta + model_output * alpha``)."""
    from ..samplers.pndm import ipndm_point, ipndm_rows

    start, n = arrays["start"], arrays["steps"]
    al, sg = _host(sched.alphas), _host(sched.betas)
    points = [ipndm_point(float(t), float(al[start + i]), float(sg[start + i]))
              for i, t in enumerate(arrays["timesteps"])]
    states = [(float(al[j]), float(sg[j])) for j in range(start, start + n + 1)]
    return ipndm_rows(points, states, "v", 1.0)


def _float32_build(name: str) -> Callable[[Any, dict, str, dict], Plan]:
    """The build hook of a class whose sampler follows diffusers' float32 coefficient arithmetic where a
    float64 plan would drift from it by more than 1e-5 (DEIS's third-order ``ind_fn``, the singlestep
    solver's ``(e^{-h} - 1)/h + 1`` forms): the sampler on the scheduler's own grid, ``scalar_dtype`` float32."""

    def build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
        return samplers.build(name, _f32_scalars(sched, arrays), arrays["steps"], prediction=prediction, **options)

    return build


def _check_single(cfg: Mapping) -> None:
    _check_flow_sigmas(cfg)
    if cfg.get("algorithm_type") == "dpmsolver" and cfg.get("thresholding"):
        raise ValueError("DPMSolverSinglestepScheduler config algorithm_type='dpmsolver' with thresholding=True is not "
                         "supported by fastdiff.diffusers: diffusers' step fails there (it indexes alpha_t with None)")


def _ddim_inverse_build(sched, arrays: dict, prediction: str, options: dict, jump: int | None = None) -> Plan:
    """DDIMInverseScheduler: :func:`fastdiff.samplers.inverse.ddim_inverse` on the scheduler's timesteps,
    with the first alpha the instance has (its deprecated ``set_alpha_to_zero`` argument sets it, not the
    config's ``set_alpha_to_one``).

    A step whose diffusers result is inf/NaN (an ``alphas_cumprod`` entry it reads that is negative or above
    1, whose square root is NaN: betas above 1; epsilon prediction at a level of ``alphas_cumprod`` 0
    without ``clip_sample``) is a placeholder refused when it runs (``plan.meta["refused"]``); every other
    step runs (the whole config was refused at ``set_timesteps``, though diffusers' steps are finite)."""
    from ..samplers.inverse import ddim_inverse

    prediction = check_prediction(prediction)
    options = dict(options, set_alpha_to_one=float(sched.initial_alpha_cumprod) == 1.0)
    schedule = sched._fd_schedule(arrays)
    jump = int(schedule.num_train_timesteps) // int(arrays["steps"]) if jump is None else int(jump)
    acp = sched.alphas_cumprod.detach().to("cpu", torch.float32).tolist()
    T, first = int(sched.config.num_train_timesteps), float(sched.initial_alpha_cumprod)
    ts = [int(t) for t in np.sort(np.asarray(arrays["timesteps"], dtype=np.float64))]
    refused = {}
    for k, t in enumerate(ts):
        src = min(t - jump, T - 1)
        if not 0 <= t < len(acp):
            continue  # (ddim_inverse names it)
        a_s, a_t = (acp[src] if src >= 0 else first), acp[t]
        bad = [f"alphas_cumprod[{i}] = {a:.3g}, whose square root is NaN" for i, a in ((src, a_s), (t, a_t))
               if not 0.0 <= a <= 1.0]
        if not bad and prediction == "eps" and a_s == 0.0 and not options.get("clip_sample"):
            bad = [f"alphas_cumprod[{src}] = 0 (epsilon prediction: x0 = (x - m) / 0), without clip_sample"]
        if bad:
            refused[k] = (f"{type(sched).__name__}.step(timestep={t}): diffusers' step gives inf/NaN here "
                          f"({bad[0]}); refused")
    if not refused:
        return ddim_inverse(schedule, arrays["steps"], prediction, jump=jump, **options)
    if len(refused) == len(ts):
        raise ValueError(next(iter(refused.values())).replace("; refused", "") + ": every step of this run; not "
                         "supported by fastdiff.diffusers")
    rows, template = [], None
    for k, t in enumerate(ts):
        if k in refused:
            rows.append(_placeholder(t, k))
            continue
        one = ddim_inverse(sched._fd_schedule({"timesteps": np.array([float(t)]), "steps": 1}), 1, prediction,
                           jump=jump, **options)
        rows.append(dataclasses.replace(one.rows[0], step=k))
        template = one
    return dataclasses.replace(template, rows=tuple(rows), steps=len(rows),
                               meta={**template.meta, "refused": refused})


def _ddim_inverse_at(sched, t: int, prediction: str, options: dict) -> Plan:
    """DDIMInverseScheduler.step at any integer timestep: diffusers computes it from the value."""
    if not 0 <= t < len(sched.alphas_cumprod):
        raise ValueError(f"DDIMInverseScheduler.step(timestep={t}): diffusers indexes alphas_cumprod with it (an "
                         f"IndexError, or a wrapped index below 0); use a timestep in [0, {len(sched.alphas_cumprod)})")
    jump = int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
    return _ddim_inverse_build(sched, {"timesteps": np.array([float(t)]), "steps": 1}, prediction, options, jump)


def _check_inverse(cfg: Mapping) -> None:
    _check_flow_sigmas(cfg)
    a, k = cfg.get("algorithm_type"), cfg.get("solver_order")
    if a not in ("dpmsolver++", "dpmsolver"):
        why = ("an inversion's log-SNR decreases, where the SDE noise term has no real value: diffusers' step gives "
               "NaN" if a in ("sde-dpmsolver++", "sde-dpmsolver") else "supported: 'dpmsolver++', 'dpmsolver'")
        raise ValueError(f"DPMSolverMultistepInverseScheduler config algorithm_type={a!r} is not supported by "
                         f"fastdiff.diffusers ({why})")
    if isinstance(k, bool) or k not in (1, 2, 3):
        raise ValueError(f"DPMSolverMultistepInverseScheduler config solver_order={k!r} is not supported by "
                         "fastdiff.diffusers (supported: 1, 2, 3)")


def _inverse_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """DPMSolverMultistepInverseScheduler: ``dpm_inverse`` on the scheduler's own (rising) grid with its
    float32 coefficient arithmetic; ``lower_order_final`` applies only where the WHOLE run has < 15 steps
    (a run that starts part-way, found by its first timestep, has fewer), as diffusers decides it."""
    options = dict(options, lower_order_final=bool(options.get("lower_order_final", True))
                   and len(sched.timesteps) < 15)
    return samplers.build("dpm_inverse", _f32_scalars(sched, arrays), arrays["steps"], prediction=prediction,
                          **options)


# -- CogVideoX: DDIM and DPM-Solver++(2M) SDE on an SNR-shifted schedule, computed from the timestep value

def _cog_row(sched, t: int, prediction: str, *, dpm: bool, back: int | None = None, second: bool = False,
             step: int = 0) -> tuple[Row, str | None]:
    """One CogVideoXDDIMScheduler / CogVideoXDPMScheduler step at timestep ``t`` as diffusers' step computes it:
    ``prev = t - num_train_timesteps // num_inference_steps`` (``final_alpha_cumprod`` below 0), every scalar
    from the scheduler's own ``alphas_cumprod`` (float64 for ``scaled_linear``, its ``snr_shift_scale`` folded in)
    by diffusers' own expressions on 0-d tensors (the DPM class's ``get_variables`` / ``get_mult`` themselves).

    DDIM: ``x' = a_t x + b_t x0`` (no noise: ``eta`` is not read; nor ``clip_sample`` / thresholding).
    DPM: ``x' = m1 x - m2 x0 + mn z``, and with the previous estimate (``second``: ``old_pred_original_sample``
    given, ``prev >= 0``) ``x' = m1 x - m2 (m3 x0 - m4 old) + mn z``, ``old`` read from history slot 0
    (the caller's tensor, copied there: ``_Spec.given_history``). Returns ``(row, None)``, or ``(placeholder,
    reason)`` where diffusers' step fails or gives inf/NaN."""
    name = type(sched).__name__
    acp = sched.alphas_cumprod.detach().cpu()
    n = len(acp)
    what = f"{name}.step(timestep={t})"
    if not -n <= t < n or (back is not None and not -n <= back < n):
        bad = t if not -n <= t < n else back
        return _placeholder(t, step), (f"{what}: alphas_cumprod has {n} entries (none for timestep {bad}), so "
                                       "diffusers' step fails there (IndexError); refused")
    prev = t - int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
    a_t = acp[t]
    a_p = acp[prev] if prev >= 0 else sched.final_alpha_cumprod.detach().cpu()
    b_t = 1 - a_t
    alpha, sigma = float(a_t**0.5), float(b_t**0.5)
    with np.errstate(all="ignore"), torch.no_grad():
        if prediction == "eps":
            a_x, a_e = _div(1.0, alpha), -_div(sigma, alpha)
        else:
            a_x, a_e = x0_coeffs(prediction, alpha, sigma)
        if not dpm:
            c_x = ((1 - a_p) / (1 - a_t)) ** 0.5
            c_d = a_p**0.5 - a_t**0.5 * c_x
            out, noisy = combo(x=float(c_x), d=float(c_d)), False
        else:
            a_b = acp[back] if back is not None else None
            h, r, _, _ = sched.get_variables(a_t, a_p, a_b)
            mult = [float(v) for v in sched.get_mult(h, r, a_t, a_p, a_b)]
            mn = float((1 - a_p) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5)
            if second and prev >= 0:
                out = combo(x=mult[0], d=-mult[1] * mult[2], h=(mult[1] * mult[3],), z=mn)
            else:
                out = combo(x=mult[0], d=-mult[1], z=mn)
            noisy = True
    if not all(math.isfinite(v) for v in (a_x, a_e, *out)):
        return _placeholder(t, step), (f"{what}: diffusers' step gives inf/NaN here (alphas_cumprod[t] = "
                                       f"{float(a_t):.3g}, alphas_cumprod[prev] = {float(a_p):.3g}, prev = {prev}); "
                                       "refused")
    ksig = math.sqrt((1.0 - alpha * alpha) / max(alpha * alpha, 2.0**-24))  # k-diffusion sigma, for callbacks
    reads = (0,) if dpm and second and prev >= 0 else ()
    return Row(t=float(t), sigma=ksig, in_scale=1.0, a_x=a_x, a_e=a_e, out=out, reads=reads, noise=noisy, step=step,
               alpha_t=alpha, sigma_t=sigma), None


def _cog_plan(sched, calls: list[tuple[int, int | None, bool]], prediction: str, dpm: bool) -> Plan:
    """The plan of CogVideoX steps ``(t, timestep_back, second order)`` (:func:`_cog_row`). A first-order DPM
    row returns a tuple whatever ``return_dict`` says, as diffusers' step does there (``meta["tuple_rows"]``)."""
    prediction = check_prediction(prediction)
    rows, refused, tuples = [], {}, set()
    for k, (t, back, second) in enumerate(calls):
        row, why = _cog_row(sched, t, prediction, dpm=dpm, back=back, second=second, step=k)
        rows.append(row)
        if why is not None:
            refused[k] = why
        prev = t - int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
        if dpm and not (second and prev >= 0):
            tuples.add(k)
    meta = {"refused": refused} if refused else {}
    if tuples:
        meta["tuple_rows"] = frozenset(tuples)
    return Plan(tuple(rows), init_scale=1.0, sampler="cogvideox_dpm" if dpm else "cogvideox_ddim",
                prediction=prediction, steps=len(rows), n_slots=1 if dpm else 0, meta=meta)


def _cog_ddim_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """CogVideoXDDIMScheduler's rows at ``scheduler.timesteps`` (:func:`_cog_row`)."""
    return _cog_plan(sched, [(int(t), None, False) for t in arrays["timesteps"]], prediction, dpm=False)


def _cog_ddim_at(sched, t: int, prediction: str, options: dict) -> Plan:
    """CogVideoXDDIMScheduler.step at any integer timestep: diffusers computes it from the value."""
    return _cog_plan(sched, [(t, None, False)], prediction, dpm=False)


def _cog_dpm_build(sched, arrays: dict, prediction: str, options: dict) -> Plan:
    """CogVideoXDPMScheduler's rows of the run its pipeline makes: step ``i > 0`` is given the previous step's
    estimate and ``timestep_back = timesteps[i - 1]`` (second order). A call given anything else runs the row
    of what it is given (:func:`_cog_dpm_row`)."""
    ts = [int(t) for t in arrays["timesteps"]]
    calls = [(t, ts[k - 1] if k else None, k > 0) for k, t in enumerate(ts)]
    return _cog_plan(sched, calls, prediction, dpm=True)


def _cog_dpm_at(sched, t: int, prediction: str, options: dict) -> Plan:
    """CogVideoXDPMScheduler.step at a timestep off the grid (first order; :func:`_cog_dpm_row` then takes
    the call's own ``timestep_back`` and estimate)."""
    return _cog_plan(sched, [(t, None, False)], prediction, dpm=True)


def _cog_int(name: str, what: str, v) -> int:
    """A timestep argument as the integer index diffusers' step indexes ``alphas_cumprod`` with."""
    if isinstance(v, (torch.Tensor, np.ndarray)):
        if (v.size if isinstance(v, np.ndarray) else v.numel()) != 1:
            raise ValueError(f"{name}.step: {what} must be one value, got shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not float(v).is_integer():
        raise TypeError(f"{name}.step: {what} must be an integer timestep (diffusers indexes alphas_cumprod with "
                        f"it), got {v!r}")
    return int(v)


def _cog_dpm_row(sched, run, k: int, args: Mapping) -> tuple[Plan, int] | None:
    """CogVideoXDPMScheduler: the step is what the call is given (``timestep_back``, ``old_pred_original_sample``),
    not the call's place in a run: the row of those arguments (``None``: row ``k`` of the run's plan is it),
    built once per ``(timestep, timestep_back, second order)``."""
    name = type(sched).__name__
    t = _cog_int(name, "timestep", args["timestep"])
    back = args.get("timestep_back")
    back = None if back is None else _cog_int(name, "timestep_back", back)
    second = args.get("old_pred_original_sample") is not None
    prev = t - int(sched.config.num_train_timesteps) // int(sched.num_inference_steps)
    if second and prev >= 0 and back is None:
        raise ValueError(f"{name}.step: old_pred_original_sample without timestep_back (diffusers' second-order "
                         "update needs alphas_cumprod[timestep_back]; its step fails with an IndexError)")
    ts = [int(v) for v in _host(sched.timesteps)]
    i = run.start + k
    if 0 <= i < len(ts) and ts[i] == t and second == (i > 0) and back == (ts[i - 1] if i > 0 else None):
        return None
    cache = ("cog", t, back, second)
    plan = sched._fd_plans.get(cache)
    if plan is None:
        pred = _PREDICTION_ALIASES.get(sched.config.prediction_type, sched.config.prediction_type)
        plan = sched._fd_plans[cache] = _cog_plan(sched, [(t, back, second)], pred, dpm=True)
    return plan, 0


def _cog_dpm_noise(sched, row: Row, i: int, args: Mapping) -> torch.Tensor:
    """The noise of a CogVideoXDPMScheduler step drawn as diffusers' step draws it: ``randn_tensor`` in the
    sample's shape and dtype from ``generator`` (torch's global RNG without one), once, and a second time
    for the second-order update, whose draw is the one used (``variance_noise`` is not read, as there)."""
    from diffusers.utils.torch_utils import randn_tensor

    x = args["sample"]
    if x.dim() == 0:  # (randn_tensor reads a batch size: diffusers' step fails with an IndexError there)
        raise ValueError(f"{type(sched).__name__}.step: this step draws noise, which diffusers draws per batch row: "
                         "the sample needs a batch dimension (got a 0-d tensor)")
    z = None
    for _ in range(2 if row.reads else 1):
        z = randn_tensor(x.shape, generator=args.get("generator"), device=x.device, dtype=x.dtype)
    return z


def _cog_scalar_dtype(sched) -> torch.dtype:
    """The dtype of CogVideoX's ``alphas_cumprod`` (float64 for ``scaled_linear``, whose betas diffusers makes in
    float64), the dtype of the 0-d scalars its step computes with."""
    return sched.alphas_cumprod.dtype


_COG_NOTE = ("snr_shift_scale, set_alpha_to_one: read from the scheduler's own alphas_cumprod and "
             "final_alpha_cumprod; clip_sample, clip_sample_range, sample_max_value: no effect (as in diffusers' "
             "step); step(timestep) any integer timestep (diffusers computes the step from the value)")


_SINGLE_NOTE = ("not algorithm_type=dpmsolver with thresholding (diffusers' step fails); variance_type learned/"
                "learned_range: channels [:3] of an epsilon output, as diffusers slices; generator noise in the "
                "converted estimate's dtype (prediction_type=sample with a model output narrower than the sample: "
                "the promoted dtype); " + _FLOW_NOTE)
_PNDM_NOTE = ("a run is the part of scheduler.timesteps it is given from diffusers' call counter 0 (img2img passes "
              "timesteps[k:]; where that first timestep repeats, the next call's tells which run it is)")
_INVERSE_NOTE = ("not sde-dpmsolver / sde-dpmsolver++ (an inversion's log-SNR decreases: diffusers' noise term is "
                 "NaN), not solver_order > 3; variance_type learned/learned_range: channels [:3] of an epsilon "
                 "output; " + _FLOW_NOTE)


SUPPORT: dict[str, _Spec] = {
    "DDPMScheduler": _Spec(_named("ddpm"), "timesteps", ("variance_type", *_CLIP), indexed=False, build=_ddpm_stock,
                           row_at=_ddpm_at,
                           note="variance_type any value (learned, learned_range: the variance channels of the "
                                "model output, noise then drawn as diffusers draws it also without a generator; "
                                "values other than fixed_small_log, fixed_large, fixed_large_log and the learned "
                                "ones are fixed_small, as in diffusers); " + _TIMESTEP_NOTE),
    "DDIMScheduler": _Spec(
        _named("ddim"), "timesteps", ("set_alpha_to_one", *_CLIP),
        step_options={"eta": "eta", "use_clipped_model_output": "use_clipped_model_output"}, indexed=False,
        needs_set_timesteps=True, note=_TIMESTEP_NOTE, array_model_output=True, build=_ddim_stock, row_at=_ddim_at),
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
                                  array_model_output=True, fixed={"weights": "diffusers"},
                                  note=f"step(order) any int >= 1: every step up to order {2 * MAX_READS} (above "
                                       f"{MAX_READS + 1} a row reads {MAX_READS - 1} earlier derivatives and one sum "
                                       f"of the older ones, written {MAX_READS} steps before); at a higher order the "
                                       f"steps from index {2 * MAX_READS} on are refused when they run ({2 * MAX_READS}"
                                       f" earlier derivatives: more than a plan row's {MAX_READS} history reads "
                                       "carry), the steps before them run"),
    "DPMSolverMultistepScheduler": _Spec(
        _dpm_sampler, "multistep",
        ("solver_type", "lower_order_final", "euler_at_final", *_THRESH),
        only={"algorithm_type": ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")},
        fixed={"flavor": "diffusers"}, noise_dtype=torch.float32, out_dtype=_dpm_out_dtype, restart="slice",
        needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS,
        check=_check_multistep, note=_DPM_NOTE, model_output=_dpm_model_output, array_model_output=True,
        build=_dpm_build,
        noise_shape=_dpm_noise_shape, accepted=("variance_type", "solver_order"),
        prefix_options={"lower_order_final": False, "euler_at_final": False}, prefix_exact=_dpm_prefix_exact),
    "UniPCMultistepScheduler": _Spec(
        _named("unipc"), "multistep",
        ("solver_order", "solver_type", "lower_order_final", "disable_corrector", "predict_x0", "solver_p",
         *_THRESH),
        restart="slice", needs_set_timesteps=True,
        predictions=_MULTISTEP_PREDICTIONS, out_dtype="sample", check=_check_multistep,
        note=_UNIPC_NOTE, array_model_output=True, build=_float32_build("unipc"),
        prefix_options={"lower_order_final": False}, prefix_exact=_unipc_prefix_exact),
    "FlowMatchEulerDiscreteScheduler": _Spec(
        _named("flow_euler"), "flow", ("stochastic_sampling", "invert_sigmas"), build=_flow_inverted,
        step_only={"per_token_timesteps": None}, step_ignored=("s_churn", "s_tmin", "s_tmax", "s_noise"),
        step_only_why={"per_token_timesteps": "it gives every token its own sigma, so the step's coefficients "
                                              "differ element by element; a plan row's coefficients are one "
                                              "scalar each per row"},
        noise_dtype=torch.float32, out_dtype="model", predictions=(), no_integer_timestep=True,
        noise_shape="sample"),
    "FlowMatchHeunDiscreteScheduler": _Spec(
        _named("flow_heun"), "flow_heun", step_plan=_EULER_CHURN, plan_key=_euler_churn_key, adjust=_flow_heun_churn,
        out_dtype="model", predictions=(), no_integer_timestep=True, needs_set_timesteps=True,
        note="step(s_churn, s_tmin, s_tmax, s_noise) as diffusers (noise drawn in both stages where gamma > 0)"),
    # -- distilled, EDM, k-diffusion-style and SA-Solver classes (their build hooks: see _distilled .. _sa_build)
    "LCMScheduler": _Spec(
        _named("lcm"), "timesteps", ("timestep_scaling", *_CLIP),
        accepted=("original_inference_steps", "set_alpha_to_one"), build=_distilled("lcm"), needs_set_timesteps=True,
        noise_dtype="promote", array_model_output=True,
        note="set_alpha_to_one: no effect (as in diffusers' step); " + _DISTILLED_NOTE),
    "TCDScheduler": _Spec(
        _named("tcd"), "timesteps",
        accepted=("original_inference_steps", "timestep_scaling", "set_alpha_to_one", *_CLIP),
        step_options={"eta": "eta"}, build=_distilled("tcd"), needs_set_timesteps=True, noise_dtype="promote",
        array_model_output=True,
        note="clip_sample, thresholding (and their values), timestep_scaling, set_alpha_to_one: no effect (as in "
             "diffusers' step); " + _DISTILLED_NOTE),
    "FlowMatchLCMScheduler": _Spec(
        _named("flow_lcm"), "flow", only={"scale_factors": (None, [])}, accepted=("invert_sigmas", "upscale_mode"),
        before_step=_flow_lcm_state, noise_dtype="float32_model", out_dtype="model", predictions=(),
        no_integer_timestep=True, noise_shape="broadcast",
        note="scale_factors (also set_scale_factors) refused: they resize the estimate between steps"),
    "EDMEulerScheduler": _Spec(
        _edm_sampler, "sigmas", accepted=("sigma_data", "sigma_schedule", "rho"), build=_edm_build,
        step_plan=_EULER_CHURN, plan_key=_euler_churn_key, adjust=_edm_churn, step_only={"pred_original_sample": None},
        out_dtype="model", x0_float32=True, no_integer_timestep=True, predictions=("epsilon", "v_prediction"),
        note=_EDM_NOTE + "; step(s_churn, s_tmin, s_tmax, s_noise) as diffusers"),
    "EDMDPMSolverMultistepScheduler": _Spec(
        _edm_sampler, "sigmas", ("solver_type", "lower_order_final", "euler_at_final", *_THRESH),
        only={"algorithm_type": ("dpmsolver++", "sde-dpmsolver++"), "solver_order": (1, 2, 3)},
        accepted=("sigma_data", "sigma_schedule", "rho"), fixed={"flavor": "diffusers"}, build=_edm_build,
        check=_check_edm_dpm, noise_dtype="promote", noise_shape="broadcast", restart="slice", array_model_output=True,
        array_sample=True, needs_set_timesteps=True, predictions=("epsilon", "v_prediction"),
        prefix_options={"lower_order_final": False, "euler_at_final": False}, prefix_exact=_dpm_prefix_exact,
        note=_EDM_NOTE + "; not sde-dpmsolver++ with solver_order=3 (diffusers has no such update)"),
    "KDPM2DiscreteScheduler": _Spec(
        _named("dpm_2"), "sigmas", build=_kdpm2_build, after_step=_first_order_state,
        predictions=("epsilon", "v_prediction"), array_model_output=True, shifted=_kdpm2_rows),
    "KDPM2AncestralDiscreteScheduler": _Spec(
        _named("dpm_2_ancestral"), "sigmas", build=_kdpm2_build, after_step=_first_order_state,
        predictions=("epsilon", "v_prediction"), shifted=_kdpm2_rows),
    "DPMSolverSDEScheduler": _Spec(
        _named("dpmpp_sde"), "sigmas", accepted=("noise_sampler_seed",), step_options={"s_noise": "s_noise"},
        fixed={"brownian": False}, build=_two_stage_build, before_step=_sde_noise, after_step=_sde_state,
        predictions=("epsilon", "v_prediction"), array_model_output=True,
        note="noise from diffusers' own Brownian tree (torchsde), seeded by noise_sampler_seed as there"),
    "SASolverScheduler": _Spec(
        _named("sa_solver"), "multistep", ("predictor_order", "corrector_order", "algorithm_type", "lower_order_final",
                                           *_THRESH),
        only={"predictor_order": (1, 2, 3, 4), "corrector_order": (1, 2, 3, 4),
              "algorithm_type": ("data_prediction", "noise_prediction")},
        accepted=("tau_func", "variance_type"), build=_sa_build, check=_check_sa, before_step=_sa_shapes,
        after_step=_sa_state, step_row=_sa_row,
        out_dtype="sample", restart="slice", needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS,
        note="tau_func any callable (called per step on the timestep, as diffusers' step does); variance_type not "
             "learned / learned_range (diffusers' step fails); flow_prediction only with use_flow_sigmas=True and "
             "data_prediction"),
    # -- PNDM, IPNDM, DEIS, DPM-Solver singlestep, inversion (their build hooks: see _pndm_build .. _ddim_inverse_build)
    "PNDMScheduler": _Spec(
        _named("pndm"), "own", ("skip_prk_steps", "set_alpha_to_one"), build=_pndm_build, counter="counter",
        indexed=False, restart="slice", needs_set_timesteps=True, predictions=("epsilon", "v_prediction"),
        array_model_output=True, array_sample=True, note=_PNDM_NOTE),
    "IPNDMScheduler": _Spec(
        _named("ipndm"), "own", build=_ipndm_build, restart="slice", predictions=(),
        note="the model output is read as v, as diffusers' step reads it; trained_betas are the grid's sigmas"),
    "DEISMultistepScheduler": _Spec(
        _named("deis"), "multistep", ("solver_order", "lower_order_final", *_THRESH),
        only={"algorithm_type": ("deis",), "solver_type": ("logrho",)}, build=_float32_build("deis"),
        restart="slice", needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS, check=_check_flow_sigmas,
        array_model_output=True, note="solver_order any int >= 1 (above 3: third order, as diffusers); " + _FLOW_NOTE),
    "DPMSolverSinglestepScheduler": _Spec(
        _named("dpm_single"), "multistep",
        ("solver_order", "algorithm_type", "solver_type", "lower_order_final", *_THRESH),
        accepted=("variance_type",), build=_float32_build("dpm_single"), check=_check_single,
        model_output=_dpm_model_output, noise_dtype="promote", noise_shape=_dpm_noise_shape, restart="slice",
        needs_set_timesteps=True, predictions=_MULTISTEP_PREDICTIONS, array_model_output=True, note=_SINGLE_NOTE),
    "DDIMInverseScheduler": _Spec(
        _named("ddim_inverse"), "timesteps", ("clip_sample", "clip_sample_range", "set_alpha_to_one"),
        build=_ddim_inverse_build, row_at=_ddim_inverse_at, indexed=False, needs_set_timesteps=True,
        output="DDIMSchedulerOutput", array_model_output=True,
        note="step(timestep) any integer timestep (diffusers computes the step from the value); not "
             "prediction_type=sample with set_alpha_to_one=True (the first step's noise estimate divides by "
             "sigma = 0 there: diffusers gives inf/NaN)"),
    "DPMSolverMultistepInverseScheduler": _Spec(
        _named("dpm_inverse"), "multistep",
        ("algorithm_type", "solver_order", "solver_type", "lower_order_final", "euler_at_final", *_THRESH),
        accepted=("variance_type",), build=_inverse_build, restart="slice", needs_set_timesteps=True,
        predictions=_MULTISTEP_PREDICTIONS, check=_check_inverse, model_output=_dpm_model_output,
        array_model_output=True,
        prefix_options={"lower_order_final": False, "euler_at_final": False}, prefix_exact=_dpm_prefix_exact,
        note=_INVERSE_NOTE),
    # -- CogVideoX (their build hooks: see _cog_row .. _cog_dpm_noise)
    "CogVideoXDDIMScheduler": _Spec(
        _named("cogvideox_ddim"), "timesteps", accepted=("clip_sample", "clip_sample_range", "sample_max_value",
                                                         "set_alpha_to_one", "snr_shift_scale"),
        step_ignored=("eta", "use_clipped_model_output", "generator", "variance_noise"), build=_cog_ddim_build,
        row_at=_cog_ddim_at, indexed=False, needs_set_timesteps=True, output="DDIMSchedulerOutput",
        array_model_output=True, scalar_dtype=_cog_scalar_dtype,
        note="eta and step noise: none (diffusers' step is DDIM with eta = 0); " + _COG_NOTE),
    "CogVideoXDPMScheduler": _Spec(
        _named("cogvideox_dpm"), "timesteps", accepted=("clip_sample", "clip_sample_range", "sample_max_value",
                                                        "set_alpha_to_one", "snr_shift_scale"),
        step_ignored=("eta", "use_clipped_model_output", "variance_noise"), build=_cog_dpm_build, row_at=_cog_dpm_at,
        step_row=_cog_dpm_row, before_step=_cog_dpm_noise, given_history="old_pred_original_sample", indexed=False,
        needs_set_timesteps=True, output="DDIMSchedulerOutput", noise_shape="sample", array_model_output=True,
        scalar_dtype=_cog_scalar_dtype,
        note="step(old_pred_original_sample, timestep_back) as diffusers: the second-order update where both are "
             "given and the step is not the last (a tuple returned otherwise, whatever return_dict says, as there); "
             "noise drawn as diffusers draws it (sample's shape and dtype, twice for a second-order step; torch's "
             "global RNG without a generator); " + _COG_NOTE),
}
"""Supported diffusers scheduler classes (by name) and how each maps onto a fastdiff sampler."""


def _noise_text(dtype) -> str:
    return {"promote": "the promoted dtype of sample and model output",
            "float32_model": "float32 promoted with the model output's dtype"}.get(dtype, "float32")


def noise_dtype_for(spec_dtype, model_dtype: torch.dtype, estimate_dtype: torch.dtype) -> torch.dtype:
    """The dtype diffusers draws a step's noise in (:attr:`_Spec.noise_dtype` resolved): the model output's
    (``model_dtype``) for ``None``, the estimate's (``estimate_dtype``, of sample and model output together)
    for ``"promote"``, float32 promoted with the model output's for ``"float32_model"``, else the dtype given."""
    if spec_dtype is None:
        return model_dtype
    if spec_dtype == "promote":
        return estimate_dtype
    if spec_dtype == "float32_model":
        return torch.promote_types(torch.float32, model_dtype)
    return spec_dtype


def support_table() -> str:
    """A plain-text table of the supported classes, config options and ``step`` arguments."""
    lines = [f"config keys handled by diffusers' own set_timesteps (any value): {', '.join(sorted(_GRID_KEYS))}"]
    for name, s in SUPPORT.items():
        only = ", ".join(f"{k} in {v}" for k, v in s.only.items())
        step = [f"{k} (any)" for k in (*s.step_options, *s.step_plan)]
        step += [f"{k}={v!r} only" + (f" ({s.step_only_why[k]})" if k in s.step_only_why else "")
                 for k, v in s.step_only.items()]
        step += [f"{k} (no effect)" for k in s.step_ignored]
        pred = (f"prediction_type in ({', '.join(s.predictions)})",) if s.predictions else ()
        lines.append(f"{name}: {', '.join(pred + s.options)}"
                     f"{'; only ' + only if only else ''}; step: {', '.join(step) or '-'}"
                     f"{'; generator noise in ' + _noise_text(s.noise_dtype) if s.noise_dtype else ''}"
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


def _own_config(cls: type, cfg: Mapping) -> dict:
    """``cfg`` without the keys that are not ``cls.__init__`` parameters but are those of a class diffusers
    lists as compatible with it: ``from_config`` of another class's config (``pipe.scheduler =
    X.from_config(pipe.scheduler.config)``, diffusers' way to switch schedulers) registers the values given
    to that class's other keys as well ("hidden" keys, kept so that a switch back restores them); the class
    never reads them, and neither does the drop-in. Any other key stays (a key of a newer diffusers release,
    say: refused by name)."""
    hidden = _hidden_keys(cls)
    return {k: v for k, v in cfg.items() if k not in hidden}


@functools.lru_cache(maxsize=None)
def _hidden_keys(cls: type) -> frozenset:
    """Keys of ``cls``'s compatible classes that ``cls.__init__`` does not take (:func:`_own_config`)."""
    import inspect

    def params(c) -> set:
        return {k for k, p in inspect.signature(c.__init__).parameters.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and k != "self"}

    others = set().union(*(params(c) for c in cls._get_compatibles())) if hasattr(cls, "_get_compatibles") else set()
    return frozenset(others - params(cls))


def _check_config(cls_name: str, spec: _Spec, cfg: Mapping, cls: type | None = None) -> None:
    """Raise ``ValueError`` naming any config key (or value) the fused step does not implement (of the keys
    that are ``cls.__init__`` parameters, where ``cls`` is given: :func:`_own_config`)."""
    if cls is not None:
        cfg = _own_config(cls, cfg)
    for k, v in cfg.items():
        if k in _META_KEYS or k in _GRID_KEYS or k in spec.options or k in spec.accepted or k == "prediction_type":
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


