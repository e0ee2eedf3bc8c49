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

from tests.samplers._harness import SD, initial_noise, toy_model

diffusers = pytest.importorskip("diffusers")

from fastdiff.diffusers import from_diffusers  # noqa: E402

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


# ------------------------------------------------------------------ switching schedulers with from_config


SWITCHES = [  # (class A, A's config given explicitly, then the classes switched to with from_config)
    (("DPMSolverSinglestepScheduler", {"variance_type": None, "solver_order": 2}), "DEISMultistepScheduler"),
    (("DPMSolverMultistepScheduler", {"euler_at_final": False, "solver_order": 2}), "UniPCMultistepScheduler",
     "DPMSolverSinglestepScheduler"),  # (diffusers' test_switch chains: variance_type, euler_at_final)
    (("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "variance_type": "learned_range",
                                      "thresholding": True, "euler_at_final": True}), "UniPCMultistepScheduler",
     "EulerDiscreteScheduler"),
    (("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
     "EulerDiscreteScheduler", "DDIMScheduler"),
    (("UniPCMultistepScheduler", {"disable_corrector": [0, 1], "solver_order": 3}), "EulerDiscreteScheduler",
     "DPMSolverMultistepScheduler"),
    (("DDPMScheduler", {"variance_type": "fixed_large", "clip_sample": False, "thresholding": True}),
     "EulerDiscreteScheduler", "CogVideoXDDIMScheduler"),
    (("DEISMultistepScheduler", {"solver_order": 3, "lower_order_final": False}), "DDIMScheduler",
     "HeunDiscreteScheduler"),
]


def _switched(chain, wrap: bool):
    (a, cfg), *names = chain
    s = getattr(diffusers, a)(**{**SD, **cfg})
    for b in names:
        s = getattr(diffusers, b).from_config(s.config)
    return from_diffusers(s) if wrap else s


@pytest.mark.parametrize("chain", SWITCHES, ids=["-".join([c[0][0], *c[1:]]) for c in SWITCHES])
def test_scheduler_switched_with_from_config_runs_as_stock(chain, seed):
    """``pipe.scheduler = B.from_config(pipe.scheduler.config)`` keeps the values A's config was given for keys
    B does not have (diffusers' "hidden" keys: B never reads them, and a switch back restores them);
    ``from_diffusers`` refused them by name ("it may change the step"). Now the drop-in of the switched
    scheduler steps as the stock one, keeps its config, and so does a switch back to A."""
    import inspect

    stock, fused = _switched(chain, False), _switched(chain, True)
    params = inspect.signature(type(stock).__init__).parameters
    assert any(k not in params and not k.startswith("_") for k in stock.config)  # (the case has hidden keys)
    assert dict(fused.config) == dict(stock.config)
    for s in (stock, fused):
        s.set_timesteps(6)
    lockstep(stock, fused, stock.timesteps, seed)
    a = getattr(diffusers, chain[0][0])
    back_stock, back = a.from_config(stock.config), from_diffusers(a.from_config(fused.config))
    for s in (back_stock, back):
        s.set_timesteps(6)
    lockstep(back_stock, back, back_stock.timesteps, seed)
