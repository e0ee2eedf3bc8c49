"""fastdiff.k_diffusion against k-diffusion on the inputs a careless (or hostile) caller gives it:
sigmas of another dtype than ``x`` or a model that returns another dtype (with churn), ``x`` in
another memory layout, float64 ``sigma_min`` tensors with ``eta > 0``, zero steps, and callbacks
that keep or write into their payload. k-diffusion is a test-only dependency (each parity test
skips by itself without it); tolerances are 1e-5 relative in fp32, as in test_k_diffusion.py.
"""

import math

import pytest
import torch

from fastdiff import k_diffusion as K
from tests.samplers._harness import k_sampling, rel_err, toy_model

CHURN = ["sample_euler", "sample_heun", "sample_dpm_2"]
SHAPE = (2, 3, 5, 7)


def _model(seed, out_dtype=None):
    f = toy_model(seed, SHAPE)

    def den(x, sigma):
        out = f(x.float() if x.dtype == torch.float16 else x, sigma.float() if sigma.dtype == torch.float16 else sigma)
        return out.to(x.dtype if out_dtype is None else out_dtype)

    return den


def _x(seed, scale=14.0, dtype=torch.float32):
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _both(name, seed, x, *args, model_dtype=None, **kw):
    """``(ours, theirs)``: each ``(result, the global RNG's next draws)`` after the same manual_seed."""
    out = []
    for mod in (K, k_sampling()):
        torch.manual_seed(seed + 7)
        res = getattr(mod, name)(_model(seed, model_dtype), x.clone(), *args, disable=True, **kw)
        out.append((res, torch.rand(4)))
    return out


@pytest.mark.parametrize("name", CHURN)
@pytest.mark.parametrize("case", ["fp32-x-fp64-sigmas", "fp16-x-fp32-sigmas", "fp64-model-output"])
def test_churn_noise_is_drawn_in_k_diffusions_promoted_dtype(name, case, seed):
    """k-diffusion's to_d promotes its state to the sigmas' (or the model output's) dtype after the
    first step, and draws its per-step randn_like(x) in that dtype: the churn noise (and the RNG
    state after) is k-diffusion's only if ours is drawn in that dtype too."""
    ks = k_sampling()
    dtype = torch.float16 if case.startswith("fp16") else torch.float32
    sig = ks.get_sigmas_karras(6, 0.03, 14.0).to(torch.float64 if case.startswith("fp32") else torch.float32)
    x = _x(seed, dtype=dtype)
    (ours, rng_ours), (theirs, rng_theirs) = _both(name, seed, x, sig, s_churn=5.0,
                                                   model_dtype=torch.float64 if case.startswith("fp64") else None)
    assert ours.dtype == dtype  # documented: the result has x's dtype (k-diffusion's is promoted)
    tol = 5e-3 if dtype == torch.float16 else 1e-5  # fp16 state here, float32 in k-diffusion after step 0
    assert rel_err(ours, theirs) <= tol, f"{name} {case}: {rel_err(ours, theirs):.3g}"
    assert torch.equal(rng_ours, rng_theirs), f"{name} {case}: global RNG state differs from k-diffusion's"


@pytest.mark.parametrize("name", ["sample_euler", "sample_dpmpp_2m", "sample_euler_ancestral", "sample_lms"])
@pytest.mark.parametrize("layout", ["channels_last", "permuted"])
def test_result_keeps_xs_memory_layout(name, layout, seed):
    sig = k_sampling().get_sigmas_karras(5, 0.03, 14.0)
    x = _x(seed)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else \
        x.transpose(0, 1).contiguous().transpose(0, 1)
    (ours, rng_ours), (theirs, rng_theirs) = _both(name, seed, x, sig)
    assert ours.stride() == theirs.stride(), f"{name} {layout}: strides {ours.stride()} vs {theirs.stride()}"
    assert rel_err(ours, theirs) <= 1e-5
    assert torch.equal(rng_ours, rng_theirs)


