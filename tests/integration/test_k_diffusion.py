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
FUNCS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral",
         "sample_lms", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde", "sample_dpmpp_2m", "sample_dpmpp_2m_sde",
         "sample_dpmpp_3m_sde"]
NOISE_SAMPLER = {"sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
                 "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"}


def karras(n, dtype=torch.float32):
    return k_sampling().get_sigmas_karras(n, 0.03, 25.0).to(dtype)


def run_both(name, model, x, sigmas, seed, **kw):
    """``(ours, theirs)``: each a dict with the callback records, the result and the noise calls."""
    out = []
    for mod in (K, k_sampling()):
        rec = {"cb": [], "calls": []}
        extra = {}
        if name in NOISE_SAMPLER:
            tape = NoiseTape(2 * len(sigmas), shape=x.shape, seed=seed + 5, dtype=x.dtype)

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
    ("sample_dpm_2_ancestral", {}), ("sample_dpm_2_ancestral", {"eta": 0.6, "s_noise": 0.9}),
    ("sample_dpm_2_ancestral", {"eta": 2.5}),  # sigma_down = 0: Euler steps without noise
    ("sample_dpmpp_2s_ancestral", {}), ("sample_dpmpp_2s_ancestral", {"eta": 0.0}),
    ("sample_dpmpp_2s_ancestral", {"eta": 2.5, "s_noise": 1.1}),
    ("sample_dpmpp_sde", {}), ("sample_dpmpp_sde", {"eta": 0.4, "s_noise": 0.8, "r": 0.3}),
    ("sample_dpmpp_sde", {"eta": 0.0, "r": 0.7}), ("sample_dpmpp_sde", {"eta": 3.0}),
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


@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
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
    # noise="philox": in-kernel Philox keyed from the global RNG (reproducible, not k-diffusion's numbers)
    torch.manual_seed(seed)
    a = getattr(K, name)(den, x, sig, disable=True, noise="philox")
    torch.manual_seed(seed)
    b = getattr(K, name)(den, x, sig, disable=True, noise="philox")
    c = getattr(K, name)(den, x, sig, disable=True, noise="philox")
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.isfinite(a).all()
    assert rel_err(a, theirs) > 1e-3  # different noise: documented
    # the default (noise="brownian") is k-diffusion's default: tests/integration/test_k_diffusion_noise.py


SDE_FUNCS = ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"]


def test_signatures_are_k_diffusions():
    ks = k_sampling()
    for name in FUNCS + ["sample_dpm_fast", "sample_dpm_adaptive"]:
        ours = inspect.signature(getattr(K, name)).parameters
        theirs = inspect.signature(getattr(ks, name)).parameters
        assert list(ours)[:len(theirs)] == list(theirs), name
        for p in theirs.values():
            assert ours[p.name].default == p.default, f"{name}({p.name}=...)"
        extra = ["noise", "backend"] if name in SDE_FUNCS else ["backend"]  # keyword-only, ours alone
        assert list(ours)[len(theirs):] == extra, name
        assert all(ours[k].kind is inspect.Parameter.KEYWORD_ONLY for k in extra), name
    assert sorted(K.__all__) == sorted(FUNCS + ["sample_dpm_fast", "sample_dpm_adaptive"])


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


# --- regressions found by randomized comparison with k-diffusion ---------------------------------

CHURN_FUNCS = ["sample_euler", "sample_heun", "sample_dpm_2"]


def _rand_x(seed, shape=(2, 3, 4, 5), dtype=torch.float32, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype) * scale


@pytest.mark.parametrize("name", FUNCS)
def test_one_sigma_is_zero_steps(name, seed):
    """k-diffusion loops over len(sigmas) - 1 steps: one sigma returns x unchanged, no model call."""
    sig = torch.tensor([float(karras(3)[1])])
    x = _rand_x(seed, (1, 3, 5), scale=float(sig[0]))
    calls = []
    extra = {"noise_sampler": lambda s, s1: torch.zeros_like(x)} if name in NOISE_SAMPLER else {}
    for mod in (K, k_sampling()):
        out = getattr(mod, name)(lambda xx, s: calls.append(1) or xx, x, sig, disable=True, **extra)
        assert torch.equal(out, x) and out.dtype == x.dtype
    assert not calls


