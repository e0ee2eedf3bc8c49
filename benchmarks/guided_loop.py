"""Whole guided sampling loops, fastdiff against the stock diffusers loop, host time included.

    python benchmarks/guided_loop.py [B C H W] [steps] [repeats] [threads]

Per guider: ``fastdiff.sample(..., sampler="dpmpp_2m", guidance=guider)`` (the guided loop's prepared
rows) against the stock loop a diffusers pipeline runs with the same guider
(``DPMSolverMultistepScheduler``: ``scale_model_input``, one batched model call ``[uncond; cond]``,
the guider's ``set_state`` and ``forward``, ``scheduler.step``), with a zero-cost model (it returns a
tensor made once), so that what is timed is everything but the model. Whole loops, interleaved
ABAB in one run; median and best microseconds per step. For plain CFG the ``guidance_scale`` path
(the classic executor) is timed too.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings

import torch

import fastdiff


def _stock_loop(sched, guider, model, noise, cond, uncond, steps):
    sched.set_timesteps(steps)
    x = noise * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        guider.set_state(i, steps, t)
        if i == 0 and hasattr(guider, "momentum_buffer"):
            from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

            m = guider.adaptive_projected_guidance_momentum
            guider.momentum_buffer = MomentumBuffer(m) if m is not None else None
        u = sched.scale_model_input(x, t)
        out = model(torch.cat([u, u]), t.expand(2 * x.shape[0]), torch.cat([uncond, cond]))
        un, c = out.chunk(2)
        pred = guider.forward(c, un).pred
        x = sched.step(pred, t, x).prev_sample
    return x


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    shape = tuple(args[:4]) if len(args) >= 4 else (1, 4, 64, 64)
    steps = args[4] if len(args) >= 5 else 20
    reps = args[5] if len(args) >= 6 else 15
    threads = args[6] if len(args) >= 7 else 1
    torch.set_num_threads(threads)
    from fastdiff.backends import cpu

    if cpu._C is not None:
        cpu._C.set_num_threads(threads)
    import diffusers
    import diffusers.guiders as dg

    outs = {k: torch.randn(k * shape[0], *shape[1:]) for k in (1, 2)}

    def model(x, t, cond):  # zero cost: a tensor made once
        return outs[x.shape[0] // shape[0]]

    noise, cond, uncond = torch.randn(shape), torch.randn(shape), torch.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guiders = {
            "CFG": dg.ClassifierFreeGuidance(guidance_scale=7.5),
            "CFG-Zero*": dg.ClassifierFreeZeroStarGuidance(guidance_scale=7.5),
            "APG+momentum": dg.AdaptiveProjectedGuidance(guidance_scale=7.5,
                                                        adaptive_projected_guidance_momentum=-0.5),
            "Tangential": dg.TangentialClassifierFreeGuidance(guidance_scale=7.5),
            "CFG+rescale": dg.ClassifierFreeGuidance(guidance_scale=7.5, guidance_rescale=0.7),
        }
    print(f"shape {shape}, {steps} steps, fp32, {threads} thread(s), median (best) us per step over {reps} "
          "interleaved loops")
    print(f"{'guider':14s} {'stock':>14s} {'fastdiff':>14s} {'x faster':>9s}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, gd in guiders.items():
            sched = diffusers.DPMSolverMultistepScheduler()

            def stock():
                _stock_loop(sched, gd, model, noise, cond, uncond, steps)

            def fused():
                fastdiff.sample(model, noise, sampler="dpmpp_2m", steps=steps, schedule=sched.config, guidance=gd,
                                cond=cond, uncond=uncond, seed=0)

            fns = [stock, fused]
            if name == "CFG":
                def classic():
                    fastdiff.sample(model, noise, sampler="dpmpp_2m", steps=steps, schedule=sched.config,
                                    guidance_scale=7.5, cond=cond, uncond=uncond, seed=0)

                fns.append(classic)
            times = [[] for _ in fns]
            for _ in range(3):
                for f in fns:
                    f()
            for _ in range(reps):
                for k, f in enumerate(fns):
                    t0 = time.perf_counter()
                    f()
                    times[k].append((time.perf_counter() - t0) / steps * 1e6)
            med = [statistics.median(t) for t in times]
            best = [min(t) for t in times]
            print(f"{name:14s} {med[0]:7.0f} ({best[0]:4.0f}) {med[1]:7.0f} ({best[1]:4.0f}) {med[0] / med[1]:9.1f}")
            if len(fns) == 3:
                print(f"{'  guidance_scale':14s} {'':14s} {med[2]:7.0f} ({best[2]:4.0f}) {med[0] / med[2]:9.1f}")


if __name__ == "__main__":
    main()
