"""The drop-in schedulers against the stock ones across diffusers' API surface, and the cases users
found where the drop-in refused what diffusers computes (each reproduced against stock first).

Stepping tests compare the drop-in with the stock scheduler step by step (``<= 1e-5`` relative,
fp32, same generator) and count the fused step (``fastdiff.runtime.ops.step``): every drop-in step
runs it. Cases where diffusers' own step gives inf/NaN or fails assert that the stock step does.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from tests.samplers._harness import SD, count_fused_steps, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
from fastdiff.diffusers import SUPPORT, from_diffusers  # noqa: E402

from .test_diffusers_schedulers import TOL, check  # noqa: E402

MINE = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]


def _pair(name: str, cfg: dict | None = None):
    cls = getattr(diffusers, name)
    return cls(**(cfg or {})), from_diffusers(cls(**(cfg or {})))


def _kw(sched, seed: int, **extra) -> dict:
    takes = "generator" in inspect.signature(sched.step).parameters
    gen = {"generator": torch.Generator().manual_seed(seed)} if takes else {}
    return {**gen, **extra}


def lockstep(stock, fused, timesteps, seed: int, *, step_kwargs=None, model=None, x=None, return_dict=True):
    """Both schedulers step from the STOCK state with the same model output and generator; every
    step's result within ``TOL`` of the stock one and one fused step per drop-in step. Returns the
    stock states."""
    model = model or toy_model(seed)
    x = initial_noise(seed, float(getattr(stock, "init_noise_sigma", 1.0))) if x is None else x
    out = []
    with count_fused_steps() as fused_steps:
        for i, t in enumerate(timesteps):
            u = stock.scale_model_input(x, t) if hasattr(stock, "scale_model_input") else x
            if hasattr(fused, "scale_model_input"):
                assert torch.equal(fused.scale_model_input(x, t), u)
            m = model(u, torch.as_tensor(t).float().expand(x.shape[0]))
            ref = stock.step(m, t, x, return_dict=return_dict, **_kw(stock, seed + i, **(step_kwargs or {})))
            got = fused.step(m, t, x, return_dict=return_dict, **_kw(fused, seed + i, **(step_kwargs or {})))
            pairs = [(got.prev_sample, ref.prev_sample)] if return_dict else list(zip(got, ref))
            assert (return_dict or len(got) == len(ref)), (len(got), len(ref))
            for g, r in pairs:
                assert g.dtype == r.dtype and g.shape == r.shape
                assert rel_err(g, r) <= TOL, (i, float(t), rel_err(g, r))
            assert getattr(fused, "step_index", None) == getattr(stock, "step_index", None)
            x = ref.prev_sample if return_dict else ref[0]
            out.append(x)
    stock_fallback = fused._fd_run is not None and fused._fd_run.plan is None  # (LMS from a late start)
    assert fused_steps.n == (0 if stock_fallback else len(out)), f"{fused_steps.n} fused steps for {len(out)} steps"
    return out


def _stock_fails(stock, m, t, x, **kw) -> bool:
    """diffusers' step at ``t`` raises or returns a non-finite sample."""
    try:
        return not bool(torch.isfinite(stock.step(m, t, x, **kw).prev_sample).all())
    except Exception:  # noqa: BLE001 - any failure of the stock step
        return True


# ------------------------------------------------------------------ 1. timesteps not in scheduler.timesteps


@pytest.mark.parametrize("cfg, eta", [({}, 0.0), ({**SD, "prediction_type": "v_prediction", "clip_sample": False}, 0.6),
                                      ({"thresholding": True, "prediction_type": "sample"}, 1.0)])
