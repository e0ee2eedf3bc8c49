"""Train the digits models of :mod:`fastdiff.models.zoo.digits` on the CPU and write their weights.

    python scripts/train_digits.py                      # all three, about 13 minutes on one core
    python scripts/train_digits.py --only noisy_classifier   # about 5 minutes
    python scripts/train_digits.py --only feature_classifier
    python scripts/train_digits.py --out /tmp/w --denoiser-steps 200   # a quick try elsewhere

Writes ``{name}.safetensors`` (float16) and ``{name}.json`` (architecture, schedule, training
record: seed, steps, seconds, final loss, held-out metrics) to ``fastdiff/zoo/weights/`` (or
``--out``). Data: scikit-learn's bundled digits (needs ``pip install '.[train]'``; nothing is
downloaded), the fixed splits of :func:`fastdiff.models.zoo.digits.load_data`: the denoiser and the
noise-conditional classifier train on the 1437 ``train`` digits, the feature classifier (the
sample-quality metrics' feature space) on its 717-digit ``feature`` part only, so that neither the 360
``test`` digits (the metrics' reference, never trained on) nor the 720 ``floor`` digits (their
real-data floor) are in its training set. Deterministic for a given seed, torch version and thread
count (1 thread by default).

The noise-conditional classifier guides the unconditional model (classifier guidance), so what
matters is that its log-probabilities are right at every noise level *for the distribution the
denoiser learned*: it trains on the same unaugmented digits as the denoiser (a +-1 px shift
augmentation, used before, made it model a broader distribution than the denoiser's and left it
under-confident at mid noise: with this architecture and step count, classifier guidance of the
unconditional model at scale 1 reached 55% accuracy with shifted digits, 79% without; 360 samples,
dpmpp_2m, 20 steps), at a uniform step over the whole schedule, without label smoothing (it would
bias the probabilities the gradient is taken of; tried: no better), wider (192 x 3 blocks) and longer
(10000 steps; the committed one before issue 14 had 128 x 2 blocks, 3000 steps and the shifts). Its
held-out cross-entropy at every step from 200 to 999 is at most 0.02 above that of the exact
posterior of the training digits (``TrainingSetPosterior`` in ``scripts/digits_quality.py``), and
below it at lower steps: more training or width has little left to gain.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastdiff.models.zoo import digits as D  # noqa: E402

SCHEDULE = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
    "prediction_type": "epsilon", "clip_sample": False,
}
"""diffusers' DDPM defaults, with clip_sample off so every sampler sees the same unclipped model."""


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor`` (a factor on the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def train_loop(model, loss_fn, steps: int, lr: float, batch: int, data, seed: int, ema_decay: float | None,
               log_every: int = 500):
    """AdamW with warm-up + cosine; returns (the model to save (EMA if used), last-200-step mean loss, seconds)."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps))
    ema = copy.deepcopy(model).requires_grad_(False) if ema_decay else None
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        loss = loss_fn(model, x[idx], y[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            d = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - d)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1:5d}/{steps}  loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f}"
                  f"  {time.perf_counter() - t0:.0f}s", flush=True)
    tail = losses[-200:]
    return (ema if ema is not None else model), sum(tail) / len(tail), time.perf_counter() - t0


def shift_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random translation by -1..1 pixels per axis, background (-1) shifted in."""
    b = x.shape[0]
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=g)
    dy = torch.randint(0, 3, (b,), generator=g)
    rows = (dy[:, None] + torch.arange(8)[None, :])[:, None, :, None].expand(b, 1, 8, 10)
    pad = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8)[None, :])[:, None, None, :].expand(b, 1, 8, 8)
    return pad.gather(3, cols)


@torch.no_grad()
def heldout_denoiser_loss(model, acp, x, y, seed: int = 1) -> dict:
    """Eps MSE on the test digits, fixed noise: conditional and unconditional (NULL)."""
    g = torch.Generator().manual_seed(seed)
    xs = x.repeat(8, 1, 1, 1)
    ys = y.repeat(8)
    xt, t, eps = D.noisy(xs, acp, g)
    cond = F.mse_loss(model(xt, t, ys), eps).item()
    unc = F.mse_loss(model(xt, t, torch.full_like(ys, D.NULL)), eps).item()
    return {"test_eps_mse_cond": round(cond, 5), "test_eps_mse_uncond": round(unc, 5)}


HELDOUT_T = (0, 100, 200, 250, 300, 400, 500, 750, 999)


