"""Regression tests for divergences between fastdiff.diffusers drop-ins and the stock diffusers
schedulers, found by randomized parity fuzzing (configs, shapes, dtypes, step arguments).

Each test compares against the stock scheduler on fresh random inputs (``seed`` fixture) or checks
that an option diffusers' step does not implement is refused with a ``ValueError`` naming it.
"""

import inspect

import numpy as np
import pytest
import torch

from tests.samplers._harness import SD, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
from fastdiff.diffusers import from_diffusers  # noqa: E402

from .test_diffusers_schedulers import TOL, check  # noqa: E402


def _loop(sched, model, x, steps, *, seed, set_kw=None, mdtype=None, step_kwargs=None, return_dict=True):
    """The diffusers loop with the model output cast to ``mdtype`` (a half-precision UNet on float32
    latents); the state after every step."""
    if steps is None:
        sched.set_timesteps(**(set_kw or {}))
    else:
        sched.set_timesteps(steps, **(set_kw or {}))
    kw = dict(step_kwargs or {})
    if "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(seed)
    out = []
    for t in sched.timesteps:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = model(u, t.to(x.dtype).expand(x.shape[0]))
        if mdtype is not None:
            m = m.to(mdtype)
        r = sched.step(m, t, x, return_dict=return_dict, **kw)
        x = r.prev_sample if return_dict else r[0]
        out.append(x)
    return out


# ------------------------------------------------------------------------ constructor grid


@pytest.mark.parametrize("cls, cfg", [
    # LMS/Heun call set_timesteps(num_train_timesteps) in __init__; with leading spacing and a
    # steps_offset that grid runs past the last training timestep (repeated sigmas: no LMS
    # coefficients), which pipelines never step on: from_diffusers must not refuse the scheduler
    ("LMSDiscreteScheduler", {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2",
                              "timestep_spacing": "leading", "steps_offset": 2}),
    ("LMSDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}),
])
def test_from_diffusers_accepts_a_constructor_grid_no_run_uses(cls, cfg, seed):
    from_diffusers(getattr(diffusers, cls)(**cfg))  # did raise "non-finite coefficient"
    check(cls, cfg, 15, seed)


# ------------------------------------------------------------------------ prediction types


def test_euler_original_sample_is_sample(seed):
    """EulerDiscreteScheduler accepts prediction_type="original_sample" (same as "sample")."""
    check("EulerDiscreteScheduler", {**SD, "prediction_type": "original_sample"}, 10, seed)


@pytest.mark.parametrize("cls, pred", [("EulerAncestralDiscreteScheduler", "sample"),
                                       ("EulerAncestralDiscreteScheduler", "original_sample"),
                                       ("HeunDiscreteScheduler", "original_sample"),
                                       ("LMSDiscreteScheduler", "original_sample"),
                                       ("DDIMScheduler", "original_sample")])
def test_prediction_types_the_stock_step_rejects_are_refused(cls, pred):
    """diffusers' step raises for these (EulerAncestral: NotImplementedError for "sample"); the
    drop-in refuses them up front, naming the option, instead of sampling something else."""
    with pytest.raises(ValueError, match=f"prediction_type='{pred}'"):
        from_diffusers(getattr(diffusers, cls)(prediction_type=pred))


# ------------------------------------------------------------------------ noise dtype


@pytest.mark.parametrize("name, cfg, mdtype, step_kwargs", [
    ("EulerAncestralDiscreteScheduler", SD, torch.float16, None),
    ("DDPMScheduler", {**SD, "clip_sample": False}, torch.bfloat16, None),
    ("DDIMScheduler", {**SD, "clip_sample": False}, torch.float16, {"eta": 0.7}),
    ("EulerDiscreteScheduler", SD, torch.bfloat16, None),
    # DPM-Solver returns the dtype of its converted model output: float32 here (x0 from the sample) ...
    ("DPMSolverMultistepScheduler", {**SD, "algorithm_type": "sde-dpmsolver++"}, torch.bfloat16, None),
    # ... and the model output's own dtype for prediction_type="sample"
    ("DPMSolverMultistepScheduler", {**SD, "prediction_type": "sample"}, torch.float16, None),
    ("UniPCMultistepScheduler", SD, torch.bfloat16, None),
    ("HeunDiscreteScheduler", SD, torch.float16, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "stochastic_sampling": True}, torch.float16, None),
])
def test_half_precision_model_output_on_float32_latents(name, cfg, mdtype, step_kwargs, seed):
    """float32 latents and a half-precision model output: diffusers draws the step noise in the
    model output's dtype (DPM-Solver and flow in float32); the drop-in drew it in the promoted
    compute dtype (other numbers from the same generator: errors of order 1, not of rounding). And
    the output dtype is diffusers' (DPM-Solver: that of its converted model output).

    Both schedulers step from the stock state with the same model output, so each step differs by
    the rounding of the half-precision operands only."""
    cls = getattr(diffusers, name)
    stock, fused = cls(**cfg), from_diffusers(cls(**cfg))
    model = toy_model(seed)
    for s in (stock, fused):
        s.set_timesteps(8)
    x = initial_noise(seed, float(getattr(stock, "init_noise_sigma", 1.0)))
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(2)]
    takes_gen = "generator" in inspect.signature(stock.step).parameters
    eps = torch.finfo(mdtype).eps
    for t in stock.timesteps:
        u = stock.scale_model_input(x, t) if hasattr(stock, "scale_model_input") else x
        if hasattr(fused, "scale_model_input"):
            fused.scale_model_input(x, t)
        m = model(u, t.float().expand(x.shape[0])).to(mdtype)
        outs = [s.step(m, t, x, **({"generator": g} if takes_gen else {}), **(step_kwargs or {})).prev_sample
                for s, g in zip((stock, fused), gens)]
        assert outs[1].dtype == outs[0].dtype
        assert rel_err(outs[1], outs[0]) <= 2 * eps, (float(t), rel_err(outs[1], outs[0]))
        x = outs[0]


