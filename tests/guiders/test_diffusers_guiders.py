"""Parity of the fused guidance blend with every diffusers guider's own ``forward``.

For each supported class of ``diffusers.guiders``: seeded random configurations (scales including
the neutral ones, windows, ``use_original_formulation``, ``guidance_rescale``, momentum, eta, norm
thresholds, zero-init steps, perturbed-branch windows), run over several steps with fresh branch
predictions per step, the stock guider stepping with ``set_state`` (and its momentum buffer) and
:func:`fastdiff.guiders.guide` computing each step with ONE fused step on the reference and cpu
backends. Each step's prediction must be within 1e-6 relative of stock's; for tangential CFG,
whose stock form is a float32 SVD that is itself up to ~3e-6 from the exact projection, within
1e-6 of the exact (float64) result and no further from stock than 1e-6 plus twice stock's own error.
"""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from fastdiff.guiders import from_diffusers, guide
from fastdiff.guiders.convert import SUPPORTED as CONVERTED
from tests._optional import diffusers

TOL = 1e-6
STEPS = 6
BACKENDS = ["reference", "cpu"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    den = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / (den if den > 0 else 1.0)


def _tcfg_exact(c: torch.Tensor, u: torch.Tensor, w: float, original: bool, rescale: float) -> torch.Tensor:
    """diffusers' tangential CFG (and its guidance rescale) computed in float64 (its own code casts to
    float32 first)."""
    preds = torch.stack([c, u], 1).double().flatten(2)
    vh = torch.linalg.svd(preds, full_matrices=False)[2]
    v1 = vh[:, 0]
    uf = u.double().flatten(1)
    up = ((uf * v1).sum(1, keepdim=True) * v1).reshape(u.shape)
    base = c.double() if original else up
    pred = base + w * (c.double() - up)
    if rescale > 0:
        from diffusers.guiders.guider_utils import rescale_noise_cfg

        pred = rescale_noise_cfg(pred, c.double(), rescale)
    return pred


def _config(name: str, r: random.Random) -> dict:
    """A random constructor configuration for guider class ``name``."""
    if name == "FrequencyDecoupledGuidance":  # per-level lists; no level switched off alone (diffusers raises)
        levels = r.choice([1, 2, 3])
        orig = r.random() < 0.3
        off = [0.0 if orig else 1.0] * levels
        scales = off if r.random() < 0.15 else [r.choice([2.5, 7.5, 12.0]) for _ in range(levels)]
        space = r.choice(["data", "freq"])
        return dict(guidance_scales=scales, use_original_formulation=orig, guidance_rescale_space=space,
                    guidance_rescale=[r.choice([0.0, 0.0, 0.7]) for _ in range(levels)],
                    parallel_weights=[r.choice([1.0, 1.0, 0.3]) for _ in range(levels)],
                    start=r.choice([0.0, 0.0, 0.2]), stop=r.choice([1.0, 1.0, 0.7]),
                    upcast_to_double=r.random() < 0.8)
    scale = r.choice([1.0, 0.0, 2.5, 7.5, 12.0])
    cfg = dict(guidance_scale=scale, guidance_rescale=r.choice([0.0, 0.0, 0.7]),
               start=r.choice([0.0, 0.0, 0.2]), stop=r.choice([1.0, 1.0, 0.7]))
    if name != "LTX2Guidance":
        cfg["use_original_formulation"] = r.random() < 0.3
    if name == "ClassifierFreeZeroStarGuidance":
        cfg["zero_init_steps"] = r.choice([0, 1, 2])
    elif name == "MagnitudeAwareGuidance":
        cfg["alpha"] = r.choice([8.0, 2.0, 0.5])
    elif name == "AdaptiveProjectedGuidance":
        cfg.update(adaptive_projected_guidance_momentum=r.choice([None, -0.5, 0.3]),
                   adaptive_projected_guidance_rescale=r.choice([0.0, 2.0, 15.0]), eta=r.choice([1.0, 0.0, 0.4]))
    elif name == "AdaptiveProjectedMixGuidance":
        cfg.update(adaptive_projected_guidance_scale=r.choice([10.0, 1.0, 4.0]),
                   adaptive_projected_guidance_momentum=r.choice([None, -0.5]),
                   adaptive_projected_guidance_rescale=r.choice([0.0, 10.0, 3.0]), eta=r.choice([0.0, 1.0, 0.5]),
                   adaptive_projected_guidance_start_step=r.choice([0, 2, 5]))
    elif name in ("PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance"):
        key = {"PerturbedAttentionGuidance": "perturbed_guidance", "SkipLayerGuidance": "skip_layer_guidance",
               "SmoothedEnergyGuidance": "seg_guidance"}[name]
        cfg[f"{key}_scale"] = r.choice([2.8, 0.0, 1.0])
        cfg[f"{key}_start"] = r.choice([0.0, 0.01, 0.3])
        cfg[f"{key}_stop"] = r.choice([0.2, 1.0, 0.6])
        cfg[f"{key}_layers"] = [0]
    elif name == "AutoGuidance":
        cfg.update(auto_guidance_layers=[0], dropout=0.1)
    elif name == "LTX2Guidance":
        cfg.update(stg_scale=r.choice([0.0, 1.0, 2.5]), modality_scale=r.choice([1.0, 3.0]))
    return cfg


def _reset_momentum(g) -> None:
    """What diffusers' ``prepare_inputs`` does at step 0 for the momentum guiders."""
    m = getattr(g, "adaptive_projected_guidance_momentum", None)
    if hasattr(g, "momentum_buffer"):
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

        g.momentum_buffer = MomentumBuffer(m) if m is not None else None


def _stock_forward(name: str, g, c, u, p, q):
    if name in ("PerturbedAttentionGuidance", "SkipLayerGuidance", "SmoothedEnergyGuidance"):
        return g.forward(c, u, p).pred
    if name == "AutoGuidance":
        return g.forward(c, p).pred
    if name == "LTX2Guidance":
        return g.forward(c, u, p, q).pred
    return g.forward(c, u).pred


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CONVERTED)
def test_guider_steps_match_stock(name: str, backend: str) -> None:
    if backend == "cpu":
        from fastdiff.backends import cpu

        if not cpu.available()[0]:
            pytest.skip("cpu extension not built")
    cls = getattr(diffusers.guiders, name)
    r = random.Random(hash(name) % 1000)
    gen = torch.Generator().manual_seed(7)
    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for case in range(12):
            cfg = _config(name, r)
            try:
                g = cls(**cfg)
            except (ValueError, TypeError):
                continue  # diffusers refuses the configuration itself
            ours = from_diffusers(g)
            shape = r.choice([(2, 16, 8), (3, 5, 7)] if name == "MagnitudeAwareGuidance" else
                             [(2, 4, 16, 16), (1, 3, 32, 12)] if name == "FrequencyDecoupledGuidance" else
                             [(2, 4, 6, 6), (3, 16, 8), (1, 3, 5, 7)])
            momentum = torch.zeros(shape)
            for step in range(STEPS):
                g.set_state(step, STEPS, torch.tensor(999 - 100 * step))
                if step == 0:
                    _reset_momentum(g)
                c = torch.randn(shape, generator=gen)
                u, p, q = (c + 0.3 * torch.randn(shape, generator=gen) for _ in range(3))
                ref = _stock_forward(name, g, c, u, p, q)
                got = guide(ours, step, STEPS, cond=c, uncond=u, perturbed=p, modality=q, momentum=momentum,
                            backend=backend)
                what = f"{name} case {case} cfg={cfg} step {step}"
                if not torch.isfinite(ref).all():  # CFG-Zero*'s zero init with guidance_rescale: 0/0 in diffusers
                    assert torch.equal(got, torch.zeros_like(got)), what
                    continue
                err = _rel(got, ref)
                if name == "TangentialClassifierFreeGuidance" and ours.blend(step, STEPS) is not None:
                    exact = _tcfg_exact(c, u, ours.scale, ours.original, ours.rescale)
                    stock_err = _rel(ref, exact)
                    assert _rel(got, exact) <= TOL, f"{what}: {_rel(got, exact):.3g} from the exact projection"
                    assert err <= TOL + 2 * stock_err, f"{what}: {err:.3g} from stock (stock's own {stock_err:.3g})"
                else:
                    assert err <= TOL, f"{what}: {err:.3g} from stock"
                checked += 1
    assert checked >= 20, f"only {checked} steps compared"


