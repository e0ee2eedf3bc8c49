"""fp16 and bf16 CPU steps against the fp32 step: GB/s of one guided multistep row, interleaved.

The row is :func:`fastdiff.bench.step.cfg_row` (CFG ``e = m_u + w (m_c - m_u)``, a DPM-Solver++(2M)
update reading one history slot and writing another, the state updated in place): it moves 6
element tensors (read x, m_u, m_c, h0; write x', h1) plus ``w``, so 24 B/element in fp32 and
12 B/element in fp16/bf16. GB/s = those bytes / time: the same yardstick for every dtype, so the
ratio fp16/fp32 (bf16/fp32) says whether the half rows move bytes as fast as fp32 does.

The dtypes are timed round-robin (fp32, fp16, bf16, fp32, ...) so that a change of machine load
hits each alike; every sample runs enough steps to last about ``--sample-ms``. Reported per dtype:
the median and the best sample in GB/s, and the ratios of the medians and of the bests; the copy
bandwidth at the row's bytes (the one definition of ``fastdiff.bench.timing``, sampled in the same
rounds) and the fraction of it; outlier samples (shown, not used); the load average at the start
and at the end.

    python -m benchmarks.bench_cpu_half [--threads 1,2] [--rounds 40] [--levels avx512] [--json out.json]

(run from the repository root, so that this checkout's ``fastdiff`` and its extension are the ones
measured: the header names the extension file).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastdiff.backends import cpu
from fastdiff.bench.step import GUIDANCE, cfg_row
from fastdiff.bench.timing import copy_fn, copy_gb_s, round_robin, summarize
from fastdiff.core.args import StepArgs, pack_row

SHAPES = [(16, 4, 128, 128), (8, 4, 256, 256)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def row_args(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> StepArgs:
    """In-place arguments of :func:`cfg_row` on random ``dtype`` tensors of ``shape``."""
    g = torch.Generator().manual_seed(seed)
    x, m_u, m_c, h0 = (torch.randn(shape, generator=g).to(dtype) for _ in range(4))
    h1 = torch.empty_like(x)
    w = torch.full((shape[0],), GUIDANCE)
    return StepArgs(x=x, out=x, m=m_u, m_c=m_c, w=w, coef=pack_row(cfg_row()), h_read=(h0,), h_write=(h1,))


def row_bytes(args: StepArgs) -> int:
    """Bytes the row must move: 4 element tensors read, 2 written, ``w`` read."""
    return 6 * args.x.numel() * args.x.element_size() + 4 * args.x.shape[0]


def run(shapes, dtypes, threads, rounds, sample_s, level=None) -> list[dict]:
    """One dict per (level, threads, shape, dtype): median and best GB/s, the ratios to fp32, and the
    copy bandwidth at the row's bytes (:mod:`fastdiff.bench.timing`), all sampled round-robin."""
    if level:
        cpu._C.set_simd_level(level)
    cpu._C.set_num_threads(threads)
    torch.set_num_threads(threads)
    rows = []
    for shape in shapes:
        args = {d: row_args(shape, DTYPES[d]) for d in dtypes}
        fns = {d: (lambda a=a: cpu.step(a)) for d, a in args.items()}
        sizes = sorted({row_bytes(a) for a in args.values()})
        fns.update({f"copy{nb}": copy_fn(nb) for nb in sizes})
        samples = round_robin(fns, rounds, sample_s)
        copies = {nb: copy_gb_s(nb, samples[f"copy{nb}"]) for nb in sizes}
        res = {}
        for d in dtypes:
            nb = row_bytes(args[d])
            sm = summarize(samples[d])
            res[d] = {"gb_s": nb / sm["median"] / 1e9, "gb_s_best": nb / sm["best"] / 1e9,
                      "outliers_gb_s": [nb / samples[d][i] / 1e9 for i in sm["outliers"]]}
        for d in dtypes:
            nb = row_bytes(args[d])
            r = {"level": cpu._C.simd_level(), "threads": threads, "shape": list(shape), "dtype": d,
                 "numel": args[d].x.numel(), "bytes": nb, **res[d], "copy_gb_s": copies[nb]["gb_s"],
                 "copy_outliers_gb_s": copies[nb]["outliers_gb_s"]}
            r["frac_of_copy"] = r["gb_s"] / r["copy_gb_s"]
            if "fp32" in res:
                r["ratio"] = res[d]["gb_s"] / res["fp32"]["gb_s"]
                r["ratio_best"] = res[d]["gb_s_best"] / res["fp32"]["gb_s_best"]
            rows.append(r)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", default="1,2", help="comma list of thread counts")
    p.add_argument("--rounds", type=int, default=40, help="samples per dtype (round-robin)")
    p.add_argument("--sample-ms", type=float, default=5.0, help="length of one sample")
    p.add_argument("--dtypes", default="fp32,fp16,bf16")
    p.add_argument("--levels", default="", help="comma list of SIMD levels (default: the current one)")
    p.add_argument("--shapes", default="", help="e.g. 16x4x128x128,8x4x256x256")
    p.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    if cpu._C is None:
        raise SystemExit(f"the cpu backend is unavailable: {cpu.available()[1]}")
    shapes = [tuple(int(s) for s in sh.split("x")) for sh in a.shapes.split(",")] if a.shapes else SHAPES
    dtypes = a.dtypes.split(",")
    load0 = os.getloadavg()
    rows = []
    for level in a.levels.split(",") if a.levels else [None]:
        for t in (int(s) for s in a.threads.split(",")):
            rows += run(shapes, dtypes, t, a.rounds, a.sample_ms / 1e3, level)
    load1 = os.getloadavg()
    print(f"# {cpu._C.__file__}")
    print(f"# load average {load0[0]:.2f} -> {load1[0]:.2f}; {a.rounds} interleaved samples of ~{a.sample_ms} ms")
    print(f"{'level':7s} {'thr':>3s} {'shape':18s} {'dtype':5s} {'GB/s med':>9s} {'best':>7s} {'/fp32':>6s} {'best':>6s}"
          f" {'copy GB/s':>9s} {'%copy':>6s}  outliers (GB/s, not used)")
    for r in rows:
        outl = " ".join(f"{v:.0f}" for v in r["outliers_gb_s"] + r["copy_outliers_gb_s"])
        print(f"{r['level']:7s} {r['threads']:3d} {'x'.join(map(str, r['shape'])):18s} {r['dtype']:5s} "
              f"{r['gb_s']:9.1f} {r['gb_s_best']:7.1f} {r.get('ratio', float('nan')):6.2f} "
              f"{r.get('ratio_best', float('nan')):6.2f} {r['copy_gb_s']:9.1f} {100 * r['frac_of_copy']:5.0f}%  {outl}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"loadavg": [load0, load1], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
