"""fastdiff.diffusers.from_diffusers: drop-in schedulers vs the stock diffusers schedulers.

Every trajectory test runs the stock scheduler and its drop-in side by side in the usual
diffusers loop (``scale_model_input`` -> nonlinear toy model -> ``step`` with a generator), from
the same fresh random initial state, and requires a relative error ``||a - b|| / ||b|| <= 1e-5``
after every ``step`` call (fp32; the drop-in computes in fp32 for fp32 tensors and fp64 for fp64,
diffusers in fp32 with float32 schedule tensors).
"""

import inspect
import warnings

import pytest
import torch

from tests.samplers._harness import SD, assert_close_traj, count_fused_steps, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
from fastdiff.diffusers import SUPPORT, from_diffusers, support_table  # noqa: E402

TOL = 1e-5


def run(sched, model, x, steps, *, seed=None, set_kw=None, begin=None, step_kwargs=None):
    """The diffusers loop; the state after every ``step`` call."""
    sched.set_timesteps(steps, **(set_kw or {}))
    ts = sched.timesteps
    if begin is not None:  # img2img: the pipelines' set_begin_index (DDPM/DDIM follow the timestep value)
        ts = ts[begin * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin * sched.order)
    kw = dict(step_kwargs or {})
    if seed is not None and "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(seed)
    traj = []
    for t in ts:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = model(u, t.to(x.dtype).expand(x.shape[0]))
        x = sched.step(m, t, x, **kw).prev_sample
        traj.append(x.clone())
    return traj


def check(cls_name: str, cfg: dict, steps, seed: int, *, dtype=torch.float32, gain=1.0, set_kw=None, begin=None,
          step_kwargs=None, backend="auto", truth64=False) -> float:
    """Stock vs drop-in trajectories (same model, initial state and generator); the worst error.

    ``truth64``: where diffusers' own fp32 formula cancels catastrophically (Euler-type steps from
    zero-SNR's sigma = 4096: ``x + (x - x0) / sigma * (sigma_next - sigma)`` loses ~8 bits), a step
    may differ from the stock by more than ``TOL`` only if the drop-in is 10x closer than the stock
    to the same run in fp64 (same noise draws), and never by more than ``5 * TOL``.
    """
    cls = getattr(diffusers, cls_name)
    stock, fused = cls(**cfg), from_diffusers(cls(**cfg), backend=backend)
    stock.set_timesteps(steps, **(set_kw or {}))
    init = float(getattr(stock, "init_noise_sigma", 1.0))
    x = initial_noise(seed, init, dtype=dtype)
    model = toy_model(seed, gain=gain)
    kw = dict(set_kw=set_kw, begin=begin, step_kwargs=step_kwargs, seed=seed + 1)
    ref = run(stock, model, x, steps, **kw)
    with count_fused_steps() as fused_steps:
        got = run(fused, model, x, steps, **kw)
    stock_fallback = fused._fd_run is not None and fused._fd_run.plan is None  # (LMS from a late start)
    assert fused_steps.n == (0 if stock_fallback else len(got)), f"{fused_steps.n} fused steps for {len(got)} steps"
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    what = f"{cls_name} {cfg} seed={seed}"
    if not truth64:
        return assert_close_traj(got, ref, TOL, what=what)
    import fastdiff.diffusers as fdd

    draw = fdd.scheduler.draw_noise
    fdd.scheduler.draw_noise = lambda shape, g, dt, dev: draw(shape, g, torch.float32, dev).to(dt)  # the fp32 run's numbers
    try:
        truth = run(from_diffusers(cls(**cfg), backend="reference"), model, x.double(), steps, **kw)
    finally:
        fdd.scheduler.draw_noise = draw
    worst = 0.0
    for i, (g, r, t) in enumerate(zip(got, ref, truth)):
        e = rel_err(g, r)
        if e > TOL:
            ours, stock = rel_err(g, t), rel_err(r, t)
            assert e <= 5 * TOL and ours <= 0.1 * stock, \
                f"{what}: step {i}: {e:.3g} from the stock; from fp64: {ours:.3g} (ours) vs {stock:.3g} (stock)"
        worst = max(worst, e)
    return worst


