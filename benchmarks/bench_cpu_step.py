"""One solver step on CPU: fastdiff's fused kernel against what it replaces, in one process.

A thin script over :func:`fastdiff.bench.step.bench_case` (the same measurement is the ``step`` part
of ``fastdiff bench``). Row: DPM-Solver++(2M)-like with classifier-free guidance:
``e = m_u + w (m_c - m_u)``, ``d = a_x x + a_e e``, ``x' = c_x x + c_d d + c_h h0``, ``h1 = d``;
the state is updated in place.

Methods, per shape and dtype:
  reference      fastdiff's reference backend (plain torch, op by op)
  diffusers      the pipeline's CFG blend + DPMSolverMultistepScheduler.step (diffusers' own)
  compiled       torch.compile of the reference step (compile time reported separately)
  cpu            the fused kernel (fastdiff.backends.cpu.step on prepared arguments)
  cpu+dispatch   the same through fastdiff.runtime.ops.step (validation + backend choice), as the loop calls it

Reports the median µs per step (and the best sample), GB/s counting minimum bytes (each input
read once, each output written once), the copy bandwidth of the step's bytes sampled with the
methods (the one definition of ``fastdiff.bench.timing``: the median sample; outlier samples are
listed, not used), the fraction of copy bandwidth (median and best), and the speedup of ``cpu``
over each method. The machine's load average is recorded: on a shared 2-core machine, other
processes stall 2-thread parallel regions (torch's and ours) for whole scheduler slices, so compare
the median with the best sample.

    python benchmarks/bench_cpu_step.py [out.json] [--quick] [--dtypes fp32,fp16] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastdiff.bench import print_tables
from fastdiff.bench.step import DTYPES, SHAPES, bench_case, machine
from fastdiff.backends import cpu


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", nargs="?", default="bench-results/cpu_step.json", help="JSON output path")
    p.add_argument("--quick", action="store_true", help="smoke run: one small shape, few repeats, no compile")
    p.add_argument("--dtypes", default="fp32,fp16", help="comma list of fp32, fp16, bf16")
    p.add_argument("--repeats", type=int, default=25, help="timed samples per method (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch and kernel threads")
    a = p.parse_args(argv)
    if cpu._C is None:
        raise SystemExit(f"the cpu backend is unavailable: {cpu.available()[1]}")
    torch.set_num_threads(a.threads)
    cpu._C.set_num_threads(a.threads)
    dtypes = [DTYPES[d] for d in a.dtypes.split(",")]
    shapes, repeats = (SHAPES[:1], 3) if a.quick else (SHAPES, a.repeats)
    if a.quick:
        dtypes = dtypes[:1]
    info = machine()
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            rows += bench_case(shape, dtype, repeats, with_compile=not a.quick)
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {a.threads} threads, "
          f"SIMD {info['simd']}, load average {info['loadavg_start']} -> {info['loadavg_end']}")
    print_tables({"step": rows, "machine": info})
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
