"""A real model trained here: scikit-learn's 8x8 handwritten digits (1 channel, 10 classes).

Three small networks, trained by ``scripts/train_digits.py`` on the CPU in minutes, with weights
committed under ``fastdiff/zoo/weights/`` (safetensors, float16, upcast to float32 on load; the
weights are the trained float32 ones rounded once, and every quality number was measured with the
rounded ones):

- :class:`Denoiser` ``model(x, t, cond) -> eps``: noise-conditional, class-conditional with label
  dropout, so :data:`NULL` (a learned "no class" token) gives the unconditional model and
  classifier-free guidance works with ``uncond = torch.full((B,), NULL)``. Epsilon prediction under
  the VP schedule :func:`schedule_config` (diffusers config, 1000 training steps, stored with the
  weights). Works with :func:`fastdiff.sample` as it is.
- :class:`NoisyClassifier` ``clf(x_t, t) -> logits [B, 10]``: p(y | x_t, t) on the model input
  ``x_t = alpha_t x0 + sigma_t eps``, differentiable w.r.t. ``x_t`` (classifier guidance).
- :class:`FeatureClassifier` ``clf(x) -> logits [B, 10]`` on clean digits; ``clf.features(x)``
  is its penultimate layer ``[B, 64]``, the feature space of the Fréchet distance in
  ``scripts/digits_quality.py``.

Pixels are scaled to [-1, 1] (``v / 8 - 1`` for sklearn's 0..16 values); images are ``[B, 1, 8, 8]``.
Loading needs ``safetensors`` and nothing else; only :func:`load_data` needs scikit-learn (the
``train`` extra), and nothing is ever downloaded.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (1, 8, 8)
"""Shape of one digit image."""
NUM_CLASSES = 10
NULL = 10
"""Class index of the learned "no class" token: the unconditional model."""
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEST_SIZE = 360
"""Digits held out (the first ``TEST_SIZE`` of a fixed permutation) from every model's training."""

