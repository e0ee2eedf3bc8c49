"""One short, robust check of the GPU backends on a real GPU (an H100 session of a few minutes).

    pip install -e . --no-build-isolation     # builds fastdiff._C and, with nvcc, fastdiff._C_cuda
    python benchmarks/gpu_check.py [--budget 420] [--skip-tests]

Parts, each guarded (an error is recorded and the next part runs) and each skipped once the time
budget is spent; a summary table is always printed at the end:

1. environment: device, versions, which backends are available and why not;
2. the GPU tests (tests/backends/test_gpu.py, test_triton.py, test_triton_launch.py (the
   coefficient table, the direct launch of compiled kernels), the CUDA graph, executor and
   blend-row tests) through pytest, with FASTDIFF_TRITON_AUTOTUNE=0 (the default: a fixed
   configuration per size class) so each Triton variant compiles once;
3. copy bandwidth of the device (torch clone of 1 GiB; bytes read + written);
4. the fused step of ``triton`` and ``cuda`` (their prepared programs, what the loop runs; and
   Triton's unprepared ``step``) against the reference torch step and ``torch.compile`` of it, at
   (1,4,64,64), (16,4,128,128) and (2,3,512,512) in fp16, bf16 and fp32, for two rows: a guided
   multistep update (CFG, one history read and write) and a guided ancestral one (the same plus
   Philox noise drawn in the kernel). ``device_us`` is the device time per step inside a CUDA
   graph, the operands rotated through enough copies that L2 is cold (host time excluded);
   ``x_floor`` is that over a copy of the same bytes timed the same way (the bandwidth floor);
   ``host_us`` is the host time to issue one step (100 back to back, unsynchronised) and
   ``wall_us`` the same until the device is done. GB/s counts the bytes one fused step must move
   (6 tensors: x, m_u, m_c, h read; x, h written). The timing code is
   :func:`fastdiff.bench.step.bench_gpu` (also the ``gpu`` part of ``fastdiff bench``);
5. the whole loop: 30 CFG steps with a zero-cost model (DPM++(2M), Euler ancestral) at (1,4,64,64)
   and (16,4,128,128) fp32: repeated ``fastdiff.sample`` calls eager and with ``cuda_graph=True``
   (captured on the first call, replayed after), against the stock diffusers loop, µs per step of
   wall time with the device synchronised at the end of each loop.

Results go to ``$OUT/gpu_check.json`` when ``OUT`` is set (else ``bench-results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = ((1, 4, 64, 64), (16, 4, 128, 128), (2, 3, 512, 512))
"""Step shapes timed: an SD latent (host-bound), and the two the issue's floor targets name."""


class Report:
    def __init__(self, budget: float):
        self.t0 = time.perf_counter()
        self.budget = budget
        self.parts: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.env: dict = {}
        self.tests: dict = {}
        self.copy_gbps: float | None = None
        self.rows: list[dict] = []
        self.loops: list[dict] = []

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t0)

    def part(self, name: str, fn, need: float = 5.0) -> None:
        if self.left() < need:
            self.parts[name] = f"skipped (budget: {self.left():.0f}s left)"
            return
        t = time.perf_counter()
        try:
            fn(self)
            self.parts[name] = f"ok ({time.perf_counter() - t:.1f}s)"
        except Exception as exc:  # keep going: every part is independent
            self.parts[name] = f"FAILED ({type(exc).__name__}: {exc})"[:300]
            self.errors[name] = traceback.format_exc()[-3000:]
            print(self.errors[name], flush=True)


def part_env(rep: Report) -> None:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, sms=p.multi_processor_count, mem_gib=round(p.total_memory / 2**30, 1),
                   capability=f"{p.major}.{p.minor}")
    from fastdiff.runtime import ops

    env["backends"] = {k: {"ok": ok, "why": why} for k, (ok, why) in ops.available_backends().items()}
    rep.env = env
    print(json.dumps(env, indent=1), flush=True)


def part_tests(rep: Report) -> None:
    env = dict(os.environ, FASTDIFF_TRITON_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider",
           "tests/backends/test_gpu.py", "tests/backends/test_triton.py", "tests/backends/test_triton_launch.py",
           "tests/runtime/test_cuda_graph.py",
           "tests/runtime/test_executor.py", "tests/runtime/test_blend_backends.py"]
    timeout = max(30.0, min(300.0, rep.left() - 150))  # leave time for the timings
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, rc = out + f"\n[timed out after {timeout:.0f}s]", -1
    tail = out.strip().splitlines()[-60:]
    print("\n".join(tail), flush=True)
    summary = next((ln for ln in reversed(tail) if " passed" in ln or " failed" in ln or "error" in ln), tail[-1] if tail else "")
    failed = [ln for ln in out.splitlines() if ln.startswith("FAILED") or ln.startswith("ERROR")]
    rep.tests = {"returncode": rc, "summary": summary.strip("= "), "failed": failed[:30]}
    if rc != 0:
        raise RuntimeError(f"pytest: {summary.strip('= ')}")


def part_copy(rep: Report) -> None:
    from fastdiff.bench.step import gpu_copy_gbps

    rep.copy_gbps = gpu_copy_gbps()
    print(f"device copy bandwidth: {rep.copy_gbps:.0f} GB/s (read + write)", flush=True)