# ------------------------------------------------------------------------ use_flow_sigmas


FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}


@pytest.mark.parametrize("name, cfg, set_kw", [
    # SANA / Wan style: DPM-Solver++ and UniPC on the flow grid (alpha = 1 - s, sigma_t = s)
    ("DPMSolverMultistepScheduler", FLOW, None),
    ("DPMSolverMultistepScheduler", {**FLOW, "solver_order": 3, "final_sigmas_type": "sigma_min"}, None),
    ("DPMSolverMultistepScheduler", {**FLOW, "algorithm_type": "sde-dpmsolver++"}, None),
    ("DPMSolverMultistepScheduler", {**FLOW, "use_dynamic_shifting": True}, {"mu": 0.9}),
    ("DPMSolverMultistepScheduler", {**FLOW, "prediction_type": "sample"}, None),
    ("DPMSolverMultistepScheduler", {**FLOW, "prediction_type": "epsilon", "final_sigmas_type": "sigma_min"}, None),
    ("UniPCMultistepScheduler", FLOW, None),
    ("UniPCMultistepScheduler", {**FLOW, "solver_order": 3, "use_karras_sigmas": True}, None),
    ("UniPCMultistepScheduler", {**FLOW, "shift_terminal": 0.1, "use_dynamic_shifting": True}, {"mu": 0.7}),
    ("UniPCMultistepScheduler", {**FLOW, "final_sigmas_type": "sigma_min", "solver_type": "bh1"}, None),
])
def test_flow_sigmas_match_stock(name, cfg, set_kw, seed):
    check(name, cfg, 10, seed, set_kw=set_kw)


def test_unipc_flow_sigmas_with_custom_sigmas(seed):
    # diffusers' UniPC needs an array here (it computes with the sigmas before converting a list)
    sigmas = np.array([0.95, 0.8, 0.6, 0.42, 0.25, 0.1])
    check("UniPCMultistepScheduler", FLOW, None, seed, set_kw={"sigmas": sigmas})


def test_flow_sigmas_img2img_begin_index(seed):
    check("DPMSolverMultistepScheduler", {**FLOW, "solver_order": 3}, 12, seed, begin=4)


# ------------------------------------------------------------------------ Euler churn


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("churn", [
    {"s_churn": 0.8},
    {"s_churn": 30.0, "s_tmin": 0.4, "s_tmax": 6.0, "s_noise": 1.003},  # gamma capped at sqrt(2) - 1
    {"s_churn": -2.0},  # negative: sigma_hat < sigma, no noise (diffusers takes it as given)
])
def test_euler_churn_matches_stock(pred, churn, seed):
    """EulerDiscreteScheduler.step(s_churn > 0, s_tmin, s_tmax, s_noise): noise added to the sample
    before the Euler step from sigma_hat, drawn from the generator like diffusers."""
    check("EulerDiscreteScheduler", {**SD, "prediction_type": pred}, 10, seed, step_kwargs=churn)


