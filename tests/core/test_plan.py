"""fastdiff.core.plan: the row language's closed forms and the checks every plan passes.

The data-estimate and score coefficients are checked against their definitions on fresh random
data: build ``u = alpha x0 + sigma eps``, the model output each parameterization defines, and
require the row's ``a_x x + a_e e`` to give back ``x0`` (``grad log p`` for the score).
"""

import math

import pytest
import torch

from fastdiff.core.plan import (MAX_READS, MAX_WRITES, N_OPERANDS, OP_D, OP_E, OP_H, OP_X, OP_Z, PREDICTIONS, Plan,
                                Row, Write, check_prediction, combo, score_coeffs, x0_coeffs)

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)


def _problem(seed: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    r = float(torch.rand((), generator=g, dtype=torch.float64)) * 0.9 + 0.05
    if kind == "vp":  # alpha^2 + sigma^2 = 1
        alpha, sigma = math.sqrt(1 - r), math.sqrt(r)
    elif kind == "flow":  # alpha = 1 - t, sigma = t
        alpha, sigma = 1 - r, r
    else:  # ve-like: alpha = 1, sigma anything
        alpha, sigma = 1.0, 10 * r
    in_scale = float(torch.rand((), generator=g, dtype=torch.float64)) + 0.5
    return x0, eps, alpha, sigma, in_scale


def _output(pred: str, x0, eps, alpha, sigma):
    return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0, "flow": eps - x0,
            "score": -eps / sigma}[pred]


@pytest.mark.parametrize("pred,kind", [("eps", "vp"), ("eps", "ve"), ("x0", "vp"), ("v", "vp"), ("flow", "flow"),
                                       ("score", "vp"), ("score", "ve")])
def test_x0_coeffs_give_back_the_data(seed, pred, kind):
    x0, eps, alpha, sigma, in_scale = _problem(seed, kind)
    u = alpha * x0 + sigma * eps
    x = u / in_scale  # the state; the model sees in_scale * x
    a_x, a_e = x0_coeffs(pred, alpha, sigma, in_scale)
    got = a_x * x + a_e * _output(pred, x0, eps, alpha, sigma)
    torch.testing.assert_close(got, x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pred", ["eps", "x0", "v", "score"])
def test_score_coeffs_are_tweedies_gradient(seed, pred):
    """``grad_x log p_t(x) = in_scale (alpha x0_hat - u) / sigma^2`` with ``x0_hat`` the row's estimate."""
    x0, eps, alpha, sigma, in_scale = _problem(seed, "vp")
    u = alpha * x0 + sigma * eps
    x = u / in_scale
    e = _output(pred, x0, eps, alpha, sigma)
    a_x, a_e = x0_coeffs(pred, alpha, sigma, in_scale)
    l_x, l_e = score_coeffs(a_x, a_e, alpha, sigma, in_scale)
    want = in_scale * (alpha * (a_x * x + a_e * e) - u) / sigma**2
    torch.testing.assert_close(l_x * x + l_e * e, want, rtol=1e-10, atol=1e-10)
    if pred in ("eps", "score"):  # the model output alone is the score there: l_x is exactly 0
        assert l_x == 0.0


def test_score_coeffs_refuse_sigma_zero():
    with pytest.raises(ValueError, match="sigma > 0"):
        score_coeffs(1.0, 0.0, 1.0, 0.0)


@pytest.mark.parametrize("alias,name", [("epsilon", "eps"), ("sample", "x0"), ("v_prediction", "v"),
                                        ("flow_prediction", "flow"), *[(p, p) for p in PREDICTIONS]])
def test_check_prediction_takes_diffusers_names(alias, name):
    assert check_prediction(alias) == name


def test_check_prediction_names_the_bad_value():
    with pytest.raises(ValueError, match="'noise'"):
        check_prediction("noise")
    with pytest.raises(ValueError, match="alpha = 0"):
        x0_coeffs("score", 0.0, 1.0)


def test_combo_puts_each_operand_at_its_position():
    c = combo(x=1.5, d=-2.0, h=(3.0, 4.0), z=0.25, e=7.0)
    assert len(c) == N_OPERANDS
    assert (c[OP_X], c[OP_D], c[OP_E], c[OP_Z]) == (1.5, -2.0, 7.0, 0.25)
    assert c[OP_H:OP_H + MAX_READS] == (3.0, 4.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="history coefficients"):
        combo(h=(1.0,) * (MAX_READS + 1))


def _row(**kw):
    base = dict(t=1.0, sigma=1.0, in_scale=1.0, a_x=1.0, a_e=-1.0, out=combo(x=1.0))
    return Row(**{**base, **kw})


@pytest.mark.parametrize("kw,match", [
    (dict(out=(0.0,) * (N_OPERANDS - 1)), "Row.out must have"),
    (dict(reads=tuple(range(MAX_READS + 1))), "at most"),
    (dict(writes=(Write(0, combo(x=1.0)),) * (MAX_WRITES + 1)), "at most"),
    (dict(clip="soft"), "Row.clip"),
    (dict(a_x=math.nan), "non-finite"),
    (dict(out=combo(x=1.0, z=0.5)), "noise=False"),
    (dict(snr=0.1, noise=True), "Langevin row"),
])
def test_row_refuses_what_no_kernel_runs(kw, match):
    with pytest.raises(ValueError, match=match):
        _row(**kw)


def test_write_needs_every_operand():
    with pytest.raises(ValueError, match="Write.coef"):
        Write(0, (1.0,))


def test_plan_checks_slots_and_settings():
    r = _row(reads=(1,), out=combo(x=1.0, h=(0.5,)))
    with pytest.raises(ValueError, match="addresses slot 1"):
        Plan((r,), init_scale=1.0, n_slots=1)
    assert len(Plan((r,), init_scale=1.0, n_slots=2)) == 1
    with pytest.raises(ValueError, match="snr_norm"):
        Plan((), init_scale=1.0, snr_norm="row")
    with pytest.raises(ValueError, match="estimate"):
        Plan((), init_scale=1.0, estimate="v")


def test_meta_does_not_take_part_in_equality():
    """``meta`` is for reports: two plans that run the same are equal whatever it holds."""
    r = _row()
    assert Plan((r,), init_scale=1.0, meta={"a": 1}) == Plan((r,), init_scale=1.0)
