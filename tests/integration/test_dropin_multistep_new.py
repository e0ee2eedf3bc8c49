"""PNDM, IPNDM, DEIS, singlestep DPM-Solver and the two inverse schedulers: drop-ins vs stock diffusers,
and their native samplers (``pndm``, ``ipndm``, ``deis``, ``dpm_single``, ``dpm_inverse``; DDIM
inversion as a plan, :func:`fastdiff.samplers.inverse.ddim_inverse`) vs the same stock schedulers.

Trajectories: the stock scheduler and its drop-in run the usual diffusers loop side by side (same
nonlinear toy model, initial state and generator) and every state must be within ``TOL = 1e-5``
relative of the stock one (fp32). Where diffusers' own float32 tensor arithmetic cancels (PNDM from
``abar ~ 1e-9`` at a cosine schedule's last timestep, its noise-space DPM-Solver converting a data
prediction near ``sigma_min``, DEIS on a flow grid), a state may be further off only if (1) the drop-in
run in float64 is within ``TOL`` of diffusers' own run in float64 (its float32 scalars on float64
tensors, the same noise: the formula, checked independently of float32 rounding; the drop-ins build
their coefficients with diffusers' float32 scalar arithmetic, so the two agree to ~1e-12) and (2) the
drop-in's float32 state is no further from that run than the stock one is:
``err(ours, stock64) <= TOL + 2 err(stock, stock64)``. Every stepping test counts the fused step
(``fastdiff.runtime.ops.step``): one per ``step`` call.

Randomized configs draw from each class's options (betas, spacings, prediction types, Karras /
exponential / beta / flow sigmas, clipping and thresholding, orders and solver types, step counts
1, 2, 3 and odd ones, late starts) with the test's seed (printed; ``FASTDIFF_TEST_SEED`` replays it).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import random
import warnings

import numpy as np
import pytest
import torch

from tests.samplers._harness import SD, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
import fastdiff  # noqa: E402
import fastdiff.diffusers as fdd  # noqa: E402
from fastdiff.core import schedules  # noqa: E402
from fastdiff.diffusers import SUPPORT, from_diffusers, support_table  # noqa: E402
from fastdiff.runtime import ops  # noqa: E402
from fastdiff.samplers.inverse import ddim_inverse  # noqa: E402

TOL = 1e-5
CLASSES = ["PNDMScheduler", "IPNDMScheduler", "DEISMultistepScheduler", "DPMSolverSinglestepScheduler",
           "DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"]
WORST: dict[str, float] = {}


@pytest.fixture(autouse=True)
def _quiet():
    # diffusers warns (logger) that it switches lower_order_final on, and deprecates algorithm_type="dpmsolver"
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    logging.disable(logging.NOTSET)


@pytest.fixture
def fused(monkeypatch):
    """Counts the fused steps (``fastdiff.runtime.ops.step``) the drop-ins run."""
    calls = []
    orig = ops.step
    monkeypatch.setattr(ops, "step", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    return calls


def run(sched, model, x, steps, *, seed=None, set_kw=None, begin=None, model_out=None):
    """The diffusers loop (img2img: ``timesteps[begin:]`` after ``set_begin_index`` where the class has
    it); the state after every ``step`` call."""
    if steps is None:
        sched.set_timesteps(**set_kw)
    else:
        sched.set_timesteps(steps, **(set_kw or {}))
    ts = sched.timesteps
    if begin is not None:
        ts = ts[begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
    kw = {}
    if seed is not None and "generator" in inspect.signature(sched.step).parameters:
        kw["generator"] = torch.Generator().manual_seed(seed)
    traj = []
    for t in ts:
        u = sched.scale_model_input(x, t)
        m = model(u, t.to(x.dtype).expand(x.shape[0]))
        if model_out is not None:
            m = model_out(m)
        x = sched.step(m, t, x, **kw).prev_sample
        traj.append(x.clone())
    return traj


def _needs(backend: str) -> None:
    from fastdiff.backends import cpu

    if backend == "cpu" and not cpu.available()[0]:
        pytest.skip(f"cpu backend unavailable: {cpu.available()[1]}")


def _stock64(cls, cfg, model, x, steps, kw):
    """The stock run in float64 (its float32 scalars applied to float64 tensors), noise drawn as in the
    float32 run: diffusers' formula without its float32 tensor rounding."""
    import sys

    mod = sys.modules[cls.__module__]
    orig = getattr(mod, "randn_tensor", None)
    if orig is not None:
        mod.randn_tensor = lambda shape, generator=None, device=None, dtype=None, **k: orig(
            shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
    try:
        return run(cls(**cfg), model, x.double(), steps, **kw)
    finally:
        if orig is not None:
            mod.randn_tensor = orig


def check(name: str, cfg: dict, steps, seed: int, calls: list, *, dtype=torch.float32, gain=1.0, set_kw=None,
          begin=None, model_out=None, backend="auto") -> float:
    """Stock vs drop-in trajectories; the worst relative error (see the module docstring)."""
    _needs(backend)
    cls = getattr(diffusers, name)
    stock, dropin = cls(**cfg), from_diffusers(cls(**cfg), backend=backend)
    x = initial_noise(seed, 1.0, dtype=dtype)
    model = toy_model(seed, gain=gain)
    kw = dict(set_kw=set_kw, begin=begin, seed=seed + 1, model_out=model_out)
    ref = run(stock, model, x, steps, **kw)
    before = len(calls)
    got = run(dropin, model, x, steps, **kw)
    assert len(calls) - before == len(got), f"{name}: {len(calls) - before} fused steps for {len(got)} step calls"
    assert [t.dtype for t in got] == [t.dtype for t in ref] and len(got) == len(ref)
    exact = ours64 = None
    worst = 0.0
    for i, (g, r) in enumerate(zip(got, ref)):
        e = rel_err(g, r)
        if e > TOL:
            if exact is None:
                exact = _stock64(cls, cfg, model, x, steps, kw)
                draw = fdd.scheduler.draw_noise  # the drop-in in float64, noise drawn as in the float32 run
                fdd.scheduler.draw_noise = lambda shape, gen, dt, dev: draw(shape, gen, torch.float32, dev).to(dt)
                try:
                    ours64 = run(from_diffusers(cls(**cfg), backend="reference"), model, x.double(), steps, **kw)
                finally:
                    fdd.scheduler.draw_noise = draw
            formula, ours, stock_err = rel_err(ours64[i], exact[i]), rel_err(g, exact[i]), rel_err(r, exact[i])
            shown = {k: ("[...]" if k == "trained_betas" else v) for k, v in cfg.items()}
            print(f"    step {i}: {e:.3g} from the stock step; from diffusers' float64 run: {ours:.3g} (ours), "
                  f"{stock_err:.3g} (stock), {formula:.3g} (ours in float64)")
            assert formula <= TOL and ours <= TOL + 2 * stock_err, (
                f"{name} {shown} steps={steps} begin={begin} seed={seed}: step {i} is {e:.3g} from the stock step; "
                f"from diffusers' float64 run: {ours:.3g} (ours) vs {stock_err:.3g} (stock), {formula:.3g} (ours in "
                "float64)")
        worst = max(worst, e)
    WORST[name] = max(WORST.get(name, 0.0), worst)
    return worst


# ------------------------------------------------------------------------------------- random configs


def _pick(r: random.Random, *options):
    return r.choice(options)


def _betas(r: random.Random, spacings=("leading", "trailing", "linspace")) -> dict:
    kind = _pick(r, "sd", "linear", "squaredcos_cap_v2", "trained")
    cfg = {"sd": dict(SD), "linear": {"beta_start": r.uniform(1e-5, 1e-3), "beta_end": r.uniform(0.008, 0.03)},
           "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
           "trained": {"trained_betas": np.linspace(r.uniform(1e-4, 1e-3), r.uniform(0.01, 0.02), 1000).tolist()}}[kind]
    if spacings:
        cfg["timestep_spacing"] = _pick(r, *spacings)
        cfg["steps_offset"] = _pick(r, 0, 1)
    return cfg


def _grid(r: random.Random) -> dict:
    return _pick(r, {}, {}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True},
                 {"use_flow_sigmas": True, "flow_shift": _pick(r, 1.0, 3.0), "prediction_type": "flow_prediction"})