def test_ddim_steps_at_any_integer_timestep(cfg, eta, seed):
    """diffusers' DDIM computes the step from the value (into t - T // steps): t = 0, 1, -1 (acp[-1]),
    values between the grid's; each row is built on demand (cached) and run through the fused step."""
    stock, fused = _pair("DDIMScheduler", cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    values = [torch.tensor(t) for t in (1, 0, 950, 101, -1, -7)] + [907, 1, np.int64(33)]
    lockstep(stock, fused, values, seed, step_kwargs={"eta": eta})
    assert any(k[0] == "at" for k in fused._fd_plans)


@pytest.mark.parametrize("cfg", [{}, {**SD, "variance_type": "fixed_large", "prediction_type": "v_prediction"}])
def test_ddpm_steps_at_any_timestep_of_its_training_grid(cfg, seed):
    """Before set_timesteps diffusers' DDPM steps into t - 1 from any t (its constructor grid); a
    negative t indexes alphas_cumprod from the end, as there."""
    stock, fused = _pair("DDPMScheduler", cfg)
    lockstep(stock, fused, [999, 998, 500, 3, 1, 0, -1, -4], seed)


@pytest.mark.parametrize("name", [n for n in MINE if SUPPORT[n].indexed])
def test_first_step_looks_its_position_up_as_stock(name, seed):
    """A run that starts at timesteps[k] without set_begin_index: diffusers' own lookup (the second
    match where the grid repeats the value; DPM-Solver/UniPC: the last step where none matches)."""
    stock, fused = _pair(name)
    for s in (stock, fused):
        s.set_timesteps(8)
    lockstep(stock, fused, stock.timesteps[3 * stock.order:], seed)  # (Heun: a first stage's timestep)


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_multistep_unknown_timestep_then_next_steps_as_stock(name, seed):
    stock, fused = _pair(name, SD)
    for s in (stock, fused):
        s.set_timesteps(8)
    lockstep(stock, fused, [1234.5], seed)  # diffusers: the last step (index len - 1)
    assert fused.step_index == stock.step_index == len(stock.timesteps)


@pytest.mark.parametrize("name, cfg, step_kwargs", [
    ("HeunDiscreteScheduler", SD, None), ("HeunDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}, None),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, None),
    ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {"s_churn": 2.0})])
@pytest.mark.parametrize("begin", [1, 3])
def test_heun_run_started_at_a_second_stage_as_stock(name, cfg, step_kwargs, begin, seed):
    """set_begin_index(odd): diffusers' state holds no step there, so it takes that call as a first
    stage (sigmas[i] -> sigmas[i + 1], equal on the interleaved grid: dt = 0). The drop-in refused it."""
    stock, fused = _pair(name, cfg)
    for s in (stock, fused):
        s.set_timesteps(6)
        s.set_begin_index(begin)
    lockstep(stock, fused, stock.timesteps[begin:], seed, step_kwargs=step_kwargs)


# ------------------------------------------------------------------ 2. clip / threshold values diffusers takes


@pytest.mark.parametrize("name, cfg", [
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 0.5}),
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 0.7, "prediction_type": "v_prediction"}),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 0.5, "dynamic_thresholding_ratio": 0.9}),
    ("DPMSolverMultistepScheduler", {**SD, "thresholding": True, "sample_max_value": 0.5, "prediction_type": "sample"}),
    ("UniPCMultistepScheduler", {**SD, "thresholding": True, "sample_max_value": 0.5, "prediction_type": "sample"}),
    # never read where nothing clips
    ("DDIMScheduler", {"thresholding": False, "sample_max_value": 0.5, "dynamic_thresholding_ratio": 3.0}),
    ("DPMSolverMultistepScheduler", {**SD, "sample_max_value": -2.0, "dynamic_thresholding_ratio": -1}),
    ("UniPCMultistepScheduler", {**SD, "sample_max_value": 0.25, "thresholding": True, "predict_x0": False,
                                 "final_sigmas_type": "sigma_min"}),
    ("DDPMScheduler", {"clip_sample": False, "clip_sample_range": -3.0}),
    # clamp with min > max gives max, as torch does: finite in diffusers
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": -0.5}),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": -1.0}),
    ("HeunDiscreteScheduler", {**SD, "clip_sample": True, "clip_sample_range": 0.3, "prediction_type": "sample"}),
])
def test_clip_and_threshold_values_diffusers_takes(name, cfg, seed):
    """Step by step from the stock state (a whole thresholded trajectory is sensitive to rounding at the
    quantile: 1 seed in ~10 drifted past 1e-5 while every step agreed to 1e-6)."""
    stock, fused = _pair(name, cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    lockstep(stock, fused, stock.timesteps, seed, model=toy_model(seed, gain=2.5))


@pytest.mark.parametrize("name, cfg, match", [
    ("DDIMScheduler", {"thresholding": True, "sample_max_value": 0.0}, "sample_max_value=0.0"),
    ("DDPMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio=1.5"),
    ("DPMSolverMultistepScheduler", {"thresholding": True, "prediction_type": "sample",
                                     "sample_max_value": float("nan")}, "sample_max_value=nan"),
    ("DDIMScheduler", {"clip_sample": True, "clip_sample_range": float("nan")}, "clip_sample_range=nan"),
])
def test_clip_and_threshold_values_diffusers_fails_on_are_refused_by_name(name, cfg, match, seed):
    stock, fused = _pair(name, cfg)
    stock.set_timesteps(5)
    x = initial_noise(seed, 1.0)
    assert _stock_fails(stock, x, stock.timesteps[0], x)
    with pytest.raises(ValueError, match=match):
        fused.set_timesteps(5)


# ------------------------------------------------------------------ 3. variance_type values diffusers takes


@pytest.mark.parametrize("name, cfg", [
    ("DPMSolverMultistepScheduler", {**SD, "variance_type": "fixed_small"}),  # a DDPM config's value: ignored
    ("DPMSolverMultistepScheduler", {**SD, "variance_type": "fixed_large", "algorithm_type": "sde-dpmsolver++"}),
    ("DDPMScheduler", {"variance_type": "something_else"}),  # diffusers' _get_variance: fixed_small
    ("DDPMScheduler", {"variance_type": None, "clip_sample": False}),
])
def test_variance_type_values_diffusers_takes(name, cfg, seed):
    check(name, cfg, 10, seed)


@pytest.mark.parametrize("name, cfg", [
    # diffusers' x0 = (1 - s) x - s v on the flow grid: finite (it was refused: "v needs alpha^2 + sigma^2 = 1")
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "v_prediction"}),
    ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "v_prediction",
                                     "algorithm_type": "sde-dpmsolver++"}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "v_prediction"}),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "v_prediction", "solver_order": 3,
                                 "final_sigmas_type": "sigma_min"}),
    # solver_order above 3: diffusers' step takes its third-order update (it was refused)
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 4}),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 5, "algorithm_type": "sde-dpmsolver++"}),
])
def test_other_config_values_diffusers_takes(name, cfg, seed):
    check(name, cfg, 12, seed)