def test_euler_churn_with_karras_img2img_and_log_linear(seed):
    check("EulerDiscreteScheduler", {**SD, "use_karras_sigmas": True}, 12, seed, begin=3,
          step_kwargs={"s_churn": 1.5, "s_tmax": 10.0})
    # log_linear keeps one more sigma: gamma divides s_churn by len(sigmas) - 1 as diffusers does
    check("EulerDiscreteScheduler", {**SD, "interpolation_type": "log_linear"}, 8, seed, step_kwargs={"s_churn": 1.0})


def test_euler_churn_half_precision_model_output(seed):
    cls = diffusers.EulerDiscreteScheduler
    stock, fused = cls(**SD), from_diffusers(cls(**SD))
    model = toy_model(seed)
    for s in (stock, fused):
        s.set_timesteps(6)
    x = initial_noise(seed, float(stock.init_noise_sigma))
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(2)]
    for t in stock.timesteps:
        u = stock.scale_model_input(x, t)
        fused.scale_model_input(x, t)
        m = model(u, t.float().expand(x.shape[0])).to(torch.float16)
        outs = [s.step(m, t, x, s_churn=2.0, generator=g).prev_sample for s, g in zip((stock, fused), gens)]
        assert outs[1].dtype == outs[0].dtype == torch.float16
        assert rel_err(outs[1], outs[0]) <= 2e-3
        x = outs[0]


def test_euler_churn_arguments_cannot_change_mid_run():
    fu = from_diffusers(diffusers.EulerDiscreteScheduler(**SD))
    fu.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    fu.step(x, fu.timesteps[0], x, s_churn=1.0, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="differ from earlier steps"):
        fu.step(x, fu.timesteps[1], x, s_churn=2.0)


# ------------------------------------------------------------------------ noise-prediction DPM-Solver


