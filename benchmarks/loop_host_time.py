"""Where one row of the prepared loop spends its time on the host, at small shapes.

For a CFG DPM++(2M) loop with a zero-cost model (it returns a tensor made once), per row:

- ``total``: a whole ``fastdiff.Sampler`` call (or ``fastdiff.sample`` call, its prepared loop
  reused) over 30 and 90 steps; the difference per extra row is the per-row cost, the rest the
  per-call cost (noise scaling, seeds, conditioning, the first model input, the result);
- ``model``: the model call alone, through the same wrapper the loop calls;
- ``step``: the prepared row alone (``program.run_ptr(i, address)``: the extension call and the
  kernel), back to back;
- ``host``: ``total - model - step`` per row, plus the per-call cost spread over 30 rows: what
  fastdiff adds on the host beyond the model call and the kernel call.

Run: ``python benchmarks/loop_host_time.py`` (best of many calls; interleaved A/B, 2 threads).
"""

from __future__ import annotations

import time

import torch

import fastdiff
from fastdiff.models.denoisers import as_model

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def best(fn, n: int = 300) -> float:
    fn()
    t = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    torch.set_num_threads(2)
    for shape in ((1, 4, 8, 8), (1, 4, 64, 64)):
        out = torch.randn(2 * shape[0], *shape[1:])
        cond = torch.zeros(shape[0], 1)
        noise = torch.randn(shape)

        def model(x, t, c):
            return out

        samplers = {n: fastdiff.Sampler(model, shape=shape, sampler="dpmpp_2m", steps=n, schedule=SD,
                                        guidance_scale=7.5) for n in (30, 90)}
        t = {}
        for _ in range(3):  # interleaved rounds
            for n, s in samplers.items():
                t[("Sampler", n)] = min(t.get(("Sampler", n), 1e9),
                                        best(lambda s=s: s(noise, cond=cond, uncond=cond, seed=0), 100))
                t[("sample", n)] = min(t.get(("sample", n), 1e9), best(
                    lambda n=n: fastdiff.sample(model, noise, sampler="dpmpp_2m", steps=n, schedule=SD,
                                                guidance_scale=7.5, cond=cond, uncond=cond, seed=0), 100))
        ex = samplers[30].prepared.executor(False)
        ws = ex._workspace()
        p, run = out.data_ptr(), ws.run_ptr
        step = best(lambda: [run(i, p) for i in range(1, 29)], 200) / 28
        f = as_model(model)
        u, tt = ws.inputs[5], ex.t_in[5]
        call = best(lambda: [f(u, tt, cond) for _ in range(28)], 200) / 28
        for api in ("Sampler", "sample"):
            per_row = (t[(api, 90)] - t[(api, 30)]) / 60
            per_call = t[(api, 30)] - 30 * per_row
            host = per_row - step - call + per_call / 30
            print(f"{api:8s} {'x'.join(map(str, shape)):>10s}: total {per_row * 1e6:5.2f} us/row + "
                  f"{per_call * 1e6:5.1f} us/call | model {call * 1e6:4.2f} | step {step * 1e6:5.2f} | "
                  f"host beyond model and step {host * 1e6:4.2f} us/row (per-call cost spread over 30 rows)")


if __name__ == "__main__":
    main()
