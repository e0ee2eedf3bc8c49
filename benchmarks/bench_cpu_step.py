"""One solver step on CPU: fastdiff's fused kernel against what it replaces, in one process.

Row: DPM-Solver++(2M)-like with classifier-free guidance: ``e = m_u + w (m_c - m_u)``,
``d = a_x x + a_e e``, ``x' = c_x x + c_d d + c_h h0``, ``h1 = d``; the state is updated in place.

Methods, per shape and dtype:
  reference      fastdiff's reference backend (plain torch, op by op)
  diffusers      the pipeline's CFG blend + DPMSolverMultistepScheduler.step (diffusers' own)
  compiled       torch.compile of the reference step (compile time reported separately)
  cpu            the fused kernel (fastdiff.backends.cpu.step on prepared arguments)
  cpu+dispatch   the same through fastdiff.ops.step (validation + backend choice), as the loop calls it

Reports the median µs per step (and the best sample), GB/s counting minimum bytes (each input
read once, each output written once), the copy bandwidth measured in the same run (best sample of
torch ``copy_`` moving the same number of bytes as the step, with 2 threads or 1, the faster; also
``copy_`` of one tensor), the fraction of copy bandwidth (median and best),
and the speedup of ``cpu`` over each method. The machine's load average is recorded: on a shared
2-core machine, other processes stall 2-thread parallel regions (torch's and ours) for whole
scheduler slices, so compare the median with the best sample.

    python benchmarks/bench_cpu_step.py [out.json] [--quick] [--dtypes fp32,fp16] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fastdiff import ops
from fastdiff.args import N_COEF, StepArgs
from fastdiff.backends import cpu, reference

SHAPES = [(1, 4, 64, 64), (4, 4, 128, 128), (16, 4, 128, 128), (2, 3, 512, 512), (4096, 2)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GUIDANCE = 7.5


def dpmpp_2m_coef() -> tuple[float, ...]:
    """Coefficients of a mid-schedule DPM++(2M) step (eps prediction), contracting so that
    repeating it in place keeps the state bounded."""
    c = [0.0] * N_COEF
    c[0], c[1] = 1.25, -0.6  # x0 = (x - sigma*eps)/alpha
    c[2], c[3], c[4] = 0.6, 0.45, -0.05  # x' = c_x x + c_d d + c_h h0
    c[2 + 7 + 1] = 1.0  # h1 = d
    return tuple(c)


def time_all(fns: dict, repeats: int, budget_s: float = 2e-3) -> dict:
    """Seconds per call of each function: ``(median, best)`` over ``repeats`` samples.

    Samples are taken round-robin (one of each function per round) so that a change in machine
    load hits every method alike; each sample runs enough calls to last about ``budget_s``.
    """
    calls = {}
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(budget_s / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            k = calls[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k)
    return {name: (statistics.median(v), min(v)) for name, v in samples.items()}


def make_diffusers_step(m_u, m_c, x):
    """The pipeline's CFG blend + DPMSolverMultistepScheduler.step at a fixed mid-schedule step."""
    from diffusers import DPMSolverMultistepScheduler

    sch = DPMSolverMultistepScheduler(num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2)
    sch.set_timesteps(20)
    mid = 10
    for i in range(mid + 1):  # fill its model-output history
        sch.step(m_u, sch.timesteps[i], x, return_dict=False)
    t_mid = sch.timesteps[mid]

    def step():
        e = m_u + GUIDANCE * (m_c - m_u)
        sch._step_index = mid  # stay mid-schedule: every call is a second-order step
        return sch.step(e, t_mid, x, return_dict=False)[0]

    return step