@pytest.mark.parametrize("algo", ["dpmsolver", "sde-dpmsolver"])
@pytest.mark.parametrize("order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_dpmsolver_noise_prediction_matches_stock(algo, order, solver_type, pred, seed):
    """algorithm_type "dpmsolver" / "sde-dpmsolver" (diffusers refuses final_sigmas_type="zero" for them)."""
    if algo == "sde-dpmsolver" and order == 3:
        pytest.skip("diffusers has no third-order sde-dpmsolver update (refused: see the refusal tests)")
    cfg = {**SD, "algorithm_type": algo, "solver_order": order, "solver_type": solver_type, "prediction_type": pred,
           "final_sigmas_type": "sigma_min"}
    check("DPMSolverMultistepScheduler", cfg, 10, seed)


@pytest.mark.parametrize("cfg", [
    # thresholding converts eps -> x0 -> clip -> eps, as diffusers does
    {"algorithm_type": "dpmsolver", "thresholding": True, "sample_max_value": 1.5, "prediction_type": "sample"},
    {"algorithm_type": "sde-dpmsolver", "thresholding": True, "dynamic_thresholding_ratio": 0.9},
    {"algorithm_type": "dpmsolver", "solver_order": 3, "use_karras_sigmas": True},
    {"algorithm_type": "dpmsolver", "solver_order": 3, "lower_order_final": False},
    {"algorithm_type": "dpmsolver", "use_lu_lambdas": True},  # ends on a repeated sigma_min (h = 0)
    {"algorithm_type": "dpmsolver", "euler_at_final": True, "timestep_spacing": "trailing"},
])
def test_dpmsolver_options_match_stock(cfg, seed):
    cfg = {**SD, "final_sigmas_type": "sigma_min", **cfg}
    # thresholding's quantile makes the last steps sensitive to rounding (1 seed in ~40 gave 1.04e-5 against
    # the stock, while 10x closer to the fp64 run): judged against fp64 there, as check(truth64=) explains
    thr = bool(cfg.get("thresholding"))
    check("DPMSolverMultistepScheduler", cfg, 12, seed, gain=2.5 if thr else 1.0, truth64=thr)


def test_dpmsolver_img2img_and_variance_noise(seed):
    cfg = {**SD, "algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}
    check("DPMSolverMultistepScheduler", {**cfg, "solver_order": 2}, 12, seed, begin=4)
    cls = diffusers.DPMSolverMultistepScheduler
    st, fu = cls(**cfg), from_diffusers(cls(**cfg))
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(2, 3, 4, 5, generator=g) for _ in range(6)]
    f = toy_model(seed)
    outs = []
    for s in (st, fu):
        s.set_timesteps(6)
        x = initial_noise(seed, 1.0)
        for t, z in zip(s.timesteps, zs):
            x = s.step(f(x, t.float().expand(2)), t, x, variance_noise=z).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= TOL


# ------------------------------------------------------------------------ step outputs


@pytest.mark.parametrize("name, cfg, step_kwargs", [
    ("DDPMScheduler", {**SD, "clip_sample": True, "clip_sample_range": 0.7}, None),
    ("DDPMScheduler", {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.3}, None),
    ("DDIMScheduler", {"prediction_type": "v_prediction"}, {"eta": 0.5}),
    ("DDIMScheduler", {"prediction_type": "sample", "clip_sample": False}, None),
    ("EulerDiscreteScheduler", SD, None),
    ("EulerDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}, {"s_churn": 2.0}),
    ("EulerAncestralDiscreteScheduler", SD, None),
    ("HeunDiscreteScheduler", {**SD, "clip_sample": True, "prediction_type": "sample"}, None),
    ("LMSDiscreteScheduler", {**SD, "prediction_type": "v_prediction"}, None),
    ("DPMSolverMultistepScheduler", SD, None),
    ("UniPCMultistepScheduler", SD, None),
    ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, None),
])
@pytest.mark.parametrize("return_dict", [True, False])
def test_step_output_is_diffusers_own(name, cfg, step_kwargs, return_dict, seed):
    """The output class (or tuple length) of diffusers' step, with pred_original_sample where diffusers
    returns it (pipelines read it: LEDITS++, SAG; PixArt's one-step path takes step(...)[1])."""
    cls = getattr(diffusers, name)
    stock, fused = cls(**cfg), from_diffusers(cls(**cfg))
    model = toy_model(seed, gain=2.5)
    x = initial_noise(seed, 1.0)
    for s in (stock, fused):
        s.set_timesteps(6)
    x = x * float(getattr(stock, "init_noise_sigma", 1.0))
    takes_gen = "generator" in inspect.signature(stock.step).parameters
    gens = [torch.Generator().manual_seed(seed + 1) for _ in range(2)]
    for t in stock.timesteps:
        u = stock.scale_model_input(x, t) if hasattr(stock, "scale_model_input") else x
        if hasattr(fused, "scale_model_input"):
            fused.scale_model_input(x, t)
        m = model(u, t.float().expand(x.shape[0]))
        outs = [s.step(m, t, x, return_dict=return_dict, **({"generator": g} if takes_gen else {}),
                       **(step_kwargs or {})) for s, g in zip((stock, fused), gens)]
        ref, got = outs
        if return_dict:
            assert type(got).__name__ == type(ref).__name__ and isinstance(got, type(ref))
            assert list(got.keys()) == list(ref.keys())
            pairs = [(got.prev_sample, ref.prev_sample)]
            if "pred_original_sample" in ref.keys():
                pairs.append((got.pred_original_sample, ref.pred_original_sample))
                assert got["pred_original_sample"] is got.pred_original_sample and len(got.to_tuple()) == 2
        else:
            assert isinstance(got, tuple) and len(got) == len(ref)
            a, *rest = got  # unpacking gives every entry
            assert a is got[0] and all(r is g for r, g in zip(rest, got[1:]))
            pairs = list(zip(got, ref))
        for g, r in pairs:
            assert g.dtype == r.dtype and g.shape == r.shape
            assert rel_err(g, r) <= TOL
        x = ref[0] if not return_dict else ref.prev_sample


def test_pred_original_sample_is_computed_only_when_read():
    fu = from_diffusers(diffusers.DDIMScheduler(clip_sample=False))
    fu.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    out = fu.step(torch.randn_like(x), fu.timesteps[0], x)
    assert out.__dict__["_fd_x0"] is not None and list(out.keys()) == ["prev_sample", "pred_original_sample"]
    assert out.__dict__["_fd_x0"] is None  # keys() computed it, once
    tup = fu.step(torch.randn_like(x), fu.timesteps[1], x, return_dict=False)
    assert tup[0].shape == x.shape and tup._fd_x0 is not None


def test_churn_without_generator_is_the_stock_step_from_the_global_rng():
    """Without a generator diffusers draws the churn noise from torch's global RNG: so does the drop-in,
    and its pred_original_sample (the churned sample's estimate) is stock's (it was refused while the
    drop-in drew Philox noise inside the kernel)."""
    x = torch.randn(2, 2, 3, 3)
    m = torch.randn_like(x)
    outs = []
    for s in (diffusers.EulerDiscreteScheduler(**SD), from_diffusers(diffusers.EulerDiscreteScheduler(**SD))):
        s.set_timesteps(4)
        torch.manual_seed(1234)
        o = s.step(m, s.timesteps[0], x, s_churn=1.0)
        outs.append((o.prev_sample, o.pred_original_sample, torch.randn(1)))  # and the RNG left as stock leaves it
    (p0, x0, r0), (p1, x1, r1) = outs
    assert rel_err(p1, p0) <= TOL and rel_err(x1, x0) <= TOL and torch.equal(r1, r0)


def test_euler_churn_with_sigma_hat_at_zero_is_refused_clearly():
    """s_churn = -(len(sigmas) - 1) makes sigma_hat = 0, where diffusers divides by it (NaN)."""
    fu = from_diffusers(diffusers.EulerDiscreteScheduler(**SD))
    fu.set_timesteps(2)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="sigma_hat"):
        fu.step(x, fu.timesteps[0], x, s_churn=-2.0)