def test_dpm_fast_with_float64_sigma_tensors_and_eta_is_finite(seed):
    """k-diffusion's float32 t grid (torch.linspace of float64 0-d tensors) overshoots its float64
    t_end in the last step; its noise scale there is sqrt of a negative number: NaN. Ours is 0."""
    ks = k_sampling()
    x = _x(seed, dtype=torch.float64)
    lo, hi = torch.tensor(0.03, dtype=torch.float64), torch.tensor(14.0, dtype=torch.float64)
    (ours, rng_ours), (theirs, rng_theirs) = _both("sample_dpm_fast", seed, x, lo, hi, 7, eta=1.0)
    assert torch.isnan(theirs).any()  # the documented k-diffusion failure (if it is ever fixed, compare instead)
    assert torch.isfinite(ours).all()
    assert torch.equal(rng_ours, rng_theirs)  # the same draws, one per step
    torch.manual_seed(seed + 7)
    ref = ks.sample_dpm_fast(_model(seed), x.clone(), lo.float(), hi.float(), 7, eta=1.0, disable=True)
    assert rel_err(ours, ref) <= 1e-4  # float32 sigma tensors: the same t grid, no overshoot


@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_a_final_zero_step_leaves_x_where_k_diffusion_may_return_nan(name, seed):
    ks = k_sampling()
    x = _x(seed)
    zero = lambda s, s_next: torch.zeros(SHAPE)  # noqa: E731
    rep, short = torch.tensor([14.0, 5.0, 1.0, 1.0]), torch.tensor([14.0, 5.0, 1.0])
    ours = getattr(K, name)(_model(seed), x, rep, noise_sampler=zero, disable=True)
    assert torch.equal(ours, getattr(K, name)(_model(seed), x, short, noise_sampler=zero, disable=True))
    theirs = getattr(ks, name)(_model(seed), x, rep, noise_sampler=zero, disable=True)
    if name == "sample_dpmpp_3m_sde":
        assert torch.isnan(theirs).any()  # expm1(0) / 0, as the module docstring says
    else:
        assert rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("grid", [[14.0, 5.0, 1.0, 1.0, 0.0], [14.0, 14.0, 5.0, 1.0, 0.0]])
def test_lms_repeated_sigma_in_a_difference_is_refused_where_k_diffusion_returns_garbage(grid, seed):
    x = _x(seed)
    theirs = k_sampling().sample_lms(_model(seed), x, torch.tensor(grid), disable=True)
    assert not torch.isfinite(theirs).all()  # NaN or inf
    with pytest.raises(ValueError, match="sigmas"):
        K.sample_lms(_model(seed), x, torch.tensor(grid), disable=True)
    # a repeated sigma at the end is a zero step that no difference divides by: k-diffusion's result
    ours = K.sample_lms(_model(seed), x, torch.tensor([14.0, 5.0, 1.0, 1.0]), disable=True)
    assert rel_err(ours, k_sampling().sample_lms(_model(seed), x, torch.tensor([14.0, 5.0, 1.0, 1.0]),
                                                 disable=True)) <= 1e-5


@pytest.mark.parametrize("name", ["sample_heun", "sample_dpmpp_2m_sde", "sample_dpm_2_ancestral"])
def test_callback_payload_kept_without_copying_is_k_diffusions(name, seed):
    sig = k_sampling().get_sigmas_karras(5, 0.03, 14.0)
    x = _x(seed)
    kept = []
    for mod in (K, k_sampling()):
        rec = []
        torch.manual_seed(seed)
        getattr(mod, name)(_model(seed), x.clone(), sig, callback=rec.append, disable=True)
        kept.append(rec)
    assert len(kept[0]) == len(kept[1]) == len(sig) - 1
    for a, b in zip(*kept):
        assert a["i"] == b["i"] and float(a["sigma"]) == float(b["sigma"])
        assert math.isclose(float(a["sigma_hat"]), float(b["sigma_hat"]), rel_tol=1e-6)
        for k in ("x", "denoised"):
            assert rel_err(a[k], b[k]) <= 1e-5, f"{name} step {a['i']} kept {k}"


@pytest.mark.parametrize("name", ["sample_euler", "sample_dpmpp_2m", "sample_dpmpp_3m_sde"])
def test_writing_into_the_callbacks_x_changes_nothing(name, seed):
    """Documented: the payload's x is a copy (k-diffusion's is its state, and its step moves)."""
    sig = k_sampling().get_sigmas_karras(5, 0.03, 14.0)
    x = _x(seed)
    torch.manual_seed(seed)
    plain = getattr(K, name)(_model(seed), x, sig, disable=True)
    torch.manual_seed(seed)
    written = getattr(K, name)(_model(seed), x, sig, callback=lambda d: d["x"].mul_(0.5), disable=True)
    assert torch.equal(plain, written)