def _thresh(r: random.Random) -> dict:
    if r.random() < 0.25:
        return {"thresholding": True, "dynamic_thresholding_ratio": _pick(r, 0.995, 0.9),
                "sample_max_value": _pick(r, 1.0, 1.5), "prediction_type": "sample"}
    return {}


def _steps(r: random.Random) -> int:
    return _pick(r, 1, 2, 3, 4, 5, 7, 9, 12, 16, 19)


def _pndm(r):
    skip = r.random() < 0.6
    cfg = {**_betas(r), "skip_prk_steps": skip, "set_alpha_to_one": r.random() < 0.5,
           "prediction_type": _pick(r, "epsilon", "v_prediction")}
    return cfg, _pick(r, 4, 5, 7, 10, 13) if not skip else _steps(r), {}


def _ipndm(r):
    if r.random() < 0.3:  # trained betas are the grid's sigmas, one more than the steps
        n = r.randint(2, 12)
        sig = np.sort(np.random.default_rng(r.randint(0, 99)).uniform(0, 1, n + 1))[::-1]
        return {"trained_betas": sig.tolist()}, n, {}
    return {}, _steps(r), {}


def _deis(r):
    cfg = {**_betas(r), "solver_order": _pick(r, 1, 2, 3, 4), "lower_order_final": r.random() < 0.8,
           "prediction_type": _pick(r, "epsilon", "v_prediction", "sample")}
    cfg.update(_grid(r))
    cfg.update({} if cfg.get("use_flow_sigmas") else _thresh(r))
    return cfg, _steps(r), {"gain": 2.5} if cfg.get("thresholding") else {}


