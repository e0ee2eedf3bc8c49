"""Randomized parity of fastdiff.k_diffusion with k-diffusion's sampling.py (a fresh draw per run).

Every case draws a sampler, a shape (batch 1, odd sizes, 1-D to 5-D), a dtype, one of
k-diffusion's sigma grids (Karras, exponential, polyexponential, VP; 1 to 13 sigmas, with or
without the trailing 0), every keyword option of the signature, ``extra_args`` and a callback, and
compares everything k-diffusion exposes: the model calls (x and sigma), the callback dicts, the
noise-sampler calls, the result, the global RNG state afterwards and the inputs (not modified).
The noise of ``noise_sampler`` samplers is a shared pre-drawn tape; churn noise is the seeded
global RNG, as in k-diffusion.
"""

import inspect
import math
import random

import pytest
import torch

from fastdiff import k_diffusion as K
from tests.samplers._harness import k_sampling, patched_randn_like, rel_err

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SHAPES = [(1,), (3,), (1, 3), (3, 9), (1, 5, 7), (2, 3, 5), (1, 3, 5, 7), (2, 3, 4, 5), (1, 3, 3, 5, 3)]
SDE = {"sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde"}
CHURN = {"sample_euler", "sample_heun", "sample_dpm_2"}
ANCESTRAL = {"sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"}  # randn_like default
GRIDLESS = {"sample_dpm_fast", "sample_dpm_adaptive"}  # (sigma_min, sigma_max), no grid: test_k_diffusion_noise.py


def _denoiser(shape, seed, log):
    d = math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(d, generator=g, dtype=torch.float64) * 0.3

    def den(x, sigma, cond=None, scale=1.0):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        log.append(("model", sigma.clone(), x.clone()))
        s = sigma.reshape(-1, 1)
        h = x.reshape(x.shape[0], -1)
        c_in = 1 / torch.sqrt(1 + s * s)
        net = torch.tanh(h * c_in @ w.to(x.dtype) + b.to(x.dtype) * torch.sin(s.log()))
        out = h / (1 + s * s) + scale * s * c_in * net
        if cond is not None:
            out = out + 0.2 * c_in * cond.reshape(out.shape)
        return out.reshape(x.shape)

    return den


def _grid(rng, dtype):
    ks = k_sampling()
    n = rng.choice([1, 2, 3, 4, 6, 9, 12])
    smin, smax = math.exp(rng.uniform(math.log(0.005), math.log(0.5))), math.exp(rng.uniform(0.0, math.log(120.0)))
    kind = rng.choice(["karras", "exponential", "polyexponential", "vp"])
    if kind == "karras":
        s = ks.get_sigmas_karras(n, smin, smax, rho=rng.uniform(2.0, 9.0))
    elif kind == "exponential":
        s = ks.get_sigmas_exponential(n, smin, smax)
    elif kind == "polyexponential":
        s = ks.get_sigmas_polyexponential(n, smin, smax, rho=rng.uniform(0.5, 3.0))
    else:
        s = ks.get_sigmas_vp(n, beta_d=rng.uniform(10.0, 20.0), beta_min=rng.uniform(0.05, 0.2))
    s = s if rng.random() < 0.7 else s[:-1]
    return s.to(dtype)


def _options(rng, name, sig):
    params = inspect.signature(getattr(K, name)).parameters
    kw = {}
    if "s_churn" in params and rng.random() < 0.6:
        kw["s_churn"] = rng.choice([0.0, rng.uniform(0.0, 40.0)])
        if rng.random() < 0.5:
            kw["s_tmin"] = rng.uniform(0.0, float(sig.max()) / 3)
        if rng.random() < 0.5:
            kw["s_tmax"] = rng.uniform(float(sig.max()) / 10, float(sig.max()))
        if rng.random() < 0.5:
            kw["s_noise"] = rng.uniform(0.5, 1.5)
    if "eta" in params and rng.random() < 0.6:
        kw["eta"] = rng.choice([0.0, 1.0, rng.uniform(0.0, 2.0)])
    if "noise_sampler" in params and rng.random() < 0.5:
        kw["s_noise"] = rng.uniform(0.0, 1.5)
    if "order" in params:
        kw["order"] = rng.choice([1, 2, 3, 4, 5])
    if "solver_type" in params:
        kw["solver_type"] = rng.choice(["heun", "midpoint"])
    if "r" in params:
        kw["r"] = rng.choice([0.5, rng.uniform(0.1, 0.9)])
    return kw


