"""A KDPM2 / KDPM2 ancestral run whose first call is a second stage of a solver step (issue 16).

diffusers' KDPM2 schedulers keep ``state_in_first_order`` as ``sample is None``: a run whose first
``step`` is found at an odd index of the interleaved grid (``set_begin_index(i)``, or a timestep lookup
that lands on a midpoint timestep) starts with no first-stage sample, so stock takes that call as a
FIRST stage and pairs the calls ``(i, i + 1), (i + 2, i + 3), ...``, each reading its arrays at its own
index. KDPM2's first stage then moves from ``sigmas[i]`` up to ``sigmas_interpol[i + 1]`` and its
second stage has length 0 (it returns the kept sample); KDPM2 ancestral's pairs are its steps from the
next grid point, the last of which divides by a ``sigmas_interpol`` of 0 (NaN in stock: refused by the
drop-in when that call runs). The drop-in runs such a run with fused rows of its own.

The schedulers step in lockstep from the STOCK state (as in test_dropin_fuzz): every ``step`` is compared
on its own, ``prev_sample`` and ``pred_original_sample`` within ``TOL`` relative (further only where
stock's own float32 step is that far from the exact one, as test_dropin_fuzz allows), with the same
model output and generator, and every drop-in step runs exactly one fused step. Without a generator both
steps draw from torch's global RNG (tests/integration/test_dropin_stock_api.py checks that the draws
are stock's); here stock runs with its noise set to zero and the drop-in's difference from it must be
``sigma_up`` times standard normal noise.

Also: the drop-in's rows stand each on its own (diffusers' float32 arrays at the call's index), so a
run started in the finite part of a grid whose first sigmas are NaN runs as stock; DPMSolverSDE, whose
stock step at an odd start or at a NaN sigma gives NaN or never returns (torchsde), is refused by name.
"""

from __future__ import annotations

import copy
import random
import sys

import pytest
import torch

from tests.samplers._harness import SD, count_fused_steps, initial_noise, rel_err, toy_model

diffusers = pytest.importorskip("diffusers")
from fastdiff.diffusers import from_diffusers  # noqa: E402

TOL = 1e-5
KDPM2 = ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
GRIDS = ({}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True})
BETAS = ({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}, SD,
         {"beta_schedule": "squaredcos_cap_v2"})
SHAPE = (2, 3, 4, 5)

pytestmark = [
    # torchsde's Brownian interval queried at sigma_min's float32 round trip (diffusers' own call, warned there too)
    pytest.mark.filterwarnings("ignore:Should have t[ab][<>]=t[01]:UserWarning"),
]


def _pair(name: str, cfg: dict, steps: int):
    """The stock scheduler and its drop-in, both after ``set_timesteps(steps)``."""
    proto = getattr(diffusers, name)(**cfg)  # (KDPM2's constructor sets 1000 steps: built once, then copied)
    proto.set_timesteps(steps)
    stock = copy.deepcopy(proto)
    fused = from_diffusers(proto)
    fused.set_timesteps(steps)
    return stock, fused


def _random_pair(seed: int, name: str):
    """``_pair`` of a random config (betas, spacing, sigma grid, prediction type) and step count, one whose
    grid the drop-in plans (not one of KDPM2 ancestral's grids with a float32 sigma_down of 0, refused at
    set_timesteps: test_dropin_distilled_new)."""
    r = random.Random(seed)
    while True:
        cfg = {**r.choice(BETAS), **r.choice(GRIDS), "prediction_type": r.choice(["epsilon", "v_prediction"]),
               "timestep_spacing": r.choice(["linspace", "leading", "trailing"])}
        try:
            return _pair(name, cfg, r.randint(3, 9))
        except ValueError:
            continue


def _odd_start(stock, seed: int, how: str) -> int:
    """An odd index (a second stage) to start at; by lookup, one whose timestep the lookup finds there."""
    ts = stock.timesteps
    odd = [i for i in range(1, len(ts), 2) if how == "begin" or int((ts == ts[i]).sum()) == 1]
    if not odd:
        pytest.skip("no odd timestep the lookup finds there (the grid repeats them)")
    return random.Random(seed).choice(odd)


