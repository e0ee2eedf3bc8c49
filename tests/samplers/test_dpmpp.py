"""dpmpp_2m, dpmpp_3m, dpmpp_2m_sde, dpmpp_3m_sde, dpm_2: trajectories vs diffusers'
DPMSolverMultistepScheduler and k-diffusion's samplers, coefficient maths, options, convergence order."""

import math

import pytest
import torch

from fastdiff import samplers
from fastdiff.core import schedules
from fastdiff.samplers._multistep import divided_differences, log_snr, phi

from ._harness import (SD, NoiseTape, assert_close_traj, initial_noise, k_sampling, k_states, ours, patched_randn_like,
                       per_step, toy_model)
from ._multistep import compare_diffusers, compare_k_diffusion, convergence_slope, ve_schedule

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing
DPM = diffusers.DPMSolverMultistepScheduler

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1},
    {**SD, "timestep_spacing": "trailing"},
    {**SD, "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True},
    {"timestep_spacing": "trailing", "use_karras_sigmas": True},
]
ALGOS = {"dpmpp_2m": ("dpmsolver++", 2), "dpmpp_3m": ("dpmsolver++", 3),
         "dpmpp_2m_sde": ("sde-dpmsolver++", 2), "dpmpp_3m_sde": ("sde-dpmsolver++", 3)}


def _cfg(name: str, **kw) -> dict:
    alg, order = ALGOS[name]
    return {"algorithm_type": alg, "solver_order": order, **kw}


# ----------------------------------------------------------------------------- maths


def test_phi_matches_closed_forms():
    # closed forms phi_1 = (e^z - 1)/z, phi_2 = (e^z - 1 - z)/z^2, ... evaluated with 60 digits
    import decimal

    decimal.getcontext().prec = 60
    for z in (-30.0, -3.0, -1.0, -0.999, -0.3, -1e-3, -1e-9, 0.5, 2.0):
        zd = decimal.Decimal(z)
        acc, want = zd.exp(), [zd.exp()]
        for k in range(1, 5):
            acc = (acc - decimal.Decimal(1) / math.factorial(k - 1)) / zd
            want.append(acc)
        for k in range(5):
            assert phi(k, z) == pytest.approx(float(want[k]), rel=1e-14, abs=0.0), (k, z)
    for k in (1, 2, 3, 4):  # phi_k(-inf) = 0
        assert phi(k, -math.inf) == 0.0 and phi(k, 0.0) == 1 / math.factorial(k)
    assert log_snr(1.0, 0.0) == math.inf and log_snr(0.6, 0.8) == pytest.approx(math.log(0.75))


def test_divided_differences_are_exact_on_quadratics():
    # D1 ~ h f', D2 ~ h^2 f''/2 at the newest point, exactly for a quadratic in lambda
    lam = [0.0, -0.3, -0.8]  # lambda_i, lambda_{i-1}, lambda_{i-2}; step h = 0.25 ahead
    h = 0.25
    f = [2.0 + 3.0 * x - 1.5 * x * x for x in lam]
    d1, d2 = divided_differences([(lam[0] - lam[1]) / h, (lam[1] - lam[2]) / h])
    assert sum(c * v for c, v in zip(d1, f)) == pytest.approx(h * 3.0, rel=1e-12)
    assert sum(c * v for c, v in zip(d2, f)) == pytest.approx(h * h * -1.5, rel=1e-12)
    (d1_two,) = divided_differences([(lam[0] - lam[1]) / h])
    assert d1_two == pytest.approx([h / 0.3, -h / 0.3, 0.0])


# ----------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpmpp_2m_matches_diffusers(name, cfg, pred, seed):
    compare_diffusers(DPM, _cfg(name, **cfg, prediction_type=pred), name, 30, seed)