def _single(r):
    algo = _pick(r, "dpmsolver++", "dpmsolver++", "sde-dpmsolver++", "dpmsolver")
    cfg = {**_betas(r, spacings=()), "algorithm_type": algo, "solver_order": _pick(r, 1, 2, 3),
           "solver_type": _pick(r, "midpoint", "heun"), "lower_order_final": r.random() < 0.5,
           "final_sigmas_type": "sigma_min" if algo == "dpmsolver" else _pick(r, "zero", "sigma_min"),
           "prediction_type": _pick(r, "epsilon", "v_prediction", "sample")}
    if r.random() < 0.2:
        cfg["lambda_min_clipped"] = -5.1
    g = _grid(r)
    if not (algo == "dpmsolver" and g.get("use_flow_sigmas")):
        cfg.update(g)
    if algo != "dpmsolver" and not cfg.get("use_flow_sigmas"):
        cfg.update(_thresh(r))
    steps, kw = _steps(r), {"gain": 2.5} if cfg.get("thresholding") else {}
    if not any(k in cfg for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")) \
            and r.random() < 0.2:  # custom timesteps
        steps, kw["set_kw"] = None, {"timesteps": sorted(r.sample(range(1, 1000), r.randint(2, 9)), reverse=True)}
    return cfg, steps, kw


def _ddim_inverse(r):
    cfg = {**_betas(r, spacings=("leading", "trailing")), "clip_sample": r.random() < 0.5,
           "clip_sample_range": _pick(r, 1.0, 1.5), "prediction_type": _pick(r, "epsilon", "v_prediction", "sample"),
           "rescale_betas_zero_snr": r.random() < 0.2}
    cfg["set_alpha_to_one"] = cfg["prediction_type"] != "sample" and r.random() < 0.6
    return cfg, _steps(r), {"gain": 2.5}


def _dpm_inverse(r):
    cfg = {**_betas(r), "algorithm_type": _pick(r, "dpmsolver++", "dpmsolver"), "solver_order": _pick(r, 1, 2, 3),
           "solver_type": _pick(r, "midpoint", "heun"), "lower_order_final": r.random() < 0.8,
           "euler_at_final": r.random() < 0.2, "prediction_type": _pick(r, "epsilon", "v_prediction", "sample")}
    if r.random() < 0.2:
        cfg["lambda_min_clipped"] = -5.1
    g = _grid(r)
    if not (cfg["algorithm_type"] == "dpmsolver" and g.get("use_flow_sigmas")):
        cfg.update(g)
    if not cfg.get("use_flow_sigmas"):
        cfg.update(_thresh(r))
    return cfg, _steps(r), {"gain": 2.5} if cfg.get("thresholding") else {}


RANDOM = {"PNDMScheduler": _pndm, "IPNDMScheduler": _ipndm, "DEISMultistepScheduler": _deis,
          "DPMSolverSinglestepScheduler": _single, "DDIMInverseScheduler": _ddim_inverse,
          "DPMSolverMultistepInverseScheduler": _dpm_inverse}
N_RANDOM = 30


def _stock_accepts(name: str, cfg: dict, steps, kw: dict, begin=None) -> bool:
    """Whether diffusers takes the config and runs it to a finite result (else not a parity case; e.g.
    its inverse scheduler's Beta-sigma grid repeats a timestep, and a late start by lookup then runs
    past the end)."""
    try:
        s = getattr(diffusers, name)(**cfg)
        traj = run(s, toy_model(0, gain=kw.get("gain", 1.0)), initial_noise(0, 1.0), steps, seed=1,
                   set_kw=kw.get("set_kw"), begin=begin)
        return all(bool(torch.isfinite(t).all()) for t in traj)
    except (ValueError, RuntimeError, IndexError, TypeError, ZeroDivisionError, AssertionError):
        return False


@pytest.mark.parametrize("name", CLASSES)
def test_random_configs_match_stock(name, seed, fused):
    r = random.Random(seed * 31 + CLASSES.index(name))
    done = 0
    for _ in range(4 * N_RANDOM):
        cfg, steps, kw = RANDOM[name](r)
        n = steps if steps is not None else len(kw["set_kw"]["timesteps"])
        begin = r.randint(1, n - 1) if (n > 2 and r.random() < 0.3) else None
        if not _stock_accepts(name, cfg, steps, kw, begin):
            continue
        shown = {k: ("[...]" if k == "trained_betas" else v) for k, v in cfg.items()}
        print(f"{name} {shown} steps={steps} begin={begin} {kw}")
        worst = check(name, cfg, steps, seed, fused, begin=begin, **kw)
        print(f"    worst {worst:.3g}")
        done += 1
        if done == N_RANDOM:
            break
    assert done >= N_RANDOM // 2, f"{name}: only {done} random configs ran"
    print(f"{name}: worst relative error over the random configs {WORST[name]:.3g}")


# ------------------------------------------------------------------------------------- fixed configs

FIXED = [
    # Stable Diffusion 1.x's scheduler config (PNDM, skip_prk_steps=True, steps_offset=1)
    ("PNDMScheduler", {**SD, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}, 50, {}),
    ("PNDMScheduler", {**SD, "skip_prk_steps": False}, 4, {}),  # the paper's F-PNDM: 3 RK4 steps, then PLMS
    ("PNDMScheduler", {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "skip_prk_steps": True}, 1,
     {}),
    ("IPNDMScheduler", {}, 3, {}),
    ("DEISMultistepScheduler", {**SD, "solver_order": 3, "prediction_type": "sample"}, 16, {}),  # 3rd order to the end
    ("DEISMultistepScheduler", {**SD, "solver_order": 2, "thresholding": True, "prediction_type": "sample"}, 9,
     {"gain": 2.5}),
    ("DPMSolverSinglestepScheduler", {**SD, "solver_order": 3, "solver_type": "heun",
                                      "algorithm_type": "sde-dpmsolver++"}, 11, {}),
    ("DPMSolverSinglestepScheduler", {**SD, "solver_order": 2, "lower_order_final": False,
                                      "final_sigmas_type": "sigma_min"}, 10, {}),
    ("DPMSolverSinglestepScheduler", {**SD, "use_karras_sigmas": True, "solver_order": 3}, 7, {}),
    ("DPMSolverSinglestepScheduler", SD, None, {"set_kw": {"timesteps": [999, 850, 600, 420, 200, 50]}}),
    ("DDIMInverseScheduler", {**SD, "set_alpha_to_one": False, "prediction_type": "sample"}, 10, {"gain": 2.5}),
    ("DPMSolverMultistepInverseScheduler", {**SD, "solver_order": 3, "use_karras_sigmas": True}, 12, {}),
]


@pytest.mark.parametrize("name, cfg, steps, kw", FIXED, ids=[f"{c[0]}-{c[2]}" for c in FIXED])
def test_fixed_configs_match_stock(name, cfg, steps, kw, seed, fused):
    check(name, cfg, steps, seed, fused, **kw)


@pytest.mark.parametrize("name, cfg", [("PNDMScheduler", SD), ("IPNDMScheduler", {}),
                                       ("DEISMultistepScheduler", {**SD, "solver_order": 3}),
                                       ("DPMSolverSinglestepScheduler", {**SD, "solver_order": 3}),
                                       ("DDIMInverseScheduler", SD), ("DPMSolverMultistepInverseScheduler", SD)])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("cpu", torch.float32)])
