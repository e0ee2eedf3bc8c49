"""The fused scheduler: :func:`from_diffusers` and the dynamic subclass whose ``step`` runs one plan
row through the fused kernel (see the package docstring for the behaviour)."""

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

from .. import samplers
from ..core.args import StepArgs, clip_code, pack_row
from ..core.guidance import threshold_bound
from ..core.plan import Plan, Row, Write, combo
from ..core.schedules import Discretization
from ..runtime import ops
from ..runtime.loop import draw_noise
from ..samplers._common import RowLimitError
from ..samplers._multistep import Grid, log_snr
from .support import (_PREDICTION_ALIASES, _OwnFlow, _OwnVP, _Spec, _check_config, _flow_heun_rows, _host, _spec_of,
                      _stock_class, noise_dtype_for)


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

    @property
    def fastdiff_history(self) -> list[torch.Tensor]:
        """The history ring of the current run (tensors shaped like the sample)."""
        return [] if self._fd_run is None or self._fd_run.hist is None else self._fd_run.hist

    def fastdiff_plan(self, start: int = 0, **step_args) -> Plan:
        """The plan of a run from row ``start`` with these ``step()`` arguments (``eta``, ``order``).

        Rows whose stock step gives inf/NaN (or fails) are placeholders listed in
        ``plan.meta["refused"]`` (row -> reason), which ``step`` raises when such a row is run."""
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
        if spec.grid == "own":  # the class's build hook reads its own arrays (PNDM, IPNDM) from row ``start``
            return {"timesteps": ts[start:], "steps": len(ts) - start, "start": start}, len(ts) - start
        sig = _host(self.sigmas)
        if spec.grid in ("heun", "flow_heun"):  # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0] -> one entry per step
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
                if self.config.get("prediction_type") == "v_prediction":
                    kind = "vp"  # diffusers' x0 = alpha x - sigma v with these alpha, sigma: the rows' v form
            else:
                # alpha = 1/sqrt(s^2 + 1), sigma_t = s * alpha
                alphas = tuple(1.0 / math.sqrt(s * s + 1.0) for s in sig)
                stds, kind = tuple(float(s) * a for s, a in zip(sig, alphas)), "vp"
            grid = Grid(tuple(map(float, ts)), tuple(map(float, sig)), alphas, stds,
                        tuple(_log_snr(a, s) for a, s in zip(alphas, stds)), 1.0, kind)
            return {"grid": grid, "steps": n}, n
        init = float(getattr(self, "init_noise_sigma", 1.0)) if start == 0 else float(sig[0])
        disc = Discretization(sigmas=sig, timesteps=ts, init_sigma=init)
        return {"disc": disc, "steps": n}, n

    def _fd_schedule(self, arrays: dict):
        if self._fd_spec.grid in ("flow", "flow_heun"):
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
        arrays, _ = self._fd_arrays(start)
        if spec.grid == "timesteps" and len(arrays["timesteps"]) and (cfg.get("trained_betas") is not None
                                                                      or spec.row_at is None):
            n, top = len(self.alphas_cumprod), int(np.max(arrays["timesteps"]))
            # diffusers' own step would index alphas_cumprod[top] and fail with an IndexError (a grid past the
            # training timesteps otherwise, by its spacing and steps_offset: the rows there are refused when run)
            if top >= n:
                raise ValueError(f"{name}: timestep {top} has no beta: trained_betas has {n} entries but "
                                 f"num_train_timesteps is {cfg.num_train_timesteps}; give a beta for every training "
                                 "timestep")
        plan = self._fd_rows(start, key)
        if spec.adjust is not None and any(k in spec.step_plan for k, _ in key):
            plan = spec.adjust(self, plan, dict(key), start)
        want = np.nan_to_num(_host(self.timesteps)[start:]).astype(np.float32)  # (a refused row's NaN: 0)
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

    def _fd_rows(self, start: int, key: tuple, extra: Mapping | None = None) -> Plan:
        """The plan of a run from row ``start`` with the ``step()`` arguments in ``key``, and ``extra`` sampler
        options (SA-Solver's ``taus`` of the timesteps as given: ``_Spec.step_row``)."""
        spec = self._fd_spec
        arrays, steps = self._fd_arrays(start)
        options = {**self._fd_options(key), **(extra or {})}
        if spec.restart == "slice" and start > 0:
            si = samplers.info(spec.sampler(self.config))
            if si.restart is not None:  # the sampler's own rule for a run started part-way
                options.update(si.restart({**si.options, **options}, start, start + steps).options)
        options, fields = _plan_fields(options)
        plan = self._fd_build(arrays, steps, self._fd_prediction(), options, _host(self.timesteps)[start:], start)
        return self._fd_fields(plan, fields)

    def _fd_shifted(self, run: _Run, i: int) -> _Run:
        """A two-stage run whose first call is at index ``i``, a second stage of the grid (``set_begin_index(i)``
        with ``i`` odd, or a first timestep the grid repeats, which diffusers' lookup takes at its second
        place). diffusers' state holds no step there, so it takes call ``i`` as a FIRST stage and call
        ``i + 1`` as its second. Heun's first stage there goes from ``sigmas[i]`` to ``sigmas[i + 1]``,
        which the interleaved grid makes equal, so every step of such a run has ``dt = 0`` and returns its
        sample (the second stage: the sample its first stage stored), and so do these rows. FlowMatchHeun's rows
        follow its own rule from ``i`` (with churn the sample is re-noised: not the identity); a class
        with a ``shifted`` hook (KDPM2) builds its own rows."""
        cached = self._fd_plans.get(("shifted", i, run.key))
        if cached is None:
            if self._fd_spec.shifted is not None:
                plan = self._fd_spec.shifted(self, run.plan, i)
            elif self._fd_spec.grid == "flow_heun":
                plan = _flow_heun_rows(self, dict(run.key), phase=i)
            else:
                sig = _host(self.sigmas)
                rows, refused = list(run.plan.rows), dict(run.plan.meta.get("refused", {}))
                for r in range(i, len(rows)):
                    stage = (r - i) % 2
                    j = r - stage
                    if j + 1 >= len(sig) or sig[j] != sig[j + 1]:
                        refused[r] = (f"{type(self).__name__}.step: a run started at step index {i} (a second stage) "
                                      f"reaches step index {r}, whose diffusers step has no plan-row form; refused")
                    elif stage == 0:
                        last = r + 1 == len(rows)
                        rows[r] = dataclasses.replace(rows[r], out=combo(x=1.0), reads=(), noise=False, stage=0,
                                                      writes=() if last else (Write(0, combo(x=1.0)),))
                    else:
                        rows[r] = dataclasses.replace(rows[r], out=combo(h=(1.0,)), reads=(0,), writes=(),
                                                      noise=False, stage=1)
                plan = dataclasses.replace(run.plan, rows=tuple(rows), n_slots=max(run.plan.n_slots, 1),
                                           meta={**run.plan.meta, "refused": refused, "shifted": i})
            cached = _Run(plan, 0, run.key, run.index)
            self._fd_plans[("shifted", i, run.key)] = cached
        return _Run(cached.plan, 0, run.key, cached.index)

    def _fd_options(self, key: tuple) -> dict:
        """The sampler options of the config, the class's fixed ones and the ``step()`` arguments in ``key``."""
        spec, cfg = self._fd_spec, self.config
        options = {k: cfg[k] for k in spec.options if k in cfg}
        options.update(spec.fixed)
        options.update({spec.step_options[k]: v for k, v in key if k in spec.step_options})
        return options

    def _fd_prediction(self) -> str:
        grid = self._fd_spec.grid
        prediction = self.config.get("prediction_type") or ("flow" if grid in ("flow", "flow_heun") else "eps")
        return _PREDICTION_ALIASES.get(prediction, prediction)

    def _fd_build_once(self, arrays: dict, steps: int, prediction: str, options: dict) -> Plan:
        spec = self._fd_spec
        options = dict(options)  # (a build hook may take its own keys out of them)
        plan = spec.build(self, arrays, prediction, options) if spec.build is not None else None
        if plan is None:
            plan = samplers.build(spec.sampler(self.config), self._fd_schedule(arrays), steps, prediction=prediction,
                                  **options)
        return plan

    def _fd_build(self, arrays: dict, steps: int, prediction: str, options: dict, timesteps: np.ndarray,
                  start: int) -> Plan:
        """The plan of ``arrays`` (the sampler's, or the class's own ``build``), with every row that can be
        planned: where one cannot (the step after a repeated noise level divides by its length 0; a last
        step into sigma = 0 with no finite value), diffusers' own step gives inf/NaN there, so the rows
        before it are planned as in the whole run (:meth:`_fd_partial`) and that row and the rest are
        placeholders refused when they run (``plan.meta["refused"]``: row -> reason)."""
        try:
            return self._fd_build_once(arrays, steps, prediction, options)
        except (ArithmeticError, ValueError, np.linalg.LinAlgError) as exc:
            return self._fd_partial(arrays, steps, prediction, options, timesteps, start, exc)

    def _fd_partial(self, arrays: dict, steps: int, prediction: str, options: dict, timesteps: np.ndarray,
                    start: int, exc: Exception) -> Plan:
        """The rows of the first steps of a run some later row of which cannot be planned.

        First the run with its last point moved (a failure of the last step alone: its rows before are
        those of the run); else the longest prefix of steps that plans, with the class's end-of-run
        rules switched off (``prefix_options``) and only the steps it shares with the run kept
        (``prefix_exact``). A failure already at the first step is the config's: raised here. A step
        refused for the row contract (:class:`~fastdiff.samplers._common.RowLimitError`: diffusers' step
        is finite there) is refused under that name."""
        spec = self._fd_spec
        name = type(self).__name__
        failed = {}  # steps of an attempted plan -> why it failed

        def attempt(arr, k, over=None):
            try:
                return self._fd_build_once(arr, k, prediction, {**options, **(over or {})})
            except (ArithmeticError, ValueError, np.linalg.LinAlgError) as e:
                failed[k] = e
                return None

        base, keep = None, 0
        if ("disc" in arrays or "grid" in arrays) and steps >= 1:
            base = attempt(_moved_last(arrays), steps)
            keep = steps - 1
            if base is None:
                lo, hi = 1, steps - 1
                rep = _first_repeat(arrays)  # (the usual cause: the step after a zero-length one; try it first)
                if rep is not None and 1 <= rep + 1 <= steps - 1:
                    p = attempt(_prefix(arrays, rep + 1), rep + 1, spec.prefix_options)
                    if p is not None:
                        base, keep, lo = p, rep + 1, rep + 2
                        nxt = rep + 2
                        longer = nxt <= steps - 1 and attempt(_prefix(arrays, nxt), nxt, spec.prefix_options)
                        if not longer:
                            hi = lo - 1  # found: rows 0..rep plan, row rep + 1 does not
                while lo <= hi:  # a failing row fails every longer prefix
                    mid = (lo + hi) // 2
                    p = attempt(_prefix(arrays, mid), mid, spec.prefix_options)
                    if p is not None:
                        base, keep, lo = p, mid, mid + 1
                    else:
                        hi = mid - 1
                if base is not None and spec.prefix_exact is not None:
                    keep = spec.prefix_exact(self.config, start + steps, start + keep) - start
        rows = [r for r in (base.rows if base is not None else ()) if r.step < keep]
        what = str(exc) or type(exc).__name__
        if not rows and not isinstance(exc, (ArithmeticError, np.linalg.LinAlgError)) \
                and not any(s in what for s in ("non-finite", "math domain", "log-SNR")):
            raise exc  # the config's own refusal, not one step's
        first = len(rows)
        cause = failed.get(first + 1, exc)  # the failure of the shortest plan that includes step `first`
        if isinstance(cause, RowLimitError):
            why = f"cannot be expressed as plan rows ({cause})"
            refused = {first: f"{name}.step: step {start + first} (timestep {float(timesteps[first]):g}) {why}, "
                              "though diffusers' own step computes it; refused"}
        else:
            why = f"has no finite update ({_repeat_reason(arrays, first) or what})"
            refused = {first: f"{name}.step: step {start + first} (timestep {float(timesteps[first]):g}) {why}: "
                              "diffusers' own step gives inf/NaN there; refused"}
        for r in range(first + 1, len(timesteps)):
            refused[r] = (f"{name}.step: step {start + r} (timestep {float(timesteps[r]):g}) follows step "
                          f"{start + first}, which {why}; refused")
        fill = [Row(t=float(np.nan_to_num(timesteps[r])), sigma=0.0, in_scale=1.0, a_x=1.0, a_e=0.0, out=combo(x=1.0),
                    step=r)
                for r in range(first, len(timesteps))]
        template = base if base is not None else Plan((), init_scale=1.0)
        return dataclasses.replace(template, rows=tuple(rows) + tuple(fill), steps=steps,
                                   meta={**template.meta, "refused": refused})

    def _fd_fields(self, plan: Plan, fields: dict) -> Plan:
        """``plan`` with the clip and threshold values of the config (:func:`_plan_fields`), each
        checked only where a row reads it, as diffusers reads it only then: any value its step turns
        into a finite result is taken (a ``sample_max_value`` below 1, a negative range: ``clamp`` with
        ``min > max`` gives ``max``), else a ``ValueError`` naming it."""
        name = type(self).__name__
        used = {r.clip for r in plan.rows}
        changes = {}
        for fld, (key, v) in fields.items():
            if _FIELD_CLIP[fld] not in used:
                continue
            num = isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(float(v))
            why = None
            if not num:
                why = "a number is needed"
            elif fld == "threshold_ratio" and not 0.0 <= float(v) <= 1.0:
                why = "torch.quantile needs it in [0, 1]: diffusers' step fails"
            elif fld == "threshold_max" and float(v) == 0.0:
                why = "the thresholded estimate is divided by it: diffusers' step gives NaN"
            if why is not None:
                raise ValueError(f"{name} config {key}={v!r} is not supported by fastdiff.diffusers ({why})")
            changes[fld] = float(v)
        return dataclasses.replace(plan, **changes) if changes else plan

    def _fd_at(self, t: float, key: tuple) -> tuple[Plan, int]:
        """``(plan of one row, row number for the noise counter)`` of a step at timestep ``t``, not one
        of ``scheduler.timesteps``, where diffusers' step computes it from the value (``row_at``)."""
        spec = self._fd_spec
        name = type(self).__name__
        if spec.row_at is None or not math.isfinite(t) or not float(t).is_integer():
            raise ValueError(f"{name}.step(timestep={t:g}): diffusers' step fails on a timestep that is not an "
                             "integer index of alphas_cumprod; use one of scheduler.timesteps")
        ti = int(t)
        plan = self._fd_plans.get(("at", ti, key))
        if plan is None:
            options, fields = _plan_fields(self._fd_options(key))
            plan = spec.row_at(self, ti, self._fd_prediction(), options)
            if plan is None:
                raise ValueError(f"{name}.step(timestep={ti}): after set_timesteps diffusers looks the timestep up in "
                                 "scheduler.timesteps (its step fails with an IndexError); use one of "
                                 "scheduler.timesteps")
            plan = self._fd_fields(plan, fields)
            self._fd_plans[("at", ti, key)] = plan
        # a row number of its own (a row's counter word), past the grid's
        return plan, len(self.timesteps) + len(self.alphas_cumprod) + ti

    def _fd_counted(self, timestep, key: tuple) -> tuple[_Run, int]:
        """``(run, row)`` of a step of a class that counts its calls (``spec.counter``, PNDM's ``counter``):
        diffusers' step at count ``c`` depends on ``c`` and the timestep given, so a run is the part of
        ``scheduler.timesteps`` it is given from count 0 (img2img passes ``timesteps[k:]``), planned from
        the first row with that timestep; where that timestep repeats (PNDM's ``timesteps[1]`` and
        ``[2]``), the next call's timestep tells which, and the run moves to that start (its rows so
        far are the same there, and so is the history they wrote)."""
        name = type(self).__name__
        c = int(getattr(self, self._fd_spec.counter))
        t = float(timestep.item() if isinstance(timestep, torch.Tensor) else np.asarray(timestep).reshape(-1)[0])
        ts = _host(self.timesteps)
        run = self._fd_run
        if c == 0 or run is None or run.key != key:
            starts = np.flatnonzero(ts == t)
            if not len(starts):
                raise ValueError(f"{name}.step(timestep={t:g}): the first step of a run needs one of "
                                 "scheduler.timesteps")
            run = self._fd_run = self._fd_plan(int(starts[0]), key)
        i = run.start + c
        if i < len(ts) and ts[i] != t:
            for s in np.flatnonzero(ts == ts[run.start]):
                if s > run.start and s + c < len(ts) and ts[s + c] == t:
                    other = self._fd_plan(int(s), key)
                    if other.plan is not None and other.plan.rows[:c] == run.plan.rows[:c]:
                        other.hist, run = run.hist, other
                        self._fd_run, i = run, int(s) + c
                        break
            else:
                raise ValueError(f"{name}.step(timestep={t:g}): call {c} of this run (from timestep "
                                 f"{float(ts[run.start]):g}) needs timestep {float(ts[i]):g}, the next of "
                                 "scheduler.timesteps; call set_timesteps to start a new run")
        return run, i

    # -- step ----------------------------------------------------------------------------------

    def _fd_args(self, a: dict) -> dict:
        """``step``'s ``model_output``, ``timestep`` and ``sample`` checked before anything runs: where
        diffusers' own step fails on them with an unrelated error, a ``TypeError`` / ``ValueError``
        naming the argument; what it accepts passes (a numpy model output where its arithmetic takes
        one, a zero-dimensional CPU tensor beside a tensor on another device)."""
        spec = self._fd_spec
        name = type(self).__name__
        m, t, x = a["model_output"], a["timestep"], a["sample"]
        if isinstance(x, np.ndarray) and spec.array_sample:  # (its arithmetic with tensors makes it one)
            try:
                x = torch.as_tensor(x)
            except (TypeError, RuntimeError) as exc:
                raise TypeError(f"{name}.step: sample must be a tensor of numbers, got a numpy array of "
                                f"dtype {x.dtype} ({exc})") from None
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
        array_m = isinstance(a.get("model_output"), np.ndarray)
        t_dims = isinstance(a.get("timestep"), (torch.Tensor, np.ndarray)) and np.ndim(a["timestep"]) >= 1
        a = self._fd_args(a)
        for k, v in spec.step_only.items():
            val = a.get(k)
            if not (val is v or (isinstance(val, (int, float)) and val == v)):
                why = f": {spec.step_only_why[k]}" if k in spec.step_only_why else ""
                raise ValueError(f"{name}.step({k}={_short(val)}) is not supported by the fused step "
                                 f"(supported: {k}={v!r}){why}; use the stock scheduler for it")
        if spec.no_integer_timestep and isinstance(a["timestep"], (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(f"Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                             f"`{name}.step()` is not supported. Make sure to pass one of the `scheduler.timesteps` "
                             "as a timestep.")
        if spec.needs_set_timesteps and getattr(self, "num_inference_steps", None) is None:
            raise ValueError(f"{name}: number of inference steps is None; call set_timesteps before step")
        key = self._fd_key(a)
        m, timestep, x = a["model_output"], a["timestep"], a["sample"]
        run = self._fd_run
        at = None
        if spec.counter is not None:  # PNDM: diffusers picks the step by its own call counter
            run, i = self._fd_counted(timestep, key)
        elif spec.indexed:
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
                shifts = spec.grid in ("heun", "flow_heun") or spec.shifted is not None
                if shifts and run.plan is not None and 0 <= i - run.start < len(run.plan.rows) \
                        and run.plan.rows[i - run.start].stage == 1:
                    run = self._fd_run = self._fd_shifted(run, i)
            elif run.key != key:
                raise ValueError(f"{name}.step arguments {dict(key)} differ from earlier steps of this run "
                                 f"{dict(run.key)}; call set_timesteps to start a new run")
        else:
            if run is None or run.key != key:
                run = self._fd_run = self._fd_plan(0, key)
            t = float(timestep.item() if isinstance(timestep, torch.Tensor) else np.asarray(timestep).reshape(-1)[0])
            if t in run.index:
                i = run.index[t]
            else:  # diffusers computes the step from the value: a row of its own (cached)
                at, i = self._fd_at(t, key)
        if run.plan is None:
            return self._fd_stock.step(**a)
        if at is not None:
            plan, k = at, 0
        else:
            k = i - run.start
            plan = run.plan
            if not 0 <= k < len(plan.rows):
                last = run.start + len(plan.rows) - 1
                raise IndexError(f"{name}.step: step index {i} is outside this run (rows {run.start}..{last}); "
                                 "call set_timesteps first")
        if spec.step_row is not None:  # a row of its own for this call (SA-Solver's taus, CogVideoXDPM's arguments)
            plan, k = spec.step_row(self, run, k, a) or (plan, k)
        row = plan.rows[k]
        refused = plan.meta.get("refused", {}).get(k)
        if refused is not None:  # a step whose diffusers result is inf/NaN (or that fails there)
            raise ValueError(refused)
        own_noise = spec.before_step(self, row, i, a) if spec.before_step is not None else None
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
        if row.noise and a.get("variance_noise") is None and own_noise is None and not draw:
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
        if spec.given_history is not None and row.reads:  # the estimate the caller keeps, read as slot 0
            run.hist[0].copy_(self._fd_given(a.get(spec.given_history), shape, work))
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
        elif own_noise is not None:  # drawn by the class's own hook as diffusers draws it (before_step)
            z, seeds = own_noise.to(device=x.device, dtype=dt).expand(shape).reshape(work).contiguous(), None
        else:
            z, seeds = self._fd_noise(row, a, mm, m.dtype, draw, shape)
        out, bound = _run_row(row, plan, i, xx, mm, run.hist, z=z, seeds=seeds, backend=self.fastdiff_backend)
        how = spec.out_dtype(self.config) if callable(spec.out_dtype) else spec.out_dtype
        x_dtype = x.dtype
        if spec.scalar_dtype is not None and (array_m or t_dims or (x.dim() == 0 and m.dim() == 0)):
            # diffusers' scalars (0-d tensors) take part in the promotion where no operand has dimensions, and
            # where they have dimensions themselves (indexed by a timestep of shape (1,)); numpy's promotion
            # where the model output is an array (its 0-d arrays are not weak): a wider result
            x_dtype = torch.promote_types(x_dtype, spec.scalar_dtype(self))
        out = out.to({"model": m.dtype, "sample": x_dtype}.get(how, torch.promote_types(x_dtype, m.dtype)))
        out = out.reshape(shape)
        self._fd_after(row, i)
        if spec.after_step is not None:
            spec.after_step(self, row, i, x)
        out_cls = _output_class(self._fd_stock, spec.output)
        if len(dataclasses.fields(out_cls)) < 2:
            return out_cls(prev_sample=out) if a.get("return_dict", True) else (out,)
        # the stock step also returns its data estimate (or the sampler's own second output, LCM's denoised):
        # computed only if read (one more pass)
        est = _second_output if "second_output" in plan.meta else _data_estimate
        x0 = functools.partial(_reshaped, shape, functools.partial(
            est, row, plan, k, xx, mm, z, bound, x_dtype, m.dtype, spec.x0_float32, type(self).__name__))
        if not a.get("return_dict", True) or k in plan.meta.get("tuple_rows", ()):
            return _StepTuple(out, x0)  # (tuple_rows: diffusers' step returns a tuple there whatever return_dict says)
        return _lazy_output(out_cls, out, x0)

    def _fd_given(self, h, shape: tuple[int, ...], work: tuple[int, ...]) -> torch.Tensor:
        """The history tensor a ``step()`` argument gives (``_Spec.given_history``), shaped as the ring's
        buffers: it must broadcast to the step's result, as in diffusers' arithmetic (where it would widen
        the result instead, diffusers returns another shape: refused by name)."""
        what = f"{type(self).__name__}.step: {self._fd_spec.given_history}"
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(h).__name__}")
        try:
            wide = torch.broadcast_shapes(tuple(h.shape), shape) != torch.Size(shape)
        except RuntimeError:
            wide = True
        if wide:
            raise ValueError(f"{what} {tuple(h.shape)} does not broadcast to the sample's shape {shape}")
        return h.expand(shape).reshape(work)  # (copy_ into the ring buffer casts it and moves it to its device)

    def _fd_noise(self, row: Row, a: Mapping, m: torch.Tensor, model_dtype: torch.dtype,
                  draw: tuple[int, ...] | None = None, shape: tuple[int, ...] | None = None):
        """The step's noise, ``(z, None)`` (``z`` in ``m``'s compute dtype and shape; ``(None, None)`` for a row
        without noise), drawn as diffusers' step draws it: ``variance_noise``, else ``randn_tensor`` from
        ``generator`` or, without one, from torch's global RNG.

        diffusers draws in the dtype of the model output AS GIVEN (``model_dtype``, which may be
        narrower than the compute dtype of a float32 sample), or in float32 (``noise_dtype``), and in
        the shape ``draw`` (usually ``m``'s), broadcast to the result's ``shape``.
        """
        if not row.noise:
            return None, None
        name = type(self).__name__
        draw = tuple(m.shape) if draw is None else draw
        shape = tuple(m.shape) if shape is None else shape
        nd = noise_dtype_for(self._fd_spec.noise_dtype, model_dtype, m.dtype)  # (m: in the estimate's dtype)
        ext = a.get("variance_noise")
        if ext is not None:
            if not isinstance(ext, torch.Tensor):
                raise TypeError(f"{name}.step: variance_noise must be a torch.Tensor, got {type(ext).__name__}")
            ext = ext.to(device=m.device, dtype=nd) if self._fd_spec.noise_dtype is not None else ext.to(device=m.device)
            try:
                ext = ext.expand(shape)
            except RuntimeError:
                raise ValueError(f"{name}.step: variance_noise {tuple(ext.shape)} does not broadcast to the sample's "
                                 f"shape {shape}") from None
            return ext.to(m.dtype).reshape(m.shape).contiguous(), None
        gen = a.get("generator")
        # diffusers' own randn_tensor call: from the generator, or without one from torch's global RNG (the
        # device's), so that torch.manual_seed(...) gives the stock scheduler's noise too
        z = draw_noise(draw, None if gen is None else _generator(name, gen), nd, m.device)
        return z.to(m.dtype).expand(shape).reshape(m.shape).contiguous(), None

    def _fd_after(self, row: Row, i: int) -> None:
        """Keep the stock scheduler's public state what diffusers' step would leave."""
        if self._fd_spec.indexed:
            self._step_index += 1
        if self._fd_spec.counter is not None:
            setattr(self, self._fd_spec.counter, getattr(self, self._fd_spec.counter) + 1)
        if hasattr(self, "lower_order_nums") and "solver_order" in self.config:  # (SA-Solver: its after_step)
            self.lower_order_nums = min(self.lower_order_nums + 1, int(self.config.solver_order))
        if self._fd_spec.grid in ("heun", "flow_heun"):  # state_in_first_order is `dt is None`
            self.dt = (self.sigmas[i + 1] - self.sigmas[i]) if row.stage == 0 else None


_FIELD_CLIP = {"clip_range": "static", "threshold_ratio": "dynamic", "threshold_max": "dynamic"}
_FIELDS = (("clip_sample_range", "clip_range", 1.0), ("dynamic_thresholding_ratio", "threshold_ratio", 0.995),
           ("sample_max_value", "threshold_max", 1.0))


def _plan_fields(options: dict) -> tuple[dict, dict]:
    """``(options, fields)``: the clip and threshold values moved out of the sampler options (which
    get their defaults) into the plan fields they set (``field -> (config key, value)``), so that a
    value the samplers' own range checks refuse but diffusers' step handles (``sample_max_value`` < 1,
    any value where no row clips) reaches the plan (:meth:`_FusedScheduler._fd_fields`)."""
    options, fields = dict(options), {}
    for key, fld, default in _FIELDS:
        if key in options:
            fields[fld] = (key, options[key])
            options[key] = default
    return options, fields


def _log_snr(alpha: float, sigma: float) -> float:
    """``log_snr``, NaN where the grid has no log-SNR (an infinite or NaN sigma, alphas_cumprod underflowing
    to 0; a flow sigma above 1): the rows there cannot be planned, and are refused when they run."""
    try:
        return log_snr(alpha, sigma)
    except ValueError:
        return math.nan


def _moved_last(arrays: dict) -> dict:
    """``arrays`` with the run's last point (the noise level after the last step) moved to half the one
    before it: every earlier step's rows are unchanged, and the last one has a finite form."""
    if "grid" in arrays:
        g = arrays["grid"]
        s = g.sigmas[-2] / 2
        if g.kind == "flow":
            a, sd = 1.0 - s, s
        else:
            a = 1.0 / math.sqrt(s * s + 1.0)
            sd = s * a
        grid = Grid(g.timesteps, g.sigmas[:-1] + (s,), g.alphas[:-1] + (a,), g.stds[:-1] + (sd,),
                    g.lambdas[:-1] + (_log_snr(a, sd),), g.init_scale, g.kind)
        return {**arrays, "grid": grid}
    d = arrays["disc"]
    sig = np.array(d.sigmas, dtype=np.float64)
    sig[-1] = sig[-2] / 2
    return {**arrays, "disc": Discretization(sigmas=sig, timesteps=d.timesteps, init_sigma=d.init_sigma)}


def _prefix(arrays: dict, k: int) -> dict:
    """``arrays`` of the first ``k`` steps only."""
    if "grid" in arrays:
        g = arrays["grid"]
        grid = Grid(g.timesteps[:k], g.sigmas[:k + 1], g.alphas[:k + 1], g.stds[:k + 1], g.lambdas[:k + 1],
                    g.init_scale, g.kind)
        return {"grid": grid, "steps": k}
    d = arrays["disc"]
    return {"disc": Discretization(sigmas=d.sigmas[:k + 1], timesteps=d.timesteps[:k], init_sigma=d.init_sigma),
            "steps": k}


def _first_repeat(arrays: dict) -> int | None:
    """The first step of zero length (a noise level the grid repeats), if any."""
    sig = arrays["grid"].sigmas if "grid" in arrays else arrays["disc"].sigmas if "disc" in arrays else ()
    return next((i for i in range(len(sig) - 1) if sig[i] == sig[i + 1] and sig[i] != 0), None)


def _repeat_reason(arrays: dict, row: int) -> str:
    """Why row ``row`` has no finite form where the grid repeats a noise level just before it."""
    sig = arrays["grid"].sigmas if "grid" in arrays else arrays["disc"].sigmas if "disc" in arrays else ()
    for i in range(max(row - 2, 0), min(row + 1, len(sig) - 1)):
        if sig[i] == sig[i + 1] and sig[i] != 0:
            return (f"scheduler.sigmas repeats {float(sig[i]):g} at {i} and {i + 1}: a step of length 0, which a "
                    "multistep update divides by")
    return ""


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
        if c:  # (the step's noise, drawn as diffusers draws it)
            xc = xc + c * z.to(cdt)
        d = a * xc + b * mc
    else:
        d = row.a_x * xc + row.a_e * mc
    d = _clipped(d, row, bound, cdt)
    if plan.prediction == "x0":
        return d.to(m_dtype)
    return d.to(torch.promote_types(torch.float32 if upcast32 else x_dtype, m_dtype))


def _clipped(d: torch.Tensor, row: Row, bound, cdt: torch.dtype) -> torch.Tensor:
    """``d`` clipped as ``row`` clips it (per-sample ``bound``; ``dynamic`` also divides by it)."""
    if row.clip is None:
        return d
    s = bound.to(device=d.device, dtype=cdt).reshape((-1,) + (1,) * (d.dim() - 1))
    d = torch.minimum(torch.maximum(d, -s), s)
    return d / s if row.clip == "dynamic" else d


def _second_output(row: Row, plan: Plan, k: int, x: torch.Tensor, m: torch.Tensor, z, bound, x_dtype, m_dtype,
                   upcast32: bool, name: str) -> torch.Tensor:
    """The second output of a step whose sampler records it per row as ``(c_x, c_d, c_e)`` in
    ``plan.meta["second_output"]`` (LCM's ``denoised``, TCD's ``pred_noised_sample``):
    ``c_x x + c_d d + c_e m`` with ``d`` clipped as the row clips it, in the dtype of the sample and
    the model output together (diffusers' estimate)."""
    cdt = torch.float64 if torch.float64 in (x.dtype, m.dtype) else torch.float32
    xc, mc = x.to(cdt), m.to(cdt)
    d = row.a_x * xc + row.a_e * mc
    d = _clipped(d, row, bound, cdt)
    c_x, c_d, c_e = plan.meta["second_output"][k]
    return (c_x * xc + c_d * d + c_e * mc).to(torch.promote_types(x_dtype, m_dtype))


def _output_class(cls: type, name: str | None = None) -> type:
    """The output dataclass diffusers' ``cls.step`` returns (``name``, else ``<Class>Output``, of its
    module, else ``SchedulerOutput``)."""
    import sys

    out = getattr(sys.modules.get(cls.__module__), name or cls.__name__ + "Output", None)
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
    """An ``out_cls`` (diffusers' step output) whose second field (``pred_original_sample``; LCM's
    ``denoised``, TCD's ``pred_noised_sample``) is computed on first access (attribute, key,
    iteration, ``to_tuple``)."""
    lazy = _LAZY_OUTPUTS.get(out_cls)
    if lazy is None:
        fname = next(f.name for f in dataclasses.fields(out_cls) if f.name != "prev_sample")

        def force(self):
            fn = self.__dict__.get("_fd_x0")
            if fn is not None:
                self.__dict__["_fd_x0"] = None
                v = fn()
                self.__dict__["_fd_value"] = v
                OrderedDict.__setitem__(self, fname, v)

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
              fname: property(getter, setter),
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
        _check_config(cls.__name__, spec, self.config, cls)
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
    _check_config(cls.__name__, spec, scheduler.config, cls)
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
    # The grid in place is planned when first stepped (or by set_timesteps), not here: it is often the one
    # the constructor set (Heun, LMS: every training timestep), which pipelines replace with set_timesteps
    # before stepping, and LMS's 1000-step plan alone takes seconds (a quadrature per coefficient). A
    # config that no grid can serve fails at set_timesteps, and a step on this grid raises the same error.
    return fused


