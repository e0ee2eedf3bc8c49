"""Malformed ``step`` arguments of the drop-in schedulers, compared with the stock diffusers ones.

The rule: where the stock step fails with an unrelated error (``AttributeError: 'bool' object has
no attribute 'nonzero'`` for a string timestep, ``IndexError`` for a timestep not in the schedule,
``RuntimeError`` for shapes that do not broadcast), the drop-in raises a ``TypeError`` /
``ValueError`` naming the argument, before any state changes; where the stock step accepts an
input (model output and sample that broadcast, 0-d tensors, a numpy model output in the classes
whose arithmetic takes one, a one-element timestep tensor), the drop-in accepts it and returns
the stock step's result (``DDIMScheduler`` steps from ANY integer timestep, as diffusers' does: the
row of that timestep is built on demand).

What stock 0.42 raises for each refused case is asserted alongside (the reason for the refusal).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from tests.samplers._harness import rel_err

diffusers = pytest.importorskip("diffusers")
from fastdiff.diffusers import SUPPORT, from_diffusers  # noqa: E402

CLASSES = [n for n in SUPPORT if n != "CogVideoXDPMScheduler"]
"""Every class whose ``step`` is ``step(model_output, timestep, sample, ...)``; CogVideoXDPMScheduler's takes
``(model_output, old_pred_original_sample, timestep, timestep_back, sample)``: the same checks, in its
signature, are in test_pipelines_dropin.py."""
X_SHAPE = (2, 3, 4, 4)
TOL = 1e-5


# class-specific setup, so that stock and drop-in are comparable at all: DPMSolverSDE's default config
# seeds its Brownian tree from torch's global RNG at the first step (two runs differ, stock or not)
DEFAULT_CFG = {"DPMSolverSDEScheduler": {"noise_sampler_seed": 0}}


def _new(name: str, cfg: dict | None = None, fused: bool = False):
    """A scheduler of class ``name`` (the drop-in if ``fused``) with ``cfg`` over the class's default setup."""
    s = getattr(diffusers, name)(**{**DEFAULT_CFG.get(name, {}), **(cfg or {})})
    return from_diffusers(s) if fused else s


def _pair(name: str, cfg: dict | None = None, steps: int = 5):
    stock, fused = _new(name, cfg), _new(name, cfg, fused=True)
    stock.set_timesteps(steps)
    fused.set_timesteps(steps)
    return stock, fused


