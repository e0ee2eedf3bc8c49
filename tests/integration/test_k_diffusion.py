"""fastdiff.k_diffusion vs k-diffusion's sampling.py (loaded by the sampler harness; test-only dependency).

Both run the same denoiser from the same fresh random state with the same noise (a seeded global
RNG for ``randn_like`` noise, a shared noise tape for ``noise_sampler``); every callback state,
every denoised estimate and the result must agree to 1e-5 relative error in fp32 and 1e-10 in fp64.
"""

import inspect
import math

import pytest
import torch

from fastdiff import k_diffusion as K
from tests.samplers._harness import NoiseTape, k_problem, k_sampling, rel_err, toy_model

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FUNCS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_lms", "sample_dpmpp_2m",
         "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]
NOISE_SAMPLER = {"sample_euler_ancestral", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}


def karras(n, dtype=torch.float32):
    return k_sampling().get_sigmas_karras(n, 0.03, 25.0).to(dtype)


def run_both(name, model, x, sigmas, seed, **kw):
    """``(ours, theirs)``: each a dict with the callback records, the result and the noise calls."""
    out = []
    for mod in (K, k_sampling()):
        rec = {"cb": [], "calls": []}
        extra = {}
        if name in NOISE_SAMPLER:
            tape = NoiseTape(len(sigmas), shape=x.shape, seed=seed + 5, dtype=x.dtype)

            def ns(s, s1, _tape=tape, _rec=rec):
                _rec["calls"].append((float(s), float(s1)))
                return _tape.draw()

            extra["noise_sampler"] = ns
        torch.manual_seed(seed + 9)  # the randn_like stream (churn)
        x_in = x.clone()
        rec["out"] = getattr(mod, name)(model, x_in, sigmas, callback=lambda d, _r=rec: _r["cb"].append(
            {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}), disable=True, **kw, **extra)
        assert torch.equal(x_in, x)  # the input is not modified
        rec["rng_after"] = torch.rand(3)
        out.append(rec)
    return out


def assert_same(ours, theirs, dtype, what):
    tol = TOL[dtype]
    assert len(ours["cb"]) == len(theirs["cb"]), what
    for a, b in zip(ours["cb"], theirs["cb"]):
        assert a["i"] == b["i"], what
        assert float(a["sigma"]) == float(b["sigma"]), what
        assert math.isclose(float(a["sigma_hat"]), float(b["sigma_hat"]), rel_tol=1e-6), what
        for k in ("x", "denoised"):
            e = rel_err(a[k], b[k])
            assert e <= tol, f"{what}: step {a['i']} {k} relative error {e:.3g}"
    e = rel_err(ours["out"], theirs["out"])
    assert e <= tol, f"{what}: result relative error {e:.3g}"
    assert ours["out"].dtype == theirs["out"].dtype
    assert ours["calls"] == theirs["calls"], f"{what}: noise_sampler calls differ"