PRED = ["epsilon", "v_prediction", "sample"]
SPACINGS = [{"timestep_spacing": "leading", "steps_offset": 1}, {"timestep_spacing": "trailing"},
            {"timestep_spacing": "linspace"}]
ZSNR = {**SD, "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}


def _cases():
    c = []
    # DDPM
    c += [("DDPMScheduler", {**SD, **sp, "prediction_type": p, "clip_sample": False}, {})
          for p in PRED for sp in SPACINGS]
    c += [("DDPMScheduler", {"variance_type": v}, {}) for v in ("fixed_large", "fixed_small_log")]
    c += [("DDPMScheduler", {"clip_sample": True, "clip_sample_range": 0.8}, {"gain": 2.5}),
          ("DDPMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
           {"gain": 2.5}),
          ("DDPMScheduler", {**ZSNR, "clip_sample": False}, {}),
          ("DDPMScheduler", {"beta_schedule": "squaredcos_cap_v2"}, {"steps": None,
                                                                      "set_kw": {"timesteps": [900, 620, 300, 77, 5]}})]
    # DDIM
    c += [("DDIMScheduler", {**SD, "prediction_type": p, "clip_sample": False}, {"step_kwargs": {"eta": eta}})
          for p in PRED for eta in (0.0, 0.6)]
    # DDIM's default clip_sample=True: diffusers mixes the clipped x0 with the unclipped eps (the e operand)
    c += [("DDIMScheduler", {"prediction_type": p},
           {"gain": 2.5, "step_kwargs": {"eta": eta, "use_clipped_model_output": u}})
          for p in ("epsilon", "sample", "v_prediction") for eta in (0.0, 0.3) for u in (False, True)]
    c += [("DDIMScheduler", {}, {"gain": 2.5}),  # everything at its default, step(eta=0) included
          ("DDIMScheduler", {**SD, "prediction_type": "v_prediction"}, {"gain": 2.5, "step_kwargs": {"eta": 1.0}})]
    c += [("DDIMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5,
                             "prediction_type": p}, {"gain": 2.5, "step_kwargs": {"eta": eta}})
          for p in ("epsilon", "sample", "v_prediction") for eta in (0.0, 0.5)]
    c += [
          ("DDIMScheduler", {**SD, "set_alpha_to_one": False, "clip_sample": False, "timestep_spacing": "linspace"},
           {}),
          ("DDIMScheduler", {**ZSNR, "clip_sample": False}, {"step_kwargs": {"eta": 1.0}})]
    # Euler family
    grids = SPACINGS + [{"use_karras_sigmas": True}, {"use_exponential_sigmas": True, "timestep_spacing": "trailing"},
                        {"final_sigmas_type": "sigma_min"}]
    c += [("EulerDiscreteScheduler", {**SD, **g, "prediction_type": p}, {}) for p in PRED for g in grids]
    c += [("EulerDiscreteScheduler", {**SD, "use_beta_sigmas": True}, {}),
          ("EulerDiscreteScheduler", {**SD, "interpolation_type": "log_linear"}, {}),
          ("EulerDiscreteScheduler", {**SD, "timestep_type": "continuous", "prediction_type": "v_prediction"}, {}),
          ("EulerDiscreteScheduler", ZSNR, {"truth64": True}),
          ("EulerDiscreteScheduler", SD, {"steps": None, "set_kw": {"sigmas": [14.0, 7.0, 3.0, 1.2, 0.4, 0.1]}})]
    c += [("EulerAncestralDiscreteScheduler", {**SD, **sp, "prediction_type": p}, {})
          for p in ("epsilon", "v_prediction") for sp in SPACINGS]
    c += [("EulerAncestralDiscreteScheduler", ZSNR, {"truth64": True})]
    c += [("HeunDiscreteScheduler", {**SD, **g, "prediction_type": p}, {})
          for p in PRED for g in (SPACINGS[0], SPACINGS[2], {"use_karras_sigmas": True})]
    c += [("HeunDiscreteScheduler", {"clip_sample": True, "clip_sample_range": 1.5, "prediction_type": "sample"},
           {"gain": 2.5})]
    c += [("LMSDiscreteScheduler", {**SD, **g, "prediction_type": p}, {})
          for p in PRED for g in (SPACINGS[2], {"use_karras_sigmas": True}, {"use_exponential_sigmas": True})]
    c += [("LMSDiscreteScheduler", SD, {"step_kwargs": {"order": 2}})]
    # DPM-Solver++ (orders 1-3, ODE and SDE, both second-order forms)
    c += [("DPMSolverMultistepScheduler", {**SD, "algorithm_type": a, "solver_order": o, "solver_type": st}, {})
          for a in ("dpmsolver++", "sde-dpmsolver++") for o in (1, 2, 3) for st in ("midpoint", "heun")]
    dpm = [{"final_sigmas_type": "sigma_min"}, {"final_sigmas_type": "sigma_min", "algorithm_type": "sde-dpmsolver++"},
           {"lower_order_final": False, "final_sigmas_type": "sigma_min", "solver_order": 3},
           {"euler_at_final": True, "final_sigmas_type": "sigma_min"}, {"use_karras_sigmas": True, "solver_order": 3},
           {"use_exponential_sigmas": True}, {"use_lu_lambdas": True}, {"lambda_min_clipped": -5.1},
           {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
           {"prediction_type": "v_prediction"}, {"prediction_type": "sample", "algorithm_type": "sde-dpmsolver++"},
           {**SPACINGS[0]}, {**SPACINGS[1], "solver_order": 3}, ZSNR]
    c += [("DPMSolverMultistepScheduler", {**SD, **o}, {"gain": 2.5 if "thresholding" in o else 1.0}) for o in dpm]
    c += [("DPMSolverMultistepScheduler", {**SD, "solver_order": 3}, {"steps": 20}),
          ("DPMSolverMultistepScheduler", SD, {"steps": None, "set_kw": {"timesteps": [999, 850, 600, 420, 200, 50]}})]
    # UniPC
    # bh1 into sigma = 0 is 0 * inf (NaN) in diffusers: bh1 is compared on grids ending at sigma_min
    c += [("UniPCMultistepScheduler", {**SD, "solver_order": o, "solver_type": st,
                                       "final_sigmas_type": "zero" if st == "bh2" else "sigma_min"}, {})
          for o in (1, 2, 3) for st in ("bh1", "bh2")]
    uni = [{"predict_x0": False, "final_sigmas_type": "sigma_min"}, {"disable_corrector": [0, 3]},
           {"use_karras_sigmas": True, "solver_order": 3}, {"use_exponential_sigmas": True},
           {"thresholding": True, "prediction_type": "sample", "sample_max_value": 1.5},
           {"prediction_type": "v_prediction"}, {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
           {**SPACINGS[0]}, {**SPACINGS[1], "solver_order": 3}, ZSNR]
    c += [("UniPCMultistepScheduler", {**SD, **o}, {"gain": 2.5 if "thresholding" in o else 1.0}) for o in uni]
    c += [("UniPCMultistepScheduler", {**SD, "solver_order": 3}, {"steps": 20})]
    # flow matching
    c += [("FlowMatchEulerDiscreteScheduler", {"shift": s}, {}) for s in (1.0, 3.0)]
    c += [("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True, "time_shift_type": t},
           {"set_kw": {"mu": 0.8}}) for t in ("exponential", "linear")]
    c += [("FlowMatchEulerDiscreteScheduler", o, {}) for o in (
        {"shift": 3.0, "shift_terminal": 0.05}, {"shift": 3.0, "use_karras_sigmas": True},
        {"shift": 3.0, "use_exponential_sigmas": True}, {"shift": 3.0, "stochastic_sampling": True})]
    c += [("FlowMatchEulerDiscreteScheduler", {"shift": 2.0},
           {"steps": None, "set_kw": {"sigmas": [1.0, 0.8, 0.55, 0.3, 0.1]}})]
    # flow matching, Heun (two calls per step, Euler into 0; s_churn re-noises both stages' sigma)
    c += [("FlowMatchHeunDiscreteScheduler", {"shift": s}, {}) for s in (1.0, 3.0)]
    c += [("FlowMatchHeunDiscreteScheduler", {"shift": 3.0, "num_train_timesteps": 500}, {"steps": 7}),
          ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, {"step_kwargs": {"s_churn": 2.0}}),
          ("FlowMatchHeunDiscreteScheduler", {"shift": 2.0},
           {"step_kwargs": {"s_churn": 40.0, "s_tmin": 0.2, "s_tmax": 0.9, "s_noise": 1.01}})]
    return c


CASES = _cases()


def _id(case):
    name, cfg, kw = case
    short = {k: v for k, v in cfg.items() if k not in SD}
    return f"{name.replace('Scheduler', '')}-{short}-{ {k: v for k, v in kw.items() if k != 'set_kw'} }"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_trajectory_matches_stock(case, seed):
    name, cfg, kw = case
    kw = dict(kw)
    steps = kw.pop("steps", 12)
    check(name, cfg, steps, seed, **kw)


@pytest.mark.parametrize("name, cfg", [
    ("DDPMScheduler", SD), ("DDIMScheduler", {**SD, "clip_sample": False}), ("DDIMScheduler", {}),
    ("DDIMScheduler", {"thresholding": True, "prediction_type": "sample"}), ("HeunDiscreteScheduler", SD),
    ("LMSDiscreteScheduler", SD), ("UniPCMultistepScheduler", SD)])
def test_trajectory_matches_stock_fp64(name, cfg, seed):
    check(name, cfg, 12, seed, dtype=torch.float64)


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_drop_in_rows_carry_alpha_t_sigma_t(case):
    """Rows built from the scheduler's own arrays say what the model input is, in the numbers the
    row's data estimate uses (see tests/samplers/test_rows.py for the registry-wide check)."""
    from fastdiff.core.plan import x0_coeffs
    from fastdiff.samplers._common import eps_coeffs

    name, cfg, kw = case
    fu = from_diffusers(getattr(diffusers, name)(**cfg), backend="reference")
    fu.set_timesteps(kw.get("steps", 12), **(kw.get("set_kw") or {}))
    step_args = {k: v for k, v in (kw.get("step_kwargs") or {}).items() if k in fu._fd_spec.step_options}
    plan = fu.fastdiff_plan(0, **step_args)
    coeffs = eps_coeffs if plan.estimate == "eps" else x0_coeffs
    for r in plan.rows:
        assert r.alpha_t is not None and r.sigma_t is not None and r.alpha_t >= 0 and r.sigma_t >= 0
        a_x, a_e = coeffs(plan.prediction, r.alpha_t, r.sigma_t, r.in_scale)
        assert r.a_x == pytest.approx(a_x, rel=1e-12, abs=1e-12) and r.a_e == pytest.approx(a_e, rel=1e-12, abs=1e-12)


def test_every_supported_class_is_covered():
    """Each class of SUPPORT is compared with stock here or in the test file of the classes added with it."""
    from tests.integration import test_dropin_distilled_new, test_dropin_multistep_new, test_pipelines_dropin

    covered = ({c[0] for c in CASES} | set(test_dropin_distilled_new.CLASSES) | set(test_dropin_multistep_new.CLASSES)
               | set(test_pipelines_dropin.CLASSES))
    assert covered == set(SUPPORT), (sorted(set(SUPPORT) - covered), sorted(covered - set(SUPPORT)))
    assert set(SUPPORT) >= {"DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                            "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler",
                            "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"}


# ------------------------------------------------------------------------ runs that start later


@pytest.mark.parametrize("name, cfg, steps, begin", [
    ("EulerDiscreteScheduler", SD, 12, 5), ("EulerAncestralDiscreteScheduler", SD, 12, 4),
    ("HeunDiscreteScheduler", SD, 10, 3), ("DDIMScheduler", {**SD, "clip_sample": False}, 12, 5),
    ("DDPMScheduler", SD, 12, 4), ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 12, 6),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 3}, 12, 5),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 3, "algorithm_type": "sde-dpmsolver++"}, 18, 6),
    ("UniPCMultistepScheduler", {**SD, "solver_order": 3, "disable_corrector": [6, 8]}, 12, 5),
    ("UniPCMultistepScheduler", {**SD, "solver_order": 2}, 18, 7),
])
def test_begin_index_run_matches_stock(name, cfg, steps, begin, seed):
    """img2img: set_begin_index(k) and timesteps[k:], multistep warm-up restarting at k."""
    check(name, cfg, steps, seed, begin=begin)