def _x(seed: int = 0, shape=X_SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _kw(sched, seed: int | None = None) -> dict:
    ok = seed is not None and "generator" in inspect.signature(sched.step).parameters
    return {"generator": torch.Generator().manual_seed(seed)} if ok else {}


def _run(sched, mshape, xshape, step_kwargs=None, seed=0, numpy_m=False, steps=4, numpy_x=False):
    """A short diffusers loop with a model output of ``mshape`` for a sample of ``xshape``; the states."""
    sched.set_timesteps(steps)
    kw = {**_kw(sched, seed), **(step_kwargs or {})}
    x = _x(seed, xshape) * float(getattr(sched, "init_noise_sigma", 1.0))
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for t in sched.timesteps:
        u = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        m = 0.3 * torch.tanh(u.mean() + torch.randn(mshape, generator=g))
        r = sched.step(m.numpy() if numpy_m else m, t, x.numpy() if numpy_x else x, **kw)
        x = r.prev_sample
        out.append(x)
    return out


def _same_run(stock_out, fused_out):
    assert len(stock_out) == len(fused_out)
    for i, (a, b) in enumerate(zip(fused_out, stock_out)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        assert rel_err(a, b) <= TOL, (i, rel_err(a, b))


# ------------------------------------------------------------------ refused by name

MALFORMED = [
    # (id, (timesteps, x) -> (model_output, timestep, sample), exception, argument named)
    ("timestep-str", lambda ts, x: (x, "x", x), TypeError, "timestep"),
    ("timestep-none", lambda ts, x: (x, None, x), TypeError, "timestep"),
    ("timestep-list", lambda ts, x: (x, [float(ts[0])], x), TypeError, "timestep"),
    ("timestep-two-values", lambda ts, x: (x, ts[:2], x), ValueError, "timestep"),
    ("timestep-batch", lambda ts, x: (x, ts[0].expand(2), x), ValueError, "timestep"),
    ("model-output-str", lambda ts, x: ("abc", ts[0], x), TypeError, "model_output"),
    ("model-output-none", lambda ts, x: (None, ts[0], x), TypeError, "model_output"),
    ("model-output-list", lambda ts, x: (x.tolist(), ts[0], x), TypeError, "model_output"),
    ("sample-str", lambda ts, x: (x, ts[0], "abc"), TypeError, "sample"),
    ("sample-none", lambda ts, x: (x, ts[0], None), TypeError, "sample"),
    ("sample-numpy", lambda ts, x: (x, ts[0], x.numpy()), TypeError, "sample"),
    ("shapes-do-not-broadcast", lambda ts, x: (torch.randn(2, 3, 4, 5), ts[0], x), ValueError, "model_output"),
    ("model-output-on-meta", lambda ts, x: (x.to("meta"), ts[0], x), ValueError, "model_output is on meta"),
]


@pytest.mark.parametrize("case, make, exc, arg", MALFORMED, ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("name", CLASSES)
def test_malformed_arguments_are_refused_by_name(name, case, make, exc, arg):
    stock, fused = _pair(name)
    x = _x()
    if case == "sample-numpy" and SUPPORT[name].array_sample:
        # stock EDM DPM-Solver and PNDM take a numpy sample (their arithmetic with tensors makes it one):
        # the drop-in takes it too, with the stock result at every step
        _same_run(_run(stock, X_SHAPE, X_SHAPE, numpy_x=True), _run(fused, X_SHAPE, X_SHAPE, numpy_x=True))
        return
    with pytest.raises(Exception) as stock_err:  # noqa: PT011 - stock fails too, with an unrelated error
        stock.step(*make(stock.timesteps, x))
    assert stock_err.type is not exc or arg not in str(stock_err.value)  # ... that does not name the argument
    with pytest.raises(exc) as info:
        fused.step(*make(fused.timesteps, x))
    msg = str(info.value)
    assert arg in msg and name in msg, msg
    # refused before any work: the run still starts at step 0 and matches the stock run
    f = _run(fused, X_SHAPE, X_SHAPE)
    _same_run(_run(_new(name), X_SHAPE, X_SHAPE), f)


# stock classes whose lookup takes a first timestep it does not find as the LAST step (DPM-Solver's rule)
UNKNOWN_IS_LAST = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EDMDPMSolverMultistepScheduler",
                   "DEISMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverMultistepInverseScheduler",
                   "SASolverScheduler")


@pytest.mark.parametrize("name", [n for n in CLASSES if SUPPORT[n].indexed and n not in UNKNOWN_IS_LAST])
@pytest.mark.parametrize("shift", [0.5, float("nan")])
def test_first_timestep_not_in_the_schedule_is_refused(name, shift):
    """Stock looks the first step's position up by value and fails with an IndexError naming nothing."""
    stock, fused = _pair(name)
    x = _x()
    t = float(stock.timesteps[0]) + shift
    with pytest.raises(IndexError):
        stock.step(x, t, x)
    with pytest.raises(ValueError, match=r"timestep=.*one of scheduler.timesteps"):
        fused.step(x, t, x)


LAST = [(n, {}) for n in UNKNOWN_IS_LAST if n != "SASolverScheduler"]
LAST += [("SASolverScheduler", {"tau_func": lambda t: 1}), ("SASolverScheduler", {"tau_func": lambda t: 0})]


@pytest.mark.parametrize("name, cfg", LAST, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LAST)])
@pytest.mark.parametrize("shift", [0.5, float("nan")])
def test_multistep_unknown_first_timestep_is_the_last_step_as_in_stock(name, cfg, shift):
    """diffusers' DPM-Solver and UniPC (and the classes that share their lookup) take a timestep they do
    not know as the last step; so does the drop-in (SA-Solver: where its tau_func gives that timestep
    the last step's tau)."""
    stock, fused = _pair(name, cfg)
    x = _x()
    t = float(stock.timesteps[0]) + shift
    a, b = stock.step(x, t, x, **_kw(stock, 0)).prev_sample, fused.step(x, t, x, **_kw(fused, 0)).prev_sample
    assert stock.step_index == fused.step_index == len(stock.timesteps)  # (ran the last step)
    assert rel_err(b, a) <= TOL


