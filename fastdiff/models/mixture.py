"""The built-in default model: a Gaussian mixture whose denoiser is known in closed form.

Data ``x0 ~ sum_k pi_k N(mu_k, s_k^2 I)`` in any shape. Under any schedule that forms the model
input as ``u = alpha * x0 + sigma * eps`` (VP, VE, flow), ``u`` is again a Gaussian mixture and
``E[x0 | u]`` is exact, so tests and benchmarks know the true answer without training anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..core.plan import check_prediction


class GaussianMixture:
    """An isotropic Gaussian mixture over tensors of shape ``shape`` (float64 parameters).

    Args:
        means: ``[K, *shape]`` component means.
        stds: ``[K]`` per-component standard deviations (> 0).
        weights: ``[K]`` mixture weights (normalised here); uniform if omitted.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor | Sequence[float], weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() < 2:
            raise ValueError(f"means must be [K, *shape], got shape {tuple(self.means.shape)}")
        k = self.means.shape[0]
        self.stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if self.stds.numel() != k or bool((self.stds <= 0).any()):
            raise ValueError(f"stds must be {k} positive values, got {self.stds.tolist()}")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.numel() != k or bool((w <= 0).any()):
            raise ValueError(f"weights must be {k} positive values")
        self.log_weights = torch.log(w / w.sum())

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(self.means.shape[1:])

    @classmethod
    def default(cls, shape: Sequence[int] = (2,), components: int = 8, seed: int = 0) -> "GaussianMixture":
        """The default data: for 2-D points a ring of 8 blobs; otherwise random means of unit scale."""
        shape = tuple(int(s) for s in shape)
        if shape == (2,):
            ang = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
            means = torch.stack([torch.cos(ang), torch.sin(ang)], dim=1) * 2.0
            return cls(means, torch.full((components,), 0.3, dtype=torch.float64))
        g = torch.Generator().manual_seed(seed)
        means = torch.randn((components, *shape), generator=g, dtype=torch.float64) * 0.5
        stds = 0.2 + 0.3 * torch.rand(components, generator=g, dtype=torch.float64)
        return cls(means, stds)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact draws from the data distribution (float64)."""
        k = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k].reshape((-1,) + (1,) * len(self.shape)) * eps

    def component_logits(self, u: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``log p(k | u)`` up to a constant per sample, ``[B, K]``: the exact noisy "classifier" of the
        component a sample came from (differentiable in ``u``; float64)."""
        b = u.shape[0]
        x = u.to(torch.float64).reshape(b, -1)
        mu = self.means.to(x.device).reshape(self.means.shape[0], -1)
        s2 = (self.stds.to(x.device) ** 2)[None, :]
        a = torch.as_tensor(alpha, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        sg = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1).expand(b, 1)
        var = a * a * s2 + sg * sg
        sq = (x * x).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a * a * (mu * mu).sum(1)[None, :]
        return self.log_weights.to(x.device)[None, :] - 0.5 * x.shape[1] * torch.log(var) - 0.5 * sq / var

    def denoise(self, u: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Exact ``E[x0 | u]`` for ``u = alpha x0 + sigma eps``; ``alpha``, ``sigma`` per sample ``[B]``."""
        b = u.shape[0]
        x = u.to(torch.float64).reshape(b, -1)
        mu = self.means.to(x.device).reshape(self.means.shape[0], -1)
        s2 = (self.stds.to(x.device) ** 2)[None, :]
        a = alpha.to(x.device, torch.float64).reshape(b, 1)
        sg = sigma.to(x.device, torch.float64).reshape(b, 1)
        var = a * a * s2 + sg * sg  # [B, K]
        dim = x.shape[1]
        sq = (x * x).sum(1, keepdim=True) - 2 * a * (x @ mu.T) + a * a * (mu * mu).sum(1)[None, :]
        logp = self.log_weights.to(x.device)[None, :] - 0.5 * dim * torch.log(var) - 0.5 * sq / var
        gam = torch.softmax(logp, dim=1)  # [B, K]
        gain = a * s2 / var  # [B, K]
        # E[x0|u,k] = mu_k + gain_k (u - a mu_k)
        x0 = (gam @ mu) + (gam * gain).sum(1, keepdim=True) * x - ((gam * gain * a) @ mu)
        return x0.reshape(u.shape)

    def model(self, alpha_sigma: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
              prediction: str = "eps", times: Sequence[float] | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A model ``f(u, t)`` returning the exact ``prediction`` (eps, v, x0, flow velocity or score).

        ``alpha_sigma(t) -> (alpha, sigma)`` maps the model time to the schedule (e.g. a fastdiff
        schedule's ``alpha_sigma``). The output has ``u``'s dtype. With ``times`` (every model time
        the sampler will use, e.g. ``[r.t for r in plan.rows]``), ``alpha_sigma`` is evaluated once
        up front and a call looks ``t`` up on the device: no host synchronisation per call (a
        ``t`` not among ``times`` then gives a wrong answer, unchecked, since checking would sync).
        """
        pred = check_prediction(prediction)
        table: dict = {}
        if times is not None:
            tt = torch.tensor([float(v) for v in times], dtype=torch.float32)
            a_h, s_h = alpha_sigma(tt.to(torch.float64))
            table["cpu"] = (tt, torch.as_tensor(a_h, dtype=torch.float64), torch.as_tensor(s_h, dtype=torch.float64))

        def lookup(t: torch.Tensor, device: torch.device):
            if str(device) not in table:
                table[str(device)] = tuple(v.to(device) for v in table["cpu"])
            tt, at, st = table[str(device)]
            idx = (t.to(torch.float32)[:, None] == tt[None, :]).to(torch.int32).argmax(dim=1)
            return at[idx], st[idx]

        def f(u: torch.Tensor, t: torch.Tensor, *unused, **unused_kw) -> torch.Tensor:
            t = torch.as_tensor(t, device=u.device).reshape(-1).expand(u.shape[0])
            a, s = lookup(t, u.device) if table else alpha_sigma(t)
            a = torch.as_tensor(a, dtype=torch.float64, device=u.device).reshape(-1).expand(u.shape[0])
            s = torch.as_tensor(s, dtype=torch.float64, device=u.device).reshape(-1).expand(u.shape[0])
            x0 = self.denoise(u, a, s)
            shape = (-1,) + (1,) * (u.dim() - 1)
            ua = u.to(torch.float64)
            a_, s_ = a.reshape(shape), s.reshape(shape)
            if pred == "x0":
                out = x0
            elif pred == "score":
                out = (a_ * x0 - ua) / (s_ * s_)  # grad_u log p_t(u), Tweedie
            else:
                eps = (ua - a_ * x0) / s_
                if pred == "eps":
                    out = eps
                elif pred == "v":
                    out = a_ * eps - s_ * x0
                else:
                    out = eps - x0
            return out.to(u.dtype)

        return f