def part_timings(rep: Report) -> None:
    import torch

    from fastdiff.bench.step import GPU_DTYPES, GPU_VARIANTS, bench_gpu, gpu_providers

    _, missing = gpu_providers()
    for name, why in missing.items():
        print(f"{name}: not timed ({why})", flush=True)
    rep.rows = bench_gpu(SHAPES, GPU_DTYPES, GPU_VARIANTS, copy_gbps=rep.copy_gbps,
                         time_left=rep.left, on_row=lambda r: print(json.dumps(r), flush=True), progress=False)


def part_loop(rep: Report) -> None:
    import torch

    import fastdiff
    from fastdiff.bench.loop import DIFFUSERS, GUIDANCE, config_for

    import diffusers

    def timed(fn, n=10):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best / 30 * 1e6

    for sampler in ("dpmpp_2m", "euler_ancestral"):
        cfg = config_for(sampler)
        cls = getattr(diffusers, DIFFUSERS[sampler][0])
        for shape in ((1, 4, 64, 64), (16, 4, 128, 128)):
            out = torch.randn(2 * shape[0], *shape[1:], device="cuda")
            cond = torch.zeros(shape[0], 1, device="cuda")
            noise = torch.randn(shape, device="cuda")

            def model(x, t, c):
                return out

            def fd(graph):
                return lambda: fastdiff.sample(model, noise, sampler=sampler, steps=30, schedule=cfg,
                                               guidance_scale=GUIDANCE, cond=cond, uncond=cond, seed=0,
                                               cuda_graph=graph)

            def stock():
                sch = cls(**cfg)
                sch.set_timesteps(30)
                x = noise * sch.init_noise_sigma
                for t in sch.timesteps:
                    sch.scale_model_input(torch.cat([x] * 2), t)
                    u, c = out.chunk(2)
                    x = sch.step(u + GUIDANCE * (c - u), t, x).prev_sample
                return x

            row = {"loop": sampler, "shape": list(shape), "eager_us": timed(fd(False)), "graph_us": timed(fd(True)),
                   "diffusers_us": timed(stock, 5)}
            row["graph_vs_diffusers"] = row["diffusers_us"] / row["graph_us"]
            row["eager_vs_diffusers"] = row["diffusers_us"] / row["eager_us"]
            print(json.dumps(row), flush=True)
            rep.loops.append(row)
            if rep.left() < 10:
                return


def summary(rep: Report) -> str:
    lines = ["", "=" * 100, "fastdiff gpu_check summary", "=" * 100]
    lines.append(f"device: {rep.env.get('device')}  torch {rep.env.get('torch')}  triton {rep.env.get('triton')}  "
                 f"CUDA {rep.env.get('torch_cuda')}")
    for name, b in rep.env.get("backends", {}).items():
        lines.append(f"  backend {name:10s} {'yes' if b['ok'] else 'no '}  {b['why']}")
    for name, status in rep.parts.items():
        lines.append(f"part {name:8s}: {status}")
    if rep.tests:
        lines.append(f"tests: {rep.tests.get('summary')}")
        lines += [f"  {f}" for f in rep.tests.get("failed", [])]
    if rep.copy_gbps:
        lines.append(f"copy bandwidth: {rep.copy_gbps:.0f} GB/s")
    if rep.rows:
        lines.append(f"{'variant':14s} {'dtype':8s} {'shape':18s} {'provider':26s} {'device µs':>10s} "
                     f"{'x floor':>8s} {'host µs':>8s} {'wall µs':>10s} {'GB/s':>8s} {'of copy':>8s} timing")
        for r in rep.rows:
            shape = "x".join(map(str, r["shape"]))
            if "error" in r:
                lines.append(f"{r['variant']:14s} {r['dtype']:8s} {shape:18s} {r['provider']:26s} {r['error']}")
                continue
            frac = f"{100 * r['frac_of_copy']:.0f}%" if "frac_of_copy" in r else ""
            lines.append(f"{r['variant']:14s} {r['dtype']:8s} {shape:18s} {r['provider']:26s} "
                         f"{r['device_us']:10.1f} {r['x_floor']:8.2f} {r['host_us']:8.1f} {r['wall_us']:10.1f} "
                         f"{r['gb_s']:8.0f} {frac:>8s} {r['timing']}{'' if r['cold_l2'] else ' (L2 warm)'}")
    for r in rep.loops:
        lines.append(f"loop {r['loop']:16s} {'x'.join(map(str, r['shape'])):14s} eager {r['eager_us']:8.1f} "
                     f"graph {r['graph_us']:8.1f} diffusers {r['diffusers_us']:8.1f} us/step "
                     f"(graph {r['graph_vs_diffusers']:.1f}x, eager {r['eager_vs_diffusers']:.1f}x diffusers)")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole script (default 420)")
    ap.add_argument("--skip-tests", action="store_true", help="timings only")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    rep = Report(a.budget)
    try:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: nothing to check", flush=True)
            return 2
        rep.part("env", part_env, need=0)
        if not a.skip_tests:
            rep.part("tests", part_tests, need=60)
        rep.part("copy", part_copy)
        rep.part("loop", part_loop, need=30)
        rep.part("timings", part_timings, need=20)
    finally:
        print(summary(rep), flush=True)
        out_dir = os.environ.get("OUT") or os.path.join(ROOT, "bench-results")
        try:
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
                json.dump({"env": rep.env, "parts": rep.parts, "tests": rep.tests, "copy_gbps": rep.copy_gbps,
                           "rows": rep.rows, "loops": rep.loops, "errors": rep.errors}, f, indent=1)
        except OSError as exc:
            print(f"could not write results: {exc}", flush=True)
    return 0 if not rep.errors else 1


if __name__ == "__main__":
    sys.exit(main())
