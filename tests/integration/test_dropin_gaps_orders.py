"""Issue 16 gaps: configs stock diffusers runs that the drop-ins refused, now run (or refused by a named reason).

- UniPCMultistepScheduler ``solver_order >= 4``: every step up to order 4 (the oldest corrector term folded
  into slot 0 by the row before; the drop-in's coefficients are diffusers' float32 ones); above, a step that reads more than a plan row's ``MAX_READS`` history
  buffers is refused by name when it runs (diffusers computes it), the steps before it match stock.
- LMSDiscreteScheduler ``step(order=k)``: every step up to order 8 (a row reads 3 derivatives and one sum of
  the older ones; the drop-in's weights are diffusers' float32 quadrature); the steps of order 9 and up are
  refused by name when they run.
- DPMSolverMultistep (``algorithm_type`` dpmsolver / sde-dpmsolver) and UniPC (``predict_x0=False``):
  ``prediction_type="v_prediction"`` (and ``sample``, ``epsilon``) with ``use_flow_sigmas=True``, on diffusers'
  float32 coefficients (the first flow point has ``alpha`` of 1e-3 / 1e-6: ``x / alpha`` cancels).
- FlowMatchEulerDiscreteScheduler ``step(per_token_timesteps=...)`` stays refused: the refusal says why.

Parity is :func:`tests.integration.test_dropin_multistep_new.check`: whole trajectories, the stock loop and
the drop-in side by side (same toy model, initial state and generator), every ``step`` one counted fused step,
every state within ``TOL = 1e-5`` relative of stock in float32, or, where diffusers' own float32 arithmetic
cancels (a noise-prediction solver's first flow step, an order-4 extrapolation to ``sigma_min``), the
drop-in's float64 run within ``TOL`` of diffusers' float64 run and its float32 state no further from that
than ``TOL + 2 err(stock float32)`` (DPM-Solver's float64 run with its step's float32 cast of the sample
undone, :func:`dpm_float64_step`; LMS with ``step(order=k)``: :func:`_lms_check`). Configs are drawn with the
fixed seeds of :data:`SEEDS`.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch

from tests.integration.test_dropin_multistep_new import TOL, WORST, _quiet, _stock_accepts, check, fused  # noqa: F401
from tests.samplers._harness import SD, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
from fastdiff.core.plan import MAX_READS  # noqa: E402
from fastdiff.diffusers import from_diffusers, support_table  # noqa: E402

SEEDS = list(range(10))
"""The fixed seeds the random configs are drawn with (each test draws several configs per seed)."""
CONFIGS_PER_SEED = 3


def _pick(r: random.Random, *options):
    return r.choice(options)


def _betas(r: random.Random) -> dict:
    cfg = _pick(r, dict(SD), {"beta_start": r.uniform(1e-5, 1e-3), "beta_end": r.uniform(0.008, 0.03)},
                {"beta_schedule": "squaredcos_cap_v2"})
    cfg["timestep_spacing"] = _pick(r, "leading", "trailing", "linspace")
    cfg["steps_offset"] = _pick(r, 0, 1)
    return cfg


def _vp_grid(r: random.Random) -> dict:
    return _pick(r, {}, {}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True})


def _draw(r: random.Random, make, name: str, tries: int = 40):
    """Configs from ``make(r) -> (cfg, steps, kw)`` that stock runs to a finite result, ``CONFIGS_PER_SEED`` of
    them, each with a late start (``set_begin_index``) now and then."""
    out = []
    for _ in range(tries):
        cfg, steps, kw = make(r)
        begin = r.randint(1, steps - 1) if steps > 2 and r.random() < 0.25 else None
        if _stock_accepts(name, cfg, steps, kw, begin):
            out.append((cfg, steps, kw, begin))
        if len(out) == CONFIGS_PER_SEED:
            break
    assert out, f"{name}: no config stock runs"
    return out


# ------------------------------------------------------------------------------------- UniPC order >= 4


def _unipc_high(r: random.Random) -> tuple[dict, int, dict]:
    """UniPC of order 4 (any run), or 5..8 on runs that never read more than MAX_READS buffers (with
    lower_order_final at most 2 MAX_READS steps; or every corrector off, order 5)."""
    predict_x0 = r.random() < 0.75
    cfg = {**_betas(r), "solver_type": _pick(r, "bh1", "bh2"), "predict_x0": predict_x0,
           "prediction_type": _pick(r, "epsilon", "v_prediction", "sample")}
    order = _pick(r, 4, 4, 4, 5, 6, 8)
    steps = r.randint(1, 25) if order == 4 else r.randint(1, 2 * MAX_READS)
    cfg["solver_order"] = order
    cfg["lower_order_final"] = order > 4 or r.random() < 0.7
    if order == 5 and r.random() < 0.4:  # no corrector: order 5 reads 4 earlier estimates only
        cfg["lower_order_final"], steps = r.random() < 0.5, r.randint(5, 16)
        cfg["disable_corrector"] = list(range(steps))
    elif r.random() < 0.25:
        cfg["disable_corrector"] = sorted(r.sample(range(12), 3))
    # diffusers' last step into sigma = 0 is NaN unless predict_x0 with a first-order bh2 last step
    finite_zero = predict_x0 and cfg["lower_order_final"] and cfg["solver_type"] == "bh2"
    cfg["final_sigmas_type"] = _pick(r, "zero", "sigma_min") if finite_zero else "sigma_min"
    cfg.update(_vp_grid(r))
    if r.random() < 0.2:
        cfg.update(use_flow_sigmas=True, flow_shift=_pick(r, 1.0, 3.0),
                   prediction_type=_pick(r, "flow_prediction", "v_prediction", "sample") if predict_x0
                   else _pick(r, "v_prediction", "sample", "epsilon"))
        for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            cfg.pop(k, None)
    kw = {}
    if predict_x0 and not cfg.get("use_flow_sigmas") and r.random() < 0.25:
        cfg.update(thresholding=True, sample_max_value=_pick(r, 1.0, 1.5), prediction_type="sample")
        kw["gain"] = 2.5
    return cfg, steps, kw


@pytest.mark.parametrize("s", SEEDS)
def test_unipc_high_orders_match_stock(s, fused):
    r = random.Random(1600 + s)
    for cfg, steps, kw, begin in _draw(r, _unipc_high, "UniPCMultistepScheduler"):
        print(f"UniPC {cfg} steps={steps} begin={begin} {kw}")
        worst = check("UniPCMultistepScheduler", cfg, steps, 1000 * s + steps, fused, begin=begin, **kw)
        print(f"    worst {worst:.3g}")


@pytest.mark.parametrize("cfg", [
    {**SD, "solver_order": 4, "lower_order_final": False, "final_sigmas_type": "sigma_min"},
    {**SD, "solver_order": 4, "use_karras_sigmas": True},
    {**SD, "solver_order": 4, "predict_x0": False, "final_sigmas_type": "sigma_min", "solver_type": "bh1"},
    {**SD, "solver_order": 4, "disable_corrector": [0, 3, 4, 9]},
])
@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("cpu", torch.float32)])
def test_unipc_order_four_on_each_backend(cfg, backend, dtype, fused):
    for steps in (6, 20):
        check("UniPCMultistepScheduler", cfg, steps, 7, fused, backend=backend, dtype=dtype)


def _steps_until_refused(name: str, cfg: dict, steps: int, seed: int, calls: list, step_kw=None) -> tuple[int, str]:
    """Stock and drop-in side by side (the drop-in fed stock's state) until the drop-in refuses a step: the
    index of that step and the refusal; every step before matches stock and runs one fused step."""
    cls = getattr(diffusers, name)
    stock, dropin = cls(**cfg), from_diffusers(cls(**cfg))
    for sch in (stock, dropin):
        sch.set_timesteps(steps)
    f = toy_model(seed)
    x = initial_noise(seed, float(stock.init_noise_sigma))
    for i, t in enumerate(stock.timesteps):
        m = f(stock.scale_model_input(x, t), t.float().expand(x.shape[0]))
        dropin.scale_model_input(x, t)
        ref = stock.step(m, t, x, **(step_kw or {})).prev_sample
        assert torch.isfinite(ref).all(), f"{name} {cfg}: stock is not finite at step {i}"
        before = len(calls)
        try:
            got = dropin.step(m, t, x, **(step_kw or {})).prev_sample
        except ValueError as exc:
            return i, str(exc)
        assert len(calls) == before + 1, f"{name}: step {i} ran {len(calls) - before} fused steps"
        assert rel_err(got, ref) <= TOL, f"{name} {cfg}: step {i} {rel_err(got, ref):.3g} from stock"
        x = ref
    return len(stock.timesteps), ""


@pytest.mark.parametrize("order, lof, steps, first", [(5, True, 12, 4), (5, False, 6, 4), (6, True, 20, 4),
                                                     (8, False, 10, 4), (5, True, 9, 4)])
def test_unipc_steps_beyond_the_row_contract_are_refused_by_name(order, lof, steps, first, fused):
    """A step that corrects and predicts with order >= 5 reads the corrected sample and 4 earlier estimates:
    5 history buffers, one more than a plan row has. Stock computes it (finite); the drop-in runs every step
    before it, then refuses it (and the rest) naming the reason."""
    cfg = {**SD, "solver_order": order, "lower_order_final": lof, "final_sigmas_type": "sigma_min"}
    at, why = _steps_until_refused("UniPCMultistepScheduler", cfg, steps, 3, fused)
    assert at == first, f"refused at step {at}, expected {first}: {why}"
    assert "UniPCMultistepScheduler.step: step 4" in why and "cannot be expressed as plan rows" in why
    assert f"reads {MAX_READS + 1} history buffers" in why and "diffusers' own step computes it" in why


# ------------------------------------------------------------------------------------- LMS step(order=k)


def _lms_traj(sched, model, x, steps: int, order: int, begin=None) -> list[torch.Tensor]:
    sched.set_timesteps(steps)
    ts = sched.timesteps
    if begin is not None:
        ts = ts[begin:]
        sched.set_begin_index(begin)
    out = []
    for t in ts:
        m = model(sched.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = sched.step(m, t, x, order=order).prev_sample
        out.append(x)
    return out


def _lms_check(cfg: dict, steps: int, order: int, seed: int, calls: list) -> float:
    """:func:`check` for LMS with ``step(order=order)``: whole trajectories within ``TOL`` of stock, or where
    diffusers' own float32 arithmetic is further off (a cosine schedule's first sigma ~ 1e4), the drop-in in
    float64 within ``TOL`` of stock in float64 and no further from it in float32 than ``TOL + 2 err(stock)``."""
    cls = diffusers.LMSDiscreteScheduler
    x = initial_noise(seed, float(cls(**cfg).init_noise_sigma))
    f = toy_model(seed)
    ref = _lms_traj(cls(**cfg), f, x, steps, order)
    before = len(calls)
    got = _lms_traj(from_diffusers(cls(**cfg)), f, x, steps, order)
    assert len(calls) - before == len(got) == len(ref), f"LMS: {len(calls) - before} fused steps, {len(ref)} steps"
    errs = [rel_err(g, e) for g, e in zip(got, ref)]
    if max(errs) > TOL:
        ref64 = _lms_traj(cls(**cfg), f, x.double(), steps, order)
        ours64 = _lms_traj(from_diffusers(cls(**cfg), backend="reference"), f, x.double(), steps, order)
        for i, e in enumerate(errs):
            formula, ours, stock = rel_err(ours64[i], ref64[i]), rel_err(got[i], ref64[i]), rel_err(ref[i], ref64[i])
            assert formula <= TOL and ours <= TOL + 2 * stock, (
                f"LMS {cfg} order={order} steps={steps}: step {i} {e:.3g} from stock; from stock in float64: "
                f"{ours:.3g} (ours), {stock:.3g} (stock), {formula:.3g} (ours in float64)")
    WORST["LMSDiscreteScheduler"] = max(WORST.get("LMSDiscreteScheduler", 0.0), max(errs))
    return max(errs)


@pytest.mark.parametrize("s", SEEDS[:5])  # (stock LMS integrates its weights with scipy per step: ~8 s a seed)
def test_lms_orders_up_to_eight_match_stock(s, fused):
    r = random.Random(1700 + s)
    for _ in range(CONFIGS_PER_SEED):
        cfg = {**_betas(r), **_vp_grid(r), "prediction_type": _pick(r, "epsilon", "v_prediction", "sample")}
        order, steps = r.randint(1, 2 * MAX_READS), _pick(r, 1, 3, 6, 9)
        worst = _lms_check(cfg, steps, order, s, fused)
        print(f"LMS {cfg} order={order} steps={steps}: worst {worst:.3g}")


@pytest.mark.parametrize("order", [9, 12])
def test_lms_steps_above_order_eight_are_refused_by_name(order, fused):
    """Step 8 of order 9 combines 8 earlier derivatives: a row reads 3 and one sum of 4 older ones, which
    leaves one out. Stock computes it; the drop-in runs steps 0..7 as stock, then refuses by name; a run
    of at most 8 steps runs whole."""
    at, why = _steps_until_refused("LMSDiscreteScheduler", SD, 12, 5, fused, {"order": order})
    assert at == 2 * MAX_READS, why
    assert "LMSDiscreteScheduler.step: step 8" in why and "cannot be expressed as plan rows" in why
    assert "orders up to 8 fit" in why and "diffusers' own step computes it" in why
    assert _steps_until_refused("LMSDiscreteScheduler", SD, 2 * MAX_READS, 5, fused, {"order": order})[0] == 8


# ------------------------------------------------------------------------------------- noise solvers on a flow grid


def _noise_on_flow(r: random.Random) -> tuple[str, dict, int, dict]:
    name = _pick(r, "UniPCMultistepScheduler", "DPMSolverMultistepScheduler")
    cfg = {"use_flow_sigmas": True, "flow_shift": _pick(r, 1.0, 3.0, 5.0), "final_sigmas_type": "sigma_min",
           "prediction_type": _pick(r, "v_prediction", "v_prediction", "sample", "epsilon"),
           "lower_order_final": r.random() < 0.8}
    kw = {}
    if name == "UniPCMultistepScheduler":
        cfg.update(predict_x0=False, solver_order=_pick(r, 1, 2, 3, 4), solver_type=_pick(r, "bh1", "bh2"))
    else:
        algo = _pick(r, "dpmsolver", "dpmsolver", "sde-dpmsolver")
        cfg.update(algorithm_type=algo, solver_order=_pick(r, 1, 2, 3) if algo == "dpmsolver" else _pick(r, 1, 2),
                   solver_type=_pick(r, "midpoint", "heun"), euler_at_final=r.random() < 0.2)
        if r.random() < 0.25:
            cfg.update(thresholding=True, sample_max_value=_pick(r, 1.0, 1.5))
            kw["gain"] = 2.5
    return name, cfg, _pick(r, 1, 2, 3, 5, 8, 12, 20), kw


class _Float32IsFloat64:
    """``torch`` with ``float32`` read as ``float64`` (see :func:`dpm_float64_step`)."""

    float32 = torch.float64

    def __getattr__(self, name: str):
        return getattr(torch, name)


@pytest.fixture
def dpm_float64_step(monkeypatch):
    """diffusers' DPMSolverMultistepScheduler.step casts the sample to float32 (its "upcast" line), so its
    float64 run, the reference :func:`check` compares with where float32 cancels, rounds ``x`` to float32
    and misses its own formula by ~1e-5 on a flow grid (``x / alpha``, alpha ~ 1e-4): for a float64 sample
    its step runs with that cast undone (the module's ``torch.float32`` read as float64 during the step;
    its noise is still drawn in float32, by :func:`check`'s float64 run)."""
    import diffusers.schedulers.scheduling_dpmsolver_multistep as mod

    stock_step = mod.DPMSolverMultistepScheduler.step

    @functools.wraps(stock_step)  # (the loop passes a generator where the signature has one)
    def step(self, model_output, timestep, sample, *args, **kwargs):
        if sample.dtype != torch.float64:
            return stock_step(self, model_output, timestep, sample, *args, **kwargs)
        mod.torch = _Float32IsFloat64()
        try:
            return stock_step(self, model_output, timestep, sample, *args, **kwargs)
        finally:
            mod.torch = torch

    monkeypatch.setattr(mod.DPMSolverMultistepScheduler, "step", step)


@pytest.mark.parametrize("s", SEEDS)
def test_noise_prediction_solvers_on_a_flow_grid_match_stock(s, fused, dpm_float64_step):
    r = random.Random(1800 + s)
    done = 0
    for _ in range(40):
        name, cfg, steps, kw = _noise_on_flow(r)
        begin = r.randint(1, steps - 1) if steps > 2 and r.random() < 0.25 else None
        if not _stock_accepts(name, cfg, steps, kw, begin):
            continue
        print(f"{name} {cfg} steps={steps} begin={begin} {kw}")
        worst = check(name, cfg, steps, 1000 * s + steps, fused, begin=begin, **kw)
        print(f"    worst {worst:.3g}")
        done += 1
        if done == CONFIGS_PER_SEED:
            break
    assert done, "no config stock runs"


@pytest.mark.parametrize("name, cfg", [
    ("UniPCMultistepScheduler", {"predict_x0": False}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "solver_order": 3, "lower_order_final": False}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 3}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "solver_type": "heun"}),
])
def test_v_prediction_on_a_flow_grid_with_a_noise_solver_is_supported(name, cfg, fused, dpm_float64_step):
    """Was refused ("v_prediction with use_flow_sigmas=True ... with a data-prediction solver only"): diffusers
    reads v as eps = s x + (1 - s) v there, and its run is finite."""
    cfg = {**cfg, "use_flow_sigmas": True, "flow_shift": 3.0, "prediction_type": "v_prediction",
           "final_sigmas_type": "sigma_min"}
    from_diffusers(getattr(diffusers, name)(**cfg))  # no refusal at construction
    for steps in (4, 10):
        check(name, cfg, steps, 11, fused)
    assert "with a data-prediction solver only" not in support_table()


