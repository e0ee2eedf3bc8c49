"""A real model trained here: scikit-learn's 8x8 handwritten digits (1 channel, 10 classes).

Three small networks, trained by ``scripts/train_digits.py`` on the CPU in minutes, with weights
committed under ``fastdiff/zoo/weights/`` (safetensors, float16, upcast to float32 on load; the
weights are the trained float32 ones rounded once, and every quality number was measured with the
rounded ones). Each ``{name}.json`` records its weights file's SHA-256 (``sha256``); the loaders
verify it, and a missing, corrupt, truncated or mismatched file raises
:class:`fastdiff.models.zoo.WeightsError` naming the file and how to restore or retrain it
(:func:`weights_sha256` gives the verified digest):

- :class:`Denoiser` ``model(x, t, cond) -> eps``: noise-conditional, class-conditional with label
  dropout, so :data:`NULL` (a learned "no class" token) gives the unconditional model and
  classifier-free guidance works with ``uncond = torch.full((B,), NULL)``. Epsilon prediction under
  the VP schedule :func:`schedule_config` (diffusers config, 1000 training steps, stored with the
  weights). Works with :func:`fastdiff.sample` as it is.
- :class:`NoisyClassifier` ``clf(x_t, t) -> logits [B, 10]``: p(y | x_t, t) on the model input
  ``x_t = alpha_t x0 + sigma_t eps``, differentiable w.r.t. ``x_t`` (classifier guidance).
- :class:`FeatureClassifier` ``clf(x) -> logits [B, 10]`` on clean digits; ``clf.features(x)``
  is its penultimate layer ``[B, 64]``, the feature space of the metrics in
  ``scripts/digits_quality.py`` (:func:`frechet_distance`, :func:`kid`, :func:`precision_recall`,
  :func:`density_coverage`). It trains on the ``feature`` split only, disjoint from the ``test``
  digits (the metrics' reference) and the ``floor`` digits (their real-data floor): see :func:`load_data`.

Pixels are scaled to [-1, 1] (``v / 8 - 1`` for sklearn's 0..16 values); images are ``[B, 1, 8, 8]``.
Loading needs ``safetensors`` and nothing else; only :func:`load_data` needs scikit-learn (the
``train`` extra), and nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import WeightsError  # noqa: F401  (raised here; also fastdiff.models.zoo.WeightsError)

SHAPE = (1, 8, 8)
"""Shape of one digit image."""
NUM_CLASSES = 10
NULL = 10
"""Class index of the learned "no class" token: the unconditional model."""
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
"""Where the loaders look by default (the committed weights)."""
_PACKAGE_WEIGHTS = WEIGHTS_DIR
TEST_SIZE = 360
"""Digits held out (the first ``TEST_SIZE`` of a fixed permutation) from every model's training: the
reference set of the sample-quality metrics."""
FLOOR_SIZE = 720
"""Training digits (the next ``FLOOR_SIZE`` of the permutation) the feature classifier never sees: the
real-data floor of the sample-quality metrics is drawn from them (the denoiser and the noise-conditional
classifier do train on them)."""


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

    Same trunk as :class:`Denoiser` (residual MLP, FiLM on the time embedding), same width and depth.
    Differentiable w.r.t. ``x_t`` (classifier guidance calls it under autograd).
    """

    def __init__(self, width: int = 192, blocks: int = 3, emb: int = 64, ratio: int = 2, t_dim: int = 64):
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


def _check_name(name: str) -> type:
    if name not in _CLASSES:
        raise ValueError(f"name must be one of {sorted(_CLASSES)}, got {name!r}")
    return _CLASSES[name]


def _paths(name: str, weights_dir: str | None) -> tuple[str, str]:
    """``({name}.json, {name}.safetensors)`` under ``weights_dir`` (default :data:`WEIGHTS_DIR`)."""
    d = weights_dir or WEIGHTS_DIR
    return os.path.join(d, f"{name}.json"), os.path.join(d, f"{name}.safetensors")