@pytest.mark.parametrize("norm_dim", [1, (1, 2), -1, (1, 2, 3), (-3, -2, -1)])
@pytest.mark.parametrize("momentum", [None, -0.5])
def test_apg_norm_dim_matches_stock(norm_dim, momentum) -> None:
    """``adaptive_projected_guidance_norm_dim`` (norms and projections per pixel, per channel, ...):
    computed outside the step as diffusers computes it, the momentum updated by the step."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = diffusers.guiders.AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_norm_dim=norm_dim,
                                                        adaptive_projected_guidance_momentum=momentum,
                                                        adaptive_projected_guidance_rescale=3.0, eta=0.3)
    ours = from_diffusers(g)
    gen = torch.Generator().manual_seed(4)
    shape = (2, 3, 4, 5)
    for backend in BACKENDS:
        buf = torch.zeros(shape)
        for step in range(4):
            g.set_state(step, 4, None)
            if step == 0:
                _reset_momentum(g)
            c = torch.randn(shape, generator=gen)
            u = c + 0.4 * torch.randn(shape, generator=gen)
            want = g.forward(c, u).pred
            got = guide(ours, step, 4, cond=c, uncond=u, momentum=buf, backend=backend)
            assert _rel(got, want) <= TOL, f"norm_dim {norm_dim} step {step} {backend}: {_rel(got, want):.3g}"
    dims = (norm_dim,) if isinstance(norm_dim, int) else norm_dim
    if any(d >= 2 or d < -2 for d in dims):  # dimensions a 2-D prediction does not have: refused by name
        with pytest.raises(ValueError, match="norm_dim"):
            guide(ours, 1, 4, cond=torch.randn(3, 4), uncond=torch.randn(3, 4), momentum=torch.zeros(3, 4))


def test_unknown_guider_and_options_are_refused_by_name() -> None:
    with pytest.raises(TypeError, match="not a supported diffusers guider"):
        from_diffusers(object())


def test_guide_names_a_missing_branch() -> None:
    from fastdiff.guiders import Perturbed

    c = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="perturbed branch"):
        guide(Perturbed(perturbed_start=0.0, perturbed_stop=1.0), 1, 4, cond=c, uncond=c)
