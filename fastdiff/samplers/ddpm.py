"""DDPM ancestral sampling (Ho et al. 2020), diffusers' DDPMScheduler."""

from __future__ import annotations

import math

from ..core.plan import Plan, Row, combo
from ..core.schedules import VPSchedule
from . import register
from ._common import CLIP_OPTIONS, check_choice, clip_settings, vp_point

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")


@register("ddpm", kinds=("vp",), options={"variance_type": "fixed_small", **CLIP_OPTIONS})
def ddpm(schedule: VPSchedule, steps: int, prediction: str, *, variance_type: str, clip_sample: bool, clip_sample_range: float,
         thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float) -> Plan:
    """Ancestral sampling of the DDPM posterior q(x_prev | x_t, x0) (Ho, Jain & Abbeel 2020)."""
    check_choice("variance_type", variance_type, VARIANCE_TYPES)  # learned variances need the model's output
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value)
    acp = schedule.alphas_cumprod
    ts = [int(v) for v in schedule.timesteps(steps, "leading")]
    rows = []
    for i, t in enumerate(ts):
        prev = ts[i + 1] if i + 1 < steps else -1
        a_t, a_p = float(acp[t]), float(acp[prev]) if prev >= 0 else 1.0
        beta = 1 - a_t / a_p
        c_d = math.sqrt(a_p) * beta / (1 - a_t)
        c_x = math.sqrt(1 - beta) * (1 - a_p) / (1 - a_t)
        if variance_type == "fixed_large":
            std = math.sqrt(beta)
        else:
            std = math.sqrt(max((1 - a_p) / (1 - a_t) * beta, 1e-20))
        noise = t > 0  # diffusers draws noise unless t == 0
        out = combo(x=c_x, d=c_d, z=std if noise else 0.0)
        rows.append(Row(**vp_point(schedule, prediction, t), out=out, clip=clip, noise=noise, step=i))
    return Plan(tuple(rows), init_scale=1.0, sampler="ddpm", prediction=prediction, steps=steps, **plan_kw)