@pytest.mark.parametrize("name", CHURN_FUNCS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_global_rng_stream_as_k_diffusion(name, layout, seed):
    """k-diffusion draws randn_like(x) once per step, churning or not (in x's layout): the same
    churn noise and the same global RNG state afterwards, also when no step churns."""
    f = toy_model(seed)
    sig = karras(6)
    x = _rand_x(seed, scale=float(sig[0])).contiguous(
        memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    for kw in ({}, {"s_churn": 3.0, "s_tmax": float(sig[2])}, {"s_churn": 3.0, "s_tmin": 100.0}):
        ours, theirs = run_both(name, lambda xx, s: f(xx, s), x, sig, seed, **kw)
        assert_same(ours, theirs, torch.float32, f"{name} {layout} {kw}")
        assert torch.equal(ours["rng_after"], theirs["rng_after"]), f"{name} {layout} {kw}"


@pytest.mark.parametrize("name", CHURN_FUNCS)
def test_churn_bounds_compare_in_the_sigmas_dtype(name, seed):
    """``s_tmin <= sigmas[i] <= s_tmax`` is a comparison in sigmas' dtype in k-diffusion: a bound
    just above a float32 sigma (that rounds to it) still churns that step."""
    f = toy_model(seed)
    sig = karras(5)
    s2 = float(sig[2])
    above = s2 * (1 + 2.0**-26)  # rounds to sig[2] in float32, larger in float64
    assert above > s2 and float(torch.tensor(above, dtype=torch.float32)) == s2
    x = _rand_x(seed, scale=float(sig[0]))
    for kw in ({"s_churn": 4.0, "s_tmin": above}, {"s_churn": 4.0, "s_tmax": s2 * (1 - 2.0**-26)}):
        ours, theirs = run_both(name, lambda xx, s: f(xx, s), x, sig, seed, **kw)
        assert_same(ours, theirs, torch.float32, f"{name} {kw}")
        hats = [[float(c["sigma_hat"]) for c in run["cb"]] for run in (ours, theirs)]
        assert hats[0] == pytest.approx(hats[1])


@pytest.mark.parametrize("name", ["sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_sde_default_noise_leaves_k_diffusions_rng_state(name, eta, seed):
    """k-diffusion's default BrownianTreeNoiseSampler draws one seed from the global RNG (used or
    not); fastdiff's default draws the same one (its Philox key), so later draws agree."""
    pytest.importorskip("torchsde")
    f = toy_model(seed)
    sig = karras(4)
    x = _rand_x(seed, (1, 3, 4, 5), scale=float(sig[0]))
    after = []
    for mod in (K, k_sampling()):
        torch.manual_seed(seed)
        getattr(mod, name)(lambda xx, s: f(xx, s), x, sig, disable=True, eta=eta)
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("order", [5, 3])
def test_lms_order_5(order, seed):
    f = toy_model(seed)
    sig = karras(9, torch.float64)
    x = _rand_x(seed, dtype=torch.float64, scale=float(sig[0]))
    ours, theirs = run_both("sample_lms", lambda xx, s: f(xx, s), x, sig, seed, order=order)
    assert_same(ours, theirs, torch.float64, f"lms order={order}")


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_is_stored_in_x_dtype_and_as_accurate_as_k_diffusion(name, dtype, seed):
    """fp16/bf16 ``x``: the state, the model input and the result stay in x's dtype (k-diffusion
    with sigmas in x's dtype does the same); each step is computed in float32, so the result is at
    least as close to exact arithmetic (k-diffusion in float64 on the same inputs and noise) as
    k-diffusion's own half-precision run (up to a factor 2 and one rounding)."""
    f = toy_model(seed)
    sig = karras(8)
    x = _rand_x(seed, dtype=dtype, scale=float(sig[0]))

    def den(xx, s):
        assert xx.dtype == dtype and s.dtype == dtype
        return f(xx.float(), s.float()).to(dtype)

    tape = NoiseTape(2 * len(sig), shape=x.shape, seed=seed + 5, dtype=dtype)
    runs = {}
    for key, mod, xx, ss in (("ours", K, x, sig), ("theirs", k_sampling(), x, sig.to(dtype)),
                             ("exact", k_sampling(), x.double(), sig.double())):
        extra = {"noise_sampler": lambda s, s1, _t=tape: _t.draw().to(xx.dtype)} if name in NOISE_SAMPLER else {}
        tape.next = 0
        model = den if key != "exact" else (lambda u, s: f(u.to(dtype).float(), s.to(dtype).float()).double())
        try:
            runs[key] = getattr(mod, name)(model, xx, ss, disable=True, **extra)
        except TypeError:  # k-diffusion's lms cannot take bfloat16 sigmas (numpy)
            runs[key] = None
    assert runs["ours"].dtype == dtype and runs["ours"].shape == x.shape
    ref = rel_err(runs["theirs"], runs["exact"]) if runs["theirs"] is not None else 0.0
    ref = ref if math.isfinite(ref) else 0.0
    one = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert rel_err(runs["ours"], runs["exact"]) <= max(2 * ref, one)


@pytest.mark.parametrize("name", FUNCS)
def test_float32_sigmas_with_float64_x_are_values(name, seed):
    """Mixed dtypes: fastdiff reads sigmas as values and computes the coefficients in float64, so
    ``x`` float64 with float32 sigmas equals k-diffusion with ``sigmas.double()`` (k-diffusion
    itself would compute its step scalars in float32, ~1e-7 off), except for the ancestral split,
    computed as k-diffusion does in the sigmas' dtype (eta=0 here: no split)."""
    f = toy_model(seed)
    sig = karras(7)
    x = _rand_x(seed, dtype=torch.float64, scale=float(sig[0]))
    tape = NoiseTape(2 * len(sig), shape=x.shape, seed=seed + 5, dtype=torch.float64)
    outs = []
    for mod, ss in ((K, sig), (k_sampling(), sig.double())):
        tape.next = 0
        extra = {"noise_sampler": tape.draw} if name in NOISE_SAMPLER else {}
        if "eta" in inspect.signature(getattr(K, name)).parameters:
            extra["eta"] = 0.0
        torch.manual_seed(seed)
        outs.append(getattr(mod, name)(lambda xx, s: f(xx, s), x, ss, disable=True, **extra))
    assert outs[0].dtype == torch.float64
    assert rel_err(outs[0], outs[1]) <= TOL[torch.float64]


@pytest.mark.parametrize("name", ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"])
def test_sde_one_step_into_zero_is_the_denoised_estimate(name, seed):
    """k-diffusion's SDE samplers raise UnboundLocalError on ``[sigma, 0]``; the step is its
    denoising step ``x = denoised``."""
    f = toy_model(seed)
    sig = torch.tensor([7.0, 0.0])
    x = _rand_x(seed, scale=7.0)
    out = getattr(K, name)(lambda xx, s: f(xx, s), x, sig, disable=True, noise_sampler=lambda s, s1: 1 / 0)
    assert rel_err(out, f(x, torch.full((2,), 7.0))) <= 1e-6


def test_argument_errors_name_the_argument(seed):
    f = toy_model(seed)
    sig = karras(5)
    x = _rand_x(seed, scale=float(sig[0]))

    def den(xx, s):
        return f(xx, s)

    for bad, match in ((torch.tensor([5.0, 0.0, 0.0]), "0 only in its last"),
                       (torch.tensor([0.0, 0.0]), "0 only in its last"),
                       (sig[None], "sigmas must be a non-empty 1-D"), (sig[:0], "sigmas must be a non-empty 1-D"),
                       (torch.tensor([3.0, float("nan"), 0.0]), "sigmas must be finite"),
                       (torch.tensor([1.0, 2.0, 0.0]), "non-increasing")):
        for name in FUNCS:
            with pytest.raises(ValueError, match=match):
                getattr(K, name)(den, x, bad, disable=True, **({"noise_sampler": lambda s, s1: torch.zeros_like(x)}
                                                               if name in NOISE_SAMPLER else {}))
    rep = torch.tensor([9.0, 4.0, 4.0, 1.0, 0.0])  # k-diffusion returns NaN here
    for name in ("sample_lms", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde"):
        with pytest.raises(ValueError, match="sigmas"):
            getattr(K, name)(den, x, rep, disable=True, **({"noise_sampler": lambda s, s1: torch.zeros_like(x)}
                                                           if name in NOISE_SAMPLER else {}))
    for name in ("sample_euler", "sample_heun", "sample_dpm_2", "sample_euler_ancestral"):  # fine there, as there
        ours, theirs = run_both(name, den, x, rep, seed)
        assert_same(ours, theirs, torch.float32, f"{name} repeated sigma")
    with pytest.raises(TypeError, match="extra_args"):
        K.sample_euler(den, x, sig, extra_args=[1])
    with pytest.raises(TypeError, match="x must be a floating"):
        K.sample_euler(den, x.long(), sig)
    with pytest.raises(TypeError, match="unexpected keyword argument 'sigma_min'"):
        K.sample_dpmpp_2m(den, x, sig, sigma_min=0.1)
    for name in NOISE_SAMPLER:
        with pytest.raises(ValueError, match="noise_sampler must return a tensor shaped like x"):
            getattr(K, name)(den, x, sig, disable=True, noise_sampler=lambda s, s1: torch.zeros(1, *x.shape[1:]))
    with pytest.raises(ValueError, match="order"):
        K.sample_lms(den, x, sig, order=0)
    with pytest.raises(ValueError, match="lms step 8 \\(order 9\\)"):  # 8 earlier derivatives: past a row's reads
        K.sample_lms(den, x, karras(10), order=9)
    for kw in ({"eta": -0.5}, {"s_noise": -1.0}, {"eta": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            K.sample_euler_ancestral(den, x, sig, **kw)
    with pytest.raises(ValueError, match="s_churn"):
        K.sample_heun(den, x, sig, s_churn=-1.0)


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral"])
def test_ancestral_branch_decided_in_the_sigmas_dtype(name, seed):
    """From sigma 536 to 0.0456 the float32 ancestral split gives sigma_down == 0 exactly (float64:
    ~4e-6): k-diffusion takes its Euler branch there (no second model call; dpm_2_ancestral adds
    no noise), so must we."""
    f = toy_model(seed)
    for dtype in (torch.float32, torch.float64):
        sig = torch.tensor([536.0317, 0.045609, 0.0], dtype=torch.float32)  # float32 values
        x = _rand_x(seed, dtype=dtype, scale=float(sig[0]))
        calls = []
        ours, theirs = run_both(name, lambda xx, s: calls.append(float(s[0])) or f(xx, s), x, sig, seed)
        assert calls[:len(calls) // 2] == pytest.approx(calls[len(calls) // 2:], rel=1e-6), "model calls differ"
        assert ours["calls"] == theirs["calls"], "noise_sampler calls differ"
        # one step from 536 to 0.0456 cancels ~3 digits: float32 rounding (k-diffusion's own) shows at 1e-5
        e = rel_err(ours["out"], theirs["out"])
        assert e <= 1e-4, f"{name} {dtype}: {e:.3g}"


def test_dpmpp_sde_philox_noise_is_one_brownian_motion(seed):
    """The two draws of a dpmpp_sde step are increments of one Brownian motion over overlapping
    intervals (k-diffusion's BrownianTreeNoiseSampler): on Gaussian data the Philox noise
    (``noise="philox"``) gives the exact output variance, which independent draws would miss by ~30%."""
    ks = k_sampling()
    sig = karras(5, torch.float64)
    S, B, N = 0.5, 2, 30000

    def gauss(mu):
        return lambda x, s: mu + S * S / (S * S + s.reshape(-1, 1) ** 2) * (x - mu)

    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    calls = []
    A = float(ks.sample_dpmpp_sde(gauss(zero), one, sig, disable=True,
                                  noise_sampler=lambda s, s1: calls.append((float(s), float(s1))) or zero))
    c = []
    for k in range(len(calls)):
        n = iter(range(len(calls)))
        c.append(float(ks.sample_dpmpp_sde(gauss(zero), zero, sig, disable=True,
                                           noise_sampler=lambda s, s1: one if next(n) == k else zero)))
    var = sum(ci * cj * max(0.0, min(a1, a2) - max(b1, b2)) / math.sqrt((a1 - b1) * (a2 - b2))
              for ci, (a1, b1) in zip(c, calls) for cj, (a2, b2) in zip(c, calls))
    x = _rand_x(seed, (B, N), dtype=torch.float64)
    torch.manual_seed(seed)
    out = K.sample_dpmpp_sde(gauss(torch.zeros(1, N, dtype=torch.float64)), x, sig, disable=True, noise="philox")
    noise = (out - A * x) / math.sqrt(var)
    assert abs(float(noise.mean())) < 6 / math.sqrt(B * N)
    assert abs(float(noise.var()) - 1) < 6 * math.sqrt(2 / (B * N))
    assert abs(float((noise[0] * noise[1]).mean())) < 6 / math.sqrt(N)


def edm_denoiser(seed, shape):
    """A denoiser shaped like a trained EDM one: ``c_skip x + c_out F(c_in x, c_noise) + c``, the
    network ``F`` seeing the noise level through ``log sigma`` (EDM's ``c_noise = log(sigma) / 4``),
    and a bias ``c`` (a trained denoiser is not exactly the identity at small sigma)."""
    d = math.prod(shape[1:])
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b = torch.randn(d, generator=g, dtype=torch.float64) * 0.3
    c = torch.randn(d, generator=g, dtype=torch.float64) * 0.05

    def den(x, sigma):
        s = sigma.reshape(-1, 1)
        h = x.reshape(x.shape[0], -1)
        c_in = 1 / torch.sqrt(1 + s * s)
        f = torch.tanh(h * c_in @ w.to(x.dtype) + b.to(x.dtype) * torch.sin(s.log()))
        return (h / (1 + s * s) + s * c_in * f + c.to(x.dtype)).reshape(x.shape)

    return den


@pytest.mark.parametrize("name", ["sample_euler_ancestral", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral",
                                  "sample_dpmpp_sde"])
def test_ancestral_split_is_k_diffusions_float32_split(name, seed):
    """k-diffusion computes sigma_down = sqrt(sigma_to**2 - sigma_up**2) on float32 sigmas, where it
    cancels (1e-3 relative from 1.25 to 0.0106); dpm_2_ancestral's midpoint carries that into the
    result (~2e-4 with a float64 split). Mirroring k-diffusion means using its split."""
    sig = torch.tensor([60.03767, 6.1755, 1.24594, 0.01064, 0.0])
    x = _rand_x(seed, (2, 3, 8, 8), scale=float(sig[0]))
    ours, theirs = run_both(name, edm_denoiser(seed, x.shape), x, sig, seed)
    assert rel_err(ours["out"], theirs["out"]) <= 2e-5
    assert ours["calls"] == theirs["calls"]


@pytest.mark.parametrize("order", [2, 4, 5])
def test_lms_coefficients_between_close_sigmas(order, seed):
    """A polyexponential grid whose last sigmas differ by 0.3%: LMS weights integrated through
    monomials cancel (1e-8 relative off, 1e-7 to 2e-4 in the result); k-diffusion integrates the
    product form (quad). The weights are then large: float64 rounding of the state shows at
    ~1e-9 (order 5) in either implementation."""
    f = toy_model(seed)
    sig = k_sampling().get_sigmas_polyexponential(13, 0.4326, 2.0684, rho=2.7).double()
    x = _rand_x(seed, dtype=torch.float64, scale=float(sig[0]))
    ours, theirs = run_both("sample_lms", lambda xx, s: f(xx, s), x, sig, seed, order=order)
    assert rel_err(ours["out"], theirs["out"]) <= 2e-8, f"lms order={order}"
    from fastdiff.samplers.lms import lms_coefficients

    s = sig.tolist()
    for i in range(order - 1, len(s) - 1):
        theirs_c = [k_sampling().linear_multistep_coeff(order, s, i, j) for j in range(order)]
        assert lms_coefficients(s, i, order) == pytest.approx(theirs_c, rel=1e-13, abs=0)