def test_backends_and_fp64(name, cfg, backend, dtype, seed, fused):
    check(name, cfg, 8, seed, fused, backend=backend, dtype=dtype)


@pytest.mark.parametrize("name, cfg, steps, begins", [
    ("PNDMScheduler", {**SD, "skip_prk_steps": True}, 10, (1, 2, 3, 10)),  # timesteps[1] == timesteps[2]
    ("PNDMScheduler", {**SD, "skip_prk_steps": False}, 6, (2, 5, 11)),
    ("IPNDMScheduler", {}, 10, (1, 4)),
    ("DEISMultistepScheduler", {**SD, "solver_order": 3}, 17, (3, 14)),  # lower_order_final decided on 17 steps
    ("DPMSolverSinglestepScheduler", {**SD, "solver_order": 3}, 12, (1, 2, 4)),  # orders [1,2,3] from mid-cycle
    ("DDIMInverseScheduler", SD, 10, (4,)),
])
def test_late_start_matches_stock(name, cfg, steps, begins, seed, fused):
    """img2img: ``timesteps[k:]`` after ``set_begin_index(k)`` (PNDM: from its call counter 0)."""
    for b in begins:
        check(name, cfg, steps, seed, fused, begin=b)


@pytest.mark.parametrize("name", ["DEISMultistepScheduler", "DPMSolverSinglestepScheduler",
                                  "DPMSolverMultistepInverseScheduler"])