OPTION_CASES = [
    ({"solver_type": "heun"}, 30),
    ({"solver_type": "heun", "use_karras_sigmas": True}, 10),
    ({"lower_order_final": False}, 10),
    ({"euler_at_final": True, "final_sigmas_type": "sigma_min"}, 30),
    ({"final_sigmas_type": "sigma_min"}, 30),
    ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 8),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 20),
    ({"use_exponential_sigmas": True}, 30),
    ({"use_lu_lambdas": True}, 30),
    ({"timestep_spacing": "linspace"}, 30),
    ({"lambda_min_clipped": -5.1, "beta_schedule": "squaredcos_cap_v2"}, 30),
    ({"thresholding": True, "sample_max_value": 1.5}, 30),
    ({"prediction_type": "sample"}, 30),
    ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 30),
]


@pytest.mark.parametrize("opts, steps", OPTION_CASES)
@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_2m_sde"])
def test_dpmpp_2m_options_match_diffusers(name, opts, steps, seed):
    compare_diffusers(DPM, _cfg(name, **{**SD, **opts}), name, steps, seed)


@pytest.mark.parametrize("opts, steps", [({}, 30), ({"use_karras_sigmas": True}, 30), ({}, 12),
                                         ({"final_sigmas_type": "sigma_min", "lower_order_final": False}, 10)])
@pytest.mark.parametrize("name", ["dpmpp_3m", "dpmpp_3m_sde"])
def test_dpmpp_3m_matches_diffusers_order_3(name, opts, steps, seed):
    compare_diffusers(DPM, _cfg(name, **{**SD, **opts}), name, steps, seed)


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("name", list(ALGOS))
def test_dpmpp_few_steps_match_diffusers(name, steps, seed):
    compare_diffusers(DPM, _cfg(name, **SD), name, steps, seed)


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m"])
def test_dpmpp_float64_matches_diffusers(name, seed):
    # diffusers computes DPM-Solver steps in float32 even for float64 samples: 1e-5 still applies
    compare_diffusers(DPM, _cfg(name, **SD, use_karras_sigmas=True), name, 30, seed, dtype=torch.float64)


def test_dpmpp_2m_sde_float64_generator_noise_matches_diffusers(seed):
    compare_diffusers(DPM, _cfg("dpmpp_2m_sde", **SD), "dpmpp_2m_sde", 10, seed, dtype=torch.float64)


def test_sde_draws_like_diffusers():
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        plan = samplers.build(name, _cfg(name, **SD), 12)
        assert all(r.noise for r in plan.rows)  # one randn_tensor per step, also into sigma = 0
        assert plan.rows[-1].out[-1] == 0.0
    assert not any(r.noise for r in samplers.build("dpmpp_2m", SD, 12).rows)


# ----------------------------------------------------------------------------- k-diffusion


@pytest.mark.parametrize("pred", ["x0", "eps"])
@pytest.mark.parametrize("steps", [30, 2])
def test_dpmpp_2m_matches_k_diffusion(pred, steps, seed):
    compare_k_diffusion("dpmpp_2m", "sample_dpmpp_2m", steps, seed, prediction=pred)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.5, 0.8), (0.0, 1.0)])
def test_dpmpp_2m_sde_matches_k_diffusion(solver_type, eta, s_noise, seed):
    compare_k_diffusion("dpmpp_2m_sde", "sample_dpmpp_2m_sde", 30, seed, sde=True, eta=eta, s_noise=s_noise,
                        solver_type=solver_type)


@pytest.mark.parametrize("eta, s_noise", [(1.0, 1.0), (0.6, 1.1), (0.0, 1.0)])
@pytest.mark.parametrize("grid", ["karras", "exponential"])
def test_dpmpp_3m_sde_matches_k_diffusion(eta, s_noise, grid, seed):
    compare_k_diffusion("dpmpp_3m_sde", "sample_dpmpp_3m_sde", 30, seed, sde=True, grid=grid, eta=eta,
                        s_noise=s_noise)


@pytest.mark.parametrize("name, kfn, kw", [("dpmpp_2m", "sample_dpmpp_2m", {}),
                                            ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.7})])
def test_dpmpp_float64_matches_k_diffusion(name, kfn, kw, seed):
    compare_k_diffusion(name, kfn, 30, seed, dtype=torch.float64, tol=1e-12, sde=bool(kw), **kw)


