"""unipc: trajectories vs diffusers' UniPCMultistepScheduler, plan structure, errors, convergence order."""

import pytest
import torch

from fastdiff import samplers
from fastdiff.core.plan import MAX_READS, MAX_WRITES

from ._harness import SD, assert_close_traj, diffusers_loop, initial_noise, ours, toy_model
from ._multistep import compare_diffusers, convergence_slope, ve_schedule

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing
UNIPC = diffusers.UniPCMultistepScheduler

GRIDS = [
    {**SD, "timestep_spacing": "leading", "steps_offset": 1},
    {**SD, "timestep_spacing": "trailing"},
    {**SD, "timestep_spacing": "leading", "steps_offset": 1, "use_karras_sigmas": True},
    {"timestep_spacing": "trailing", "use_karras_sigmas": True},
]


@pytest.mark.parametrize("cfg", GRIDS)
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_unipc_matches_diffusers(cfg, pred, seed):
    compare_diffusers(UNIPC, {**cfg, "prediction_type": pred}, "unipc", 30, seed)


OPTION_CASES = [
    ({"solver_order": 1}, 30),
    ({"solver_order": 3}, 30),
    ({"solver_order": 3, "use_karras_sigmas": True}, 10),
    ({"solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 30),
    ({"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 30),
    ({"lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
    ({"solver_order": 3, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, 10),
    ({"disable_corrector": [0, 3, 4, 28]}, 30),
    ({"final_sigmas_type": "sigma_min"}, 30),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 30),
    ({"use_exponential_sigmas": True}, 30),
    ({"timestep_spacing": "linspace"}, 30),
    ({"thresholding": True, "sample_max_value": 1.5}, 30),
    ({"prediction_type": "sample"}, 30),
    ({"predict_x0": False, "final_sigmas_type": "sigma_min"}, 30),
    ({"predict_x0": False, "final_sigmas_type": "sigma_min", "solver_order": 3, "thresholding": True}, 12),
    ({"rescale_betas_zero_snr": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 30),
]


@pytest.mark.parametrize("opts, steps", OPTION_CASES)
def test_unipc_options_match_diffusers(opts, steps, seed):
    compare_diffusers(UNIPC, {**SD, **opts}, "unipc", steps, seed)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("order", [2, 3])
def test_unipc_few_steps_match_diffusers(order, steps, seed):
    compare_diffusers(UNIPC, {**SD, "solver_order": order}, "unipc", steps, seed)


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_float64_matches_diffusers(order, seed):
    # diffusers' coefficients are float32 even for float64 samples: 1e-5 still applies
    compare_diffusers(UNIPC, {**SD, "solver_order": order, "use_karras_sigmas": True}, "unipc", 30, seed,
                      dtype=torch.float64)


def test_unipc_on_a_k_grid_runs_in_both_dtypes(seed):
    # k-diffusion has no UniPC to compare with; on a VE grid the float32 run must track float64
    sch = ve_schedule()
    plan = samplers.build("unipc", sch, 20, prediction="x0")
    assert plan.init_scale == pytest.approx(30.0) and plan.rows[0].t == pytest.approx(30.0)
    f = toy_model(seed)
    x = initial_noise(seed, plan.init_scale, dtype=torch.float64)
    assert_close_traj(ours(plan, f, x.float()), ours(plan, f, x), 1e-5, what=f"unipc ve seed={seed}")
    with pytest.raises(ValueError, match="prediction 'v' needs a vp schedule"):
        samplers.build("unipc", sch, 20, prediction="v")


def test_unipc_plan_structure():
    for order in (1, 2, 3):
        plan = samplers.build("unipc", {**SD, "solver_order": order}, 30)
        assert plan.n_slots == 1 + order and not any(r.noise for r in plan.rows)
        assert max(len(r.reads) for r in plan.rows) == order + 1 <= MAX_READS
        assert all(len(r.writes) == MAX_WRITES for r in plan.rows[:-1]) and not plan.rows[-1].writes
        # every row except the first corrects the previous sample: it reads and rewrites slot 0
        assert all(r.reads[0] == 0 and r.writes[0].slot == 0 for r in plan.rows[1:-1])
    skipped = samplers.build("unipc", {**SD, "disable_corrector": [3]}, 30)
    assert 0 not in skipped.rows[4].reads and all(w.slot != 0 for w in skipped.rows[3].writes)


def test_unipc_errors_name_the_option():
    with pytest.raises(ValueError, match="solver_order must be an int >= 1, got 0"):
        samplers.build("unipc", SD, 10, solver_order=0)
    # order 4 fits (its oldest corrector term folded into slot 0); order 5 corrects with five reads
    assert max(len(r.reads) for r in samplers.build("unipc", SD, 10, solver_order=4).rows) == MAX_READS
    with pytest.raises(ValueError, match=f"unipc step 4 .*reads 5 history buffers.*at most {MAX_READS}"):
        samplers.build("unipc", SD, 10, solver_order=5)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        samplers.build("unipc", SD, 10, solver_type="midpoint")
    with pytest.raises(ValueError, match="solver_p"):
        samplers.build("unipc", SD, 10, solver_p=object())
    with pytest.raises(ValueError, match="disable_corrector"):
        samplers.build("unipc", SD, 10, disable_corrector=["x"])
    # diffusers returns NaN/inf here: refuse instead of emitting a different finite answer
    with pytest.raises(ValueError, match="lower_order_final=True"):
        samplers.build("unipc", {**SD, "lower_order_final": False}, 10)
    with pytest.raises(ValueError, match="predict_x0=False"):
        samplers.build("unipc", {**SD, "predict_x0": False}, 10)


def test_unipc_bh1_into_zero_takes_the_limit(seed):
    # diffusers' bh1 last step into sigma = 0 computes B(h) * 0 = -inf * 0 = NaN; the plan takes the
    # limit (the first-order step, as bh2) and matches diffusers at every step before it
    n = 12
    plan = samplers.build("unipc", {**SD, "solver_type": "bh1"}, n)
    assert plan.rows[-1].out == samplers.build("unipc", SD, n).rows[-1].out
    f = toy_model(seed)
    x = initial_noise(seed, 1.0)
    ref = diffusers_loop(UNIPC(**SD, solver_type="bh1"), f, x, n)
    got = ours(plan, f, x)
    assert not bool(torch.isfinite(ref[-1]).all()) and bool(torch.isfinite(got[-1]).all())
    assert_close_traj(got[:-1], ref[:-1], 1e-5, what=f"unipc bh1 seed={seed}")


def test_unipc_converges_with_order_three(seed):
    # UniPC-2 (B2(h), corrector on) is third order (Zhao et al. 2023, Thm 3.3); the fitted slope
    # over 8..64 steps lies near 3, comfortably above the >= 2 required of it
    slope, errs = convergence_slope("unipc", seed)
    assert errs == sorted(errs, reverse=True), errs
    assert 2.4 <= slope <= 4.2, f"unipc: fitted order {slope:.2f} (errors {errs}) seed={seed}"


def test_dpmpp_and_unipc_share_the_first_step():
    # both start with the first-order DPM-Solver++ step (DDIM in log-SNR): identical first rows
    d, u = samplers.build("dpmpp_2m", SD, 20), samplers.build("unipc", SD, 20)
    assert d.rows[0].out[:2] == pytest.approx(u.rows[0].out[:2], rel=1e-14)