def test_start_by_timestep_lookup_and_unknown_timestep_as_stock(name, seed, fused):
    """Without set_begin_index the first timestep is looked up (an unknown one is the last step)."""
    cls = getattr(diffusers, name)
    f = toy_model(seed)
    for first in (3, None):
        outs = []
        for s in (cls(**SD), from_diffusers(cls(**SD))):
            s.set_timesteps(10)
            x = initial_noise(seed, 1.0)
            ts = s.timesteps[first:] if first is not None else [s.timesteps[0].float() + 0.5]
            for t in ts:
                x = s.step(f(x, torch.as_tensor(t).float().expand(2)), t, x).prev_sample
            outs.append((x, s.step_index))
        assert outs[0][1] == outs[1][1] and rel_err(outs[1][0], outs[0][0]) <= TOL


@pytest.mark.parametrize("name, cfg", [("DPMSolverSinglestepScheduler", {"prediction_type": "epsilon"}),
                                       ("DPMSolverMultistepInverseScheduler", {"prediction_type": "epsilon"})])
def test_learned_variance_channels_are_sliced_as_stock(name, cfg, seed, fused):
    """variance_type learned_range: diffusers keeps channels [:3] of an epsilon output."""
    var = lambda m: torch.cat([m, torch.tanh(m) * 0.3], dim=1)  # noqa: E731
    check(name, {**SD, **cfg, "variance_type": "learned_range"}, 7, seed, fused, model_out=var)


# ------------------------------------------------------------------------------------- the stock API


def _pairs(steps: int = 6):
    for name in CLASSES:
        cls = getattr(diffusers, name)
        cfg = {} if name == "IPNDMScheduler" else dict(SD)
        st, fu = cls(**cfg), from_diffusers(cls(**cfg))
        st.set_timesteps(steps)
        fu.set_timesteps(steps)
        yield name, cls, st, fu


def test_config_helpers_and_signatures_are_the_stock_ones(tmp_path):
    for name, cls, st, fu in _pairs():
        assert isinstance(fu, cls) and type(fu).__name__ == name and dict(fu.config) == dict(st.config)
        assert torch.equal(fu.timesteps, st.timesteps) and fu.init_noise_sigma == st.init_noise_sigma
        x = torch.randn(2, 3, 4, 5)
        t = st.timesteps[1]
        assert torch.equal(fu.scale_model_input(x, t), st.scale_model_input(x, t))
        if hasattr(st, "add_noise") and name != "IPNDMScheduler":
            noise, tt = torch.randn_like(x), st.timesteps[1:3]
            assert torch.equal(fu.add_noise(x[:2], noise[:2], tt), st.add_noise(x[:2], noise[:2], tt))
        for a, b in ((fu.step, st.step), (fu.set_timesteps, st.set_timesteps)):
            assert inspect.signature(a).parameters.keys() == inspect.signature(b).parameters.keys()
        # save_config / from_pretrained / from_config round trips: the same config, again a drop-in
        fu.save_config(tmp_path / name)
        back = cls.from_pretrained(tmp_path / name)
        strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert strip(back.config) == strip(st.config)
        again = type(fu).from_config(fu.config)
        assert type(again) is type(fu) and strip(again.config) == strip(cls.from_config(st.config).config)
        assert name in support_table()


def test_step_state_return_dict_and_output_classes_are_the_stock_ones(seed, fused):
    f = toy_model(seed)
    for name, cls, st, fu in _pairs():
        x0 = initial_noise(seed, 1.0)
        xs, xf = x0.clone(), x0.clone()
        for i, t in enumerate(st.timesteps):
            m = f(xs, t.float().expand(2))
            a = st.step(m, t, xs, return_dict=False)
            b = fu.step(m, t, xf, return_dict=i % 2 == 0)
            b = b if isinstance(b, tuple) else b.to_tuple()
            assert type(a) is tuple and len(b) == len(a), name
            assert rel_err(b[0], a[0]) <= TOL, (name, i)
            if len(a) == 2:  # DDIMInverseScheduler's pred_original_sample (clipped, as stock)
                assert rel_err(b[1], a[1]) <= TOL, (name, i)
            xs, xf = a[0], b[0]
            for attr in ("step_index", "counter", "lower_order_nums"):
                assert getattr(fu, attr, None) == getattr(st, attr, None), (name, attr)
        if name == "DDIMInverseScheduler":
            out = fu.step(f(xf, st.timesteps[-1].float().expand(2)), fu.timesteps[-1], xf)
            assert type(out).__name__ == "DDIMSchedulerOutput" and out.pred_original_sample.shape == xf.shape


