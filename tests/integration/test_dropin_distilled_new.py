"""Drop-ins of LCM, TCD, FlowMatchLCM, EDMEuler, EDMDPMSolverMultistep, KDPM2, KDPM2Ancestral,
DPMSolverSDE and SASolver against stock diffusers, and their native samplers (``lcm``, ``tcd``,
``flow_lcm``, ``sa_solver``; ``euler`` / ``dpmpp_*`` with EDM's preconditioning as rows;
``dpm_2``, ``dpm_2_ancestral``) through ``fastdiff.sample``.

Trajectory tests follow ``test_diffusers_schedulers.check``: the stock scheduler and its drop-in
run side by side in the diffusers loop (``scale_model_input`` -> nonlinear toy model -> ``step``
with a generator; DPMSolverSDE: its own seeded Brownian tree) from the same random initial state,
and every state must agree to ``||a - b|| / ||b|| <= 1e-5`` (fp32). Configs are drawn from a
fixed-seed RNG (stable test ids), the model and noise from the per-run ``seed``. Where diffusers'
own fp32 arithmetic is ill-conditioned (Euler-type steps from EDM's sigma = 80, KDPM2's second
stage over a long interval, SA-Solver's noise prediction over a large log-SNR step) a state may
differ by more only where stock is that far from the exact run itself, as in test_dropin_fuzz (see
:func:`check`). Every test that steps a drop-in counts the fused kernel: exactly one backend step
per ``step`` call.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import random
import sys

import numpy as np
import pytest
import torch

from tests.samplers._harness import SD, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
import fastdiff  # noqa: E402
import fastdiff.diffusers as fdd  # noqa: E402
from fastdiff import samplers  # noqa: E402
from fastdiff.core import schedules  # noqa: E402
from fastdiff.diffusers import SUPPORT, from_diffusers, support_table  # noqa: E402
from fastdiff.runtime import ops  # noqa: E402
from fastdiff.samplers import edm  # noqa: E402

TOL = 1e-5
CLASSES = ("LCMScheduler", "TCDScheduler", "FlowMatchLCMScheduler", "EDMEulerScheduler",
           "EDMDPMSolverMultistepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
           "DPMSolverSDEScheduler", "SASolverScheduler")

pytestmark = [
    # torchsde's Brownian interval queried at sigma_min's float32 round trip (diffusers' own call, warned there too)
    pytest.mark.filterwarnings("ignore:Should have t[ab][<>]=t[01]:UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


class Kernel:
    """Counts the fused steps (backend step calls) a block of code runs."""

    def __init__(self, monkeypatch):
        self.n = 0
        step = ops.step

        def counted(args, backend):
            self.n += 1
            return step(args, backend)

        monkeypatch.setattr(ops, "step", counted)


@pytest.fixture
def kernel(monkeypatch) -> Kernel:
    return Kernel(monkeypatch)


def run(sched, model, x, steps, *, seed=None, set_kw=None, begin=None, step_kwargs=None, second=False):
    """The diffusers loop; the states (and second outputs) after every ``step`` call, and the call count."""
    if steps is None and not set_kw:
        raise ValueError("steps or set_kw")
    sched.set_timesteps(steps, **(set_kw or {})) if steps is not None else sched.set_timesteps(**set_kw)
    ts = sched.timesteps
    if begin is not None:
        ts = ts[begin * sched.order:]
        sched.set_begin_index(begin * sched.order)
    kw = dict(step_kwargs or {})
    if seed is not None and "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(seed)
    traj, extra = [], []
    for t in ts:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = model(u, t.to(x.dtype).expand(x.shape[0]))
        out = sched.step(m, t, x, **kw)
        x = out.prev_sample
        traj.append(x.clone())
        if second:
            extra.append(out[1] if len(out) > 1 else None)
    return (traj, extra, len(ts)) if second else (traj, len(ts))


def _init(sched) -> float:
    return float(getattr(sched, "init_noise_sigma", 1.0))


def _scale(sched, x, t):
    return sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x


def _exact_run(proto, model, x, steps, kw) -> list:
    """The drop-in's run in float64 (reference backend) with the float32 run's noise: generator draws in
    float32, DPMSolverSDE's Brownian tree built and queried in float32 (a float64 tree draws other numbers)."""
    mod = sys.modules[type(proto).__module__]
    tree = getattr(mod, "BrownianTreeNoiseSampler", None)
    draw = fdd.scheduler.draw_noise
    fdd.scheduler.draw_noise = lambda shape, g, dt, dev: draw(shape, g, torch.float32, dev).to(dt)
    if tree is not None:
        class Tree32(tree):
            def __init__(self, sample, *args):
                super().__init__(sample.float(), *args)

            def __call__(self, sigma, sigma_next):
                return super().__call__(sigma, sigma_next).double()

        mod.BrownianTreeNoiseSampler = Tree32
    try:
        return run(from_diffusers(proto, backend="reference"), model, x.double(), steps, **kw)[0]
    finally:
        fdd.scheduler.draw_noise = draw
        if tree is not None:
            mod.BrownianTreeNoiseSampler = tree