def test_lms_late_start_falls_back_to_the_stock_step_with_a_warning(seed):
    with pytest.warns(RuntimeWarning, match="LMSDiscreteScheduler run starting at step 4"):
        check("LMSDiscreteScheduler", SD, 12, seed, begin=4)


def test_timestep_lookup_without_begin_index(seed):
    """A run that starts at timesteps[k] without set_begin_index: diffusers finds k from the timestep."""
    cls = diffusers.DPMSolverMultistepScheduler
    stock, fused = cls(**SD), from_diffusers(cls(**SD))
    f = toy_model(seed)
    trajs = []
    for s in (stock, fused):
        s.set_timesteps(10)
        x = initial_noise(seed, 1.0)
        for t in s.timesteps[3:]:
            x = s.step(f(x, t.float().expand(2)), t, x).prev_sample
        trajs.append(x)
    assert rel_err(trajs[1], trajs[0]) <= TOL


# ------------------------------------------------------------------------ drop-in behaviour


def test_same_config_attributes_and_helpers(tmp_path):
    st = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=True)
    fu = from_diffusers(st)
    assert isinstance(fu, diffusers.EulerDiscreteScheduler) and type(fu).__name__ == "EulerDiscreteScheduler"
    assert dict(fu.config) == dict(st.config)
    for s in (st, fu):
        s.set_timesteps(15)
    for attr in ("timesteps", "sigmas"):
        assert torch.equal(getattr(fu, attr), getattr(st, attr)), attr
    assert fu.init_noise_sigma == st.init_noise_sigma and fu.order == st.order
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(fu.scale_model_input(x, fu.timesteps[0]), st.scale_model_input(x, st.timesteps[0]))
    noise, t = torch.randn_like(x), fu.timesteps[3:4]
    assert torch.equal(fu.add_noise(x, noise, t), st.add_noise(x, noise, t))
    fu.save_config(tmp_path)
    back = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in st.config.items() if not k.startswith("_")}
    # signatures stay diffusers' (pipelines inspect them for eta / generator / timesteps)
    assert inspect.signature(fu.step).parameters.keys() == inspect.signature(st.step).parameters.keys()
    assert inspect.signature(fu.set_timesteps).parameters.keys() == \
        inspect.signature(st.set_timesteps).parameters.keys()


