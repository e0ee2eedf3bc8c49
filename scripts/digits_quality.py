"""Sample quality of fastdiff's samplers, measured: the digits model and the Gaussian-mixture default.

    python scripts/digits_quality.py                 # ~10 minutes on one core
    python scripts/digits_quality.py --quick         # a smoke run in under a minute

1. Digits, unconditional (the denoiser's NULL class): for each sampler and NFE, the Fréchet
   distance (FD) between ``--n`` generated digits and the 1437 real training digits, in the 64-d
   penultimate feature space of the clean-digit classifier (``fastdiff.zoo.digits``). Generated
   digits are clamped to [-1, 1] (the data range) before the features are taken. For scale, the
   FD of the 360 held-out real digits against the same training set is printed as the floor.
2. Digits, class-conditional (labels ``i % 10``): accuracy of the clean-digit classifier on the
   samples and their FD, with classifier-free guidance at several scales (0 = the unconditional
   model), classifier guidance (the noise-conditional classifier's gradient) at several scales on
   the unconditional model, and both together.
3. Gaussian mixture (``GaussianMixture.default()``, 2-D, 8 blobs): sliced Wasserstein-2 distance
   (256 fixed directions) between ``--gmm-n`` samples and as many exact draws, plus the error of
   the mean and of the covariance; the exact model is the closed-form denoiser, so the error is the
   sampler's alone. The floor is the distance between two independent exact draws.

Writes ``benchmarks/results/digits_quality.json`` and ``.md``. Sampling seeds are fixed (sample
``i`` of every row has seed ``i``), so rows differ only by sampler, NFE and guidance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fastdiff  # noqa: E402
from fastdiff import schedules  # noqa: E402
from fastdiff.distributed import initial_noise  # noqa: E402
from fastdiff.models import GaussianMixture  # noqa: E402
from fastdiff.zoo import digits as D  # noqa: E402

SAMPLERS = ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "ddpm"]
NFES = [5, 10, 20, 50, 1000]
NFE_1000 = ("ddpm", "ddim", "euler")
"""The only samplers run at NFE 1000 (the rest would only cost time)."""


def steps_for(sampler: str, nfe: int) -> int:
    """Solver steps giving ``nfe`` model evaluations (Heun: 2 per step but the last)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def frechet(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2), float64, by eigendecompositions."""
    w, v = torch.linalg.eigh(cov1)
    s1 = (v * w.clamp_min(0).sqrt()) @ v.T
    m = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def stats(f: torch.Tensor):
    f = f.to(torch.float64)
    return f.mean(0), torch.cov(f.T)


class Digits:
    """The three digits models, the real-data statistics and one sampling routine."""

    def __init__(self, n: int, backend: str, weights: str | None = None):
        self.n, self.backend = n, backend
        self.model = D.load_denoiser(weights)
        self.clf = D.load_noisy_classifier(weights)
        self.feat = D.load_feature_classifier(weights)
        self.schedule = schedules.from_config(D.schedule_config(weights))
        xr, _ = D.load_data("train")
        xt, _ = D.load_data("test")
        with torch.no_grad():
            self.real = stats(self.feat.features(xr))
            self.floor = frechet(*stats(self.feat.features(xt)), *self.real)
        self.n_real, self.n_test = len(xr), len(xt)
        self.seeds = list(range(n))
        self.labels = torch.arange(n) % 10
        self.noise = initial_noise(D.SHAPE, self.seeds)

    def run(self, sampler: str, steps: int, labels=None, cfg=None, cg=None) -> dict:
        plan = fastdiff.make_plan(sampler, steps, self.schedule)
        kw = {}
        null = torch.full((self.n,), D.NULL)
        cond = null if labels is None else labels
        if cfg is not None and cfg != 1.0:
            kw.update(guidance_scale=cfg, uncond=null)
        if cg is not None:
            kw.update(classifier=self.clf, classifier_scale=cg, classifier_y=labels)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = fastdiff.sample(self.model, self.noise, plan=plan, seed=self.seeds, cond=cond,
                                backend=self.backend, **kw)
        secs = time.perf_counter() - t0
        x = x.clamp(-1, 1)
        with torch.no_grad():
            logits = self.feat(x)
        row = {"sampler": sampler, "steps": steps, "nfe": len(plan.rows),
               "fd": round(frechet(*stats(self.feat.features(x)), *self.real), 3), "seconds": round(secs, 2)}
        if labels is not None:
            row["accuracy"] = round(float((logits.argmax(1) == labels).float().mean()), 4)
            row["p_target"] = round(float(logits.softmax(1).gather(1, labels[:, None]).mean()), 4)
        return row


def gmm_rows(samplers, nfes, n: int, backend: str, seed: int = 0):
    """Sliced W2, mean and covariance error of each sampler on the 2-D Gaussian mixture."""
    gm = GaussianMixture.default((2,))
    sch = schedules.from_config({"clip_sample": False})
    model = gm.model(lambda t: sch.alpha_sigma(t.detach().to("cpu", torch.float64).numpy()), "eps")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(256, 2, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=1, keepdim=True)
    truth = gm.sample(n, generator=g)
    others = [gm.sample(n, generator=g) for _ in range(5)]  # the floor: exact draws, spread included
    noise = torch.randn(n, 2, generator=g)

    def metrics(x):
        x = x.to(torch.float64)
        a = (x @ dirs.T).sort(0).values
        b = (truth @ dirs.T).sort(0).values
        return {"sw2": round(float(((a - b) ** 2).mean().sqrt()), 4),
                "mean_err": round(float((x.mean(0) - truth.mean(0)).norm()), 4),
                "cov_err": round(float((torch.cov(x.T) - torch.cov(truth.T)).norm()), 4)}

    rows = []
    for s in samplers:
        for nfe in nfes:
            if nfe == 1000 and s not in NFE_1000:
                continue
            plan = fastdiff.make_plan(s, steps_for(s, nfe), sch)
            t0 = time.perf_counter()
            x = fastdiff.sample(model, noise, plan=plan, seed=list(range(n)), backend=backend)
            rows.append({"sampler": s, "nfe": len(plan.rows), **metrics(x), "seconds": round(time.perf_counter() - t0, 2)})
            print(f"  gmm {s:16s} nfe {len(plan.rows):4d}  sw2 {rows[-1]['sw2']:.4f}", flush=True)
    fl = torch.tensor([[metrics(o)[k] for k in ("sw2", "mean_err", "cov_err")] for o in others])
    floor = {k: round(float(v), 4) for k, v in zip(("sw2", "mean_err", "cov_err"), fl.mean(0))}
    floor.update({f"{k}_std": round(float(v), 4) for k, v in zip(("sw2", "mean_err", "cov_err"), fl.std(0))})
    return rows, floor


def _grid(rows, key, fmt, nfes):
    by = {(r["sampler"], n): r for r in rows for n in [r["nfe"]]}
    out = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "|---|" + "---:|" * len(nfes)]
    for s in dict.fromkeys(r["sampler"] for r in rows):
        cells = []
        for n in nfes:
            # heun's NFE is odd (2 * steps - 1): shown in the column of the NFE it was aimed at
            r = by.get((s, n)) or by.get((s, n - 1))
            cells.append(fmt.format(r[key]) if r else "—")
        out.append(f"| {s} | " + " | ".join(cells) + " |")
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    nfes = m["nfes"]
    lines = [
        "# Sample quality on a real trained model (digits) and on the exact Gaussian mixture",
        "",
        f"Command: `{m['command']}` ({m['threads']} threads, {m['machine']}, torch {m['torch']}, "
        f"backend {m['backend']}, {m['seconds']:.0f} s in all).",
        "",
        f"## Digits, unconditional: Fréchet distance (lower is better; {m['n']} samples per cell vs "
        f"{m['n_real']} real training digits)",
        "",
        "Features: the 64-d penultimate layer of the clean-digit classifier "
        f"(held-out accuracy {m['feature_classifier_test_acc']:.1%}). NFE = model evaluations "
        "(Heun: 2 per step but the last, so 5 / 9 / 19 / 49). NFE 1000 only for "
        + ", ".join(NFE_1000) + ".",
        "",
        *_grid(res["fd_uncond"], "fd", "{:.2f}", nfes),
        "",
        f"Floor: the {m['n_test']} held-out real digits score FD {res['fd_floor']:.2f} against the same "
        "training digits" + (f" (fewer samples than {m['n']}: FD's small-sample bias makes this floor "
                             "a little pessimistic)." if m["n_test"] < m["n"] else "."),
        "",
        f"## Digits, class-conditional: guidance ({m['n']} samples, labels i % 10, "
        f"{res['guidance'][0]['sampler']} with NFE {res['guidance'][0]['nfe']})",
        "",
        "Accuracy: the clean-digit classifier agrees with the requested label. p(target): its mean "
        "softmax probability of that label. CFG scale 0 is the unconditional model (chance accuracy); "
        "classifier guidance (CG) runs on the unconditional model with the noise-conditional "
        "classifier's gradient.",
        "",
        "| guidance | scale | accuracy | p(target) | FD |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["guidance"]:
        lines.append(f"| {r['guidance']} | {r['scale']} | {r['accuracy']:.1%} | {r['p_target']:.3f} | {r['fd']:.2f} |")
    lines += [
        "",
        f"## Gaussian mixture (2-D, 8 blobs): sliced Wasserstein-2 to exact samples ({m['gmm_n']} each)",
        "",
        "The model is the exact denoiser, so this is the sampler's discretization error alone.",
        "",
        *_grid(res["gmm"], "sw2", "{:.4f}", nfes),
        "",
        f"Floor: exact draws of the same size instead of samples: sliced W2 {res['gmm_floor']['sw2']:.4f} "
        f"± {res['gmm_floor']['sw2_std']:.4f} (mean ± std over 5 draws); differences below about twice the "
        "std are noise.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1000, help="digits generated per row (default 1000)")
    p.add_argument("--gmm-n", type=int, default=20000, help="Gaussian-mixture samples per row")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1: small matrices; see train_digits.py)")
    p.add_argument("--backend", default="auto", help="fused backend (auto, reference, cpu, ...)")
    p.add_argument("--weights", default=None, help="weights folder (default: the package's)")
    p.add_argument("--quick", action="store_true", help="smoke run: few samples, few rows")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "digits_quality"),
                   help="output path without extension (.json and .md are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    samplers, nfes = SAMPLERS, NFES
    cfg_scales, cg_scales = [0.0, 1.0, 2.0, 4.0], [1.0, 2.0, 4.0, 8.0]
    if args.quick:
        args.n, args.gmm_n = 100, 2000
        samplers, nfes, cfg_scales, cg_scales = ["ddim", "dpmpp_2m"], [5, 10], [1.0, 4.0], [4.0]

    dg = Digits(args.n, args.backend, args.weights)
    fd_rows = []
    for s in samplers:
        for nfe in nfes:
            if nfe == 1000 and s not in NFE_1000:
                continue
            fd_rows.append(dg.run(s, steps_for(s, nfe)))
            r = fd_rows[-1]
            print(f"digits {s:16s} nfe {r['nfe']:4d}  FD {r['fd']:.3f}  {r['seconds']:.1f}s", flush=True)

    g_sampler, g_steps = "dpmpp_2m", 20
    guid = []
    for w in cfg_scales:
        guid.append({"guidance": "CFG", "scale": w, **dg.run(g_sampler, g_steps, dg.labels, cfg=w)})
    for c in cg_scales:
        guid.append({"guidance": "CG", "scale": c, **dg.run(g_sampler, g_steps, dg.labels, cg=c)})
    if not args.quick:
        guid.append({"guidance": "CFG 2 + CG 2", "scale": "2 / 2",
                     **dg.run(g_sampler, g_steps, dg.labels, cfg=2.0, cg=2.0)})
    for r in guid:
        print(f"digits {r['guidance']:12s} {r['scale']!s:>5}  acc {r['accuracy']:.3f}  FD {r['fd']:.3f}", flush=True)

    gmm, gmm_floor = gmm_rows(samplers, [n for n in nfes], args.gmm_n, args.backend)
    res = {
        "meta": {"command": "python scripts/digits_quality.py" + (" --quick" if args.quick else ""),
                 "n": args.n, "n_real": dg.n_real, "n_test": dg.n_test, "gmm_n": args.gmm_n, "nfes": nfes,
                 "threads": args.threads, "torch": torch.__version__, "backend": args.backend,
                 "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "feature_classifier_test_acc": dg.feat.config["heldout"]["test_acc"],
                 "seconds": round(time.perf_counter() - t_all, 1)},
        "fd_uncond": fd_rows, "fd_floor": round(dg.floor, 3), "guidance": guid,
        "gmm": gmm, "gmm_floor": gmm_floor,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")
    with open(args.out + ".md", "w") as f:
        f.write(markdown(res))
    print(markdown(res))
    print(f"wrote {args.out}.json and {args.out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
