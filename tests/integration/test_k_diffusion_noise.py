"""fastdiff.k_diffusion's noise against k-diffusion's, seed for seed (k-diffusion and torchsde are
test-only dependencies: each parity test skips by itself when one is missing).

- The SDE samplers' default noise (``noise="brownian"``) is k-diffusion's default
  ``BrownianTreeNoiseSampler``: after the same ``torch.manual_seed`` the results agree to 1e-5
  (fp32) and the global RNG is left in k-diffusion's state; ``noise="philox"`` is the opt-in.
- ``sample_dpm_fast`` and ``sample_dpm_adaptive`` with k-diffusion's default ``randn_like`` noise.

Every run counts its fused steps: one per model call (and one per accepted ``sample_dpm_adaptive``
step that adds noise). Tolerances: 1e-5 relative in fp32, as tests/integration/test_k_diffusion.py
argues; where k-diffusion's own float32 error is of that size (DPM-Solver-fast with ``eta = 1``,
long steps whose ``x - c * eps`` cancels), fastdiff must instead be at least as close as
k-diffusion's float32 run to k-diffusion in float64. ``sample_dpm_adaptive``'s step sizes come from
an error estimate that float32 rounding of the model inputs alone moves by ~1e-3 relative (in
k-diffusion too), so its step sizes and intermediate states are compared at 1e-2 and 1e-3, its
accept/reject decisions exactly and its results at 1e-5.
"""

import math
import sys
import warnings

import pytest
import torch

from fastdiff import k_diffusion as K
from fastdiff.samplers import k_dpm
from tests.samplers._harness import NoiseTape, k_sampling, rel_err, toy_model

TOL = 1e-5
SDE = ["sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde", "sample_dpmpp_sde"]
SHAPE = (3, 5, 7)  # batch > 1, odd sizes


@pytest.fixture
def fused(monkeypatch):
    """The fused steps run: rows of the executor's prepared programs and single rows (fastdiff.runtime.ops.step)."""
    from fastdiff.backends import cpu, reference
    from fastdiff.runtime import ops

    calls, inside = [], [False]
    for mod in (cpu, reference):
        orig = mod.step
        monkeypatch.setattr(mod, "step", lambda args, _o=orig: (None if inside[0] else calls.append(args), _o(args))[1])

    class Counted:  # a prepared program, each row run counted once
        run_ptr = None

        def __init__(self, prog):
            self.prog, self.rows = prog, prog.rows

        def run(self, i, m):
            calls.append(self.rows[i])
            inside[0] = True
            try:
                self.prog.run(i, m)
            finally:
                inside[0] = False

        def set(self, *a):
            self.prog.set(*a)

    prepare = ops.prepare
    monkeypatch.setattr(ops, "prepare", lambda *a, **k: Counted(prepare(*a, **k)))
    return calls


