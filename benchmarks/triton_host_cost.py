"""fastdiff's own Python host cost of one prepared Triton step (``Program.run(i, m)``, what the loop
executor calls), on CPU, with the kernel launch stubbed.

    python benchmarks/triton_host_cost.py [--before /path/to/other/checkout] [--rounds 3]

Without a GPU, Triton's launcher cannot run; this times what runs around it: the prepared
program's per-step Python (signature check, pointer list, launch key) down to the call into
Triton, which is replaced by a no-op (a fake ``JITFunction`` returning a fake compiled kernel whose
``run`` does nothing; where the checkout has the direct launch, it is forced on). It therefore
leaves out Triton's own ``JITFunction.run`` (argument binder, cache key, 30 float scalars' typing),
which the direct path skips on a GPU: the real gain there is larger than this shows
(``benchmarks/gpu_check.py`` times the prepared path on a GPU).

Each checkout runs in its own process, interleaved (A B A B ...), one thread each; printed: µs per
step (median and best of 7 runs of 2000 steps, per process) for two rows of ``fastdiff.bench.step`` (a guided multistep
row and a guided ancestral one). A second measurement times, per checkout, the part of Triton's
``JITFunction.run`` that a launch through it pays and the direct launch skips (binder and cache
key over the kernel's arguments: 30 float scalars before this change, one pointer after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker() -> None:
    """Time this process's checkout (``PYTHONPATH``) and print one JSON line."""
    os.environ["TRITON_INTERPRET"] = "1"  # CPU tensors; the launch itself is stubbed below
    import time

    import torch

    torch.set_num_threads(1)
    from fastdiff.backends import triton as tb
    from fastdiff.bench.step import gpu_step_args
    from fastdiff.runtime import ops

    k = tb.kernels()

    class Compiled:
        function = packed_metadata = None

        def run(self, *args):
            return None

    compiled = Compiled()

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: compiled

    k._step_kernel = Jit()
    if hasattr(k, "DIRECT"):  # this change: the compiled kernel launched directly
        k.DIRECT = True
        k._stream = lambda index: 0
        k._current_device = lambda: None  # a CPU tensor's device index
    res = {"fastdiff": os.path.dirname(tb.__file__), "direct": getattr(k, "DIRECT", None)}
    for variant in ("multistep_cfg", "ancestral_cfg"):
        args = gpu_step_args((1, 4, 64, 64), torch.float32, variant, device="cpu")
        prog = ops.prepare([args], backend="triton")
        mo = torch.cat([args.m, args.m_c])  # the batched model output the loop hands the program

        def step():
            prog.run(0, mo)  # what the loop executor calls per step

        for _ in range(300):
            step()
        runs = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(2000):
                step()
            runs.append((time.perf_counter() - t) / 2000 * 1e6)
        res[variant] = round(statistics.median(runs), 2)
        res[variant + "_best"] = round(min(runs), 2)
    print(json.dumps(res))


def jit_worker() -> None:
    """Time the part of Triton's ``JITFunction.run`` that the direct launch skips, for this checkout's
    kernel and row arguments: the argument binder (each argument's type and specialisation) and the
    cache-key lookup. A lower bound of that cost (no driver here: the device and stream queries, the
    launch metadata and the launcher itself are left out)."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["FASTDIFF_TRITON_AUTOTUNE"] = "0"
    import time

    import torch

    torch.set_num_threads(1)
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import compute_cache_key, create_function_from_signature

    from fastdiff.backends import triton as tb
    from fastdiff.bench.step import gpu_step_args

    k = tb.kernels()
    real = k._step_kernel
    seen = []

    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: seen.append((args, kwargs))

    k._step_kernel = Jit()
    k._sm_count = lambda index: 132
    k._current_device = lambda: 0
    if hasattr(k, "DIRECT"):
        k.DIRECT = False
    binder = create_function_from_signature(real.signature, real.params, BaseBackend)
    res = {}
    for variant in ("multistep_cfg", "ancestral_cfg"):
        a = gpu_step_args((1, 4, 64, 64), torch.float32, variant, device="cpu")
        seen.clear()
        k.fused_step(a.x, a.out, a.m, a.coef, row=a.row, m_c=a.m_c, h_read=a.h_read, h_write=a.h_write, w=a.w,
                     seeds=a.seeds)
        args, kwargs = seen[-1]
        kwargs = dict(kwargs, debug=False)
        cache: dict = {}

        def run():
            bound, spec, options = binder(*args, **kwargs)
            return compute_cache_key(cache, spec, options)

        for _ in range(300):
            run()
        runs = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(2000):
                run()
            runs.append((time.perf_counter() - t) / 2000 * 1e6)
        res[variant] = round(statistics.median(runs), 2)
        res[variant + "_best"] = round(min(runs), 2)
        res["n_args"] = len(args) + len(kwargs) - 1
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="another checkout to compare against (e.g. main's)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--jit-worker", action="store_true", help=argparse.SUPPRESS)
    opt = ap.parse_args()
    if opt.worker or opt.jit_worker:
        (worker if opt.worker else jit_worker)()
        return
    trees = {"after": ROOT} if not opt.before else {"before": os.path.abspath(opt.before), "after": ROOT}
    for mode, what in (("--worker", "fastdiff's Python per prepared step, launch stubbed"),
                       ("--jit-worker", "Triton's binder + cache key per launch (skipped by the direct path)")):
        got: dict[str, list[dict]] = {name: [] for name in trees}
        for _ in range(opt.rounds):
            for name, tree in trees.items():  # interleaved: A B A B
                env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
                out = subprocess.run([sys.executable, os.path.abspath(__file__), mode], cwd=tree, env=env,
                                     capture_output=True, text=True, check=True).stdout
                got[name].append(json.loads(out.strip().splitlines()[-1]))
        print(f"{what}:")
        for name, runs in got.items():
            line = {v: [r[v] for r in runs] for v in ("multistep_cfg", "ancestral_cfg", "multistep_cfg_best",
                                                     "ancestral_cfg_best")}
            extra = {k: v for k, v in runs[0].items() if k not in line}
            print(f"  {name:6s} µs: {json.dumps(line)}  {json.dumps(extra)}")


if __name__ == "__main__":
    main()