def check(kernel: Kernel, name: str, cfg: dict, steps, seed: int, *, gain=1.0, set_kw=None, begin=None,
          step_kwargs=None, backend="auto", truth64=True, dtype=torch.float32) -> float:
    """Stock vs drop-in trajectories; the worst relative error. Counts one fused step per step call.

    A state further than ``TOL`` from the stock one passes only where stock's own float32 arithmetic is
    that far from the exact run (the drop-in's steps in float64 from the same state and noise):
    ``err(ours, stock) <= TOL + 2 err(stock, exact)`` and ``err(ours, exact) <= max(err(stock, exact), TOL)``
    (``truth64=False``: no such allowance).
    """
    cls = getattr(diffusers, name)
    proto = cls(**cfg)  # (KDPM2's constructor plans 1000 steps: built once, the run's grid set before copying)
    if steps is not None:
        proto.set_timesteps(steps, **(set_kw or {}))
    else:
        proto.set_timesteps(**set_kw)
    stock, fused = copy.deepcopy(proto), from_diffusers(proto, backend=backend)
    x = initial_noise(seed, _init(stock), dtype=dtype)
    model = toy_model(seed, gain=gain)
    kw = dict(set_kw=set_kw, begin=begin, step_kwargs=step_kwargs, seed=seed + 1)
    ref, _ = run(stock, model, x, steps, **kw)
    before = kernel.n
    got, calls = run(fused, model, x, steps, **kw)
    assert kernel.n - before == calls, f"{kernel.n - before} fused steps for {calls} step calls"
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    what = f"{name} {cfg} steps={steps} {kw} seed={seed}"
    assert len(got) == len(ref), what
    truth, worst = None, 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        e = rel_err(g, r)
        if e > TOL:
            assert truth64, f"{what}: step {i} relative error {e:.3g} > {TOL:g}"
            if truth is None:  # the exact run: the same rows in float64, the fp32 run's noise draws
                truth = _exact_run(proto, model, x, steps, kw)
            ours, theirs = rel_err(g, truth[i]), rel_err(r, truth[i])
            assert e <= TOL + 2 * theirs and ours <= max(theirs, TOL), \
                f"{what}: step {i}: {e:.3g} from the stock; from fp64: {ours:.3g} (ours) vs {theirs:.3g} (stock)"
        worst = max(worst, e)
    return worst


# ------------------------------------------------------------------------ randomized configs