def _stock_step(stock, m, t, x, kw: dict, zero_noise: bool, exact: bool = False):
    """Stock's step; with ``zero_noise`` its noise is 0 (the deterministic part of the step). ``exact``:
    the same step in float64 (stock's float32 sigmas, its noise drawn in float32), the value both float32
    steps round."""
    mod = sys.modules[type(stock).__module__]
    orig = getattr(mod, "randn_tensor", None)
    if exact:
        m, x = m.double(), x.double()
    if zero_noise:
        mod.randn_tensor = lambda shape, **k: torch.zeros(shape, dtype=k.get("dtype"))
    elif exact and orig is not None:
        mod.randn_tensor = lambda shape, dtype=None, **k: orig(shape, dtype=torch.float32, **k).to(dtype)
    try:
        return stock.step(m, t, x, **kw)
    finally:
        if orig is not None:
            mod.randn_tensor = orig


def _close(got: torch.Tensor, ref: torch.Tensor, exact) -> str:
    """``""`` where ``got`` is within ``TOL`` of stock's ``ref``, or further only where stock's own float32
    arithmetic is that far from the ``exact()`` step (as test_dropin_fuzz allows); else what differs."""
    e = rel_err(got, ref)
    if e <= TOL:
        return ""
    truth = exact()
    e_s, e_o = rel_err(ref, truth), rel_err(got, truth)
    if e <= TOL + 2 * e_s and e_o <= TOL + e_s:
        return ""
    return f"{e:.3g} from stock (from the exact step: ours {e_o:.3g}, stock {e_s:.3g})"


def _lockstep(stock, fused, start: int, how: str, seed: int, *, generator: bool = True, shape=SHAPE) -> list[str]:
    """Stock and drop-in (fresh from ``set_timesteps``) from call ``start`` (``set_begin_index`` or lookup),
    both stepping from stock's state; asserts every call as described in the module docstring, returns
    what each call did."""
    name = type(stock).__name__
    if how == "begin":
        stock.set_begin_index(start)
        fused.set_begin_index(start)
    ts = stock.timesteps[start:]
    x = initial_noise(seed, float((stock.sigmas[start] ** 2 + 1) ** 0.5), shape=shape)
    model = toy_model(seed, shape=shape)
    ancestral = name == "KDPM2AncestralDiscreteScheduler"
    zero = ancestral and not generator
    what, calls = f"{name} {dict(stock.config)} start={start} ({how}) seed={seed}", []
    with count_fused_steps() as counted:
        for c, t in enumerate(ts):
            u = stock.scale_model_input(x, t)
            assert torch.equal(fused.scale_model_input(x, t), u), f"{what}: call {c}: scale_model_input"
            assert stock.step_index == fused.step_index == start + c, what
            first = stock.state_in_first_order
            assert fused.state_in_first_order == first, f"{what}: call {c}: state_in_first_order"
            up = float(stock.sigmas_up[stock.step_index - 1]) if ancestral and not first else 0.0
            m = model(u, t.to(x.dtype).expand(x.shape[0]))
            kws = [{"generator": torch.Generator().manual_seed(seed + c)} if ancestral and generator else {}
                   for _ in range(3)]
            before = copy.deepcopy(stock)
            ref = _stock_step(stock, m, t, x, kws[0], zero)
            n0 = counted.n
            if not torch.isfinite(ref.prev_sample).all():
                with pytest.raises(ValueError, match=name):
                    fused.step(m, t, x, **kws[1])
                assert counted.n == n0, f"{what}: call {c}: a refused call ran a fused step"
                calls.append("refused")
                break
            got = fused.step(m, t, x, **kws[1])
            assert counted.n == n0 + 1, f"{what}: call {c} ran {counted.n - n0} fused steps"
            assert got.prev_sample.dtype == ref.prev_sample.dtype, what
            truth = []

            def exact(field):
                if not truth:
                    truth.append(_stock_step(before, m, t, x, kws[2], zero, exact=True))
                return getattr(truth[0], field)

            bad = _close(got.pred_original_sample, ref.pred_original_sample, lambda: exact("pred_original_sample"))
            assert not bad, f"{what}: call {c}: pred_original_sample {bad}"
            if zero and up > 0:
                z = (got.prev_sample.double() - ref.prev_sample.double()) / up
                assert abs(float(z.mean())) < 0.2 and 0.85 < float(z.std()) < 1.15, \
                    f"{what}: call {c}: noise mean {float(z.mean()):.3g}, std {float(z.std()):.3g}"
            else:
                bad = _close(got.prev_sample, ref.prev_sample, lambda: exact("prev_sample"))
                assert not bad, f"{what}: call {c}: prev_sample {bad}"
            calls.append("first" if first else "second")
            x = ref.prev_sample
    return calls