def _run(mod, name, x, sig, kw, extra, use_cb, use_tape, seed, tape_dtype=None):
    log = []
    args = dict(kw)
    if use_tape:
        g = torch.Generator().manual_seed(seed + 3)
        tape = [torch.randn(x.shape, generator=g, dtype=torch.float64).to(tape_dtype or x.dtype).to(x.dtype)
                for _ in range(2 * len(sig))]

        def ns(s, s1):
            log.append(("noise", float(s), float(s1)))
            return tape.pop(0)

        args["noise_sampler"] = ns
    if use_cb:
        args["callback"] = lambda d: log.append(("cb", {k: v.clone() if torch.is_tensor(v) else v
                                                        for k, v in d.items()}))
    x_in, sig_in = x.clone(), sig.clone()
    torch.manual_seed(seed + 2)
    try:
        out = getattr(mod, name)(_denoiser(x.shape, seed + 1, log), x_in, sig_in, extra_args=extra, disable=True,
                                 **args)
    except UnboundLocalError:  # k-diffusion's SDE samplers on a one-step grid [sigma, 0]
        out = None
    assert torch.equal(x_in, x) and torch.equal(sig_in, sig), "an input was modified"
    return out, log, torch.rand(3)


def _compare(name, ours, theirs, tol):
    (oa, la, ra), (ob, lb, rb) = ours, theirs
    assert oa.dtype == ob.dtype and oa.shape == ob.shape
    assert rel_err(oa, ob) <= tol, f"result relative error {rel_err(oa, ob):.3g}"
    assert [e[0] for e in la] == [e[0] for e in lb], "model / callback / noise-sampler calls differ"
    for ea, eb in zip(la, lb):
        if ea[0] == "model":
            assert rel_err(ea[1], eb[1]) <= max(tol, 2e-7), "model sigma differs"
            assert rel_err(ea[2], eb[2]) <= tol, f"model input relative error {rel_err(ea[2], eb[2]):.3g}"
        elif ea[0] == "noise":
            assert ea[1:] == eb[1:]
        else:
            da, db = ea[1], eb[1]
            assert set(da) == set(db) and da["i"] == db["i"] and type(da["i"]) is int
            assert torch.is_tensor(da["sigma"]) and da["sigma"].dtype == db["sigma"].dtype
            assert float(da["sigma"]) == float(db["sigma"])
            assert math.isclose(float(da["sigma_hat"]), float(db["sigma_hat"]), rel_tol=2e-7)
            for k in ("x", "denoised"):
                assert rel_err(da[k], db[k]) <= tol, f"callback {k} relative error {rel_err(da[k], db[k]):.3g}"
    if name in CHURN or (name in ANCESTRAL and not any(e[0] == "noise" for e in la)):
        assert torch.equal(ra, rb), "global RNG state afterwards differs"


@pytest.mark.parametrize("case", range(24))
def test_random_case_matches_k_diffusion(case, seed):
    rng = random.Random(seed * 1000 + case)
    name = rng.choice([n for n in K.__all__ if n not in GRIDLESS])
    dtype = rng.choice([torch.float32, torch.float64])
    sig = _grid(rng, dtype)
    kw = _options(rng, name, sig)
    shape = rng.choice(SHAPES)
    g = torch.Generator().manual_seed(seed + case)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * float(sig[0])).to(dtype)
    extra = {"cond": torch.randn(shape, generator=g, dtype=torch.float64).to(dtype), "scale": rng.uniform(0.5, 1.5)} \
        if rng.random() < 0.5 else None
    use_tape = name in SDE or ("noise_sampler" in inspect.signature(getattr(K, name)).parameters and rng.random() < 0.5)
    use_cb = rng.random() < 0.8
    what = f"{name} {tuple(shape)} {dtype} sigmas={[round(float(s), 5) for s in sig]} {kw} tape={use_tape}"
    theirs = _run(k_sampling(), name, x, sig, kw, extra, use_cb, use_tape, seed + case)
    ours = _run(K, name, x, sig, kw, extra, use_cb, use_tape, seed + case)
    if theirs[0] is None:  # k-diffusion crashed: one denoising step, x = denoised
        assert len(sig) == 2 and float(sig[1]) == 0 and name in SDE, what
        return
    try:
        _compare(name, ours, theirs, TOL[dtype])
    except AssertionError as e:
        if dtype != torch.float32 or "relative error" not in str(e):
            raise AssertionError(f"{what}: {e}") from None
        # float32 on an ill-conditioned grid (LMS between close sigmas amplifies rounding): fastdiff
        # must be as close to exact arithmetic (k-diffusion in float64, same inputs and noise) as
        # k-diffusion's own float32 run
        torch.manual_seed(seed + case + 2)
        draws = _Draws([torch.randn_like(x) for _ in range(len(sig))])
        with patched_randn_like(draws):
            exact = _run(k_sampling(), name, x.double(), sig.double(), kw, extra and {
                "cond": extra["cond"].double(), "scale": extra["scale"]}, False, use_tape, seed + case, dtype)[0]
        e_ours, e_theirs = rel_err(ours[0], exact), rel_err(theirs[0], exact)
        factor = 2 if x.numel() >= 64 else 5  # a few elements: the ratio of two rounding errors is noisy
        assert e_ours <= max(factor * e_theirs, TOL[dtype]), \
            f"{what}: {e}; vs exact {e_ours:.3g} (k-diffusion {e_theirs:.3g})"


class _Draws:
    """k-diffusion's per-step ``randn_like`` draws, replayed (``patched_randn_like``)."""

    def __init__(self, z):
        self.z = z

    def draw(self):
        return self.z.pop(0)