def _fix(name: str, weights_dir: str | None) -> str:
    """How to get good files back: restore the committed ones, or retrain (``scripts/train_digits.py``)."""
    d = os.path.abspath(weights_dir or WEIGHTS_DIR)
    train = f"python scripts/train_digits.py --only {name}"
    if d == _PACKAGE_WEIGHTS:
        rel = f"fastdiff/zoo/weights/{name}"
        return (f"restore the committed files with `git checkout -- {rel}.safetensors {rel}.json` (or reinstall "
                f"fastdiff), or retrain them with `{train}`")
    return f"retrain them with `{train} --out {d}` (or copy both files from fastdiff/zoo/weights/)"


def _json_error(name: str, weights_dir: str | None, problem: str) -> WeightsError:
    return WeightsError(_paths(name, weights_dir)[0], problem, _fix(name, weights_dir))


def _weights_error(name: str, weights_dir: str | None, problem: str) -> WeightsError:
    return WeightsError(_paths(name, weights_dir)[1], problem, _fix(name, weights_dir))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def save(model: nn.Module, name: str, info: dict[str, Any], weights_dir: str | None = None) -> str:
    """Write ``{name}.safetensors`` (float16) and ``{name}.json`` (class, architecture, the weights'
    ``sha256``, and ``info``) under ``weights_dir`` (default :data:`WEIGHTS_DIR`); returns the weights path."""
    from safetensors.torch import save

    weights_dir = weights_dir or WEIGHTS_DIR
    os.makedirs(weights_dir, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    data = save(tensors)  # hashed as written: the recorded digest is of these very bytes
    json_path, path = _paths(name, weights_dir)
    with open(path, "wb") as f:
        f.write(data)
    record = {**info, "class": type(model).__name__, "arch": model.arch, "sha256": hashlib.sha256(data).hexdigest()}
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    return path


def _read(path: str, error, what: str) -> bytes:
    """The bytes of ``path``; ``error(why)`` (a :class:`WeightsError`) raised if it is missing or unreadable."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise error(f"{what} is missing") from None
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror or exc})") from None


def read_config(name: str, weights_dir: str | None = None) -> dict:
    """The JSON written next to ``{name}.safetensors`` (class, architecture, ``sha256``, schedule, training
    record), as a dict. Raises :class:`WeightsError` if it is missing, unreadable or not a JSON object."""
    raw = _read(_paths(name, weights_dir)[0], lambda why: _json_error(name, weights_dir, why), "the config file")
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _json_error(name, weights_dir, f"is not valid JSON ({_one_line(exc)})") from None
    if not isinstance(cfg, dict):
        raise _json_error(name, weights_dir, f"must hold a JSON object, got a {type(cfg).__name__}")
    return cfg


def _config(name: str, weights_dir: str | None) -> dict:
    """:func:`read_config`, with the keys loading needs checked: ``class``, ``arch`` (the constructor's
    arguments, positive ints) and ``sha256`` (64 hex digits)."""
    cls = _check_name(name)
    cfg = read_config(name, weights_dir)
    missing = [k for k in ("class", "arch", "sha256") if k not in cfg]
    if missing:
        raise _json_error(name, weights_dir, f"has no {', '.join(map(repr, missing))} key (written by "
                                             "fastdiff.models.zoo.digits.save)")
    if cfg["class"] != cls.__name__:
        raise _json_error(name, weights_dir, f"records class {cfg['class']!r}, but {name} is a {cls.__name__}")
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    arch = cfg["arch"]
    if not isinstance(arch, dict) or set(arch) != params:
        raise _json_error(name, weights_dir, f"'arch' must be an object with exactly the keys {sorted(params)}, "
                                             f"got {arch!r}")
    bad = {k: v for k, v in arch.items() if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 16}
    if bad:
        raise _json_error(name, weights_dir, f"'arch' values must be ints in 1..65536, got {bad}")
    digest = cfg["sha256"]
    if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
        raise _json_error(name, weights_dir, f"'sha256' must be 64 lowercase hex digits, got {digest!r}")
    return cfg


def _verified_bytes(name: str, weights_dir: str | None, cfg: dict) -> tuple[bytes, str]:
    """The bytes of ``{name}.safetensors`` and their SHA-256, which must be the one ``cfg`` records."""
    data = _read(_paths(name, weights_dir)[1], lambda why: _weights_error(name, weights_dir, why), "the weights file")
    digest = hashlib.sha256(data).hexdigest()
    if digest != cfg["sha256"]:
        raise _weights_error(name, weights_dir, f"SHA-256 {digest} ({len(data)} bytes) is not the {cfg['sha256']} "
                                                f"recorded in {name}.json: the file is corrupt, truncated or from "
                                                "another training run")
    return data, digest


def weights_sha256(name: str, weights_dir: str | None = None) -> str:
    """The SHA-256 (hex) of ``{name}.safetensors``, verified against the one its JSON records.

    ``name``: ``denoiser``, ``noisy_classifier`` or ``feature_classifier``. Raises
    :class:`WeightsError` (naming the file) if either file is missing or malformed, or the digests differ.
    """
    return _verified_bytes(name, weights_dir, _config(name, weights_dir))[1]


def _load(name: str, weights_dir: str | None, device) -> nn.Module:
    """Model ``name`` from its verified weights: any problem is one :class:`WeightsError` naming the file."""
    from safetensors.torch import load

    cls = _check_name(name)
    cfg = _config(name, weights_dir)
    data, _ = _verified_bytes(name, weights_dir, cfg)
    try:
        state = load(data)
    except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError (and anything else): a bad file
        raise _weights_error(name, weights_dir, f"is not a readable safetensors file "
                                                f"({type(exc).__name__}: {_one_line(exc)})") from None
    with torch.device("meta"):  # the shapes the architecture expects, without allocating it
        want = {k: tuple(v.shape) for k, v in cls(**cfg["arch"]).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        shapes = [f"{k} {got[k]} (expected {want[k]})" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
        parts = [f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
                 f"shapes {shapes[:3]}" if shapes else ""]
        raise _weights_error(name, weights_dir, f"tensors do not fit the architecture in {name}.json "
                                                f"({'; '.join(p for p in parts if p)})")
    bad = sorted(k for k, v in state.items() if not v.is_floating_point() or not bool(torch.isfinite(v).all()))
    if bad:
        raise _weights_error(name, weights_dir, f"tensors {bad[:3]} are not finite floating-point values")
    model = cls(**cfg["arch"])
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    model.config = cfg
    return model.to(device or "cpu").eval().requires_grad_(False)


def load_denoiser(weights_dir: str | None = None, device: torch.device | str | None = None) -> Denoiser:
    """The trained :class:`Denoiser`, eval mode, float32, no parameter gradients; ``.config`` holds its JSON.

    Raises :class:`WeightsError` if its files are missing, corrupt or do not match (see :func:`weights_sha256`).
    """
    return _load("denoiser", weights_dir, device)


def load_noisy_classifier(weights_dir: str | None = None, device: torch.device | str | None = None) -> NoisyClassifier:
    """The trained :class:`NoisyClassifier` (classifier guidance), eval mode, float32."""
    return _load("noisy_classifier", weights_dir, device)


def load_feature_classifier(weights_dir: str | None = None,
                            device: torch.device | str | None = None) -> FeatureClassifier:
    """The trained :class:`FeatureClassifier` (Fréchet features, accuracy), eval mode, float32."""
    return _load("feature_classifier", weights_dir, device)


def schedule_config(weights_dir: str | None = None) -> dict:
    """The diffusers scheduler config the denoiser was trained under (pass it as ``schedule=``), from
    ``denoiser.json``. Raises :class:`WeightsError` if that file is missing or has no ``schedule`` object."""
    sched = read_config("denoiser", weights_dir).get("schedule")
    if not isinstance(sched, dict):
        raise _json_error("denoiser", weights_dir, f"has no 'schedule' object (got {sched!r})")
    return dict(sched)


# ----------------------------------------------------------------------------- data and training


def load_data(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (no download): ``(x [N, 1, 8, 8] float32 in [-1, 1], y [N] int64)``.

    ``split``, all cut from one fixed permutation of the 1797 digits:

    - ``test``: the first :data:`TEST_SIZE` = 360, held out from every model (the metrics' reference set);
    - ``train``: the other 1437 (the denoiser and the noise-conditional classifier train on them),
      itself cut in two disjoint parts:
    - ``floor``: its first :data:`FLOOR_SIZE` = 720, which the feature classifier never sees (the
      real-data floor of the metrics is drawn from them);
    - ``feature``: the remaining 717, the feature classifier's training set;
    - ``all``: the 1797 in sklearn's order.

    Needs scikit-learn (``pip install fastdiff[train]``).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError("fastdiff.models.zoo.digits.load_data needs scikit-learn: pip install 'fastdiff[train]'") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).reshape(-1, *SHAPE) / 8.0 - 1.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    if split == "all":
        return x, y
    cuts = {"test": (0, TEST_SIZE), "train": (TEST_SIZE, len(y)), "floor": (TEST_SIZE, TEST_SIZE + FLOOR_SIZE),
            "feature": (TEST_SIZE + FLOOR_SIZE, len(y))}
    if split not in cuts:
        raise ValueError(f"split must be one of {sorted([*cuts, 'all'])}, got {split!r}")
    idx = perm[slice(*cuts[split])]
    return x[idx], y[idx]


def alphas_cumprod(config: dict | None = None) -> torch.Tensor:
    """``alphas_cumprod`` ``[T]`` float32 of a diffusers config (default: :func:`schedule_config`)."""
    from ...core.schedules import from_config

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


# ----------------------------------------------------------------------------- sample-quality metrics
# Feature-space metrics between a set of real features ``[N, d]`` and generated ones ``[M, d]``
# (``scripts/digits_quality.py`` uses :meth:`FeatureClassifier.features`). Computed in float64.


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (the FID formula):
    ``||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``, by symmetric eigendecompositions.

    Biased at small sample sizes (it grows as the sets shrink), so compare only values computed with
    the same numbers of samples."""
    a, b = real.to(torch.float64), fake.to(torch.float64)
    mu1, mu2, c1, c2 = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(c1)
    s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = s1 @ c2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(c1) + torch.trace(c2) - 2 * tr_sqrt)


