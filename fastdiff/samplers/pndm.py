"""Pseudo numerical methods (Liu et al. 2022): diffusers' ``PNDMScheduler`` and ``IPNDMScheduler``.

**PNDM** (``pndm``). Every model call moves the sample with the "transfer" of formula (9),
``x' = sqrt(a'/a) S - (a' - a) E / (a sqrt(1 - a') + sqrt(a (1 - a) a'))`` (``a``, ``a'`` the
``alphas_cumprod`` of the two timesteps, ``S`` a sample, ``E`` a noise estimate), where ``E`` is a
linear combination of raw model outputs: the linear multistep (PLMS, Adams–Bashforth 2-4) of the
last outputs, after a warm-up of either

- ``skip_prk_steps=True`` (Stable Diffusion 1.x, the default here): one Euler transfer and one
  Heun-like step that evaluates the model again at the same timestep and averages the two outputs
  (so ``steps`` solver steps take ``steps + 1`` model calls), or
- ``skip_prk_steps=False`` (the paper's F-PNDM, diffusers' class default): three Runge–Kutta
  (RK4) steps of four model calls each (``steps >= 4``).

With ``prediction="v"`` diffusers converts the COMBINED output, ``E = sqrt(a) V + sqrt(1 - a) S``,
at the transfer's source; that is linear too, so history holds raw model outputs. Everything is
diffusers' arithmetic, including where it is off: ``prev_timestep = t - T // steps`` whatever the
spacing, and the Heun call's source ``t + T // steps``.

**iPNDM** (``ipndm``; Zhang & Chen 2022): Adams–Bashforth 1-4 on the noise estimate with the same
transfer, ``x' = a' (x - s E) / max(a, 1e-8) + s' E`` for a state ``x = a x0 + s eps`` (k-diffusion
style: ``x' = x + (s' - s) E`` in sigma space). Natively on the schedule's Euler grid; the drop-in
runs diffusers' own cosine grid (``alpha = 0`` at its first point) with a v-prediction model.

The plan rows are built by :func:`pndm_rows` / :func:`ipndm_rows` from the sequence of model calls,
so that ``fastdiff.diffusers`` runs the same rows from a ``PNDMScheduler`` / ``IPNDMScheduler``'s own
arrays (a PNDM run that starts later, img2img, is the sequence of timesteps it is given, as diffusers
counts its calls from there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..core.plan import Plan, Row, Write, combo
from ..core.schedules import spaced_timesteps
from . import Restart, register
from ._common import data_coeffs, eps_coeffs, grid_point, vp_point

_AB = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
"""Adams–Bashforth weights, newest output first (diffusers' PNDM/iPNDM ``ets`` combinations)."""


def _vec(vec: dict, reads: Sequence[int]) -> tuple[float, ...]:
    """Coefficients over ``[x, d, e, H[reads...], z]`` of ``{"x": c, "e": c, slot: c}``."""
    return combo(x=vec.get("x", 0.0), e=vec.get("e", 0.0), h=tuple(vec.get(s, 0.0) for s in reads))


def _pndm_row(point: dict, vec: dict, writes: list[tuple[int, dict]], step: int, stage: int) -> Row:
    reads = tuple(sorted({k for k in vec if isinstance(k, int)} | {k for _, w in writes for k in w
                                                                   if isinstance(k, int)}))
    return Row(**point, out=_vec(vec, reads), reads=reads,
               writes=tuple(Write(s, _vec(w, reads)) for s, w in writes), step=step, stage=stage)


def pndm_rows(schedule, prediction: str, seq: Sequence[int], num_inference_steps: int, prk: Sequence[int] = (),
              skip_prk_steps: bool = True, set_alpha_to_one: bool = False, name: str = "pndm") -> Plan:
    """The plan of diffusers' ``PNDMScheduler.step`` called at the timesteps ``seq`` (its counter from 0).

    Args:
        schedule: a VP schedule (``alphas_cumprod``, ``num_train_timesteps``).
        prediction: ``eps`` or ``v``.
        seq: the timestep of each model call, in order (diffusers' ``scheduler.timesteps`` or the part
            of it a run is given).
        num_inference_steps: diffusers' ``num_inference_steps`` (the jump is ``T // num_inference_steps``).
        prk: diffusers' ``prk_timesteps`` (with ``skip_prk_steps=False``: call ``c < len(prk)`` is a
            Runge–Kutta stage whose source is ``prk[c // 4 * 4]``).
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"pndm takes prediction 'eps' or 'v' (diffusers' PNDMScheduler), got {prediction!r}")
    acp = schedule.alphas_cumprod
    T = int(schedule.num_train_timesteps)
    final = 1.0 if set_alpha_to_one else float(acp[0])
    r = T // int(num_inference_steps)
    r2 = r // 2
    prk = [int(v) for v in prk] if not skip_prk_steps else []
    # a schedule's scalar_dtype float32 (fastdiff.diffusers): diffusers' float32 coefficient arithmetic
    f32 = getattr(schedule, "scalar_dtype", None) == torch.float32

    def abar(t: int) -> float:
        if t < 0:
            return final
        if t >= len(acp):
            raise ValueError(f"pndm: timestep {t} has no alphas_cumprod entry ({len(acp)} training steps); diffusers' "
                             "step fails there")
        return float(acp[t])

    def scalars(a: float, a1: float) -> tuple[float, float, float, float]:
        """``(c_s, c_e, sqrt(a), sqrt(1 - a))`` of formula (9): ``x' = c_s S + c_e E``."""
        if f32:  # diffusers' float32 arithmetic: at t = T - 1 of a cosine schedule (abar ~ 1e-9) c_s ~ 1e4
            a, a1 = torch.tensor(a, dtype=torch.float32), torch.tensor(a1, dtype=torch.float32)
            b, b1 = 1 - a, 1 - a1
            # (0-dim float32 scalars; diffusers divides the tensor (a' - a) E by the denominator)
            c_e = -float(a1 - a) / float(a * b1**0.5 + (a * b * a1) ** 0.5)
            return float((a1 / a) ** 0.5), c_e, float(a**0.5), float(b**0.5)
        c_e = -(a1 - a) / (a * math.sqrt(1.0 - a1) + math.sqrt(a * (1.0 - a) * a1))
        return math.sqrt(a1 / a), c_e, math.sqrt(a), math.sqrt(1.0 - a)

    def transfer(src: int, dst: int, sample, terms: dict) -> dict:
        """Formula (9) from ``src`` to ``dst`` of ``sample`` (``"x"`` or a slot) with the combined raw
        output ``terms`` (``{"e": w, slot: w}``), as ``{operand: coef}``."""
        a, a1 = abar(src), abar(dst)
        if a == 0.0:
            raise ValueError(f"pndm: the transfer from timestep {src} divides by its alpha, which is 0 there (where "
                             "alpha = 0: zero terminal SNR); diffusers' step gives inf/NaN")
        c_s, c_e, sqrt_a, sqrt_b = scalars(a, a1)
        out = {sample: c_s}
        scale = sqrt_a if prediction == "v" else 1.0  # v: E = sqrt(a) V + sqrt(1 - a) S
        for k, w in terms.items():
            out[k] = out.get(k, 0.0) + c_e * scale * w
        if prediction == "v":
            out[sample] += c_e * sqrt_b
        return out

    X, ACC = (1, None) if skip_prk_steps else (3, 4)  # slots of diffusers' cur_sample and cur_model_output
    rows, ets, n_app = [], [], 0  # ets: slots of diffusers' self.ets (raw outputs), oldest first
    n = len(seq)
    for c, t in enumerate(int(v) for v in seq):
        point = vp_point(schedule, prediction, t)
        last = c == n - 1
        writes = []
        if c < len(prk):  # step_prk: RK4 stages from the step's source prk[c // 4 * 4]
            src, phase = prk[c // 4 * 4], c % 4
            dst = t - (0 if c % 2 else r2)
            step, stage = c // 4, phase
            if phase == 0:
                slot = n_app % 3
                ets, n_app = ets + [slot], n_app + 1
                vec = transfer(src, dst, "x", {"e": 1.0})
                writes = [(X, {"x": 1.0}), (slot, {"e": 1.0})]
            elif phase == 1:
                vec = transfer(src, dst, X, {"e": 1.0})
                writes = [(ACC, {"e": 1.0})]
            elif phase == 2:
                vec = transfer(src, dst, X, {"e": 1.0})
                writes = [(ACC, {ACC: 1.0, "e": 1.0})]
            else:  # (e_0 + 2 e_1 + 2 e_2 + e_3) / 6
                vec = transfer(src, dst, X, {ets[-1]: 1 / 6, ACC: 1 / 3, "e": 1 / 6})
        else:  # step_plms
            dst, src = t - r, t
            if c != 1:
                ets = ets[-3:]
                slot = n_app % 3  # the oldest of the three kept: read by this row, free after it
                ets, n_app = ets + [slot], n_app + 1
                writes = [(slot, {"e": 1.0})]
            else:
                dst, src = t, t + r
            k = len(ets)
            if k == 1 and c == 0:
                vec = transfer(src, dst, "x", {"e": 1.0})
                writes.append((X, {"x": 1.0}))
            elif k == 1 and c == 1:
                vec = transfer(src, dst, X, {"e": 0.5, ets[-1]: 0.5})
            else:
                w = _AB[min(k, 4)]
                vec = transfer(src, dst, "x", {"e": w[0], **{ets[-1 - j]: w[j] for j in range(1, len(w))}})
            p = len(prk) // 4
            if skip_prk_steps:
                step, stage = max(c - 1, 0), 1 if c == 1 else 0
            else:
                step, stage = p + c - len(prk), 0
        if last:
            writes = []
        rows.append(_pndm_row(point, vec, writes, step, stage))
    n_slots = 1 + max((s for row in rows for s in (*row.reads, *(w.slot for w in row.writes))), default=-1)
    return Plan(tuple(rows), init_scale=1.0, n_slots=n_slots, sampler=name, prediction=prediction,
                steps=rows[-1].step + 1 if rows else 0,
                meta={"skip_prk_steps": bool(skip_prk_steps), "timesteps": tuple(int(v) for v in seq)})


def pndm_timesteps(base_desc: Sequence[int], num_train_timesteps: int, num_inference_steps: int,
                   skip_prk_steps: bool) -> tuple[list[int], list[int]]:
    """``(timesteps, prk_timesteps)`` of diffusers' ``PNDMScheduler.set_timesteps`` from its base grid
    (descending, ``num_inference_steps`` spaced timesteps)."""
    ts = np.asarray(base_desc, dtype=np.int64)[::-1]  # diffusers' _timesteps: ascending
    if skip_prk_steps:
        plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        return [int(v) for v in plms], []
    if len(ts) < 4:
        raise ValueError(f"pndm with skip_prk_steps=False needs at least 4 steps (its Runge-Kutta warm-up takes the "
                         f"4 highest timesteps; diffusers' set_timesteps fails with fewer), got {len(ts)}")
    prk = ts[-4:].repeat(2) + np.tile(np.array([0, num_train_timesteps // num_inference_steps // 2]), 4)
    prk = prk[:-1].repeat(2)[1:-1][::-1]
    plms = ts[:-3][::-1]
    return [int(v) for v in np.concatenate([prk, plms])], [int(v) for v in prk]


def _restart(options, start: int, steps: int) -> Restart:
    """A run from step ``start``: a fresh warm-up on the rest of the grid (``begin_index``)."""
    return Restart(options={"begin_index": int(options.get("begin_index") or 0) + start})


@register("pndm", kinds=("vp",), predictions=("eps", "v"), restart=_restart,
          options={"skip_prk_steps": True, "set_alpha_to_one": False, "begin_index": 0})
def pndm(schedule, steps: int, prediction: str, *, skip_prk_steps: bool, set_alpha_to_one: bool,
         begin_index: int) -> Plan:
    """Pseudo linear multistep (PLMS / F-PNDM) on diffusers' PNDM grid (Liu et al. 2022).

    ``begin_index``: the run is steps ``begin_index..`` of a ``steps + begin_index``-step grid, with a
    fresh warm-up there (``fastdiff.sample(start_step=...)``).
    """
    if isinstance(begin_index, bool) or not isinstance(begin_index, (int, np.integer)) or begin_index < 0:
        raise ValueError(f"begin_index must be an int >= 0, got {begin_index!r}")
    n = steps + int(begin_index)
    T = schedule.num_train_timesteps
    if n > T:
        raise ValueError(f"steps={n} is larger than num_train_timesteps={T}")
    base = spaced_timesteps(T, n, schedule.spacing or "leading", schedule.steps_offset)[int(begin_index):]
    seq, prk = pndm_timesteps(base, T, n, bool(skip_prk_steps))
    return pndm_rows(schedule, prediction, seq, n, prk, bool(skip_prk_steps), bool(set_alpha_to_one))


def ipndm_rows(points: Sequence[dict], states: Sequence[tuple[float, float]], prediction: str, init_scale: float,
               name: str = "ipndm") -> Plan:
    """Rows of iPNDM: model evaluations ``points`` (row fields: ``t``, ``sigma``, ``in_scale``, ``a_x``,
    ``a_e``, ``alpha_t``, ``sigma_t``) on states ``x = a x0 + s eps`` with ``states[i] = (a, s)``
    (``len(points) + 1`` of them: the last is where the run ends)."""
    n = len(points)
    ring = min(3, n - 1)  # eps_{i-1..i-3} in slots (i - k) % ring
    rows = []
    for i, p in enumerate(points):
        (a, s), (a1, s1) = states[i], states[i + 1]
        big_a = max(a, 1e-8)  # diffusers' max(alpha, 1e-8): its first point has alpha = 0
        b_x, b_e = eps_coeffs(prediction, p["alpha_t"], p["sigma_t"], p["in_scale"])
        w = _AB[min(i + 1, 4)]
        g = s1 - a1 * s / big_a  # x' = (a'/A) x + g E,  E = w0 (b_x x + b_e e) + sum_k w_k eps_{i-k}
        # (a'/A)(1 - s w0 b_x) + s' w0 b_x: exact where s w0 b_x = 1 (alpha = 0, sigma = 1: x' = s' x)
        cx = a1 / big_a * (1.0 - s * w[0] * b_x) + s1 * w[0] * b_x
        reads = tuple((i - k) % ring for k in range(1, len(w)))
        writes = (Write(i % ring, combo(x=b_x, e=b_e)),) if ring and i + 1 < n else ()
        rows.append(Row(**p, out=combo(x=cx, e=g * w[0] * b_e, h=tuple(g * wk for wk in w[1:])), reads=reads,
                        writes=writes, step=i))
    return Plan(tuple(rows), init_scale=float(init_scale), n_slots=ring, sampler=name, prediction=prediction, steps=n)


@register("ipndm", kinds=("vp", "ve", "flow"), predictions=("eps", "v", "x0", "flow"),
          restart=lambda options, start, steps: Restart())
def ipndm(schedule, steps: int, prediction: str) -> Plan:
    """Improved PNDM: Adams–Bashforth 1-4 warm-up on the noise estimate (Zhang & Chen 2022, iPNDM)."""
    disc = schedule.discretize(steps)
    sig = [float(v) for v in disc.sigmas]
    points = [grid_point(schedule, prediction, sig[i], disc.timesteps[i]) for i in range(steps)]
    states = []
    for v in sig:
        inn, alpha, sigma = schedule.state(v)
        states.append((alpha / inn, sigma / inn))
    return ipndm_rows(points, states, prediction, disc.init_sigma)


def ipndm_point(t: float, alpha: float, sigma: float, prediction: str = "v") -> dict:
    """Row fields of a model evaluation on the state itself (``in_scale = 1``) at ``x = alpha x0 +
    sigma eps`` (diffusers' IPNDM: ``alpha = 0`` at its first point, where ``Row.sigma`` is
    ``sigma / 1e-8``, diffusers' ``max(alpha, 1e-8)``)."""
    a_x, a_e = data_coeffs("vp", prediction, alpha, sigma, 1.0, where=f"t={t:g}")
    return dict(t=float(t), sigma=sigma / max(alpha, 1e-8), in_scale=1.0, a_x=a_x, a_e=a_e, alpha_t=float(alpha),
                sigma_t=float(sigma))
