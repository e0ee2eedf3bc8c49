"""fastdiff.core.guidance: per-row guidance scales, and the per-sample reductions of a guided step
(guidance rescale, dynamic thresholding) against their definitions and diffusers' own functions."""

import math

import pytest
import torch

from fastdiff.core.guidance import Guidance, dynamic_threshold, guided_output, rescale_factor, threshold_bound
from fastdiff.core.plan import Plan, Row, combo

from .._fixtures import _one_thread, seed  # noqa: F401  (fixtures, found by name)
from .._optional import diffusers  # parity tests skip in the test when diffusers is missing


def _plan(sigmas, stages=1) -> Plan:
    rows = tuple(Row(t=float(i), sigma=s, in_scale=1.0, a_x=0.0, a_e=1.0, out=combo(d=1.0), step=i, stage=k)
                 for i, s in enumerate(sigmas) for k in range(stages))
    return Plan(rows, init_scale=1.0, steps=len(sigmas))


def test_scales_per_row_from_a_number_a_sequence_and_a_function():
    plan = _plan([10.0, 5.0, 1.0], stages=2)
    assert Guidance(7.5).scales(plan) == [7.5] * 6
    assert Guidance((1.0, 2.0, 3.0)).scales(plan) == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert Guidance(lambda i, s: 1.0 + s).scales(plan) == [11.0, 11.0, 6.0, 6.0, 2.0, 2.0]
    assert Guidance().scales(plan) == [1.0] * 6


def test_interval_switches_guidance_off_outside():
    plan = _plan([10.0, 5.0, 1.0])
    assert Guidance(4.0, interval=(2.0, 6.0)).scales(plan) == [1.0, 4.0, 1.0]


def test_scale_errors_name_the_step():
    plan = _plan([10.0, 5.0])
    with pytest.raises(ValueError, match="3 entries but the plan has 2 steps"):
        Guidance((1.0, 2.0, 3.0)).scales(plan)
    with pytest.raises(ValueError, match=r"guidance_scale\(1, 5\)"):
        Guidance(lambda i, s: math.nan if i == 1 else 2.0).scales(plan)


def _rescale_closed_form(m_u, m_c, w, phi):
    """diffusers' rescale_noise_cfg written out: ``phi * cfg * std(c)/std(cfg) + (1 - phi) * cfg``."""
    col = (-1,) + (1,) * (m_u.dim() - 1)
    cfg = m_u + w.reshape(col) * (m_c - m_u)
    dims = list(range(1, m_u.dim()))
    ratio = m_c.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True)
    return phi * cfg * ratio + (1 - phi) * cfg, cfg


@pytest.mark.parametrize("extension", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 5, 7), (1, 9)])
def test_rescale_factor_is_diffusers_rescale(seed, extension, shape):
    g = torch.Generator().manual_seed(seed)
    m_u, m_c = torch.randn(2, *shape, generator=g)
    w = torch.rand(shape[0], generator=g) * 8 + 1
    phi = float(torch.rand((), generator=g))
    want, cfg = _rescale_closed_form(m_u.double(), m_c.double(), w.double(), phi)
    r = rescale_factor(m_u, m_c, w, phi, extension=extension)
    assert r.dtype == torch.float32 and r.shape == (shape[0],)
    got = r.double().reshape((-1,) + (1,) * (len(shape) - 1)) * cfg
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_rescale_factor_matches_diffusers_function(seed):
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    g = torch.Generator().manual_seed(seed)
    m_u, m_c = torch.randn(2, 2, 4, 8, 8, generator=g)
    w = torch.full((2,), 7.5)
    cfg = m_u + 7.5 * (m_c - m_u)
    want = rescale_noise_cfg(cfg, m_c, guidance_rescale=0.7)
    got = rescale_factor(m_u, m_c, w, 0.7).reshape(-1, 1, 1, 1) * cfg
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_constant_guided_output_keeps_its_scale():
    """diffusers divides 0 by 0 there (NaN); the factor is 1 instead."""
    m = torch.ones(2, 3, 4)
    assert torch.equal(rescale_factor(m, m, torch.full((2,), 3.0), 0.7, extension=False), torch.ones(2))


@pytest.mark.parametrize("ratio,max_value", [(0.995, 1.0), (0.9, 2.5), (0.5, 0.5)])
def test_dynamic_threshold_is_diffusers_threshold(seed, ratio, max_value):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(3, 4, 6, 6, generator=g) * 2
    s = dynamic_threshold(d, ratio, max_value)
    sched = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=max_value)
    want = sched._threshold_sample(d)
    got = torch.maximum(torch.minimum(d, s.reshape(-1, 1, 1, 1)), -s.reshape(-1, 1, 1, 1)) / s.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("extension", [True, False])
def test_threshold_bound_thresholds_the_rows_estimate(seed, extension):
    from fastdiff.core.args import pack_row

    g = torch.Generator().manual_seed(seed)
    x, m_u, m_c, gr = torch.randn(4, 2, 3, 5, 5, generator=g)
    w, r = torch.rand(2, generator=g) * 5, torch.rand(2, generator=g) + 0.5
    row = Row(t=1.0, sigma=1.0, in_scale=1.0, a_x=0.8, a_e=-0.6, out=combo(d=1.0), clip="dynamic")
    coef = pack_row(row, c_g=0.3)
    s = threshold_bound(x, m_u, m_c, w, r, coef, 0.9, 3.0, g=gr, extension=extension)
    e = guided_output(m_u, m_c, w, r, gr, 0.3, torch.float64)
    want = dynamic_threshold(0.8 * x.double() - 0.6 * e, 0.9, 3.0)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-5)
