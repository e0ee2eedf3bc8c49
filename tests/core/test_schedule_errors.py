"""Malformed ``trained_betas`` (and ``num_train_timesteps``) are refused by name, where stock
diffusers accepts them and fails later with an unrelated error or gives NaN / meaningless samples;
what stock runs correctly (more betas than ``num_train_timesteps``) runs here as it does there.

What diffusers 0.42 does with the same ``trained_betas`` (DDPM, DDIM, Euler, Euler a, Heun, LMS,
DPM-Solver, UniPC; ``num_train_timesteps`` 1000 unless said):

- fewer than ``num_train_timesteps`` (10): constructs; DDPM/DDIM ``step`` raise ``IndexError``
  (index 900 out of bounds), Euler-type grids clamp every sigma past t = 9 (finite, not the
  schedule), DPM-Solver / UniPC / LMS give NaN. ``len(trained_betas)`` never becomes
  ``num_train_timesteps``: refused here, naming both.
- more (1200): every scheduler runs, spacing its grids over ``num_train_timesteps`` and keeping
  every beta (DPM-Solver's Karras grid reaches t = 1199). Accepted here the same way.
- 2-D, 0-D, empty: errors from deep inside ``__init__`` / ``set_timesteps`` / ``step`` (``RuntimeError``,
  ``IndexError``, ``ValueError: object too deep``). Refused here by name.
- strings: ``ValueError: too many dimensions 'str'`` / ``TypeError: new(): invalid data type 'str'``.
  Refused here with a ``TypeError`` naming ``trained_betas``.
- NaN, inf, 0, negative, > 1: accepted; samples NaN (Euler-type, DDPM/DDIM) or silently off.
  Refused here (they were already, as "betas must lie in (0, 1]"; now naming the entry).
- exactly 1 (zero terminal SNR's last beta): accepted there and here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdiff.core import schedules as S
from fastdiff.samplers._multistep import multistep_grid

from .._optional import diffusers  # parity tests skip in the test when diffusers is missing

LIN = np.linspace(1e-4, 0.02, 1000)

HOSTILE = [
    ("string", "abc", TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("bytes", b"abc", TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("strings", ["0.001"] * 1000, TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("none-inside", [0.01, None] * 500, TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("a-float", 0.01, TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("a-dict", {"a": 0.1}, TypeError, "trained_betas must be a 1-D sequence of numbers"),
    ("complex", torch.ones(1000, dtype=torch.complex64) * 0.01, TypeError, "trained_betas"),
    ("0-d-tensor", torch.tensor(0.01), ValueError, "trained_betas must be 1-D, got shape ()"),
    ("2-d", LIN.reshape(10, 100).tolist(), ValueError, "trained_betas must be 1-D, got shape (10, 100)"),
    ("2-d-row", LIN.reshape(1, 1000), ValueError, "trained_betas must be 1-D, got shape (1, 1000)"),
    ("empty", [], ValueError, "trained_betas is empty"),
    ("one-entry", [0.01], ValueError, "trained_betas must have at least 2 entries"),
    ("nan", [float("nan")] + LIN[1:].tolist(), ValueError, "trained_betas[0] = nan: betas must lie in (0, 1]"),
    ("inf", LIN[:-1].tolist() + [float("inf")], ValueError, "trained_betas[999] = inf"),
    ("zero", [0.0] + LIN[1:].tolist(), ValueError, "trained_betas[0] = 0: betas must lie in (0, 1]"),
    ("negative", LIN[:5].tolist() + [-0.01] + LIN[6:].tolist(), ValueError, "trained_betas[5] = -0.01"),
    ("above-one", LIN[:-1].tolist() + [1.5], ValueError, "trained_betas[999] = 1.5"),
    ("too-short", LIN[:10].tolist(), ValueError, "trained_betas has 10 entries but num_train_timesteps is 1000"),
    ("one-short", LIN[:999].tolist(), ValueError, "trained_betas has 999 entries but num_train_timesteps is 1000"),
]


@pytest.mark.parametrize("case, betas, exc, part", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_trained_betas_are_refused_by_name(case, betas, exc, part):
    with pytest.raises(exc) as info:
        S.from_config({"trained_betas": betas})
    assert part in str(info.value), str(info.value)
    with pytest.raises(exc, match="trained_betas"):
        S.vp(trained_betas=betas, num_train_timesteps=1000)
    assert "\n" not in str(info.value)


def test_too_short_names_both_keys_where_stock_fails_late():
    """Stock DDIM takes the config and fails at its first step with an IndexError naming nothing."""
    cfg = dict(diffusers.DDIMScheduler(trained_betas=LIN[:10].tolist()).config)
    with pytest.raises(ValueError, match=r"trained_betas has 10 entries but num_train_timesteps is 1000.*"
                                         r"num_train_timesteps=10"):
        S.from_config(cfg)
    stock = diffusers.DDIMScheduler(**cfg)
    stock.set_timesteps(10)
    with pytest.raises(IndexError):  # what diffusers does: the documented reason for refusing
        stock.step(torch.zeros(1, 2), stock.timesteps[0], torch.zeros(1, 2))


def test_num_train_timesteps_matching_the_betas_is_fine():
    sched = S.from_config({"trained_betas": LIN[:10].tolist(), "num_train_timesteps": 10})
    assert sched.num_train_timesteps == 10 and sched.train_timesteps is None


def test_vp_without_num_train_timesteps_takes_the_betas_length():
    assert S.vp(trained_betas=LIN[:300].tolist()).num_train_timesteps == 300
    assert S.vp().num_train_timesteps == 1000


def test_a_beta_of_one_is_accepted_as_zero_terminal_snr():
    sched = S.from_config({"trained_betas": LIN[:-1].tolist() + [1.0]})
    assert sched.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("value", ["1000", 1, 0, -5, 2.5, True, [1000]])
def test_bad_num_train_timesteps_is_refused_by_name(value):
    with pytest.raises(ValueError, match="num_train_timesteps must be an int >= 2"):
        S.vp(num_train_timesteps=value)
    with pytest.raises(ValueError, match="num_train_timesteps must be an int >= 2"):
        S.vp(trained_betas=LIN.tolist(), num_train_timesteps=value)


def test_schedule_betas_outside_the_range_name_their_keys():
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\]: beta_schedule='linear' with beta_start=0.0001, "
                                         r"beta_end=1.5"):
        S.from_config({"beta_end": 1.5})


# ------------------------------------------------------------------ longer than num_train_timesteps

LONG = np.linspace(1e-4, 0.02, 1200).tolist()
STEPS = [1, 7, 10, 50]


def f64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_longer_betas_integer_timesteps_match_diffusers(cls, spacing):
    sched = getattr(diffusers, cls)(trained_betas=LONG, timestep_spacing=spacing)
    ours = S.from_config(sched.config)
    assert ours.num_train_timesteps == 1000 and ours.train_timesteps == 1000
    assert np.array_equal(ours.alphas_cumprod, f64(sched.alphas_cumprod))  # every beta kept, as diffusers
    for n in STEPS:
        sched.set_timesteps(n)
        assert np.array_equal(ours.timesteps(n, "leading"), f64(sched.timesteps)), (cls, spacing, n)


@pytest.mark.parametrize("grid", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True},
                                  {"final_sigmas_type": "sigma_min"}, {"timestep_spacing": "leading"}])
def test_longer_betas_euler_grid_matches_diffusers(grid):
    sched = diffusers.EulerDiscreteScheduler(trained_betas=LONG, **grid)
    ours = S.from_config(sched.config)
    for n in STEPS:
        sched.set_timesteps(n)
        d = ours.discretize(n)
        assert np.array_equal(d.sigmas, f64(sched.sigmas)), (grid, n)
        assert np.array_equal(d.timesteps, f64(sched.timesteps)), (grid, n)


@pytest.mark.parametrize("cls, cfg", [
    ("DPMSolverMultistepScheduler", {}),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),  # reaches t = 1199, past num_train_timesteps
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}),
    ("DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}),
    ("UniPCMultistepScheduler", {}),
    ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
])
def test_longer_betas_multistep_grid_matches_diffusers(cls, cfg):
    sched = getattr(diffusers, cls)(trained_betas=LONG, **cfg)
    ours = S.from_config(sched.config)
    flavor = "unipc" if cls.startswith("UniPC") else "dpmsolver"
    kw = {k: v for k, v in cfg.items() if k in ("use_lu_lambdas", "lambda_min_clipped")}
    for n in STEPS[1:]:
        sched.set_timesteps(n)
        g = multistep_grid(ours, n, flavor=flavor, **kw)
        assert np.array_equal(np.asarray(g.timesteps), f64(sched.timesteps)), (cfg, n)
        assert np.array_equal(np.asarray(g.sigmas), f64(sched.sigmas)), (cfg, n)


def test_longer_betas_ddim_sampling_matches_stock():
    """A whole DDIM run under a config with more betas than num_train_timesteps: fastdiff.sample
    jumps num_train_timesteps // steps as diffusers does (it jumped len(betas) // steps)."""
    import fastdiff

    stock = diffusers.DDIMScheduler(trained_betas=LONG, clip_sample=False)

    def model(x, t):
        return torch.tanh(0.5 * x + 1e-3 * t.reshape(-1, 1))

    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    got = fastdiff.sample(model, noise, sampler="ddim", steps=10, schedule=dict(stock.config), backend="reference")
    stock.set_timesteps(10)
    x = noise.clone()
    for t in stock.timesteps:
        x = stock.step(model(x, t.float().expand(3)), t, x).prev_sample
    assert float((got - x).norm() / x.norm()) <= 1e-5