@pytest.mark.parametrize("churn", [0.0, 2.0])
def test_dpm_2_matches_k_diffusion(churn, seed):
    sch = ve_schedule()
    n = 20
    opts = dict(s_churn=churn, s_tmin=0.05, s_tmax=10.0) if churn else {}
    plan = samplers.build("dpm_2", sch, n, prediction="x0", **opts)
    assert len(plan.rows) == 2 * n - 1  # two evaluations per step, one (Euler) into sigma = 0
    f = toy_model(seed)
    sig = torch.tensor(sch.discretize(n).sigmas, dtype=torch.float64)
    tape = NoiseTape(n, seed=seed + 7)
    x = initial_noise(seed, float(sig[0]))
    with patched_randn_like(tape):
        ref = k_states(k_sampling().sample_dpm_2, lambda xx, s: f(xx, s), x, sig, **opts)
    # k-diffusion adds step i's churn before its first model call; the plan at the end of step i-1
    got = ours(plan, f, x, noise_fn=lambda i, xx: tape.z[plan.rows[i].step + 1])
    assert_close_traj(per_step(plan, got), ref, 1e-5, what=f"dpm_2 churn={churn} seed={seed}")


def test_k_flavor_draws_like_k_diffusion():
    sch = ve_schedule()
    plan = samplers.build("dpmpp_2m_sde", sch, 10, prediction="x0")
    assert plan.meta["flavor"] == "k-diffusion"
    assert [r.noise for r in plan.rows] == [True] * 9 + [False]  # nothing drawn into sigma = 0
    assert not any(r.noise for r in samplers.build("dpmpp_3m_sde", sch, 10, prediction="x0", eta=0.0).rows)


# ----------------------------------------------------------------------------- options and errors


def test_name_fixes_the_algorithm():
    # algorithm_type / solver_order in a config do not change what a named sampler computes
    cfg = _cfg("dpmpp_3m_sde", **SD)
    two = samplers.build("dpmpp_2m", cfg, 10)
    assert max(two.meta["orders"]) == 2 and not any(r.noise for r in two.rows)
    assert two.rows == samplers.build("dpmpp_2m", SD, 10).rows


def test_dpmpp_errors_name_the_option():
    with pytest.raises(ValueError, match="variance_type='learned_range'"):
        samplers.build("dpmpp_2m", {**SD, "variance_type": "learned_range"}, 10)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        samplers.build("dpmpp_2m", SD, 10, solver_type="bh2")
    with pytest.raises(ValueError, match="flavor must be one of"):
        samplers.build("dpmpp_2m", SD, 10, flavor="comfy")
    with pytest.raises(ValueError, match="eta=0.5"):
        samplers.build("dpmpp_2m_sde", SD, 10, eta=0.5)  # diffusers flavor: eta is fixed at 1
    with pytest.raises(ValueError, match="euler_at_final"):
        samplers.build("dpmpp_2m", ve_schedule(), 10, prediction="x0", euler_at_final=True)
    with pytest.raises(ValueError, match="use_lu_lambdas"):
        samplers.build("dpmpp_2m", {**SD, "use_karras_sigmas": True, "use_lu_lambdas": True}, 10)
    with pytest.raises(ValueError, match="flow"):
        samplers.build("dpmpp_2m", schedules.FlowSchedule(), 10)


def test_plans_use_their_history_ring():
    for name, slots in (("dpmpp_2m", 1), ("dpmpp_3m", 2)):
        plan = samplers.build(name, SD, 30)
        assert plan.n_slots == slots
        assert all(len(r.reads) == plan.meta["orders"][r.step] - 1 for r in plan.rows)
        assert not plan.rows[-1].writes  # nothing left for a later row


# ----------------------------------------------------------------------------- convergence


def test_dpmpp_2m_converges_with_order_two(seed):
    slope, errs = convergence_slope("dpmpp_2m", seed)
    assert errs == sorted(errs, reverse=True), errs
    assert 1.8 <= slope <= 2.6, f"dpmpp_2m: fitted order {slope:.2f} (errors {errs}) seed={seed}"