BETAS = [{"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, SD,
         {"beta_schedule": "squaredcos_cap_v2"}]
SPACINGS = [{"timestep_spacing": "linspace"}, {"timestep_spacing": "leading", "steps_offset": 1},
            {"timestep_spacing": "trailing"}]
GRIDS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
STEPS = [1, 2, 3, 4, 5, 7, 9]


def _clip(r: random.Random) -> tuple[dict, float]:
    kind = r.choice(["none", "none", "clip", "threshold"])
    if kind == "clip":
        return {"clip_sample": True, "clip_sample_range": r.choice([0.8, 1.0, 1.5])}, 2.5
    if kind == "threshold":
        return {"thresholding": True, "dynamic_thresholding_ratio": r.choice([0.9, 0.995]),
                "sample_max_value": r.choice([1.0, 1.5])}, 2.5
    return {}, 1.0


def _lcm_like(r: random.Random, name: str) -> tuple:
    pred = r.choice(["epsilon", "v_prediction", "sample"])
    cfg = {**r.choice(BETAS), "prediction_type": pred, "original_inference_steps": r.choice([50, 30, 100])}
    if pred != "epsilon" and r.random() < 0.3:
        cfg["rescale_betas_zero_snr"] = True  # (epsilon at zero SNR divides by 0 in diffusers: refused)
    clip, gain = _clip(r)
    cfg.update(clip)
    if name == "LCMScheduler":
        cfg["timestep_scaling"] = r.choice([10.0, 5.0, 20.0])
    steps, set_kw = r.choice(STEPS[:6]), {}
    way = r.choice(["plain", "plain", "orig", "strength", "custom", "custom-strength"])
    if way == "orig":
        set_kw = {"original_inference_steps": r.choice([20, 40])}
    elif way == "strength":
        set_kw = {"strength": r.choice([0.5, 0.8])}
    elif way.startswith("custom"):
        ts = sorted(r.sample(range(1, 999), r.choice([2, 3, 5])), reverse=True)
        set_kw, steps = {"timesteps": [999] + ts}, None
        if way == "custom-strength":
            set_kw["strength"] = r.choice([0.5, 0.7])
    kw = {"gain": gain, "set_kw": set_kw}
    if name == "TCDScheduler":
        kw["step_kwargs"] = {"eta": r.choice([0.0, 0.3, 0.5, 1.0])}
    return name, cfg, steps, kw


def _flow_lcm(r: random.Random) -> tuple:
    cfg = r.choice([{"shift": r.choice([1.0, 3.0])}, {"use_dynamic_shifting": True,
                                                      "time_shift_type": r.choice(["exponential", "linear"])}])
    if r.random() < 0.3:
        cfg["shift_terminal"] = 0.05
    cfg.update(r.choice(GRIDS + [{"invert_sigmas": True}]))
    steps = r.choice(STEPS[1:] if "shift_terminal" in cfg else STEPS)
    set_kw = {"mu": 0.8} if cfg.get("use_dynamic_shifting") else {}
    if r.random() < 0.2 and not cfg.get("use_dynamic_shifting"):
        set_kw, steps = {"sigmas": [1.0, 0.7, 0.45, 0.2, 0.05]}, None
    return "FlowMatchLCMScheduler", cfg, steps, {"set_kw": set_kw}


def _edm_common(r: random.Random) -> dict:
    cfg = {"sigma_schedule": r.choice(["karras", "exponential"]), "sigma_data": r.choice([0.5, 1.0, 0.3]),
           "prediction_type": r.choice(["epsilon", "v_prediction"])}
    if r.random() < 0.3:
        cfg.update(sigma_min=0.01, sigma_max=r.choice([14.6, 80.0]), rho=r.choice([5.0, 7.0]))
    if r.random() < 0.3:
        cfg["final_sigmas_type"] = "sigma_min"
    return cfg


def _edm_euler(r: random.Random) -> tuple:
    kw = {}
    if r.random() < 0.3:
        kw["step_kwargs"] = {"s_churn": r.choice([1.0, 5.0]), "s_tmin": 0.1, "s_tmax": 30.0, "s_noise": 1.003}
    return "EDMEulerScheduler", _edm_common(r), r.choice(STEPS), kw


def _edm_dpm(r: random.Random) -> tuple:
    cfg = _edm_common(r)
    cfg["algorithm_type"] = r.choice(["dpmsolver++", "sde-dpmsolver++"])
    cfg["solver_order"] = r.choice([1, 2] if cfg["algorithm_type"] == "sde-dpmsolver++" else [1, 2, 3])
    cfg.update(solver_type=r.choice(["midpoint", "heun"]), lower_order_final=r.random() < 0.8,
               euler_at_final=r.random() < 0.2)
    gain = 1.0
    if r.random() < 0.25:
        cfg.update(thresholding=True, sample_max_value=1.5)
        gain = 2.5
    return "EDMDPMSolverMultistepScheduler", cfg, r.choice(STEPS + [16]), {"gain": gain}


def _kdpm(r: random.Random, name: str) -> tuple:
    # (not the cosine betas: their top sigma ~ 6e2-1e4 leaves diffusers' fp32 k-space steps ~1e-3 off the exact
    # run, see test_kdpm2_cosine_betas_closer_to_the_exact_run_than_stock)
    cfg = {**r.choice(BETAS[:2]), **r.choice(SPACINGS), **r.choice(GRIDS),
           "prediction_type": r.choice(["epsilon", "v_prediction"])}
    kw = {}
    if name == "DPMSolverSDEScheduler":
        cfg["noise_sampler_seed"] = r.randrange(1000)
        kw["step_kwargs"] = {"s_noise": r.choice([1.0, 0.8])}
    return name, cfg, r.choice(STEPS), kw


def _sa(r: random.Random) -> tuple:
    alg = r.choice(["data_prediction", "noise_prediction"])
    cfg = {**r.choice(BETAS), **r.choice(SPACINGS), "algorithm_type": alg,
           "predictor_order": r.randint(1, 4), "corrector_order": r.randint(1, 4),
           "prediction_type": r.choice(["epsilon", "v_prediction", "sample"]), "lower_order_final": r.random() < 0.8}
    way = r.choice(["default", "grid", "grid", "flow", "clip", "tau"])
    gain = 1.0
    if way == "grid":
        cfg.update(r.choice(GRIDS[1:]))
    elif way == "flow" and alg == "data_prediction":
        cfg.update(use_flow_sigmas=True, flow_shift=r.choice([1.0, 3.0]),
                   prediction_type=r.choice(["flow_prediction", "epsilon", "sample"]))
    elif way == "clip" and alg == "data_prediction":
        cfg.update(thresholding=True, sample_max_value=1.5)
        gain = 2.5
    elif way == "default" and r.random() < 0.5:
        cfg["lambda_min_clipped"] = -3.0
    kw = {"gain": gain}
    if way == "tau":
        kw["tau"] = r.choice([0.0, 0.5, 1.3])
    return "SASolverScheduler", cfg, r.choice(STEPS + [12, 25]), kw


def _id(case) -> str:
    name, cfg, steps, kw = case
    return f"{name.replace('Scheduler', '')}-{steps}-{cfg}-{ {k: v for k, v in kw.items() if k not in ('gain',)} }"


def _cases() -> list[tuple]:
    r = random.Random(20240611)
    out = []
    out += [_lcm_like(r, "LCMScheduler") for _ in range(10)]
    out += [_lcm_like(r, "TCDScheduler") for _ in range(10)]
    out += [_flow_lcm(r) for _ in range(8)]
    out += [_edm_euler(r) for _ in range(8)]
    out += [_edm_dpm(r) for _ in range(10)]
    for name in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DPMSolverSDEScheduler"):
        out += [_kdpm(r, name) for _ in range(6)]
    out += [_sa(r) for _ in range(14)]
    return list({_id(c): c for c in out}.values())  # (a config drawn twice runs once)


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_trajectory_matches_stock(case, seed, kernel):
    name, cfg, steps, kw = case
    kw = dict(kw)
    tau = kw.pop("tau", None)
    if tau is not None:  # a config's tau_func (SA-Solver's stochasticity), called per step by diffusers
        cfg = {**cfg, "tau_func": lambda t, _tau=tau: _tau if t > 300 else 0.0}
    check(kernel, name, cfg, steps, seed, **kw)


def test_every_new_class_is_covered_and_listed():
    assert {c[0] for c in CASES} == set(CLASSES)
    assert set(CLASSES) <= set(SUPPORT)
    table = support_table()
    assert all(name in table for name in CLASSES)


@pytest.mark.parametrize("name, cfg", [
    ("LCMScheduler", {}), ("EDMEulerScheduler", {}), ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}),
    ("KDPM2AncestralDiscreteScheduler", SD), ("SASolverScheduler", {**SD, "predictor_order": 3, "corrector_order": 3})])
