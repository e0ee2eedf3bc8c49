"""Inpainting through the fused mask blend: known pixels re-noised each step, exact at the end."""

import pytest
import torch

import fastdiff
from fastdiff.tasks import with_known_region

from ._plans import edm_euler, edm_euler_ancestral


def _model(x, t, c=None):
    return torch.tanh(x) * 0.7


@pytest.mark.parametrize("make", [edm_euler, edm_euler_ancestral])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_known_region_is_exact_at_the_end_and_renoised_on_the_way(make, dtype):
    plan = make(12)
    B, C, H, W = 3, 2, 6, 5
    known = torch.randn(B, C, H, W, dtype=dtype)
    mask = (torch.rand(B, 1, H, W) > 0.5).to(dtype)  # broadcast over channels, explicitly expanded
    seen = []
    out = fastdiff.sample(_model, torch.randn(B, C, H, W, dtype=dtype), plan=plan, seed=7, mask=mask, known=known,
                          backend="reference", callback=lambda i, s, x, x0: seen.append(x.clone()))
    keep = mask.expand_as(known) == 0
    assert torch.equal(out[keep], known[keep])
    # after row i the known region sits at row i+1's level: known + sigma_{i+1} * z2 (unit normal noise)
    i = 4
    resid = (seen[i][keep] - known[keep]) / plan.rows[i + 1].sigma_t
    assert abs(float(resid.mean())) < 0.25 and 0.75 < float(resid.std()) < 1.25
    gen = mask.expand_as(known) == 1
    assert not torch.equal(out[gen], known[gen])


def test_generator_mode_draws_the_renoising_noise():
    plan = edm_euler(5)
    known = torch.randn(2, 4)
    mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 1, 1]])
    a = fastdiff.sample(_model, torch.randn(2, 4), plan=plan, generator=torch.Generator().manual_seed(3),
                        mask=mask, known=known, backend="reference")
    assert torch.equal(a[mask == 0], known[mask == 0])


def test_mask_errors():
    plan = edm_euler(3)
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="mask and known go together"):
        fastdiff.sample(_model, x, plan=plan, mask=torch.ones(2, 1, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        fastdiff.sample(_model, x, plan=plan, mask=torch.ones(1, 3, 4), known=x)
    with pytest.raises(ValueError, match="rebuilds its state from history"):
        with_known_region(fastdiff.make_plan("unipc", 4))