def test_heun_keeps_state_in_first_order_and_history_on_the_scheduler():
    fu = from_diffusers(diffusers.HeunDiscreteScheduler(**SD))
    fu.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    states = []
    for t in fu.timesteps:
        states.append(fu.state_in_first_order)
        x = fu.step(torch.randn_like(x), t, x).prev_sample
    assert states == [True, False, True, False, True, False, True]
    assert len(fu.fastdiff_history) == 1 and fu.fastdiff_history[0].shape == x.shape


def test_backends_agree(seed):
    for name, cfg in [("DPMSolverMultistepScheduler", {**SD, "solver_order": 3}), ("HeunDiscreteScheduler", SD)]:
        ref = check(name, cfg, 10, seed, backend="reference")
        cpu = check(name, cfg, 10, seed, backend="cpu")
        assert ref <= TOL and cpu <= TOL


def test_without_generator_the_noise_is_stocks_from_the_global_rng(seed):
    """No generator: the drop-in draws each step's noise from torch's global RNG in diffusers' own calls,
    so equally seeded runs repeat, and equal the stock scheduler's at every batch size (they used to be
    in-kernel Philox: reproducible, batch-independent, and not stock's)."""
    cls = diffusers.EulerAncestralDiscreteScheduler
    f = toy_model(seed)

    def sample(sched, batch):
        torch.manual_seed(seed)
        sched.set_timesteps(8)
        x = initial_noise(seed, float(sched.init_noise_sigma))[:batch]
        for t in sched.timesteps:
            x = sched.step(f(sched.scale_model_input(x, t), t.float().expand(batch)), t, x).prev_sample
        return x

    for batch in (2, 1):
        a, b = sample(from_diffusers(cls(**SD)), batch), sample(from_diffusers(cls(**SD)), batch)
        assert torch.equal(a, b) and torch.isfinite(a).all()
        assert rel_err(a, sample(cls(**SD), batch)) <= TOL


