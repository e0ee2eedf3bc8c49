"""Guided step, fused vs stock (``fastdiff bench --parts guidance`` as a script, any shape).

    python benchmarks/guiders.py [B C H W] [repeats] [threads]

Prints, per guider, the median (and best) microseconds of each and the ratio, interleaved ABAB in
one run (:func:`fastdiff.bench.guidance.bench_guiders`).
"""

from __future__ import annotations

import sys

import torch

from fastdiff.bench.guidance import bench_guiders


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    shape = tuple(args[:4]) if len(args) >= 4 else (16, 4, 128, 128)
    reps = args[4] if len(args) >= 5 else 15
    if len(args) >= 6:  # torch's threads and the CPU kernel's (1: steadier on a loaded machine)
        from fastdiff.backends import cpu

        torch.set_num_threads(args[5])
        if cpu._C is not None:
            cpu._C.set_num_threads(args[5])
    print(f"shape {shape}, fp32, {torch.get_num_threads()} threads, median of {reps} (interleaved)")
    print(f"{'guider':16s} {'stock us':>10s} {'fused us':>10s} {'ratio':>7s} {'best ratio':>10s}")
    for r in bench_guiders(shape, reps):
        print(f"{r['guider']:16s} {r['stock_us']:10.0f} {r['fused_us']:10.0f} {r['speedup']:7.1f} "
              f"{r['speedup_best']:10.1f}")


if __name__ == "__main__":
    main()
