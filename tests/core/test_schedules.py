"""fastdiff.core.schedules against diffusers' own set_timesteps, closed forms, and from_config errors."""

import math

import numpy as np
import pytest
import torch

from fastdiff.core import schedules as S

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

VP_CONFIGS = [
    {},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading",
     "steps_offset": 1},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "trailing",
     "rescale_betas_zero_snr": True},
    {"timestep_spacing": "linspace", "num_train_timesteps": 500},
    {"trained_betas": np.linspace(1e-4, 0.03, 1000).tolist(), "timestep_spacing": "leading"},
]
STEPS = [1, 7, 30, 50]


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


@pytest.mark.parametrize("cfg", VP_CONFIGS)
@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
def test_vp_integer_timesteps_and_alphas_match_diffusers(cfg, cls):
    sched = getattr(diffusers, cls)(**cfg)
    ours = S.from_config(sched.config)
    assert np.array_equal(ours.betas, f64(sched.betas))
    assert np.array_equal(ours.alphas_cumprod, f64(sched.alphas_cumprod))
    for n in STEPS:
        sched.set_timesteps(n)
        assert np.array_equal(ours.timesteps(n, "leading"), f64(sched.timesteps)), (cls, cfg, n)


EULER_GRIDS = [
    {},
    {"use_karras_sigmas": True},
    {"use_exponential_sigmas": True},
    {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 10.0},
    {"final_sigmas_type": "sigma_min"},
]


@pytest.mark.parametrize("cfg", VP_CONFIGS)
@pytest.mark.parametrize("grid", EULER_GRIDS)
def test_euler_sigma_grid_matches_diffusers_bitwise(cfg, grid):
    sched = diffusers.EulerDiscreteScheduler(**cfg, **grid)
    ours = S.from_config(sched.config)
    for n in STEPS:
        sched.set_timesteps(n)
        d = ours.discretize(n)
        assert np.array_equal(d.sigmas, f64(sched.sigmas)), (cfg, grid, n)
        assert np.array_equal(d.timesteps, f64(sched.timesteps)), (cfg, grid, n)
        assert d.init_sigma == float(sched.init_noise_sigma)