CASES = [
    ("sample_euler", {}), ("sample_euler", {"s_churn": 4.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}),
    ("sample_euler_ancestral", {}), ("sample_euler_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("sample_heun", {}), ("sample_heun", {"s_churn": 6.0, "s_tmin": 0.2}),
    ("sample_dpm_2", {}), ("sample_dpm_2", {"s_churn": 6.0, "s_tmax": 5.0}),
    ("sample_lms", {}), ("sample_lms", {"order": 2}),
    ("sample_dpmpp_2m", {}),
    ("sample_dpmpp_2m_sde", {}), ("sample_dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.7, "s_noise": 0.9}),
    ("sample_dpmpp_2m_sde", {"eta": 0.0}),
    ("sample_dpmpp_3m_sde", {}), ("sample_dpmpp_3m_sde", {"eta": 0.5}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name, kw", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_matches_k_diffusion(name, kw, dtype, seed):
    sig = karras(10, dtype)
    f = toy_model(seed)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed), dtype=dtype) * sig[0]
    ours, theirs = run_both(name, lambda xx, s: f(xx, s), x, sig, seed, **kw)
    assert_same(ours, theirs, dtype, f"{name} {kw} seed={seed}")
    if kw.get("s_churn"):  # churn draws randn_like exactly as k-diffusion does: same global RNG state after
        assert torch.equal(ours["rng_after"], theirs["rng_after"])


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("pred", ["eps", "v"])
def test_matches_k_diffusion_on_a_vp_model_with_extra_args(name, pred, seed):
    """A diffusers-style eps/v model wrapped by k-diffusion's own DDPM denoisers, with a condition
    passed through ``extra_args``; the grid ends at sigma_min (no trailing zero)."""
    sch, f, _ = k_problem("vp", pred, seed)
    ext = __import__("tests.samplers._harness", fromlist=["k_external"]).k_external()
    acp = torch.tensor(sch.alphas_cumprod, dtype=torch.float32)
    cond = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed + 1))
    inner = ext.DiscreteEpsDDPMDenoiser if pred == "eps" else ext.DiscreteVDDPMDenoiser
    den = inner(lambda u, t, cond: f(u + 0.1 * cond, t), acp, quantize=False)
    sig = k_sampling().get_sigmas_karras(8, 0.05, 14.0)[:-1] if name != "sample_lms" else karras(8)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed)) * sig[0]
    ours, theirs = run_both(name, den, x, sig, seed, extra_args={"cond": cond})
    assert_same(ours, theirs, torch.float32, f"{name} vp {pred} seed={seed}")


@pytest.mark.parametrize("name", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_sde_default_noise_and_brownian_tree_parity(name, seed):
    pytest.importorskip("torchsde")
    ks = k_sampling()
    sig = karras(10)
    f = toy_model(seed)
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(seed)) * sig[0]

    def den(xx, s):
        return f(xx, s)

    # k-diffusion's own default noise, passed explicitly: exact parity
    bt = [ks.BrownianTreeNoiseSampler(x, sig[sig > 0].min(), sig.max(), seed=seed % 2**31) for _ in range(2)]
    theirs = getattr(ks, name)(den, x, sig, disable=True, noise_sampler=bt[0])
    ours = getattr(K, name)(den, x, sig, disable=True, noise_sampler=bt[1])
    assert rel_err(ours, theirs) <= TOL[torch.float32]
    # fastdiff's default: in-kernel Philox keyed from the global RNG (reproducible, not k-diffusion's numbers)
    torch.manual_seed(seed)
    a = getattr(K, name)(den, x, sig, disable=True)
    torch.manual_seed(seed)
    b = getattr(K, name)(den, x, sig, disable=True)
    c = getattr(K, name)(den, x, sig, disable=True)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()
    assert rel_err(a, theirs) > 1e-3  # different noise: documented


def test_signatures_are_k_diffusions():
    ks = k_sampling()
    for name in FUNCS:
        ours = inspect.signature(getattr(K, name)).parameters
        theirs = inspect.signature(getattr(ks, name)).parameters
        assert list(ours)[:len(theirs)] == list(theirs), name
        for p in theirs.values():
            assert ours[p.name].default == p.default, f"{name}({p.name}=...)"
        assert list(ours)[len(theirs):] == ["backend"], name


def test_backend_choice_and_errors(seed):
    sig = karras(6)
    f = toy_model(seed)
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(seed)) * sig[0]
    a = K.sample_dpmpp_2m(lambda xx, s: f(xx, s), x, sig, disable=True, backend="reference")
    b = K.sample_dpmpp_2m(lambda xx, s: f(xx, s), x, sig, disable=True, backend="cpu")
    assert rel_err(a, b) <= 1e-6
    with pytest.raises(ValueError, match="non-increasing"):
        K.sample_euler(lambda xx, s: xx, x, sig.flip(0))
    with pytest.raises(ValueError, match="1-D tensor"):
        K.sample_euler(lambda xx, s: xx, x, [1.0, 0.0])
    with pytest.raises(ValueError, match="solver_type"):
        K.sample_dpmpp_2m_sde(lambda xx, s: xx, x, sig, solver_type="rk4")
    with pytest.raises(ValueError, match="backend"):
        K.sample_lms(lambda xx, s: xx, x, sig, backend="tpu")
