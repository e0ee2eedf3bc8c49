"""Cases found by running diffusers' OWN scheduler test suite against the drop-ins
(``scripts/run_upstream_scheduler_tests.py``): each compares the drop-in with the stock scheduler
on fresh random inputs (``lockstep``: step by step from the stock state, ``<= 1e-5`` relative).

diffusers' ``DDIMInverseSchedulerTest.test_betas`` (``beta_end=2``): the drop-in refused the config at
``set_timesteps`` because ``alphas_cumprod`` underflows to 0 (epsilon prediction: ``x0 = (x - m) / 0``),
though ``clip_sample`` (on by default) makes every stock step finite.
"""

from __future__ import annotations

import pytest
import torch

from tests.samplers._harness import initial_noise, toy_model

diffusers = pytest.importorskip("diffusers")

from .test_dropin_stock_api import UNDERFLOW, _pair, _stock_fails, lockstep  # noqa: E402

BETAS_ABOVE_1 = {"beta_start": 0.1, "beta_end": 2.0}  # diffusers' test_betas: abar underflows, then alternates +-0


def _signed_zero_levels(sched) -> list[int]:
    """Timesteps whose sample level has ``alphas_cumprod == -0.0`` (torch's ``(-0.0) ** 0.5`` is -0.0:
    diffusers' ``(x - m) / -0.0`` flips the infinity's sign before the clip)."""
    jump = sched.config.num_train_timesteps // sched.num_inference_steps
    acp = sched.alphas_cumprod
    return [int(t) for t in sched.timesteps if int(t) >= jump and acp[int(t) - jump] == 0
            and torch.signbit(acp[int(t) - jump])]


@pytest.mark.parametrize("cfg", [BETAS_ABOVE_1, UNDERFLOW, {**UNDERFLOW, "clip_sample_range": 0.7},
                                 {**BETAS_ABOVE_1, "timestep_spacing": "trailing", "set_alpha_to_one": False}])
def test_ddim_inverse_alphas_cumprod_underflowing_with_clip_sample_runs_as_stock(cfg, seed):
    """abar = 0 at the sample's level: diffusers' x0 = (x - m) / 0 = +-inf, clipped to +-clip_sample_range,
    finite; the drop-in plans the run (it raised ValueError at set_timesteps) and every step matches."""
    stock, fused = _pair("DDIMInverseScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    lockstep(stock, fused, stock.timesteps, seed)
    if cfg.get("beta_end") == 2.0 and cfg.get("timestep_spacing") is None:
        assert _signed_zero_levels(stock)  # (the case covers -0.0 levels)
    # where abar = 0 the clipped estimate is exactly +-range, with diffusers' signs (a -0.0 level flips them)
    jump = stock.config.num_train_timesteps // stock.num_inference_steps
    zero = [t for t in stock.timesteps if int(t) >= jump and stock.alphas_cumprod[int(t) - jump] == 0]
    assert zero
    x, m = initial_noise(seed, 1.0), initial_noise(seed + 1, 1.0)
    for t in zero:
        ref, got = stock.step(m, t, x), fused.step(m, t, x)
        assert torch.equal(got.pred_original_sample, ref.pred_original_sample), int(t)


@pytest.mark.parametrize("cfg", [{**UNDERFLOW, "clip_sample": False},
                                 {**BETAS_ABOVE_1, "clip_sample": False},
                                 # betas above 1 before abar underflows: a negative abar (NaN square root)
                                 {"num_train_timesteps": 20, "beta_start": 0.5, "beta_end": 1.5}])
def test_ddim_inverse_only_the_steps_stock_cannot_compute_are_refused(cfg, seed):
    """Without clipping (or at a negative abar) diffusers' step is inf/NaN at some timesteps: the drop-in
    plans the run, runs every step stock computes (matching it) and refuses the others by name."""
    stock, fused = _pair("DDIMInverseScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    x = initial_noise(seed, 1.0)
    m = toy_model(seed)(x, torch.zeros(x.shape[0]))
    bad = [t for t in stock.timesteps if _stock_fails(stock, m, t, x)]
    good = [t for t in stock.timesteps if t not in bad]
    assert bad and good
    lockstep(stock, fused, good, seed)
    for t in bad:
        with pytest.raises(ValueError, match=rf"DDIMInverseScheduler.step\(timestep={int(t)}\).*inf/NaN"):
            fused.step(m, t, x)
