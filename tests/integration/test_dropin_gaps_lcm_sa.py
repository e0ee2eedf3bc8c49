"""Drop-in gaps closed for LCMScheduler, TCDScheduler and SASolverScheduler, each against the stock
scheduler on fresh random inputs (``<= 1e-5`` relative in fp32, same generator, one fused step per
drop-in step):

- zero terminal SNR with ``prediction_type="epsilon"``: diffusers' step at ``t = 999``
  (``alphas_cumprod = 0``) divides by 0, which only LCM's ``clip_sample`` makes finite; every other
  step is finite. The drop-in plans every step it can and refuses that one only when it is run (a
  run started later, by ``set_begin_index`` or by timestep lookup, never reaches it);
- SA-Solver's ``tau_func``: diffusers' step calls it on the timestep AS GIVEN (its predictor) and on the
  one given at the call before (its corrector); the drop-in builds the row for those taus where they
  are not the grid's (a first timestep off the grid, which diffusers runs as the last step, or any
  value given later).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import samplers
from tests.samplers._harness import count_fused_steps, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")

from .test_diffusers_schedulers import TOL  # noqa: E402
from .test_dropin_stock_api import _kw, _pair, _stock_fails, lockstep  # noqa: E402

ZSNR_EPS = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "epsilon"}
DISTILLED = [("LCMScheduler", {}, {}), ("LCMScheduler", {"thresholding": True}, {}),
             ("TCDScheduler", {}, {"eta": 0.3}), ("TCDScheduler", {"clip_sample": True}, {"eta": 0.0})]


def _first_step_inputs(stock, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = initial_noise(seed, 1.0)
    return x, toy_model(seed)(x, stock.timesteps[0].float().expand(x.shape[0]))


# ------------------------------------------------------------------ zero terminal SNR, epsilon (LCM, TCD)


@pytest.mark.parametrize("name, cfg, kw", DISTILLED)
@pytest.mark.parametrize("begin", [1, 3])
def test_zero_snr_epsilon_run_begun_past_the_infinite_step_matches_stock(name, cfg, kw, begin, seed):
    stock, fused = _pair(name, {**ZSNR_EPS, **cfg})
    for s in (stock, fused):
        s.set_timesteps(5)
        s.set_begin_index(begin)
    assert float(stock.alphas_cumprod[int(stock.timesteps[0])]) == 0.0
    lockstep(stock, fused, stock.timesteps[begin:], seed, step_kwargs=kw)


@pytest.mark.parametrize("name, cfg, kw", DISTILLED)
def test_zero_snr_epsilon_run_found_by_lookup_past_the_infinite_step_matches_stock(name, cfg, kw, seed):
    stock, fused = _pair(name, {**ZSNR_EPS, **cfg})
    for s in (stock, fused):
        s.set_timesteps(4)
    lockstep(stock, fused, stock.timesteps[1:], seed, step_kwargs=kw)


@pytest.mark.parametrize("name, cfg, kw", DISTILLED + [("LCMScheduler", {"thresholding": True, "clip_sample": True},
                                                        {})])
def test_zero_snr_epsilon_infinite_step_is_refused_when_run(name, cfg, kw, seed):
    """Without clipping (LCM thresholded: the quantile of infinities is NaN; TCD never clips) diffusers'
    step at t = 999 is inf/NaN: a ValueError naming the class and the step, before any work."""
    stock, fused = _pair(name, {**ZSNR_EPS, **cfg})
    for s in (stock, fused):
        s.set_timesteps(4)
    x, m = _first_step_inputs(stock, seed)
    assert _stock_fails(stock, m, stock.timesteps[0], x, **_kw(stock, seed, **kw))
    with count_fused_steps() as fused_steps, pytest.raises(
            ValueError, match=rf"{name}.step\(timestep=999\) \(step 0\).*alphas_cumprod = 0"):
        fused.step(m, fused.timesteps[0], x, **_kw(fused, seed, **kw))
    assert fused_steps.n == 0


@pytest.mark.parametrize("clip_range", [1.0, 0.6, -0.5])
def test_lcm_zero_snr_epsilon_clipped_infinite_step_matches_stock(clip_range, seed):
    """LCM with clip_sample: diffusers clips x0 = (x - m) / 0 = +-inf to +-clip_sample_range (finite): the
    whole run, and the step's ``denoised``, as stock."""
    cfg = {**ZSNR_EPS, "clip_sample": True, "clip_sample_range": clip_range}
    stock, fused = _pair("LCMScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(4)
    x, m = _first_step_inputs(stock, seed)
    ref = stock.step(m, stock.timesteps[0], x, **_kw(stock, seed))
    got = fused.step(m, fused.timesteps[0], x, **_kw(fused, seed))
    assert torch.isfinite(ref.prev_sample).all()
    assert rel_err(got.prev_sample, ref.prev_sample) <= TOL and rel_err(got.denoised, ref.denoised) <= TOL
    stock, fused = _pair("LCMScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(4)
    lockstep(stock, fused, stock.timesteps, seed)


@pytest.mark.parametrize("clip", [True, False])
def test_lcm_epsilon_where_alphas_cumprod_is_float32_tiny_matches_stock(clip, seed):
    """Betas so wide that alphas_cumprod[499] is a float32 denormal (2.6e-41): diffusers' x0 is large but
    finite (the k-diffusion sigma of that timestep overflows float32: the row's callback sigma is capped)."""
    cfg = {"num_train_timesteps": 500, "beta_schedule": "linear", "beta_start": 0.0035645551895284854,
           "beta_end": 0.32680305613249067, "timestep_spacing": "linspace", "clip_sample": clip,
           "prediction_type": "epsilon", "original_inference_steps": 100, "timestep_scaling": 5.0}
    stock, fused = _pair("LCMScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(2)
    assert 0.0 < float(stock.alphas_cumprod[int(stock.timesteps[0])]) < 1e-38
    lockstep(stock, fused, stock.timesteps, seed)


def test_native_lcm_zero_snr_epsilon_clips_as_diffusers_and_refuses_unclipped():
    """The native sampler: the clipped t = 999 row exists; without clipping the plan is refused by name."""
    cfg = {**ZSNR_EPS, "clip_sample": True}
    plan = samplers.build("lcm", cfg, 4)
    assert plan.rows[0].t == 999.0 and plan.rows[0].clip == "static" and "refused" not in plan.meta
    with pytest.raises(ValueError, match=r"where alpha = 0 \(timestep 999, alphas_cumprod = 0\)"):
        samplers.build("lcm", {**cfg, "clip_sample": False}, 4)


# ------------------------------------------------------------------ SA-Solver: tau_func of the timestep as given


SA_CONFIGS = [
    {},
    {"predictor_order": 3, "corrector_order": 4},
    {"algorithm_type": "noise_prediction", "prediction_type": "v_prediction"},
    {"tau_func": lambda t: t / 1000},  # a tensor tau (float32 arithmetic, as diffusers')
    {"tau_func": lambda t: 0.2 + float(t) / 1000, "use_karras_sigmas": True, "predictor_order": 1},
    # a negative tau: diffusers reads tau^2 (and tau z in noise prediction), finite
    {"tau_func": lambda t: -0.7 if t > 500 else 0.4, "algorithm_type": "noise_prediction", "corrector_order": 3},
]


def _off_grid(ts) -> list:
    """Timesteps of a run given off the grid at steps 1, 3 and 5 (an int, a 0-d float tensor, a float),
    where diffusers' default tau_func differs from that of the grid's (7 steps: 857, 571, 285)."""
    return [ts[0], 500, ts[2], torch.tensor(150.5), ts[4], 900.0, ts[6]]


@pytest.mark.parametrize("cfg", SA_CONFIGS)
def test_sa_solver_off_grid_timesteps_take_their_own_tau_as_stock(cfg, seed):
    stock, fused = _pair("SASolverScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(7)
    lockstep(stock, fused, _off_grid(stock.timesteps), seed)
    assert any(k[0] == "taus" for k in fused._fd_plans)  # (rows built for the taus as given)
    assert [float(t) for t in fused.timestep_list] == [float(t) for t in stock.timestep_list]


@pytest.mark.parametrize("cfg", SA_CONFIGS)
def test_sa_solver_run_begun_later_with_off_grid_timesteps_matches_stock(cfg, seed):
    stock, fused = _pair("SASolverScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(7)
        s.set_begin_index(2)
    lockstep(stock, fused, _off_grid(stock.timesteps)[2:], seed)


@pytest.mark.parametrize("shift", [0.5, 3.0])
@pytest.mark.parametrize("cfg", SA_CONFIGS[:2])
def test_sa_solver_first_timestep_off_the_grid_is_the_last_step_with_its_own_tau(cfg, shift, seed):
    """diffusers runs an unknown first timestep as the last step, with tau_func of the value given (999.5:
    tau 0 where the last grid timestep has tau 1)."""
    stock, fused = _pair("SASolverScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(5)
    lockstep(stock, fused, [float(stock.timesteps[0]) + shift], seed)
    assert fused.step_index == len(fused.timesteps)


def test_sa_solver_tau_func_nan_at_a_given_timestep_is_refused_by_name(seed):
    cfg = {"tau_func": lambda t: math.nan if 990 < float(t) < 995 else 0.5}
    stock, fused = _pair("SASolverScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(5)
    x, m = _first_step_inputs(stock, seed)
    for s in (stock, fused):
        s.step(m, s.timesteps[0], x, **_kw(s, seed))
    assert _stock_fails(stock, m, 992, x, **_kw(stock, seed))
    with pytest.raises(ValueError, match=r"SASolverScheduler.step\(timestep=992\): tau_func of the given timestep"):
        fused.step(m, 992, x, **_kw(fused, seed))


def test_sa_solver_taus_option_is_tau_func_per_step():
    """The sampler's ``taus``: one value per step in place of tau_func's (later entries unread)."""
    plan = samplers.build("sa_solver", None, 6, tau_func=lambda t: 0.5 if t > 500 else 0.0)
    taus = list(plan.meta["taus"])
    assert 0.0 in taus and 0.5 in taus
    for given in (taus, taus + [9.0]):
        assert samplers.build("sa_solver", None, 6, taus=given).rows == plan.rows
    with pytest.raises(ValueError, match="taus must hold a tau for each of the 6 steps"):
        samplers.build("sa_solver", None, 6, taus=taus[:5])
