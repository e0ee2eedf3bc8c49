"""Sample quality of fastdiff's samplers, measured: the digits model and the Gaussian-mixture default.

    python scripts/digits_quality.py                 # about 5 minutes on one core
    python scripts/digits_quality.py --quick         # a smoke run in under a minute

Data (:func:`fastdiff.models.zoo.digits.load_data`): the reference set is the 360 ``test`` digits, which no
model ever trained on. Features are the 64-d penultimate layer of the clean-digit classifier, trained
on the ``feature`` split (717 training digits) only; the ``floor`` split (720 other training digits,
which the feature classifier never saw) gives the real-data floor. The denoiser and the
noise-conditional classifier trained on ``train`` = ``floor`` + ``feature``.

Metrics, each between ``--n`` (default 360, the reference size) generated digits and the 360
reference digits, in the feature space (generated digits are clamped to [-1, 1], the data range;
every set's features are divided by one constant, the reference features' RMS coordinate, so that
KID's ``x.y / d`` is of order 1 as with Inception features): Fréchet distance (FD; biased upwards
at small n, so only rows of equal n compare), KID (Bińkowski et al. 2018: unbiased squared MMD with
the cubic polynomial kernel, reported x 1000), improved precision
and recall (Kynkäänniemi et al. 2019, k = 3) and density / coverage (Naeem et al. 2020, k = 5). The
real-data floor: the same metrics for ``--n`` real ``floor`` digits instead of samples, over
``--floor-draws`` random draws (mean, std, min, max); the seed spread: the same for
``--seed-sets`` disjoint sets of sampling seeds of two sample rows.

1. Digits, unconditional (the denoiser's NULL class): FD and KID by sampler and NFE.
2. Digits, guidance (labels drawn independently with the training labels' frequencies): accuracy of the
   clean-digit classifier on the samples and the metrics, for the unconditional model, the conditional
   model, classifier-free guidance (conditional + unconditional), classifier guidance (the
   noise-conditional classifier's gradient) on the unconditional model, and both together. Each row
   names the model it samples.
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
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import fastdiff  # noqa: E402
from fastdiff.core import schedules  # noqa: E402
from fastdiff.distributed import initial_noise  # noqa: E402
from fastdiff.models import GaussianMixture  # noqa: E402
from fastdiff.models.zoo import digits as D  # noqa: E402

SAMPLERS = ["ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "ddpm"]
NFES = [5, 10, 20, 50, 1000]
NFE_1000 = ("ddpm", "ddim", "euler")
"""The only samplers run at NFE 1000 (the rest would only cost time)."""
METRICS = ("fd", "kid", "precision", "recall", "density", "coverage")

UNCOND = "unconditional"
COND = "conditional"
BOTH = "conditional + unconditional"
# (guidance, model, CFG scale or None, CG scale or None, conditional?): the guidance table's rows
GUIDANCE = [
    ("none", UNCOND, None, None, False),
    ("none", COND, None, None, True),
    ("CFG", BOTH, 1.5, None, True),
    ("CFG", BOTH, 2.0, None, True),
    ("CFG", BOTH, 3.0, None, True),
    ("CG", UNCOND, None, 1.0, False),
    ("CG", UNCOND, None, 2.0, False),
    ("CG", UNCOND, None, 4.0, False),
    ("CG", UNCOND, None, 8.0, False),
    ("CFG + CG", BOTH, 1.5, 1.0, True),
    ("CFG + CG", BOTH, 2.0, 2.0, True),
    ("CG", COND, None, 1.0, True),
    ("CG, training-set posterior", UNCOND, None, 1.0, False),
    ("CG, training-set posterior", UNCOND, None, 2.0, False),
]
QUICK_GUIDANCE = [GUIDANCE[0], GUIDANCE[3], GUIDANCE[6], GUIDANCE[10], GUIDANCE[12]]
SPREAD_ROWS = [("unconditional", "dpmpp_2m", 20, None), ("CFG 2", "dpmpp_2m", 20, 2.0)]
"""Rows whose seed spread is measured: (name, sampler, steps, CFG scale or None for unconditional)."""


class TrainingSetPosterior(torch.nn.Module):
    """The exact p(y | x_t) of the *training digits* as a distribution (each digit a point mass, noised
    by the schedule): ``logits_c = logsumexp_{i in c} -|x_t - alpha_t x_i|^2 / (2 sigma_t^2) - log n_c``.

    A diagnostic for classifier guidance: it is what a perfect noise-conditional classifier trained
    on those digits would converge to, so classifier guidance with it bounds what a better-trained
    classifier could do for the same (unconditional) denoiser."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.x, self.y, self.acp = x.reshape(len(x), -1).to(torch.float64), y, alphas_cumprod.to(torch.float64)
        self.log_n = torch.log(torch.bincount(y, minlength=D.NUM_CLASSES).to(torch.float64))

    def forward(self, u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.acp[t.detach().round().long().clamp(0, len(self.acp) - 1)][:, None]  # [B, 1]
        u = u.reshape(len(u), -1).to(torch.float64)
        d2 = (u * u).sum(1, keepdim=True) - 2 * a.sqrt() * (u @ self.x.T) + a * (self.x * self.x).sum(1)[None, :]
        ll = -d2 / (2 * (1 - a))  # [B, N]
        return torch.stack([torch.logsumexp(ll[:, self.y == c], 1) - self.log_n[c]
                            for c in range(D.NUM_CLASSES)], 1).to(torch.float32)


def steps_for(sampler: str, nfe: int) -> int:
    """Solver steps giving ``nfe`` model evaluations (Heun: 2 per step but the last)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def metrics(ref: torch.Tensor, f: torch.Tensor) -> dict:
    """Every metric of features ``f`` against the reference features (KID x 1000)."""
    p, r = D.precision_recall(ref, f, k=3)
    dens, cov = D.density_coverage(ref, f, k=5)
    return {"fd": round(D.frechet_distance(ref, f), 3), "kid": round(1000 * D.kid(ref, f), 3),
            "precision": round(p, 4), "recall": round(r, 4), "density": round(dens, 4), "coverage": round(cov, 4)}


def summary(rows: list[dict]) -> dict:
    """Mean, std, min and max of each metric over ``rows``."""
    out = {}
    for k in METRICS:
        v = [r[k] for r in rows]
        out[k] = {"mean": round(statistics.fmean(v), 4), "std": round(statistics.stdev(v), 4) if len(v) > 1 else 0.0,
                  "min": min(v), "max": max(v)}
    return out


class Digits:
    """The three digits models, the reference features, the real-data floor and one sampling routine."""

    def __init__(self, n: int, backend: str, weights: str | None = None, floor_draws: int = 10):
        self.n, self.backend = n, backend
        self.model = D.load_denoiser(weights)
        self.clf = D.load_noisy_classifier(weights)
        self.posterior = TrainingSetPosterior(*D.load_data("train"), D.alphas_cumprod(D.schedule_config(weights)))
        self.feat = D.load_feature_classifier(weights)
        self.schedule = schedules.from_config(D.schedule_config(weights))
        xref, yref = D.load_data("test")
        xfl, yfl = D.load_data("floor")
        if not 2 <= n <= len(yfl):
            raise SystemExit(f"--n must be in 2..{len(yfl)} (the floor split's size), got {n}")
        with torch.no_grad():
            ref = self.feat.features(xref)
            # one constant for every set: the reference's RMS feature coordinate becomes 1, so KID's
            # x.y / d is of order 1 as with Inception features (FD scales by its square; precision,
            # recall, density and coverage do not change)
            self.scale = float(ref.double().pow(2).mean().sqrt())
            self.ref = ref / self.scale
            floor_feats = self.feat.features(xfl) / self.scale
            self.feat_acc = {"reference": float((self.feat(xref).argmax(1) == yref).float().mean()),
                             "floor": float((self.feat(xfl).argmax(1) == yfl).float().mean())}
        self.n_ref, self.n_floor_pool = len(yref), len(yfl)
        g = torch.Generator().manual_seed(0)
        self.floor_rows = [metrics(self.ref, floor_feats[torch.randperm(len(yfl), generator=g)[:n]])
                           for _ in range(floor_draws)]
        self.floor = summary(self.floor_rows)
        # class labels for the guided rows: drawn independently from the training labels' frequencies,
        # so a perfect conditional model's samples are independent draws of the data distribution like
        # the reference and floor digits (labels fixed to the reference's own class counts would make
        # the samples a stratified set, and KID's estimate, unbiased only for independent draws, negative)
        ytr = D.load_data("train")[1]
        self.labels = ytr[torch.randint(0, len(ytr), (n,), generator=torch.Generator().manual_seed(1))]
        self.set_seeds(list(range(n)))

    def set_seeds(self, seeds: list[int]) -> None:
        self.seeds = seeds
        self.noise = initial_noise(D.SHAPE, seeds)

    def run(self, sampler: str, steps: int, conditional: bool = False, cfg=None, cg=None, clf=None) -> dict:
        """Sample with the conditional model (labels) or the unconditional one (NULL), CFG scale ``cfg``
        (against the unconditional model) and classifier-guidance scale ``cg``; returns the metrics."""
        plan = fastdiff.make_plan(sampler, steps, self.schedule)
        kw = {}
        null = torch.full((self.n,), D.NULL)
        cond = self.labels if conditional else null
        if cfg is not None:
            kw.update(guidance_scale=cfg, uncond=null)
        if cg is not None:
            kw.update(classifier=clf or self.clf, classifier_scale=cg, classifier_y=self.labels)
        t0 = time.perf_counter()
        with torch.no_grad():
            x = fastdiff.sample(self.model, self.noise, plan=plan, seed=self.seeds, cond=cond,
                                backend=self.backend, **kw)
        secs = time.perf_counter() - t0
        x = x.clamp(-1, 1)
        with torch.no_grad():
            logits = self.feat(x)
            f = self.feat.features(x) / self.scale
        row = {"sampler": sampler, "steps": steps, "nfe": len(plan.rows), "n": self.n, **metrics(self.ref, f),
               "seconds": round(secs, 2)}
        if conditional or cg is not None:
            row["accuracy"] = round(float((logits.argmax(1) == self.labels).float().mean()), 4)
            row["p_target"] = round(float(logits.softmax(1).gather(1, self.labels[:, None]).mean()), 4)
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

    def gmm_metrics(x):
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
            rows.append({"sampler": s, "nfe": len(plan.rows), **gmm_metrics(x),
                         "seconds": round(time.perf_counter() - t0, 2)})
            print(f"  gmm {s:16s} nfe {len(plan.rows):4d}  sw2 {rows[-1]['sw2']:.4f}", flush=True)
    fl = torch.tensor([[gmm_metrics(o)[k] for k in ("sw2", "mean_err", "cov_err")] for o in others])
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


def _pm(s: dict, k: str, fmt: str) -> str:
    return f"{fmt.format(s[k]['mean'])} ± {fmt.format(s[k]['std'])}"


FMT = {"fd": "{:.3f}", "kid": "{:.2f}", "precision": "{:.3f}", "recall": "{:.3f}", "density": "{:.3f}",
       "coverage": "{:.3f}"}


def markdown(res: dict) -> str:
    m = res["meta"]
    nfes = m["nfes"]
    fl = res["floor"]
    g0 = res["guidance"][0]
    floor_line = ("| real digits (floor) | " + " | ".join(_pm(fl, k, FMT[k]) for k in METRICS) + " |")
    head = "| " + " | ".join(["FD", "KID x 1e3", "precision", "recall", "density", "coverage"]) + " |"
    lines = [
        "# Sample quality on a real trained model (digits) and on the exact Gaussian mixture",
        "",
        f"Command: `{m['command']}` ({m['threads']} thread{'s' if m['threads'] != 1 else ''}, {m['machine']}, "
        f"torch {m['torch']}, "
        f"backend {m['backend']}, {m['seconds']:.0f} s in all).",
        "",
        "## How the digits are measured",
        "",
        f"- Reference: the {m['n_ref']} held-out `test` digits, which no model trained on. Every digits row "
        f"compares **n = {m['n']}** digits (samples, or real digits for the floor) with them.",
        f"- Features: the 64-d penultimate layer of the clean-digit classifier, trained on the `feature` split "
        f"only ({m['n_feature_train']} training digits, disjoint from the reference and from the floor digits); "
        f"its accuracy is {m['feature_acc']['reference']:.1%} on the reference digits and "
        f"{m['feature_acc']['floor']:.1%} on the floor digits. The same classifier gives the guidance "
        "table's accuracy.",
        f"- The denoiser and the noise-conditional classifier trained on the {m['n_train']} `train` digits "
        "(= floor + feature splits), never on the reference digits.",
        "- All sets' features are divided by one constant (the reference features' RMS coordinate, "
        f"{m['feature_scale']:.3f}), so that KID's x.y / d is of order 1.",
        "- FD: Fréchet distance of Gaussians fitted to the features (biased upwards at small n: only rows "
        "of the same n compare). KID: unbiased squared MMD with the kernel (x.y / 64 + 1)^3 (Bińkowski et "
        "al. 2018), x 1000; about 0 for matching distributions, negative values are noise. Precision / "
        "recall: Kynkäänniemi et al. 2019, k = 3 (fidelity / diversity). Density / coverage: Naeem et al. "
        "2020, k = 5 (density about 1 for matching sets; coverage drops when samples miss modes).",
        f"- Real-data floor: the same metrics for n = {m['n']} real `floor` digits instead of samples, "
        f"mean ± std over {m['floor_draws']} random draws from the {m['n_floor_pool']} floor digits "
        "(range in the JSON). A generator that reproduced the data exactly would score about this.",
        f"- Seed spread: the same metrics for {m['seed_sets']} disjoint sets of {m['n']} sampling seeds of "
        "two sample rows: differences between rows smaller than about twice these stds are noise.",
        "",
        "Floor and seed spread (mean ± std):",
        "",
        "| rows | " + head[2:],
        "|---|" + "---:|" * len(METRICS),
        floor_line,
    ]
    for name, s in res["seed_spread"].items():
        lines.append(f"| {name} ({s['sampler']}, NFE {s['nfe']}), {m['seed_sets']} seed sets | "
                     + " | ".join(_pm(s["summary"], k, FMT[k]) for k in METRICS) + " |")
    lines += [
        "",
        f"## Digits, unconditional: Fréchet distance (n = {m['n']} samples per cell vs the {m['n_ref']} "
        "reference digits; lower is better)",
        "",
        "The unconditional model is the denoiser with the NULL class. NFE = model evaluations (Heun: 2 per "
        "step but the last, so 5 / 9 / 19 / 49). NFE 1000 only for " + ", ".join(NFE_1000) + ".",
        "",
        *_grid(res["fd_uncond"], "fd", "{:.3f}", nfes),
        "",
        f"Real-data floor at the same n: FD {_pm(fl, 'fd', '{:.3f}')} (range {fl['fd']['min']:.3f} to "
        f"{fl['fd']['max']:.3f}).",
        "",
        f"### KID x 1000 (same samples; floor {_pm(fl, 'kid', '{:.2f}')})",
        "",
        *_grid(res["fd_uncond"], "kid", "{:.2f}", nfes),
        "",
        f"## Digits, guidance (n = {m['n']}, labels drawn independently with the training labels' frequencies, "
        f"{g0['sampler']} with NFE {g0['nfe']})",
        "",
        "Model: *unconditional* = the denoiser with the NULL class; *conditional* = with the requested "
        "label; *conditional + unconditional* = classifier-free guidance (CFG) between the two. CG = "
        "classifier guidance with the noise-conditional classifier's gradient, on the model named; "
        "*CG, training-set posterior* uses instead the exact p(y | x_t) of the 1437 training digits (a "
        "kernel sum over them, too slow to ship), what a perfect noise-conditional classifier trained on "
        "them would converge to: a diagnostic of how much of CG's result is the classifier's doing. "
        "Accuracy: the clean-digit classifier agrees with the requested label; p(target): its mean softmax "
        "probability of that label.",
        "",
        "| guidance | model | CFG | CG | accuracy | p(target) | " + head[2:],
        "|---|---|---:|---:|---:|---:|" + "---:|" * len(METRICS),
    ]
    for r in res["guidance"]:
        acc = f"{r['accuracy']:.1%}" if "accuracy" in r else "—"
        pt = f"{r['p_target']:.3f}" if "p_target" in r else "—"
        lines.append(f"| {r['guidance']} | {r['model']} | {r['cfg'] if r['cfg'] is not None else '—'} | "
                     f"{r['cg'] if r['cg'] is not None else '—'} | {acc} | {pt} | "
                     + " | ".join(FMT[k].format(r[k]) for k in METRICS) + " |")
    lines += [floor_line.replace(" |", " | — | — | — | — | — |", 1), ""]
    nc = m["noisy_classifier_heldout"]
    lines += [
        "Noise-conditional classifier (classifier guidance): accuracy on the reference digits noised to "
        "step t: " + ", ".join(f"t = {k.split('_t')[1]}: {v:.1%}" for k, v in nc.items() if k.startswith("test_acc_t"))
        + ".",
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
    p.add_argument("--n", type=int, default=D.TEST_SIZE,
                   help=f"digits generated per row, and real digits per floor draw (default {D.TEST_SIZE}, "
                        "the reference size; at most the floor split's 720)")
    p.add_argument("--floor-draws", type=int, default=10, help="random draws of real floor digits (default 10)")
    p.add_argument("--seed-sets", type=int, default=5, help="disjoint seed sets for the seed spread (default 5)")
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
    samplers, nfes, guidance = SAMPLERS, NFES, GUIDANCE
    if args.quick:
        args.n, args.gmm_n, args.floor_draws, args.seed_sets = 100, 2000, 3, 2
        samplers, nfes, guidance = ["ddim", "dpmpp_2m"], [5, 10, 20], QUICK_GUIDANCE

    dg = Digits(args.n, args.backend, args.weights, args.floor_draws)
    print(f"floor (n = {args.n}, {args.floor_draws} draws): "
          + ", ".join(f"{k} {_pm(dg.floor, k, FMT[k])}" for k in METRICS), flush=True)
    fd_rows = []
    for s in samplers:
        for nfe in nfes:
            if nfe == 1000 and s not in NFE_1000:
                continue
            fd_rows.append(dg.run(s, steps_for(s, nfe)))
            r = fd_rows[-1]
            print(f"digits {s:16s} nfe {r['nfe']:4d}  FD {r['fd']:.3f}  KID {r['kid']:.3f}  {r['seconds']:.1f}s",
                  flush=True)

    g_sampler, g_steps = "dpmpp_2m", 20
    guid = []
    for name, model, cfg, cg, conditional in guidance:
        clf = dg.posterior if "posterior" in name else None
        r = {"guidance": name, "model": model, "cfg": cfg, "cg": cg,
             **dg.run(g_sampler, g_steps, conditional=conditional, cfg=cfg, cg=cg, clf=clf)}
        guid.append(r)
        print(f"digits {name:8s} {model:27s} cfg {cfg!s:>4} cg {cg!s:>4}  acc {r.get('accuracy', float('nan')):.3f}"
              f"  FD {r['fd']:.3f}  KID {r['kid']:.3f}  P {r['precision']:.3f}  R {r['recall']:.3f}", flush=True)

    spread = {}
    for name, sampler, steps, cfg in SPREAD_ROWS:
        rows = []
        for k in range(args.seed_sets):
            dg.set_seeds(list(range(k * args.n, (k + 1) * args.n)))
            rows.append(dg.run(sampler, steps, conditional=cfg is not None, cfg=cfg))
        spread[name] = {"sampler": sampler, "nfe": rows[0]["nfe"], "cfg": cfg, "rows": rows, "summary": summary(rows)}
        print(f"seed spread {name}: " + ", ".join(f"{k} {_pm(spread[name]['summary'], k, FMT[k])}" for k in METRICS),
              flush=True)
    dg.set_seeds(list(range(args.n)))

    gmm, gmm_floor = gmm_rows(samplers, list(nfes), args.gmm_n, args.backend)
    command = "python scripts/digits_quality.py" + (" --quick" if args.quick else "")
    res = {
        "meta": {"command": command, "n": args.n, "n_ref": dg.n_ref, "n_floor_pool": dg.n_floor_pool,
                 "n_train": len(D.load_data("train")[1]), "n_feature_train": len(D.load_data("feature")[1]),
                 "floor_draws": args.floor_draws, "seed_sets": args.seed_sets, "gmm_n": args.gmm_n, "nfes": nfes,
                 "threads": args.threads, "torch": torch.__version__, "backend": args.backend,
                 "machine": f"{platform.machine()} {os.cpu_count()} cores",
                 "feature_acc": {k: round(v, 4) for k, v in dg.feat_acc.items()},
                 "feature_scale": round(dg.scale, 4),
                 "noisy_classifier_heldout": dg.clf.config.get("heldout", {}),
                 "weights_sha256": {k: D.weights_sha256(k, args.weights)
                                    for k in ("denoiser", "noisy_classifier", "feature_classifier")},
                 "seconds": round(time.perf_counter() - t_all, 1)},
        "floor": dg.floor, "floor_draws": dg.floor_rows, "fd_uncond": fd_rows, "guidance": guid,
        "seed_spread": spread, "gmm": gmm, "gmm_floor": gmm_floor,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
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