@pytest.mark.parametrize("cls", ["HeunDiscreteScheduler", "LMSDiscreteScheduler", "EulerAncestralDiscreteScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_other_euler_type_grids_match_diffusers(cls, spacing):
    sched = getattr(diffusers, cls)(timestep_spacing=spacing, steps_offset=1)
    ours = S.from_config(sched.config)
    sched.set_timesteps(30)
    d = ours.discretize(30)
    sig, ts = f64(sched.sigmas), f64(sched.timesteps)
    if cls.startswith("Heun"):  # diffusers repeats the inner points for the second stage
        sig = np.concatenate([sig[:1], sig[1::2]])
        ts = ts[::2][:1].tolist() + ts[1::2].tolist()
    assert np.array_equal(d.sigmas, sig)
    assert np.array_equal(d.timesteps, np.asarray(ts))


FLOW_CONFIGS = [
    {},
    {"shift": 3.0},
    {"shift": 3.0, "use_karras_sigmas": True},
    {"shift": 2.0, "use_exponential_sigmas": True},
    {"shift": 1.5, "shift_terminal": 0.05},
    {"use_dynamic_shifting": True, "mu": 0.7},
    {"use_dynamic_shifting": True, "mu": 1.1, "time_shift_type": "linear"},
]


@pytest.mark.parametrize("cfg", FLOW_CONFIGS)
def test_flow_grid_matches_diffusers_bitwise(cfg):
    cfg = dict(cfg)
    mu = cfg.pop("mu", None)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ours = S.from_config(sched.config)
    assert isinstance(ours, S.FlowSchedule)
    if mu is not None:
        with pytest.raises(ValueError, match="mu"):
            ours.discretize(10)
        ours = ours.replace(mu=mu)
    for n in STEPS:
        if cfg.get("shift_terminal") and n == 1:  # diffusers returns NaN here; we refuse
            with pytest.raises(ValueError, match="shift_terminal"):
                ours.discretize(n)
            continue
        sched.set_timesteps(n, mu=mu)
        d = ours.discretize(n)
        assert np.array_equal(d.sigmas, f64(sched.sigmas)), (cfg, n)
        assert np.array_equal(d.timesteps, f64(sched.timesteps)), (cfg, n)


def test_flow_heun_grid_matches_diffusers():
    sched = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    d = S.from_config(sched.config).discretize(20)
    assert np.array_equal(d.sigmas, np.concatenate([f64(sched.sigmas)[:1], f64(sched.sigmas)[1::2]]))


def test_karras_and_exponential_closed_forms():
    n, lo, hi, rho = 12, 0.03, 14.6, 5.0
    k = S.karras_sigmas(n, lo, hi, rho)
    assert k[0] == pytest.approx(hi, rel=1e-15) and k[-1] == pytest.approx(lo, rel=1e-15)
    # sigma^(1/rho) is uniform in the step index
    assert np.allclose(np.diff(k ** (1 / rho)), (lo ** (1 / rho) - hi ** (1 / rho)) / (n - 1), rtol=1e-12, atol=0)
    e = S.exponential_sigmas(n, lo, hi)
    assert np.allclose(np.diff(np.log(e)), math.log(lo / hi) / (n - 1), rtol=1e-12, atol=0)
    assert np.allclose(S.ve_sigmas(n, lo, hi), e, rtol=1e-15)
    assert np.all(np.diff(k) < 0) and np.all(np.diff(e) < 0)
    with pytest.raises(ValueError, match="sigma_min"):
        S.karras_sigmas(4, 2.0, 1.0)


def test_flow_shift_closed_form():
    s = np.linspace(0.01, 1, 50)
    for shift in (1.0, 3.0, 0.5):
        out = S.shift_flow_sigmas(s, shift)
        # the shift multiplies the odds s/(1-s) by `shift`
        odds = lambda v: v[:-1] / (1 - v[:-1])  # noqa: E731
        assert np.allclose(odds(out), shift * odds(s), rtol=1e-12)
        assert out[-1] == pytest.approx(1.0)


def test_ve_schedule_grid_and_alpha_sigma():
    ve = S.VESchedule(sigma_min=0.01, sigma_max=50.0)
    d = ve.discretize(10)
    assert d.sigmas[-1] == 0 and np.array_equal(d.timesteps, d.sigmas[:-1]) and d.init_sigma == 50.0
    assert np.allclose(d.sigmas[:-1], S.karras_sigmas(10, 0.01, 50.0))
    assert ve.alpha_sigma(3.5) == (1.0, 3.5)
    de = ve.replace(sigma_grid="exponential").discretize(10)
    assert np.allclose(de.sigmas[:-1], S.exponential_sigmas(10, 0.01, 50.0))


def test_vp_alpha_sigma_integer_fractional_and_inverse():
    vp = S.from_config({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    t = np.array([0, 1, 499, 999])
    a, s = vp.alpha_sigma(t)
    assert np.array_equal(a, np.sqrt(vp.alphas_cumprod[t])) and np.array_equal(s, np.sqrt(1 - vp.alphas_cumprod[t]))
    assert np.allclose(a * a + s * s, 1, atol=1e-15)
    # fractional t: log-sigma interpolation, the inverse of diffusers' _sigma_to_t
    tf = np.array([0.25, 10.5, 733.9, 998.01])
    sig = vp.t_to_sigma(tf)
    assert np.all(sig > vp.train_sigmas[np.floor(tf).astype(int)]) and np.all(sig < vp.train_sigmas[np.ceil(tf).astype(int)])
    assert np.allclose(vp.sigma_to_t(sig), tf, rtol=0, atol=1e-9)
    ref = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    log_sig = np.log(np.array(((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5))
    probe = np.array([0.03, 0.5, 3.0, 14.0])
    assert np.array_equal(vp.sigma_to_t(probe), ref._sigma_to_t(probe, log_sig))
    with pytest.raises(ValueError, match="t must be within"):
        vp.alpha_sigma(1000.0)


def test_flow_alpha_sigma():
    fl = S.FlowSchedule(shift=3.0)
    assert fl.alpha_sigma(250.0) == (0.75, 0.25)
    a, s = fl.alpha_sigma(np.array([0.0, 1000.0]))
    assert np.array_equal(a, [1.0, 0.0]) and np.array_equal(s, [0.0, 1.0])


def test_rescale_zero_snr_matches_diffusers():
    rescale_zero_terminal_snr = pytest.importorskip("diffusers.schedulers.scheduling_ddim").rescale_zero_terminal_snr

    b = S.vp_betas("scaled_linear", 1000, 0.00085, 0.012)
    assert torch.equal(S.rescale_betas_zero_snr(b.clone()), rescale_zero_terminal_snr(b.clone()))
    vp = S.vp("scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    assert vp.alphas_cumprod[-1] == 0.0 and math.isfinite(vp.train_sigmas[-1])


def test_from_config_options_defaults_and_ignored_keys():
    cfg = dict(diffusers.DDIMScheduler(prediction_type="v_prediction", clip_sample=False).config)
    cfg["_class_name"], cfg["_diffusers_version"], cfg["skip_prk_steps"] = "DDIMScheduler", "0.30.0", True
    s = S.from_config(cfg)
    assert s.options["prediction_type"] == "v_prediction" and s.options["clip_sample"] is False
    # a scheduler object's own config marks every key it did not receive as defaulted
    s2 = S.from_config(diffusers.DDIMScheduler().config)
    assert s2.spacing is None and "clip_sample" not in s2.options
    assert S.from_config({"timestep_spacing": "trailing"}).spacing == "trailing"


@pytest.mark.parametrize("cfg, key", [
    ({"karras_sigmas": True}, "karras_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"timestep_type": "continuous"}, "timestep_type"),
    ({"interpolation_type": "log_linear"}, "interpolation_type"),
    ({"beta_schedule": "sigmoid"}, "beta_schedule"),
    ({"shift": 3.0, "invert_sigmas": True}, "invert_sigmas"),
    ({"shift": 3.0, "beta_start": 0.1}, "shift"),  # mixed VP and flow keys
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "beta_schedule": "linear"}, "beta_schedule"),
    ({"timestep_spacing": "uniform"}, "timestep_spacing"),
    ({"prediction_type": "velocity"}, "prediction"),
])
def test_from_config_rejects_unsupported_keys_by_name(cfg, key):
    with pytest.raises(ValueError, match=key):
        S.from_config(cfg)


def test_bad_arguments_name_themselves():
    vp = S.from_config({})
    with pytest.raises(ValueError, match="steps"):
        vp.discretize(0)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        vp.timesteps(1001)
    with pytest.raises(TypeError, match="config"):
        S.from_config(3)
    with pytest.raises(ValueError, match="shift"):
        S.FlowSchedule(shift=0.0)


@pytest.mark.parametrize("cls_name", [
    "DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
])
def test_stock_scheduler_configs_are_accepted(cls_name):
    # users pass pipe.scheduler.config as is: every stock default config must load (flow keys that
    # VP schedulers carry at their off values included), and turning a refused option on must raise
    cfg = getattr(diffusers, cls_name)().config
    s = S.from_config(cfg)
    assert s.kind == ("flow" if cls_name.startswith("FlowMatch") else "vp")
    if "use_dynamic_shifting" in cfg and s.kind == "vp":
        with pytest.raises(ValueError, match="use_dynamic_shifting"):
            S.from_config({**cfg, "use_dynamic_shifting": True})