def test_backends_agree(name, cfg, seed, kernel):
    for backend in ("reference", "cpu"):
        check(kernel, name, cfg, 6, seed, backend=backend)


@pytest.mark.parametrize("name, cfg", [("LCMScheduler", {"prediction_type": "v_prediction"}),
                                       ("TCDScheduler", {}), ("EDMEulerScheduler", {}),
                                       ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
                                       ("KDPM2DiscreteScheduler", SD), ("SASolverScheduler", SD)])
def test_fp64_trajectory_matches_stock(name, cfg, seed, kernel):
    check(kernel, name, cfg, 5, seed, dtype=torch.float64)


# ------------------------------------------------------------------------ runs that start later


@pytest.mark.parametrize("name, cfg, steps, begin", [
    ("LCMScheduler", {}, 6, 2), ("TCDScheduler", {}, 6, 3), ("FlowMatchLCMScheduler", {"shift": 3.0}, 8, 3),
    ("EDMEulerScheduler", {}, 10, 4), ("EDMDPMSolverMultistepScheduler", {"solver_order": 3}, 12, 5),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 18, 6),
    ("KDPM2DiscreteScheduler", SD, 8, 3), ("KDPM2AncestralDiscreteScheduler", SD, 8, 3),
    ("DPMSolverSDEScheduler", {**SD, "noise_sampler_seed": 4}, 8, 3),
    ("SASolverScheduler", {**SD, "predictor_order": 3, "corrector_order": 3}, 12, 5),
])
def test_begin_index_run_matches_stock(name, cfg, steps, begin, seed, kernel):
    """img2img: set_begin_index(k * order) and timesteps[k * order:]; multistep history restarts at k."""
    check(kernel, name, cfg, steps, seed, begin=begin)