@pytest.mark.parametrize("shift", [0.5, float("nan")])
def test_sa_solver_unknown_first_timestep_with_another_tau_runs_as_stock(shift):
    """Stock SA-Solver runs it as the last step too, but with tau_func of the timestep AS GIVEN (999.5 or
    NaN: tau 0, the last grid timestep 200: tau 1), which no row of the run has: the drop-in builds that
    row for the tau as given, with the stock result."""
    stock, fused = _pair("SASolverScheduler")
    x = _x()
    t = float(stock.timesteps[0]) + shift
    a = stock.step(x, t, x, **_kw(stock, 0)).prev_sample
    assert stock.step_index == len(stock.timesteps)
    ref, _ = _pair("SASolverScheduler")  # the stock last step at its own timestep: another tau, another result
    ref.set_begin_index(len(ref.timesteps) - 1)
    assert rel_err(ref.step(x, ref.timesteps[-1], x, **_kw(ref, 0)).prev_sample, a) > 10 * TOL
    assert rel_err(fused.step(x, t, x, **_kw(fused, 0)).prev_sample, a) <= TOL
    assert fused.step_index == len(fused.timesteps)


@pytest.mark.parametrize("timestep", [lambda ts: int(ts[1]) - 1, lambda ts: float("nan")])
def test_ddpm_timestep_not_in_the_schedule_is_refused(timestep):
    stock, fused = _pair("DDPMScheduler")
    x = _x()
    with pytest.raises(IndexError):
        stock.step(x, timestep(stock.timesteps), x)
    with pytest.raises(ValueError, match=r"DDPMScheduler.step\(timestep=.*one of scheduler.timesteps"):
        fused.step(x, timestep(fused.timesteps), x)


@pytest.mark.parametrize("timestep", [lambda ts: int(ts[1]) - 1, lambda ts: 1, lambda ts: 0, lambda ts: -1,
                                      lambda ts: torch.tensor(7), lambda ts: ts[2] + 3])
def test_ddim_off_grid_integer_timestep_runs_as_in_stock(timestep):
    """diffusers' DDIM computes the step from the timestep value (into t - T // steps): so does the drop-in."""
    stock, fused = _pair("DDIMScheduler")
    x, m = _x(), _x(1)
    a = stock.step(m, timestep(stock.timesteps), x).prev_sample
    assert rel_err(fused.step(m, timestep(fused.timesteps), x).prev_sample, a) <= TOL


@pytest.mark.parametrize("timestep", [lambda ts: 500.5, lambda ts: float("nan"), lambda ts: 1000, lambda ts: -1001])
def test_ddim_timestep_diffusers_cannot_index_is_refused(timestep):
    stock, fused = _pair("DDIMScheduler")
    x = _x()
    with pytest.raises(IndexError):
        stock.step(x, timestep(stock.timesteps), x)
    with pytest.raises(ValueError, match=r"DDIMScheduler.step\(timestep=.*(one of scheduler.timesteps|IndexError)"):
        fused.step(x, timestep(fused.timesteps), x)


# ------------------------------------------------------------------ accepted as stock accepts

NOISY = [
    ("DDPMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 1.0}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0}),
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "prediction_type": "sample"}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]
RUNS = [(n, DEFAULT_CFG.get(n, {}), {}) for n in CLASSES] + NOISY


@pytest.mark.parametrize("mshape, xshape", [((1, 3, 4, 4), (2, 3, 4, 4)), ((3, 4, 4), (2, 3, 4, 4)),
                                            ((2, 3, 4, 4), (1, 3, 4, 4)), ((2, 1, 4, 4), (2, 3, 4, 4))],
                         ids=["batch-1-output", "fewer-dims-output", "batch-1-sample", "one-channel-output"])
@pytest.mark.parametrize("name, cfg, step_kwargs", RUNS, ids=[f"{n}-{c}-{k}" for n, c, k in RUNS])
def test_broadcasting_shapes_run_as_in_stock(name, cfg, step_kwargs, mshape, xshape):
    """diffusers' arithmetic broadcasts the model output against the sample (and draws noise in the
    model output's, the sample's or the broadcast shape); the drop-in computes the same. Where stock
    fails (SA-Solver adds a wider model output into a sample-shaped result in place), refused by name."""
    if name == "SASolverScheduler" and torch.broadcast_shapes(mshape, xshape) != xshape:
        with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
            _run(_new(name, cfg), mshape, xshape, step_kwargs)
        with pytest.raises(ValueError, match=r"SASolverScheduler.step: model_output .* broadcasts the sample"):
            _run(_new(name, cfg, fused=True), mshape, xshape, step_kwargs)
        return
    _same_run(_run(_new(name, cfg), mshape, xshape, step_kwargs), _run(_new(name, cfg, fused=True), mshape, xshape,
                                                                       step_kwargs))