def kid(real: torch.Tensor, fake: torch.Tensor, degree: int = 3) -> float:
    """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of the squared MMD with
    the polynomial kernel ``k(x, y) = (x.y / d + 1) ** degree``, over all pairs of the two sets.

    Unbiased at any sample size (its expectation is 0 when both sets come from one distribution, so
    it can come out slightly negative), unlike :func:`frechet_distance`."""
    a, b = real.to(torch.float64), fake.to(torch.float64)
    n, m, d = a.shape[0], b.shape[0], a.shape[1]
    if n < 2 or m < 2:
        raise ValueError(f"kid needs at least 2 samples in each set, got {n} and {m}")
    kaa = (a @ a.T / d + 1) ** degree
    kbb = (b @ b.T / d + 1) ** degree
    kab = (a @ b.T / d + 1) ** degree
    saa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    sbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(saa + sbb - 2 * kab.mean())


def _kth_nn_radius(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``f`` to its ``k``-th nearest other row."""
    if f.shape[0] <= k:
        raise ValueError(f"need more than k={k} samples, got {f.shape[0]}")
    d = torch.cdist(f, f)
    return d.kthvalue(k + 1, dim=1).values  # k + 1: the point itself is at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of
    balls around its points reaching their ``k``-th nearest neighbour; precision is the share of
    generated points inside the real manifold (fidelity), recall the share of real points inside the
    generated one (diversity: it drops when guidance collapses the samples onto few modes)."""
    a, b = real.to(torch.float64), fake.to(torch.float64)
    ra, rb = _kth_nn_radius(a, k), _kth_nn_radius(b, k)
    d = torch.cdist(b, a)  # [M, N]
    precision = (d <= ra[None, :]).any(1).double().mean()
    recall = (d.T <= rb[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), with the real points' ``k``-th nearest-neighbour
    balls: density counts how many real balls hold each generated point (about 1 for matching sets,
    above 1 when samples crowd where real data is dense), coverage is the share of real points whose
    ball holds at least one generated point (diversity, robust to outliers)."""
    a, b = real.to(torch.float64), fake.to(torch.float64)
    ra = _kth_nn_radius(a, k)
    inside = torch.cdist(b, a) <= ra[None, :]  # [M, N]
    return float(inside.double().sum() / (k * b.shape[0])), float(inside.any(0).double().mean())
