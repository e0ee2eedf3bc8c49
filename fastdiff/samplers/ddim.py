"""DDIM (Song et al. 2021), diffusers' DDIMScheduler."""

from __future__ import annotations

import math

from ..plan import Plan, Row, combo
from ..schedules import VPSchedule
from . import register
from ._common import CLIP_OPTIONS, check_number, clip_settings, vp_point


@register("ddim", kinds=("vp",), options={"eta": 0.0, **CLIP_OPTIONS, "set_alpha_to_one": True,
                                           "use_clipped_model_output": False})
def ddim(schedule: VPSchedule, steps: int, prediction: str, *, eta: float, clip_sample: bool, clip_sample_range: float,
         thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float, set_alpha_to_one: bool,
         use_clipped_model_output: bool) -> Plan:
    """Denoising diffusion implicit models, any eta (Song, Meng & Ermon 2021)."""
    eta = check_number("eta", eta, 0.0)
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value)
    if clip and not use_clipped_model_output:
        # diffusers then mixes the clipped x0 with the *unclipped* eps; a row only sees the clipped d
        raise ValueError(
            "ddim with clip_sample/thresholding needs use_clipped_model_output=True (eps re-derived from the "
            "clipped x0, diffusers' step(use_clipped_model_output=True)); diffusers' default mixes the clipped x0 "
            "with the unclipped eps, which the plan contract cannot express. Or pass clip_sample=False.")
    acp = schedule.alphas_cumprod
    final = 1.0 if set_alpha_to_one else float(acp[0])
    ts = schedule.timesteps(steps, "leading")
    jump = schedule.num_train_timesteps // steps
    rows = []
    for i, t in enumerate(int(v) for v in ts):
        prev = t - jump
        a_t, a_p = float(acp[t]), float(acp[prev]) if prev >= 0 else final
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        std = eta * math.sqrt(var)
        if 1 - a_p - std * std < 0:
            raise ValueError(f"eta={eta} is too large at step {i}: 1 - abar_prev - std^2 < 0")
        c_dir = math.sqrt(1 - a_p - std * std) / math.sqrt(1 - a_t)
        # x' = sqrt(a_p) x0 + c_dir * eps + std z, eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
        out = combo(x=c_dir, d=math.sqrt(a_p) - c_dir * math.sqrt(a_t), z=std)
        rows.append(Row(**vp_point(schedule, prediction, t), out=out, clip=clip, noise=eta > 0, step=i))
    return Plan(tuple(rows), init_scale=1.0, sampler="ddim", prediction=prediction, steps=steps, **plan_kw)
