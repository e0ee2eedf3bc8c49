"""DDIM (Song et al. 2021), diffusers' DDIMScheduler.

diffusers' step is ``x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z``. With
``clip_sample``/``thresholding`` the ``x0`` there is CLIPPED while ``eps`` is the noise estimate of
the UNCLIPPED ``x0`` (its default ``use_clipped_model_output=False``): the row then reads the
clipped ``d`` and gets ``eps`` as a linear combination of ``x`` and the model output ``e``
(:func:`~fastdiff.samplers._common.eps_coeffs`). With ``use_clipped_model_output=True``, or without
clipping (where both are the same), ``eps = (x - sqrt(abar) d) / sqrt(1 - abar)`` comes from ``d``.
"""

from __future__ import annotations

import math

from ..core.plan import Plan, Row, combo
from ..core.schedules import VPSchedule
from . import register
from ._common import CLIP_OPTIONS, check_number, clip_settings, eps_coeffs, vp_point


@register("ddim", kinds=("vp",), options={"eta": 0.0, **CLIP_OPTIONS, "set_alpha_to_one": True,
                                           "use_clipped_model_output": False})
def ddim(schedule: VPSchedule, steps: int, prediction: str, *, eta: float, clip_sample: bool, clip_sample_range: float,
         thresholding: bool, dynamic_thresholding_ratio: float, sample_max_value: float, set_alpha_to_one: bool,
         use_clipped_model_output: bool) -> Plan:
    """Denoising diffusion implicit models, any eta (Song, Meng & Ermon 2021)."""
    eta = check_number("eta", eta, 0.0)
    clip, plan_kw = clip_settings(clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio,
                                  sample_max_value)
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
        # 1 - abar_prev - std^2, factored: exactly >= 0 for eta <= 1 (zero terminal SNR's abar = 0 with
        # eta = 1 makes it 0, where the unfactored difference may round below 0)
        rest = (1 - a_p) * ((1 - a_t) - eta * eta * (1 - a_t / a_p)) / (1 - a_t)
        if rest < 0:
            raise ValueError(f"eta={eta} is too large at step {i}: 1 - abar_prev - std^2 < 0")
        p = vp_point(schedule, prediction, t)
        c_eps = math.sqrt(rest)
        if clip and not use_clipped_model_output:
            # x' = sqrt(a_p) clip(x0) + c_eps * eps(unclipped x0) + std z, eps = b_x x + b_e e
            b_x, b_e = eps_coeffs(prediction, p["alpha_t"], p["sigma_t"])
            out = combo(x=c_eps * b_x, d=math.sqrt(a_p), e=c_eps * b_e, z=std)
        else:
            # x' = sqrt(a_p) x0 + c_eps * eps + std z, eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
            c_dir = c_eps / math.sqrt(1 - a_t)
            out = combo(x=c_dir, d=math.sqrt(a_p) - c_dir * math.sqrt(a_t), z=std)
        rows.append(Row(**p, out=out, clip=clip, noise=eta > 0, step=i))
    return Plan(tuple(rows), init_scale=1.0, sampler="ddim", prediction=prediction, steps=steps, **plan_kw)