# ------------------------------------------------------------------------ flow: invert_sigmas


@pytest.mark.parametrize("cfg, set_kw", [
    ({"invert_sigmas": True, "shift": 3.0}, None),
    ({"invert_sigmas": True, "shift": 1.0, "stochastic_sampling": True}, None),
    ({"invert_sigmas": True, "use_dynamic_shifting": True, "time_shift_type": "linear"}, {"mu": 0.8}),
    ({"invert_sigmas": True, "shift": 2.0, "use_karras_sigmas": True}, None),
])
def test_flow_invert_sigmas_matches_stock(cfg, set_kw, seed):
    """invert_sigmas=True (sigmas rise from 0 to 1): diffusers' x + (s' - s) v as rows."""
    check("FlowMatchEulerDiscreteScheduler", cfg, 10, seed, set_kw=set_kw)
    check("FlowMatchEulerDiscreteScheduler", cfg, 10, seed, set_kw=set_kw, begin=3)


# ------------------------------------------------------------------------ the drop-in class itself


@pytest.mark.parametrize("name, cfg", [
    ("DDIMScheduler", {"clip_sample": False}),
    ("LMSDiscreteScheduler", {**SD, "timestep_spacing": "leading", "steps_offset": 1}),
    ("DPMSolverMultistepScheduler", {**SD, "solver_order": 3})])
def test_drop_in_class_from_config_constructor_and_pickle(name, cfg, seed, tmp_path):
    """``type(drop_in).from_config(...)`` / ``from_pretrained`` / its constructor (pipelines swap
    schedulers this way) gave an object without the drop-in's state (AttributeError at step), and
    pickle found diffusers' class under the drop-in's name (PicklingError)."""
    import pickle

    stock = getattr(diffusers, name)(**cfg)
    fu = from_diffusers(stock)
    fu.save_config(tmp_path)
    made = [type(fu).from_config(fu.config), type(fu)(**cfg), type(fu).from_pretrained(tmp_path)]
    model = toy_model(seed)
    for s in made:
        public = [{k: v for k, v in c.items() if not k.startswith("_")} for c in (s.config, stock.config)]
        assert type(s) is type(fu) and public[0] == public[1]
        ref, got = (_loop(sch, model, initial_noise(seed, 1.0), 8, seed=seed)
                    for sch in (getattr(diffusers, name)(**cfg), s))
        assert all(rel_err(g, r) <= TOL for g, r in zip(got, ref))
    # pickling (and deepcopy) mid-run keeps the run: the history ring and the step index
    fu.set_timesteps(8)
    x = initial_noise(seed, 1.0)
    for t in fu.timesteps[:3]:
        x = fu.step(model(x, t.float().expand(2)), t, x).prev_sample
    back = pickle.loads(pickle.dumps(fu))
    assert type(back) is type(fu)
    for t in fu.timesteps[3:]:
        m = model(x, t.float().expand(2))
        a, b = fu.step(m, t, x).prev_sample, back.step(m, t, x).prev_sample
        assert torch.equal(a, b)
        x = a


