"""Image tasks on top of the plan: inpainting (known region re-noised every step), and friends.

The known region enters the fused step's mask blend ``x' = mask*x' + (1-mask)*(known_a*known +
known_s*z2)``: after row ``i`` the state is at the noise level of row ``i+1``, whose model input is
``u = alpha_t x0 + sigma_t eps = in_scale * x``, so the known image is re-noised to
``known_a = alpha_t / in_scale`` and ``known_s = sigma_t / in_scale`` of that row (clean after the
last row). The re-noising noise ``z2`` is Philox stream 1 (or drawn like the solver noise).
"""

from __future__ import annotations

import dataclasses

from .plan import Plan

MASK_UNSUPPORTED = frozenset({"unipc"})
"""Samplers whose next state is rebuilt from the history ring (UniPC's corrector), so blending
``x'`` alone would be overwritten: a mask is refused for them."""


def with_known_region(plan: Plan) -> Plan:
    """``plan`` with every row's ``known_a``/``known_s`` set for inpainting (see the module doc)."""
    if plan.sampler in MASK_UNSUPPORTED:
        raise ValueError(f"sampler {plan.sampler!r} rebuilds its state from history, so a mask cannot be "
                         "blended into it; use e.g. dpmpp_2m, euler, ddim or ddpm for inpainting")
    rows = list(plan.rows)
    out = []
    for i, r in enumerate(rows):
        if i + 1 < len(rows):
            nxt = rows[i + 1]
            if nxt.alpha_t is None or nxt.sigma_t is None:
                raise ValueError(f"sampler {plan.sampler!r} does not give alpha_t/sigma_t on its rows; "
                                 "inpainting needs them")
            ka, ks = nxt.alpha_t / nxt.in_scale, nxt.sigma_t / nxt.in_scale
        else:
            ka, ks = 1.0 / plan.out_scale, 0.0
        out.append(dataclasses.replace(r, known_a=ka, known_s=ks, noise=r.noise))
    return dataclasses.replace(plan, rows=tuple(out))
