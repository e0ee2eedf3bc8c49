"""The Gaussian-mixture default model: its denoiser is the exact posterior mean."""

import torch

from fastdiff.models import GaussianMixture


def test_single_gaussian_closed_form():
    d = 5
    mu = torch.randn(1, d, dtype=torch.float64)
    s = float(torch.rand(()) * 0.8 + 0.2)
    gm = GaussianMixture(mu, [s])
    u = torch.randn(7, d, dtype=torch.float64)
    a = torch.rand(7, dtype=torch.float64) * 0.9 + 0.05
    sg = torch.rand(7, dtype=torch.float64) + 0.1
    got = gm.denoise(u, a, sg)
    gain = (a * s * s / (a * a * s * s + sg * sg))[:, None]
    want = mu + gain * (u - a[:, None] * mu)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_mixture_matches_brute_force_posterior():
    gm = GaussianMixture.default((3, 2, 2), components=5, seed=int(torch.randint(0, 1000, ())))
    u = torch.randn(6, 3, 2, 2, dtype=torch.float64)
    a = torch.rand(6, dtype=torch.float64) * 0.9 + 0.05
    sg = torch.rand(6, dtype=torch.float64) + 0.05
    got = gm.denoise(u, a, sg)
    mu = gm.means.reshape(5, -1)
    x = u.reshape(6, -1)
    want = []
    for b in range(6):
        logs, posts = [], []
        for k in range(5):
            var = a[b] ** 2 * gm.stds[k] ** 2 + sg[b] ** 2
            dist = torch.distributions.MultivariateNormal(a[b] * mu[k], var * torch.eye(12, dtype=torch.float64))
            logs.append(gm.log_weights[k] + dist.log_prob(x[b]))
            posts.append(mu[k] + a[b] * gm.stds[k] ** 2 / var * (x[b] - a[b] * mu[k]))
        wts = torch.softmax(torch.stack(logs), 0)
        want.append((wts[:, None] * torch.stack(posts)).sum(0))
    assert torch.allclose(got.reshape(6, -1), torch.stack(want), rtol=1e-10, atol=1e-12)


def test_model_predictions_are_consistent():
    gm = GaussianMixture.default((2,))
    u = torch.randn(9, 2, dtype=torch.float64)
    t = torch.rand(9, dtype=torch.float64) * 0.9 + 0.05

    def vp(tt):
        return torch.sqrt(1 - tt), torch.sqrt(tt)

    a, s = vp(t)
    x0 = gm.model(vp, "x0")(u, t)
    eps = gm.model(vp, "eps")(u, t)
    v = gm.model(vp, "v")(u, t)
    assert torch.allclose(a[:, None] * x0 + s[:, None] * eps, u, atol=1e-12)
    assert torch.allclose(v, a[:, None] * eps - s[:, None] * x0, atol=1e-12)
    flow = gm.model(lambda tt: (1 - tt, tt), "flow")(u, t)
    x0f = gm.model(lambda tt: (1 - tt, tt), "x0")(u, t)
    assert torch.allclose(u - t[:, None] * flow, x0f, atol=1e-12)


def test_sample_statistics():
    gm = GaussianMixture(torch.tensor([[1.0, -2.0]]), [0.5])
    x = gm.sample(200_000, torch.Generator().manual_seed(int(torch.randint(0, 10**6, ()))))
    assert torch.allclose(x.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.01)
    assert torch.allclose(x.std(0), torch.full((2,), 0.5, dtype=torch.float64), atol=0.01)