def bench_case(shape, dtype, repeats, with_compile):
    b, n = shape[0], 1
    for d in shape:
        n *= d
    gen = torch.Generator().manual_seed(0)
    model_out = torch.randn((2 * b, *shape[1:]), generator=gen).to(dtype)  # [uncond; cond] batch
    m_u, m_c = model_out.chunk(2)
    x, h0 = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    h1 = torch.empty_like(x)
    w = torch.full((b,), GUIDANCE)
    coef = dpmpp_2m_coef()

    def args_for(xx, hh0, hh1):
        return StepArgs(x=xx, out=xx, m=m_u, m_c=m_c, w=w, coef=coef, h_read=(hh0,), h_write=(hh1,))

    args = args_for(x, h0, h1)
    assert cpu.supports(args), "cpu backend cannot run the benchmark row"
    # correctness check before timing: cpu equals reference on this row
    xr, h1r = x.clone(), torch.empty_like(x)
    reference.step(args_for(xr, h0, h1r))
    xc, h1c = x.clone(), torch.empty_like(x)
    cpu.step(args_for(xc, h0, h1c))
    err = float((xc.double() - xr.double()).norm() / xr.double().norm())
    assert err <= (1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps), f"cpu != reference: {err:.2e}"

    methods = {
        "reference": lambda: reference.step(args),
        "diffusers": make_diffusers_step(m_u, m_c, x.clone()),
        "cpu": lambda: cpu.step(args),
        "cpu+dispatch": lambda: ops.step(args, backend="cpu"),
    }
    compile_s = None
    if with_compile:
        def ref_step(xx, uu, cc, hh0, hh1, ww):
            reference.step(StepArgs(x=xx, out=xx, m=uu, m_c=cc, w=ww, coef=coef, h_read=(hh0,), h_write=(hh1,)))

        torch._dynamo.reset()  # a fresh compile per shape, so its time is the full compile time
        compiled = torch.compile(ref_step)
        t0 = time.perf_counter()
        compiled(x, m_u, m_c, h0, h1, w)
        compile_s = time.perf_counter() - t0
        methods["compiled"] = lambda: compiled(x, m_u, m_c, h0, h1, w)

    esize = x.element_size()
    min_bytes = 6 * n * esize + 4 * b  # read x, m_u, m_c, h0, w; write x', h1
    src_fp, dst_fp = torch.empty(3 * n, dtype=dtype), torch.empty(3 * n, dtype=dtype)  # same bytes as the step
    src_1, dst_1 = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    src_fp.normal_(), src_1.normal_()
    times = time_all({"copy_same_bytes": lambda: dst_fp.copy_(src_fp),
                      "copy_one_tensor": lambda: dst_1.copy_(src_1), **methods}, repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1-thread copy cannot stall on a barrier when the machine is busy
    copy_1t = time_all({"copy": lambda: dst_fp.copy_(src_fp)}, repeats)["copy"]
    torch.set_num_threads(threads)
    # the ceiling: the best copy sample, 2 threads or 1 (load only ever slows a copy down), so
    # the fraction below (a method's median against it) is conservative
    copy_gbs = 2 * 3 * n * esize / min(times["copy_same_bytes"][1], copy_1t[1]) / 1e9
    rows = []
    for name in methods:
        t, best = times[name]
        gbs = min_bytes / t / 1e9
        rows.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "method": name,
                     "us": t * 1e6, "us_best": best * 1e6, "gb_s": gbs, "copy_gb_s": copy_gbs,
                     "frac_of_copy": gbs / copy_gbs, "frac_of_copy_best": min_bytes / best / 1e9 / copy_gbs,
                     "copy_2t_gb_s": 2 * 3 * n * esize / times["copy_same_bytes"][1] / 1e9,
                     "copy_1t_gb_s": 2 * 3 * n * esize / copy_1t[1] / 1e9,
                     "copy_one_tensor_gb_s": 2 * n * esize / times["copy_one_tensor"][1] / 1e9,
                     "cpu_speedup": t / times["cpu"][0], "min_bytes": min_bytes,
                     "compile_s": compile_s if name == "compiled" else None})
    return rows


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "simd": cpu._C.simd_level() if cpu._C else None,
            "kernel_threads": cpu._C.num_threads() if cpu._C else None,
            "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


def print_table(rows) -> None:
    head = f"{'shape':>16} {'dtype':>8} {'method':>13} {'us/step':>10} {'best us':>9} {'GB/s':>7} " \
           f"{'copy GB/s':>9} {'%copy':>6} {'best %':>6} {'cpu x':>7} {'compile s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        cs = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else ""
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['dtype']:>8} {r['method']:>13} {r['us']:>10.1f} "
              f"{r['us_best']:>9.1f} {r['gb_s']:>7.2f} {r['copy_gb_s']:>9.2f} {100 * r['frac_of_copy']:>5.0f}% "
              f"{100 * r['frac_of_copy_best']:>5.0f}% "
              f"{r['cpu_speedup']:>7.2f} {cs:>9}")


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
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            rows += bench_case(shape, dtype, repeats, with_compile=not a.quick)
    info = machine()
    info["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"# {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {a.threads} threads, "
          f"SIMD {info['simd']}, load average {info['loadavg_start']} -> {info['loadavg_end']}")
    print_table(rows)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
