"""The ``guidance`` part of ``fastdiff bench``: each diffusers guider's step, stock vs fused.

Stock: the guider's ``forward`` (its chain of eager ops: norms, projections, SVDs, momentum) and
an eager Euler update ``x + dt * pred`` — what a stock loop runs per step after the model. Fused:
the guider's blend coefficients (one Gram pass where the guider needs data, then a few ``[B]``
operations) and ONE fused step that blends the branches, updates the momentum buffer and takes the
Euler step (:mod:`fastdiff.guiders`). Interleaved (ABAB) in one run; medians and best samples.
Frequency-decoupled guidance (where kornia, which diffusers' guider needs, is installed): its
Laplacian pyramid below full resolution is built outside the step (and counted in the fused time).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence

import torch

GUIDERS = ("CFG", "CFG+rescale", "CFG-Zero*", "APG+momentum", "Tangential", "MagnitudeAware", "SLG", "FDG")
"""The guider configurations timed (diffusers classes with the settings :func:`_stock_guiders` gives)."""


def _stock_guiders() -> dict:
    import diffusers.guiders as dg

    out = {
        "CFG": dg.ClassifierFreeGuidance(guidance_scale=7.5),
        "CFG+rescale": dg.ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=0.7),
        "CFG-Zero*": dg.ClassifierFreeZeroStarGuidance(guidance_scale=7.5, zero_init_steps=0),
        "APG+momentum": dg.AdaptiveProjectedGuidance(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5),
        "Tangential": dg.TangentialClassifierFreeGuidance(guidance_scale=7.5),
        "MagnitudeAware": dg.MagnitudeAwareGuidance(guidance_scale=7.5),
        "SLG": dg.SkipLayerGuidance(guidance_scale=7.5, skip_layer_guidance_layers=[0], skip_layer_guidance_start=0.0,
                                    skip_layer_guidance_stop=1.0),
    }
    try:
        out["FDG"] = dg.FrequencyDecoupledGuidance(guidance_scales=[10.0, 5.0])
    except ImportError:  # diffusers builds its pyramid with kornia
        pass
    return out


def bench_guiders(shape: Sequence[int], repeats: int = 15, backend: str = "auto", names: Sequence[str] = GUIDERS,
                  progress: bool = False) -> list[dict]:
    """One row per guider: ``guider``, ``shape``, ``dtype``, ``backend``, ``stock_us``, ``fused_us``
    (medians), ``stock_us_best``, ``fused_us_best``, ``speedup`` (median over median) and
    ``speedup_best``. fp32; the state is ``shape``; magnitude-aware guidance (whose stock norm takes
    at most two dimensions) runs on the same elements as ``[B, N, C]``."""
    from ..core.args import N_COEF
    from ..core.plan import OP_E, OP_X
    from ..runtime import ops

    shape = tuple(int(s) for s in shape)
    coef = [0.0] * N_COEF
    coef[1] = 1.0
    coef[2 + OP_X], coef[2 + OP_E] = 1.0, -0.05  # x' = x + dt * pred: an Euler step in the prediction's units
    coef = tuple(coef)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock_all = _stock_guiders()
    rows = []
    it = [n for n in names if n in stock_all]
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="guidance", leave=False)
    cases = []
    for name in it:
        cases.append(_case(name, stock_all[name], shape, coef, backend))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # every case warmed before any is timed: the allocator's first large blocks (page faults, glibc's
        # mmap threshold still growing) would otherwise land on whichever case is timed first
        for _, _, stock, fused in cases:
            for _ in range(5):
                stock()
                fused()
        for name, c, stock, fused in cases:
            ts, tf = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                stock()
                t1 = time.perf_counter()
                fused()
                t2 = time.perf_counter()
                ts.append((t1 - t0) * 1e6)
                tf.append((t2 - t1) * 1e6)
            ms, mf = statistics.median(ts), statistics.median(tf)
            rows.append({"guider": name, "shape": list(c.shape), "dtype": "fp32",
                         "backend": ops.backend_for(backend, c), "stock_us": ms, "fused_us": mf,
                         "stock_us_best": min(ts), "fused_us_best": min(tf), "speedup": ms / mf,
                         "speedup_best": min(ts) / min(tf)})
    return rows


def _case(name: str, gd, shape: tuple, coef: tuple, backend: str):
    """``(name, cond, stock, fused)``: the two step functions of one guider on fresh random branches."""
    from ..core.args import StepArgs
    from ..guiders import coefficients, from_diffusers
    from ..runtime import ops

    sh = (shape[0], shape[1] * (shape[2] if len(shape) > 2 else 1), -1) if name == "MagnitudeAware" else shape
    g = torch.Generator().manual_seed(0)
    c = torch.randn(shape, generator=g).reshape(sh)
    u, p, x = (c + 0.3 * torch.randn(c.shape, generator=g) for _ in range(3))
    gd.set_state(5, 10, None)
    if getattr(gd, "adaptive_projected_guidance_momentum", None) is not None:
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

        gd.momentum_buffer = MomentumBuffer(gd.adaptive_projected_guidance_momentum)
    ours = from_diffusers(gd)
    sb = ours.blend(5, 10)
    mom, out = torch.zeros_like(c), torch.empty_like(c)
    three = name == "SLG"
    named = {"uncond": u, "cond": c, "perturbed": p, "momentum": mom, "fdg": None}
    slots = [None if s is None else named[s] for s in sb.slots]

    def stock():
        pred = gd.forward(c, u, p).pred if three else gd.forward(c, u).pred
        return x + -0.05 * pred

    def fused():
        if sb.derive is not None:  # frequency-decoupled guidance's pyramid correction, part of the step's cost
            slots[2] = sb.derive(named)
        a = coefficients(sb, slots, ours.rescale, extension=backend != "reference")
        ops.step(StepArgs(x=x, out=out, m=slots[0], m_c=slots[1], m_2=slots[2], m_3=slots[3], a=a,
                          m_w=mom if sb.write is not None else None, coef=coef), backend=backend, check=False)

    return name, c, stock, fused