@pytest.mark.parametrize("how", ["begin", "lookup"])
@pytest.mark.parametrize("name", KDPM2)
def test_second_stage_start_runs_as_stock(name, how, seed):
    """Random configs, a run started at a random odd index: stock pairs the calls from there."""
    for k in range(3):
        stock, fused = _random_pair(seed + k, name)
        start = _odd_start(stock, seed + k, how)
        calls = _lockstep(stock, fused, start, how, seed + k)
        pairs = ["second" if j % 2 else "first" for j in range(len(stock.timesteps) - start)]  # from a first stage
        if name == "KDPM2AncestralDiscreteScheduler":  # its last pair divides by sigmas_interpol = 0 (NaN in stock)
            pairs[-1] = "refused"
        assert calls == pairs, calls


@pytest.mark.parametrize("how", ["begin", "lookup"])
def test_ancestral_second_stage_start_without_generator(how, seed):
    """Without a generator: the deterministic part as stock's, the noise sigma_up times a standard normal."""
    stock, fused = _random_pair(seed, "KDPM2AncestralDiscreteScheduler")
    torch.manual_seed(seed)
    calls = _lockstep(stock, fused, _odd_start(stock, seed, how), how, seed, generator=False, shape=(2, 4, 16, 16))
    assert calls[-1] == "refused", calls


@pytest.mark.parametrize("name", KDPM2)
def test_karras_grid_at_timesteps_1(name, seed):
    """The issue's case: the first step by lookup at timesteps[1] (a midpoint timestep), the whole run."""
    cfg = {"num_train_timesteps": 100, "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing",
           "use_karras_sigmas": True, "prediction_type": "epsilon"}
    calls = _lockstep(*_pair(name, cfg, 9), 1, "lookup", seed)
    assert calls[:4] == ["first", "second", "first", "second"], calls


def test_kdpm2_second_stage_run_returns_the_kept_sample(seed):
    """KDPM2's shifted second stages have length 0: the drop-in returns the sample its first stage kept."""
    _, fused = _pair("KDPM2DiscreteScheduler", SD, 5)
    fused.set_begin_index(3)
    x = initial_noise(seed, 2.0)
    m = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    y = fused.step(m, fused.timesteps[3], x).prev_sample
    assert not torch.equal(y, x)
    assert torch.equal(fused.step(m * 0.5, fused.timesteps[4], y).prev_sample, x)
    assert fused.state_in_first_order


@pytest.mark.parametrize("name", KDPM2)
def test_a_new_run_after_a_shifted_one_is_the_plain_run(name, seed):
    """set_timesteps after a shifted run: a run from index 0, then one from an even index, as stock."""
    stock, fused = _random_pair(seed, name)
    _lockstep(stock, fused, _odd_start(stock, seed, "begin"), "begin", seed)
    steps = stock.num_inference_steps
    for s in (stock, fused):
        s.set_timesteps(steps)
    assert "refused" not in _lockstep(stock, fused, 0, "begin", seed + 1)
    for s in (stock, fused):
        s.set_timesteps(steps)
    assert "refused" not in _lockstep(stock, fused, 2 * random.Random(seed).randrange(steps), "begin", seed + 2)


@pytest.mark.parametrize("name, cfg", [("HeunDiscreteScheduler", SD),
                                       ("FlowMatchHeunDiscreteScheduler", {"shift": 3.0})])