def test_dpm_solver_order_below_one_is_refused_by_name():
    with pytest.raises(IndexError):  # diffusers: its model_outputs list is empty
        stock = diffusers.DPMSolverMultistepScheduler(solver_order=0)
        stock.set_timesteps(4)
        x = torch.zeros(1, 2, 2, 2)
        stock.step(x, stock.timesteps[0], x)
    with pytest.raises(ValueError, match="solver_order=0"):
        from_diffusers(diffusers.DPMSolverMultistepScheduler(solver_order=0))


# ------------------------------------------------------------------ 4. rows that cannot be planned


UNDERFLOW = {"beta_schedule": "linear", "beta_start": 0.01, "beta_end": 0.5}  # float32 abar = 0 from t = 595


@pytest.mark.parametrize("name, step_kwargs", [("DDIMScheduler", {}), ("DDIMScheduler", {"eta": 1.0}),
                                               ("DDPMScheduler", {})])
def test_alphas_cumprod_underflowing_to_zero(name, step_kwargs, seed):
    """Stock steps fine at low timesteps and gives NaN at high ones (abar_t = abar_prev = 0): set_timesteps
    plans (it raised ZeroDivisionError), the low steps match, a high one is refused when run."""
    cfg = {**UNDERFLOW, "clip_sample": False}
    stock, fused = _pair(name, cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    x = initial_noise(seed, 1.0)
    t = stock.timesteps[1]
    assert _stock_fails(stock, x, t, x, **_kw(stock, 0, **step_kwargs))
    with pytest.raises(ValueError, match=rf"{name}.step\(timestep={int(t)}\).*inf/NaN"):
        fused.step(x, t, x, **_kw(fused, 0, **step_kwargs))
    check(name, cfg, 10, seed, begin=6, step_kwargs=step_kwargs)


@pytest.mark.parametrize("name, cfg", [
    (name, {"num_train_timesteps": 50, **o}) for name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
    for o in ({}, {"solver_order": 3}, *([{"algorithm_type": "sde-dpmsolver++"}] if name.startswith("DPM") else []))])
def test_grid_with_a_repeated_timestep(name, cfg, seed):
    """set_timesteps(num_train_timesteps) repeats one timestep (sigmas[25] == sigmas[26]): the step after
    that zero-length step divides by its length (NaN in diffusers). The plan is built (it raised
    ZeroDivisionError), the steps before match the stock ones, that step is refused by name when run."""
    stock, fused = _pair(name, cfg)
    for s in (stock, fused):
        s.set_timesteps(50)
    ts = stock.timesteps
    rep = next(i for i in range(len(ts)) if stock.sigmas[i] == stock.sigmas[i + 1])  # step `rep` has length 0
    if cfg.get("solver_order") == 3:  # diffusers' 3M step of length 0 is 0/0 already (the drop-in's: its limit)
        lockstep(stock, fused, ts[:rep], seed)
        return
    states = lockstep(stock, fused, ts[:rep + 1], seed)
    x, t = states[-1], ts[rep + 1]
    m = toy_model(seed)(x, t.float().expand(2))
    assert _stock_fails(stock, m, t, x, **_kw(stock, 0))
    with pytest.raises(ValueError, match=rf"{name}.step: step {rep + 1} .*repeats"):
        fused.step(m, t, x, **_kw(fused, 0))


@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_set_timesteps_of_every_training_timestep(name, seed):
    """set_timesteps(1000): linspace repeats timestep 499 (it raised ZeroDivisionError). A late start
    (img2img) before the repeat matches the stock steps; step 500 is refused by name."""
    stock, fused = _pair(name, SD)
    for s in (stock, fused):
        s.set_timesteps(1000)
        s.set_begin_index(495)
    states = lockstep(stock, fused, stock.timesteps[495:500], seed)
    t = stock.timesteps[500]
    m = toy_model(seed)(states[-1], t.float().expand(2))
    assert _stock_fails(stock, m, t, states[-1])
    with pytest.raises(ValueError, match=rf"{name}.step: step 500 "):
        fused.step(m, t, states[-1])
    fresh = from_diffusers(getattr(diffusers, name)(**SD))  # a run starting after the repeat plans cleanly
    fresh.set_timesteps(1000)
    fresh.set_begin_index(990)
    stock2 = getattr(diffusers, name)(**SD)
    stock2.set_timesteps(1000)
    stock2.set_begin_index(990)
    lockstep(stock2, fresh, stock2.timesteps[990:], seed)


def test_flow_euler_custom_sigmas_reaching_zero_early(seed):
    """A 0 before the end of the flow grid: diffusers' x + (s' - s) v is finite there (the Euler rows
    divided by s: ZeroDivisionError)."""
    check("FlowMatchEulerDiscreteScheduler", {"shift": 1.0}, None, seed, set_kw={"sigmas": [1.0, 0.6, 0.0]})


# ------------------------------------------------------------------ 5. zero terminal SNR with epsilon prediction


ZSNR_EPS = {**SD, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "epsilon"}


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
def test_zero_snr_epsilon_with_clipping_runs_as_stock(name, seed):
    """abar = 0 at t = 999: x0 = (x - m) / 0 = +-inf, which clip_sample clips to +-range in diffusers:
    finite, and the drop-in's row gives the same (it was refused for the whole run)."""
    check(name, {**ZSNR_EPS, "clip_sample": True}, 10, seed)


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("clip", [{"clip_sample": False}, {"thresholding": True}])
def test_zero_snr_epsilon_only_the_infinite_step_is_refused(name, clip, seed):
    """Without clipping (or thresholded: the quantile of infinities is NaN) diffusers' first step is
    inf/NaN: refused when run; a run that starts later matches the stock one."""
    cfg = {**ZSNR_EPS, **clip}
    stock, fused = _pair(name, cfg)
    for s in (stock, fused):
        s.set_timesteps(10)
    x = initial_noise(seed, 1.0)
    m = toy_model(seed)(x, stock.timesteps[0].float().expand(2))
    assert _stock_fails(stock, m, stock.timesteps[0], x, **_kw(stock, 0))
    with pytest.raises(ValueError, match=rf"{name}.step\(timestep=999\).*alphas_cumprod\[t\] = 0"):
        fused.step(m, fused.timesteps[0], x, **_kw(fused, 0))
    check(name, cfg, 10, seed, begin=1)


# ------------------------------------------------------------------ 6. diffusers' float32 coefficients


@pytest.mark.parametrize("name, cfg, steps, begin", [
    ("DDPMScheduler", {"clip_sample": False}, 1000, 985),  # 1 - abar_t / abar_prev ~ 1e-4 in float32
    ("DDPMScheduler", {**SD, "clip_sample": False, "variance_type": "fixed_small_log"}, 500, 490),
    ("DDIMScheduler", {"clip_sample": False}, 1000, 985),
])
def test_small_steps_use_diffusers_float32_coefficients(name, cfg, steps, begin, seed):
    """At low timesteps diffusers' float32 ``1 - abar_t / abar_prev`` is off by ~1e-4 relative, and so
    is its step (the drop-in computed it in float64: 1e-4 from the stock step); the drop-in's rows now
    compute those coefficients as diffusers does. fastdiff.sample keeps the float64 form."""
    check(name, cfg, steps, seed, begin=begin, step_kwargs={"eta": 0.5} if name == "DDIMScheduler" else None)
    if name != "DDPMScheduler":
        return
    from fastdiff import samplers
    from fastdiff.core.plan import OP_D
    from fastdiff.core.schedules import from_config

    fused = from_diffusers(getattr(diffusers, name)(**cfg))
    fused.set_timesteps(steps)
    dropin = fused.fastdiff_plan().rows[-2]  # t = 2 or 1, into the last timestep
    sample = samplers.build("ddpm", from_config(dict(fused.config)), steps, prediction="eps").rows[-2]  # (sample's)
    t, prev = int(fused.timesteps[-2]), int(fused.timesteps[-1])
    assert dropin.t == sample.t == t
    a32_t, a32_p = fused.alphas_cumprod[t], fused.alphas_cumprod[prev]
    a_t, a_p = float(a32_t), float(a32_p)
    assert sample.out[OP_D] == pytest.approx(a_p**0.5 * (1 - a_t / a_p) / (1 - a_t), rel=1e-12)  # float64
    assert dropin.out[OP_D] == float((a32_p**0.5 * (1 - a32_t / a32_p)) / (1 - a32_t))  # diffusers' float32
    assert abs(dropin.out[OP_D] / sample.out[OP_D] - 1) > 1e-6  # (the two differ here)


# ------------------------------------------------------------------ 7. FlowMatchHeunDiscreteScheduler


def test_flow_heun_needs_set_timesteps_as_stock(seed):
    stock, fused = _pair("FlowMatchHeunDiscreteScheduler")
    x = initial_noise(seed, 1.0)
    with pytest.raises(AttributeError):  # diffusers: its state has no dt before set_timesteps
        stock.step(x, stock.timesteps[0], x)
    with pytest.raises(ValueError, match="FlowMatchHeunDiscreteScheduler.*set_timesteps"):
        fused.step(x, fused.timesteps[0], x)


@pytest.mark.parametrize("step_kwargs", [None, {"s_churn": 1.5, "s_tmax": 0.7}, {"s_churn": -0.5}])
def test_flow_heun_state_and_img2img_as_stock(step_kwargs, seed):
    stock, fused = _pair("FlowMatchHeunDiscreteScheduler", {"shift": 3.0})
    for s in (stock, fused):
        s.set_timesteps(7)
        s.set_begin_index(4)
    lockstep(stock, fused, stock.timesteps[4:], seed, step_kwargs=step_kwargs)
    assert fused.state_in_first_order == stock.state_in_first_order


# ------------------------------------------------------------------ the stock API surface, per class


def _custom(name: str):
    """set_timesteps variants diffusers has for the class (custom timesteps / sigmas / mu)."""
    return {
        "DDPMScheduler": [{"timesteps": [951, 700, 433, 120, 9, 0]}],
        "DDIMScheduler": [],
        "EulerDiscreteScheduler": [{"timesteps": [901, 650, 400, 77, 12]}, {"sigmas": [14.6, 5.0, 1.3, 0.2]}],
        "EulerAncestralDiscreteScheduler": [],
        "HeunDiscreteScheduler": [{"timesteps": [901, 650, 400, 77, 12]}],
        "LMSDiscreteScheduler": [],
        "DPMSolverMultistepScheduler": [{"timesteps": [999, 777, 500, 250, 42]}],
        "UniPCMultistepScheduler": [],
        "FlowMatchEulerDiscreteScheduler": [{"sigmas": [1.0, 0.7, 0.4, 0.1]}, {"timesteps": [1000.0, 640.0, 250.0]}],
        "FlowMatchHeunDiscreteScheduler": [],
    }[name]


SET_KW = [(n, kw) for n in MINE for kw in _custom(n)]


@pytest.mark.parametrize("name, set_kw", SET_KW, ids=[f"{n}-{list(k)[0]}" for n, k in SET_KW])
def test_set_timesteps_variants(name, set_kw, seed):
    check(name, SD if "Flow" not in name else {}, None, seed, set_kw=set_kw)


def test_set_timesteps_mu_and_flow_sigmas(seed):
    check("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, 8, seed, set_kw={"mu": 1.1})
    check("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                      "use_dynamic_shifting": True}, 8, seed, set_kw={"mu": 0.6})
    check("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, 6, seed)


@pytest.mark.parametrize("name", MINE)
def test_scale_model_input_add_noise_and_indices_as_stock(name, seed):
    """scale_model_input / add_noise (flow: scale_noise) are diffusers' own; step_index and
    begin_index after every step are the stock scheduler's; return_dict=False gives its tuple."""
    stock, fused = _pair(name)
    for s in (stock, fused):
        s.set_timesteps(6)
    x = initial_noise(seed, 1.0)
    noise = initial_noise(seed + 1, 1.0)
    ts = stock.timesteps
    if hasattr(stock, "add_noise"):
        assert torch.equal(fused.add_noise(x, noise, ts[2:3]), stock.add_noise(x, noise, ts[2:3]))
    if hasattr(stock, "scale_noise"):
        stock.set_begin_index(0)
        fused.set_begin_index(0)
        assert torch.equal(fused.scale_noise(x, ts[:1], noise), stock.scale_noise(x, ts[:1], noise))
    assert getattr(fused, "begin_index", None) == getattr(stock, "begin_index", None)
    lockstep(stock, fused, ts, seed, return_dict=False)
    assert getattr(fused, "step_index", None) == getattr(stock, "step_index", None)


@pytest.mark.parametrize("name", MINE)
def test_save_config_and_from_config_round_trip(name, seed, tmp_path):
    cfg = SD if "Flow" not in name else {"shift": 3.0}
    stock, fused = _pair(name, cfg)
    fused.save_config(tmp_path)
    back = type(fused).from_pretrained(tmp_path)
    again = type(fused).from_config(back.config)
    public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in (stock.config, back.config, again.config)]
    assert public[0] == public[1] == public[2]
    assert type(back) is type(fused) is type(again)
    for s in (stock, again):
        s.set_timesteps(6)
    lockstep(stock, again, stock.timesteps, seed)
    stock_back = getattr(diffusers, name).from_config(fused.config)  # the drop-in's config loads in diffusers
    assert type(stock_back) is getattr(diffusers, name)


NOISY = [  # (class, config, step() arguments): every supported step that draws noise
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"variance_type": "fixed_large"}, {}),
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
    ("KDPM2AncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("LCMScheduler", {}, {}),
    ("TCDScheduler", {}, {"eta": 0.5}),
    ("SASolverScheduler", {}, {}),
    ("CogVideoXDPMScheduler", {}, {}),
]


@pytest.mark.parametrize("name,cfg,kw", NOISY, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(NOISY)])
def test_noise_without_a_generator_is_stocks_from_the_global_rng(name, cfg, kw):
    """No generator: diffusers draws each step's noise from torch's global RNG, and so does the drop-in, in
    the same calls: after the same torch.manual_seed the runs agree, and leave the RNG in the same state
    (the next draw is the same)."""
    cls = getattr(diffusers, name)
    base = dict(SD) if "EDM" not in name and "CogVideoX" not in name else {}
    x0 = initial_noise(7, 1.0, shape=(2, 3, 4, 4))
    model = toy_model(3, shape=(2, 3, 4, 4), gain=0.5)
    results = []
    for sched in (cls(**base, **cfg), from_diffusers(cls(**base, **cfg))):
        sched.set_timesteps(5)
        x = x0 * sched.init_noise_sigma
        torch.manual_seed(99)
        old = None
        for i, t in enumerate(sched.timesteps):
            m = model(sched.scale_model_input(x, t), t)
            if name == "CogVideoXDPMScheduler":  # (its step takes the previous estimate and timestep back)
                back = sched.timesteps[i - 1] if i else None
                x, old = sched.step(m, old, t, back, x, return_dict=False)[:2]
            else:
                x = sched.step(m, t, x, **kw).prev_sample
        results.append((x, torch.randn(3)))
    (x_s, r_s), (x_f, r_f) = results
    assert torch.isfinite(x_s).all() and rel_err(x_f, x_s) <= 1e-5, rel_err(x_f, x_s)
    assert torch.equal(r_f, r_s), "the drop-in drew from the global RNG differently from diffusers"


@pytest.mark.parametrize("sample_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("model_dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("generator", [False, True], ids=["global-rng", "generator"])
def test_flow_lcm_noise_in_the_dtype_stock_draws_it(sample_dtype, model_dtype, generator):
    """FlowMatchLCM casts the sample to float32 and draws noise in the dtype of its estimate (that float32
    sample and the model output): float64 for a float64 model output. The drop-in drew float32 there
    (other numbers, and another RNG state afterwards)."""
    x0 = initial_noise(5, 1.0, shape=(2, 3, 4, 4)).to(sample_dtype)
    results = []
    for sched in (diffusers.FlowMatchLCMScheduler(), from_diffusers(diffusers.FlowMatchLCMScheduler())):
        sched.set_timesteps(4)
        torch.manual_seed(11)
        g = torch.Generator().manual_seed(3) if generator else None
        x = x0
        for t in sched.timesteps:
            x = sched.step((0.3 * x + 0.1).to(model_dtype), t, x, generator=g).prev_sample
        results.append((x, torch.randn(2), None if g is None else torch.randn(2, generator=g)))
    (a, ra, ga), (b, rb, gb) = results
    assert b.dtype == a.dtype and torch.equal(rb, ra) and (ga is None or torch.equal(gb, ga))
    assert rel_err(b, a) <= (1e-5 if model_dtype != torch.float16 else 2e-3), rel_err(b, a)