@pytest.mark.parametrize("timestep", [lambda ts: ts[0], lambda ts: 7, lambda ts: int(ts[2]) + 3, lambda ts: 999,
                                      lambda ts: torch.tensor(0)])
@pytest.mark.parametrize("cfg", [{}, {"set_alpha_to_zero": False}, {"clip_sample": False, "prediction_type": "sample",
                                                                      "set_alpha_to_one": False}])
def test_ddim_inverse_steps_from_any_integer_timestep_as_stock(cfg, timestep, seed, fused):
    """diffusers' DDIMInverseScheduler computes a step from the timestep's value (and its deprecated
    ``set_alpha_to_zero`` sets the first alpha without changing the config): so does the drop-in."""
    st, fu = diffusers.DDIMInverseScheduler(**cfg), from_diffusers(diffusers.DDIMInverseScheduler(**cfg))
    st.set_timesteps(5)
    fu.set_timesteps(5)
    x, m = initial_noise(seed, 1.0), initial_noise(seed + 1, 1.0)
    a, b = st.step(m, timestep(st.timesteps), x), fu.step(m, timestep(fu.timesteps), x)
    assert len(fused) == 1
    assert rel_err(b.prev_sample, a.prev_sample) <= TOL
    assert rel_err(b.pred_original_sample, a.pred_original_sample) <= TOL
    with pytest.raises(ValueError, match="DDIMInverseScheduler.step.timestep=1000"):
        fu.step(m, 1000, x)


def test_ipndm_steps_on_its_constructor_grid_without_set_timesteps(seed, fused):
    st, fu = diffusers.IPNDMScheduler(), from_diffusers(diffusers.IPNDMScheduler())
    f = toy_model(seed)
    outs = []
    for s in (st, fu):
        x = initial_noise(seed, 1.0)
        for t in s.timesteps[:5]:
            x = s.step(f(x, t.expand(2)), t, x).prev_sample
        outs.append(x)
    assert len(fused) == 5 and rel_err(outs[1], outs[0]) <= TOL


# ------------------------------------------------------------------------------------- refused by name


@pytest.mark.parametrize("name, cfg, match", [
    ("PNDMScheduler", {"prediction_type": "sample"}, "prediction_type='sample'"),
    ("DEISMultistepScheduler", {"prediction_type": "flow_prediction"}, "use_flow_sigmas"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "thresholding": True,
                                      "final_sigmas_type": "sigma_min"}, "thresholding"),
    ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver", "prediction_type": "flow_prediction",
                                      "use_flow_sigmas": True, "final_sigmas_type": "sigma_min"}, "flow_prediction"),
    ("DPMSolverMultistepInverseScheduler", {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver"),
    ("DPMSolverMultistepInverseScheduler", {"algorithm_type": "sde-dpmsolver"}, "NaN"),
    ("DPMSolverMultistepInverseScheduler", {"solver_order": 4}, "solver_order=4"),
])
def test_unsupported_config_values_are_named(name, cfg, match):
    with pytest.raises(ValueError, match=match):
        from_diffusers(getattr(diffusers, name)(**cfg))


def test_ddim_inverse_sample_prediction_into_sigma_zero_is_refused_at_set_timesteps():
    fu = from_diffusers(diffusers.DDIMInverseScheduler(prediction_type="sample"))  # set_alpha_to_one=True
    with pytest.raises(ValueError, match="sigma = 0"):
        fu.set_timesteps(10)


def test_pndm_run_given_timesteps_out_of_order_is_refused(seed):
    fu = from_diffusers(diffusers.PNDMScheduler(**SD, skip_prk_steps=True))
    fu.set_timesteps(8)
    x = initial_noise(seed, 1.0)
    fu.step(x, fu.timesteps[0], x)
    with pytest.raises(ValueError, match="PNDMScheduler.step.*needs timestep"):
        fu.step(x, fu.timesteps[5], x)


def test_new_classes_are_in_the_support_table():
    assert set(CLASSES) <= set(SUPPORT)
    assert {SUPPORT[n].sampler({"algorithm_type": "dpmsolver++", "solver_order": 2}) for n in CLASSES} == \
        {"pndm", "ipndm", "deis", "dpm_single", "ddim_inverse", "dpm_inverse"}


# ------------------------------------------------------------------------------------- native samplers


@dataclasses.dataclass(frozen=True, eq=False)
class _VP32(schedules.VPSchedule):
    """A VP schedule whose samplers compute their coefficients with diffusers' float32 arithmetic."""

    scalar_dtype: object = torch.float32