def test_heun_second_stage_start_still_as_stock(name, cfg, seed):
    """Heun / FlowMatchHeun share the shifted-run code: their odd starts (set_begin_index) still run as
    stock (Heun's: every step of length 0; their lookup takes a repeated timestep at its second place)."""
    stock, fused = _pair(name, cfg, 5)
    start = _odd_start(stock, seed, "begin")
    stock.set_begin_index(start)
    fused.set_begin_index(start)
    x = initial_noise(seed, float(getattr(stock, "init_noise_sigma", 1.0)))
    model = toy_model(seed)
    with count_fused_steps() as counted:
        for c, t in enumerate(stock.timesteps[start:]):
            u = stock.scale_model_input(x, t) if hasattr(stock, "scale_model_input") else x
            m = model(u, t.to(x.dtype).expand(x.shape[0]))
            ref = stock.step(m, t, x).prev_sample
            got = fused.step(m, t, x).prev_sample
            assert counted.n == c + 1
            assert rel_err(got, ref) <= TOL, f"{name} start={start} call {c}"
            x = ref


def test_sde_second_stage_start_is_refused_where_stock_is_nan(seed):
    """DPMSolverSDE at an odd start: stock's first stage there has length 0 and its noise 0/0 (NaN);
    the drop-in refuses that call by name."""
    cfg = {**SD, "noise_sampler_seed": seed % 1000}
    stock, fused = _pair("DPMSolverSDEScheduler", cfg, 4)
    for s in (stock, fused):
        s.set_begin_index(3)
    x = initial_noise(seed, 2.0)
    m = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    assert not torch.isfinite(stock.step(m, stock.timesteps[3], x).prev_sample).all()
    with count_fused_steps() as counted, pytest.raises(ValueError, match="DPMSolverSDEScheduler"):
        fused.step(m, fused.timesteps[3], x)
    assert counted.n == 0


# a grid whose float32 alphas_cumprod underflows to 0 at high timesteps: its first sigmas and timesteps are NaN
UNDERFLOW = {"beta_schedule": "linear", "beta_start": 0.0014, "beta_end": 0.43, "timestep_spacing": "leading",
             "use_exponential_sigmas": True}


@pytest.mark.parametrize("name", KDPM2)
def test_late_start_into_the_finite_part_of_a_nan_grid_runs_as_stock(name, seed):
    """Every start index: where stock's first step is finite the drop-in's is the same, else refused by name
    (each call's row stands on its own: a NaN early in the grid refuses only its own calls)."""
    stock0, _ = _pair(name, UNDERFLOW, 5)
    assert torch.isnan(stock0.sigmas).any() and torch.isfinite(stock0.sigmas[-4:]).all()
    finite = 0
    for b in range(len(stock0.timesteps)):
        stock, fused = _pair(name, UNDERFLOW, 5)
        for s in (stock, fused):
            s.set_begin_index(b)
        x = initial_noise(seed + b, 1.0)
        m = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed + b))
        kws = [{"generator": torch.Generator().manual_seed(seed)} if "Ancestral" in name else {} for _ in range(2)]
        t = stock.timesteps[b]
        ref = stock.step(m, t, x, **kws[0]).prev_sample
        with count_fused_steps() as counted:
            if torch.isfinite(ref).all():
                finite += 1
                assert rel_err(fused.step(m, t, x, **kws[1]).prev_sample, ref) <= TOL, f"{name} begin {b}"
                assert counted.n == 1
            else:
                with pytest.raises(ValueError, match=name):
                    fused.step(m, t, x, **kws[1])
    assert finite >= 1


def test_sde_step_at_a_nan_sigma_is_refused_not_hung(seed):
    """DPMSolverSDE on a grid with NaN sigmas: diffusers' step hands them to torchsde's Brownian interval,
    which never returns (test_dropin_fuzz draws no such grid for it); the drop-in refuses by name."""
    fused = from_diffusers(diffusers.DPMSolverSDEScheduler(**UNDERFLOW, noise_sampler_seed=seed % 1000))
    fused.set_timesteps(5)
    nan = [b for b in range(len(fused.timesteps)) if not torch.isfinite(fused.sigmas[b])]
    assert nan
    fused.set_begin_index(random.Random(seed).choice(nan))
    x = initial_noise(seed, 1.0)
    with count_fused_steps() as counted, pytest.raises(ValueError, match="DPMSolverSDEScheduler"):
        fused.step(torch.randn_like(x), fused.timesteps[fused.begin_index], x)
    assert counted.n == 0