def test_variance_noise_is_used_as_given(seed):
    cls = diffusers.DPMSolverMultistepScheduler
    cfg = {**SD, "algorithm_type": "sde-dpmsolver++"}
    st, fu = cls(**cfg), from_diffusers(cls(**cfg))
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(2, 3, 4, 5, generator=g) for _ in range(8)]
    f = toy_model(seed)
    outs = []
    for s in (st, fu):
        s.set_timesteps(8)
        x = initial_noise(seed, 1.0)
        for t, z in zip(s.timesteps, zs):
            x = s.step(f(x, t.float().expand(2)), t, x, variance_noise=z).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= TOL


def test_return_dict_false_gives_a_tuple():
    fu = from_diffusers(diffusers.DDIMScheduler(clip_sample=False))
    fu.set_timesteps(5)
    x = torch.randn(1, 2, 3, 3)
    out = fu.step(torch.randn_like(x), fu.timesteps[0], x, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == x.shape


# ------------------------------------------------------------------------ what is refused


UNSUPPORTED = "DDIMParallelScheduler"  # a diffusers class SUPPORT lacks


def test_unsupported_class_is_named():
    assert UNSUPPORTED not in SUPPORT and hasattr(diffusers, UNSUPPORTED)
    with pytest.raises(TypeError, match=f"does not support scheduler class .*{UNSUPPORTED}"):
        from_diffusers(getattr(diffusers, UNSUPPORTED)())


@pytest.mark.parametrize("cls, cfg, match", [
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min",
                                     "solver_order": 3}, "solver_order=3"),
    ("DPMSolverMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "predict_x0": False},
     "predict_x0"),
    ("EulerAncestralDiscreteScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
])
def test_unsupported_config_values_are_named(cls, cfg, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers(getattr(diffusers, cls)(**cfg))


def test_unknown_config_key_is_named():
    s = diffusers.EulerDiscreteScheduler()
    s.register_to_config(some_future_option=3)
    with pytest.raises(ValueError, match="'some_future_option'"):
        from_diffusers(s)


@pytest.mark.parametrize("cls, cfg, bad, match", [
    ("DDPMScheduler", {"variance_type": "fixed_large_log"}, 0, "fixed_large_log"),  # sqrt(log(beta)) where t > 0
    ("UniPCMultistepScheduler", {"solver_order": 3, "lower_order_final": False}, 9, "lower_order_final"),
    ("UniPCMultistepScheduler", {"predict_x0": False}, 9, "predict_x0"),
])
def test_steps_the_rows_cannot_express_are_refused_when_they_run(cls, cfg, bad, match, seed):
    """diffusers' step gives NaN at step ``bad`` only (UniPC: the last, into sigma = 0; DDPM's
    fixed_large_log wherever it draws noise): set_timesteps plans the run, every other step matches
    the stock one, and that step is refused by name when it runs."""
    stock, fused = getattr(diffusers, cls)(**cfg), from_diffusers(getattr(diffusers, cls)(**cfg))
    f = toy_model(seed)
    for s in (stock, fused):
        s.set_timesteps(10)
    x = initial_noise(seed, 1.0)
    for i, t in enumerate(stock.timesteps):
        m = f(x, t.float().expand(2))
        if i == bad:
            try:  # stock: NaN/inf, or a failure (UniPC's order-3 corrector into sigma = 0: a singular solve)
                assert not torch.isfinite(stock.step(m, t, x).prev_sample).all()
            except RuntimeError:
                pass
            with pytest.raises(ValueError, match=match):
                fused.step(m, t, x)
            break
        ref = stock.step(m, t, x, **({"generator": torch.Generator().manual_seed(i)} if cls == "DDPMScheduler" else {}))
        got = fused.step(m, t, x, **({"generator": torch.Generator().manual_seed(i)} if cls == "DDPMScheduler" else {}))
        assert rel_err(got.prev_sample, ref.prev_sample) <= TOL
        x = ref.prev_sample
    if cls == "DDPMScheduler":  # its last step (t = 0) draws no noise: finite, and run as in stock
        t = stock.timesteps[-1]
        m = f(x, t.float().expand(2))
        assert rel_err(fused.step(m, t, x).prev_sample, stock.step(m, t, x).prev_sample) <= TOL


def test_unsupported_step_arguments_are_named():
    x = torch.randn(1, 2, 3, 3)
    fl = from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler())
    fl.set_timesteps(5)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        fl.step(x, fl.timesteps[0], x, per_token_timesteps=torch.ones(1))
    dd = from_diffusers(diffusers.DDPMScheduler(clip_sample=False))  # (DDIM steps from any integer timestep)
    dd.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep=3"):
        dd.step(x, 3, x)