@pytest.mark.parametrize("name", ["EDMDPMSolverMultistepScheduler", "SASolverScheduler"])
def test_unknown_first_timestep_is_the_last_step_as_in_stock(name, kernel):
    """Their stock index lookup takes a timestep it does not know as the last step; so does the drop-in."""
    cls = getattr(diffusers, name)
    stock, fused = cls(), from_diffusers(cls())
    x = initial_noise(3, 1.0)
    outs = []
    for s in (stock, fused):
        s.set_timesteps(6)
        t = float(s.timesteps[0]) + 0.5
        outs.append(s.step(x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample)
        assert s.step_index == 6
    assert kernel.n == 1
    assert rel_err(outs[1], outs[0]) <= TOL


# ------------------------------------------------------------------------ the stock API surface


def _x(seed: int = 0, shape=(2, 3, 4, 5)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


_CFG = {"DPMSolverSDEScheduler": {"noise_sampler_seed": 11}}


@pytest.mark.parametrize("name", CLASSES)
def test_same_config_arrays_helpers_and_round_trips(name, tmp_path):
    cls = getattr(diffusers, name)
    st, fu = cls(**_CFG.get(name, {})), from_diffusers(cls(**_CFG.get(name, {})))
    assert isinstance(fu, cls) and type(fu).__name__ == name and dict(fu.config) == dict(st.config)
    for s in (st, fu):
        s.set_timesteps(5)
    for attr in ("timesteps", "sigmas"):
        if hasattr(st, attr):
            assert torch.equal(getattr(fu, attr), getattr(st, attr)), attr
    assert _init(fu) == _init(st) and fu.order == st.order
    x = _x()
    t = st.timesteps[0]
    assert torch.equal(_scale(fu, x, t), _scale(st, x, t))
    noise, ts = _x(1), st.timesteps[2:3]
    for helper in ("add_noise", "scale_noise"):  # (FlowMatchLCM: scale_noise)
        if hasattr(st, helper):
            args = (x, noise, ts) if helper == "add_noise" else (x, ts, noise)
            assert torch.equal(getattr(fu, helper)(*args), getattr(st, helper)(*args))
    # from_config / save_config round trips keep the config and give drop-ins again
    again = type(fu).from_config(fu.config)
    assert type(again) is type(fu) and dict(again.config) == dict(st.config)
    fu.save_config(tmp_path)
    back = cls.from_pretrained(tmp_path)
    assert {k: v for k, v in back.config.items() if not k.startswith("_")} == \
        {k: v for k, v in st.config.items() if not k.startswith("_")}
    assert from_diffusers(back).config == back.config
    # signatures stay diffusers' (pipelines inspect them)
    assert inspect.signature(fu.step).parameters.keys() == inspect.signature(st.step).parameters.keys()
    params = [inspect.signature(s.set_timesteps).parameters.keys() for s in (fu, st)]
    assert params[0] == params[1]


@pytest.mark.parametrize("name, cfg, step_kwargs", [
    ("LCMScheduler", {"clip_sample": True, "clip_sample_range": 0.9}, {}), ("TCDScheduler", {}, {"eta": 0.4}),
    ("FlowMatchLCMScheduler", {}, {}), ("EDMEulerScheduler", {}, {"s_churn": 3.0}),
    ("EDMDPMSolverMultistepScheduler", {}, {}), ("KDPM2DiscreteScheduler", SD, {}),
    ("KDPM2AncestralDiscreteScheduler", SD, {}), ("DPMSolverSDEScheduler", {**SD, "noise_sampler_seed": 5}, {}),
    ("SASolverScheduler", SD, {})])
def test_outputs_return_dict_and_second_output_as_in_stock(name, cfg, step_kwargs, seed, kernel):
    """Output class, ``return_dict=False`` tuples, and the second output where stock returns one
    (``pred_original_sample``; LCM ``denoised``; TCD ``pred_noised_sample``), computed only when read."""
    cls = getattr(diffusers, name)
    f = toy_model(seed, gain=2.5)
    res = {}
    for which, s in (("stock", cls(**cfg)), ("fused", from_diffusers(cls(**cfg)))):
        s.set_timesteps(4)
        x = initial_noise(seed, _init(s))
        kw = dict(step_kwargs)
        if "generator" in inspect.signature(s.step).parameters:
            kw["generator"] = torch.Generator().manual_seed(seed)
        outs = []
        for i, t in enumerate(s.timesteps):
            m = f(_scale(s, x, t), t.float().expand(2))
            out = s.step(m, t, x, return_dict=i % 2 == 1, **kw)
            if i % 2 == 0:
                assert isinstance(out, tuple)
            else:
                assert isinstance(out, diffusers.utils.BaseOutput) and type(out).__name__.endswith("Output")
                out = out.to_tuple() if len(out) > 1 else (out.prev_sample,)
            outs.append(tuple(out))
            x = out[0]
        res[which] = outs
    assert kernel.n == len(res["fused"])
    for a, b in zip(res["fused"], res["stock"]):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert u.dtype == v.dtype and u.shape == v.shape
            assert rel_err(u, v) <= TOL


def test_lazy_second_output_is_not_computed_unless_read(kernel):
    fu = from_diffusers(diffusers.LCMScheduler())
    fu.set_timesteps(3)
    x = _x()
    m = toy_model(0)(x, fu.timesteps[:1].float().expand(2))
    out = fu.step(m, fu.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert out.__dict__.get("_fd_x0") is not None  # not computed yet
    st = diffusers.LCMScheduler()
    st.set_timesteps(3)
    ref = st.step(m, st.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert rel_err(out.denoised, ref.denoised) <= TOL and rel_err(out["denoised"], ref.denoised) <= TOL
    assert kernel.n == 1


def test_kdpm2_and_sde_keep_diffusers_first_order_state(kernel):
    """scale_model_input reads state_in_first_order (KDPM2's ``sample``, DPMSolverSDE's ``mid_point_sigma``)."""
    for name, cfg in (("KDPM2DiscreteScheduler", SD), ("DPMSolverSDEScheduler", {**SD, "noise_sampler_seed": 1})):
        cls = getattr(diffusers, name)
        st, fu = cls(**cfg), from_diffusers(cls(**cfg))
        seqs = []
        for s in (st, fu):
            s.set_timesteps(3)
            x, seq = _x(), []
            for t in s.timesteps:
                seq.append((s.state_in_first_order, float(s.scale_model_input(x, t).norm())))
                x = s.step(0.1 * x, t, x).prev_sample
            seqs.append(seq)
        assert [a for a, _ in seqs[1]] == [a for a, _ in seqs[0]]
        assert np.allclose([b for _, b in seqs[1]], [b for _, b in seqs[0]], rtol=1e-6)
    assert kernel.n == 5 + 5


def test_sde_noise_follows_torch_global_seed_as_stock(kernel):
    """noise_sampler_seed=None: diffusers seeds its Brownian tree from torch's global RNG at the first
    step; so does the drop-in (the same tree, hence the same run under the same torch.manual_seed)."""
    cls = diffusers.DPMSolverSDEScheduler
    f = toy_model(2)
    outs = []
    for s in (cls(**SD), from_diffusers(cls(**SD))):
        s.set_timesteps(4)
        torch.manual_seed(1234)
        x = _x(3) * float(s.init_noise_sigma)
        for t in s.timesteps:
            x = s.step(f(s.scale_model_input(x, t), t.float().expand(2)), t, x).prev_sample
        outs.append(x)
    assert kernel.n == 7
    assert rel_err(outs[1], outs[0]) <= TOL


def test_lcm_noise_in_the_estimates_dtype_with_a_half_model_output(kernel):
    """LCM / TCD draw their noise in the dtype of the estimate (sample and model output together)."""
    f = toy_model(5)
    for name in ("LCMScheduler", "TCDScheduler"):
        cls = getattr(diffusers, name)
        outs = []
        for s in (cls(), from_diffusers(cls())):
            s.set_timesteps(4)
            g = torch.Generator().manual_seed(7)
            x = _x(4)
            for t in s.timesteps:
                x = s.step(f(x, t.float().expand(2)).half(), t, x, generator=g).prev_sample
            outs.append(x)
        assert outs[1].dtype == outs[0].dtype == torch.float32
        # diffusers multiplies the half output by its 0-d coefficient in half precision (the kernel reads it
        # exactly): ~1e-4 apart; noise drawn in half precision instead would be other numbers (error ~1)
        assert rel_err(outs[1], outs[0]) <= 1e-3
    assert kernel.n == 8


# ------------------------------------------------------------------------ what is refused


@pytest.mark.parametrize("name, cfg, match", [
    ("SASolverScheduler", {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ("SASolverScheduler", {"algorithm_type": "noise_prediction", "thresholding": True}, "noise_prediction"),
    ("SASolverScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    ("SASolverScheduler", {"use_flow_sigmas": True, "prediction_type": "v_prediction"}, "v_prediction"),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}, "solver_order=3"),
    ("EDMDPMSolverMultistepScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("EDMEulerScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("KDPM2DiscreteScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("KDPM2AncestralDiscreteScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("DPMSolverSDEScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("FlowMatchLCMScheduler", {"scale_factors": [1.5, 2.0]}, "scale_factors"),
])
def test_unsupported_config_values_are_named(name, cfg, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers(getattr(diffusers, name)(**cfg))


def test_stock_fails_where_refused():
    """The reasons behind the refusals: stock 0.42 fails (or raises) on these."""
    x = _x(0, (2, 3, 4, 4))
    sa = diffusers.SASolverScheduler(variance_type="learned_range")
    sa.set_timesteps(3)
    with pytest.raises(RuntimeError):
        sa.step(torch.cat([x, x], 1), sa.timesteps[0], x)
    e = diffusers.EDMDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=3)
    e.set_timesteps(6)
    with pytest.raises(UnboundLocalError):
        for t in e.timesteps:
            x = e.step(0.1 * x, t, x).prev_sample
    k = diffusers.KDPM2DiscreteScheduler(prediction_type="sample")
    k.set_timesteps(3)
    with pytest.raises(NotImplementedError):
        k.step(x, k.timesteps[0], x)


def test_refused_at_step_time_by_name(kernel):
    x = _x()
    fl = from_diffusers(diffusers.FlowMatchLCMScheduler())
    fl.set_timesteps(3)
    fl.set_scale_factors([1.5, 2.0], "bicubic")
    with pytest.raises(ValueError, match="scale factors"):
        fl.step(x, fl.timesteps[0], x)
    ed = from_diffusers(diffusers.EDMEulerScheduler())
    ed.set_timesteps(3)
    with pytest.raises(ValueError, match="pred_original_sample"):
        ed.step(x, ed.timesteps[0], x, pred_original_sample=x)
    lcm = from_diffusers(diffusers.LCMScheduler(rescale_betas_zero_snr=True))
    lcm.set_timesteps(4)  # epsilon at zero SNR: diffusers divides by 0 at t = 999 only (a later start is finite)
    with pytest.raises(ValueError, match=r"LCMScheduler.step\(timestep=999\).*alphas_cumprod = 0"):
        lcm.step(x, lcm.timesteps[0], x)
    sa = from_diffusers(diffusers.SASolverScheduler())
    sa.set_timesteps(3)
    with pytest.raises(ValueError, match="model_output"):  # stock: the in-place sum fails
        sa.step(_x(0, (2, 3, 4, 5)), sa.timesteps[0], _x(0, (1, 3, 4, 5)))
    assert kernel.n == 0


@pytest.mark.parametrize("name, step_kwargs", [("LCMScheduler", {}), ("TCDScheduler", {"eta": 0.5})])
def test_custom_timesteps_with_strength_re_noise_the_last_step_as_stock(name, step_kwargs, seed, kernel):
    """Custom timesteps and strength < 1: diffusers compares the step index with num_inference_steps, the
    length of the whole custom schedule, so the shortened run's last step re-noises (TCD: times 0)."""
    set_kw = {"timesteps": [999, 759, 499, 259, 19], "strength": 0.6}
    check(kernel, name, {}, None, seed, set_kw=set_kw, step_kwargs=step_kwargs)


def test_kdpm2_ancestral_grid_whose_float32_sigma_down_is_zero_is_refused():
    """sigma_next far below sigma: diffusers' float32 sigma_down is 0, its midpoint timestep NaN."""
    cfg = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "use_exponential_sigmas": True}
    stock = diffusers.KDPM2AncestralDiscreteScheduler(**cfg)
    stock.set_timesteps(2)
    assert torch.isnan(stock.sigmas_interpol).any()
    x = _x()
    for t in stock.timesteps:
        x = stock.step(0.1 * x, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert torch.isnan(x).all()
    fused = from_diffusers(diffusers.KDPM2AncestralDiscreteScheduler(**cfg))
    with pytest.raises(ValueError, match="KDPM2AncestralDiscreteScheduler: step 0 .* sigma_down = 0"):
        fused.set_timesteps(2)


# ------------------------------------------------------------------------ native samplers


def _stock(cls_name: str, cfg: dict, steps: int, model, x, seed: int, step_kwargs=None, **set_kw):
    s = getattr(diffusers, cls_name)(**cfg)
    s.set_timesteps(steps, **set_kw)
    g = torch.Generator().manual_seed(seed)
    x = x * _init(s)
    kw = dict(step_kwargs or {})
    if "generator" in inspect.signature(s.step).parameters:
        kw["generator"] = g
    for t in s.timesteps:
        x = s.step(model(_scale(s, x, t), t.float().expand(x.shape[0])), t, x, **kw).prev_sample
    return x


NATIVE = [
    ("lcm", "LCMScheduler", {**SD, "prediction_type": "v_prediction", "timestep_scaling": 5.0}, 4, {}, {}),
    ("lcm", "LCMScheduler", {"thresholding": True, "sample_max_value": 1.5, "original_inference_steps": 30}, 3, {}, {}),
    ("tcd", "TCDScheduler", {"prediction_type": "sample"}, 5, {"eta": 0.6}, {"eta": 0.6}),
    ("tcd", "TCDScheduler", {}, 1, {}, {}),
    ("sa_solver", "SASolverScheduler", {**SD, "predictor_order": 3, "corrector_order": 2}, 7, {}, {}),
    ("sa_solver", "SASolverScheduler", {"algorithm_type": "noise_prediction", "prediction_type": "v_prediction"}, 5,
     {}, {}),
    ("sa_solver", "SASolverScheduler", {**SD, "use_karras_sigmas": True}, 6, {}, {}),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("sampler, cls_name, cfg, steps, options, step_kwargs", NATIVE,
                         ids=[f"{n[0]}-{n[3]}-{n[2]}" for n in NATIVE])
def test_native_sampler_matches_stock(sampler, cls_name, cfg, steps, options, step_kwargs, backend, seed):
    """``fastdiff.sample(model, noise, sampler=..., schedule=<the stock config>)`` with a generator draws as
    diffusers does and follows the stock loop."""
    gain = 2.5 if cfg.get("thresholding") else 1.0
    f, x = toy_model(seed, gain=gain), initial_noise(seed, 1.0)
    ref = _stock(cls_name, cfg, steps, f, x, seed + 1, step_kwargs)
    config = getattr(diffusers, cls_name)(**cfg).config
    out = fastdiff.sample(f, x, sampler=sampler, steps=steps, schedule=config, backend=backend,
                          generator=torch.Generator().manual_seed(seed + 1), **options)
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_native_flow_lcm_matches_stock(backend, seed):
    f, x = toy_model(seed), initial_noise(seed, 1.0)
    ref = _stock("FlowMatchLCMScheduler", {"shift": 3.0}, 4, f, x, seed)
    out = fastdiff.sample(f, x, sampler="flow_lcm", steps=4, schedule=schedules.FlowSchedule(shift=3.0),
                          backend=backend, generator=torch.Generator().manual_seed(seed))
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name, cls_name, cfg, steps", [
    ("euler", "EDMEulerScheduler", {"prediction_type": "v_prediction", "sigma_data": 1.0}, 6),
    ("dpmpp_2m", "EDMDPMSolverMultistepScheduler", {}, 8),
    ("dpmpp_3m", "EDMDPMSolverMultistepScheduler", {"solver_order": 3}, 8),
    ("dpmpp_2m_sde", "EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 5)])
def test_native_edm_preconditioning_matches_stock(name, cls_name, cfg, steps, backend, seed):
    """EDM = the euler / dpmpp_* rows on a VE (Karras) schedule for D(x; sigma), preconditioned as rows for F."""
    f, x = toy_model(seed), initial_noise(seed, 1.0)
    ref = _stock(cls_name, cfg, steps, f, x, seed)
    extra = {"flavor": "diffusers"} if name.startswith("dpmpp") else {}
    base = samplers.build(name, schedules.VESchedule(), steps, prediction="x0", **extra)
    plan = edm.precondition(base, cfg.get("sigma_data", 0.5), cfg.get("prediction_type", "epsilon"))
    plan = dataclasses.replace(plan, init_scale=math.sqrt(80.0**2 + 1))  # EDM's init_noise_sigma
    out = fastdiff.sample(f, x, plan=plan, backend=backend, generator=torch.Generator().manual_seed(seed))
    assert rel_err(out, ref) <= 2e-5  # (diffusers' Euler from sigma = 80 loses ~1e-5 in fp32)


@pytest.mark.parametrize("name, cls_name", [("dpm_2", "KDPM2DiscreteScheduler"),
                                            ("dpm_2_ancestral", "KDPM2AncestralDiscreteScheduler")])
def test_native_dpm_2_matches_stock_kdpm2(name, cls_name, seed):
    f, x = toy_model(seed), initial_noise(seed, 1.0)
    ref = _stock(cls_name, SD, 10, f, x, seed)
    sch = schedules.from_config(SD).replace(options={})
    out = fastdiff.sample(f, x, sampler=name, steps=10, schedule=sch, backend="cpu",
                          generator=torch.Generator().manual_seed(seed))
    assert rel_err(out, ref) <= TOL


def test_edm_precondition_checks_its_plan():
    with pytest.raises(ValueError, match="prediction 'x0'"):
        edm.precondition(samplers.build("euler", schedules.VESchedule(), 3, prediction="eps"))
    with pytest.raises(ValueError, match="sigma_data"):
        edm.precondition(samplers.build("euler", schedules.VESchedule(), 3, prediction="x0"), sigma_data=0.0)


def test_sa_solver_float64_coefficients_are_closer_to_the_exact_run(seed, monkeypatch):
    """Natively the SA-Solver coefficients are float64 (the drop-in mirrors diffusers' float32 ones): at
    order 4 diffusers' own rounding of them moves its run by ~1e-4; the native run stays by the exact one."""
    from fastdiff.runtime import executor

    draw = executor.draw_noise  # the same float32 draws for the float64 run
    monkeypatch.setattr(executor, "draw_noise", lambda shape, g, dt, dev: draw(shape, g, torch.float32, dev).to(dt))
    f, x = toy_model(seed), initial_noise(seed, 1.0)
    cfg = {**SD, "predictor_order": 4, "corrector_order": 4}
    ref = _stock("SASolverScheduler", cfg, 30, f, x, seed)
    kw = dict(sampler="sa_solver", steps=30, schedule=diffusers.SASolverScheduler(**cfg).config, backend="reference")
    ours = fastdiff.sample(f, x, generator=torch.Generator().manual_seed(seed), **kw)
    exact = fastdiff.sample(f, x.double(), generator=torch.Generator().manual_seed(seed), **kw)
    assert rel_err(ours, exact) <= 2e-6 and rel_err(ref, exact) > 10 * rel_err(ours, exact)


def test_kdpm2_cosine_betas_closer_to_the_exact_run_than_stock(seed, kernel):
    """Cosine betas put KDPM2's top sigma near 1e4 (alphas_cumprod ~ 1e-8 at the last training step): both
    fp32 runs lose digits there, diffusers' ``x + d dt`` ~100x more than the drop-in's rows (each against the
    same steps in fp64), so these configs are compared with the exact run rather than with stock."""
    cls = diffusers.KDPM2DiscreteScheduler
    cfg = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
    stock = cls(**cfg)
    stock.set_timesteps(3)
    f, x = toy_model(seed), initial_noise(seed, _init(stock))
    ref, _ = run(stock, f, x, 3)
    got, calls = run(from_diffusers(cls(**cfg)), f, x, 3)
    exact, _ = run(from_diffusers(cls(**cfg), backend="reference"), f, x.double(), 3)
    assert kernel.n == 2 * calls
    ours, theirs = rel_err(got[-1], exact[-1]), rel_err(ref[-1], exact[-1])
    assert theirs > 10 * ours, (ours, theirs)


# ------------------------------------------------------------------------ accelerated pipelines


@pytest.fixture(scope="module")
def sd_pipe():
    from . import _tiny

    torch.set_num_threads(1)
    return _tiny.sd(diffusers.DDIMScheduler(**_tiny.SD_BETAS, clip_sample=False))


@pytest.mark.parametrize("name, cfg, kw", [
    ("LCMScheduler", {}, {"guidance_scale": 1.0}), ("TCDScheduler", {}, {"eta": 0.3}),
    ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("KDPM2AncestralDiscreteScheduler", SD, {}), ("SASolverScheduler", SD, {})])
def test_accelerated_sd_pipeline_matches_stock(sd_pipe, name, cfg, kw, seed):
    """``accelerate(pipe)``: the fused loop with these schedulers gives the stock latents (noise drawn
    from the pipeline's generator as the stock steps draw it)."""
    sd_pipe.scheduler = getattr(diffusers, name)(**cfg)
    outs = []
    for accelerated in (False, True):
        if accelerated:
            fdd.accelerate(sd_pipe)
        try:
            outs.append(sd_pipe(prompt="a cat", num_inference_steps=4, output_type="latent",
                                generator=torch.Generator().manual_seed(seed), **kw).images)
        finally:
            if accelerated:
                fdd.restore(sd_pipe)
    assert rel_err(outs[1], outs[0]) <= TOL


def test_accelerate_refuses_dpmsolver_sde_by_name(sd_pipe):
    sd_pipe.scheduler = diffusers.DPMSolverSDEScheduler(**SD, noise_sampler_seed=0)
    fdd.accelerate(sd_pipe)
    try:
        with pytest.raises(ValueError, match="DPMSolverSDEScheduler draws its noise from its own state"):
            sd_pipe(prompt="a cat", num_inference_steps=3, output_type="latent")
    finally:
        fdd.restore(sd_pipe)