def test_drop_in_class_refuses_unsupported_configs_when_constructed():
    fused_cls = type(from_diffusers(diffusers.EulerAncestralDiscreteScheduler()))
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        fused_cls(prediction_type="sample")


# ------------------------------------------------------------------------ DDPM learned variances


def _learned_model(seed, variance_type):
    f = toy_model(seed)

    def model(u, t):
        mean = f(u, t)
        v = torch.tanh(0.4 * u + 0.1)  # in [-1, 1], as learned_range expects
        return torch.cat([mean, v.abs() * 0.02 if variance_type == "learned" else v], dim=1)

    return model


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
@pytest.mark.parametrize("cfg", [{"prediction_type": "epsilon", "clip_sample": False},
                                 {"prediction_type": "sample", "clip_sample": True},
                                 {"prediction_type": "v_prediction", "thresholding": True, "clip_sample": False},
                                 {"timestep_spacing": "trailing", "clip_sample": False}])
@pytest.mark.parametrize("with_generator", [True, False])
def test_ddpm_learned_variance_matches_stock(variance_type, cfg, with_generator, seed):
    """DeepFloyd IF's DDPMScheduler(variance_type="learned_range"): the model output carries
    [mean; variance] channels; the learned standard deviation scales the noise per element (without
    a generator both draw it from torch's global RNG)."""
    cls = diffusers.DDPMScheduler
    cfg = {**cfg, "variance_type": variance_type}
    model = _learned_model(seed, variance_type)
    trajs = []
    for s in (cls(**cfg), from_diffusers(cls(**cfg))):
        s.set_timesteps(10)
        x = initial_noise(seed, 1.0)
        g = torch.Generator().manual_seed(seed + 1) if with_generator else None
        torch.manual_seed(seed + 2)
        out = []
        for t in s.timesteps:
            r = s.step(model(x, t.float().expand(x.shape[0])), t, x, generator=g)
            x = r.prev_sample
            out += [x, r.pred_original_sample]
        trajs.append(out)
    for i, (g, r) in enumerate(zip(trajs[1], trajs[0])):
        assert rel_err(g, r) <= TOL, (i, rel_err(g, r))


def test_ddpm_learned_variance_needs_the_variance_channels():
    fu = from_diffusers(diffusers.DDPMScheduler(variance_type="learned_range"))
    fu.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="variance channels"):
        fu.step(torch.randn_like(x), fu.timesteps[0], x)