def test_support_table_names_every_class():
    table = support_table()
    for name in SUPPORT:
        assert name in table
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from_diffusers(diffusers.DDIMScheduler())


def test_generator_list_draws_per_sample_like_diffusers(seed):
    cls = diffusers.EulerAncestralDiscreteScheduler
    st, fu = cls(**SD), from_diffusers(cls(**SD))
    f = toy_model(seed)
    outs = []
    for s in (st, fu):
        s.set_timesteps(6)
        x = initial_noise(seed, float(s.init_noise_sigma))
        gens = [torch.Generator().manual_seed(seed + k) for k in range(2)]
        for t in s.timesteps:
            x = s.step(f(s.scale_model_input(x, t), t.float().expand(2)), t, x, generator=gens).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= TOL


def test_import_fastdiff_does_not_import_diffusers_and_the_module_sees_the_real_package():
    import subprocess
    import sys

    code = ("import sys, fastdiff, fastdiff.k_diffusion, fastdiff.diffusers\n"
            "heavy = [m for m in ('diffusers', 'transformers', 'k_diffusion') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "fastdiff.diffusers.support._spec_of(__import__('diffusers').DDIMScheduler)\n"
            "assert sys.modules['diffusers'].__file__.endswith('diffusers/__init__.py'), sys.modules['diffusers']\n"
            "assert sys.modules['diffusers'] is not fastdiff.diffusers\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_unipc_bh1_into_sigma_zero_is_the_finite_limit_where_diffusers_gives_nan(seed):
    cls = diffusers.UniPCMultistepScheduler
    cfg = {**SD, "solver_type": "bh1"}
    st, fu = cls(**cfg), from_diffusers(cls(**cfg))
    f = toy_model(seed)
    x = initial_noise(seed, 1.0)
    ref, got = run(st, f, x, 8), run(fu, f, x, 8)
    assert_close_traj(got[:-1], ref[:-1], TOL, what="unipc bh1 before the last step")
    assert torch.isnan(ref[-1]).all() and torch.isfinite(got[-1]).all()


def test_step_before_set_timesteps_behaves_like_diffusers(seed):
    x = initial_noise(seed, 1.0)
    with pytest.raises(ValueError, match="set_timesteps"):
        from_diffusers(diffusers.DPMSolverMultistepScheduler()).step(x, 999, x)
    # DDPM steps on its training grid without set_timesteps (prev = t - 1), as diffusers does
    st, fu = diffusers.DDPMScheduler(), from_diffusers(diffusers.DDPMScheduler())
    f = toy_model(seed)
    outs = []
    for s in (st, fu):
        y = x.clone()
        for t in (999, 998, 997):
            g = torch.Generator().manual_seed(seed)
            y = s.step(f(y, torch.full((2,), float(t))), t, y, generator=g).prev_sample
        outs.append(y)
    assert rel_err(outs[1], outs[0]) <= TOL