def _f32(schedule):
    return _VP32(**{f.name: getattr(schedule, f.name) for f in dataclasses.fields(schedules.VPSchedule) if f.init})


SHAPE = (3, 5, 7, 3)  # odd sizes


def _stock_final(sched, model, x, steps, *, times=None, seed=None):
    """The stock loop's final state; ``times[i]``: the model time of call ``i`` (else the stock timestep)."""
    sched.set_timesteps(steps)
    kw = {"generator": torch.Generator().manual_seed(seed)} if seed is not None else {}
    for i, t in enumerate(sched.timesteps):
        tt = torch.full((x.shape[0],), float(times[i] if times is not None else t), dtype=x.dtype)
        x = sched.step(model(x, tt), t, x, **kw).prev_sample
    return x


def _native_case(name, cfg, steps, backend, dtype, seed, **options):
    _needs(backend)
    model = toy_model(seed, shape=SHAPE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    stock = getattr(diffusers, {"pndm": "PNDMScheduler", "deis": "DEISMultistepScheduler",
                                "dpm_single": "DPMSolverSinglestepScheduler",
                                "dpm_inverse": "DPMSolverMultistepInverseScheduler"}[name])(**cfg)
    schedule = options.pop("schedule", stock.config)
    gen = options.pop("generator", None)
    got = fastdiff.sample(model, noise, sampler=name, steps=steps, schedule=schedule, backend=backend,
                          generator=None if gen is None else torch.Generator().manual_seed(gen), **options)
    ref = _stock_final(stock, model, noise, steps, seed=gen)
    return got, ref


NATIVE = [("pndm", {**SD, "skip_prk_steps": True, "steps_offset": 1}, 10, {}),
          ("pndm", {**SD, "skip_prk_steps": False, "prediction_type": "v_prediction"}, 7, {}),
          ("pndm", {"timestep_spacing": "trailing", "skip_prk_steps": True}, 1, {}),
          ("deis", {**SD, "solver_order": 3}, 7, {"final": True}),
          ("deis", {**SD, "solver_order": 2, "prediction_type": "v_prediction", "use_karras_sigmas": True}, 2,
           {"final": True}),
          ("dpm_single", {**SD, "solver_order": 3, "solver_type": "heun"}, 9, {}),
          ("dpm_single", {**SD, "algorithm_type": "sde-dpmsolver++", "solver_order": 2}, 5, {"generator": 3}),
          ("dpm_inverse", {**SD, "solver_order": 3}, 6, {"f32": True})]


@pytest.mark.parametrize("name, cfg, steps, opts", NATIVE, ids=[f"{c[0]}-{c[2]}" for c in NATIVE])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("cpu", torch.float32),
                                            ("reference", torch.float64), ("cpu", torch.float64)])
def test_native_sampler_matches_stock(name, cfg, steps, opts, backend, dtype, seed):
    opts = dict(opts)
    if opts.pop("final", False):  # diffusers' DEIS ends at sigma_min (it has no final_sigmas_type)
        opts["schedule"] = schedules.from_config({**cfg, "final_sigmas_type": "sigma_min"})
    if opts.pop("f32", False):  # diffusers' float32 coefficients (the inversion's first step cancels)
        opts["schedule"] = _f32(schedules.from_config(cfg))
    got, ref = _native_case(name, cfg, steps, backend, dtype, seed, **opts)
    assert got.dtype == dtype and rel_err(got, ref) <= TOL, rel_err(got, ref)


def test_native_dpm_inverse_float64_coefficients_are_closer_to_exact_than_stock(seed):
    """In float64 coefficients (the default) the inversion's first step is exact where diffusers' float32
    ones are ~1e-5 off: the native result is within TOL + 2 err(stock, exact)."""
    cfg = {"solver_order": 2}  # linear betas: sigma_0 ~ 0.01, the first step multiplies x by ~100
    got, ref = _native_case("dpm_inverse", cfg, 3, "reference", torch.float32, seed)
    exact, _ = _native_case("dpm_inverse", cfg, 3, "reference", torch.float64, seed)
    assert rel_err(got, ref) <= TOL + 2 * rel_err(ref, exact)


