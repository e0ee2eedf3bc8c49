"""The stock call and the accelerated call of one pipeline, side by side (the accelerate tests' harness)."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastdiff
import fastdiff.diffusers as fdd
from tests.samplers._harness import count_fused_steps


def stock_and_accelerated(pipe, field: str = "images", seed: int = 3, generators: int = 0,
                          callback: Callable[[bool], Callable] | None = None, **kw):
    """``(stock, accelerated, fused_steps)``: ``pipe(**kw)`` as it is and under
    :func:`fastdiff.diffusers.accelerate` (restored after), each with a generator seeded ``seed`` (a list
    of ``generators`` seeded ``seed + j`` when ``generators`` > 0), the ``field`` of each output, and the
    fused steps counted over both calls (kept runs and executors dropped first). ``callback(accelerated)``
    makes the ``callback_on_step_end`` of each call."""
    outs = []
    fastdiff.clear_cache()
    with count_fused_steps() as counted:
        for accelerated in (False, True):
            if accelerated:
                fdd.accelerate(pipe)
            try:
                gen = ([torch.Generator().manual_seed(seed + j) for j in range(generators)] if generators
                       else torch.Generator().manual_seed(seed))
                extra = {"callback_on_step_end": callback(accelerated)} if callback is not None else {}
                outs.append(getattr(pipe(**kw, **extra, generator=gen), field))
            finally:
                if accelerated:
                    fdd.restore(pipe)
    return outs[0], outs[1], counted.n


def recording_callback(seen: dict, interrupt_at: int | None = None, change: Callable | None = None):
    """``make(accelerated)``: a ``callback_on_step_end`` recording ``(i, t, latents)`` in
    ``seen[accelerated]``, setting ``pipe._interrupt`` after step ``interrupt_at`` and returning
    ``change(latents)`` as the new latents (the latents unchanged without ``change``)."""
    def make(accelerated: bool):
        seen[accelerated] = []

        def cb(p, i, t, k):
            seen[accelerated].append((i, float(t), k["latents"].clone()))
            if interrupt_at is not None and i == interrupt_at:
                p._interrupt = True
            return {"latents": change(k["latents"]) if change is not None else k["latents"]}
        return cb
    return make
