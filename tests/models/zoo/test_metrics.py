"""fastdiff.models.zoo.digits' sample-quality metrics (Fréchet distance, KID, precision/recall,
density/coverage) on synthetic features with known answers. No scikit-learn, no weights; fast."""

import pytest
import torch

from fastdiff.models.zoo import digits as D


def _gauss(n, d=8, shift=0.0, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) * scale + shift


def test_frechet_of_a_set_with_itself_is_zero():
    x = _gauss(300)
    assert abs(D.frechet_distance(x, x)) < 1e-8
    assert abs(D.frechet_distance(x.float(), x.float())) < 1e-4  # float32 features, computed in float64


def test_frechet_matches_the_closed_form_for_gaussians():
    # N(0, I) vs N(m, 4 I) in d dims: |m|^2 + d (1 + 4 - 2 * 2) = |m|^2 + d
    d = 4
    a, b = _gauss(20000, d, seed=1), _gauss(20000, d, shift=0.5, scale=2.0, seed=2)
    assert D.frechet_distance(a, b) == pytest.approx(d * 0.25 + d, rel=0.05)


def test_kid_is_unbiased_on_identical_distributions():
    # independent draws of one distribution: KID averages to 0 (within 3 standard errors) even at a
    # small n, where the biased estimate (diagonal included) and the Fréchet distance sit well above 0
    vals, biased, fds = [], [], []
    for s in range(40):
        a, b = _gauss(40, seed=2 * s), _gauss(40, seed=2 * s + 1)
        vals.append(D.kid(a, b))
        k = lambda x, y: (x @ y.T / x.shape[1] + 1) ** 3  # noqa: E731
        biased.append(float(k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()))
        fds.append(D.frechet_distance(a, b))
    v = torch.tensor(vals)
    se = float(v.std() / len(vals) ** 0.5)
    assert abs(float(v.mean())) < 3 * se, (float(v.mean()), se)
    assert float(torch.tensor(biased).mean()) > 10 * se
    assert min(fds) > 0
    # and it does see a difference of distributions
    shifted = [D.kid(_gauss(40, seed=2 * s), _gauss(40, shift=0.5, seed=2 * s + 1)) for s in range(10)]
    assert min(shifted) > float(v.mean()) + 5 * se


def test_kid_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        D.kid(_gauss(1), _gauss(5))


def test_precision_recall_density_coverage_on_identical_sets():
    x = _gauss(200)
    assert D.precision_recall(x, x) == (1.0, 1.0)
    dens, cov = D.density_coverage(x, x)
    assert cov == 1.0 and 0.9 < dens < 1.5  # every point in its own ball; about k balls hold each


def test_precision_recall_on_independent_draws_is_high():
    p, r = D.precision_recall(_gauss(500, d=4, seed=3), _gauss(500, d=4, seed=4))
    assert p > 0.85 and r > 0.85, (p, r)


def test_recall_and_coverage_drop_when_samples_collapse_onto_one_mode():
    # real: two well-separated blobs; fake: only one of them. Precision stays high (every fake
    # point is realistic), recall and coverage halve (half the real data is never produced)
    real = torch.cat([_gauss(200, d=4, seed=5), _gauss(200, d=4, shift=20.0, seed=6)])
    fake = _gauss(400, d=4, seed=7)
    p, r = D.precision_recall(real, fake)
    dens, cov = D.density_coverage(real, fake)
    assert p > 0.85 and 0.4 < r < 0.55, (p, r)
    # density stays about 1: each fake point lies in as many real balls as a real point of its blob
    assert 0.4 < cov < 0.55 and 0.8 < dens < 1.3, (dens, cov)
    far = _gauss(100, d=4, shift=100.0, seed=8)
    assert D.precision_recall(real, far) == (0.0, 0.0)
    assert D.density_coverage(real, far) == (0.0, 0.0)