@pytest.mark.parametrize("name", CLASSES)
def test_zero_dimensional_tensors_as_in_stock(name):
    """0-d sample and model output: deterministic steps run (as in stock); a step that draws noise
    is refused by name where stock fails in its noise draw (which reads a batch size)."""
    try:
        ref = _run(_new(name), (), ())
    except IndexError:
        ref = None
    if ref is None or name == "UniPCMultistepScheduler":
        # UniPC's stock step fails on 0-d tensors inside its corrector (a dimension error); the drop-in
        # runs them (nothing is drawn, nothing is ambiguous): more lenient, never different
        if ref is None and name != "UniPCMultistepScheduler":
            with pytest.raises(ValueError, match="draws noise.*batch dimension"):
                _run(_new(name, fused=True), (), ())
        return
    _same_run(ref, _run(_new(name, fused=True), (), ()))


@pytest.mark.parametrize("name", CLASSES)
def test_numpy_model_output_as_in_stock(name):
    if SUPPORT[name].array_model_output:
        _same_run(_run(_new(name), X_SHAPE, X_SHAPE, numpy_m=True), _run(_new(name, fused=True), X_SHAPE, X_SHAPE,
                                                                    numpy_m=True))
        return
    with pytest.raises((TypeError, AttributeError)):  # stock: to() / randn() of a numpy dtype
        _run(_new(name), X_SHAPE, X_SHAPE, numpy_m=True)
    with pytest.raises(TypeError, match=f"{name}.step: model_output must be a torch.Tensor"):
        _run(_new(name, fused=True), X_SHAPE, X_SHAPE, numpy_m=True)


_LENIENT_UNINDEXED = tuple((IndexError, f) for f in ("float", "numpy-float", "numpy-0d", "numpy-shape-1"))
_LENIENT_FORMS = {"LCMScheduler": ((IndexError, "float"), (IndexError, "numpy-float"), (TypeError, "numpy-shape-1")),
                  "TCDScheduler": ((IndexError, "float"), (IndexError, "numpy-float"))}
FORMS = {"shape-1": lambda t: t.reshape(1), "float": lambda t: float(t), "numpy-float": lambda t: np.float64(t),
         "numpy-0d": lambda t: np.array(float(t)), "numpy-shape-1": lambda t: np.array([float(t)])}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", CLASSES)
def test_one_value_timestep_forms_as_in_stock(name, form):
    stock, fused = _pair(name)
    x = _x()
    t = stock.timesteps[0]
    try:
        a = stock.step(x, FORMS[form](t), x, **_kw(stock, 0)).prev_sample
    except (IndexError, TypeError) as exc:
        # stock DDPM/DDIM (and LCM/TCD) index alphas_cumprod with the value as given (a float fails),
        # stock LCM multiplies the sample by c_skip computed from a numpy (1,) timestep (a TypeError);
        # the drop-in takes the value (one of scheduler.timesteps): more lenient, never a different step
        assert (type(exc), form) in _LENIENT_FORMS.get(name, _LENIENT_UNINDEXED if not SUPPORT[name].indexed
                                                      else ()), (type(exc), exc)
        a = _pair(name)[0].step(x, t, x, **_kw(stock, 0)).prev_sample  # the stock step at that timestep
        assert rel_err(fused.step(x, FORMS[form](t), x, **_kw(fused, 0)).prev_sample, a) <= TOL
        return
    b = fused.step(x, FORMS[form](t), x, **_kw(fused, 0)).prev_sample
    assert rel_err(b, a) <= TOL


@pytest.mark.parametrize("name", CLASSES)
def test_two_dimensional_one_value_timestep(name):
    """Shape (1, 1): DDPM and DDIM use the value (so does the drop-in); the others look the first
    step up with it and fail (``RuntimeError: a Tensor with 2 elements``): refused by name."""
    stock, fused = _pair(name)
    x = _x()
    t = stock.timesteps[0].reshape(1, 1)
    if not SUPPORT[name].indexed:
        a = stock.step(x, t, x, **_kw(stock, 0)).prev_sample
        assert rel_err(fused.step(x, t, x, **_kw(fused, 0)).prev_sample, a) <= TOL
        return
    with pytest.raises(RuntimeError):
        stock.step(x, t, x)
    with pytest.raises(ValueError, match=rf"{name}.step: timestep must be a single value of shape \(\) or \(1,\)"):
        fused.step(x, t, x)
    fused.step(x, t.reshape(1), x, **_kw(fused, 0))  # refused before any work: the run starts as usual
    if name == "SASolverScheduler":
        # diffusers' later SA-Solver steps read the value: tau_func(timestep as given), here tau(999) = 0
        # at step 1, whose own timestep has tau 1 (stock: another result, and its next corrector takes
        # tau(999) too): the drop-in's rows for those taus, and the later step at its own timestep in
        # that shape, run as in stock
        stock.step(x, t.reshape(1), x, **_kw(stock, 0))
        a = stock.step(x, t, x, **_kw(stock, 1)).prev_sample
        assert rel_err(fused.step(x, t, x, **_kw(fused, 1)).prev_sample, a) <= TOL
        t2 = stock.timesteps[2].reshape(1, 1)
        a = stock.step(x, t2, x, **_kw(stock, 2)).prev_sample
        assert rel_err(fused.step(x, t2, x, **_kw(fused, 2)).prev_sample, a) <= TOL
        return
    fused.step(x, t, x, **_kw(fused, 0))  # later steps ignore the value, as diffusers' do