@pytest.mark.parametrize("algo", ["dpmsolver++", "sde-dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_dpm_learned_variance_keeps_the_first_three_channels(algo, variance_type, seed):
    """DPMSolverMultistep with a learned variance (pixel-space eps models): diffusers steps with
    model_output[:, :3]."""
    cls = diffusers.DPMSolverMultistepScheduler
    cfg = {**SD, "variance_type": variance_type, "algorithm_type": algo, "final_sigmas_type": "sigma_min"}
    f = toy_model(seed, shape=(2, 3, 4, 5))
    outs = []
    for s in (cls(**cfg), from_diffusers(cls(**cfg))):
        s.set_timesteps(8)
        x = initial_noise(seed, 1.0, shape=(2, 3, 4, 5))
        g = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            m = f(x, t.float().expand(2))
            x = s.step(torch.cat([m, torch.tanh(m)], dim=1), t, x, generator=g).prev_sample
        outs.append(x)
    assert rel_err(outs[1], outs[0]) <= TOL


@pytest.mark.parametrize("name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                                  "FlowMatchEulerDiscreteScheduler"])
@pytest.mark.parametrize("timestep", [lambda ts: 3, lambda ts: torch.tensor(3), lambda ts: ts[0].long()])
def test_integer_timesteps_are_refused_like_diffusers(name, timestep):
    """diffusers refuses integer timesteps there (indices from enumerate by mistake); the drop-in
    stepped on (Euler) or failed with an IndexError (flow)."""
    fu = from_diffusers(getattr(diffusers, name)())
    fu.set_timesteps(5)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="integer indices"):
        fu.step(x, timestep(fu.timesteps), x)


# ------------------------------------------------------------------------ float32 accuracy of the rows


@pytest.mark.parametrize("name, cfg, steps", [
    # Heun's second stage into a small sigma: (x - d) / sigma' with d ~ x, scaled by ~1800
    ("HeunDiscreteScheduler", {**SD, "beta_start": 0.0001, "beta_end": 0.02, "use_beta_sigmas": True,
                               "steps_offset": 1}, 2),
    # Euler from the cosine schedule's sigma ~ 1e4 down to O(1)
    ("EulerDiscreteScheduler", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 3),
    # DDIM at t = 999 of the cosine schedule: x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), abar ~ 1e-8
    ("DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False, "timestep_spacing": "trailing"}, 4),
])
def test_unclipped_rows_fold_the_data_estimate_in_float64(name, cfg, steps, seed):
    """``c_x x + c_d d`` with ``d = a_x x + a_e e`` cancelled in float32 where ``c_d a_x ~ -c_x`` is
    large (errors of 1e-4 against the same run in float64, more than diffusers' own); the rows now
    carry ``(c_x + c_d a_x) x + c_d a_e e``, multiplied out in float64."""
    cls = getattr(diffusers, name)
    f = toy_model(seed, gain=2.5)
    runs = []
    for dt, backend in ((torch.float32, "auto"), (torch.float64, "reference")):
        s = from_diffusers(cls(**cfg), backend=backend)
        s.set_timesteps(steps)
        x = initial_noise(seed, float(s.init_noise_sigma)).to(dt)
        out = []
        for t in s.timesteps:
            u = s.scale_model_input(x, t) if hasattr(s, "scale_model_input") else x
            x = s.step(f(u, t.to(dt).expand(2)), t, x).prev_sample
            out.append(x)
        runs.append(out)
    for i, (a, b) in enumerate(zip(*runs)):
        assert rel_err(a, b) <= 3e-6, (i, rel_err(a, b))


def test_model_output_of_another_shape_is_refused_clearly():
    fu = from_diffusers(diffusers.DPMSolverMultistepScheduler(variance_type="learned"))
    fu.set_timesteps(4)
    x = torch.randn(1, 4, 3, 3)  # a 4-channel sample: diffusers keeps channels [:3] of the output
    with pytest.raises(ValueError, match="does not match sample"):
        fu.step(torch.randn(1, 8, 3, 3), fu.timesteps[0], x)


def test_ddim_eta_one_on_zero_terminal_snr_is_not_refused(seed):
    """eta = 1 at zero SNR's abar = 0 makes 1 - abar_prev - std^2 exactly 0; computed as a difference
    it rounded below 0 on some grids, and the drop-in refused a config diffusers runs."""
    for cfg, steps in [({"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0005, "beta_end": 0.03,
                         "timestep_spacing": "trailing", "steps_offset": 1}, 29),
                       ({"num_train_timesteps": 200, "beta_schedule": "scaled_linear", "timestep_spacing": "linspace",
                         "steps_offset": 2}, 19)]:
        cfg = {**cfg, "rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "clip_sample": False}
        check("DDIMScheduler", cfg, steps, seed, step_kwargs={"eta": 1.0})


def test_sde_dpmsolver_repeated_final_sigma_has_no_noise(seed):
    """use_lu_lambdas ends on sigma_min twice, the float32 values one bit apart (h ~ -1e-7): diffusers'
    noise coefficient rounds to 0 there; the drop-in refused the run (square root of h < 0: a math
    domain error for sde-dpmsolver++)."""
    cfg = {"num_train_timesteps": 100, "beta_schedule": "linear", "beta_start": 0.0005, "beta_end": 0.012,
           "rescale_betas_zero_snr": True, "prediction_type": "sample", "algorithm_type": "sde-dpmsolver",
           "final_sigmas_type": "sigma_min", "use_lu_lambdas": True}
    check("DPMSolverMultistepScheduler", cfg, 6, seed)
    check("DPMSolverMultistepScheduler", {**cfg, "algorithm_type": "sde-dpmsolver++"}, 6, seed)
