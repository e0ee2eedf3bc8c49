"""The ``fastdiff`` command line: ``info`` and ``bench`` (more commands arrive with later issues)."""

from __future__ import annotations

import argparse
import os
import platform
import sys

import torch


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, the backends available and why the others are not."""
    from . import __version__, ops

    print(f"fastdiff {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except Exception as exc:  # noqa: BLE001 - report any import failure
        print(f"triton: not importable ({type(exc).__name__}: {exc})")
    cuda = torch.cuda.is_available()
    print(f"cuda: {'yes, ' + torch.cuda.get_device_name(0) if cuda else 'no GPU visible'}")
    print(f"threads: {torch.get_num_threads()}  FASTDIFF_BACKEND={os.environ.get('FASTDIFF_BACKEND', '') or '(unset)'}")
    print("backends:")
    for name, (ok, why) in ops.available_backends().items():
        print(f"  {name:<10} {'available' if ok else 'unavailable':<12} {why}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmark whole sampling loops (and the fused step, where its benchmark is present)."""
    from .bench import bench_loop, format_table, write_json

    shape = tuple(int(s) for s in args.shape.split(","))
    steps = 8 if args.quick else args.steps
    repeats = 1 if args.quick else args.repeats
    names = args.samplers.split(",") if args.samplers else None
    backends = args.backends.split(",") if args.backends else None
    print(f"Sampling loop, Gaussian-mixture model, shape {shape}, {steps} steps, fp32, "
          f"{torch.get_num_threads()} threads (best of {repeats})")
    results = bench_loop(names, backends, shape, steps, repeats)
    print(format_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        write_json(results, args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastdiff`` console script."""
    p = argparse.ArgumentParser(prog="fastdiff", description="Fused diffusion sampling: info and benchmarks.")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions and backends").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="µs per step per sampler and backend")
    b.add_argument("--quick", action="store_true", help="a smoke run in seconds")
    b.add_argument("--shape", default="16,4,32,32", help="noise shape, comma-separated (default 16,4,32,32)")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--samplers", default="", help="comma-separated sampler names (default: all)")
    b.add_argument("--backends", default="", help="comma-separated backends (default: reference and cpu)")
    b.add_argument("--json", default="bench-results/loop.json", help="where to write JSON ('' to skip)")
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