# ------------------------------------------------------------------ other step arguments


def test_generator_of_the_wrong_type_is_refused_where_noise_is_drawn():
    stock, fused = _pair("DDPMScheduler")
    x = _x()
    with pytest.raises(AttributeError):  # stock: 'int' object has no attribute 'device'
        stock.step(x, stock.timesteps[0], x, generator=5)
    with pytest.raises(TypeError, match=r"DDPMScheduler.step: generator must be a torch.Generator"):
        fused.step(x, fused.timesteps[0], x, generator=5)
    # no noise drawn (DDIM, eta = 0): stock never reads the generator, nor does the drop-in
    stock, fused = _pair("DDIMScheduler")
    a = stock.step(x, stock.timesteps[0], x, generator=5).prev_sample
    assert rel_err(fused.step(x, fused.timesteps[0], x, generator=5).prev_sample, a) <= TOL


@pytest.mark.parametrize("name, cfg, kw", [("DDIMScheduler", {}, {"eta": 1.0}),
                                           ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {})])
def test_variance_noise_is_checked_by_name_and_broadcasts_as_in_stock(name, cfg, kw):
    x = _x()
    stock, fused = _pair(name, cfg)
    with pytest.raises(Exception):  # noqa: PT011,B017 - stock: an unrelated error from its arithmetic
        stock.step(x, stock.timesteps[0], x, variance_noise="abc", **kw)
    with pytest.raises(TypeError, match=f"{name}.step: variance_noise must be a torch.Tensor"):
        fused.step(x, fused.timesteps[0], x, variance_noise="abc", **kw)
    stock, fused = _pair(name, cfg)
    with pytest.raises(ValueError, match=r"variance_noise \(2, 3, 4, 5\) does not broadcast"):
        fused.step(x, fused.timesteps[0], x, variance_noise=torch.randn(2, 3, 4, 5), **kw)
    z = torch.randn(1, 3, 4, 4)  # broadcasts over the batch, as diffusers' arithmetic does
    a = stock.step(x, stock.timesteps[0], x, variance_noise=z, **kw).prev_sample
    b = fused.step(x, fused.timesteps[0], x, variance_noise=z, **kw).prev_sample
    assert rel_err(b, a) <= TOL


# ------------------------------------------------------------------ trained_betas and num_train_timesteps


@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_trained_betas_shorter_than_num_train_timesteps_refused_at_set_timesteps(name):
    """Stock builds the grid and fails at the first step with an IndexError; the drop-in refuses
    when set_timesteps builds its plan, naming trained_betas."""
    betas = np.linspace(1e-4, 0.02, 10).tolist()
    cls = getattr(diffusers, name)
    stock = cls(trained_betas=betas)
    stock.set_timesteps(5)
    x = _x()
    with pytest.raises(IndexError):
        stock.step(x, stock.timesteps[0], x)
    fused = from_diffusers(cls(trained_betas=betas))
    with pytest.raises(ValueError, match="trained_betas has 10 entries but num_train_timesteps is 1000"):
        fused.set_timesteps(5)


@pytest.mark.parametrize("name, step_kwargs", [("DDIMScheduler", {}), ("DDIMScheduler", {"eta": 0.5}),
                                               ("DDPMScheduler", {})])
def test_trained_betas_longer_than_num_train_timesteps_run_as_in_stock(name, step_kwargs):
    """diffusers keeps every beta and jumps num_train_timesteps // steps; the drop-in jumped len(betas) // steps."""
    betas = np.linspace(1e-4, 0.02, 1200).tolist()
    cls = getattr(diffusers, name)
    _same_run(_run(cls(trained_betas=betas), X_SHAPE, X_SHAPE, step_kwargs),
              _run(from_diffusers(cls(trained_betas=betas)), X_SHAPE, X_SHAPE, step_kwargs))