# ------------------------------------------------------------------------------------- per_token_timesteps


def test_per_token_timesteps_stays_refused_and_says_why():
    """Stock gives every token its own sigma (per-element coefficients): the row contract has one scalar per
    coefficient per row, so the drop-in refuses it, naming the argument and the reason (table: the same)."""
    x = torch.randn(1, 9, 4)
    per_token = torch.linspace(500.0, 999.0, 9).reshape(1, 9)
    stock = diffusers.FlowMatchEulerDiscreteScheduler()
    stock.set_timesteps(5)
    assert torch.isfinite(stock.step(x, stock.timesteps[0], x, per_token_timesteps=per_token).prev_sample).all()
    fl = from_diffusers(diffusers.FlowMatchEulerDiscreteScheduler())
    fl.set_timesteps(5)
    with pytest.raises(ValueError, match="per_token_timesteps.*own sigma.*one scalar each per row"):
        fl.step(x, fl.timesteps[0], x, per_token_timesteps=per_token)
    line = next(ln for ln in support_table().splitlines() if ln.startswith("FlowMatchEulerDiscreteScheduler:"))
    assert "per_token_timesteps=None only (it gives every token its own sigma" in line


def test_support_table_lists_the_new_limits():
    table = {ln.split(":")[0]: ln for ln in support_table().splitlines()}
    assert f"every step up to order {2 * MAX_READS}" in table["LMSDiscreteScheduler"]
    assert f"every step up to order {MAX_READS}" in table["UniPCMultistepScheduler"]
    for name in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler"):
        assert "a noise-prediction solver: eps = s x + (1 - s) v" in table[name]