_DEFAULT_SCHEDULE = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
    "prediction_type": "epsilon", "clip_sample": False,
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of float times ``t`` ``[B]`` (DDPM's, fractional t allowed)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.to(torch.float32).reshape(-1, 1) * freqs[None, :]
    return torch.cat([torch.cos(a), torch.sin(a)], dim=1)


class FiLMBlock(nn.Module):
    """Residual MLP block ``h + W2 silu(W1 (LN(h) * (1 + scale) + shift))``, scale/shift from the embedding."""

    def __init__(self, width: int, emb: int, ratio: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(emb, 2 * width)
        self.fc1 = nn.Linear(width, ratio * width)
        self.fc2 = nn.Linear(ratio * width, width)
        nn.init.zeros_(self.fc2.weight)  # every block starts as the identity
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(e).chunk(2, dim=1)
        return h + self.fc2(F.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class Denoiser(nn.Module):
    """Noise- and class-conditional eps-predictor for 8x8 digits: a residual MLP with FiLM conditioning.

    ``forward(x, t, cond=None)``: ``x`` ``[B, 1, 8, 8]`` model input, ``t`` ``[B]`` (or scalar) float
    diffusers timesteps in [0, 1000), ``cond`` int64 ``[B]`` classes in 0..9 or :data:`NULL`
    (``None`` means :data:`NULL` for every sample). Returns eps ``[B, 1, 8, 8]``, ``x``'s dtype.
    """

    def __init__(self, width: int = 192, blocks: int = 3, emb: int = 64, ratio: int = 2, t_dim: int = 64):
        super().__init__()
        self.arch = {"width": width, "blocks": blocks, "emb": emb, "ratio": ratio, "t_dim": t_dim}
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label = nn.Embedding(NUM_CLASSES + 1, emb)  # row NULL is the learned "no class" token
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([FiLMBlock(width, emb, ratio) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 64)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        if cond is None:
            cond = torch.full((b,), NULL, dtype=torch.long, device=x.device)
        e = F.silu(self.t_mlp(timestep_embedding(t, self.t_dim)) + self.label(cond.to(x.device, torch.long)))
        h = self.inp(x.reshape(b, 64).to(torch.float32))
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(self.out_norm(h)).reshape(x.shape).to(x.dtype)


class NoisyClassifier(nn.Module):
    """p(y | x_t, t): logits ``[B, 10]`` from a noisy model input ``x_t`` ``[B, 1, 8, 8]`` and ``t`` ``[B]``.

    Same trunk as :class:`Denoiser` (residual MLP, FiLM on the time embedding), smaller.
    Differentiable w.r.t. ``x_t`` (classifier guidance calls it under autograd).
    """

    def __init__(self, width: int = 128, blocks: int = 2, emb: int = 64, ratio: int = 2, t_dim: int = 64):
        super().__init__()
        self.arch = {"width": width, "blocks": blocks, "emb": emb, "ratio": ratio, "t_dim": t_dim}
        self.t_dim = t_dim
        self.t_mlp = nn.Sequential(nn.Linear(t_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([FiLMBlock(width, emb, ratio) for _ in range(blocks)])
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, NUM_CLASSES)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(b)
        e = F.silu(self.t_mlp(timestep_embedding(t, self.t_dim)))
        h = self.inp(x.reshape(b, 64).to(torch.float32))
        for blk in self.blocks:
            h = blk(h, e)
        return self.out(self.out_norm(h))


class FeatureClassifier(nn.Module):
    """Classifier of clean digits ``[B, 1, 8, 8]`` -> logits ``[B, 10]``; :meth:`features` gives ``[B, 64]``."""

    def __init__(self, c1: int = 16, c2: int = 32, feat: int = 64):
        super().__init__()
        self.arch = {"c1": c1, "c2": c2, "feat": feat}
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 16, feat)
        self.head = nn.Linear(feat, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``[B, feat]`` (after the ReLU), float32."""
        h = F.relu(self.conv1(x.reshape(-1, *SHAPE).to(torch.float32)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # [B, c2, 4, 4]
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


_CLASSES = {"denoiser": Denoiser, "noisy_classifier": NoisyClassifier, "feature_classifier": FeatureClassifier}


# ----------------------------------------------------------------------------- weights


def save(model: nn.Module, name: str, info: dict[str, Any], weights_dir: str = WEIGHTS_DIR) -> str:
    """Write ``{name}.safetensors`` (float16) and ``{name}.json`` (architecture + ``info``); returns the path."""
    from safetensors.torch import save_file

    os.makedirs(weights_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = os.path.join(weights_dir, f"{name}.safetensors")
    save_file(tensors, path)
    with open(os.path.join(weights_dir, f"{name}.json"), "w") as f:
        json.dump({"class": type(model).__name__, "arch": model.arch, **info}, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def read_config(name: str, weights_dir: str = WEIGHTS_DIR) -> dict:
    """The JSON written next to ``{name}.safetensors`` (architecture, schedule, training record)."""
    path = os.path.join(weights_dir, f"{name}.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no weights config {path!r}: run scripts/train_digits.py to create it")
    with open(path) as f:
        return json.load(f)


def _load(name: str, weights_dir: str | None, device) -> nn.Module:
    from safetensors.torch import load_file

    weights_dir = weights_dir or WEIGHTS_DIR
    cfg = read_config(name, weights_dir)
    model = _CLASSES[name](**cfg["arch"])
    state = load_file(os.path.join(weights_dir, f"{name}.safetensors"))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    model.config = cfg
    return model.to(device or "cpu").eval().requires_grad_(False)


def load_denoiser(weights_dir: str | None = None, device: torch.device | str | None = None) -> Denoiser:
    """The trained :class:`Denoiser`, eval mode, float32, no parameter gradients; ``.config`` holds its JSON."""
    return _load("denoiser", weights_dir, device)


def load_noisy_classifier(weights_dir: str | None = None, device: torch.device | str | None = None) -> NoisyClassifier:
    """The trained :class:`NoisyClassifier` (classifier guidance), eval mode, float32."""
    return _load("noisy_classifier", weights_dir, device)


def load_feature_classifier(weights_dir: str | None = None,
                            device: torch.device | str | None = None) -> FeatureClassifier:
    """The trained :class:`FeatureClassifier` (Fréchet features, accuracy), eval mode, float32."""
    return _load("feature_classifier", weights_dir, device)


def schedule_config(weights_dir: str | None = None) -> dict:
    """The diffusers scheduler config the denoiser was trained under (pass it as ``schedule=``)."""
    try:
        return dict(read_config("denoiser", weights_dir or WEIGHTS_DIR)["schedule"])
    except FileNotFoundError:
        return dict(_DEFAULT_SCHEDULE)


# ----------------------------------------------------------------------------- data and training


def load_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (no download): ``(x [N, 1, 8, 8] float32 in [-1, 1], y [N] int64)``.

    ``split``: ``train`` (1437 digits), ``test`` (the :data:`TEST_SIZE` = 360 held out by a fixed
    permutation) or ``all`` (1797). Needs scikit-learn (``pip install fastdiff[train]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("fastdiff.zoo.digits.load_data needs scikit-learn: pip install 'fastdiff[train]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).reshape(-1, *SHAPE) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if split == "all":
        return x, y
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    idx = perm[:TEST_SIZE] if split == "test" else perm[TEST_SIZE:]
    return x[idx], y[idx]


def alphas_cumprod(config: dict | None = None) -> torch.Tensor:
    """``alphas_cumprod`` ``[T]`` float32 of a diffusers config (default: :func:`schedule_config`)."""
    from ..schedules import from_config

    return torch.tensor(from_config(config or schedule_config()).alphas_cumprod, dtype=torch.float32)


def noisy(x0: torch.Tensor, acp: torch.Tensor, generator: torch.Generator | None = None):
    """``(x_t, t, eps)``: ``x_t = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) eps`` at integer ``t ~ U{0..T-1}``."""
    b = x0.shape[0]
    t = torch.randint(0, acp.shape[0], (b,), generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    a = acp[t].reshape(b, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t.to(torch.float32), eps


def denoiser_loss(model: Denoiser, x0: torch.Tensor, y: torch.Tensor, acp: torch.Tensor, p_uncond: float = 0.2,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Eps-prediction MSE with label dropout (each label replaced by :data:`NULL` with ``p_uncond``)."""
    xt, t, eps = noisy(x0, acp, generator)
    drop = torch.rand(y.shape, generator=generator) < p_uncond
    return F.mse_loss(model(xt, t, torch.where(drop, torch.full_like(y, NULL), y)), eps)


def noisy_classifier_loss(model: NoisyClassifier, x0: torch.Tensor, y: torch.Tensor, acp: torch.Tensor,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Cross-entropy of p(y | x_t, t) at a uniform random training step per sample."""
    xt, t, _ = noisy(x0, acp, generator)
    return F.cross_entropy(model(xt, t), y)