@torch.no_grad()
def heldout_noisy_accuracy(model, acp, x, y, seed: int = 1, repeats: int = 4) -> dict:
    """Accuracy and mean cross-entropy of ``model`` on ``x`` noised to each step of :data:`HELDOUT_T`
    (``repeats`` noise draws per digit, fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    xs, ys = x.repeat(repeats, 1, 1, 1), y.repeat(repeats)
    for t in HELDOUT_T:
        eps = torch.randn(xs.shape, generator=g)
        a = acp[t]
        logits = model(a.sqrt() * xs + (1 - a).sqrt() * eps, torch.full((len(ys),), float(t)))
        out[f"test_acc_t{t}"] = round((logits.argmax(1) == ys).float().mean().item(), 4)
        out[f"test_nll_t{t}"] = round(F.cross_entropy(logits, ys).item(), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default="denoiser,noisy_classifier,feature_classifier",
                   help="comma-separated subset of: denoiser, noisy_classifier, feature_classifier")
    p.add_argument("--out", default=D.WEIGHTS_DIR, help="weights folder (default: the package's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: the matrices are small, and on a loaded 2-core machine "
                        "2 threads spin-wait: measured 40x slower per step)")
    p.add_argument("--denoiser-steps", type=int, default=12000)
    p.add_argument("--classifier-steps", type=int, default=10000)
    p.add_argument("--feature-epochs", type=int, default=80)
    p.add_argument("--p-uncond", type=float, default=0.2, help="label dropout probability")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n]
    bad = set(names) - {"denoiser", "noisy_classifier", "feature_classifier"}
    if bad:
        p.error(f"--only: unknown {sorted(bad)}")
    train, test = D.load_data("train"), D.load_data("test")
    acp = D.alphas_cumprod(SCHEDULE)
    common = {"seed": args.seed, "torch": torch.__version__, "threads": args.threads,
              "data": f"sklearn load_digits, train split {len(train[1])} (test {len(test[1])} held out)"}

    if "denoiser" in names:
        torch.manual_seed(args.seed)
        m = D.Denoiser()
        print(f"denoiser: {n_params(m)} parameters, {args.denoiser_steps} steps")
        model, final, secs = train_loop(
            m, lambda mm, x, y, g: D.denoiser_loss(mm, x, y, acp, args.p_uncond, g),
            args.denoiser_steps, 2e-3, 256, train, args.seed, ema_decay=0.999)
        info = {"schedule": SCHEDULE, "null_class": D.NULL, "p_uncond": args.p_uncond, "params": n_params(m),
                "train": {**common, "steps": args.denoiser_steps, "batch": 256, "lr": 2e-3, "ema": 0.999,
                          "seconds": round(secs, 1), "final_loss": round(final, 5)}}
        D.save(model, "denoiser", info, args.out)
        info["heldout"] = heldout_denoiser_loss(D.load_denoiser(args.out), acp, *test)
        D.save(model, "denoiser", info, args.out)
        print(f"denoiser: {secs:.0f}s, final loss {final:.4f}, held-out {info['heldout']}")

    if "noisy_classifier" in names:
        torch.manual_seed(args.seed + 1)
        m = D.NoisyClassifier()
        print(f"noisy_classifier: {n_params(m)} parameters, {args.classifier_steps} steps")
        model, final, secs = train_loop(
            m, lambda mm, x, y, g: D.noisy_classifier_loss(mm, x, y, acp, g),
            args.classifier_steps, 1e-3, 256, train, args.seed + 1, ema_decay=0.999)
        info = {"schedule": SCHEDULE, "params": n_params(m),
                "train": {**common, "steps": args.classifier_steps, "batch": 256, "lr": 1e-3, "ema": 0.999,
                          "augment": "none (the denoiser's own data)", "noise": "uniform t in 0..999",
                          "label_smoothing": 0.0, "seconds": round(secs, 1), "final_loss": round(final, 5)}}
        D.save(model, "noisy_classifier", info, args.out)
        info["heldout"] = heldout_noisy_accuracy(D.load_noisy_classifier(args.out), acp, *test)
        D.save(model, "noisy_classifier", info, args.out)
        print(f"noisy_classifier: {secs:.0f}s, final loss {final:.4f}, held-out {info['heldout']}")

    if "feature_classifier" in names:
        torch.manual_seed(args.seed + 2)
        feature = D.load_data("feature")
        m = D.FeatureClassifier()
        steps = args.feature_epochs * (len(feature[1]) // 64)
        print(f"feature_classifier: {n_params(m)} parameters, {steps} steps")
        model, final, secs = train_loop(
            m, lambda mm, x, y, g: F.cross_entropy(mm(shift_augment(x, g)), y),
            steps, 2e-3, 64, feature, args.seed + 2, ema_decay=None)
        info = {"params": n_params(m), "features": "relu(fc) [B, 64], penultimate",
                "train": {**common, "data": f"sklearn load_digits, feature split {len(feature[1])} (test "
                                            f"{len(test[1])} and floor {D.FLOOR_SIZE} never seen)",
                          "steps": steps, "batch": 64, "lr": 2e-3, "augment": "shift +-1 px",
                          "seconds": round(secs, 1), "final_loss": round(final, 5)}}
        D.save(model, "feature_classifier", info, args.out)
        floor = D.load_data("floor")
        with torch.no_grad():
            fc = D.load_feature_classifier(args.out)
            acc = (fc(test[0]).argmax(1) == test[1]).float().mean().item()
            acc_floor = (fc(floor[0]).argmax(1) == floor[1]).float().mean().item()
        info["heldout"] = {"test_acc": round(acc, 4), "test_n": len(test[1]), "floor_acc": round(acc_floor, 4),
                           "floor_n": len(floor[1])}
        D.save(model, "feature_classifier", info, args.out)
        print(f"feature_classifier: {secs:.0f}s, final loss {final:.4f}, held-out accuracy {acc:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