def _x(seed, scale, shape=SHAPE, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _model(seed, shape=SHAPE):
    """A nonlinear denoiser with an optional condition, logging every call."""
    f = toy_model(seed, shape)
    log = []

    def den(x, sigma, cond=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        log.append((sigma.clone(), x.clone()))
        out = f(x, sigma)
        return out if cond is None else out + 0.1 * cond

    return den, log


def _run(fn, seed, x, *args, **kw):
    """``fn(model, x, *args, **kw)`` after ``torch.manual_seed(seed)``: result, model calls, callbacks, RNG after."""
    den, log = _model(seed)
    cbs = []
    torch.manual_seed(seed + 1)
    x_in = x.clone()
    out = fn(den, x_in, *args, callback=lambda d: cbs.append({k: v.clone() if torch.is_tensor(v) else v
                                                               for k, v in d.items()}), disable=True, **kw)
    assert torch.equal(x_in, x), "x was modified"
    return out, log, cbs, torch.rand(3)


def _same_calls(ours, theirs, tol, what, sigma_tol=0.0):
    (_, la, ca, ra), (_, lb, cb, rb) = ours, theirs
    assert len(la) == len(lb), f"{what}: {len(la)} model calls, k-diffusion {len(lb)}"
    for (sa, xa), (sb, xb) in zip(la, lb):
        assert sa.dtype == sb.dtype and rel_err(sa, sb) <= sigma_tol, f"{what}: the model's sigma differs"
        assert rel_err(xa, xb) <= tol, f"{what}: model input relative error {rel_err(xa, xb):.3g}"
    assert len(ca) == len(cb) and [list(d) for d in ca] == [list(d) for d in cb], f"{what}: callbacks differ"
    for da, db in zip(ca, cb):
        for k, v in db.items():
            if k in ("x", "denoised"):
                e = rel_err(da[k], v)
                assert e <= tol, f"{what}: callback {da['i']} {k} relative error {e:.3g}"
            elif torch.is_tensor(v):
                assert da[k].dtype == v.dtype and da[k].shape == v.shape, f"{what}: callback {k}"
    assert torch.equal(ra, rb), f"{what}: the global RNG state afterwards differs"


def _karras(n, sigma_min, sigma_max, rho=7.0):
    """k-diffusion's ``get_sigmas_karras`` (ends in 0), without k-diffusion."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def _grid(kind):
    if kind == "karras":
        return _karras(7, 0.03, 14.0)
    ks = k_sampling()
    if kind == "exponential":
        return ks.get_sigmas_exponential(6, 0.08, 9.0)[:-1]  # ends at sigma_min
    return ks.get_sigmas_polyexponential(5, 0.05, 20.0, rho=1.7)


# --- the SDE samplers' default noise is k-diffusion's ---------------------------------------------

SDE_CASES = [(name, kind, {}) for name in SDE for kind in ("karras", "exponential", "polyexponential")] + [
    ("sample_dpmpp_2m_sde", "karras", {"eta": 0.6, "s_noise": 0.8, "solver_type": "heun", "extra": True}),
    ("sample_dpmpp_3m_sde", "exponential", {"eta": 0.0}),
    ("sample_dpmpp_sde", "karras", {"r": 0.3, "eta": 0.7, "extra": True}),
]


@pytest.mark.parametrize("name, kind, kw", SDE_CASES, ids=[f"{n}-{k}-{kw}" for n, k, kw in SDE_CASES])
def test_sde_default_noise_is_k_diffusions(name, kind, kw, seed, fused):
    pytest.importorskip("torchsde")
    sig = _grid(kind)
    x = _x(seed, float(sig[0]))
    kw = dict(kw)
    if kw.pop("extra", False):
        kw["extra_args"] = {"cond": _x(seed + 3, 1.0)}
    ours = _run(getattr(K, name), seed, x, sig, **kw)
    n_fused = len(fused)
    theirs = _run(getattr(k_sampling(), name), seed, x, sig, **kw)
    assert rel_err(ours[0], theirs[0]) <= TOL, f"{name} {kind} {kw}: {rel_err(ours[0], theirs[0]):.3g}"
    _same_calls(ours, theirs, TOL, f"{name} {kind} {kw}", sigma_tol=2e-7)  # dpmpp_sde's midpoint: float64 here
    assert n_fused == len(ours[1]), "one fused step per model call"


def test_sde_default_noise_in_channels_last_and_float64(seed, fused):
    pytest.importorskip("torchsde")
    sig = _grid("karras")
    f = toy_model(seed, (2, 3, 4, 5))
    for x in (_x(seed, float(sig[0]), (2, 3, 4, 5)).contiguous(memory_format=torch.channels_last),
              _x(seed, float(sig[0]), (2, 3, 4, 5), torch.float64)):
        outs = []
        for mod in (K, k_sampling()):
            torch.manual_seed(seed)
            outs.append(mod.sample_dpmpp_2m_sde(lambda u, s: f(u, s), x, sig.to(x.dtype), disable=True))
        tol = TOL if x.dtype == torch.float32 else 1e-10
        assert rel_err(outs[0], outs[1]) <= tol, f"{x.dtype} {x.stride()}: {rel_err(outs[0], outs[1]):.3g}"


@pytest.mark.parametrize("name", SDE)
def test_philox_noise_is_the_opt_in(name, seed):
    """``noise="philox"``: in-kernel noise keyed by the seed k-diffusion would draw (so the global RNG
    is left as k-diffusion leaves it), reproducible, and not k-diffusion's numbers."""
    pytest.importorskip("torchsde")
    sig = _grid("karras")
    x = _x(seed, float(sig[0]))
    f = toy_model(seed, SHAPE)
    runs = {}
    for key, kw in (("a", {"noise": "philox"}), ("b", {"noise": "philox"}), ("brownian", {})):
        torch.manual_seed(seed)
        runs[key] = (getattr(K, name)(lambda u, s: f(u, s), x, sig, disable=True, **kw), torch.rand(3))
    assert torch.equal(runs["a"][0], runs["b"][0]) and torch.isfinite(runs["a"][0]).all()
    assert torch.equal(runs["a"][1], runs["brownian"][1])
    assert rel_err(runs["a"][0], runs["brownian"][0]) > 1e-3


def test_noise_argument_is_checked(seed):
    sig = _grid("karras")
    x = _x(seed, float(sig[0]))
    f = toy_model(seed, SHAPE)
    tape = NoiseTape(2 * len(sig), shape=SHAPE, seed=seed)
    for name in SDE:
        fn = getattr(K, name)
        for bad in ("Brownian", "gaussian", None, 1):
            with pytest.raises(ValueError, match="noise must be one of"):
                fn(lambda u, s: f(u, s), x, sig, disable=True, noise=bad)
        with pytest.raises(ValueError, match="noise_sampler"):  # in-kernel noise and a sampler: contradictory
            fn(lambda u, s: f(u, s), x, sig, disable=True, noise="philox", noise_sampler=tape.draw)
        # the default with a noise_sampler: the sampler is the noise (k-diffusion's rule)
        outs = []
        for mod in (K, k_sampling()):
            tape.next = 0
            outs.append(getattr(mod, name)(lambda u, s: f(u, s), x, sig, disable=True, noise_sampler=tape.draw,
                                           **({"noise": "brownian"} if mod is K else {})))
        assert rel_err(outs[0], outs[1]) <= TOL


def test_without_torchsde_the_default_is_philox_with_one_warning(monkeypatch, seed):
    monkeypatch.setitem(sys.modules, "torchsde", None)  # import torchsde raises ImportError
    monkeypatch.setattr(K, "_warned_no_torchsde", False)
    sig = _grid("karras")
    x = _x(seed, float(sig[0]))
    f = toy_model(seed, SHAPE)
    torch.manual_seed(seed)
    with pytest.warns(RuntimeWarning, match="torchsde is not installed"):
        a = K.sample_dpmpp_2m_sde(lambda u, s: f(u, s), x, sig, disable=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        K.sample_dpmpp_sde(lambda u, s: f(u, s), x, sig, disable=True)
    assert not [m for m in w if "torchsde" in str(m.message)], "warned twice"
    torch.manual_seed(seed)
    b = K.sample_dpmpp_2m_sde(lambda u, s: f(u, s), x, sig, disable=True, noise="philox")
    assert torch.equal(a, b)


# --- sample_dpm_fast and sample_dpm_adaptive --------------------------------------------------------


def _exact(name, seed, x, *args, **kw):
    """k-diffusion in float64 throughout (its t grid and step scalars too: default dtype float64),
    the same model and the same noise (k-diffusion's float32 ``randn_like`` draws, replayed)."""
    den, _ = _model(seed)
    torch.manual_seed(seed + 1)
    draws = [torch.randn_like(x) for _ in range(64)]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return getattr(k_sampling(), name)(den, x.double(), *args, disable=True,
                                           noise_sampler=lambda s, s1: draws.pop(0).double(), **kw)
    finally:
        torch.set_default_dtype(old)


def _close(name, ours, theirs, seed, x, args, kw):
    e = rel_err(ours, theirs)
    if e <= TOL:
        return
    exact = _exact(name, seed, x, *args, **kw)
    e_ours, e_theirs = rel_err(ours, exact), rel_err(theirs, exact)
    assert e_ours <= 2 * e_theirs, f"{name} {kw}: {e:.3g} from k-diffusion; vs float64 {e_ours:.3g} " \
                                   f"(k-diffusion's float32: {e_theirs:.3g})"


FAST = [(n, {}) for n in (1, 2, 3, 4, 5, 9, 10)] + [(n, {"eta": 0.5, "s_noise": 0.9}) for n in (3, 7, 11)] + [
    (10, {"eta": 1.0}), (5, {"eta": 1.0}), (6, {"extra": True}), (8, {"eta": 0.3, "extra": True}),
    (7, {"reverse": True})]


@pytest.mark.parametrize("n, kw", FAST, ids=[f"n{n}-{kw}" for n, kw in FAST])
def test_dpm_fast_matches_k_diffusion(n, kw, seed, fused):
    kw = dict(kw)
    if kw.pop("extra", False):
        kw["extra_args"] = {"cond": _x(seed + 3, 1.0)}
    smin, smax = (0.03, 14.0) if not kw.pop("reverse", False) else (9.0, 0.2)  # reverse: sigma grows
    x = _x(seed, smax)
    ours = _run(K.sample_dpm_fast, seed, x, smin, smax, n, **kw)
    n_fused = len(fused)
    theirs = _run(k_sampling().sample_dpm_fast, seed, x, smin, smax, n, **kw)
    _close("sample_dpm_fast", ours[0], theirs[0], seed, x, (smin, smax, n), kw)
    _same_calls(ours, theirs, TOL if kw.get("eta", 0) < 1 else 1e-4, f"dpm_fast n={n} {kw}")
    assert n_fused == len(ours[1]) == n, "one fused step per model call"
    den, _ = _model(seed)
    torch.manual_seed(seed + 1)
    assert torch.equal(K.sample_dpm_fast(den, x, smin, smax, n, disable=True, **kw), ours[0])  # no callback


ADAPTIVE = [(3, {}), (2, {}), (3, {"eta": 0.5}), (2, {"eta": 0.8, "s_noise": 0.9}), (3, {"extra": True}),
            (3, {"rtol": 0.02, "atol": 0.002, "pcoeff": 0.1, "icoeff": 0.6, "dcoeff": 0.05, "h_init": 0.1,
                 "accept_safety": 0.9}),
            (2, {"reverse": True})]


@pytest.mark.parametrize("order, kw", ADAPTIVE, ids=[f"order{o}-{kw}" for o, kw in ADAPTIVE])
def test_dpm_adaptive_matches_k_diffusion(order, kw, seed, fused):
    kw = dict(kw, order=order, return_info=True)
    if kw.pop("extra", False):
        kw["extra_args"] = {"cond": _x(seed + 3, 1.0)}
    smin, smax = (0.03, 14.0) if not kw.pop("reverse", False) else (5.0, 0.5)
    x = _x(seed, smax)
    ours = _run(K.sample_dpm_adaptive, seed, x, smin, smax, **kw)
    n_fused = len(fused)
    theirs = _run(k_sampling().sample_dpm_adaptive, seed, x, smin, smax, **kw)
    (a, info), (b, info_k) = ours[0], theirs[0]
    assert info == info_k and set(info) == {"steps", "nfe", "n_accept", "n_reject"}
    assert info["n_accept"] > 0
    _close("sample_dpm_adaptive", a, b, seed, x, (smin, smax), {k: v for k, v in kw.items() if k != "return_info"})
    # the step sizes differ by float32 rounding of the error estimate (see the module docstring; over
    # 760 runs: model sigmas and states up to 1.4e-4 apart, step sizes 1.5e-3, results 5.5e-6)
    _same_calls((a,) + ours[1:], (b,) + theirs[1:], 1e-3, f"dpm_adaptive {kw}", sigma_tol=1e-3)
    for da, db in zip(ours[2], theirs[2]):
        assert {k: da[k] for k in info} == {k: db[k] for k in info}  # accepted and rejected at the same tries
        assert math.isclose(da["h"], db["h"], rel_tol=1e-2)
        assert math.isclose(float(da["error"]), float(db["error"]), rel_tol=5e-2, abs_tol=1e-3)
    # one fused step per model call, and one per noise addition: each accepted step with eta > 0 but
    # the one that ends at sigma_min (its sigma_up is 0: no step for zero noise)
    noisy = info["n_accept"] - 1 if kw.get("eta", 0) else 0
    assert n_fused == info["nfe"] + noisy
    den, _ = _model(seed)
    torch.manual_seed(seed + 1)
    assert torch.equal(K.sample_dpm_adaptive(den, x, smin, smax, disable=True, **kw)[0], a)  # no callback


def test_dpm_adaptive_from_sigma_max_to_itself_returns_x(seed):
    x = _x(seed, 2.0)
    out, info = K.sample_dpm_adaptive(lambda u, s: 1 / 0, x, 2.0, 2.0, return_info=True, disable=True)
    assert torch.equal(out, x) and out is not x
    assert info == {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}


def test_dpm_argument_errors(seed):
    x = _x(seed, 10.0)
    calls = []

    def den(u, s):
        calls.append(1)
        return u * 0.5

    for fn, args in ((K.sample_dpm_fast, (4,)), (K.sample_dpm_adaptive, ())):
        for smin, smax in ((0.0, 10.0), (0.1, -1.0)):  # k-diffusion raises ValueError here too
            with pytest.raises(ValueError, match="sigma_min and sigma_max must be finite and > 0"):
                fn(den, x, smin, smax, *args, disable=True)
        for smin in (float("nan"), float("inf"), torch.ones(2), "1"):
            with pytest.raises(ValueError, match="sigma_min"):
                fn(den, x, smin, 10.0, *args, disable=True)
        with pytest.raises(ValueError, match="reverse"):  # as k-diffusion
            fn(den, x, 10.0, 0.1, *args, eta=0.5, disable=True)
        with pytest.raises(ValueError, match="eta"):
            fn(den, x, 0.1, 10.0, *args, eta=-1.0, disable=True)
        with pytest.raises(ValueError, match="backend"):
            fn(den, x, 0.1, 10.0, *args, backend="tpu", disable=True)
        with pytest.raises(TypeError, match="extra_args"):
            fn(den, x, 0.1, 10.0, *args, extra_args=[1], disable=True)
        assert not calls, "an argument error after a model call"
        with pytest.raises(ValueError, match="model must return a tensor shaped like x"):
            fn(lambda u, s: u[:1], x, 0.1, 10.0, *args, disable=True)
        with pytest.raises(ValueError, match="noise_sampler must return a tensor shaped like x"):
            fn(den, x, 0.1, 10.0, *args, noise_sampler=lambda s, s1: torch.zeros(3), disable=True)
        calls.clear()
    for n in (0, -3, 2.5, True, "4"):  # k-diffusion fails with an IndexError (0, -3) or later
        with pytest.raises(ValueError, match="n .* must be an int >= 1"):
            K.sample_dpm_fast(den, x, 0.1, 10.0, n, disable=True)
    for order in (1, 4, True):
        with pytest.raises(ValueError, match="order must be 2 or 3"):
            K.sample_dpm_adaptive(den, x, 0.1, 10.0, order=order, disable=True)
    for kw, match in (({"h_init": 0.0}, "h_init"), ({"rtol": -0.1}, "rtol"), ({"atol": float("nan")}, "atol"),
                      ({"pcoeff": "a"}, "pcoeff")):
        with pytest.raises(ValueError, match=match):  # h_init = 0: k-diffusion loops forever
            K.sample_dpm_adaptive(den, x, 0.1, 10.0, disable=True, **kw)
    assert not calls
    from fastdiff.runtime.loop import NonFiniteError

    for model, kw in ((lambda u, s: u * float("nan"), {}), (den, {"rtol": 0.0, "atol": 0.0})):
        with pytest.raises(NonFiniteError, match="error estimate of try 0"):  # k-diffusion: rejects forever
            K.sample_dpm_adaptive(model, x, 0.1, 10.0, disable=True, **kw)


def test_dpm_errors_are_k_diffusions_where_it_has_them(seed):
    """ValueError for sigma_min or sigma_max <= 0, order not 2 or 3, and eta > 0 from low to high sigma."""
    ks = k_sampling()
    x = _x(seed, 10.0)
    for name, args in (("sample_dpm_fast", (4,)), ("sample_dpm_adaptive", ())):
        for smin, smax, kw in ((0.0, 10.0, {}), (0.1, -1.0, {}), (10.0, 0.1, {"eta": 0.5})):
            for mod in (K, ks):
                with pytest.raises(ValueError):
                    getattr(mod, name)(lambda u, s: u * 0.5, x, smin, smax, *args, disable=True, **kw)
    for mod in (K, ks):
        with pytest.raises(ValueError, match="order"):
            mod.sample_dpm_adaptive(lambda u, s: u * 0.5, x, 0.1, 10.0, order=4, disable=True)


# --- the rows, without a model ----------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3])
def test_step_rows_are_exact_for_a_constant_denoiser(order):
    """A denoiser ``D = c`` makes ``eps = (x - c) / sigma`` and the ODE's solution ``c + (X - c)
    sigma_n / sigma``: every order of DPM-Solver is exact there (the rows evaluated in float64)."""
    from fastdiff.core.plan import OP_D, OP_H, OP_X

    def value(coefs, ops):
        return coefs[OP_X] * ops["x"] + coefs[OP_D] * ops["d"] + sum(
            c * ops["h"][k] for k, c in enumerate(coefs[OP_H:OP_H + len(ops["h"])]))

    t, t_next, c, X = -math.log(14.0), -math.log(0.4), 0.7, 3.1
    for low in ([False, True] if order > 1 else [False]):
        rows = k_dpm.step_rows(t, t_next, order, low=low, dtype=torch.float64)
        slots, u = {k_dpm.SLOT_X: X}, X
        for r in rows:
            ops = {"x": u, "d": c, "h": [slots[k] for k in r.reads]}
            for w in r.writes:
                slots[w.slot] = value(w.coef, ops)
            u = value(r.out, ops)
        assert u == pytest.approx(c + (X - c) * 0.4 / 14.0, rel=1e-13)
        if low:
            assert slots[k_dpm.SLOT_LOW] == pytest.approx(u, rel=1e-13) and abs(slots[k_dpm.SLOT_DIFF]) < 1e-13
    with pytest.raises(ValueError, match="order"):
        k_dpm.step_rows(t, t_next, 4)


def test_step_rows_of_a_zero_step_are_the_identity():
    """``h = 0`` (sigma_min == sigma_max): the limit of ``expm1(h) / h - 1`` is 0 (k-diffusion: 0/0 = NaN)."""
    rows = k_dpm.step_rows(1.5, 1.5, 3)
    assert all(math.isfinite(v) for r in rows for v in r.out)