@pytest.mark.parametrize("steps", [1, 4, 11])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("cpu", torch.float64)])
def test_native_ipndm_matches_stock_on_the_same_grid(steps, backend, dtype, seed):
    """``ipndm`` on SD's Euler grid vs diffusers' IPNDM given that grid (``trained_betas`` are its
    sigmas: the VP std of each point), the model told the native model times."""
    _needs(backend)
    sch = schedules.from_config({**SD, "timestep_spacing": "trailing"})
    plan = fastdiff.make_plan("ipndm", steps, sch)
    disc = sch.discretize(steps)
    stds = [float(s) / (1 + float(s) ** 2) ** 0.5 for s in disc.sigmas]
    model = toy_model(seed, shape=SHAPE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got = fastdiff.sample(model, noise, sampler="ipndm", steps=steps, schedule=sch, backend=backend,
                          prediction="v")  # diffusers' IPNDM reads the model output as v
    stock = diffusers.IPNDMScheduler(trained_betas=stds)
    x = noise * plan.init_scale / (1 + float(disc.sigmas[0]) ** 2) ** 0.5  # the VP state of the first point
    ref = _stock_final(stock, model, x, steps, times=[r.t for r in plan.rows])
    assert rel_err(got, ref) <= TOL, rel_err(got, ref)


@pytest.mark.parametrize("cfg", [SD, {**SD, "clip_sample": False, "prediction_type": "v_prediction",
                                      "timestep_spacing": "trailing"}])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("cpu", torch.float64)])
def test_native_ddim_inverse_plan_matches_stock(cfg, backend, dtype, seed):
    _needs(backend)
    stock = diffusers.DDIMInverseScheduler(**cfg)
    opts = {k: stock.config[k] for k in ("clip_sample", "clip_sample_range", "set_alpha_to_one")}
    pred = {"epsilon": "eps", "v_prediction": "v"}[stock.config.prediction_type]
    plan = ddim_inverse(schedules.from_config(stock.config), 9, pred, **opts)
    model = toy_model(seed, shape=SHAPE, gain=2.5)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    got = fastdiff.sample(model, x, plan=plan, backend=backend)
    assert rel_err(got, _stock_final(stock, model, x, 9)) <= TOL


@pytest.mark.parametrize("name, cfg, k", [("deis", {**SD, "solver_order": 3}, 4),
                                          ("dpm_single", {**SD, "solver_order": 3}, 2)])
def test_native_start_part_way_is_diffusers_img2img(name, cfg, k, seed):
    """``fastdiff.sample(image=, start_step=k)`` vs the stock loop after ``add_noise`` and
    ``set_begin_index(k)``: the same restarted warm-up (DEIS: lower_order_final on the whole run)."""
    cls = {"deis": diffusers.DEISMultistepScheduler, "dpm_single": diffusers.DPMSolverSinglestepScheduler}[name]
    schedule = schedules.from_config({**cfg, "final_sigmas_type": "sigma_min"} if name == "deis" else cfg)
    model = toy_model(seed)
    image, noise = initial_noise(seed + 5, 0.5), initial_noise(seed, 1.0)
    got = fastdiff.sample(model, noise, sampler=name, steps=12, schedule=schedule, image=image, start_step=k,
                          backend="reference")
    stock = cls(**cfg)
    stock.set_timesteps(12)
    x = stock.add_noise(image, noise, stock.timesteps[k:k + 1])
    stock.set_begin_index(k)
    for t in stock.timesteps[k:]:
        x = stock.step(model(x, t.float().expand(2)), t, x).prev_sample
    assert rel_err(got, x) <= TOL


@pytest.mark.parametrize("name", ["pndm", "ipndm", "deis", "dpm_single", "dpm_inverse"])
def test_native_plans_are_valid_at_small_and_odd_step_counts(name):
    for steps in (1, 2, 3, 5, 13):
        plan = fastdiff.make_plan(name, steps, dict(SD))
        assert plan.sampler == name and plan.steps == steps
        assert {r.step for r in plan.rows} == set(range(steps))


@pytest.mark.parametrize("name", ["pndm", "ipndm"])
def test_native_start_part_way_restarts_the_warm_up(name, seed):
    """``start_step=k``: a fresh warm-up on the grid from step ``k`` (pndm: its Euler + Heun pair again,
    with the jump of the whole run; ipndm: Adams–Bashforth from first order)."""
    from fastdiff.samplers.plans import plan_from_step

    full = fastdiff.make_plan(name, 10, dict(SD))
    part = plan_from_step(name, 10, 4, dict(SD))
    assert part.steps == 6 and part.rows[0].t == next(r.t for r in full.rows if r.step == 4)
    assert part.rows[0].reads == () and (part.rows[1].stage == 1 if name == "pndm" else len(part.rows[1].reads) == 1)
    image, noise = initial_noise(seed + 5, 0.5), initial_noise(seed, 1.0)
    out = fastdiff.sample(toy_model(seed), noise, sampler=name, steps=10, schedule=dict(SD), image=image,
                          start_step=4, backend="reference")
    assert torch.isfinite(out).all()
