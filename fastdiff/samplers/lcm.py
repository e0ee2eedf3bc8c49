"""Consistency-distilled samplers: LCM, TCD and flow-matching LCM (diffusers' ``LCMScheduler``,
``TCDScheduler``, ``FlowMatchLCMScheduler``).

LCM (Luo et al. 2023) evaluates the consistency function ``f = c_skip x + c_out x0`` at each step
and re-noises it to the next timestep; TCD (Zheng et al. 2024) moves to an intermediate timestep
``s = floor((1 - gamma) t_prev)`` along the DDIM direction and re-noises from there (``gamma``:
diffusers' ``eta``). Both are one linear row per step over ``[x, d, e, z]``. The estimate diffusers
returns beside ``prev_sample`` (LCM's ``denoised``, TCD's ``pred_noised_sample``) is recorded per
row in ``plan.meta["second_output"]`` as ``(c_x, c_d, c_e)``: ``c_x x + c_d d + c_e e``.

Timesteps: the LCM grid (``original_inference_steps`` training-grid points ``k j - 1``, ``k = T //
original_inference_steps``, of which ``steps`` are taken at evenly spaced indices), or a scheduler's
own timesteps where the schedule holds them (``fastdiff.diffusers``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..core.plan import Plan, Row, combo
from ..core.schedules import VPSchedule
from . import build, register
from ._common import check_number, clip_settings, eps_coeffs, vp_point

_CLIP = {"clip_sample": False, "clip_sample_range": 1.0, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
         "sample_max_value": 1.0}
"""LCMScheduler's clipping defaults (no clipping)."""


def lcm_timesteps(schedule: VPSchedule, steps: int, original_inference_steps: int) -> list[int]:
    """The integer timesteps of ``LCMScheduler.set_timesteps(steps)`` (``TCDScheduler``'s too), or the
    schedule's own (a diffusers scheduler's ``timesteps``, as :mod:`fastdiff.diffusers` passes them)."""
    if getattr(schedule, "own_multistep_grid", None) is not None:  # a grid given as arrays
        return [int(t) for t in schedule.timesteps(steps)]
    T = schedule.num_train_timesteps
    orig = original_inference_steps
    if isinstance(orig, bool) or not isinstance(orig, (int, np.integer)) or not 1 <= orig <= T:
        raise ValueError(f"original_inference_steps must be an int in [1, {T}] (num_train_timesteps), got {orig!r}")
    if steps > orig:
        raise ValueError(f"steps={steps} is more than original_inference_steps={orig}: the LCM grid takes steps "
                         "from the original_inference_steps-point distillation grid")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def boundary_scalings(t: float, timestep_scaling: float, sigma_data: float = 0.5) -> tuple[float, float]:
    """LCM's consistency boundary condition ``(c_skip, c_out)`` at timestep ``t`` (Song et al. 2023)."""
    s = t * timestep_scaling
    return sigma_data**2 / (s * s + sigma_data**2), s / math.sqrt(s * s + sigma_data**2)


@register("lcm", kinds=("vp",), options={"original_inference_steps": 50, "timestep_scaling": 10.0, **_CLIP})
def lcm(schedule: VPSchedule, steps: int, prediction: str, *, original_inference_steps: int, timestep_scaling: float,
        clip_sample: bool, clip_sample_range: float, thresholding: bool, dynamic_thresholding_ratio: float,
        sample_max_value: float) -> Plan:
    """Latent consistency model multistep sampling (Luo et al. 2023)."""
    timestep_scaling = check_number("timestep_scaling", timestep_scaling)
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value)
    ts = lcm_timesteps(schedule, steps, original_inference_steps)
    acp = schedule.alphas_cumprod
    rows, second = [], []
    for i, t in enumerate(ts):
        c_skip, c_out = boundary_scalings(t, timestep_scaling)
        last = i == steps - 1
        # x' = sqrt(abar_prev) f + sqrt(1 - abar_prev) z, f = c_skip x + c_out clip(x0); the last step returns f
        a_p = float(acp[ts[i + 1]]) if not last else 1.0
        scale = math.sqrt(a_p)
        out = combo(x=scale * c_skip, d=scale * c_out, z=0.0 if last else math.sqrt(1.0 - a_p))
        rows.append(Row(**vp_point(schedule, prediction, t), out=out, clip=clip, noise=not last, step=i))
        second.append((c_skip, c_out, 0.0))
    return Plan(tuple(rows), init_scale=1.0, sampler="lcm", prediction=prediction, steps=steps,
                meta={"second_output": tuple(second), "timesteps": tuple(ts)}, **plan_kw)


def tcd_intermediate(t_prev: int, eta: float) -> int:
    """TCD's intermediate timestep ``s = floor((1 - eta) t_prev)``, with diffusers' float32 product."""
    import torch

    return int(torch.floor((1 - eta) * torch.tensor(int(t_prev), dtype=torch.int64)).to(torch.int64))


@register("tcd", kinds=("vp",), options={"original_inference_steps": 50, "eta": 0.3})
def tcd(schedule: VPSchedule, steps: int, prediction: str, *, original_inference_steps: int, eta: float) -> Plan:
    """Trajectory consistency distillation sampling, stochasticity ``eta`` (gamma) in [0, 1] (Zheng et al. 2024)."""
    eta = check_number("eta", eta, 0.0, 1.0)
    ts = lcm_timesteps(schedule, steps, original_inference_steps)
    acp = schedule.alphas_cumprod
    rows, second = [], []
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < steps else 0
        s = tcd_intermediate(t_prev, eta)
        a_s, a_p = float(acp[s]), float(acp[t_prev])
        p = vp_point(schedule, prediction, t)
        # pred_noised = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps, eps of the model output (unclipped)
        b_x, b_e = eps_coeffs(prediction, p["alpha_t"], p["sigma_t"])
        n_x, n_d, n_e = math.sqrt(1 - a_s) * b_x, math.sqrt(a_s), math.sqrt(1 - a_s) * b_e
        noise = eta > 0 and i + 1 < steps  # diffusers re-noises from s to t_prev, except at the last step
        k = math.sqrt(a_p / a_s) if noise else 1.0
        z = math.sqrt(max(1.0 - a_p / a_s, 0.0)) if noise else 0.0
        rows.append(Row(**p, out=combo(x=k * n_x, d=k * n_d, e=k * n_e, z=z), noise=noise, step=i))
        second.append((n_x, n_d, n_e))
    return Plan(tuple(rows), init_scale=1.0, sampler="tcd", prediction=prediction, steps=steps,
                meta={"second_output": tuple(second), "timesteps": tuple(ts)})


@register("flow_lcm", kinds=("flow",), predictions=("flow", "x0", "eps"), default_prediction="flow")
def flow_lcm(schedule, steps: int, prediction: str) -> Plan:
    """Consistency sampling on a rectified flow: re-noise the data estimate to the next level (Luo et al. 2023)."""
    # diffusers' FlowMatchLCMScheduler step is flow_euler's stochastic_sampling step, noise drawn at every step
    plan = build("flow_euler", schedule, steps, prediction=prediction, stochastic_sampling=True)
    return dataclasses.replace(plan, sampler="flow_lcm")
